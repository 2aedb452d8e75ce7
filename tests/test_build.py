"""The package as built: backends report themselves, import stays light, kernels stay torch-free."""
import math
import os
import pathlib
import re
import subprocess
import sys

import torch

import fusedloss

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_backends_report_availability_and_reason():
    status = fusedloss.backends()
    assert set(status) == {"reference", "cpu", "cuda", "triton"}
    assert status["reference"].available and status["cpu"].available
    for name, (available, reason) in status.items():
        assert isinstance(available, bool) and reason, name
    if not torch.cuda.is_available():
        assert not status["cuda"].available and "CUDA" in status["cuda"].reason


def test_import_is_light():
    """Importing fusedloss loads neither Triton nor torch._dynamo."""
    code = ("import sys, fusedloss; "
            "print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cuda_sources_include_no_torch_headers():
    heavy = re.compile(r'#include\s*[<"](torch|ATen|c10)/')
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        assert not heavy.search(path.read_text()), path


def test_every_schema_has_a_cpu_kernel():
    from fusedloss import _schemas

    assert _schemas.SCHEMAS
    for name in _schemas.SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedloss::{name}", "CPU"), name


def test_schemas_live_in_python_only():
    """The C++ sources implement the ops; only fusedloss._schemas defines them."""
    for path in sorted((ROOT / "csrc").rglob("*.c*")):
        text = path.read_text()
        assert not re.search(r"TORCH_LIBRARY\s*\(|\bm\.def\(", text), path


# ---- the package without fusedloss._C ---------------------------------------------------------
#
# A subprocess hides fusedloss._C (a sys.meta_path finder that raises ImportError for it), then
# loads this file and calls `_without_c_report()`; the parent compares what it saw with values
# that the C++ kernels compute here.

_HIDDEN = "fusedloss._C hidden by tests/test_build.py"

_CHILD = f"""
import json, sys

class _HideC:
    def find_spec(self, name, path=None, target=None):
        if name == "fusedloss._C":
            raise ImportError({_HIDDEN!r})
        return None

sys.meta_path.insert(0, _HideC())
import importlib.util
spec = importlib.util.spec_from_file_location("build_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps(module._without_c_report()))
"""


def _inputs():
    g = torch.Generator().manual_seed(0)
    n, c, d = 6, 11, 5
    f64 = dict(generator=g, dtype=torch.float64)
    return dict(
        cos=torch.rand(n, c, **f64) * 2 - 1,
        target=torch.randint(0, c, (n,), generator=g),
        emb=torch.randn(n, d, **f64),
        weight=torch.randn(c, d, **f64),
        bias=torch.randn(c, **f64),
        logits=torch.randn(n, c, **f64) * 3,
        labels=torch.tensor([0, 0, 1, 1, 2, 2]),
    )


def _loss_cases(backend: str) -> dict:
    """{case: (loss, flattened gradient of its first input)} of one op of each family and of
    the modules that take a backend, on `backend`, in fp64."""
    nn = fusedloss.nn
    x = _inputs()
    n, c = x["cos"].shape
    d = x["emb"].shape[1]

    cases = {
        "margin_cross_entropy": lambda cos: fusedloss.margin_cross_entropy(
            cos, x["target"], scale=16.0, m2=0.5, backend=backend),
        "linear_margin_cross_entropy": lambda emb: fusedloss.linear_margin_cross_entropy(
            emb, x["weight"], x["target"], scale=16.0, m2=0.5, backend=backend),
        "sharded_margin_cross_entropy": lambda cos: fusedloss.sharded_margin_cross_entropy(
            cos, x["target"], class_start=0, num_classes=c, scale=16.0, m3=0.35, backend=backend),
        "multi_similarity_loss": lambda emb: fusedloss.multi_similarity_loss(
            emb, x["labels"], backend=backend),
        "supcon_loss": lambda emb: fusedloss.supcon_loss(emb, x["labels"], backend=backend),
        "contrastive_loss": lambda emb: fusedloss.contrastive_loss(
            emb, x["labels"], backend=backend),
        "spherical_z_loss": lambda logits: fusedloss.spherical_z_loss(
            logits, x["target"], a=2.0, b=0.5, backend=backend),
        "linear_spherical_z_loss": lambda emb: fusedloss.linear_spherical_z_loss(
            emb, x["weight"], x["target"], x["bias"], backend=backend),
    }
    first = {"margin_cross_entropy": "cos", "sharded_margin_cross_entropy": "cos",
             "spherical_z_loss": "logits"}
    out = {}
    for name, call in cases.items():
        leaf = x[first.get(name, "emb")].clone().requires_grad_()
        loss = call(leaf)
        out[name] = (loss.item(), torch.autograd.grad(loss, leaf)[0].flatten().tolist())
    modules = {
        "nn.MarginCrossEntropy": (lambda: nn.MarginCrossEntropy("arcface", scale=16.0,
                                                                backend=backend), "cos"),
        "nn.MarginSoftmaxHead": (lambda: nn.MarginSoftmaxHead(d, c, "cosface", scale=16.0,
                                                              backend=backend,
                                                              dtype=torch.float64), "emb"),
        "nn.PartialFC": (lambda: nn.PartialFC(d, c, loss="arcface", scale=16.0, backend=backend,
                                              dtype=torch.float64), "emb"),
        "nn.SphericalZLoss": (lambda: nn.SphericalZLoss(a=2.0, backend=backend), "logits"),
        "nn.CrossBatchMemory": (lambda: nn.CrossBatchMemory(d, 8, "supcon", backend=backend,
                                                            dtype=torch.float64), "emb"),
    }
    for name, (make, first_input) in modules.items():
        torch.manual_seed(1)
        m = make()
        leaf = x[first_input].clone().requires_grad_()
        loss = m(leaf, x["labels"] if name == "nn.CrossBatchMemory" else x["target"])
        out[name] = (loss.item(), torch.autograd.grad(loss, leaf)[0].flatten().tolist())
    return out


def _without_c_report() -> dict:
    """What the package does without _C (run in the subprocess of _run_without_c)."""
    import contextlib
    import io

    import fusedloss.info
    from fusedloss import _ops

    x = _inputs()
    report = {"c_loaded": _ops._C is not None or "fusedloss._C" in sys.modules,
              "backends": {k: list(v) for k, v in fusedloss.backends().items()},
              "auto": _ops.resolve_backend("auto", torch.device("cpu"), "margin_cross_entropy")}
    info = io.StringIO()
    with contextlib.redirect_stdout(info):
        fusedloss.info.main()
    report["info"] = info.getvalue()
    errors = {}
    calls = {
        "margin_cross_entropy(backend='cpu')": lambda: fusedloss.margin_cross_entropy(
            x["cos"], x["target"], backend="cpu"),
        "spherical_z_loss(backend='cpu')": lambda: fusedloss.spherical_z_loss(
            x["logits"], x["target"], backend="cpu"),
        "torch.ops.fusedloss.spherical_z_loss": lambda: torch.ops.fusedloss.spherical_z_loss(
            x["logits"], x["target"], 1.0, 0.0, -100, False),
    }
    for name, call in calls.items():
        try:
            call()
            errors[name] = ("no error", "")
        except Exception as exc:  # noqa: BLE001  (the parent checks the type)
            errors[name] = (type(exc).__name__, str(exc))
    report["errors"] = errors
    report["values"] = {backend: _loss_cases(backend) for backend in ("reference", "auto")}
    # The Triton twin is made from the Python schema: it runs without _C (interpreted on CPU).
    triton = {}
    for backend in ("triton", "reference"):
        cos = x["cos"].clone().requires_grad_()
        loss = fusedloss.margin_cross_entropy(cos, x["target"], scale=16.0, m2=0.5,
                                              reduction="sum", backend=backend)
        triton[backend] = (loss.item(), torch.autograd.grad(loss, cos)[0].flatten().tolist())
    report["triton"] = triton
    return report


def _run_without_c() -> dict:
    import json

    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _CHILD, __file__], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_close(got, want, rtol, what):
    (got_loss, got_grad), (want_loss, want_grad) = got, want
    assert math.isclose(got_loss, want_loss, rel_tol=rtol, abs_tol=rtol), (what, got_loss, want_loss)
    torch.testing.assert_close(torch.tensor(got_grad), torch.tensor(want_grad), rtol=rtol,
                               atol=rtol, msg=lambda m: f"{what}: {m}")


def test_import_and_reference_backend_without_compiled_extension():
    report = _run_without_c()
    assert not report["c_loaded"]

    status = report["backends"]
    assert status["reference"][0]
    for name in ("cpu", "cuda"):
        available, reason = status[name]
        assert not available, name
        assert "fusedloss._C failed to load" in reason and _HIDDEN in reason, reason
        assert "pip install --no-build-isolation" in reason, reason
    assert "fusedloss._C failed to load" in report["info"], report["info"]
    assert "pip install --no-build-isolation" in report["info"], report["info"]
    assert report["auto"] == "reference"

    for call, (kind, message) in report["errors"].items():
        assert kind == "RuntimeError", (call, kind, message)
        assert "fusedloss._C failed to load" in message and "reinstall" in message, (call, message)

    known = _loss_cases("cpu")  # the C++ kernels, in this process
    for backend, values in report["values"].items():
        assert values.keys() == known.keys()
        for name, want in known.items():
            _assert_close(values[name], want, 1e-7, f"{name} on {backend!r} without _C")

    _assert_close(report["triton"]["triton"], report["triton"]["reference"], 1e-7,
                  "margin_cross_entropy on 'triton' without _C")
