"""The benchmark engine behind ``python -m fusedloss.bench``.

Usage::

    python -m fusedloss.bench [--device cpu|cuda] [--large] [--family margin] [--out DIR]
                              [--repeats 5] [--dtype float32|bfloat16|float16] [--no-memory]

(``--suite NAME`` is an alias of ``--family NAME``.)

Writes ``bench_<device>.md``, ``bench_<device>.json`` and ``bench_<device>.png`` to ``--out``
(default ``bench/results``, relative to the working directory) and prints the markdown table.
The md and json are also rewritten after every case, marked partial, so that a run cut short
(a time limit) leaves its finished cases behind.

The engine knows nothing about any loss. A *family* is one function, registered with
``@family("name")``, that returns a :class:`Family`: its cases (plain dicts of shape
parameters), a function building the inputs of a case, and its contenders (name ->
function ``(case, inputs) -> step``; ``step()`` runs forward and backward and returns the
loss). Adding a loss family is one new function; the timing, the memory measurement, the
ratios, the tables, the json and the plot come from the engine.

Timing: every contender of a case gets the same inputs, is warmed up (a compiled contender
compiles during its first warm-up call, which is not timed), and then the contenders run
interleaved, round after round (the order rotated each round), so that a slow phase of a
noisy machine hits all of them alike; each reports the median of at least ``--repeats``
runs of forward + backward, with the gradients of the inputs set to None before each run.

Memory: see :func:`_measure_memory_cpu` (CPU: a fresh subprocess per case and contender,
``ru_maxrss``) and :func:`_measure_memory_cuda` (``torch.cuda.max_memory_allocated``).

This module imports neither matplotlib nor triton at import time.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

MiB = 1 << 20
_MEM_MARK = "FUSEDLOSS_BENCH_MEMORY "
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class Unavailable(Exception):
    """A contender that cannot run here (backend not built, library not installed)."""


class NotInstalled(Unavailable):
    """A peer library that is not installed: its row stays in the table, "not installed"."""

    def __init__(self, dist: str):
        super().__init__(f"{dist} not installed")


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------

Step = Callable[[], torch.Tensor]
Contender = Callable[[dict, dict], Step]  # (case, inputs) -> step; raises Unavailable


@dataclasses.dataclass
class Family:
    """What a loss family gives the engine.

    cases: dicts with at least ``N``, ``C``, ``dtype`` (a key of DTYPES) and ``label``
        (a short human name of the case); the plot draws one line per contender against
        ``C`` for the cases that agree in everything but ``C``.
    make_inputs(case, device) -> dict: built once per case and shared by its contenders;
        ``inputs["leaves"]`` lists the tensors whose ``.grad`` the engine resets to None.
    contenders: name -> (case, inputs) -> step. ``step()`` runs forward and backward and
        returns the loss. Names in ``fused`` get a bandwidth figure, ``baselines`` =
        (eager name, compiled name) are the references of the ratio columns.
    bytes_moved(case) -> int or None: the bytes the fused kernels read and write, for GB/s.
    flops(case) -> int or None: the floating-point operations of one forward + backward of
        a fused contender, for TFLOP/s (matmul-bound families, where GB/s says little).
    mem_factor: rough peak bytes of the hungriest contender in units of N*C*itemsize,
        inputs included; a case that would not fit in the free memory is skipped.
    case_view(family, case) -> Family or None: the family as one case sees it, for a family
        whose cases differ in inputs or contenders (None: every case sees the family).
    targets: goals to report (never to assert), each a dict with ``case`` (the key/values a
        case must match), ``contender``, and ``time_vs_eager`` / ``memory_vs_eager``: the
        largest acceptable contender / eager-baseline ratio of time / peak extra memory.
    """

    name: str
    cases: List[dict]
    make_inputs: Callable[[dict, str], dict]
    contenders: Dict[str, Contender]
    baselines: tuple = ("baseline-eager", "baseline-compile")
    fused: tuple = ()
    bytes_moved: Callable[[dict], Optional[int]] = lambda case: None
    flops: Callable[[dict], Optional[int]] = lambda case: None
    notes: List[str] = dataclasses.field(default_factory=list)
    mem_factor: float = 8.0
    case_view: Optional[Callable[["Family", dict], "Family"]] = None
    targets: List[dict] = dataclasses.field(default_factory=list)


FAMILIES: Dict[str, Callable[..., Family]] = {}
# A family in DEFAULT_FAMILIES runs when --family is not given; others run when asked.
DEFAULT_FAMILIES: List[str] = []


def family(name: str, default: bool = True):
    """Register ``fn(device, large, dtypes) -> Family`` under ``name``."""

    def register(fn):
        FAMILIES[name] = fn
        if default:
            DEFAULT_FAMILIES.append(name)
        return fn

    return register


def compiled(fn: Callable) -> Callable:
    """torch.compile for a baseline: static shapes, so each case gets its own graph, as a
    training run with fixed shapes would. The engine resets dynamo between cases."""
    return torch.compile(fn, dynamic=False)


def _fusedloss():
    import fusedloss

    return fusedloss


def _backend_contender(backend: str, **fixed) -> Contender:
    """fusedloss.margin_cross_entropy with one backend; Unavailable if it is not here."""

    def build(case, inputs):
        fl = _fusedloss()
        if backend != "auto":
            status = fl.backends().get(backend)
            if status is None or not status[0]:
                raise Unavailable(status[1] if status is not None else f"no backend {backend!r}")
        kwargs = {**fixed, **{k: case[k] for k in ("scale", "m2") if k in case}}
        cos, t = inputs["cos"], inputs["target"]

        def step():
            loss = fl.margin_cross_entropy(cos, t, backend=backend, **kwargs)
            loss.backward()
            return loss.detach()

        return step

    return build


def _loss_contender(fn: Callable, compile_it: bool) -> Contender:
    """A plain-PyTorch loss ``fn(cos, target, **case params)`` in eager mode or compiled."""

    def build(case, inputs):
        f = compiled(fn) if compile_it else fn
        cos, t = inputs["cos"], inputs["target"]
        kwargs = {k: case[k] for k in ("scale", "m2") if k in case}

        def step():
            loss = f(cos, t, **kwargs)
            loss.backward()
            return loss.detach()

        return step

    return build


def _cos_inputs(case: dict, device: str) -> dict:
    """cos [N, C] uniform in (-0.8, 0.8) (so that theta + 0.5 < pi for every target, where
    plain cos(theta + m) and fusedloss's continued cosine agree), targets uniform; seeded."""
    g = torch.Generator(device=device)
    g.manual_seed(1234 + case["C"] + case["N"])
    cos = torch.empty(case["N"], case["C"], dtype=DTYPES[case["dtype"]], device=device)
    cos.uniform_(-0.8, 0.8, generator=g)  # in place: no temporary to inflate the RSS peak
    target = torch.randint(0, case["C"], (case["N"],), generator=g, device=device)
    cos.requires_grad_(True)
    return {"cos": cos, "target": target, "leaves": [cos]}


def _bytes_row_op(case: dict) -> int:
    """Forward reads cos and writes the gradient (N*C each); backward reads and writes the
    gradient once more to scale it: 4 * N * C * itemsize."""
    return 4 * case["N"] * case["C"] * DTYPES[case["dtype"]].itemsize


# --------------------------------------------------------------------------------------
# Family: margin softmax cross-entropy (ArcFace)
# --------------------------------------------------------------------------------------

def arcface_baseline(cos, t, scale=64.0, m2=0.5):
    """ArcFace as users write it today."""
    cy = cos.gather(1, t[:, None])
    theta = torch.acos(cy.clamp(-1 + 1e-7, 1 - 1e-7))
    return F.cross_entropy(cos.scatter(1, t[:, None], torch.cos(theta + m2)) * scale, t)


def _grid(Ns, Cs, dtypes, **params):
    return [dict(N=n, C=c, dtype=d, **params) for d in dtypes for n in Ns for c in Cs]


@family("margin")
def margin_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    if device == "cuda":
        dtypes = dtypes or ["bfloat16", "float32"]
        Cs = [10_000, 100_000, 300_000] + ([1_000_000] if large else [])
        cases = _grid([8192], Cs, dtypes)
    else:
        dtypes = dtypes or ["float32"]
        Cs = [10_000, 30_000, 100_000] + ([300_000] if large else [])
        cases = _grid([1024] + ([2048] if large else []), Cs, dtypes)
    for c in cases:
        c.update(variant="arcface", scale=64.0, m2=0.5,
                 label=f"arcface {_SHORT[c['dtype']]} N={c['N']} C={c['C']:,}")
    contenders = {
        "fusedloss": _backend_contender("auto"),
        "baseline-eager": _loss_contender(arcface_baseline, compile_it=False),
        "baseline-compile": _loss_contender(arcface_baseline, compile_it=True),
    }
    fused = ("fusedloss",)
    if device == "cuda":
        contenders["fusedloss-cuda"] = _backend_contender("cuda")
        contenders["fusedloss-triton"] = _backend_contender("triton")
        fused += ("fusedloss-cuda", "fusedloss-triton")
    return Family(
        name="margin", cases=cases, make_inputs=_cos_inputs, contenders=contenders,
        fused=fused, bytes_moved=_bytes_row_op, mem_factor=5.0,
        notes=["margin: ArcFace, scale 64, m2 0.5; baseline = `arcface_baseline` "
               "(gather, acos, scatter of cos(theta + m), F.cross_entropy), "
               "eager and under torch.compile(dynamic=False)."])


# --------------------------------------------------------------------------------------
# Family: plain cross-entropy, where the peer libraries (Liger-Kernel, Cut Cross-Entropy)
# can be compared. On CUDA it joins the default run when a peer library is installed.
# --------------------------------------------------------------------------------------

def plain_ce_baseline(cos, t):
    return F.cross_entropy(cos, t)


def linear_ce_baseline(e, w, t):
    return F.cross_entropy(e @ w.T, t)


def _peers() -> Dict[str, str]:
    """Installed peer libraries: name -> version (import-guarded, nothing imported)."""
    found = {}
    for dist, mod in (("liger-kernel", "liger_kernel"), ("cut-cross-entropy", "cut_cross_entropy")):
        if importlib.util.find_spec(mod) is not None:
            try:
                found[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                found[dist] = "?"
    return found


def _liger_contender(case, inputs):
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        raise Unavailable(f"liger-kernel not importable: {e}")
    if inputs["cos"].device.type != "cuda":
        raise Unavailable("Liger-Kernel needs CUDA")
    loss_fn = LigerCrossEntropyLoss()
    cos, t = inputs["cos"], inputs["target"]

    def step():
        loss = loss_fn(cos, t)
        loss.backward()
        return loss.detach()

    return step


def _linear_inputs(case: dict, device: str) -> dict:
    g = torch.Generator(device=device)
    g.manual_seed(4321 + case["C"])
    dt = DTYPES[case["dtype"]]
    e = torch.empty(case["N"], case["D"], dtype=dt, device=device).normal_(generator=g)
    w = torch.empty(case["C"], case["D"], dtype=dt, device=device).normal_(generator=g)
    e.mul_(case["D"] ** -0.5)
    w.mul_(case["D"] ** -0.5)
    t = torch.randint(0, case["C"], (case["N"],), generator=g, device=device)
    e.requires_grad_(True)
    w.requires_grad_(True)
    return {"e": e, "w": w, "target": t, "leaves": [e, w]}


def _linear_contender(kind: str) -> Contender:
    def build(case, inputs):
        e, w, t = inputs["e"], inputs["w"], inputs["target"]
        if kind == "cce":
            try:
                from cut_cross_entropy import linear_cross_entropy
            except Exception as ex:  # noqa: BLE001
                raise Unavailable(f"cut-cross-entropy not importable: {ex}")
            f = linear_cross_entropy
        elif kind == "fusedloss":
            fl = _fusedloss()

            def f(e, w, t):
                return fl.margin_cross_entropy(e @ w.T, t, scale=1.0, backend="auto")
        else:
            f = compiled(linear_ce_baseline) if kind == "compile" else linear_ce_baseline

        def step():
            loss = f(e, w, t)
            loss.backward()
            return loss.detach()

        return step

    return build


@family("ce", default=False)
def ce_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    peers = _peers() if device == "cuda" else {}
    if device == "cuda":
        dtypes = dtypes or ["bfloat16"]
        Cs = [32_000, 128_000, 256_000] + ([1_000_000] if large else [])
        N = 8192
    else:
        dtypes = dtypes or ["float32"]
        Cs = [10_000, 30_000, 100_000] + ([300_000] if large else [])
        N = 1024
    cases = _grid([N], Cs, dtypes, variant="plain-ce")
    for c in cases:
        c["label"] = f"plain CE {_SHORT[c['dtype']]} N={c['N']} C={c['C']:,}"
    contenders = {
        "fusedloss": _backend_contender("auto", scale=1.0),
        "baseline-eager": _loss_contender(plain_ce_baseline, compile_it=False),
        "baseline-compile": _loss_contender(plain_ce_baseline, compile_it=True),
    }
    fused = ("fusedloss",)
    if device == "cuda":
        contenders["fusedloss-cuda"] = _backend_contender("cuda", scale=1.0)
        contenders["fusedloss-triton"] = _backend_contender("triton", scale=1.0)
        fused += ("fusedloss-cuda", "fusedloss-triton")
        if "liger-kernel" in peers:
            contenders["liger (plain CE)"] = _liger_contender
    notes = ["ce: plain cross-entropy on logits; fusedloss runs `margin_cross_entropy(x, t, "
             "scale=1.0)` (m2 = 0), baseline = `F.cross_entropy(x, t)`, eager and compiled. "
             "Peer libraries compute plain cross-entropy only, so they appear in this family."]
    fam = Family(name="ce", cases=cases, make_inputs=_cos_inputs, contenders=contenders,
                 fused=fused, bytes_moved=_bytes_row_op, notes=notes, mem_factor=6.0,
                 case_view=_ce_case_view)
    if "cut-cross-entropy" in peers:
        # Cut Cross-Entropy takes embeddings and classifier, not logits: its own case,
        # linear layer + cross-entropy, all contenders doing the matmul.
        D = 2048
        lin = _grid([N], Cs, dtypes, variant="linear-ce", D=D)
        for c in lin:
            c["label"] = f"linear+plain CE {_SHORT[c['dtype']]} N={c['N']} C={c['C']:,} D={D}"
        fam.cases += lin
        fam.notes.append(f"ce, linear+plain CE cases: inputs e [N, {D}], w [C, {D}]; every "
                         "contender computes e @ w.T (fusedloss and the baselines "
                         "materialise it, Cut Cross-Entropy does not); no GB/s figure.")
    return fam


def _case_family_view(fam: Family, case: dict) -> Family:
    """The family as `case` sees it (see Family.case_view)."""
    return fam.case_view(fam, case) if fam.case_view is not None else fam


def _ce_case_view(fam: Family, case: dict) -> Family:
    """The linear-CE cases of the ce family use other inputs and contenders."""
    if case.get("variant") != "linear-ce":
        return fam
    contenders = {"fusedloss": _linear_contender("fusedloss"),
                  "baseline-eager": _linear_contender("eager"),
                  "baseline-compile": _linear_contender("compile"),
                  "cce (plain CE)": _linear_contender("cce")}
    return dataclasses.replace(fam, make_inputs=_linear_inputs, contenders=contenders,
                               fused=(), bytes_moved=lambda case: None)


# --------------------------------------------------------------------------------------
# Family: the fused linear margin softmax (fusedloss.linear_margin_cross_entropy) against
# the chain users run today: normalise, F.linear, clamp, then `arcface_baseline`.
# --------------------------------------------------------------------------------------

def arcface_linear_baseline(x, w, t, scale=64.0, m2=0.5):
    """ArcFace on embeddings x [N, D] and class centres w [C, D] as users write it today:
    the cosine matrix of the normalised rows, then the chain of `arcface_baseline`."""
    cos = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
    return arcface_baseline(cos, t, scale, m2)


def _kernel_check(fl, backend: str, op: str, device: torch.device) -> str:
    """The backend that `backend` resolves to for `op` on `device`; Unavailable where it
    cannot run there (backend missing, or no kernel of `op` for it)."""
    from fusedloss._ops import resolve_backend

    try:
        return resolve_backend(backend, device, op)
    except (RuntimeError, ValueError) as exc:
        raise Unavailable(str(exc)) from exc


_LINEAR_KW = ("normalize", "scale", "m2")


def _linear_margin_contender(backend: str) -> Contender:
    """fusedloss.linear_margin_cross_entropy(e, w, target) with one backend."""

    def build(case, inputs):
        fl = _fusedloss()
        e, w, t = inputs["e"], inputs["w"], inputs["target"]
        _kernel_check(fl, backend, "margin_linear_cross_entropy", e.device)
        kwargs = {k: case[k] for k in _LINEAR_KW}

        def step():
            loss = fl.linear_margin_cross_entropy(e, w, t, backend=backend, **kwargs)
            loss.backward()
            return loss.detach()

        return step

    return build


def _linear_chain_contender(compile_it: bool) -> Contender:
    """The unfused chain of the case's variant, eager or compiled: `arcface_linear_baseline`,
    or for plain linear CE `linear_ce_baseline` (F.cross_entropy(e @ w.T, t))."""

    def build(case, inputs):
        if case["variant"] == "plain-linear-ce":
            fn, kwargs = linear_ce_baseline, {}
        else:
            fn, kwargs = arcface_linear_baseline, {"scale": case["scale"], "m2": case["m2"]}
        f = compiled(fn) if compile_it else fn
        e, w, t = inputs["e"], inputs["w"], inputs["target"]

        def step():
            loss = f(e, w, t, **kwargs)
            loss.backward()
            return loss.detach()

        return step

    return build


def _cce_linear_contender(case, inputs):
    """Cut Cross-Entropy's linear_cross_entropy(e, c, targets): plain CE of e @ c.T, with its
    defaults (impl "cce", filter_eps "high": gradient filtering)."""
    if importlib.util.find_spec("cut_cross_entropy") is None:
        raise NotInstalled("cut-cross-entropy")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as ex:  # noqa: BLE001 - installed but not importable here
        raise Unavailable(f"cut-cross-entropy not importable: {type(ex).__name__}: {ex}")
    e, w, t = inputs["e"], inputs["w"], inputs["target"]
    if e.device.type != "cuda":
        raise Unavailable("Cut Cross-Entropy needs CUDA")

    def step():
        loss = linear_cross_entropy(e, w, t)
        loss.backward()
        return loss.detach()

    return step


def _flops_linear(case: dict) -> int:
    """Forward + backward of the classifier matmuls: 2·N·C·D for the logits, 2·N·C·D for the
    gradient of the embeddings, 2·N·C·D for that of the class centres."""
    return 6 * case["N"] * case["C"] * case["D"]


def _margin_linear_view(fam: Family, case: dict) -> Family:
    """The plain linear CE case adds Cut Cross-Entropy, which computes plain CE only."""
    if case.get("variant") != "plain-linear-ce":
        return fam
    return dataclasses.replace(fam, contenders={**fam.contenders,
                                                "cce (plain CE)": _cce_linear_contender})


@family("margin_linear")
def margin_linear_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    D = 512
    if device == "cuda":
        dtypes = dtypes or ["bfloat16"]
        N, Cs = 8192, [1_000_000]
    else:
        dtypes = dtypes or ["float32"]
        N, Cs = 1024, [10_000, 100_000] + ([300_000] if large else [])
    cases = _grid([N], Cs, dtypes, D=D, variant="arcface", normalize=True, scale=64.0, m2=0.5)
    for c in cases:
        c["label"] = f"linear arcface {_SHORT[c['dtype']]} N={c['N']} D={D} C={c['C']:,}"
    notes = ["margin_linear: `linear_margin_cross_entropy(x, w, t, scale=64, m2=0.5)` (normalize="
             "True) on embeddings x [N, D] and class centres w [C, D], both leaves requiring grad; "
             "baseline = `arcface_linear_baseline`: `F.linear(F.normalize(x), F.normalize(w))"
             ".clamp(-1, 1)` then `arcface_baseline`, eager and under torch.compile(dynamic=False). "
             "TFLOP/s (fusedloss contenders) = 6·N·C·D / time: the logits and the two gradient "
             "matmuls; the normalisations, O((N + C)·D), are not counted. No GB/s: the op is "
             "matmul-bound. Inputs: x, w normal / sqrt(D), random targets, fixed seed."]
    contenders = {
        "fusedloss": _linear_margin_contender("auto"),
        "baseline-eager": _linear_chain_contender(compile_it=False),
        "baseline-compile": _linear_chain_contender(compile_it=True),
    }
    fused = ("fusedloss",)
    if device == "cuda":
        contenders["fusedloss-triton"] = _linear_margin_contender("triton")
        fused += ("fusedloss-triton",)
        try:
            from fusedloss._ops import resolve_backend

            notes.append(f"margin_linear: fusedloss = backend \"auto\", here "
                         f"{resolve_backend('auto', torch.device('cuda'))!r}.")
        except Exception:  # noqa: BLE001 - a note only
            pass
        plain = _grid([N], Cs, dtypes, D=D, variant="plain-linear-ce", normalize=False,
                      scale=1.0, m2=0.0)
        for c in plain:
            c["label"] = f"plain linear CE {_SHORT[c['dtype']]} N={c['N']} D={D} C={c['C']:,}"
        cases += plain
        peers = _peers()
        notes.append("margin_linear, plain linear CE cases: margins off (`normalize=False, "
                     "scale=1, m2=0`), baseline `F.cross_entropy(x @ w.T, t)`, so that Cut "
                     "Cross-Entropy's `linear_cross_entropy(x, w, t)` (plain CE only; its "
                     "defaults, with gradient filtering, filter_eps=\"high\") computes the same "
                     "loss; cut-cross-entropy "
                     + (peers["cut-cross-entropy"] if "cut-cross-entropy" in peers
                        else "not installed") + ".")
    return Family(
        name="margin_linear", cases=cases, make_inputs=_linear_inputs, contenders=contenders,
        fused=fused, flops=_flops_linear, notes=notes, mem_factor=8.0,
        case_view=_margin_linear_view,
        targets=[{"case": {"variant": "arcface", "dtype": "float32", "N": 1024, "D": 512,
                           "C": 100_000},
                  "contender": "fusedloss", "time_vs_eager": 0.6, "memory_vs_eager": 0.15}])


# --------------------------------------------------------------------------------------
# Family: the spherical Z-loss of the output layer (fusedloss.linear_spherical_z_loss)
# against the code users write today: form the logits, then mean, spread, z and softplus.
# Not in the default run (`--family spherical` / `--suite spherical`).
# --------------------------------------------------------------------------------------

def spherical_linear_baseline(h, w, t, bias=None, a=1.0, b=0.0):
    """The linear spherical Z-loss as users write it today, in the inputs' dtype: the
    N x C outputs, their row mean and (population) spread, z of the target output, then
    softplus(a (b - z)) / a, mean over rows."""
    o = h @ w.T
    if bias is not None:
        o = o + bias
    mu = o.mean(1)
    sigma = (o - mu[:, None]).pow(2).mean(1).sqrt()
    z = (o.gather(1, t[:, None]).squeeze(1) - mu) / sigma
    return (F.softplus(a * (b - z)) / a).mean()


def _spherical_inputs(case: dict, device: str) -> dict:
    """hidden [N, d], weight [C, d] normal / sqrt(d), bias [C] normal * 0.1, all leaves;
    random targets; seeded; built in place (no temporaries to inflate the RSS peak)."""
    g = torch.Generator(device=device)
    g.manual_seed(2718 + case["C"] + case["N"])
    dt = DTYPES[case["dtype"]]
    h = torch.empty(case["N"], case["D"], dtype=dt, device=device).normal_(generator=g)
    w = torch.empty(case["C"], case["D"], dtype=dt, device=device).normal_(generator=g)
    bias = torch.empty(case["C"], dtype=dt, device=device).normal_(generator=g)
    h.mul_(case["D"] ** -0.5)
    w.mul_(case["D"] ** -0.5)
    bias.mul_(0.1)
    t = torch.randint(0, case["C"], (case["N"],), generator=g, device=device)
    for leaf in (h, w, bias):
        leaf.requires_grad_(True)
    return {"h": h, "w": w, "bias": bias, "target": t, "leaves": [h, w, bias]}


def _spherical_contender(kind: str) -> Contender:
    """kind "fusedloss" (linear_spherical_z_loss, backend "auto"), "eager" or "compile"
    (`spherical_linear_baseline`); forward + backward w.r.t. hidden, weight and bias."""

    def build(case, inputs):
        if kind == "fusedloss":
            fl = _fusedloss()

            def f(h, w, t, bias, a, b):
                return fl.linear_spherical_z_loss(h, w, t, bias, a=a, b=b, backend="auto")
        else:
            f = compiled(spherical_linear_baseline) if kind == "compile" else spherical_linear_baseline
        h, w, bias, t = inputs["h"], inputs["w"], inputs["bias"], inputs["target"]
        a, b = case["a"], case["b"]

        def step():
            loss = f(h, w, t, bias, a, b)
            loss.backward()
            return loss.detach()

        return step

    return build


def _flops_spherical(case: dict) -> int:
    """The matmul work of the factored op, forward + backward: the Gram matrix of the
    augmented weight (2·C·D²), the weight-gradient update A [G; p] (2·C·D²), the row
    quadratic forms and G (about 2·N·D² each); D = d + 2 (bias and the ones column)."""
    D = case["D"] + 2
    return 4 * case["C"] * D * D + 4 * case["N"] * D * D


# One plain-SGD step of the output layer (issue 6 item 7): forward + backward + update.
_SGD_LR = 0.1


def _sgd_inputs(case: dict, device: str) -> dict:
    """hidden h [m, d] normal / sqrt(d), a leaf requiring grad (the layer's backward runs as
    it does under a network), random targets; seeded. Each contender builds its own layer
    from `_sgd_weights`, so that every one starts from the same weight and bias."""
    g = torch.Generator(device=device)
    g.manual_seed(3141 + case["C"] + case["N"])
    h = torch.empty(case["N"], case["D"], dtype=DTYPES[case["dtype"]], device=device)
    h.normal_(generator=g).mul_(case["D"] ** -0.5)
    t = torch.randint(0, case["C"], (case["N"],), generator=g, device=device)
    h.requires_grad_(True)
    return {"h": h, "target": t, "leaves": [h]}


def _sgd_weights(case: dict, device: str):
    """weight [C, d] normal / sqrt(d), bias [C] normal * 0.1; seeded, built in place."""
    g = torch.Generator(device=device)
    g.manual_seed(1618 + case["C"])
    dt = DTYPES[case["dtype"]]
    w = torch.empty(case["C"], case["D"], dtype=dt, device=device).normal_(generator=g)
    bias = torch.empty(case["C"], dtype=dt, device=device).normal_(generator=g)
    return w.mul_(case["D"] ** -0.5), bias.mul_(0.1)


class _NaiveSphericalLinear(torch.nn.Module):
    """A dense output layer whose loss forms the logits: `spherical_linear_baseline`."""

    def __init__(self, weight, bias, a, b):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
        self.a, self.b = a, b

    def forward(self, h, t):
        return spherical_linear_baseline(h, self.weight, t, self.bias, self.a, self.b)


def _sgd_contender(kind: str) -> Contender:
    """One training step of the output layer: kind "factored" (`FactoredSphericalLinear`:
    `layer(h, t).backward()` applies the SGD step itself), "dense" (`SphericalLinear`, loss
    through `linear_spherical_z_loss`) or "naive" (logits, then the Z-loss in plain torch),
    the dense ones trained with torch.optim.SGD(lr, no momentum)."""

    def build(case, inputs):
        device = inputs["h"].device
        lr, a, b = case["lr"], case["a"], case["b"]
        w, bias = _sgd_weights(case, str(device))
        h, t = inputs["h"], inputs["target"]
        if kind == "factored":
            from fusedloss.nn import FactoredSphericalLinear

            layer = FactoredSphericalLinear(case["D"], case["C"], lr, a=a, b=b, bias=True,
                                            device=device, dtype=w.dtype)
            layer.load_dense(w, bias)
            del w, bias

            def step():
                loss = layer(h, t)
                loss.backward()
                return loss.detach()

            return step
        if kind == "dense":
            from fusedloss.nn import SphericalLinear

            layer = SphericalLinear(case["D"], case["C"], a=a, b=b, device=device, dtype=w.dtype)
            with torch.no_grad():
                layer.weight.copy_(w)
                layer.bias.copy_(bias)
            del w, bias
        else:
            layer = _NaiveSphericalLinear(w, bias, a, b)
        opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.0)

        def step():
            loss = layer(h, t)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)  # at the end: no weight gradient held between steps
            return loss.detach()

        return step

    return build


_SGD_NAMES = {"factored": "factored-sgd (FactoredSphericalLinear)",
              "dense": "dense-sgd (linear_spherical_z_loss)",
              "naive": "dense-sgd (naive logits)"}


def _spherical_case_view(fam: Family, case: dict) -> Family:
    """The SGD-step cases: their own inputs and contenders; the ratio columns are against
    the naive dense step ("eager") and the linear_spherical_z_loss dense step ("compile")."""
    if case.get("variant") != "sgd-step":
        return fam
    kinds = ["factored", "dense", "naive"]
    return dataclasses.replace(
        fam, make_inputs=_sgd_inputs, fused=(), flops=lambda case: None,
        contenders={_SGD_NAMES[k]: _sgd_contender(k) for k in kinds},
        baselines=(_SGD_NAMES["naive"], _SGD_NAMES["dense"]))


@family("spherical", default=False)
def spherical_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    dtypes = dtypes or ["float32"]
    D = 256
    Cs = [100_000] + ([300_000] if large else [])
    cases = _grid([2048], Cs, dtypes, D=D, variant="linear-spherical", a=1.0, b=0.0)
    for c in cases:
        c["label"] = f"linear spherical Z {_SHORT[c['dtype']]} N={c['N']} d={D} C={c['C']:,}"
    notes = ["spherical: `linear_spherical_z_loss(h, w, t, bias, a=1, b=0)` (backend \"auto\", "
             "the factored op: Gram matrix of the centred weight, no N x C outputs) on hidden "
             "h [N, d], weight w [C, d] and bias [C], all three leaves requiring grad; baseline = "
             "`spherical_linear_baseline`, the code users write today: `o = h @ w.T + bias; "
             "mu = o.mean(1); sigma = (o - mu[:, None]).pow(2).mean(1).sqrt()`, "
             "z = (o_c - mu) / sigma, loss = mean softplus(a (b - z)) / a, fp32, eager and under "
             "torch.compile(dynamic=False). TFLOP/s (fusedloss) = (4·C·D² + 4·N·D²) / time with "
             "D = d + 2; the baseline's matmuls are 6·N·C·d. Inputs: h, w normal / sqrt(d), "
             "bias normal * 0.1, random targets, fixed seed."]
    sgd = _grid([128], [100_000, 1_000_000], dtypes, D=D, variant="sgd-step", a=1.0, b=0.0,
                lr=_SGD_LR)
    for c in sgd:
        c["label"] = f"SGD step {_SHORT[c['dtype']]} m={c['N']} d={D} C={c['C']:,}"
    cases += sgd
    notes.append(
        "spherical, SGD step cases: ONE plain-SGD training step of the output layer (forward + "
        f"backward + weight update, lr {_SGD_LR}, no momentum) on hidden h [m, d] (a leaf "
        "requiring grad, so dL/dh is computed as under a network), fp32. Contenders: "
        "`factored-sgd (FactoredSphericalLinear)`: `loss = layer(h, t); loss.backward()` (the "
        "backward applies the exact factored SGD update, O(m D² + m² D + m³), independent of "
        "C; its periodic O(C D²) stabilisation, every 1000 steps, does not occur in these runs); "
        "`dense-sgd (linear_spherical_z_loss)`: `fusedloss.nn.SphericalLinear(d, C)`, loss "
        "through `linear_spherical_z_loss` (no m x C outputs, but the weight gradient and the "
        "update are O(C d) and its Gram matrix O(C d²)), then `torch.optim.SGD.step()` and "
        "`zero_grad(set_to_none=True)`; `dense-sgd (naive logits)`: the same with the loss "
        "`spherical_linear_baseline` (`o = h @ W.T + b`, then the Z-loss in plain torch). All "
        "three start from the same weight (normal / sqrt(d)) and bias (normal * 0.1); each "
        "timed run is a further step of the same layer. Columns \"x vs eager\" / \"x vs "
        "compile\" here = time of the naive / linear_spherical_z_loss dense step over the "
        "contender's; the loss check is against the naive dense step (first step, same "
        "weights). Peak extra memory counts the weight gradient and the update's temporaries "
        "(the layers' weights are built before the base). No memory or time target.")
    contenders = {
        "fusedloss": _spherical_contender("fusedloss"),
        "baseline-eager": _spherical_contender("eager"),
        "baseline-compile": _spherical_contender("compile"),
    }
    return Family(
        name="spherical", cases=cases, make_inputs=_spherical_inputs, contenders=contenders,
        fused=("fusedloss",), flops=_flops_spherical, notes=notes, mem_factor=6.0,
        case_view=_spherical_case_view,
        targets=[{"case": {"variant": "linear-spherical", "dtype": "float32", "N": 2048,
                           "D": 256, "C": 100_000},
                  "contender": "fusedloss", "time_vs_eager": 0.1, "memory_vs_eager": 0.05}])


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _clear(inputs):
    for leaf in inputs["leaves"]:
        leaf.grad = None


def _timed(step, inputs, device) -> float:
    """Seconds of one forward + backward."""
    _clear(inputs)
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, oom) or "out of memory" in str(e).lower()


def _free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_case(fam: Family, case: dict, device: str, repeats: int, log) -> Dict[str, dict]:
    """Time every contender of one case, interleaved. Returns name -> record."""
    fam = _case_family_view(fam, case)
    records: Dict[str, dict] = {name: {"status": "ok"} for name in fam.contenders}
    torch._dynamo.reset()  # each case compiles its own static graph
    _free(device)
    try:
        inputs = fam.make_inputs(case, device)
    except Exception as e:  # noqa: BLE001
        why = "OOM building inputs" if _is_oom(e) else f"error building inputs: {e!r}"
        return {name: {"status": why} for name in fam.contenders}

    steps: Dict[str, Step] = {}
    warm = 3 if device == "cuda" else 1
    for name, build in fam.contenders.items():
        rec = records[name]
        try:
            step = build(case, inputs)
            _clear(inputs)
            _sync(device)
            t0 = time.perf_counter()
            loss = step()  # compiles, for a compiled contender: not timed
            _sync(device)
            rec["first_call_s"] = time.perf_counter() - t0
            rec["loss"] = float(loss.float())
            est = rec["first_call_s"]
            extra = warm - 1 + (1 if name == fam.baselines[1] else 0)
            for _ in range(extra):
                est = _timed(step, inputs, device)
            rec["warm_s"] = est
            steps[name] = step
        except NotInstalled as e:
            rec["status"], rec["why"] = "not installed", str(e)
        except Unavailable as e:
            rec["status"] = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001
            rec["status"] = "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {e}"
        if rec["status"] != "ok":
            _free(device)  # after the except block, which kept the failed step's frames alive
        log(f"  {name:<18} warm-up {rec.get('first_call_s', float('nan')):7.2f} s  {rec['status']}")

    # Rounds: at least `repeats`; more when a round is quick (up to ~1 s per contender).
    slowest = max([records[n]["warm_s"] for n in steps] or [1.0])
    rounds = max(repeats, min(100, int(1.0 / max(slowest, 1e-6))))
    times: Dict[str, List[float]] = {name: [] for name in steps}
    order = list(steps)
    for r in range(rounds):
        gc.collect()
        for name in order[r % len(order):] + order[: r % len(order)]:
            if records[name]["status"] != "ok":
                continue
            try:
                times[name].append(_timed(steps[name], inputs, device))
            except Exception as e:  # noqa: BLE001
                records[name]["status"] = "OOM" if _is_oom(e) else f"error: {e!r}"
            if records[name]["status"] != "ok":
                _free(device)
    for name, ts in times.items():
        if ts and records[name]["status"] == "ok":
            records[name]["times_ms"] = [t * 1e3 for t in ts]
            records[name]["median_ms"] = statistics.median(ts) * 1e3

    if device == "cuda":
        for name, step in steps.items():
            if records[name]["status"] == "ok":
                records[name]["memory"] = _measure_memory_cuda(step, inputs)
    del steps, inputs
    _free(device)
    return records


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------

def _measure_memory_cuda(step, inputs) -> dict:
    """Peak extra device memory of one forward + backward after warm-up:
    ``max_memory_allocated`` during the step, after ``reset_peak_memory_stats``, minus
    ``memory_allocated`` just before it (the inputs, with their gradients set to None).
    The gradient the step leaves behind is part of the figure."""
    try:
        _clear(inputs)
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        _clear(inputs)
        return {"method": "cuda max_memory_allocated - memory_allocated before the step",
                "base_bytes": base, "peak_bytes": peak, "extra_bytes": peak - base}
    except Exception as e:  # noqa: BLE001
        err = "OOM" if _is_oom(e) else repr(e)
    _clear(inputs)
    _free("cuda")
    return {"error": err}


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (and so ``ru_maxrss``) to the current RSS by
    writing 5 to /proc/self/clear_refs (Linux >= 4.0). False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vmhwm_bytes() -> Optional[int]:
    """The same high-water mark as /proc/self/status reports it (per address space)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _measure_memory_child(spec: dict) -> dict:
    """Runs in a fresh ``python -m fusedloss.bench --measure-memory SPEC`` process.

    1. imports (torch, fusedloss, the family) and builds the case's inputs, in place, with
       no temporaries; a compiled contender then runs one full warm-up step (compilation)
       and drops its gradient, since compiling is not what is measured;
    2. base = the peak RSS so far, after resetting the high-water mark to the current RSS
       where /proc/self/clear_refs allows it (then base = RSS just before the step);
    3. runs ONE forward + backward (the first one, for the eager contenders);
    4. extra = ``ru_maxrss`` after the step - base. The gradient the step leaves behind is
       part of the figure.
    """
    import fusedloss  # noqa: F401 - count the package in the base

    device = "cpu"
    fam = FAMILIES[spec["family"]](device, spec["large"], [spec["case"]["dtype"]])
    fam = _case_family_view(fam, spec["case"])
    case, name = spec["case"], spec["contender"]
    inputs = fam.make_inputs(case, device)
    step = fam.contenders[name](case, inputs)
    warmed = name == fam.baselines[1]
    if warmed:
        step()
        _clear(inputs)
    gc.collect()
    reset = _reset_peak_rss()
    if warmed and not reset:
        raise RuntimeError("cannot tell the step's peak from the compilation's without "
                           "/proc/self/clear_refs")
    base, base_hwm = _maxrss_bytes(), _vmhwm_bytes()
    step()
    peak, peak_hwm = _maxrss_bytes(), _vmhwm_bytes()
    if base_hwm is not None and base > base_hwm + 64 * MiB:
        # ru_maxrss still holds a peak from before this program (see _measure_memory_cpu).
        raise RuntimeError(f"ru_maxrss {base / MiB:.0f} MiB > VmHWM {base_hwm / MiB:.0f} MiB "
                           "before the step: the peak RSS was inherited from the parent")
    return {"method": ("ru_maxrss after the step - RSS before it (high-water mark reset via "
                       "/proc/self/clear_refs)" if reset else
                       "ru_maxrss after the step - ru_maxrss after imports and inputs"),
            "hwm_reset": reset, "warm_up_step": warmed,
            "base_bytes": base, "peak_bytes": peak, "extra_bytes": peak - base,
            "vmhwm_extra_bytes": None if base_hwm is None else peak_hwm - base_hwm}


def _measure_memory_cpu(fam_name: str, large: bool, case: dict, name: str,
                        timeout: float = 900) -> dict:
    """Peak extra resident memory of one forward + backward, in a fresh subprocess."""
    spec = json.dumps({"family": fam_name, "large": large, "case": case, "contender": name})
    cmd = [sys.executable, "-m", "fusedloss.bench", "--measure-memory", spec]
    if os.path.exists("/bin/sh"):
        # Linux carries a process's peak RSS across exec (into the new program's ru_maxrss):
        # spawned straight from this big process, the child would start with our peak. A
        # small shell that forks the child gives it a fresh account.
        cmd = ["/bin/sh", "-c", '"$0" "$@"; exit $?'] + cmd
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith(_MEM_MARK):
            return json.loads(line[len(_MEM_MARK):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit {p.returncode}"]
    return {"error": f"exit {p.returncode}: {tail[0][:200]}"}


# --------------------------------------------------------------------------------------
# The run, the table, the json, the plot
# --------------------------------------------------------------------------------------

def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_rev() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: str) -> dict:
    import fusedloss

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device == "cuda" else None,
        "triton": _version("triton"),  # metadata only: triton is not imported here
        "fusedloss": getattr(fusedloss, "__version__", None) or _version("fusedloss"),
        "fusedloss_git": _git_rev(),
        "backends": {k: [bool(v[0]), str(v[1])] for k, v in fusedloss.backends().items()},
        "peers": _peers(),
    }
    return info


def _fmt(x, spec, missing="–"):
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _derive(fam: Family, case: dict, records: Dict[str, dict]) -> None:
    """Ratios, memory multiples, bandwidth and loss agreement, in place."""
    fam = _case_family_view(fam, case)
    eager, comp = (records.get(b, {}).get("median_ms") for b in fam.baselines)
    nc4 = case["N"] * case["C"] * 4
    ref_loss = records.get(fam.baselines[0], {}).get("loss")
    tol = 1e-4 if case["dtype"] == "float32" else 3e-2
    nbytes = fam.bytes_moved(case)
    flops = fam.flops(case)
    for name, rec in records.items():
        med = rec.get("median_ms")
        rec["x_vs_eager"] = eager / med if med and eager else None
        rec["x_vs_compile"] = comp / med if med and comp else None
        mem = rec.get("memory") or {}
        if "extra_bytes" in mem:
            rec["peak_extra_mib"] = mem["extra_bytes"] / MiB
            rec["x_nc4"] = mem["extra_bytes"] / nc4
        if name in fam.fused and med and nbytes:
            rec["bytes_moved"] = nbytes
            rec["gbps"] = nbytes / (med / 1e3) / 1e9
        if name in fam.fused and med and flops:
            rec["flops"] = flops
            rec["tflops"] = flops / (med / 1e3) / 1e12
        if rec.get("loss") is not None and ref_loss is not None:
            rel = abs(rec["loss"] - ref_loss) / max(abs(ref_loss), 1e-12)
            rec["loss_rel_diff_vs_eager"] = rel
            rec["loss_agrees"] = rel <= tol


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# fusedloss benchmark ({result['device']})", ""]
    lines.append(f"- date: {m['date']}")
    gpu = f"; GPU: {m['gpu']} (CUDA {m['cuda']})" if m.get("gpu") else ""
    lines.append(f"- machine: {m['cpu']}, {m['cpu_count']} logical CPUs, "
                 f"torch threads {m['torch_threads']}{gpu}")
    git = f" (git {m['fusedloss_git']})" if m.get("fusedloss_git") else ""
    peers = "".join(f", {k} {v}" for k, v in m.get("peers", {}).items())
    lines.append(f"- versions: python {m['python']}, torch {m['torch']}, "
                 f"triton {m['triton'] or 'not installed'}, fusedloss {m['fusedloss']}{git}{peers}")
    avail = ", ".join(f"{k} {'yes' if v[0] else 'no'}" for k, v in m["backends"].items())
    lines.append(f"- fusedloss backends: {avail}")
    lines.append(f"- command: `{result['command']}`; wall time {result['wall_s']:.0f} s")
    if result.get("partial"):
        lines.append(f"- PARTIAL RESULTS ({result['partial']}): the run has not finished, or was "
                     "cut short; the png, if any, is from an earlier run.")
    lines += ["", "| case | contender | time (ms) | x vs eager | x vs compile | peak extra MiB "
                  "| x N·C·4B | GB/s | TFLOP/s |",
              "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    skipped = []
    mismatches = []
    for row in result["results"]:
        rec, label = row["record"], row["case"]["label"]
        if rec["status"] == "not installed":
            lines.append(f"| {label} | {row['contender']} | not installed | – | – | – | – | – | – |")
            continue
        if rec["status"] != "ok":
            skipped.append(f"{label} / {row['contender']}: {rec['status']}")
            if not rec["status"].startswith(("OOM", "error")):
                continue
        mem = rec.get("memory") or {}
        mib = _fmt(rec.get("peak_extra_mib"), ",.0f", "OOM" if mem.get("error") == "OOM" else "–")
        time_s = _fmt(rec.get("median_ms"), ",.1f" if (rec.get("median_ms") or 0) >= 10 else ".3f",
                      rec["status"] if rec["status"] == "OOM" else "error"
                      if rec["status"] != "ok" else "–")
        lines.append(f"| {label} | {row['contender']} | {time_s} | "
                     f"{_fmt(rec.get('x_vs_eager'), '.2f')} | {_fmt(rec.get('x_vs_compile'), '.2f')} | "
                     f"{mib} | {_fmt(rec.get('x_nc4'), '.2f')} | {_fmt(rec.get('gbps'), '.1f')} | "
                     f"{_fmt(rec.get('tflops'), '.3g')} |")
        if rec.get("loss_agrees") is False:
            mismatches.append(f"{label} / {row['contender']}: loss {rec['loss']:.6g}, rel. diff "
                              f"{rec['loss_rel_diff_vs_eager']:.2e} from the eager baseline")
        if mem.get("error") and mem.get("error") != "OOM":
            skipped.append(f"{label} / {row['contender']}: memory measurement: {mem['error']}")
    goals = result.get("targets") or []
    if goals:
        lines += ["", "Targets (reported, not asserted; ratio = contender / eager baseline, "
                      "lower is better):", ""]
    for g in goals:
        parts = []
        for what in ("time", "memory"):
            if f"{what}_target" in g:
                met = {True: "met", False: "NOT met", None: "not measured"}[g[f"{what}_met"]]
                parts.append(f"{what} / eager {_fmt(g[f'{what}_ratio'], '.3f')} "
                             f"(target ≤ {g[f'{what}_target']}: {met})")
        lines.append(f"- {g['family']}, {g['label']}, {g['contender']}: " + "; ".join(parts))
    lines += ["", "Notes:", ""]
    lines.append(f"- time: median of at least {result['repeats']} runs of forward + backward "
                 "(`loss.backward()`, input gradients set to None before each run), after "
                 "warm-up; compilation happens during warm-up and is not timed. The contenders of "
                 "a case run interleaved in one process. \"x vs eager\" / \"x vs compile\" = "
                 "baseline time / contender time (above 1: faster than the baseline).")
    if result["device"] == "cuda":
        lines.append("- peak extra memory: `torch.cuda.max_memory_allocated()` during one "
                     "forward + backward after `reset_peak_memory_stats()`, minus "
                     "`memory_allocated()` just before it (the inputs); the input gradient "
                     "the step leaves behind counts. \"x N·C·4B\" = that figure / one N x C fp32 "
                     "buffer.")
    else:
        lines.append("- peak extra memory: a fresh subprocess per (case, contender) imports, "
                     "builds the inputs (in place, no temporaries), resets the RSS high-water mark "
                     "(/proc/self/clear_refs; else the peak so far is the base), then runs ONE "
                     "forward + backward: `ru_maxrss` after it minus `ru_maxrss` before it. For the "
                     "eager contenders that step is their first; the compiled baseline first runs "
                     "one untimed step to compile (with the mark reset after it). The input gradient "
                     "the step leaves behind counts. \"x N·C·4B\" = that figure / one N x C fp32 "
                     "buffer.")
    lines.append("- GB/s (fusedloss contenders of the families on cos: margin, ce): bytes counted "
                 "= forward reads cos and writes the gradient (N·C each), backward reads and writes "
                 "the gradient once more to scale it: 4·N·C·itemsize bytes / time. Target gathers, "
                 "per-row statistics and the targets are not counted. TFLOP/s: for the matmul-bound "
                 "families (margin_linear), see their note.")
    lines.append("- inputs (margin, ce): cos uniform in (-0.8, 0.8), random targets, fixed seed. "
                 "In every family the losses of all contenders are checked against the eager "
                 "baseline (rel. tolerance 1e-4 fp32, 3e-2 bf16/fp16): " + ("all agree." if not mismatches else "MISMATCHES below."))
    for note in result["family_notes"]:
        lines.append(f"- {note}")
    for s in result.get("notes", []):
        lines.append(f"- {s}")
    for s in mismatches:
        lines.append(f"- LOSS MISMATCH: {s}")
    for s in skipped:
        lines.append(f"- not run: {s}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: Dict[tuple, List[dict]] = {}
    for row in result["results"]:
        c = row["case"]
        key = (row["family"],) + tuple((k, v) for k, v in sorted(c.items()) if k not in ("C", "label"))
        groups.setdefault(key, []).append(row)
    names = list(dict.fromkeys(r["contender"] for r in result["results"]))
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}  # same colour in every panel
    n = max(len(groups), 1)
    fig, axes = plt.subplots(n, 2, figsize=(12, 4.2 * n), squeeze=False)
    for ax_row, (key, rows) in zip(axes, groups.items()):
        c0 = rows[0]["case"]
        title = c0["label"].split(" C=")[0]
        if rows[0]["family"] != "margin":
            title += f" ({rows[0]['family']})"
        for name in dict.fromkeys(r["contender"] for r in rows):
            pts = sorted(((r["case"]["C"], r["record"]) for r in rows if r["contender"] == name),
                         key=lambda p: p[0])
            xs = [p[0] for p in pts]
            t = [p[1].get("median_ms", float("nan")) for p in pts]
            mem = [p[1].get("peak_extra_mib", float("nan")) for p in pts]
            style = "--" if name.startswith("baseline") else "-"
            if any(not math.isnan(v) for v in t):
                ax_row[0].plot(xs, t, style, marker="o", label=name, color=colour[name])
            if any(not math.isnan(v) and v > 0 for v in mem):
                ax_row[1].plot(xs, mem, style, marker="o", label=name, color=colour[name])
        for ax, what in zip(ax_row, ("time of forward + backward (ms)", "peak extra memory (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("number of classes C")
            ax.set_ylabel(what)
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"fusedloss {m['fusedloss']} on {m['gpu'] or m['cpu']} "
                 f"({m['torch_threads']} threads), torch {m['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _targets(plan, results) -> List[dict]:
    """The Family.targets of the cases run: the ratios and whether each goal is met."""
    out = []
    for fam, case in plan:
        for goal in fam.targets:
            if any(case.get(k) != v for k, v in goal["case"].items()):
                continue
            rows = {r["contender"]: r["record"] for r in results
                    if r["family"] == fam.name and r["case"] is case}
            rec, eager = rows.get(goal["contender"], {}), rows.get(fam.baselines[0], {})
            t, te = rec.get("median_ms"), eager.get("median_ms")
            m, me = ((rec.get("memory") or {}).get("extra_bytes"),
                     (eager.get("memory") or {}).get("extra_bytes"))
            entry = {"family": fam.name, "label": case["label"], "contender": goal["contender"],
                     "baseline": fam.baselines[0]}
            for what, num, den in (("time", t, te), ("memory", m, me)):
                bound = goal.get(f"{what}_vs_eager")
                if bound is None:
                    continue
                ratio = num / den if num is not None and den else None
                entry.update({f"{what}_ratio": ratio, f"{what}_target": bound,
                              f"{what}_met": None if ratio is None else ratio <= bound})
            out.append(entry)
    return out


def _finish(result: dict, plan, t_start: float) -> None:
    """Derived figures and targets of the cases in `plan`, and the wall time so far."""
    for fam, case in plan:
        rows = {r["contender"]: r["record"] for r in result["results"]
                if r["family"] == fam.name and r["case"] is case}
        _derive(fam, case, rows)
    result["targets"] = _targets(plan, result["results"])
    result["wall_s"] = time.perf_counter() - t_start


def run(args, checkpoint: Optional[Callable[[dict], None]] = None) -> dict:
    """Run the benchmark. ``checkpoint(result)``, when given, is called with the results so
    far (``result["partial"]`` says what is missing) after every case, so that a run cut
    short by a time limit still leaves its finished cases behind."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    names = args.family or [n for n in DEFAULT_FAMILIES]
    if args.family is None and device == "cuda" and _peers():
        names.append("ce")
    dtypes = [args.dtype] if args.dtype else None
    log = (lambda s: print(s, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    result = {"device": device, "repeats": args.repeats, "large": args.large,
              "command": " ".join(["python -m fusedloss.bench"] + sys.argv[1:]),
              "machine": machine_info(device), "results": [], "family_notes": [], "notes": []}
    plan = []
    for fname in names:
        fam = FAMILIES[fname](device, args.large, dtypes)
        result["family_notes"] += fam.notes
        plan += [(fam, case) for case in fam.cases]
    for i, (fam, case) in enumerate(plan):
        log(f"[{i + 1}/{len(plan)}] {fam.name}: {case['label']}")
        need = fam.mem_factor * case["N"] * case["C"] * DTYPES[case["dtype"]].itemsize
        avail = _mem_available() if device == "cpu" else None
        if avail is not None and need > 0.9 * avail:
            why = f"skipped: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
            records = {n: {"status": why} for n in _case_family_view(fam, case).contenders}
        else:
            records = run_case(fam, case, device, args.repeats, log)
        for name, rec in records.items():
            result["results"].append({"family": fam.name, "case": case, "contender": name,
                                      "record": rec})
        if checkpoint is not None:
            memory_later = device == "cpu" and not args.no_memory
            result["partial"] = (f"{i + 1} of {len(plan)} cases timed"
                                 + ("; memory not measured yet" if memory_later else ""))
            _finish(result, plan[: i + 1], t_start)
            checkpoint(result)
    if device == "cpu" and not args.no_memory:
        log("memory: one fresh subprocess per (case, contender)")
        for row in result["results"]:
            rec = row["record"]
            if rec["status"] == "ok":
                rec["memory"] = _measure_memory_cpu(row["family"], args.large, row["case"],
                                                    row["contender"])
                mem = rec["memory"]
                log(f"  {row['case']['label']:<32} {row['contender']:<18} "
                    + (f"{mem['extra_bytes'] / MiB:9.1f} MiB" if "extra_bytes" in mem
                       else mem.get("error", "?")))
    if args.no_memory:
        result["notes"].append("memory not measured (--no-memory)")
    result.pop("partial", None)
    _finish(result, plan, t_start)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedloss.bench",
                                description="Benchmark fusedloss against the baselines users run "
                                            "today (eager and torch.compile) and peer libraries.")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--large", action="store_true", help="add the large cases")
    p.add_argument("--family", "--suite", dest="family", action="append", choices=sorted(FAMILIES),
                   help="loss family to run (repeatable; --suite is an alias); default: "
                        + ", ".join(DEFAULT_FAMILIES)
                        + " (+ ce on CUDA when a peer library is installed); not by default: "
                        + ", ".join(n for n in sorted(FAMILIES) if n not in DEFAULT_FAMILIES))
    p.add_argument("--out", default=os.path.join("bench", "results"), help="default: bench/results")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per contender, at least (default 5)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="only this dtype (default: float32 on CPU, bfloat16 and float32 on CUDA)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.measure_memory is not None:
        print(_MEM_MARK + json.dumps(_measure_memory_child(json.loads(args.measure_memory))),
              flush=True)
        return 0
    if args.repeats < 1:
        p.error("--repeats must be at least 1")

    os.makedirs(args.out, exist_ok=True)

    def write(result):
        stem = os.path.join(args.out, f"bench_{result['device']}")
        md = markdown(result)
        for ext, text in ((".md", md), (".json", json.dumps(result, indent=1))):
            with open(stem + ext + ".tmp", "w") as f:
                f.write(text)
            os.replace(stem + ext + ".tmp", stem + ext)  # a kill mid-write leaves the last one
        return stem, md

    result = run(args, checkpoint=write)
    stem, md = write(result)
    try:
        plot(result, stem + ".png")
    except ImportError as e:
        print(f"no plot: {e} (pip install matplotlib)", file=sys.stderr)
    print(md)
    print(f"wrote {stem}.md, {stem}.json, {stem}.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
