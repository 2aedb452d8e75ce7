"""The CPU kernels of the sharded ops (csrc/cpu/sharded.cpp), called through torch.ops, against
the dense contracts of python/fusedloss/reference/sharded.py in fp64: the partial stats [N, 3]
and the gradients from coef, at the logit level and fused with the linear layer. Margin
variants (ArcFace, CosFace, SphereFace, combined, per-row m2 / m3), targets in this shard, in
another one or ignored, class_start > 0, C_local = 1 and 0, odd sizes and several row blocks,
fp64 / fp32 / fp16 / bf16, non-contiguous inputs, and every bad input's error.

The checks (check_logits, check_linear, check_empty_shard) take the kernels they test as a
`Kernels`: test_sharded_triton_kernels.py runs the same checks on the Triton kernels."""
from typing import NamedTuple

import pytest
import torch

import fusedloss  # noqa: F401  (loads the ops)
from fusedloss.reference import sharded as ref

from conftest import assert_close

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100


class Kernels(NamedTuple):
    """The four sharded ops of one backend (attributes named as in fusedloss/_schemas.py,
    taking the schema's keywords) and the device of their tensors."""

    ops: object
    device: str


CPU = Kernels(torch.ops.fusedloss, "cpu")
ops = CPU.ops

# (scale, m1, m2, m3), and the spread of per-row ElasticFace margins around m2 / m3.
VARIANTS = {
    "arcface": dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0),
    "cosface": dict(scale=64.0, m1=1.0, m2=0.0, m3=0.35),
    "sphereface": dict(scale=30.0, m1=1.35, m2=0.0, m3=0.0),
    "combined": dict(scale=64.0, m1=1.2, m2=0.3, m3=0.2),
    "elastic_arc": dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0, std_m2=0.05),
    "elastic_cos": dict(scale=64.0, m1=1.0, m2=0.0, m3=0.35, std_m3=0.05),
    "plain": dict(scale=1.0, m1=1.0, m2=0.0, m3=0.0),
}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def fp64(t):
    return None if t is None else t.detach().double().cpu()


def variant_args(variant, n, dtype, device="cpu"):
    """(row_m2, row_m3 in the accumulation dtype, the scalar hyperparameters)."""
    hyper = dict(VARIANTS[variant])
    rows = []
    for base in ("m2", "m3"):
        std = hyper.pop("std_" + base, None)
        rows.append(None if std is None else
                    (hyper[base] + std * torch.randn(n, dtype=torch.float64)).to(acc_dtype(dtype))
                    .to(device))
    return rows[0], rows[1], hyper


def shard_targets(n, c_local, class_start, classes_after):
    """Global targets of n rows, the shard holding [class_start, class_start + c_local) of
    class_start + c_local + classes_after classes. The first rows are chosen: the shard's
    first class, its last, ignore_index, a class of another shard; the rest are random."""
    total = class_start + c_local + classes_after
    target = torch.randint(0, max(total, 1), (n,))
    other = class_start + c_local if classes_after else class_start - 1
    chosen = [class_start, class_start + c_local - 1, IGNORE, other if other >= 0 else IGNORE]
    for i, t in enumerate(chosen[:n]):
        target[i] = t
    return target


def make_cos(n, c_local, dtype, target, class_start, layout):
    """Uniform cosines in [-1, 1] with cos = 1 at row 0's target (theta = 0: the margin slope
    is clamped there); "strided" gives rows 2 c_local apart, "transposed" column-major."""
    cos = torch.rand(n, c_local, dtype=torch.float64) * 2 - 1
    if n and c_local and 0 <= int(target[0]) - class_start < c_local:
        cos[0, int(target[0]) - class_start] = 1.0
    cos = cos.to(dtype)
    if layout == "strided":
        return torch.cat([cos, cos], dim=1)[:, :c_local]
    if layout == "transposed":
        return cos.t().contiguous().t()
    return cos


def make_coef(target, lse):
    """coef [n, 4] = (lse, a, b, d) in fp64, with factors as a combine could give them
    (a ~ r (1 + g), b = r eps / C with label smoothing, d of either sign); ignored rows hold
    -inf and NaN, which must not reach their zeros."""
    n = target.numel()
    coef = torch.stack([lse, 0.5 + torch.rand(n, dtype=torch.float64),
                        0.02 * torch.rand(n, dtype=torch.float64),
                        torch.randn(n, dtype=torch.float64)], dim=1)
    ignored = target == IGNORE
    coef[ignored, 0] = float("-inf")
    coef[ignored, 1] = float("nan")
    return coef


def assert_stats(got, want, dtype, what):
    """Stats in the accumulation dtype; -inf exactly where the oracle has it; the rest column
    by column (lse_other, z_y, sum_z differ in size) within the accumulation dtype's tolerance."""
    assert got.dtype == acc_dtype(dtype) and got.shape == want.shape, what
    got = got.cpu()
    infinite = want.isinf()
    assert torch.equal(got.isinf(), infinite), f"{what}: -inf at the wrong places"
    assert torch.equal(got[infinite].double(), want[infinite]), what
    for k, name in enumerate(("lse_other", "z_y", "sum_z")):
        keep = ~infinite[:, k]
        assert_close(got[keep, k], want[keep, k], acc_dtype(dtype), f"{what} {name}")


# ---------------------------------------------------------------------------------------
# Logit level


def check_logits(kernels, n, c_local, class_start, classes_after, variant, dtype,
                 layout="contiguous", detach_margin=False):
    target = shard_targets(n, c_local, class_start, classes_after)
    cos = make_cos(n, c_local, dtype, target, class_start, layout).to(kernels.device)
    row_m2, row_m3, hyper = variant_args(variant, n, dtype, kernels.device)
    shard = dict(class_start=class_start, ignore_index=IGNORE)
    on_device = target.to(kernels.device)

    stats = kernels.ops.sharded_margin_stats(cos, on_device, row_m2, row_m3, **hyper, **shard)
    want = ref.sharded_margin_stats(fp64(cos), target, fp64(row_m2), fp64(row_m3), **hyper,
                                    **shard)
    assert_stats(stats, want, dtype, "stats")

    coef = make_coef(target, hyper["scale"] * fp64(cos).abs().amax(1) + 1.0)
    grad = kernels.ops.sharded_margin_grad(cos, on_device, row_m2, row_m3,
                                           coef.to(acc_dtype(dtype)).to(kernels.device), **hyper,
                                           detach_margin=detach_margin, **shard)
    want = ref.sharded_margin_grad(fp64(cos), target, fp64(row_m2), fp64(row_m3), coef, **hyper,
                                   detach_margin=detach_margin, **shard)
    assert grad.dtype == dtype and grad.shape == cos.shape and grad.is_contiguous()
    assert_close(grad.cpu(), want, dtype, "grad")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logit_variants(variant):
    check_logits(CPU, 9, 53, 20, 30, variant, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["arcface", "combined", "elastic_cos"])
def test_logit_dtypes(dtype, variant):
    check_logits(CPU, 7, 41, 3, 11, variant, dtype)


@pytest.mark.parametrize("n,c_local,class_start,classes_after", [
    (1, 1, 0, 0),      # one class in all
    (5, 1, 9, 3),      # one class per shard: the rows with a local target have no other class
    (6, 4500, 7, 5),   # rows longer than the kernel's 2048-column chunks
    (4, 17, 0, 40),    # the first shard
    (4, 16, 50, 0),    # the last shard
    (0, 8, 0, 0),      # no rows
])
def test_logit_odd_shapes(n, c_local, class_start, classes_after):
    check_logits(CPU, n, c_local, class_start, classes_after, "arcface", torch.float32)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_logit_non_contiguous(layout):
    check_logits(CPU, 6, 33, 4, 6, "combined", torch.float32, layout=layout)


@pytest.mark.parametrize("variant", ["arcface", "sphereface", "combined"])
def test_logit_detached_margin(variant):
    check_logits(CPU, 6, 29, 2, 7, variant, torch.float64, detach_margin=True)


def test_lse_other_far_below_the_target():
    """lse_other leaves the target out of its running maximum: logits 128 below z_y (past
    the float exponential's range when shifted by z_y) still give their exact log-sum-exp."""
    cos = torch.full((2, 300), -1.0)
    cos[:, 5] = 1.0
    target = torch.tensor([5, 1005])  # local, and on another shard
    hyper = dict(scale=64.0, m1=1.0, m2=0.0, m3=0.0)
    stats = ops.sharded_margin_stats(cos, target, None, None, **hyper, class_start=0,
                                     ignore_index=IGNORE)
    want = ref.sharded_margin_stats(cos.double(), target, None, None, **hyper, class_start=0,
                                    ignore_index=IGNORE)
    assert_stats(stats, want, torch.float32, "stats")
    assert abs(float(stats[0, 0]) - (-64.0 + torch.log(torch.tensor(299.0)).item())) < 1e-4


def test_targets_of_other_shards_are_legal():
    """Any target in [0, 2^62) may sit on another shard: none is an error."""
    cos = torch.rand(3, 4) * 2 - 1
    target = torch.tensor([2**40, 2**62 - 1, 3])
    stats = ops.sharded_margin_stats(cos, target, None, None, 64.0, 1.0, 0.5, 0.0, 0, IGNORE)
    want = ref.sharded_margin_stats(cos.double(), target, None, None, 64.0, 1.0, 0.5, 0.0, 0,
                                    IGNORE)
    assert_stats(stats, want, torch.float32, "stats")


# ---------------------------------------------------------------------------------------
# Fused linear


def check_linear(kernels, n, c_local, d, class_start, classes_after, variant, dtype,
                 normalize=True, block_size=0, detach_margin=False, transposed=False):
    target = shard_targets(n, c_local, class_start, classes_after)
    x = torch.randn(n, d, dtype=torch.float64).to(dtype).to(kernels.device)
    w = torch.randn(c_local, d, dtype=torch.float64).to(dtype).to(kernels.device)
    if transposed:
        x, w = x.t().contiguous().t(), w.t().contiguous().t()
    row_m2, row_m3, hyper = variant_args(variant, n, dtype, kernels.device)
    opts = dict(normalize=normalize, class_start=class_start, ignore_index=IGNORE,
                block_size=block_size)
    on_device = target.to(kernels.device)

    stats = kernels.ops.sharded_margin_linear_stats(x, w, on_device, row_m2, row_m3, **hyper,
                                                    **opts)
    want = ref.sharded_margin_linear_stats(fp64(x), fp64(w), target, fp64(row_m2), fp64(row_m3),
                                           **hyper, **opts)
    assert_stats(stats, want, dtype, "linear stats")

    cos = ref._cosines(fp64(x), fp64(w), normalize)
    coef = make_coef(target, hyper["scale"] * cos.abs().amax(1) + 1.0)
    gx, gw = kernels.ops.sharded_margin_linear_grad(x, w, on_device, row_m2, row_m3,
                                                    coef.to(acc_dtype(dtype)).to(kernels.device),
                                                    **hyper, detach_margin=detach_margin, **opts)
    want_x, want_w = ref.sharded_margin_linear_grad(fp64(x), fp64(w), target, fp64(row_m2),
                                                    fp64(row_m3), coef, **hyper,
                                                    detach_margin=detach_margin, **opts)
    assert gx.dtype == dtype and gw.dtype == dtype and gx.shape == x.shape and gw.shape == w.shape
    assert_close(gx.cpu(), want_x, dtype, "grad embeddings")
    assert_close(gw.cpu(), want_w, dtype, "grad weight")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_linear_variants(variant):
    check_linear(CPU, 7, 45, 19, 13, 20, variant, torch.float32, normalize=variant != "plain")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_dtypes(dtype, normalize):
    variant = "arcface" if normalize else "plain"
    check_linear(CPU, 6, 37, 16, 6, 9, variant, dtype, normalize=normalize)


@pytest.mark.parametrize("n,c_local,d,class_start,classes_after,block_size", [
    (1, 1, 3, 0, 0, 0),        # one class in all
    (0, 5, 4, 0, 3, 0),        # no rows: zero weight gradient
    (5, 1, 5, 9, 3, 0),        # one class per shard
    (23, 19, 20, 0, 7, 4),     # several row blocks, the last one shorter
    (9, 70, 33, 30, 2, 0),
])
def test_linear_odd_shapes(n, c_local, d, class_start, classes_after, block_size):
    check_linear(CPU, n, c_local, d, class_start, classes_after, "combined", torch.float32,
                 block_size=block_size)


def test_linear_half_weight_in_slices():
    """fp16: the weight is converted to fp32 a 4 MiB slice at a time (here 512 of 600 rows)."""
    check_linear(CPU, 3, 600, 2048, 5, 5, "arcface", torch.float16)


def test_linear_non_contiguous_detached():
    check_linear(CPU, 5, 27, 18, 3, 4, "elastic_arc", torch.float32, detach_margin=True,
                 transposed=True)


def check_empty_shard(kernels):
    """More ranks than classes: a shard of no class has lse_other = -inf, z_y = sum_z = 0 and
    empty gradients (zero for the embeddings)."""
    target = torch.tensor([0, 3, IGNORE, 5], device=kernels.device)
    hyper = VARIANTS["arcface"]
    shard = dict(class_start=3, ignore_index=IGNORE)
    nothing = torch.tensor([[float("-inf"), 0.0, 0.0]] * 4)
    coef = torch.ones(4, 4, device=kernels.device)
    cos = torch.empty(4, 0, device=kernels.device)
    stats = kernels.ops.sharded_margin_stats(cos, target, None, None, **hyper, **shard)
    assert torch.equal(stats.cpu(), nothing)
    grad = kernels.ops.sharded_margin_grad(cos, target, None, None, coef, **hyper,
                                           detach_margin=False, **shard)
    assert grad.shape == (4, 0)
    x, w = torch.randn(4, 8, device=kernels.device), torch.empty(0, 8, device=kernels.device)
    opts = dict(normalize=True, block_size=0, **shard)
    stats = kernels.ops.sharded_margin_linear_stats(x, w, target, None, None, **hyper, **opts)
    assert torch.equal(stats.cpu(), nothing)
    gx, gw = kernels.ops.sharded_margin_linear_grad(x, w, target, None, None, coef, **hyper,
                                                    detach_margin=False, **opts)
    assert torch.equal(gx, torch.zeros_like(x)) and gw.shape == (0, 8)


def test_empty_shard():
    check_empty_shard(CPU)


# ---------------------------------------------------------------------------------------
# Bad input: a clear error before any kernel runs


HYPER = (64.0, 1.0, 0.5, 0.0)


def stats_call(cos=None, target=None, row_m2=None, class_start=0):
    cos = torch.rand(4, 6) if cos is None else cos
    target = torch.tensor([0, 1, 2, 3]) if target is None else target
    return ops.sharded_margin_stats(cos, target, row_m2, None, *HYPER, class_start, IGNORE)


def grad_call(coef):
    return ops.sharded_margin_grad(torch.rand(4, 6), torch.tensor([0, 1, 2, 3]), None, None,
                                   coef, *HYPER, False, 0, IGNORE)


def linear_call(x=None, w=None, coef=None, target=None, class_start=0, block_size=0):
    x = torch.randn(4, 8) if x is None else x
    w = torch.randn(6, 8) if w is None else w
    target = torch.tensor([0, 1, 2, 3]) if target is None else target
    if coef is None:
        return ops.sharded_margin_linear_stats(x, w, target, None, None, *HYPER, True,
                                               class_start, IGNORE, block_size)
    return ops.sharded_margin_linear_grad(x, w, target, None, None, coef, *HYPER, False, True,
                                          class_start, IGNORE, block_size)


@pytest.mark.parametrize("call,error,message", [
    (lambda: stats_call(cos=torch.rand(4)), ValueError, "cos must be 2-D"),
    (lambda: stats_call(cos=torch.ones(4, 6, dtype=torch.long)), TypeError,
     "cos must be a floating tensor"),
    (lambda: stats_call(target=torch.tensor([0, 1, 2])), ValueError,
     r"target must have shape \[4\]"),
    (lambda: stats_call(target=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), TypeError,
     "target must be int64"),
    (lambda: stats_call(target=torch.tensor([0, -1, 2, 3])), ValueError, r"target\[1\] = -1"),
    (lambda: stats_call(target=torch.tensor([0, 1, 2**62, 3])), ValueError, r"target\[2\]"),
    (lambda: stats_call(class_start=-1), ValueError, "class_start must be in"),
    (lambda: ops.sharded_margin_stats(torch.rand(2, 3), torch.tensor([0, 1]), None, None, 0.0,
                                      1.0, 0.5, 0.0, 0, IGNORE), ValueError, "scale must be > 0"),
    (lambda: stats_call(row_m2=torch.zeros(4, dtype=torch.float64)), TypeError,
     "row_m2 must be Float"),
    (lambda: grad_call(torch.zeros(4, 3)), ValueError, r"coef must have shape \[4, 4\]"),
    (lambda: grad_call(torch.zeros(4, 4, dtype=torch.float64)), TypeError,
     "coef must be Float"),
    (lambda: linear_call(w=torch.randn(6, 7)), ValueError, "must share D"),
    (lambda: linear_call(w=torch.randn(6, 8, dtype=torch.float64)), TypeError,
     "must share a dtype"),
    (lambda: linear_call(block_size=-1), ValueError, "block_size must be >= 0"),
    (lambda: linear_call(target=torch.tensor([0, 1, -5, 3])), ValueError, r"target\[2\] = -5"),
    (lambda: linear_call(class_start=-3), ValueError, "class_start must be in"),
    (lambda: linear_call(coef=torch.zeros(3, 4)), ValueError, r"coef must have shape \[4, 4\]"),
    (lambda: linear_call(coef=torch.zeros(4, 4, dtype=torch.half)), TypeError,
     "coef must be Float"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------------------------------
# torch.library.opcheck of the CPU kernels against their fake kernels (fusedloss.sharded)


def opcheck_samples():
    target = torch.tensor([3, 40, IGNORE, 5, 7])
    cos = torch.rand(5, 9) * 2 - 1
    x, w = torch.randn(5, 6), torch.randn(9, 6)
    coef = make_coef(target, torch.full((5,), 70.0, dtype=torch.float64)).float()
    row_m2 = 0.5 + 0.05 * torch.randn(5)
    shard = (2, IGNORE)
    return {
        "stats": (ops.sharded_margin_stats, (cos, target, row_m2, None, *HYPER, *shard)),
        "grad": (ops.sharded_margin_grad, (cos.t().contiguous().t(), target, None, None, coef,
                                           *HYPER, False, *shard)),
        "linear_stats": (ops.sharded_margin_linear_stats,
                         (x, w, target, None, None, *HYPER, True, *shard, 2)),
        "linear_grad": (ops.sharded_margin_linear_grad,
                        (x.half(), w.half(), target, row_m2, None, coef, *HYPER, False, True,
                         *shard, 0)),
    }


@pytest.mark.parametrize("sample", ["stats", "grad", "linear_stats", "linear_grad"])
def test_opcheck(sample):
    op, args = opcheck_samples()[sample]
    torch.library.opcheck(op, args)
