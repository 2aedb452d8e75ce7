"""The kernels' own argument checks, reached by calling torch.ops.fusedloss.<op> directly
(the public functions check first, in python/fusedloss/_checks.py). Every backend raises the
same exception type for the same bad input, the one the Python checks raise: a bad shape or
value ValueError, a bad dtype TypeError, a bad device RuntimeError."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import fusedloss  # noqa: F401  (makes every Op)
from fusedloss import _ops, _schemas

from conftest import HAS_CUDA, HAS_TRITON

IGNORE = -100
MARGIN = dict(scale=16.0, m1=1.0, m2=0.5, m3=0.0)
HYPER_MS = [2.0, 50.0, 0.5, 0.1]


def good(op: str) -> dict:
    """Valid arguments of fusedloss::<op> by schema name: N = 4 rows, C = 6 classes, D = 8,
    M = 5 references."""
    n, c, d, m = 4, 6, 8, 5
    target = torch.tensor([0, 1, 2, 3])
    rows = dict(target=target, row_m2=None, row_m3=None)
    if op == "margin_cross_entropy":
        return dict(cos=torch.rand(n, c) * 2 - 1, **rows, **MARGIN, detach_margin=False,
                    label_smoothing=0.0, lse_square_scale=0.0, ignore_index=IGNORE,
                    compute_grad=True)
    if op == "margin_linear_cross_entropy":
        return dict(embeddings=torch.randn(n, d), weight=torch.randn(c, d), **rows,
                    row_grad=None, **MARGIN, detach_margin=False, label_smoothing=0.0,
                    lse_square_scale=0.0, ignore_index=IGNORE, normalize=True, block_size=0,
                    deterministic=False, compute_grad=True)
    if op == "sharded_margin_stats":
        return dict(cos=torch.rand(n, c) * 2 - 1, **rows, **MARGIN, class_start=0,
                    ignore_index=IGNORE)
    if op == "sharded_margin_grad":
        return dict(cos=torch.rand(n, c) * 2 - 1, **rows, coef=torch.zeros(n, 4), **MARGIN,
                    detach_margin=False, class_start=0, ignore_index=IGNORE)
    if op == "sharded_margin_linear_stats":
        return dict(embeddings=torch.randn(n, d), weight=torch.randn(c, d), **rows, **MARGIN,
                    normalize=True, class_start=0, ignore_index=IGNORE, block_size=0)
    if op == "sharded_margin_linear_grad":
        return dict(embeddings=torch.randn(n, d), weight=torch.randn(c, d), **rows,
                    coef=torch.zeros(n, 4), **MARGIN, detach_margin=False, normalize=True,
                    class_start=0, ignore_index=IGNORE, block_size=0)
    pair = dict(x=torch.randn(n, d), labels=torch.tensor([0, 1, 0, 1]), ref=torch.randn(m, d),
                ref_labels=torch.tensor([0, 1, 1, 0, 2]))
    if op == "pair_extrema":
        return dict(pair, distance=0, self_offset=-1, block_size=0)
    if op == "pair_row_stats":
        return dict(pair, thresholds=None, kind=0, distance=0, hyper=HYPER_MS, self_offset=-1,
                    block_size=0)
    if op == "pair_row_stats_backward":
        return dict(grad_stats=torch.ones(n, 2), stats=torch.zeros(n, 2), **pair,
                    thresholds=None, kind=0, distance=0, hyper=HYPER_MS, self_offset=-1,
                    block_size=0, x_grad=True, ref_grad=True)
    if op == "spherical_z_loss":
        return dict(logits=torch.randn(n, c), target=target, a=1.0, b=0.0, ignore_index=IGNORE,
                    compute_grad=True)
    raise KeyError(f"no valid arguments for fusedloss::{op}: add them to good()")


_I32 = dict(dtype=torch.int32)
_LONG = dict(dtype=torch.long)
# (op, arguments that replace good(op)'s, exception, a regex of the message that every
# backend's message matches: the argument's name).
BAD = [
    ("margin_cross_entropy", dict(cos=torch.rand(4)), ValueError, "cos"),
    ("margin_cross_entropy", dict(target=torch.tensor([0, 1, 2])), ValueError, "target"),
    ("margin_cross_entropy", dict(cos=torch.ones(4, 6, **_LONG)), TypeError, "cos"),
    ("margin_cross_entropy", dict(target=torch.tensor([0, 1, 2, 3], **_I32)), TypeError, "int64"),
    ("margin_cross_entropy", dict(row_m2=torch.zeros(3)), ValueError, "row_m2"),
    ("margin_cross_entropy", dict(row_m2=torch.zeros(4, dtype=torch.float64)), TypeError, "row_m2"),
    ("margin_cross_entropy", dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    ("margin_linear_cross_entropy", dict(embeddings=torch.randn(8)), ValueError, "embeddings"),
    ("margin_linear_cross_entropy", dict(weight=torch.randn(6, 7)), ValueError, "share D"),
    ("margin_linear_cross_entropy", dict(target=torch.tensor([0, 1, 2])), ValueError, "target"),
    ("margin_linear_cross_entropy", dict(weight=torch.randn(6, 8, dtype=torch.float64)),
     TypeError, "dtype"),
    ("margin_linear_cross_entropy", dict(target=torch.tensor([0, 1, 2, 3], **_I32)), TypeError,
     "int64"),
    ("margin_linear_cross_entropy", dict(row_grad=torch.ones(3)), ValueError, "row_grad"),
    ("sharded_margin_stats", dict(cos=torch.rand(4)), ValueError, "cos"),
    ("sharded_margin_stats", dict(target=torch.tensor([0, 1, 2])), ValueError, "target"),
    ("sharded_margin_stats", dict(cos=torch.ones(4, 6, **_LONG)), TypeError, "cos"),
    ("sharded_margin_stats", dict(target=torch.tensor([0, 1, 2, 3], **_I32)), TypeError, "int64"),
    ("sharded_margin_stats", dict(row_m2=torch.zeros(4, dtype=torch.float64)), TypeError, "row_m2"),
    ("sharded_margin_grad", dict(coef=torch.zeros(4, 3)), ValueError, "coef"),
    ("sharded_margin_grad", dict(coef=torch.zeros(4, 4, dtype=torch.float64)), TypeError, "coef"),
    ("sharded_margin_linear_stats", dict(weight=torch.randn(6, 7)), ValueError, "share D"),
    ("sharded_margin_linear_stats", dict(weight=torch.randn(6, 8, dtype=torch.float64)),
     TypeError, "dtype"),
    ("sharded_margin_linear_stats", dict(target=torch.tensor([0, 1, 2])), ValueError, "target"),
    ("sharded_margin_linear_grad", dict(coef=torch.zeros(3, 4)), ValueError, "coef"),
    ("sharded_margin_linear_grad", dict(coef=torch.zeros(4, 4, dtype=torch.half)), TypeError,
     "coef"),
    ("pair_extrema", dict(x=torch.randn(8)), ValueError, "x must be 2-D"),
    ("pair_extrema", dict(labels=torch.tensor([0, 1, 0])), ValueError, "labels"),
    ("pair_extrema", dict(ref=torch.randn(5, 7)), ValueError, "share D"),
    ("pair_extrema", dict(labels=torch.tensor([0.0, 1.0, 0.0, 1.0])), TypeError, "int64"),
    ("pair_extrema", dict(ref=torch.randn(5, 8, dtype=torch.float64)), TypeError, "dtype"),
    ("pair_row_stats", dict(thresholds=torch.zeros(4, 3)), ValueError, "thresholds"),
    ("pair_row_stats", dict(thresholds=torch.zeros(4, 2, **_LONG)), TypeError, "thresholds"),
    ("pair_row_stats", dict(ref_labels=torch.tensor([0, 1])), ValueError, "ref_labels"),
    ("pair_row_stats", dict(labels=torch.tensor([0, 1, 0, 1], **_I32)), TypeError, "int64"),
    ("pair_row_stats_backward", dict(grad_stats=torch.zeros(4, 3)), ValueError, "grad_stats"),
    ("pair_row_stats_backward", dict(stats=torch.zeros(3, 2)), ValueError, "stats"),
    ("pair_row_stats_backward", dict(grad_stats=torch.zeros(4, 2, **_LONG)), TypeError,
     "grad_stats"),
    ("pair_row_stats_backward", dict(x=torch.ones(4, 8, **_LONG), ref=torch.ones(5, 8, **_LONG)),
     TypeError, "x"),
    ("spherical_z_loss", dict(logits=torch.randn(4)), ValueError, "logits"),
    ("spherical_z_loss", dict(logits=torch.randn(4, 1)), ValueError, "C >= 2"),
    ("spherical_z_loss", dict(target=torch.tensor([0, 1, 2])), ValueError, "target"),
    ("spherical_z_loss", dict(logits=torch.ones(4, 6, **_LONG)), TypeError, "logits"),
    ("spherical_z_loss", dict(target=torch.tensor([0, 1, 2, 3], **_I32)), TypeError, "int64"),
]
IDS = [f"{op}-{'-'.join(bad)}-{exc.__name__}" for op, bad, exc, _ in BAD]


def call(fn, op: str, bad: dict, device: str = "cpu"):
    """fn (an implementation of fusedloss::<op>) on good(op) with `bad` replacing some
    arguments, every tensor on `device`, passed in schema order."""
    args = dict(good(op), **bad)
    schema = getattr(torch.ops.fusedloss, op).default._schema
    values = [args[a.name] for a in schema.arguments]
    return fn(*[v.to(device) if isinstance(v, torch.Tensor) else v for v in values])


def test_every_op_has_bad_shapes_and_dtypes():
    for op in _schemas.SCHEMAS:
        kinds = {exc for name, _, exc, _ in BAD if name == op}
        assert {ValueError, TypeError} <= kinds, f"fusedloss::{op}: add its bad inputs to BAD"


@pytest.mark.parametrize("op,bad,exc,message", BAD, ids=IDS)
def test_cpu_kernel(op, bad, exc, message):
    with pytest.raises(exc, match=message):
        call(getattr(torch.ops.fusedloss, op).default, op, bad)


@pytest.mark.gpu
@pytest.mark.parametrize("op,bad,exc,message", BAD, ids=IDS)
def test_cuda_kernel(op, bad, exc, message):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    if "cuda" not in _ops.kernel_backends(op):
        pytest.skip(f"fusedloss::{op} has no CUDA kernel")
    with pytest.raises(exc, match=message):
        call(getattr(torch.ops.fusedloss, op).default, op, bad, "cuda")


@pytest.mark.gpu
def test_cuda_kernel_rejects_a_cpu_target_as_a_device_error():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    # CUDA logits with a CPU target dispatch to the CUDA kernel, which names the devices.
    with pytest.raises(RuntimeError, match="target is on"):
        call(torch.ops.fusedloss.spherical_z_loss.default, "spherical_z_loss",
             dict(logits=torch.randn(4, 6).cuda(), target=torch.tensor([0, 1, 2, 3])))


def triton_outcomes() -> list:
    """[(op, exception type name or "no error", message)] of the Triton twin of each BAD case,
    on CUDA tensors, or on CPU ones under TRITON_INTERPRET=1 (run in a subprocess)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = []
    for op, bad, _, _ in BAD:
        try:
            call(_ops.OPS[op].triton, op, bad, device)
            out.append((op, "no error", ""))
        except Exception as exc:  # noqa: BLE001  (the parent compares the type)
            out.append((op, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else ""))
    return out


_CHILD = """
import importlib.util, json, sys
sys.path.insert(0, sys.argv[2])
spec = importlib.util.spec_from_file_location("kernel_checks", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps(module.triton_outcomes()))
"""


@pytest.mark.triton
def test_triton_op():
    """The Triton twins raise as the kernels do, with the same type and a message that names
    the argument (triton_kernels/_common.check_args). Run in a subprocess: an unchecked
    launcher may read past a short tensor."""
    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    env = dict(os.environ)
    if not HAS_CUDA:
        env["TRITON_INTERPRET"] = "1"
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-c", _CHILD, __file__, here], capture_output=True,
                         text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    outcomes = json.loads(run.stdout.strip().splitlines()[-1])
    wrong = [f"{case}: {kind} {message}" for case, (_, kind, message), (_, _, exc, expected)
             in zip(IDS, outcomes, BAD)
             if kind != exc.__name__ or not re.search(expected, message)]
    assert not wrong, "\n".join(wrong)
