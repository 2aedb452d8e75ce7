"""The Triton pair kernels (triton_kernels/pairs.py), called directly, against the dense
reference of python/fusedloss/reference/pairs.py: values, indices and gradients (reference
autograd against pair_row_stats_backward), every kind and distance, thresholds on and off,
self_offset, odd shapes, non-contiguous inputs, fp64 / fp32 / bf16. On CPU the kernels run
under TRITON_INTERPRET=1 (conftest sets it), so the shapes stay small."""
import pytest
import torch
import torch.nn.functional as F

from fusedloss.reference import pairs as ref_ops

from conftest import HAS_CUDA, HAS_TRITON, assert_close

pytestmark = pytest.mark.triton

if HAS_TRITON:
    from fusedloss.triton_kernels import pairs as triton_ops

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float64, torch.float32, torch.bfloat16]

# (kind, distance, hyper, thresholds): the loss configurations the library uses, and the
# similarity kinds on distances as well (the oracle applies them to d in place of S).
CONFIGS = {
    "ms": (0, 0, (2.0, 50.0, 0.5, 0.1), False),
    "ms_mined": (0, 0, (2.0, 50.0, 0.5, 0.1), True),
    "ms_euclidean_mined": (0, 1, (2.0, 10.0, 1.0, 0.1), True),
    "supcon": (1, 0, (0.1,), False),
    "supcon_euclidean": (1, 1, (0.5,), False),
    "contrastive_cosine": (2, 0, (0.8, 0.1), False),
    "contrastive_euclidean": (2, 1, (0.3, 1.4), False),
}

# (N, M, D, self_offset, block_size): M = None makes the batch its own reference (ref is x,
# self_offset 0); sizes off the blocks of 16 / 32, a self column that wraps around M.
SETUPS = {
    "self": (29, None, 24, 0, 0),
    "bank": (21, 29, 12, -1, 0),
    "bank_offset_wraps": (33, 45, 17, 40, 32),
}


def make_inputs(n, m, d, dtype, classes=4, device=DEVICE):
    """Unit rows (as the public functions pass them) and labels; ref is x when m is None."""
    x = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype).to(device)
    labels = torch.randint(0, classes, (n,), device=device)
    if m is None:
        return x, labels, x, labels
    ref = F.normalize(torch.randn(m, d, dtype=torch.float64), dim=1).to(dtype).to(device)
    return x, labels, ref, torch.randint(0, classes, (m,), device=device)


def oracle_thresholds(x, labels, ref, ref_labels, distance, self_offset):
    """(max_neg, min_pos) thresholds of multi-similarity mining, from the fp64 oracle."""
    values, _ = ref_ops.pair_extrema(x.double().cpu(), labels.cpu(), ref.double().cpu(),
                                     ref_labels.cpu(), distance, self_offset)
    return values.flip(1).contiguous()


def check_extrema(x, labels, ref, ref_labels, distance, self_offset, block_size, dtype):
    values, index = triton_ops.pair_extrema(x, labels, ref, ref_labels, distance, self_offset,
                                            block_size)
    exp_values, exp_index = ref_ops.pair_extrema(x.double().cpu(), labels.cpu(),
                                                 ref.double().cpu(), ref_labels.cpu(), distance,
                                                 self_offset)
    assert values.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert index.dtype == torch.int64
    assert_close(values.cpu(), exp_values, dtype, "extrema values")
    assert torch.equal(index.cpu(), exp_index), f"indices {index.cpu()} != {exp_index}"


def check_row_stats(x, labels, ref, ref_labels, config, self_offset, block_size, dtype):
    """Forward stats, then the gradients of sum(g * stats) for a random g, against the oracle.
    When ref is x, the kernel's grad_x + grad_ref is compared with the oracle's total."""
    kind, distance, hyper, mined = CONFIGS[config]
    self_ref = ref is x
    thresholds = (oracle_thresholds(x, labels, ref, ref_labels, distance, self_offset)
                  if mined else None)
    thr_dev = thresholds.to(x.device) if mined else None
    stats = triton_ops.pair_row_stats(x, labels, ref, ref_labels, thr_dev, kind, distance, hyper,
                                      self_offset, block_size)

    x64 = x.detach().double().cpu().requires_grad_()
    ref64 = x64 if self_ref else ref.detach().double().cpu().requires_grad_()
    expected = ref_ops.pair_row_stats(x64, labels.cpu(), ref64, ref_labels.cpu(), thresholds,
                                      kind, distance, hyper, self_offset)
    assert stats.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert stats.shape == expected.shape
    assert_close(stats.cpu(), expected.detach(), dtype, f"{config} stats")

    grad_stats = torch.randn(expected.shape, dtype=torch.float64)
    wrt = (x64,) if self_ref else (x64, ref64)
    exp_grads = torch.autograd.grad(expected, wrt, grad_stats, allow_unused=True)
    exp_grads = [torch.zeros_like(w) if g is None else g for g, w in zip(exp_grads, wrt)]
    grad_x, grad_ref = triton_ops.pair_row_stats_backward(
        grad_stats.to(stats.dtype).to(x.device), stats, x, labels, ref, ref_labels, thr_dev,
        kind, distance, hyper, self_offset, block_size, True, True)
    assert grad_x.dtype == x.dtype and grad_ref.dtype == ref.dtype
    if self_ref:
        assert_close((grad_x.double() + grad_ref.double()).cpu(), exp_grads[0], dtype,
                     f"{config} grad x (x and ref)")
    else:
        assert_close(grad_x.cpu(), exp_grads[0], dtype, f"{config} grad x")
        assert_close(grad_ref.cpu(), exp_grads[1], dtype, f"{config} grad ref")
    return stats, grad_x, grad_ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("distance", [0, 1])
def test_extrema_match_reference(distance, setup, dtype):
    n, m, d, self_offset, block_size = SETUPS[setup]
    x, labels, ref, ref_labels = make_inputs(n, m, d, dtype)
    check_extrema(x, labels, ref, ref_labels, distance, self_offset, block_size, dtype)


@pytest.mark.parametrize("distance", [0, 1])
def test_extrema_first_index_on_exact_ties(distance):
    """Integer embeddings make every S exact, so duplicate references tie exactly, also across
    blocks: the first column must win."""
    x = torch.randint(-2, 3, (20, 16)).double().to(DEVICE)
    ref = torch.randint(-2, 3, (12, 16)).double()
    ref = torch.cat([ref, ref, ref]).to(DEVICE)  # columns j, j + 12, j + 24 tie
    labels = torch.randint(0, 3, (20,), device=DEVICE)
    ref_labels = torch.randint(0, 3, (12,)).repeat(3).to(DEVICE)
    check_extrema(x, labels, ref, ref_labels, distance, -1, 16, torch.float64)
    check_extrema(x, labels, ref, ref_labels, distance, 5, 16, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("config", CONFIGS)
def test_row_stats_and_gradients_match_reference(config, setup, dtype):
    n, m, d, self_offset, block_size = SETUPS[setup]
    x, labels, ref, ref_labels = make_inputs(n, m, d, dtype)
    check_row_stats(x, labels, ref, ref_labels, config, self_offset, block_size, dtype)


@pytest.mark.parametrize("config", CONFIGS)
def test_float16(config):
    """fp16 is read and multiplied as it is (the other 16-bit type, tested on one setup)."""
    n, m, d, self_offset, block_size = SETUPS["bank"]
    x, labels, ref, ref_labels = make_inputs(n, m, d, torch.float16)
    check_row_stats(x, labels, ref, ref_labels, config, self_offset, block_size, torch.float16)
    check_extrema(x, labels, ref, ref_labels, CONFIGS[config][1], self_offset, block_size,
                  torch.float16)


@pytest.mark.parametrize("shape", [(1, None, 5), (1, 1, 5), (3, 1, 17), (3, 0, 8), (70, 70, 16)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", CONFIGS)
def test_odd_shapes(config, shape):
    """N = 1 (its own reference: no pair at all), M = 1, an empty reference set, and blocks of
    32 over 70 rows."""
    n, m, d = shape
    x, labels, ref, ref_labels = make_inputs(n, m, d, torch.float64, classes=2)
    self_offset = 0 if m is None else -1
    check_row_stats(x, labels, ref, ref_labels, config, self_offset, 32, torch.float64)
    check_extrema(x, labels, ref, ref_labels, CONFIGS[config][1], self_offset, 32, torch.float64)


def test_rows_without_pairs_get_the_defined_stats():
    """One row, its own reference: no pair. Kind 0 (0, 0), kind 1 (-inf, 0, 0), kind 2 zeros,
    extrema empty with index -1, and zero gradients, without NaN."""
    x, labels, ref, ref_labels = make_inputs(1, None, 8, torch.float32)
    expected = {0: [0.0, 0.0], 1: [float("-inf"), 0.0, 0.0], 2: [0.0, 0.0, 0.0, 0.0]}
    for kind, hyper in ((0, (2.0, 50.0, 0.5, 0.1)), (1, (0.1,)), (2, (0.5, 0.5))):
        stats = triton_ops.pair_row_stats(x, labels, ref, ref_labels, None, kind, 0, hyper, 0, 0)
        assert stats.cpu().tolist() == [expected[kind]]
        grads = triton_ops.pair_row_stats_backward(torch.ones_like(stats), stats, x, labels, ref,
                                                   ref_labels, None, kind, 0, hyper, 0, 0, True,
                                                   True)
        for g in grads:
            assert torch.equal(g.cpu(), torch.zeros(1, 8))
    for distance, empty in ((0, [float("inf"), float("-inf")]), (1, [float("-inf"), float("inf")])):
        values, index = triton_ops.pair_extrema(x, labels, ref, ref_labels, distance, 0, 0)
        assert values.cpu().tolist() == [empty] and index.cpu().tolist() == [[-1, -1]]


def test_non_contiguous_inputs():
    """Row-strided and column-strided embeddings, strided labels."""
    base = F.normalize(torch.randn(40, 60, dtype=torch.float64), dim=1).to(DEVICE)
    x = base[::2, 5:37]  # rows strided, stride(0) = 120
    ref = F.normalize(torch.randn(32, 27, dtype=torch.float64), dim=0).to(DEVICE).t()  # [27, 32]
    labels = torch.randint(0, 3, (40,), device=DEVICE)[::2]
    ref_labels = torch.randint(0, 3, (54,), device=DEVICE)[::2]
    assert not x.is_contiguous() and not ref.is_contiguous() and not labels.is_contiguous()
    for config in ("ms_mined", "supcon", "contrastive_euclidean"):
        check_row_stats(x, labels, ref, ref_labels, config, 3, 16, torch.float64)
    check_extrema(x, labels, ref, ref_labels, 1, 3, 16, torch.float64)


def test_ref_grad_off_and_x_grad_off_give_empty_tensors():
    x, labels, ref, ref_labels = make_inputs(9, 13, 16, torch.float32)
    hyper = (0.1,)
    stats = triton_ops.pair_row_stats(x, labels, ref, ref_labels, None, 1, 0, hyper, -1, 0)
    both = triton_ops.pair_row_stats_backward(torch.ones_like(stats), stats, x, labels, ref,
                                              ref_labels, None, 1, 0, hyper, -1, 0, True, True)
    only_x = triton_ops.pair_row_stats_backward(torch.ones_like(stats), stats, x, labels, ref,
                                                ref_labels, None, 1, 0, hyper, -1, 0, True, False)
    only_ref = triton_ops.pair_row_stats_backward(torch.ones_like(stats), stats, x, labels, ref,
                                                  ref_labels, None, 1, 0, hyper, -1, 0, False, True)
    assert torch.equal(only_x[0], both[0]) and only_x[1].numel() == 0
    assert torch.equal(only_ref[1], both[1]) and only_ref[0].numel() == 0


def test_large_beta_bf16_does_not_overflow():
    """S up to about 9 with beta = 50: exp(beta (S - base)) is far beyond fp32, the
    max-rescaled sums are not."""
    x, labels, ref, ref_labels = make_inputs(20, 30, 16, torch.float64)
    x, ref = (3.0 * x).bfloat16(), (3.0 * ref).bfloat16()
    stats, grad_x, grad_ref = check_row_stats(x, labels, ref, ref_labels, "ms", -1, 16,
                                              torch.bfloat16)
    assert stats.abs().max() > 100  # the exponents really were large
    assert torch.isfinite(stats).all() and torch.isfinite(grad_x).all()
    assert torch.isfinite(grad_ref).all()


def test_deterministic():
    x, labels, ref, ref_labels = make_inputs(20, 35, 16, torch.float32)
    hyper = (2.0, 50.0, 0.5, 0.1)
    runs = []
    for _ in range(2):
        stats = triton_ops.pair_row_stats(x, labels, ref, ref_labels, None, 0, 0, hyper, -1, 0)
        runs.append((stats, *triton_ops.pair_row_stats_backward(
            torch.ones_like(stats), stats, x, labels, ref, ref_labels, None, 0, 0, hyper, -1, 0,
            True, True)))
    for first, second in zip(*runs):
        assert torch.equal(first, second)
