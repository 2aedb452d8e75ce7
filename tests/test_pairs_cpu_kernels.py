"""The CPU kernels of the pair ops (csrc/cpu/pairs.cpp), called directly through
torch.ops.fusedloss, against the dense reference of python/fusedloss/reference/pairs.py:
values, gradients (reference autograd against pair_row_stats_backward), gradcheck, and the
input checks."""
import pytest
import torch

from fusedloss.reference import pairs as ref

from conftest import assert_close

ops = torch.ops.fusedloss

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
HYPER = {0: [2.0, 50.0, 0.5, 0.1], 1: [0.1], 2: [0.3, 0.8]}
EUCLIDEAN_HYPER = {0: [2.0, 10.0, 1.2, 0.2], 1: [0.5], 2: [0.0, 1.5]}
BLOCKS = [0, 1, 3, 5]  # 0: the kernel's tiles; the others split the matrix unevenly


def hyper_of(kind, distance):
    return (EUCLIDEAN_HYPER if distance == 1 else HYPER)[kind]


def make_case(n, m, dtype, own_reference, classes=3, d=6, normalize=True):
    """(x, labels, ref, ref_labels, self_offset): the batch as its own reference
    (self_offset 0) or a separate reference set (self_offset -1)."""
    x = torch.randn(n, d, dtype=torch.float64)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    labels = torch.randint(0, classes, (n,))
    if own_reference:
        x = x.to(dtype)
        return x, labels, x, labels, 0
    r = torch.randn(m, d, dtype=torch.float64)
    if normalize:
        r = torch.nn.functional.normalize(r, dim=1)
    return x.to(dtype), labels, r.to(dtype), torch.randint(0, classes, (m,)), -1


def assert_with_infinities(actual, expected, dtype, what):
    """Infinite entries equal exactly; the finite ones within the tolerance of `dtype`."""
    expected = expected.double()
    actual = actual.double()
    inf = expected.isinf()
    assert torch.equal(actual.isinf(), inf), f"{what}: infinities differ"
    assert torch.equal(actual[inf], expected[inf]), f"{what}: signs of infinities differ"
    assert_close(actual.masked_fill(inf, 0), expected.masked_fill(inf, 0), dtype, what)


def oracle_thresholds(x, labels, r, ref_labels, self_offset):
    """(max_neg, min_pos) per row from the fp64 reference extrema, as the miner passes them."""
    values, _ = ref.pair_extrema(x.double(), labels, r.double(), ref_labels, 0, self_offset)
    return values.flip(1).contiguous()


# ---- pair_extrema -----------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("own_reference", [True, False], ids=["self", "reference"])
@pytest.mark.parametrize("distance", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extrema_match_reference(dtype, distance, own_reference, block):
    x, labels, r, ref_labels, offset = make_case(11, 13, dtype, own_reference)
    values, indices = ops.pair_extrema(x, labels, r, ref_labels, distance, offset, block)
    want_values, want_indices = ref.pair_extrema(x.double(), labels, r.double(), ref_labels,
                                                 distance, offset)
    assert values.dtype == ref.accumulation_dtype(x) and indices.dtype == torch.int64
    assert_with_infinities(values, want_values, dtype, "extrema values")
    assert torch.equal(indices == -1, want_indices == -1)
    if dtype == torch.float64:
        assert torch.equal(indices, want_indices)
    else:  # a near tie may round either way: the chosen column must hold the extreme value
        scores = ref.scores(x.double(), r.double(), distance)
        found = indices >= 0
        rows = torch.arange(x.shape[0])[:, None].expand_as(indices)
        assert_close(scores[rows[found], indices[found]], want_values[found], dtype,
                     "value at index")


@pytest.mark.parametrize("distance", [0, 1])
def test_extrema_first_index_on_exact_ties(distance):
    # Integer coordinates make every product and distance exact, so duplicated reference
    # rows tie exactly whatever the summation order.
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    r = torch.tensor([[3.0, 0.0, 1.0], [1.0, 2.0, 0.0], [3.0, 0.0, 1.0], [1.0, 2.0, 0.0],
                      [0.0, 0.0, 2.0], [0.0, 0.0, 2.0], [3.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1])
    ref_labels = torch.tensor([0, 1, 0, 1, 0, 1, 1])
    for block in BLOCKS:
        got = ops.pair_extrema(x, labels, r, ref_labels, distance, -1, block)
        want = ref.pair_extrema(x, labels, r, ref_labels, distance, -1)
        assert torch.equal(got[1], want[1]), f"block {block}"
        assert torch.equal(got[0], want[0]), f"block {block}"


def test_extrema_rows_without_pairs():
    # One sample per class against itself: no positives; one row alone: no pairs at all.
    x = torch.randn(4, 3)
    labels = torch.arange(4)
    for distance, empty in ((0, (float("inf"), float("-inf"))), (1, (float("-inf"), float("inf")))):
        values, indices = ops.pair_extrema(x, labels, x, labels, distance, 0, 0)
        assert torch.all(values[:, 0] == empty[0]) and torch.all(indices[:, 0] == -1)
        assert torch.all(indices[:, 1] >= 0)
        values, indices = ops.pair_extrema(x[:1], labels[:1], x[:1], labels[:1], distance, 0, 0)
        assert values.tolist() == [list(empty)] and indices.tolist() == [[-1, -1]]


# ---- pair_row_stats: values -------------------------------------------------------------

def stats_cases():
    for kind in (0, 1, 2):
        for mined in ((False, True) if kind == 0 else (False,)):
            yield pytest.param(kind, mined, id=f"kind{kind}" + ("-mined" if mined else ""))


def over_every_variant(test):
    """Parametrises `test` over dtype, kind (mined or not), distance, the batch as its own
    reference or a separate one, and block size."""
    marks = [pytest.mark.parametrize("block", BLOCKS),
             pytest.mark.parametrize("own_reference", [True, False], ids=["self", "reference"]),
             pytest.mark.parametrize("distance", [0, 1]),
             pytest.mark.parametrize("kind,mined", list(stats_cases())),
             pytest.mark.parametrize("dtype", DTYPES, ids=str)]
    for mark in marks:
        test = mark(test)
    return test


def stats_of_variant(dtype, kind, mined, distance, own_reference, block):
    """(x, labels, r, ref_labels, offset, thresholds, hyper, stats): a 9 x 14 case and the
    statistics of the CPU kernel; thresholds (when mined) from the fp64 oracle."""
    x, labels, r, ref_labels, offset = make_case(9, 14, dtype, own_reference)
    thresholds = oracle_thresholds(x, labels, r, ref_labels, offset) if mined else None
    hyper = hyper_of(kind, distance)
    stats = ops.pair_row_stats(x, labels, r, ref_labels, thresholds, kind, distance, hyper,
                               offset, block)
    return x, labels, r, ref_labels, offset, thresholds, hyper, stats


@over_every_variant
def test_row_stats_match_reference(dtype, kind, mined, distance, own_reference, block):
    x, labels, r, ref_labels, offset, thresholds, hyper, stats = stats_of_variant(
        dtype, kind, mined, distance, own_reference, block)
    want = ref.pair_row_stats(x.double(), labels, r.double(), ref_labels, thresholds, kind,
                              distance, hyper, offset)
    assert stats.dtype == ref.accumulation_dtype(x)
    assert stats.shape == (x.shape[0], ref.NUM_STATS[kind])
    assert_with_infinities(stats, want, dtype, f"stats kind {kind}")


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_row_stats_of_rows_without_pairs(kind):
    # N = 1 against itself: the only column is excluded. M = 0: no columns at all.
    x = torch.randn(1, 4)
    labels = torch.zeros(1, dtype=torch.long)
    empty = {0: [0.0, 0.0], 1: [float("-inf"), 0.0, 0.0], 2: [0.0] * 4}[kind]
    stats = ops.pair_row_stats(x, labels, x, labels, None, kind, 0, HYPER[kind], 0, 0)
    assert stats.tolist() == [empty]
    stats = ops.pair_row_stats(x, labels, x[:0], labels[:0], None, kind, 0, HYPER[kind], -1, 0)
    assert stats.tolist() == [empty]
    stats = ops.pair_row_stats(x[:0], labels[:0], x, labels, None, kind, 0, HYPER[kind], -1, 0)
    assert stats.shape == (0, ref.NUM_STATS[kind])
    # Their gradients are zeros of the inputs' shapes.
    grad_stats = torch.ones(1, ref.NUM_STATS[kind])
    for rs, rls, offset in ((x, labels, 0), (x[:0], labels[:0], -1)):
        for distance in (0, 1):
            stats = ops.pair_row_stats(x, labels, rs, rls, None, kind, distance, HYPER[kind],
                                       offset, 0)
            gx, gr = ops.pair_row_stats_backward(grad_stats, stats, x, labels, rs, rls, None, kind,
                                                 distance, HYPER[kind], offset, 0, True, True)
            assert torch.equal(gx, torch.zeros_like(x)) and torch.equal(gr, torch.zeros_like(rs))


def test_row_stats_large_beta_in_bfloat16():
    # exp(beta (S - base)) and exp(-alpha (S - base)) far beyond bf16's range: accumulated in
    # fp32 and max-rescaled, the statistics stay finite and match the fp64 oracle.
    x, labels, r, ref_labels, offset = make_case(16, 0, torch.bfloat16, True, classes=2, d=4)
    hyper = [40.0, 200.0, -0.5, 0.1]
    stats = ops.pair_row_stats(x, labels, r, ref_labels, None, 0, 0, hyper, offset, 0)
    want = ref.pair_row_stats(x.double(), labels, r.double(), ref_labels, None, 0, 0, hyper, offset)
    assert torch.isfinite(stats).all() and want.max() > 100
    assert_close(stats, want, torch.bfloat16, "stats")


def test_row_stats_duplicates():
    # Duplicated rows with S exactly |x|^2 and d exactly 0 (integer coordinates).
    x = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]],
                     dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    for kind in (0, 1, 2):
        for distance in (0, 1):
            hyper = hyper_of(kind, distance)
            got = ops.pair_row_stats(x, labels, x, labels, None, kind, distance, hyper, 0, 1)
            want = ref.pair_row_stats(x, labels, x, labels, None, kind, distance, hyper, 0)
            assert_with_infinities(got, want, torch.float64, f"kind {kind} distance {distance}")


# ---- pair_row_stats_backward ------------------------------------------------------------

def reference_grads(x, labels, r, ref_labels, thresholds, kind, distance, hyper, offset,
                    grad_stats, own_reference):
    """d <grad_stats, stats> / d (x, r) by the reference's autograd, in fp64. With the batch
    as its own reference the two are one tensor: its whole gradient comes back as x's."""
    xx = x.detach().double().clone().requires_grad_()
    rr = xx if own_reference else r.detach().double().clone().requires_grad_()
    stats = ref.pair_row_stats(xx, labels, rr, ref_labels, thresholds, kind, distance, hyper,
                               offset)
    if own_reference:
        return torch.autograd.grad(stats, xx, grad_stats.double())[0], None
    return torch.autograd.grad(stats, (xx, rr), grad_stats.double())


def random_grad_stats(n, kind, dtype):
    acc = ref.accumulation_dtype(torch.empty(0, dtype=dtype))
    return torch.randn(n, ref.NUM_STATS[kind], dtype=acc)


@over_every_variant
def test_backward_matches_reference_autograd(dtype, kind, mined, distance, own_reference, block):
    x, labels, r, ref_labels, offset, thresholds, hyper, stats = stats_of_variant(
        dtype, kind, mined, distance, own_reference, block)
    grad_stats = random_grad_stats(x.shape[0], kind, dtype)
    gx, gr = ops.pair_row_stats_backward(grad_stats, stats, x, labels, r, ref_labels, thresholds,
                                         kind, distance, hyper, offset, block, True, True)
    want_x, want_r = reference_grads(x, labels, r, ref_labels, thresholds, kind, distance, hyper,
                                     offset, grad_stats, own_reference)
    assert gx.dtype == dtype and gr.dtype == dtype
    if own_reference:
        assert_close(gx.double() + gr.double(), want_x, dtype, "grad")
    else:
        assert_close(gx, want_x, dtype, "grad x")
        assert_close(gr, want_r, dtype, "grad ref")


@pytest.mark.parametrize("distance", [0, 1])
@pytest.mark.parametrize("kind,mined", list(stats_cases()))
def test_default_tiles_over_several_blocks(kind, mined, distance):
    # More rows and columns than one default tile (256 x 1024) holds, fp32, with a self
    # offset that wraps around: values and both gradients.
    x, labels, r, ref_labels, _ = make_case(300, 1100, torch.float32, False, classes=20, d=8)
    offset = 950
    thresholds = oracle_thresholds(x, labels, r, ref_labels, offset) if mined else None
    hyper = hyper_of(kind, distance)
    stats = ops.pair_row_stats(x, labels, r, ref_labels, thresholds, kind, distance, hyper,
                               offset, 0)
    want = ref.pair_row_stats(x.double(), labels, r.double(), ref_labels, thresholds, kind,
                              distance, hyper, offset)
    assert_with_infinities(stats, want, torch.float32, "stats")
    grad_stats = random_grad_stats(300, kind, torch.float32)
    gx, gr = ops.pair_row_stats_backward(grad_stats, stats, x, labels, r, ref_labels, thresholds,
                                         kind, distance, hyper, offset, 0, True, True)
    want_x, want_r = reference_grads(x, labels, r, ref_labels, thresholds, kind, distance, hyper,
                                     offset, grad_stats, False)
    assert_close(gx, want_x, torch.float32, "grad x")
    assert_close(gr, want_r, torch.float32, "grad ref")
    values, indices = ops.pair_extrema(x, labels, r, ref_labels, distance, offset, 0)
    want_values, want_indices = ref.pair_extrema(x.double(), labels, r.double(), ref_labels,
                                                 distance, offset)
    assert_with_infinities(values, want_values, torch.float32, "extrema")
    assert torch.equal(indices == -1, want_indices == -1)


def test_results_are_deterministic():
    # Two calls give the same bits, also for inputs that require grad.
    x, labels, r, ref_labels, offset = make_case(40, 70, torch.float32, False)
    x.requires_grad_()
    args = (x, labels, r, ref_labels, None, 1, 0, [0.1], offset, 16)
    first, second = ops.pair_row_stats(*args), ops.pair_row_stats(*args)
    assert torch.equal(first, second)
    g = torch.ones_like(first)
    one = ops.pair_row_stats_backward(g, first, *args[:-1], 16, True, True)
    two = ops.pair_row_stats_backward(g, first, *args[:-1], 16, True, True)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("distance", [0, 1])
def test_backward_gradient_selection(distance):
    x, labels, r, ref_labels, offset = make_case(7, 10, torch.float64, False)
    stats = ops.pair_row_stats(x, labels, r, ref_labels, None, 1, distance, [0.5], offset, 3)
    grad_stats = random_grad_stats(7, 1, torch.float64)
    both = ops.pair_row_stats_backward(grad_stats, stats, x, labels, r, ref_labels, None, 1,
                                       distance, [0.5], offset, 3, True, True)
    only_x = ops.pair_row_stats_backward(grad_stats, stats, x, labels, r, ref_labels, None, 1,
                                         distance, [0.5], offset, 3, True, False)
    only_r = ops.pair_row_stats_backward(grad_stats, stats, x, labels, r, ref_labels, None, 1,
                                         distance, [0.5], offset, 3, False, True)
    assert only_x[1].numel() == 0 and only_r[0].numel() == 0
    assert torch.equal(only_x[0], both[0]) and torch.equal(only_r[1], both[1])


def test_backward_ignores_count_entries():
    x, labels, r, ref_labels, offset = make_case(6, 8, torch.float64, False)
    for kind, counts in ((1, [2]), (2, [1, 3])):
        hyper = HYPER[kind]
        stats = ops.pair_row_stats(x, labels, r, ref_labels, None, kind, 0, hyper, offset, 0)
        grad_stats = random_grad_stats(6, kind, torch.float64)
        base = ops.pair_row_stats_backward(grad_stats, stats, x, labels, r, ref_labels, None, kind,
                                           0, hyper, offset, 0, True, True)
        grad_stats[:, counts] = 1e3
        moved = ops.pair_row_stats_backward(grad_stats, stats, x, labels, r, ref_labels, None,
                                            kind, 0, hyper, offset, 0, True, True)
        assert torch.equal(base[0], moved[0]) and torch.equal(base[1], moved[1])


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_odd_shapes_and_non_contiguous_inputs(kind):
    # x and ref as strided views, N = 1 and M = 1, and a self offset that wraps around.
    base = torch.randn(8, 12, dtype=torch.float64)
    x = base[:5, ::2]  # [5, 6], strided
    r = torch.randn(6, 7, dtype=torch.float64).t()  # [7, 6], transposed
    labels = torch.randint(0, 2, (10,))[::2]
    ref_labels = torch.randint(0, 2, (7,))
    hyper = HYPER[kind]
    for xs, ls, rs, rls, offset in ((x, labels, r, ref_labels, 4),
                                    (x[:1], labels[:1], r, ref_labels, -1),
                                    (x, labels, r[:1], ref_labels[:1], -1)):
        for distance in (0, 1):
            stats = ops.pair_row_stats(xs, ls, rs, rls, None, kind, distance, hyper, offset, 2)
            want = ref.pair_row_stats(xs, ls, rs, rls, None, kind, distance, hyper, offset)
            assert_with_infinities(stats, want, torch.float64, "stats")
            grad_stats = random_grad_stats(xs.shape[0], kind, torch.float64)
            gx, gr = ops.pair_row_stats_backward(grad_stats, stats, xs, ls, rs, rls, None, kind,
                                                 distance, hyper, offset, 2, True, True)
            want_x, want_r = reference_grads(xs, ls, rs, rls, None, kind, distance, hyper, offset,
                                             grad_stats, False)
            assert_close(gx, want_x, torch.float64, "grad x")
            assert_close(gr, want_r, torch.float64, "grad ref")


def gradcheck_hyper(kind, distance):
    """Hyperparameters that keep the pairs of the small gradcheck cases away from the kinks."""
    contrastive = [0.2, 0.6] if distance == 0 else [0.5, 1.3]
    return {0: [2.0, 5.0, 0.5, 0.3], 1: [0.5], 2: contrastive}[kind]


class _RowStats(torch.autograd.Function):
    """pair_row_stats with pair_row_stats_backward as its gradient, for gradcheck."""

    @staticmethod
    def forward(ctx, x, r, labels, ref_labels, thresholds, kind, distance, hyper, offset, block):
        stats = ops.pair_row_stats(x, labels, r, ref_labels, thresholds, kind, distance, hyper,
                                   offset, block)
        ctx.save_for_backward(x, r, labels, ref_labels, stats)
        ctx.args = (thresholds, kind, distance, hyper, offset, block)
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        x, r, labels, ref_labels, stats = ctx.saved_tensors
        thresholds, kind, distance, hyper, offset, block = ctx.args
        gx, gr = ops.pair_row_stats_backward(grad_stats.contiguous(), stats, x, labels, r,
                                             ref_labels, thresholds, kind, distance, hyper,
                                             offset, block, True, True)
        return (gx, gr) + (None,) * 8


def assert_gradcheck(kind, mined, distance, x, labels, r, ref_labels, mining_offset, offset):
    """gradcheck of _RowStats (blocks of 3) in x and r, or in x alone when r is x (autograd
    then adds the two gradients the op returns); thresholds mined with `mining_offset`."""
    thresholds = oracle_thresholds(x, labels, r, ref_labels, mining_offset) if mined else None
    hyper = gradcheck_hyper(kind, distance)
    own = r is x
    leaves = (x.requires_grad_(),) if own else (x.requires_grad_(), r.requires_grad_())

    def stats_of(*t):
        return _RowStats.apply(t[0], t[-1], labels, ref_labels, thresholds, kind, distance,
                               hyper, offset, 3)

    assert torch.autograd.gradcheck(stats_of, leaves)


@pytest.mark.parametrize("distance", [0, 1])
@pytest.mark.parametrize("kind,mined", list(stats_cases()))
def test_gradcheck_fp64(kind, mined, distance):
    x, labels, r, ref_labels, offset = make_case(5, 7, torch.float64, False, classes=2, d=3)
    assert_gradcheck(kind, mined, distance, x, labels, r, ref_labels, offset, 2)


# ---- the batch as its own reference (ref is x: the symmetric path) ----------------------

def all_three_ops(x, labels, r, ref_labels, kind, mined, distance, offset, block,
                  grads=(True, True)):
    """(extrema values, indices, stats, grad_x, grad_ref, thresholds, grad_stats) of the CPU
    ops; thresholds (when mined) from the fp64 oracle, so that runs to be compared mine
    the same pairs; grad_stats fixed by a seed."""
    values, indices = ops.pair_extrema(x, labels, r, ref_labels, distance, offset, block)
    thresholds = oracle_thresholds(x, labels, r, ref_labels, offset) if mined else None
    hyper = hyper_of(kind, distance)
    stats = ops.pair_row_stats(x, labels, r, ref_labels, thresholds, kind, distance, hyper,
                               offset, block)
    torch.manual_seed(5)
    grad_stats = random_grad_stats(x.shape[0], kind, x.dtype)
    gx, gr = ops.pair_row_stats_backward(grad_stats, stats, x, labels, r, ref_labels, thresholds,
                                         kind, distance, hyper, offset, block, *grads)
    return values, indices, stats, gx, gr, thresholds, grad_stats


# Any self offset (or none) with ref = x: each row still drops its own excluded column. For
# distances too: a row's pair with itself is at d = 0 exactly (not Gram rounding noise, whose
# a = w / d two summation orders would not share), with the zero gradient of d at 0.
OWN_OFFSETS = [(0, 0), (0, -1), (0, 5), (1, 0), (1, -1), (1, 5)]


@pytest.mark.parametrize("block", [0, 4, 16])
@pytest.mark.parametrize("distance,offset", OWN_OFFSETS)
@pytest.mark.parametrize("kind,mined", list(stats_cases()))
def test_own_reference_matches_a_separate_copy_and_the_reference(kind, mined, distance, offset,
                                                                   block):
    # 37 rows over several tiles of blocks 4 and 16 (the last one partial). ref = x takes the
    # symmetric path, ref = a copy of x the general one: equal within fp32 tolerance, and
    # both as the fp64 oracle; extrema indices on the same (tie-free) columns.
    torch.manual_seed(1)
    x, labels, _, _, _ = make_case(37, 0, torch.float32, True, classes=5, d=8)
    own = all_three_ops(x, labels, x, labels, kind, mined, distance, offset, block)
    copy = all_three_ops(x, labels, x.clone(), labels.clone(), kind, mined, distance, offset, block)
    assert torch.equal(own[1], copy[1])
    assert_with_infinities(own[0], copy[0], torch.float32, "extrema")
    assert_with_infinities(own[2], copy[2], torch.float32, "stats")
    assert_close(own[3] + own[4], copy[3] + copy[4], torch.float32, "grad, own vs copy")
    want_values, _ = ref.pair_extrema(x.double(), labels, x.double(), labels, distance, offset)
    assert_with_infinities(own[0], want_values, torch.float32, "extrema vs oracle")
    thresholds, grad_stats = copy[5], copy[6]
    hyper = hyper_of(kind, distance)
    want = ref.pair_row_stats(x.double(), labels, x.double(), labels, thresholds, kind, distance,
                              hyper, offset)
    assert_with_infinities(own[2], want, torch.float32, "stats vs oracle")
    want_x, _ = reference_grads(x, labels, x, labels, thresholds, kind, distance, hyper, offset,
                                grad_stats, True)
    assert_close(own[3] + own[4], want_x, torch.float32, "grad vs oracle")


@pytest.mark.parametrize("distance", [0, 1])
def test_own_reference_over_default_tiles(distance):
    # More rows than two default square tiles (the last partial), fp32, kind 0 mined with
    # ties broken towards the first column: values, indices and the gradient.
    torch.manual_seed(2)
    x, labels, _, _, offset = make_case(600, 0, torch.float32, True, classes=150, d=8)
    values, indices, stats, gx, gr, thresholds, grad_stats = all_three_ops(
        x, labels, x, labels, 0, True, distance, offset, 0)
    want_values, want_indices = ref.pair_extrema(x.double(), labels, x.double(), labels, distance,
                                                 offset)
    assert_with_infinities(values, want_values, torch.float32, "extrema")
    assert torch.equal(indices == -1, want_indices == -1)
    hyper = hyper_of(0, distance)
    want = ref.pair_row_stats(x.double(), labels, x.double(), labels, thresholds, 0, distance,
                              hyper, offset)
    assert_with_infinities(stats, want, torch.float32, "stats")
    want_x, _ = reference_grads(x, labels, x, labels, thresholds, 0, distance, hyper, offset,
                                grad_stats, True)
    assert_close(gx + gr, want_x, torch.float32, "grad")


def test_own_reference_first_index_on_exact_ties():
    # Integer coordinates, duplicated rows: exact ties between columns of different tiles,
    # some met by a row through a transposed tile; the first column wins, as in the oracle.
    base = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 2.0]])
    x = base[torch.tensor([0, 1, 2, 3, 2, 1, 0, 3, 1, 2, 0])]
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1])
    for distance in (0, 1):
        want = ref.pair_extrema(x, labels, x, labels, distance, 0)
        for block in (0, 2, 3, 4):
            got = ops.pair_extrema(x, labels, x, labels, distance, 0, block)
            assert torch.equal(got[1], want[1]), f"distance {distance}, block {block}"
            assert torch.equal(got[0], want[0]), f"distance {distance}, block {block}"


@pytest.mark.parametrize("kind,mined", list(stats_cases()))
def test_ref_is_x_with_other_ref_labels(kind, mined):
    # The symmetric path needs only ref to be x: with ref_labels not the labels, the masks
    # are not symmetric, and each row still takes its own label against the columns' ones.
    torch.manual_seed(6)
    x, labels, _, _, _ = make_case(29, 0, torch.float64, True, classes=4)
    ref_labels = labels.roll(3)
    own = all_three_ops(x, labels, x, ref_labels, kind, mined, 0, 0, 8)
    copy = all_three_ops(x, labels, x.clone(), ref_labels, kind, mined, 0, 0, 8)
    assert torch.equal(own[1], copy[1])
    assert_with_infinities(own[0], copy[0], torch.float64, "extrema")
    assert_with_infinities(own[2], copy[2], torch.float64, "stats")
    assert_close(own[3] + own[4], copy[3] + copy[4], torch.float64, "grad")


@pytest.mark.parametrize("distance", [0, 1])
def test_own_reference_single_gradient_is_the_row_part(distance):
    # ref shares x's data but only one gradient is asked for (e.g. ref = x.detach()): that
    # gradient alone, the same as for a separate copy, not the combined one.
    torch.manual_seed(3)
    x, labels, _, _, offset = make_case(23, 0, torch.float64, True, classes=4)
    for grads in ((True, False), (False, True)):
        own = all_three_ops(x, labels, x, labels, 1, False, distance, offset, 4, grads)
        copy = all_three_ops(x, labels, x.clone(), labels, 1, False, distance, offset, 4, grads)
        assert_close(own[3], copy[3], torch.float64, "grad x")
        assert_close(own[4], copy[4], torch.float64, "grad ref")


def test_own_reference_is_deterministic_across_thread_counts():
    # Tiles in a fixed order and each row folded by one thread: the same bits with 1 and 2
    # threads, for all three ops, both distances.
    torch.manual_seed(4)
    x, labels, _, _, offset = make_case(300, 0, torch.float32, True, classes=60, d=16)
    threads = torch.get_num_threads()
    try:
        for distance in (0, 1):
            results = []
            for n in (1, 2):
                torch.set_num_threads(n)
                results.append(all_three_ops(x, labels, x, labels, 0, True, distance, offset, 64))
            for one, two in zip(*results):
                assert torch.equal(one, two), f"distance {distance}"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("distance", [0, 1])
@pytest.mark.parametrize("kind,mined", list(stats_cases()))
def test_gradcheck_own_reference_fp64(kind, mined, distance):
    # One tensor as x and ref: autograd adds the two gradients the op returns (all of it in
    # grad_x on the symmetric path).
    x, labels, _, _, offset = make_case(7, 0, torch.float64, True, classes=2, d=3)
    assert_gradcheck(kind, mined, distance, x, labels, x, labels, offset, offset)


# ---- input checks -----------------------------------------------------------------------

def _good():
    x = torch.randn(4, 3)
    return dict(x=x, labels=torch.tensor([0, 1, 0, 1]), ref=torch.randn(5, 3),
                ref_labels=torch.tensor([0, 1, 1, 0, 2]))


def _stats(**kw):
    a = dict(_good(), thresholds=None, kind=0, distance=0, hyper=[2.0, 50.0, 0.5, 0.1],
             self_offset=-1, block_size=0)
    a.update(kw)
    return ops.pair_row_stats(a["x"], a["labels"], a["ref"], a["ref_labels"], a["thresholds"],
                              a["kind"], a["distance"], a["hyper"], a["self_offset"],
                              a["block_size"])


def _extrema(**kw):
    a = dict(_good(), distance=0, self_offset=-1, block_size=0)
    a.update(kw)
    return ops.pair_extrema(a["x"], a["labels"], a["ref"], a["ref_labels"], a["distance"],
                            a["self_offset"], a["block_size"])


def _backward(**kw):
    g = _good()
    a = dict(g, grad_stats=torch.zeros(4, 2), stats=torch.zeros(4, 2), thresholds=None, kind=0,
             distance=0, hyper=[2.0, 50.0, 0.5, 0.1], self_offset=-1, block_size=0)
    a.update(kw)
    return ops.pair_row_stats_backward(a["grad_stats"], a["stats"], a["x"], a["labels"], a["ref"],
                                       a["ref_labels"], a["thresholds"], a["kind"], a["distance"],
                                       a["hyper"], a["self_offset"], a["block_size"], True, True)


BAD_INPUTS = [
    (_extrema, dict(x=torch.randn(4)), ValueError, r"x must be 2-D \[N, D\]"),
    (_extrema, dict(ref=torch.randn(5, 3, 1)), ValueError, r"ref must be 2-D \[M, D\]"),
    (_extrema, dict(ref=torch.randn(5, 2)), ValueError, "must share D"),
    (_extrema, dict(ref=torch.randn(5, 3, dtype=torch.float64)), TypeError,
     "must share a dtype"),
    (_extrema, dict(x=torch.ones(4, 3, dtype=torch.long), ref=torch.ones(5, 3, dtype=torch.long)),
     TypeError, "x must be a floating tensor"),
    (_extrema, dict(labels=torch.tensor([0, 1, 0])), ValueError, r"labels must have shape \[4\]"),
    (_extrema, dict(ref_labels=torch.tensor([0, 1])), ValueError,
     r"ref_labels must have shape \[5\]"),
    (_extrema, dict(labels=torch.tensor([0.0, 1.0, 0.0, 1.0])), TypeError, "must be int64"),
    (_extrema, dict(distance=2), ValueError, "distance must be 0 .* or 1"),
    (_extrema, dict(self_offset=-2), ValueError, "self_offset must be -1"),
    (_extrema, dict(block_size=-1), ValueError, "block_size must be >= 0"),
    (_stats, dict(kind=4), ValueError, "kind must be 0 .*, 1 .*, 2 .* or 3"),
    (_stats, dict(kind=3, hyper=[0.5]), ValueError, "absolute = 0 or 1, got 0.5"),
    (_stats, dict(hyper=[2.0, 50.0, 0.5]), ValueError,
     r"kind 0 takes hyper = \(alpha, beta, base, epsilon\)"),
    (_stats, dict(kind=1, hyper=[0.1, 0.2]), ValueError, r"kind 1 takes hyper = \(temperature\)"),
    (_stats, dict(hyper=[0.0, 50.0, 0.5, 0.1]), ValueError, "alpha > 0 and beta > 0"),
    (_stats, dict(hyper=[2.0, -1.0, 0.5, 0.1]), ValueError, "alpha > 0 and beta > 0"),
    (_stats, dict(hyper=[2.0, 50.0, float("nan"), 0.1]), ValueError, "must be finite"),
    (_stats, dict(kind=1, hyper=[0.0]), ValueError, "temperature must be > 0"),
    (_stats, dict(thresholds=torch.zeros(4, 3)), ValueError,
     r"thresholds must have shape \[4, 2\]"),
    (_stats, dict(thresholds=torch.zeros(4, 2, dtype=torch.long)), TypeError,
     "thresholds must be a floating tensor"),
    (_stats, dict(kind=1, hyper=[0.1], thresholds=torch.zeros(4, 2)), ValueError,
     "thresholds apply to kind 0"),
    (_backward, dict(grad_stats=torch.zeros(4, 3)), ValueError,
     r"grad_stats must have shape \[4, 2\]"),
    (_backward, dict(stats=torch.zeros(3, 2)), ValueError, r"stats must have shape \[4, 2\]"),
    (_backward, dict(kind=2, hyper=[0.1, 0.5], grad_stats=torch.zeros(4, 2)), ValueError,
     r"grad_stats must have shape \[4, 4\]"),
    (_backward, dict(distance=-1), ValueError, "distance must be 0"),
]


@pytest.mark.parametrize("call,kw,exc,message", BAD_INPUTS,
                         ids=[f"{c.__name__}-{m[:24]}" for c, _, _, m in BAD_INPUTS])
def test_bad_input_is_rejected(call, kw, exc, message):
    with pytest.raises(exc, match=message):
        call(**kw)
