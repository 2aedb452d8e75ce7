"""The Triton kernels of the sharded ops (triton_kernels/sharded.py), called directly, against
the dense contracts of python/fusedloss/reference/sharded.py run in fp64: the stats [N, 3]
and the gradients from coef, at the logit level and fused with the linear layer. Every margin
variant, per-row margins, targets in this shard / in another / ignored, class_start > 0,
C_local = 1, sizes off the blocks, fp64 / fp32 / fp16 / bf16, non-contiguous inputs. On CPU the
kernels run under TRITON_INTERPRET=1 (conftest sets it), so the shapes stay small."""
import pytest
import torch

from fusedloss.reference import sharded as ref_ops

from conftest import HAS_CUDA, HAS_TRITON, assert_close

# log(0) = -inf is the lse_other of a row without classes j != y here; the interpreter's numpy
# warns about it.
pytestmark = [pytest.mark.triton,
              pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")]

if HAS_TRITON:
    from fusedloss.triton_kernels import sharded as triton_ops

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100

# Margin hyperparameters (scale, m1, m2, m3) and ElasticFace per-row draws ("row_m2": std).
VARIANTS = {
    "arcface": dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0),
    "cosface": dict(scale=64.0, m1=1.0, m2=0.0, m3=0.35),
    "sphereface": dict(scale=30.0, m1=1.35, m2=0.0, m3=0.0),
    "combined": dict(scale=64.0, m1=1.2, m2=0.3, m3=0.2),
    "elastic_arc": dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0, row_m2=0.05),
    "elastic_cos": dict(scale=64.0, m1=1.0, m2=0.0, m3=0.35, row_m3=0.05),
    "plain": dict(scale=1.0, m1=1.0, m2=0.0, m3=0.0),
}


def _margins(variant, n):
    """(row_m2, row_m3, hyper) of a variant for n rows."""
    hyper = dict(VARIANTS[variant])
    rows = {}
    for name, base in (("row_m2", "m2"), ("row_m3", "m3")):
        std = hyper.pop(name, None)
        if std is None:
            rows[name] = None
        else:
            rows[name] = (hyper[base] + std * torch.randn(n, dtype=torch.float64)).to(DEVICE)
    return rows["row_m2"], rows["row_m3"], hyper


def _targets(n, c_local, class_start, extra):
    """Global targets over class_start + c_local + extra classes: row 0 at the shard's first
    class, row 1 at its last, row 2 ignored, row 3 in another shard, the rest random."""
    total = class_start + c_local + extra
    target = torch.randint(0, total, (n,))
    fixed = [class_start, class_start + c_local - 1, IGNORE,
             class_start + c_local if extra else max(class_start - 1, 0)]
    for row, value in enumerate(fixed[:n]):
        target[row] = value
    return target.to(DEVICE)


def _cosines(n, c_local, dtype, target, class_start, layout="contiguous"):
    """cos [n, c_local] uniform in [-1, 1], with cos = 1 at row 0's target (theta = 0, where
    the margin slope is clamped); "strided" gives a view with a row stride of 2 c_local,
    "transposed" one with unit row stride."""
    cos = torch.rand(n, c_local, dtype=torch.float64) * 2 - 1
    if n and 0 <= int(target[0]) - class_start < c_local:
        cos[0, int(target[0]) - class_start] = 1.0
    cos = cos.to(dtype).to(DEVICE)
    if layout == "strided":
        return torch.cat([cos, torch.zeros_like(cos)], dim=1)[:, :c_local]
    if layout == "transposed":
        return cos.t().contiguous().t()
    return cos


def _coef(n, lse_floor, target):
    """coef [n, 4] = (lse, a, b, d): a realistic lse (at least the row's largest logit) and
    random factors; an ignored row gets lse = -inf, a = NaN, which must not leak into its zeros."""
    coef = torch.stack([lse_floor + 1.0, 1.0 + 0.1 * torch.randn(n, dtype=torch.float64),
                        0.01 * torch.randn(n, dtype=torch.float64),
                        torch.randn(n, dtype=torch.float64)], dim=1)
    ignored = (target.cpu() == IGNORE)
    coef[ignored, 0] = float("-inf")
    coef[ignored, 1] = float("nan")
    return coef.to(DEVICE)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fp64(t):
    return None if t is None else t.detach().double().cpu()


def assert_stats_close(got, want, dtype, what):
    """stats [N, 3]: dtype (fp32, fp64 for fp64 inputs), -inf exactly where the oracle has it
    (ignored rows, no class j != y), and the rest within the tolerance of the accumulation
    dtype, column by column (the columns differ in size)."""
    assert got.dtype == _acc(dtype) and got.shape == want.shape
    got = got.cpu()
    infinite = want.isinf()
    assert torch.equal(got.isinf(), infinite) and torch.equal(got[infinite], want[infinite]), what
    for k, name in enumerate(("lse_other", "z_y", "sum_z")):
        keep = ~infinite[:, k]
        assert_close(got[keep, k], want[keep, k], _acc(dtype), f"{what} {name}")


# ---------------------------------------------------------------------------------------
# Logit level: sharded_margin_stats, sharded_margin_grad


def check_logits(n, c_local, class_start, extra, variant, dtype, layout="contiguous",
                 detach_margin=False):
    target = _targets(n, c_local, class_start, extra)
    cos = _cosines(n, c_local, dtype, target, class_start, layout)
    row_m2, row_m3, hyper = _margins(variant, n)
    args = dict(class_start=class_start, ignore_index=IGNORE, **hyper)

    stats = triton_ops.sharded_margin_stats(cos, target, row_m2, row_m3, **args)
    want = ref_ops.sharded_margin_stats(_fp64(cos), target.cpu(), _fp64(row_m2), _fp64(row_m3),
                                        **args)
    assert_stats_close(stats, want, dtype, "stats")

    coef = _coef(n, hyper["scale"] * _fp64(cos).abs().amax(1), target)
    grad = triton_ops.sharded_margin_grad(cos, target, row_m2, row_m3, coef.to(_acc(dtype)),
                                          detach_margin=detach_margin, **args)
    want = ref_ops.sharded_margin_grad(_fp64(cos), target.cpu(), _fp64(row_m2), _fp64(row_m3),
                                       coef.cpu(), detach_margin=detach_margin, **args)
    assert grad.dtype == dtype and grad.shape == cos.shape and grad.is_contiguous()
    assert_close(grad.cpu(), want, dtype, "grad")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logit_variants(variant):
    check_logits(7, 45, 20, 30, variant, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["arcface", "combined"])
def test_logit_dtypes(dtype, variant):
    check_logits(6, 37, 3, 11, variant, dtype)


@pytest.mark.parametrize("n,c_local,class_start,extra", [
    (1, 1, 0, 0),     # the whole problem is one class
    (4, 1, 9, 3),     # one class per shard: rows 0 and 1 have no class j != y here
    (5, 300, 7, 5),   # several chunks of the interpreter's 128 columns
    (3, 17, 0, 40),   # the first shard
    (4, 16, 50, 0),   # the last shard
])
def test_logit_odd_shapes(n, c_local, class_start, extra):
    check_logits(n, c_local, class_start, extra, "arcface", torch.float32)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_logit_non_contiguous(layout):
    check_logits(5, 33, 4, 6, "combined", torch.float32, layout=layout)


@pytest.mark.parametrize("variant", ["arcface", "sphereface"])
def test_logit_detached_margin(variant):
    check_logits(6, 29, 2, 7, variant, torch.float64, detach_margin=True)


# ---------------------------------------------------------------------------------------
# Fused linear: sharded_margin_linear_stats, sharded_margin_linear_grad


def check_linear(n, c_local, d, class_start, extra, variant, dtype, normalize=True, block_size=0,
                 detach_margin=False, transposed=False):
    target = _targets(n, c_local, class_start, extra)
    x = torch.randn(n, d, dtype=torch.float64).to(dtype).to(DEVICE)
    w = torch.randn(c_local, d, dtype=torch.float64).to(dtype).to(DEVICE)
    if transposed:
        x, w = x.t().contiguous().t(), w.t().contiguous().t()
    row_m2, row_m3, hyper = _margins(variant, n)
    args = dict(normalize=normalize, class_start=class_start, ignore_index=IGNORE,
                block_size=block_size, **hyper)

    stats = triton_ops.sharded_margin_linear_stats(x, w, target, row_m2, row_m3, **args)
    want = ref_ops.sharded_margin_linear_stats(_fp64(x), _fp64(w), target.cpu(), _fp64(row_m2),
                                               _fp64(row_m3), **args)
    assert_stats_close(stats, want, dtype, "linear stats")

    cos = ref_ops._cosines(_fp64(x), _fp64(w), normalize)
    coef = _coef(n, hyper["scale"] * cos.amax(1).clamp_min(0.0), target)
    gx, gw = triton_ops.sharded_margin_linear_grad(x, w, target, row_m2, row_m3,
                                                   coef.to(_acc(dtype)),
                                                   detach_margin=detach_margin, **args)
    want_x, want_w = ref_ops.sharded_margin_linear_grad(_fp64(x), _fp64(w), target.cpu(),
                                                        _fp64(row_m2), _fp64(row_m3), coef.cpu(),
                                                        detach_margin=detach_margin, **args)
    assert gx.dtype == dtype and gw.dtype == dtype and gx.shape == x.shape and gw.shape == w.shape
    assert_close(gx.cpu(), want_x, dtype, "grad embeddings")
    assert_close(gw.cpu(), want_w, dtype, "grad weight")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_linear_variants(variant):
    check_linear(6, 41, 19, 13, 20, variant, torch.float32, normalize=variant != "plain")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_dtypes(dtype, normalize):
    variant = "arcface" if normalize else "plain"
    check_linear(5, 33, 16, 6, 9, variant, dtype, normalize=normalize)


@pytest.mark.parametrize("n,c_local,d,class_start,extra,block_size", [
    (1, 1, 3, 0, 0, 0),       # (D = 1: cos = +-1 and a normalised gradient of 0 + rounding)
    (4, 1, 5, 9, 3, 0),       # one class per shard
    (7, 70, 33, 30, 2, 0),    # several class blocks and splits
    (21, 18, 20, 0, 7, 16),   # several row blocks, block_size set
])
def test_linear_odd_shapes(n, c_local, d, class_start, extra, block_size):
    check_linear(n, c_local, d, class_start, extra, "combined", torch.float32,
                 block_size=block_size)


def test_linear_non_contiguous_detached():
    check_linear(5, 27, 18, 3, 4, "arcface", torch.float32, detach_margin=True, transposed=True)


# ---------------------------------------------------------------------------------------
# A shard without classes (more ranks than classes): nothing here, by every op.


def test_empty_shard():
    n, d = 4, 8
    target = torch.tensor([0, 3, IGNORE, 5], device=DEVICE)
    hyper = VARIANTS["arcface"]
    empty_stats = torch.tensor([[float("-inf"), 0.0, 0.0]] * n, dtype=torch.float64)
    coef = torch.ones(n, 4, device=DEVICE)
    cos = torch.empty(n, 0, device=DEVICE)
    stats = triton_ops.sharded_margin_stats(cos, target, None, None, class_start=3,
                                            ignore_index=IGNORE, **hyper)
    assert torch.equal(stats.cpu().double(), empty_stats)
    grad = triton_ops.sharded_margin_grad(cos, target, None, None, coef, detach_margin=False,
                                          class_start=3, ignore_index=IGNORE, **hyper)
    assert grad.shape == (n, 0)
    x, w = torch.randn(n, d, device=DEVICE), torch.empty(0, d, device=DEVICE)
    args = dict(normalize=True, class_start=3, ignore_index=IGNORE, block_size=0, **hyper)
    stats = triton_ops.sharded_margin_linear_stats(x, w, target, None, None, **args)
    assert torch.equal(stats.cpu().double(), empty_stats)
    gx, gw = triton_ops.sharded_margin_linear_grad(x, w, target, None, None, coef,
                                                   detach_margin=False, **args)
    assert torch.equal(gx, torch.zeros_like(x)) and gw.shape == (0, d)
