"""The multilabel family in the benchmark: the MLCD multi-label margin loss on cosine logits
(family "multilabel") and fused with the classifier matmul (family "multilabel_linear"),
against the eager PyTorch code users write (a positive mask by scatter, two masked
log-sum-exps) and its torch.compile. Registered with the engine, fusedloss.bench."""
from typing import List, Optional

import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.bench import DTYPES, SHORT, Family, compiled, family, grid, kernel_check

from .margin import linear_inputs

K = 8  # positives per row
SCALE = 64.0


def multilabel_eager(cos, targets, scale=SCALE):
    """The multi-label loss as users write it: scatter a positive mask, then
    log(1 + sum exp) over the masked negatives and over the masked positives."""
    pos = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, targets, True)
    z = scale * cos
    neg = torch.logsumexp(F.pad(z.masked_fill(pos, -float("inf")), (1, 0)), dim=1)
    posl = torch.logsumexp(F.pad((-z).masked_fill(~pos, -float("inf")), (1, 0)), dim=1)
    return (neg + posl).mean()


def multilabel_linear_eager(x, w, targets, scale=SCALE):
    """The eager chain on embeddings: normalise, F.linear, then `multilabel_eager`."""
    return multilabel_eager(F.linear(F.normalize(x), F.normalize(w)), targets, scale)


def multilabel_inputs(case: dict, device: str) -> dict:
    """cos [N, C] uniform in (-0.8, 0.8), K distinct positives per row, fixed seed."""
    g = torch.Generator(device=device)
    g.manual_seed(99 + case["C"])
    cos = torch.empty(case["N"], case["C"], dtype=DTYPES[case["dtype"]], device=device)
    cos.uniform_(-0.8, 0.8, generator=g)
    targets = _positives(case, g, device)
    cos.requires_grad_(True)
    return {"cos": cos, "targets": targets, "leaves": [cos]}


def _positives(case, g, device):
    """K distinct classes per row: K random offsets into a random permutation window."""
    base = torch.randint(0, case["C"] - K, (case["N"], 1), generator=g, device=device)
    return base + torch.arange(K, device=device)


def multilabel_linear_inputs(case: dict, device: str) -> dict:
    inputs = linear_inputs(case, device)
    g = torch.Generator(device=device)
    g.manual_seed(7 + case["C"])
    inputs["targets"] = _positives(case, g, device)
    return inputs


def _step(fn, *args):
    def step():
        loss = fn(*args)
        loss.backward()
        return loss.detach()
    return step


def _logits_contender(kind: str):
    def build(case, inputs):
        cos, t = inputs["cos"], inputs["targets"]
        if kind == "eager":
            return _step(multilabel_eager, cos, t)
        if kind == "compile":
            return _step(compiled(multilabel_eager), cos, t)
        kernel_check(kind, "multilabel_margin_cross_entropy", cos.device)
        return _step(lambda c, tt: fusedloss.multilabel_margin_cross_entropy(
            c, tt, scale=SCALE, backend=kind), cos, t)
    return build


def _bytes_row_op(case: dict) -> int:
    """Forward reads cos and writes the gradient, backward reads and writes the gradient."""
    return 4 * case["N"] * case["C"] * DTYPES[case["dtype"]].itemsize


def _contenders(contender, device: str):
    """(contenders, fused) of a family whose `contender(kind)` builds each: fusedloss on the
    "auto" backend, the eager and compiled baselines, and on CUDA fusedloss on Triton too;
    fused names the fusedloss ones."""
    contenders = {"fusedloss": contender("auto"), "baseline-eager": contender("eager"),
                  "baseline-compile": contender("compile")}
    fused = ("fusedloss",)
    if device == "cuda":
        contenders["fusedloss-triton"] = contender("triton")
        fused += ("fusedloss-triton",)
    return contenders, fused


@family("multilabel")
def multilabel_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    dtypes = dtypes or (["bfloat16", "float32"] if device == "cuda" else ["float32"])
    N = 8192 if device == "cuda" else 1024
    cases = grid([N], [10_000, 100_000] + ([300_000] if large else []), dtypes, K=K)
    for c in cases:
        c["label"] = f"multilabel K={K} {SHORT[c['dtype']]} N={c['N']} C={c['C']:,}"
    contenders, fused = _contenders(_logits_contender, device)
    return Family(
        name="multilabel", cases=cases, make_inputs=multilabel_inputs, contenders=contenders,
        fused=fused, bytes_moved=_bytes_row_op, mem_factor=6.0,
        notes=[f"multilabel: `multilabel_margin_cross_entropy(cos, targets, scale={SCALE:g})` "
               f"(no margin) on cos [N, C] uniform in (-0.8, 0.8), K = {K} consecutive "
               "positives per row at a random offset; baseline = `multilabel_eager` (scatter a "
               "positive mask, two masked log-sum-exps with a zero logit), eager and under "
               "torch.compile(dynamic=False). GB/s counts 4·N·C·itemsize (forward reads cos "
               "and writes the gradient, backward reads and writes it)."],
        targets=[{"case": _TARGET_CASE, "contender": "fusedloss", "time_vs_eager": 0.2},
                 {"case": _TARGET_CASE, "contender": "fusedloss", "time_vs_eager": 1 / 3,
                  "baseline": "baseline-compile"}])


# Issue 13's targets on the CPU, fp32: >= 5x eager, >= 3x compiled; the memory target (extra
# memory <= 1.25 N x C buffers) is absolute, read off the table's peak column.
_TARGET_CASE = {"dtype": "float32", "N": 1024, "C": 100_000}


def _linear_contender(kind: str):
    def build(case, inputs):
        e, w, t = inputs["e"], inputs["w"], inputs["targets"]
        if kind == "eager":
            return _step(multilabel_linear_eager, e, w, t)
        if kind == "compile":
            return _step(compiled(multilabel_linear_eager), e, w, t)
        kernel_check(kind, "multilabel_margin_stats", e.device)
        return _step(lambda *a: fusedloss.linear_multilabel_margin_cross_entropy(
            *a, scale=SCALE, backend=kind), e, w, t)
    return build


def _flops_linear(case: dict) -> int:
    """The three classifier matmuls of forward + backward: 6·N·C·D."""
    return 6 * case["N"] * case["C"] * case["D"]


@family("multilabel_linear")
def multilabel_linear_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    D = 512
    dtypes = dtypes or (["bfloat16"] if device == "cuda" else ["float32"])
    N, Cs = (8192, [1_000_000]) if device == "cuda" else (1024, [10_000, 100_000])
    cases = grid([N], Cs, dtypes, D=D, K=K)
    for c in cases:
        c["label"] = f"linear multilabel K={K} {SHORT[c['dtype']]} N={c['N']} D={D} C={c['C']:,}"
    contenders, fused = _contenders(_linear_contender, device)
    return Family(
        name="multilabel_linear", cases=cases, make_inputs=multilabel_linear_inputs,
        contenders=contenders, fused=fused, flops=_flops_linear, mem_factor=8.0,
        notes=["multilabel_linear: `linear_multilabel_margin_cross_entropy(x, w, targets, "
               f"scale={SCALE:g})` (normalize=True) on x [N, D], w [C, D] normal / sqrt(D), "
               f"both requiring grad, K = {K} positives per row; baseline = "
               "`multilabel_linear_eager` (F.normalize both, F.linear, then "
               "`multilabel_eager`), eager and compiled. TFLOP/s = 6·N·C·D / time."],
        targets=[{"case": {"dtype": "float32", "N": 1024, "D": D, "C": 100_000},
                  "contender": "fusedloss", "time_vs_eager": 0.6, "memory_vs_eager": 0.15}])
