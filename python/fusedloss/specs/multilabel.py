"""Specs of the multilabel family: multilabel_margin_cross_entropy (logits) and
linear_multilabel_margin_cross_entropy (fused with the classifier matmul). Targets are
[N, K] lists of positive classes padded with ignore_index; the samples cover padding,
duplicates, rows without positives, the margin variants, K = 1 and K = 64."""
import torch

import fusedloss
from ..reference import multilabel as reference
from . import _draw
from ._build import (at, bad_inputs, floating_matrix, device_mix, fuzz_linear_draw, not_finite,
                     option, class_loss_option_cases)
from . import FuzzCase, KernelBadInput, OpSpec, Sample, generator, on

_BACKENDS = ("cpu", "triton")
MARGINS = {"plain": {}, "arcface": dict(m2=0.5), "cosface": dict(m3=0.35),
           "sphereface": dict(m1=1.35), "combined": dict(m1=1.0, m2=0.3, m3=0.2)}


def cosines(n, c, dtype=torch.float32, seed=0):
    return (torch.rand(n, c, generator=generator(seed), dtype=torch.float64) * 2 - 1).to(dtype)


def positives(n, c, k, seed=1, padded=(), empty=(), repeated=(), ignore_index=-100):
    """[n, k] random positives of c classes; in each row of `padded` the last entry is
    padding, each row of `empty` is all padding, each row of `repeated` lists its first
    class twice."""
    t = torch.randint(0, c, (n, k), generator=generator(seed))
    for i in padded:
        t[i, -1] = ignore_index
    for i in empty:
        t[i] = ignore_index
    for i in repeated:
        t[i, -1] = t[i, 0]
    return t


def transposed(t):
    return t.t().contiguous().t()


# ---- multilabel_margin_cross_entropy -----------------------------------------------------------

def samples(device):
    """Every margin variant on a prime shape with padding, a repeated class and a row without
    positives; K = 1 and K = 64; N = 1, C = 1; positives that dominate the row at scale 64
    (cos 0.99 where the negatives are ~0); strided and column-major cosines; every dtype."""
    out = [Sample(f"{name} 7x33 K=4", on(device, cosines(7, 33),
                                         positives(7, 33, 4, padded=(1,), empty=(3,),
                                                   repeated=(5,))),
                  dict(kw, reduction="none"))
           for name, kw in MARGINS.items()]
    dominant = cosines(6, 50, seed=4) * 0.05
    dominant[:, :3] = 0.99
    out += [
        Sample("K=1", on(device, cosines(5, 17), positives(5, 17, 1)), dict(m2=0.5)),
        Sample("K=64 C=130", on(device, cosines(4, 130), positives(4, 130, 64, empty=(2,))),
               dict(m3=0.2, reduction="sum")),
        Sample("N=1 C=1", on(device, cosines(1, 1), torch.zeros(1, 2, dtype=torch.long)), {}),
        Sample("positives dominate", on(device, dominant,
                                        torch.tensor([[0, 1, 2]] * 6)), dict(reduction="none")),
        Sample("detached, scale 30", on(device, cosines(5, 40), positives(5, 40, 3)),
               dict(m2=0.5, scale=30.0, margin_grad="detached")),
        Sample("row-strided", on(device, cosines(5, 80)[:, :37], positives(5, 37, 3)),
               dict(m2=0.5)),
        Sample("column-major", on(device, transposed(cosines(6, 31)), positives(6, 31, 2)),
               dict(m3=0.35)),
        Sample("every row empty, sum", on(device, cosines(3, 9), positives(3, 9, 2,
                                                                         empty=(0, 1, 2))),
               dict(reduction="sum")),
        Sample("ignore_index=3, int32 targets",
               on(device, cosines(6, 17), positives(6, 17, 3, padded=(0, 2), ignore_index=3)
                  .clamp(min=0).to(torch.int32)), dict(ignore_index=3, reduction="none")),
    ]
    out += [Sample(f"{dtype}", on(device, cosines(5, 67, dtype), positives(5, 67, 3, padded=(0,))),
                   dict(m2=0.5))
            for dtype in (torch.float64, torch.float16, torch.bfloat16)]
    return out


def op_samples(device):
    """Arguments of fusedloss::multilabel_margin_stats and multilabel_margin_grad covering
    their branches: every margin path, a shard of the classes, a row without positives."""
    out = []
    for k, (dtype, margins, detach, shard) in enumerate([
            (torch.float32, (1.0, 0.5, 0.0), False, (0, 33)),
            (torch.float32, (1.0, 0.0, 0.35), False, (10, 60)),
            (torch.float64, (1.35, 0.0, 0.0), True, (0, 33)),
            (torch.bfloat16, (1.0, 0.3, 0.2), False, (5, 40))]):
        cos = cosines(5, 33, dtype, seed=10 + k).to(device).requires_grad_()
        targets = positives(5, shard[1], 3, seed=20 + k, padded=(1,), empty=(2,)).to(device)
        hyper = (32.0, *margins, detach, *shard, -100)
        out.append(("multilabel_margin_stats", (cos, targets, *hyper)))
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        coef = torch.rand(5, 4, generator=generator(30 + k), dtype=acc).to(device)
        coef[2, 0] = coef[2, 2] = 0.0
        coef[:, 1] += 4.0
        out.append(("multilabel_margin_grad", (cos.detach(), targets, coef, *hyper)))
    return out


def compile_sample(device):
    return Sample("arcface K=3", on(device, cosines(8, 50), positives(8, 50, 3, padded=(2,))),
                  dict(m2=0.5))


def _cos_and_targets(device):
    return on(device, cosines(4, 7), torch.tensor([[0, 1], [1, -100], [2, 2], [3, 6]]))


def target_cases(index, rows, num_classes, k):
    """Float targets, a row short, 1-D targets, K > 64, and an entry of num_classes."""
    out_of_range = torch.zeros(rows, k, dtype=torch.long)
    out_of_range[rows - 1, k - 1] = num_classes
    return [
        ("float targets", at(index, lambda t: t.float()), {}, TypeError,
         "targets must hold integer class indices, got torch.float32"),
        ("targets a row short", at(index, lambda t: t[:2]), {}, ValueError,
         f"targets must have shape [{rows}, K]"),
        ("1-D targets", at(index, lambda t: t[:, 0]), {}, ValueError,
         f"targets must have shape [{rows}, K]"),
        ("K=65", at(index, lambda t: torch.zeros(rows, 65, dtype=torch.long, device=t.device)),
         {}, ValueError, "targets must have 1 to 64 columns (positives per row), got K = 65"),
        ("target out of range", at(index, lambda t: out_of_range.to(t.device)), {}, ValueError,
         f"targets[{rows - 1}, {k - 1}] = {num_classes} is outside [0, {num_classes}) and is "
         "not ignore_index", ("cpu",)),
    ]


def option_cases():
    """The bad margin keywords of every multi-label function."""
    return [
        option("scale<=0", dict(scale=0.0), ValueError, "scale must be > 0, got 0.0"),
        option("m1<1", dict(m1=0.5), ValueError, "m1 must be >= 1.0, got 0.5"),
        not_finite("m2"),
        not_finite("m3", float("inf")),
        option("unknown margin_grad", dict(margin_grad="approx"), ValueError,
               "unknown margin_grad 'approx'"),
    ] + class_loss_option_cases("label_smoothing")


def bad(device=None):
    fn = lambda: fusedloss.multilabel_margin_cross_entropy  # noqa: E731
    return bad_inputs(fn, _cos_and_targets, floating_matrix("cos", 0, (4, 7))
                      + target_cases(1, 4, 7, 2) + [device_mix(1, "cos")] + option_cases() + [
        ("no classes", lambda cos, t: (cos[:, :0], t), {}, ValueError,
         "cos must have at least one class (C >= 1)"),
    ])


def fuzz_targets(data, n, c):
    """[n, K] positives with padding and repeats as drawn, K in 1..64."""
    k = _draw.pick(data, [1, 2, 3, 8, 17, 64])
    s = _draw.st()
    t = torch.tensor(data.draw(s.lists(s.integers(0, c - 1), min_size=n * k, max_size=n * k)),
                     dtype=torch.long).reshape(n, k)
    pad = data.draw(s.lists(s.booleans(), min_size=n * k, max_size=n * k))
    t[torch.tensor(pad, dtype=torch.bool).reshape(n, k)] = -100
    return t


def fuzz_options(data):
    return dict(scale=_draw.pick(data, [1.0, 16.0, 64.0]), m1=_draw.pick(data, [1.0, 1.35]),
                m2=_draw.pick(data, [0.0, 0.3, 0.5]), m3=_draw.pick(data, [0.0, 0.2]),
                margin_grad=_draw.pick(data, ["exact", "detached"]),
                reduction=_draw.pick(data, ["mean", "sum", "none"]))


def fuzz(data, device, triton):
    n = _draw.pick(data, _draw.SMALL_SIZES[:12])
    c = _draw.pick(data, _draw.SMALL_SIZES if triton else _draw.CLASS_SIZES)
    dtype = _draw.pick(data, _draw.DTYPES)
    cos = torch.rand(n, c, dtype=torch.float64, generator=_draw.generator(data)) * 2 - 1
    cos = _draw.strided(cos.to(dtype), _draw.flag(data)).to(device).requires_grad_()
    targets = fuzz_targets(data, n, c).to(device)
    kw = fuzz_options(data)
    return FuzzCase(lambda backend: fusedloss.multilabel_margin_cross_entropy(
        cos, targets, backend=backend, **kw), [cos], dtype)


def stress(device):
    g = generator(5)
    cos = torch.rand(16, 300, generator=g).mul(2).sub(1)
    return [Sample("arcface 16x300 K=8", on(device, cos, positives(16, 300, 8)), dict(m2=0.5))]


def memcheck():
    cos, targets = cosines(9, 1031), positives(9, 1031, 8, padded=(2,), empty=(4,))
    return [Sample(f"arcface 9x1031 K=8 {dtype}", (cos.to(dtype), targets),
                   dict(m2=0.5, reduction="none"))
            for dtype in (torch.float32, torch.bfloat16)]


def empty_batch(backend, device, reduction):
    return fusedloss.multilabel_margin_cross_entropy(
        torch.rand(0, 7, device=device), torch.zeros(0, 3, dtype=torch.long, device=device),
        backend=backend, reduction=reduction)


# ---- linear_multilabel_margin_cross_entropy -----------------------------------------------------

_LINEAR_NAMES = ("loss", "grad embeddings", "grad weight")


def linear_inputs(n, c, d, dtype=torch.float32, seed=2):
    g = generator(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(c, d, generator=g, dtype=torch.float64).to(dtype))


def linear_samples(device):
    """Every margin variant with padding, repeats and an empty row; no normalisation; blocks
    of 1 and 4 rows; N = 1, C = 1; column-major embeddings; every reduction and dtype."""
    def s(id_, n, c, d, k, kw, dtype=torch.float32, **t):
        return Sample(id_, on(device, *linear_inputs(n, c, d, dtype), positives(n, c, k, **t)),
                      kw, _LINEAR_NAMES)
    out = [s(f"{name} 7x33 D=17", 7, 33, 17, 4, dict(kw, reduction="none"), padded=(1,),
             empty=(3,), repeated=(5,)) for name, kw in MARGINS.items()]
    x, w = linear_inputs(6, 19, 12)
    out += [
        s("no normalisation", 6, 41, 24, 3, dict(normalize=False, scale=1.0)),
        s("block 4, sum", 9, 70, 16, 5, dict(m3=0.35, block_size=4, reduction="sum")),
        s("block 1, detached", 5, 30, 8, 2, dict(m2=0.5, block_size=1, margin_grad="detached")),
        s("N=1 C=1", 1, 1, 8, 1, dict(m2=0.5)),
        Sample("column-major embeddings", on(device, transposed(x), w, positives(6, 19, 3)),
               dict(m2=0.5), _LINEAR_NAMES),
        s("fp64", 5, 37, 16, 3, dict(m2=0.5), torch.float64),
        s("bf16", 5, 37, 16, 3, dict(m2=0.5), torch.bfloat16),
    ]
    return out


def linear_compile_sample(device):
    return Sample("arcface", on(device, *linear_inputs(8, 40, 16), positives(8, 40, 3)),
                  dict(m2=0.5), _LINEAR_NAMES)


def _x_w_targets(device):
    return on(device, *linear_inputs(4, 7, 5), torch.tensor([[0, 1], [1, -100], [2, 2], [3, 6]]))


def linear_bad():
    fn = lambda: fusedloss.linear_multilabel_margin_cross_entropy  # noqa: E731
    return bad_inputs(fn, _x_w_targets, floating_matrix("embeddings", 0, (4, 5),
                                                        ("not a tensor", "int", "1-D"))
                      + floating_matrix("weight", 1, (7, 5), ("3-D",)) + [
        ("D mismatch", at(1, lambda w: w[:, :4]), {}, ValueError,
         "embeddings [N, D] and weight [C, D] must share D, got (4, 5) and (7, 4)"),
        ("dtype mismatch", at(1, lambda w: w.double()), {}, TypeError,
         "embeddings and weight must share a dtype, got torch.float32 and torch.float64"),
        ("no classes", lambda x, w, t: (x, w[:0], t), {}, ValueError,
         "weight must have at least one class (C >= 1)"),
        option("negative block", dict(block_size=-1), ValueError,
               "block_size must be a positive int or None, got -1"),
    ] + target_cases(2, 4, 7, 2) + [device_mix(2, "embeddings")] + option_cases())


def linear_fuzz(data, device, triton):
    n, c, d, dtype, gen, x = fuzz_linear_draw(data)
    x = x.to(device).requires_grad_()
    w = torch.randn(c, d, dtype=torch.float64, generator=gen).to(dtype).to(device)
    w.requires_grad_()
    targets = fuzz_targets(data, n, c).to(device)
    kw = fuzz_options(data)
    # As the margin family's fuzz: a 1-D row normalises to +-1, whose gradient is rounding
    # noise, so normalisation only for D > 1; without it, scale 1.
    kw["normalize"] = d > 1 and _draw.flag(data)
    if not kw["normalize"]:
        kw["scale"] = 1.0
    kw["block_size"] = _draw.pick(data, [None, 1, 5])
    return FuzzCase(lambda backend: fusedloss.linear_multilabel_margin_cross_entropy(
        x, w, targets, backend=backend, **kw), [x, w], dtype)


def linear_stress(device):
    g = generator(5)
    x, w = torch.randn(16, 32, generator=g), torch.randn(300, 32, generator=g)
    return [Sample("arcface 16x300 D=32 K=8", on(device, x, w, positives(16, 300, 8)),
                   dict(m2=0.5), _LINEAR_NAMES)]


def linear_empty_batch(backend, device, reduction):
    return fusedloss.linear_multilabel_margin_cross_entropy(
        torch.rand(0, 5, device=device), torch.rand(7, 5, device=device),
        torch.zeros(0, 3, dtype=torch.long, device=device), backend=backend, reduction=reduction)


# ---- the sharded forms ------------------------------------------------------------------------
# Samples, fuzz and stress at world size 1 (torch.distributed not initialised: this rank holds
# every class); several shards are tested over gloo in tests/test_multilabel_sharded.py.

NO_COMPILE = ("the agreement on errors before the collectives is not traceable "
              "(fusedloss.distributed.fingerprint, and a Python branch on the targets' values)")
HOST_SYNC = ("the ranks agree on bad inputs before any collective (the targets are read on the "
             "host), and the collectives themselves synchronise")


def _whole(sample, c_index=0, rows=False):
    """A sample of the single-process function as a call of a whole shard."""
    c = sample.inputs[c_index].shape[0 if rows else 1]
    return Sample(sample.id, sample.inputs, dict(sample.kwargs, class_start=0, num_classes=c),
                  sample.names)


def sharded_samples(device):
    return [_whole(s) for s in samples(device)]


def sharded_linear_samples(device):
    return [_whole(s, 1, rows=True) for s in linear_samples(device)]


def sharded_bad():
    fn = lambda: fusedloss.sharded_multilabel_margin_cross_entropy  # noqa: E731
    return bad_inputs(fn, _cos_and_targets, floating_matrix("local_cos", 0, (4, 7))
                      + target_cases(1, 4, 7, 2)[:4] + option_cases() + [
        ("shards leave classes out", lambda cos, t: (cos[:, :5], t.clamp(max=4)), {}, ValueError,
         "classes [5, 7) belong to no rank"),
        ("target out of range", at(1, lambda t: torch.full_like(t, 7)), {}, ValueError,
         "on rank 0, target[0] = 7 is outside [0, 7)"),
    ], class_start=0, num_classes=7)


def sharded_linear_bad():
    fn = lambda: fusedloss.linear_sharded_multilabel_margin_cross_entropy  # noqa: E731
    return bad_inputs(fn, _x_w_targets, floating_matrix("embeddings", 0, (4, 5), ("int",)) + [
        ("D mismatch", at(1, lambda w: w[:, :4]), {}, ValueError,
         "embeddings [N, D] and weight_shard [C_local, D] must share D"),
        ("dtype mismatch", at(1, lambda w: w.double()), {}, TypeError,
         "embeddings and weight_shard must share a dtype"),
        option("negative block", dict(block_size=-1), ValueError,
               "block_size must be a positive int or None, got -1"),
    ] + target_cases(2, 4, 7, 2)[:4] + option_cases(), class_start=0, num_classes=7)


def sharded_empty_batch(backend, device, reduction):
    return fusedloss.sharded_multilabel_margin_cross_entropy(
        torch.rand(0, 7, device=device), torch.zeros(0, 3, dtype=torch.long, device=device),
        class_start=0, num_classes=7, backend=backend, reduction=reduction)


def sharded_linear_empty_batch(backend, device, reduction):
    return fusedloss.linear_sharded_multilabel_margin_cross_entropy(
        torch.rand(0, 5, device=device), torch.rand(7, 5, device=device),
        torch.zeros(0, 3, dtype=torch.long, device=device), class_start=0, num_classes=7,
        backend=backend, reduction=reduction)


SPECS = [
    OpSpec("multilabel_margin_cross_entropy", "multilabel",
           reference.multilabel_margin_cross_entropy, ops=("multilabel_margin_stats", "multilabel_margin_grad"),
           backends=_BACKENDS, samples=samples, op_samples=op_samples,
           compile_sample=compile_sample, bad_inputs=bad, fuzz=fuzz, stress=stress,
           empty_batch=empty_batch, memcheck=memcheck),
    OpSpec("linear_multilabel_margin_cross_entropy", "multilabel",
           reference.linear_multilabel_margin_cross_entropy,
           ops=("multilabel_margin_stats", "multilabel_margin_grad"), backends=_BACKENDS,
           samples=linear_samples, op_samples=lambda device: [],
           compile_sample=linear_compile_sample, bad_inputs=linear_bad, fuzz=linear_fuzz,
           stress=linear_stress, empty_batch=linear_empty_batch),
    OpSpec("sharded_multilabel_margin_cross_entropy", "multilabel",
           reference.multilabel_margin_stats,
           ops=("multilabel_margin_stats", "multilabel_margin_grad"), backends=_BACKENDS,
           samples=sharded_samples, op_samples=lambda device: [], compile_sample=None,
           no_compile=NO_COMPILE, host_sync=HOST_SYNC, bad_inputs=sharded_bad,
           no_fuzz="the single-process fuzz covers the row ops; world size 1 adds only the "
                   "combine, which the samples and tests/test_multilabel_sharded.py check",
           empty_batch=sharded_empty_batch),
    OpSpec("linear_sharded_multilabel_margin_cross_entropy", "multilabel",
           reference.multilabel_margin_stats,
           ops=("multilabel_margin_stats", "multilabel_margin_grad"), backends=_BACKENDS,
           samples=sharded_linear_samples, op_samples=lambda device: [], compile_sample=None,
           no_compile=NO_COMPILE, host_sync=HOST_SYNC, bad_inputs=sharded_linear_bad,
           no_fuzz="the fuzz of the linear form covers its blocks; world size 1 adds only the "
                   "combine, which the samples and tests/test_multilabel_sharded.py check",
           empty_batch=sharded_linear_empty_batch),
]
MODULE_SPECS = []


# ---- the ops themselves ------------------------------------------------------------------------

def kernel_arguments(op):
    """Valid arguments of this family's ops by schema name (None for another family's op)."""
    rows = dict(cos=torch.rand(4, 6) * 2 - 1,
                targets=torch.tensor([[0, 1], [2, -100], [5, 5], [3, 4]]))
    hyper = dict(scale=16.0, m1=1.0, m2=0.5, m3=0.0, detach_margin=False, class_start=0,
                 num_classes=6, ignore_index=-100)
    if op == "multilabel_margin_stats":
        return dict(rows, **hyper)
    if op == "multilabel_margin_grad":
        return dict(rows, coef=torch.rand(4, 4), **hyper)
    return None


def kernel_value_checks():
    """Wrong values of the multilabel ops' arguments: K > 64, scale 0, a shard outside the
    classes, a coef of the wrong shape."""
    return [case for op in ("multilabel_margin_stats", "multilabel_margin_grad") for case in (
        KernelBadInput(op, "K=65", lambda: dict(targets=torch.zeros(4, 65, dtype=torch.long)),
                       ValueError, "1 to 64 columns"),
        KernelBadInput(op, "scale 0", lambda: dict(scale=0.0), ValueError, "scale must be > 0"),
        KernelBadInput(op, "shard past the classes", lambda: dict(class_start=3), ValueError,
                       "must lie in"),
    )] + [KernelBadInput("multilabel_margin_grad", "coef [4, 3]",
                         lambda: dict(coef=torch.rand(4, 3)), ValueError, "coef must have shape")]
