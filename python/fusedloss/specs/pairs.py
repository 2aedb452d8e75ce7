"""Specs of the pairs family: multi_similarity_loss, multi_similarity_miner, supcon_loss,
info_nce_loss, contrastive_loss, batch_hard_triplet_loss, orthogonal_projection_loss and
unpg_negatives, and the module CrossBatchMemory.

Every function reduces S_ij = x_i . r_j (x the batch, r the reference set: the batch itself
unless a memory bank is given) to per-row statistics with the ops pair_extrema (the hardest
positive and negative of each row: mining), pair_row_stats (per-row sums and masked
log-sum-exps of one loss kind) and pair_row_stats_backward (its gradient). Without a reference
set, row i is never paired with itself; with one, every pair counts.

Samples avoid ties of the mining that rounding decides: batch-hard triplet gets no duplicated
rows (two copies of a row tie as every anchor's hardest pick, and which copy wins, and gets the
gradient, rests on the last bit of a GEMM); the losses that sum over pairs get exact and near
duplicates (the euclidean distance of a near pair comes from the differences, and an exact
duplicate is at distance 0 with gradient 0)."""
import torch

import fusedloss
from fusedloss import nn
from ..reference import pairs as reference
from . import _draw
from ._build import (at, bad_inputs, device_mix, floating_matrix, module_bad, not_finite,
                     option, unknown_keyword)
from . import FuzzCase, KernelBadInput, ModuleSpec, OpSpec, Sample, generator, on
from .margin import stress_inputs as margin_stress_inputs


def transposed(t):
    return t.t().contiguous().t()


def _rows(n, d, dtype=torch.float32, seed=0, scale=1.0):
    """n rows N(0, scale^2) in R^d, drawn in fp64 and rounded to `dtype`."""
    return (scale * torch.randn(n, d, generator=generator(seed), dtype=torch.float64)).to(dtype)


def _labels(n, classes, seed=1):
    """n labels of `classes` classes, each class about n / classes times (so rows have
    positives), in a seeded order."""
    order = torch.randperm(n, generator=generator(seed))
    return torch.arange(n)[order] % classes


_NAMES = ("loss", "grad embeddings")
_BANK_NAMES = ("loss", "grad embeddings", "grad ref_embeddings")


def _pair_sample(id_, device, n, d, classes, kwargs, *, dtype=torch.float32, bank=0,
                 scale=1.0, layout=None, duplicate=None, seed=0):
    """A call of a pair loss on a batch x [n, d] with labels of `classes` classes and, when
    bank > 0, a reference set of `bank` rows (whose gradient is compared too). layout:
    "column-major" x or "row-strided" x (a row stride of 2 d + 1). duplicate: None, or the
    distance at which the last row copies the first (0: an exact duplicate; the bank's first
    row copies x[0] the same way)."""
    x = _rows(n, d, torch.float64, seed, scale)
    if duplicate is not None and n > 1:
        x[-1] = x[0] + duplicate * torch.randn(d, generator=generator(seed + 7),
                                               dtype=torch.float64)
    x = x.to(dtype)
    if layout == "column-major":
        x = transposed(x)
    elif layout == "row-strided":
        x = torch.cat([x, x, x[:, :1]], 1)[:, :d]
    labels = _labels(n, classes, seed + 1)
    if not bank:
        return Sample(id_, on(device, x, labels), kwargs, _NAMES)
    ref = _rows(bank, d, torch.float64, seed + 2, scale)
    if duplicate is not None:
        ref[0] = x[0].double()
    ref_labels = _labels(bank, classes, seed + 3)
    return Sample(id_, on(device, x, labels, ref.to(dtype), ref_labels), kwargs, _BANK_NAMES)


_LOW_PRECISION = (torch.float64, torch.float16, torch.bfloat16)


# ---- bad inputs --------------------------------------------------------------------------------

def _batch(device):
    """A good (embeddings [6, 5], labels [6]) of three classes."""
    return on(device, _rows(6, 5), torch.tensor([0, 0, 1, 1, 2, 2]))


def _batch_cases(unknown_kw):
    """The bad inputs of every function of (embeddings, labels, ref_embeddings, ref_labels):
    types, dtypes, ranks and lengths of each tensor, a reference set without its labels (and
    labels without a set), a meta tensor among CPU ones, normalize that is not a bool, an
    unknown keyword."""
    def with_ref(ref, ref_labels):
        return lambda x, y: (x, y, ref.to(x.device), ref_labels.to(x.device))

    return floating_matrix("embeddings", 0, (6, 5)) + [
        ("labels not a tensor", at(1, lambda y: y.tolist()), {}, TypeError,
         "labels must be a tensor, got list"),
        ("float labels", at(1, lambda y: y.float()), {}, TypeError,
         "labels must hold integer class labels, got torch.float32"),
        ("2-D labels", at(1, lambda y: y[:, None]), {}, ValueError,
         "labels must be 1-D, got shape (6, 1)"),
        ("label length", at(1, lambda y: y[:3]), {}, ValueError,
         "labels has 3 entries but embeddings has 6 rows; they must match"),
        ("ref without labels", lambda x, y: (x, y, x), {}, ValueError,
         "ref_embeddings and ref_labels go together: a reference set needs its lab"),
        ("ref labels without ref", lambda x, y: (x, y, None, y), {}, ValueError,
         "ref_embeddings and ref_labels go together"),
        ("ref D mismatch", with_ref(torch.rand(3, 4), torch.tensor([0, 1, 2])), {}, ValueError,
         "embeddings [N, D] and ref_embeddings [M, D] must share D, got (6, 5) and (3, 4)"),
        ("ref dtype mismatch", with_ref(torch.rand(3, 5, dtype=torch.float64),
                                        torch.tensor([0, 1, 2])), {}, TypeError,
         "embeddings and ref_embeddings must share a dtype, got torch.float32 and "
         "torch.float64"),
        ("1-D ref", with_ref(torch.rand(5), torch.tensor([0])), {}, ValueError,
         "ref_embeddings must be 2-D, got shape (5,)"),
        ("ref_labels length", with_ref(torch.rand(3, 5), torch.tensor([0, 1])), {},
         ValueError, "ref_labels has 2 entries but ref_embeddings has 3 rows; they must match"),
        device_mix(1, "embeddings"),
        ("ref on meta", lambda x, y: (x, y, x.to("meta"), y), {}, RuntimeError,
         "all tensors must be on one device, got embeddings on"),
        option("normalize not a bool", dict(normalize=1), TypeError,
               "normalize must be a bool, got int"),
        unknown_keyword(unknown_kw),
        _GROUP_WITHOUT_DISTRIBUTED,
    ]


# group= without torch.distributed initialised, and a gradient convention that is not a bool
# (every pair function takes group; the losses take ddp_grad_scale, the miner does not).
_GROUP_WITHOUT_DISTRIBUTED = option(
    "group without torch.distributed", dict(group=object()), RuntimeError,
    "a process group was given, but torch.distributed is not initialised")
_DDP_GRAD_SCALE = option("ddp_grad_scale not a bool", dict(ddp_grad_scale=1), TypeError,
                         "ddp_grad_scale must be a bool, got int")


def _pair_bad_inputs(name, option_cases, unknown_kw="_self_offset"):
    """bad_inputs() of pair function `name` of (embeddings, labels, ref_embeddings,
    ref_labels): the cases of its batch, then `option_cases`, its bad options (and
    ddp_grad_scale's, for the losses)."""
    if name != "multi_similarity_miner":
        option_cases = option_cases + [_DDP_GRAD_SCALE]
    return lambda: bad_inputs(lambda: getattr(fusedloss, name), _batch,
                              _batch_cases(unknown_kw) + option_cases)


# The distance keyword of contrastive_loss and batch_hard_triplet_loss.
_UNKNOWN_DISTANCE = option("distance", dict(distance="l1"), ValueError,
                           "unknown distance 'l1'; expected one of ('euclidean', 'cosine')")


# ---- fuzz --------------------------------------------------------------------------------------

def _fuzz_batch(data, device, triton, *, normalize=None, duplicates=True):
    """(x, labels, ref keywords, leaves, normalize) of one drawn pair-loss call: a batch with
    few classes (so that rows have positives), with or without a reference set (whose
    gradient is compared when it requires one), fp64 or fp32, strided or not.

    Low D and duplicated rows draw the near-duplicate pairs whose euclidean distance the
    kernels take from the differences; `duplicates=False` (batch-hard mining) draws none. A
    1-D row is never normalised: x / |x| is ill-conditioned there. normalize: forced, or
    drawn when None."""
    n = _draw.pick(data, [1, 2, 3, 5, 16, 17, 33] + ([] if triton else [64, 65, 129]))
    dtype = _draw.pick(data, [torch.float64, torch.float32])
    d = _draw.pick(data, [3, 16, 17, 64] if normalize else [1, 3, 16, 17, 64])
    duplicates = duplicates and _draw.flag(data)
    classes = data.draw(_draw.st().integers(1, 6))
    gen = _draw.generator(data)
    x = torch.randn(n, d, dtype=torch.float64, generator=gen).to(dtype)
    if duplicates:
        x[-1] = x[0]
    x = _draw.strided(x, _draw.flag(data)).to(device).requires_grad_()
    labels = _draw.labels(data, n, classes).to(device)
    leaves, ref_kw = [x], {}
    if _draw.flag(data):
        m = _draw.pick(data, [1, 7, 31, 64])
        ref = torch.randn(m, d, dtype=torch.float64, generator=gen).to(dtype).to(device)
        if duplicates:
            ref[0] = x[0].detach()
        ref.requires_grad_(_draw.flag(data))
        ref_kw = dict(ref_embeddings=ref, ref_labels=_draw.labels(data, m, classes).to(device))
        leaves.append(ref)
    if normalize is None:
        normalize = d > 1 and _draw.flag(data)
    return x, labels, ref_kw, leaves, normalize


def _pair_fuzz(name, draw_options, **batch):
    """The fuzz strategy of pair loss `name`: its options drawn by draw_options(data)."""
    def fuzz(data, device, triton):
        kw = draw_options(data)
        x, labels, ref_kw, leaves, normalize = _fuzz_batch(data, device, triton, **batch)
        kw = dict(kw, normalize=normalize, **ref_kw)
        fn = getattr(fusedloss, name)
        return FuzzCase(lambda backend: fn(x, labels, backend=backend, **kw), leaves, x.dtype)
    return fuzz


def stress_inputs(device):
    """x [16, 32], w [300, 32] and labels of 4 classes: the margin family's stress inputs."""
    _, x, w, target = margin_stress_inputs(device)
    return x, w, target % 4


# ---- multi_similarity_loss ---------------------------------------------------------------------

def ms_samples(device):
    """Mining on and off, other hyperparameters, a memory bank, raw (unnormalised) rows, N = 1
    and N = 2 (PML's zero with at most one pair of each sign), duplicated rows, strided and
    column-major rows, every dtype."""
    s = _pair_sample
    return [
        s("9x8, 3 classes", device, 9, 8, 3, {}),
        s("mining off", device, 9, 8, 3, dict(mining=False), seed=1),
        s("alpha 0.5, beta 5, base 0, eps 0.5", device, 11, 6, 3,
          dict(alpha=0.5, beta=5.0, base=0.0, epsilon=0.5), seed=2),
        s("bank 7 vs 13", device, 7, 8, 3, {}, bank=13, seed=3),
        s("bank, mining off", device, 6, 5, 2, dict(mining=False), bank=9, seed=4),
        s("raw rows", device, 8, 6, 3, dict(normalize=False), scale=0.3, seed=5),
        s("N=1", device, 1, 4, 1, {}),
        s("N=2, mining off", device, 2, 4, 1, dict(mining=False), seed=6),
        s("13x31, 5 classes", device, 13, 31, 5, {}, seed=7),
        s("16x32, bank 31, duplicate", device, 16, 32, 4, {}, bank=31, duplicate=0.0, seed=8),
        s("column-major", device, 10, 7, 3, {}, layout="column-major", seed=9),
        s("row-strided, mining off", device, 10, 7, 3, dict(mining=False), layout="row-strided",
          seed=10),
    ] + [s(f"{dtype}", device, 12, 16, 3, {}, dtype=dtype, seed=11) for dtype in _LOW_PRECISION]


def _op_inputs(device):
    """The batch and reference set of the op samples: x [6, 8], labels of 3 classes, ref
    [9, 8], the batch's own thresholds (max_neg, min_pos) of the miner."""
    g = generator(3)
    x, ref = torch.randn(6, 8, generator=g), torch.randn(9, 8, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    ref_labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    thresholds = reference.pair_extrema(x, labels, x, labels, 0, 0)[0].flip(1).contiguous()
    return x, labels, ref, ref_labels, thresholds


def _stats_and_backward(device, args):
    """pair_row_stats of `args` (CPU tensors) and its backward, as opcheck samples on
    `device`; the stats of the backward come from the oracle."""
    stats = reference.pair_row_stats(*args[:-1]).detach()
    grad_stats = torch.ones_like(stats)
    moved = tuple(a.to(device) if torch.is_tensor(a) else a for a in args)
    leaves = tuple(a.detach().clone().requires_grad_() if torch.is_tensor(a)
                   and a.is_floating_point() else a for a in moved)
    grad_stats, stats = on(device, grad_stats, stats)
    return [("pair_row_stats", leaves),
            ("pair_row_stats_backward", (grad_stats, stats, *moved, True, True))]


def ms_op_samples(device):
    """pair_row_stats of kind 0 with the miner's thresholds (the batch as its own reference,
    self column excluded) and without (a reference set, block size 3), its backward; the
    extrema of the batch itself (block size 4)."""
    x, labels, ref, ref_labels, thresholds = _op_inputs("cpu")
    hyper = [2.0, 50.0, 0.5, 0.1]
    xs, ls, ts = on(device, x, labels, thresholds)
    samples = [("pair_extrema", (xs.requires_grad_(), ls, xs, ls, 0, 0, 4)),
               ("pair_row_stats", (xs, ls, xs, ls, ts, 0, 0, hyper, 0, 0))]
    return samples + _stats_and_backward(device, (x, labels, ref, ref_labels, None, 0, 0, hyper,
                                                  -1, 3))


def ms_compile_sample(device):
    return _pair_sample("12x8, bank 9", device, 12, 8, 4, {}, bank=9, seed=12)


ms_bad_inputs = _pair_bad_inputs("multi_similarity_loss", [
    option("alpha<=0", dict(alpha=0.0), ValueError, "alpha must be > 0, got 0.0"),
    option("beta<=0", dict(beta=-1.0), ValueError, "beta must be > 0, got -1.0"),
    not_finite("base"),
    not_finite("epsilon", float("inf")),
    option("mining not a bool", dict(mining=1), TypeError, "mining must be a bool, got int"),
])


def _ms_options(data):
    return dict(alpha=_draw.pick(data, [2.0, 0.5]), beta=_draw.pick(data, [50.0, 5.0]),
                base=_draw.pick(data, [0.5, 0.0]), epsilon=_draw.pick(data, [0.1, 0.5]),
                mining=_draw.flag(data))


def ms_stress(device):
    x, _, labels = stress_inputs(device)
    return [Sample("16x32, 4 classes", (x, labels), {}, _NAMES)]


def _memcheck_batch(bank=False):
    """x [67, 40] (labels of 9 classes), and a bank [131, 40]: row counts that are no
    multiple of any tile, D over two chunks of 32."""
    x, labels = _rows(67, 40, seed=13), torch.arange(67) % 9
    if not bank:
        return (x, labels)
    return (x, labels, _rows(131, 40, seed=14), torch.arange(131) % 9)


def ms_memcheck():
    return [Sample("67x40", _memcheck_batch(), {}, _NAMES),
            Sample("67x40, bank 131", _memcheck_batch(bank=True), {}, _BANK_NAMES)]


# ---- multi_similarity_miner --------------------------------------------------------------------

_MINER_NAMES = ("a1", "p", "a2", "n")


def miner_samples(device):
    """Calls whose outputs are index tuples (a1, p, a2, n), to be compared exactly with the
    reference backend's (they take no gradient): the batch, a bank, epsilon 0.5, raw rows,
    N = 1, strided rows, fp64 and bf16."""
    def s(id_, n, d, classes, kwargs, **options):
        sample = _pair_sample(id_, device, n, d, classes, kwargs, **options)
        return Sample(sample.id, sample.inputs, sample.kwargs, _MINER_NAMES)
    return [
        s("9x8, 3 classes", 9, 8, 3, {}),
        s("bank 7 vs 13", 7, 8, 3, {}, bank=13, seed=3),
        s("epsilon 0.5", 11, 6, 3, dict(epsilon=0.5), seed=2),
        s("raw rows", 8, 6, 3, dict(normalize=False), scale=0.3, seed=5),
        s("N=1", 1, 4, 1, {}),
        s("column-major", 10, 7, 3, {}, layout="column-major", seed=9),
        s("fp64, 16x32, bank 31", 16, 32, 4, {}, bank=31, dtype=torch.float64, seed=8),
        s("bf16", 12, 16, 3, {}, dtype=torch.bfloat16, seed=11),
    ]


def miner_op_samples(device):
    """pair_extrema of a reference set, similarity and distance."""
    x, labels, ref, ref_labels, _ = _op_inputs("cpu")
    x, labels, ref, ref_labels = on(device, x, labels, ref, ref_labels)
    return [("pair_extrema", (x.requires_grad_(), labels, ref.requires_grad_(), ref_labels, 0,
                              -1, 0))]


def miner_compile_sample(device):
    sample = _pair_sample("12x8", device, 12, 8, 4, {}, seed=12)
    return Sample(sample.id, sample.inputs, sample.kwargs, _MINER_NAMES)


miner_bad_inputs = _pair_bad_inputs("multi_similarity_miner", [not_finite("epsilon")],
                                    unknown_kw="alpha")


def miner_fuzz(data, device, triton):
    """The miner's pairs as one tensor [len(a1), len(p), len(a2), len(n), a1, p, a2, n], which
    the fuzz driver compares exactly with the reference backend's (the spec is not
    differentiable). Options without exact ties: epsilon > 0, so a pair whose similarity
    equals the threshold of its row (a duplicated row) is kept whatever the rounding."""
    epsilon = _draw.pick(data, [0.1, 0.5])
    x, labels, ref_kw, _, normalize = _fuzz_batch(data, device, triton)
    x = x.detach()
    kw = dict(epsilon=epsilon, normalize=normalize,
              **{k: v.detach() for k, v in ref_kw.items()})

    def call(backend):
        found = fusedloss.multi_similarity_miner(x, labels, backend=backend, **kw)
        lengths = torch.tensor([len(t) for t in found], device=x.device)
        return torch.cat([lengths, *found])
    return FuzzCase(call, [], torch.long)


# ---- supcon_loss -------------------------------------------------------------------------------

def supcon_samples(device):
    """Temperatures 0.1 (the default), 0.2 and 1, a memory bank, raw rows, N = 1 and N = 2,
    duplicated rows, strided rows, every dtype. (fp32 rows keep every gap between a positive
    and the rest below ~16 / t: see the fuzz strategy on PML's average over non-zero rows.)"""
    s = _pair_sample
    return [
        s("9x8, 3 classes", device, 9, 8, 3, {}),
        s("t=0.2", device, 11, 6, 3, dict(temperature=0.2), seed=2),
        s("bank 7 vs 13", device, 7, 8, 3, dict(temperature=0.5), bank=13, seed=3),
        s("raw rows, t=1", device, 8, 6, 3, dict(temperature=1.0, normalize=False), scale=0.5,
          seed=5),
        s("N=1", device, 1, 4, 1, {}),
        s("N=2", device, 2, 4, 1, {}, seed=6),
        s("13x31, 5 classes", device, 13, 31, 5, dict(temperature=0.2), seed=7),
        s("16x32, bank 31, duplicate", device, 16, 32, 4, dict(temperature=0.2), bank=31,
          duplicate=0.0, seed=8),
        s("column-major", device, 10, 7, 3, {}, layout="column-major", seed=9),
        s("row-strided", device, 10, 7, 3, dict(temperature=0.2), layout="row-strided",
          seed=10),
    ] + [s(f"{dtype}", device, 12, 16, 3, dict(temperature=0.2), dtype=dtype, seed=11)
         for dtype in _LOW_PRECISION]


def supcon_op_samples(device):
    """pair_row_stats of kind 1 on a reference set, and its backward."""
    x, labels, ref, ref_labels, _ = _op_inputs("cpu")
    return _stats_and_backward(device, (x, labels, ref, ref_labels, None, 1, 0, [0.1], -1, 0))


def supcon_compile_sample(device):
    return _pair_sample("12x8, 4 classes", device, 12, 8, 4, {}, seed=12)


supcon_bad_inputs = _pair_bad_inputs("supcon_loss", [
    option("temperature<=0", dict(temperature=0.0), ValueError,
           "temperature must be > 0, got 0.0"),
    not_finite("temperature"),
])


def _supcon_options(data):
    # SupCon (PML's semantics) averages over the rows whose loss is not 0: a row whose one
    # positive outscores every other pair by ~16..35 has a loss of 1e-15..1e-7, 0 in fp32 but
    # not in fp64, so fp32 and the oracle would average over different rows. Normalised rows
    # with t >= 0.2 keep every gap below 10 (a row loss above e^-10).
    return dict(temperature=_draw.pick(data, [0.2, 1.0]))


def supcon_stress(device):
    x, _, labels = stress_inputs(device)
    return [Sample("16x32, 4 classes", (x, labels), {}, _NAMES)]


# ---- info_nce_loss -----------------------------------------------------------------------------

_INFO_NCE_NAMES = ("loss", "grad query", "grad key")


def _info_nce_sample(id_, device, n, d, kwargs, dtype=torch.float32, scale=1.0, layout=None,
                     seed=0):
    q, k = _rows(n, d, dtype, seed, scale), _rows(n, d, dtype, seed + 1, scale)
    if layout == "column-major key":
        k = transposed(k)
    elif layout == "row-strided query":
        q = torch.cat([q, q], 1)[:, :d]
    return Sample(id_, on(device, q, k), kwargs, _INFO_NCE_NAMES)


def info_nce_samples(device):
    """Temperatures 0.07 (the default) and 1, symmetric, raw rows, D = 1 (raw), N = 1, primes,
    strided query and column-major key, every dtype."""
    s = _info_nce_sample
    return [
        s("8x16", device, 8, 16, {}),
        s("symmetric", device, 8, 16, dict(symmetric=True), seed=1),
        s("t=1, raw rows", device, 9, 6, dict(temperature=1.0, normalize=False), scale=0.5,
          seed=2),
        s("D=1, raw, symmetric", device, 7, 1, dict(temperature=1.0, normalize=False,
                                                     symmetric=True), seed=3),
        s("N=1", device, 1, 8, {}, seed=4),
        s("13x31, t=0.5", device, 13, 31, dict(temperature=0.5), seed=5),
        s("16x32, symmetric", device, 16, 32, dict(symmetric=True, temperature=0.2), seed=6),
        s("row-strided query", device, 6, 10, {}, layout="row-strided query", seed=7),
        s("column-major key, symmetric", device, 6, 10, dict(symmetric=True),
          layout="column-major key", seed=8),
    ] + [s(f"{dtype}", device, 12, 16, dict(temperature=0.2), dtype=dtype, seed=9)
         for dtype in _LOW_PRECISION]


def info_nce_op_samples(device):
    """pair_row_stats of kind 1 with the positives on the diagonal (labels 0..N-1), and its
    backward."""
    g = generator(4)
    q, k = torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g)
    ids = torch.arange(7)
    return _stats_and_backward(device, (q, ids, k, ids, None, 1, 0, [0.07], -1, 0))


def info_nce_compile_sample(device):
    return _info_nce_sample("12x8, symmetric", device, 12, 8, dict(symmetric=True), seed=12)


def _query_key(device):
    return on(device, _rows(4, 5), _rows(4, 5, seed=1))


def info_nce_bad_inputs():
    fn = lambda: fusedloss.info_nce_loss  # noqa: E731
    return bad_inputs(fn, _query_key, floating_matrix("query", 0, (4, 5), ("not a tensor", "1-D"))
                      + floating_matrix("key", 1, (4, 5), ("int", "3-D")) + [
        ("shapes", at(1, lambda k: k[:3]), {}, ValueError,
         "query and key must have the same shape [N, D], got (4, 5) and (3, 5)"),
        ("dtype mismatch", at(1, lambda k: k.double()), {}, TypeError,
         "must share a dtype, got torch.float32 and torch.float64"),
        ("device mix", at(1, lambda k: k.to("meta")), {}, RuntimeError,
         "all tensors must be on one device"),
        option("temperature<0", dict(temperature=-0.1), ValueError,
               "temperature must be > 0, got -0.1"),
        option("symmetric not a bool", dict(symmetric=1), TypeError,
               "symmetric must be a bool, got int"),
        _GROUP_WITHOUT_DISTRIBUTED,
        _DDP_GRAD_SCALE,
        option("normalize not a bool", dict(normalize=None), TypeError,
               "normalize must be a bool, got NoneType"),
        unknown_keyword("labels"),
    ])


def info_nce_fuzz(data, device, triton):
    n = _draw.pick(data, [1, 2, 5, 16, 17, 33])
    d = _draw.pick(data, [1, 8, 17])
    dtype = _draw.pick(data, [torch.float64, torch.float32])
    gen = _draw.generator(data)
    q = torch.randn(n, d, dtype=torch.float64, generator=gen).to(dtype).to(device)
    k = torch.randn(n, d, dtype=torch.float64, generator=gen).to(dtype).to(device)
    q, k = q.requires_grad_(), k.requires_grad_()
    kw = dict(temperature=_draw.pick(data, [0.07, 1.0]), symmetric=_draw.flag(data),
              normalize=d > 1 and _draw.flag(data))
    return FuzzCase(lambda backend: fusedloss.info_nce_loss(q, k, backend=backend, **kw), [q, k],
                    dtype)


def info_nce_stress(device):
    x, w, _ = stress_inputs(device)
    return [Sample("16x32, symmetric", (x, w[:16]), dict(symmetric=True), _INFO_NCE_NAMES)]


# ---- contrastive_loss --------------------------------------------------------------------------

def contrastive_samples(device):
    """Both distances with their default and other margins, a memory bank, raw rows, exact and
    near duplicates (distance 0 and the differences' distance), N = 1 and N = 2, strided rows,
    every dtype."""
    s = _pair_sample
    return [
        s("euclidean 9x8", device, 9, 8, 3, {}),
        s("cosine 9x8", device, 9, 8, 3, dict(distance="cosine"), seed=1),
        s("euclidean margins 0.3, 1.2", device, 11, 6, 3, dict(pos_margin=0.3, neg_margin=1.2),
          seed=2),
        s("cosine margins 0.9, 0.1", device, 11, 6, 3,
          dict(distance="cosine", pos_margin=0.9, neg_margin=0.1), seed=2),
        s("bank 7 vs 13", device, 7, 8, 3, {}, bank=13, seed=3),
        s("raw rows", device, 8, 6, 3, dict(normalize=False, neg_margin=1.5), scale=0.4,
          seed=5),
        s("exact duplicate, bank", device, 10, 16, 3, {}, bank=11, duplicate=0.0, seed=6),
        s("near duplicate, raw", device, 10, 3, 3, dict(normalize=False), duplicate=1e-3,
          seed=7),
        s("N=1", device, 1, 4, 1, {}),
        s("N=2", device, 2, 4, 2, {}, seed=8),
        s("16x32, cosine, bank 31", device, 16, 32, 4, dict(distance="cosine"), bank=31,
          seed=9),
        s("column-major", device, 10, 7, 3, {}, layout="column-major", seed=10),
        s("row-strided, cosine", device, 10, 7, 3, dict(distance="cosine"),
          layout="row-strided", seed=11),
    ] + [s(f"{dtype}", device, 12, 16, 3, {}, dtype=dtype, seed=12) for dtype in _LOW_PRECISION]


def contrastive_op_samples(device):
    """pair_row_stats of kind 2 on distances (a reference set that holds the batch at offset
    4, block 0) with its backward, and on similarities (the batch itself)."""
    x, labels, ref, ref_labels, _ = _op_inputs("cpu")
    xs, ls = on(device, x, labels)
    return _stats_and_backward(device, (x, labels, ref, ref_labels, None, 2, 1, [0.0, 1.0], 4,
                                        0)) + [
        ("pair_row_stats", (xs.requires_grad_(), ls, xs, ls, None, 2, 0, [1.0, 0.0], 0, 0))]


def contrastive_compile_sample(device):
    return _pair_sample("12x8, euclidean", device, 12, 8, 4, {}, seed=12)


contrastive_bad_inputs = _pair_bad_inputs("contrastive_loss", [
    _UNKNOWN_DISTANCE, not_finite("pos_margin"), not_finite("neg_margin", float("inf"))])


def _contrastive_options(data):
    return dict(distance=_draw.pick(data, ["euclidean", "cosine"]))


def contrastive_stress(device):
    x, _, labels = stress_inputs(device)
    return [Sample("16x32, 4 classes", (x, labels), {}, _NAMES)]


def contrastive_memcheck():
    return [Sample("67x40", _memcheck_batch(), {}, _NAMES)]


# ---- batch_hard_triplet_loss -------------------------------------------------------------------

def triplet_samples(device):
    """Both distances, margins 0.05 (the default) and 0.5, a memory bank, raw rows, N = 1 and
    N = 2, strided rows, every dtype; no duplicated rows (see the module docstring)."""
    s = _pair_sample
    return [
        s("euclidean 9x8", device, 9, 8, 3, {}),
        s("cosine 9x8", device, 9, 8, 3, dict(distance="cosine"), seed=1),
        s("margin 0.5", device, 11, 6, 3, dict(margin=0.5), seed=2),
        s("bank 7 vs 13", device, 7, 8, 3, dict(margin=0.5), bank=13, seed=3),
        s("raw rows, cosine", device, 8, 6, 3, dict(normalize=False, distance="cosine",
                                                    margin=0.5), scale=0.5, seed=5),
        s("raw rows, D=3", device, 10, 3, 3, dict(normalize=False, margin=0.5), seed=7),
        s("N=1", device, 1, 4, 1, {}),
        s("N=2", device, 2, 4, 2, {}, seed=8),
        s("16x32, bank 31", device, 16, 32, 4, dict(margin=0.5), bank=31, seed=9),
        s("column-major", device, 10, 7, 3, dict(margin=0.5), layout="column-major", seed=10),
        s("row-strided, cosine", device, 10, 7, 3, dict(distance="cosine", margin=0.5),
          layout="row-strided", seed=11),
    ] + [s(f"{dtype}", device, 12, 16, 3, dict(margin=0.5), dtype=dtype, seed=12)
         for dtype in _LOW_PRECISION]


def triplet_op_samples(device):
    """pair_extrema on distances: a reference set, and the batch itself (self excluded)."""
    x, labels, ref, ref_labels, _ = _op_inputs("cpu")
    x, labels, ref, ref_labels = on(device, x, labels, ref, ref_labels)
    return [("pair_extrema", (x.requires_grad_(), labels, ref, ref_labels, 1, -1, 0)),
            ("pair_extrema", (x, labels, x, labels, 1, 0, 0))]


def triplet_compile_sample(device):
    return _pair_sample("12x8, euclidean", device, 12, 8, 4, dict(margin=0.5), seed=12)


triplet_bad_inputs = _pair_bad_inputs("batch_hard_triplet_loss",
                                      [_UNKNOWN_DISTANCE, not_finite("margin")])


def _triplet_options(data):
    return dict(margin=_draw.pick(data, [0.05, 0.5]),
                distance=_draw.pick(data, ["euclidean", "cosine"]))


def triplet_stress(device):
    x, _, labels = stress_inputs(device)
    return [Sample("16x32, 4 classes", (x, labels), {}, _NAMES)]


def triplet_memcheck():
    return [Sample("67x40", _memcheck_batch(), {}, _NAMES)]


# ---- orthogonal_projection_loss ----------------------------------------------------------------

def opl_samples(device):
    """The authors' defaults (gamma 0.5, signed mean) and the absolute variant, other gammas,
    a memory bank, raw rows, a single class (no negative pair), every row its own class (no
    positive pair), N = 1, duplicated rows, strided and column-major rows, every dtype."""
    s = _pair_sample
    return [
        s("9x8, 3 classes", device, 9, 8, 3, {}),
        s("absolute", device, 9, 8, 3, dict(absolute=True), seed=1),
        s("gamma 1, absolute", device, 11, 6, 3, dict(gamma=1.0, absolute=True), seed=2),
        s("gamma 0", device, 11, 6, 3, dict(gamma=0.0), seed=3),
        s("bank 7 vs 13", device, 7, 8, 3, {}, bank=13, seed=4),
        s("bank, absolute", device, 6, 5, 2, dict(absolute=True), bank=9, seed=5),
        s("raw rows", device, 8, 6, 3, dict(normalize=False), scale=0.3, seed=6),
        s("one class", device, 8, 6, 1, {}, seed=7),
        s("no positives", device, 8, 6, 8, dict(absolute=True), seed=8),
        s("N=1", device, 1, 4, 1, {}),
        s("16x32, bank 31, duplicate", device, 16, 32, 4, {}, bank=31, duplicate=0.0, seed=9),
        s("column-major", device, 10, 7, 3, {}, layout="column-major", seed=10),
        s("row-strided, absolute", device, 10, 7, 3, dict(absolute=True), layout="row-strided",
          seed=11),
    ] + [s(f"{dtype}", device, 12, 16, 3, dict(absolute=True), dtype=dtype, seed=12)
         for dtype in _LOW_PRECISION]


def opl_op_samples(device):
    """pair_row_stats of kind 3, signed on a reference set (block size 3) with its backward,
    absolute on the batch itself (self column excluded) with its backward."""
    x, labels, ref, ref_labels, _ = _op_inputs("cpu")
    return (_stats_and_backward(device, (x, labels, ref, ref_labels, None, 3, 0, [0.0], -1, 3))
            + _stats_and_backward(device, (x, labels, x, labels, None, 3, 0, [1.0], 0, 0)))


def opl_compile_sample(device):
    return _pair_sample("12x8, bank 9", device, 12, 8, 4, dict(absolute=True), bank=9, seed=12)


opl_bad_inputs = _pair_bad_inputs("orthogonal_projection_loss", [
    option("gamma<0", dict(gamma=-0.5), ValueError, "gamma must be >= 0.0, got -0.5"),
    not_finite("gamma"),
    not_finite("gamma", float("inf")),
    option("absolute not a bool", dict(absolute=1), TypeError,
           "absolute must be a bool, got int"),
])


def _opl_options(data):
    return dict(gamma=_draw.pick(data, [0.5, 0.0, 2.0]), absolute=_draw.flag(data))


def opl_stress(device):
    x, _, labels = stress_inputs(device)
    return [Sample("16x32, 4 classes", (x, labels), dict(absolute=True), _NAMES)]


def opl_memcheck():
    return [Sample("67x40", _memcheck_batch(), {}, _NAMES),
            Sample("67x40, bank 131", _memcheck_batch(bank=True), dict(absolute=True),
                   _BANK_NAMES)]


# ---- unpg_negatives ----------------------------------------------------------------------------

_UNPG_NAMES = ("negatives", "grad embeddings")


def unpg_samples(device):
    """The default whisker and others (0: the interquartile range only), raw rows, a batch of
    one class (L = 0: empty), N = 1 and N = 2, strided and column-major rows, fp64 and bf16.
    No duplicated rows: two copies of a row make tied cosines, whose order in the sorted
    result (and so which pair each position's gradient reaches) rests on the last bit."""
    def s(id_, n, d, classes, kwargs, **options):
        sample = _pair_sample(id_, device, n, d, classes, kwargs, **options)
        return Sample(sample.id, sample.inputs, sample.kwargs, _UNPG_NAMES)
    return [
        s("9x8, 3 classes", 9, 8, 3, {}),
        s("whisker 0", 17, 8, 4, dict(whisker=0.0), seed=1),
        s("whisker 0.25", 23, 6, 5, dict(whisker=0.25), seed=2),
        s("raw rows", 12, 6, 3, dict(normalize=False, whisker=0.5), scale=0.5, seed=3),
        s("one class", 6, 4, 1, {}, seed=4),
        s("N=1", 1, 4, 1, {}),
        s("N=2", 2, 4, 2, {}, seed=5),
        s("column-major", 10, 7, 3, dict(whisker=0.5), layout="column-major", seed=6),
        s("row-strided", 10, 7, 3, {}, layout="row-strided", seed=7),
        s("fp64, 40x16", 40, 16, 6, dict(whisker=1.0), dtype=torch.float64, seed=8),
        s("bf16", 12, 16, 3, {}, dtype=torch.bfloat16, seed=9),
    ]


def unpg_bad_inputs():
    fn = lambda: fusedloss.unpg_negatives  # noqa: E731
    return bad_inputs(fn, _batch, floating_matrix("embeddings", 0, (6, 5)) + [
        ("labels not a tensor", at(1, lambda y: y.tolist()), {}, TypeError,
         "labels must be a tensor, got list"),
        ("float labels", at(1, lambda y: y.float()), {}, TypeError,
         "labels must hold integer class labels, got torch.float32"),
        ("label length", at(1, lambda y: y[:3]), {}, ValueError,
         "labels has 3 entries but embeddings has 6 rows; they must match"),
        device_mix(1, "embeddings"),
        option("whisker<0", dict(whisker=-0.5), ValueError, "whisker must be >= 0.0, got -0.5"),
        not_finite("whisker"),
        option("normalize not a bool", dict(normalize=1), TypeError,
               "normalize must be a bool, got int"),
        unknown_keyword("gamma"),
    ])


def unpg_fuzz(data, device, triton):
    """Small batches without duplicated rows (see unpg_samples) in fp64 or fp32, so that no two
    cosines come within rounding of each other or of a fence."""
    n = _draw.pick(data, [1, 2, 3, 5, 16, 17])
    d = _draw.pick(data, [3, 16, 17])
    dtype = _draw.pick(data, [torch.float64, torch.float32])
    gen = _draw.generator(data)
    x = torch.randn(n, d, dtype=torch.float64, generator=gen).to(dtype)
    x = _draw.strided(x, _draw.flag(data)).to(device).requires_grad_()
    labels = _draw.labels(data, n, data.draw(_draw.st().integers(1, 6))).to(device)
    kw = dict(whisker=_draw.pick(data, [1.5, 0.0, 0.5]), normalize=_draw.flag(data))
    return FuzzCase(lambda backend: fusedloss.unpg_negatives(x, labels, backend=backend, **kw),
                    [x], dtype)


def unpg_stress(device):
    x, _, labels = stress_inputs(device)
    return [Sample("16x32, 4 classes", (x, labels), {}, _UNPG_NAMES)]


_PAIR_OPS = ("pair_extrema", "pair_row_stats", "pair_row_stats_backward")
_STATS_OPS = ("pair_row_stats", "pair_row_stats_backward")
_BACKENDS = ("cpu", "triton")  # no CUDA kernel: on CUDA tensors "auto" runs Triton

SPECS = [
    OpSpec("multi_similarity_loss", "pairs", reference.pair_row_stats, ops=_PAIR_OPS,
           backends=_BACKENDS, samples=ms_samples, op_samples=ms_op_samples,
           compile_sample=ms_compile_sample, bad_inputs=ms_bad_inputs,
           fuzz=_pair_fuzz("multi_similarity_loss", _ms_options), stress=ms_stress,
           memcheck=ms_memcheck),
    # Its result is the tuple of index tensors (a1, p, a2, n): samples and the compile sample
    # compare them exactly with the reference backend's; no gradient, no stress or memcheck
    # (multi_similarity_loss runs the same pair_extrema kernel there).
    OpSpec("multi_similarity_miner", "pairs", reference.pair_extrema, ops=("pair_extrema",),
           backends=_BACKENDS, samples=miner_samples, op_samples=miner_op_samples,
           compile_sample=miner_compile_sample, bad_inputs=miner_bad_inputs, fuzz=miner_fuzz,
           differentiable=False,
           host_sync="the number of mined pairs depends on the data (torch.nonzero)"),
    OpSpec("supcon_loss", "pairs", reference.pair_row_stats, ops=_STATS_OPS,
           backends=_BACKENDS, samples=supcon_samples, op_samples=supcon_op_samples,
           compile_sample=supcon_compile_sample, bad_inputs=supcon_bad_inputs,
           fuzz=_pair_fuzz("supcon_loss", _supcon_options, normalize=True),
           stress=supcon_stress),
    OpSpec("info_nce_loss", "pairs", reference.pair_row_stats, ops=_STATS_OPS,
           backends=_BACKENDS, samples=info_nce_samples, op_samples=info_nce_op_samples,
           compile_sample=info_nce_compile_sample, bad_inputs=info_nce_bad_inputs,
           fuzz=info_nce_fuzz, stress=info_nce_stress),
    OpSpec("contrastive_loss", "pairs", reference.pair_row_stats, ops=_STATS_OPS,
           backends=_BACKENDS, samples=contrastive_samples, op_samples=contrastive_op_samples,
           compile_sample=contrastive_compile_sample, bad_inputs=contrastive_bad_inputs,
           fuzz=_pair_fuzz("contrastive_loss", _contrastive_options),
           stress=contrastive_stress, memcheck=contrastive_memcheck),
    # Batch-hard mining gets no duplicates: two copies of a row tie as every anchor's hardest
    # pick, and which copy wins (and gets the gradient) then rests on the last bit of a GEMM.
    OpSpec("batch_hard_triplet_loss", "pairs", reference.pair_extrema, ops=("pair_extrema",),
           backends=_BACKENDS, samples=triplet_samples, op_samples=triplet_op_samples,
           compile_sample=triplet_compile_sample, bad_inputs=triplet_bad_inputs,
           fuzz=_pair_fuzz("batch_hard_triplet_loss", _triplet_options, duplicates=False),
           stress=triplet_stress, memcheck=triplet_memcheck),
    OpSpec("orthogonal_projection_loss", "pairs", reference.pair_row_stats, ops=_STATS_OPS,
           backends=_BACKENDS, samples=opl_samples, op_samples=opl_op_samples,
           compile_sample=opl_compile_sample, bad_inputs=opl_bad_inputs,
           fuzz=_pair_fuzz("orthogonal_projection_loss", _opl_options), stress=opl_stress,
           memcheck=opl_memcheck),
    # Blocked matrix products in torch ops (no kernel of its own): "cpu" and "cuda" run the same
    # implementation on their devices.
    OpSpec("unpg_negatives", "pairs", reference.unpg_negatives, ops=(),
           backends=("cpu", "cuda"), samples=unpg_samples, op_samples=lambda device: [],
           compile_sample=None, bad_inputs=unpg_bad_inputs, fuzz=unpg_fuzz, stress=unpg_stress,
           no_compile="the length of the result depends on the data (the kept pairs)",
           host_sync="the number of negative pairs and of kept ones depends on the data"),
]


# ---- modules -----------------------------------------------------------------------------------

def memory_bad_inputs():
    """Constructor arguments, loss options that may be checked at construction or at the first
    forward (those cases construct and forward, so that either passes), bad forwards."""
    x, labels = _batch("cpu")
    return [
        module_bad("batch > memory", lambda: nn.CrossBatchMemory(5, 4)(x, labels), ValueError,
                   "a batch of 6 does not fit in a memory of 4"),
        module_bad("unknown loss", lambda: nn.CrossBatchMemory(5, 8, loss="arcface"),
                   ValueError, "unknown loss 'arcface'; expected one of ('multi_similarity', "
                               "'supcon', '"),
        module_bad("memory 0", lambda: nn.CrossBatchMemory(5, 0), ValueError,
                   "embedding_dim and memory_size must be >= 1, got 5 and 0"),
        module_bad("unknown loss keyword", lambda: nn.CrossBatchMemory(5, 8, margin=0.1),
                   TypeError, "multi_similarity takes no keyword(s) ['margin']"),
        module_bad("private keyword", lambda: nn.CrossBatchMemory(5, 8, loss="supcon",
                                                                    _self_offset=0),
                   TypeError, "supcon takes no keyword(s) ['_self_offset']"),
        module_bad("temperature<=0",
                   lambda: nn.CrossBatchMemory(5, 8, loss="supcon", temperature=0.0)(x, labels),
                   ValueError, "temperature must be > 0, got 0.0"),
        module_bad("unknown distance",
                   lambda: nn.CrossBatchMemory(5, 8, loss="contrastive",
                                                 distance="l1")(x, labels),
                   ValueError, "unknown distance 'l1'"),
        module_bad("wrong D", lambda: nn.CrossBatchMemory(5, 8)(x[:, :4], labels),
                   ValueError, "embeddings must have shape [B, 5], got (6, 4)"),
        module_bad("label length", lambda: nn.CrossBatchMemory(5, 8)(x, labels[:3]),
                   ValueError, "labels must have shape [6], got (3,)"),
        module_bad("float labels", lambda: nn.CrossBatchMemory(5, 8)(x, labels.float()),
                   TypeError, "labels must hold integer class labels, got torch.float32"),
        module_bad("ddp_grad_scale not a bool", lambda: nn.CrossBatchMemory(5, 8, ddp_grad_scale=1),
                   TypeError, "ddp_grad_scale must be a bool, got int"),
        module_bad("group without torch.distributed",
                   lambda: nn.CrossBatchMemory(5, 8, group=object())(x, labels), RuntimeError,
                   "a process group was given, but torch.distributed is not initialised"),
    ]


MODULE_SPECS = [
    ModuleSpec("CrossBatchMemory", "pairs", memory_bad_inputs),
]


# ---- the ops themselves ------------------------------------------------------------------------

_KERNEL_HYPER = [2.0, 50.0, 0.5, 0.1]  # multi-similarity (alpha, beta, base, epsilon)


def kernel_arguments(op):
    """Valid arguments of this family's ops by schema name (None for another family's op):
    x [4, 8] against a reference set [5, 8], multi-similarity statistics."""
    pair = dict(x=torch.randn(4, 8), labels=torch.tensor([0, 1, 0, 1]), ref=torch.randn(5, 8),
                ref_labels=torch.tensor([0, 1, 1, 0, 2]))
    stats = dict(pair, thresholds=None, kind=0, distance=0, hyper=_KERNEL_HYPER, self_offset=-1,
                 block_size=0)
    return {
        "pair_extrema": lambda: dict(pair, distance=0, self_offset=-1, block_size=0),
        "pair_row_stats": lambda: stats,
        "pair_row_stats_backward": lambda: dict(stats, grad_stats=torch.ones(4, 2),
                                                stats=torch.zeros(4, 2), x_grad=True,
                                                ref_grad=True),
    }.get(op, lambda: None)()


def kernel_value_checks():
    """Wrong shapes between the pair ops' arguments."""
    return [
        KernelBadInput("pair_extrema", "D mismatch", lambda: dict(ref=torch.randn(5, 7)),
                       ValueError, "share D"),
        KernelBadInput("pair_row_stats", "thresholds [4, 3]",
                       lambda: dict(thresholds=torch.zeros(4, 3)), ValueError, "thresholds"),
        KernelBadInput("pair_row_stats_backward", "grad_stats [4, 3]",
                       lambda: dict(grad_stats=torch.zeros(4, 3)), ValueError, "grad_stats"),
    ]
