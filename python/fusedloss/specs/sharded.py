"""Specs of the sharded family: sharded_margin_cross_entropy (a shard of the cosines) and
linear_sharded_margin_cross_entropy (a shard of the classifier's rows), and the module PartialFC.

Samples, fuzz and stress run at world size 1 (torch.distributed not initialised): this rank
holds every class, class_start = 0 and num_classes = C, and the loss and gradients are those of
the margin family's functions on the same inputs. The combination of several shards lives in
the op samples (a shard [4, 17) of 20 classes, targets inside and outside it) and in
tests/test_sharded.py (simulated splits in one process, gloo process groups).

ElasticFace options are left out of the samples: each call draws its margins from the
generator it is given, and a Sample's keywords are fixed objects, so the backend and the
oracle would draw different margins; tests/test_sharded.py checks them with a generator seeded
per call."""
import torch

import fusedloss
from fusedloss import nn
from ..reference import sharded as reference
from ._build import bad_inputs, empty_batch, linear_cases, module_bad, option, scores_cases
from . import FuzzCase, KernelBadInput, ModuleSpec, OpSpec, Sample, generator, on
from .margin import (KERNEL_MARGIN, MARGINS, class_targets, cosines, epilogue_samples,
                     extra_negative_cases, fuzz_cosines, fuzz_linear, linear_inputs,
                     margin_fuzz_options, margin_option_cases, stress_inputs, transposed)


def _whole(c):
    """The class range of world size 1: this rank holds all C classes."""
    return dict(class_start=0, num_classes=c)


# ---- sharded_margin_cross_entropy --------------------------------------------------------------

def sharded_samples(device):
    """Every margin variant on a prime shape with ignored rows; N = 1, C = 1; every reduction;
    label smoothing with the lse^2 term, the detached margin; strided and column-major cosines;
    every dtype."""
    def s(id_, n, c, kwargs, dtype=torch.float32, ignored=(), layout=None):
        cos = cosines(n, c, dtype)
        if layout == "row-strided":
            cos = cosines(n, 2 * c + 3, dtype)[:, :c]
        elif layout == "column-major":
            cos = transposed(cos)
        return Sample(id_, on(device, cos, class_targets(n, c, ignored=ignored)),
                      dict(kwargs, **_whole(c)))

    samples = [s(f"{name} 7x33", 7, 33, dict(kw, reduction="none"), ignored=(2,))
               for name, kw in MARGINS.items()]
    samples += [
        s("N=1", 1, 5, dict(m2=0.5)),
        s("C=1", 4, 1, dict(m3=0.35, reduction="sum")),
        s("C=130, scale 16", 5, 130, dict(m2=0.5, scale=16.0), ignored=(4,)),
        s("smoothing, z-term", 6, 129, dict(m2=0.5, label_smoothing=0.1, lse_square_scale=1e-3)),
        s("detached", 5, 17, dict(m2=0.5, margin_grad="detached", reduction="sum")),
        s("every row ignored, sum", 3, 9, dict(m3=0.35, reduction="sum"), ignored=(0, 1, 2)),
        s("row-strided", 5, 37, dict(m2=0.5), layout="row-strided"),
        s("column-major", 6, 31, dict(m3=0.35), layout="column-major"),
    ]
    samples += [s(f"{dtype}", 5, 67, dict(m2=0.5, scale=16.0), dtype, ignored=(0,))
                for dtype in (torch.float64, torch.float16, torch.bfloat16)]
    return samples + epilogue_samples(lambda n, c: (cosines(n, c),), device, extra=_whole)


def _shard_problem(n, c_local, d, dtype, seed):
    """(cos [N, C_local], embeddings [N, D], weight shard [C_local, D], target, row margins):
    the shard [4, 4 + C_local) of 20 classes; row 0 ignored, targets of rows 1 and 2 in the
    shard, the others outside it."""
    g = generator(seed)
    cos = (torch.rand(n, c_local, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(c_local, d, generator=g, dtype=torch.float64).to(dtype)
    target = torch.tensor([-100, 4, 4 + c_local - 1] + [(k * 7) % 3 + (k % 2) * 17
                                                        for k in range(n - 3)])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    row_m2 = torch.linspace(0.3, 0.5, n, dtype=acc)
    return cos, x, w, target, row_m2


def _coefficients(stats, seed):
    """coef [N, 4] = (lse, a, b, d) of the grad ops, with lse >= this shard's log-sum-exp, so
    that every exp(s c - lse) is at most 1; a, b, d arbitrary."""
    g = generator(seed)
    lse = torch.logaddexp(stats[:, 0], stats[:, 1]).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    abd = torch.rand(stats.shape[0], 3, generator=g, dtype=torch.float64).to(stats.dtype)
    return torch.cat([lse[:, None] + 1.0, abd], 1)


def sharded_op_samples(device):
    """Arguments of fusedloss::sharded_margin_stats and sharded_margin_grad: a shard [4, 17) of
    20 classes with targets inside and outside it and an ignored row, fp32 / fp64 / bf16,
    with and without per-row margins, exact and detached margins."""
    samples = []
    for k, (dtype, rows, detach) in enumerate([(torch.float32, False, False),
                                               (torch.float64, True, False),
                                               (torch.bfloat16, False, True),
                                               (torch.float32, True, True)]):
        cos, _, _, target, row_m2 = _shard_problem(6, 13, 4, dtype, seed=30 + k)
        m = (row_m2, row_m2 / 4) if rows else (None, None)
        hyper = (30.0, 1.0, 0.5, 0.1) if not rows else (64.0, 1.35, 0.0, 0.0)
        stats = reference.sharded_margin_stats(cos, target, *m, *hyper, 4, -100)
        coef = _coefficients(stats, seed=40 + k)
        cos, target, coef, *m = on(device, cos, target, coef, *m)
        cos.requires_grad_(k == 0)  # the ops are not differentiable: their outputs take none
        samples.append(("sharded_margin_stats", (cos, target, *m, *hyper, 4, -100)))
        samples.append(("sharded_margin_grad", (cos, target, *m, coef, *hyper, detach, 4, -100)))
    # The logit transforms: softcap 5 without margins, inter-class filtering at 0.3.
    cos, _, _, target, _ = _shard_problem(6, 13, 4, torch.float32, seed=34)
    plain = (16.0, 1.0, 0.0, 0.0)
    coef = _coefficients(reference.sharded_margin_stats(cos, target, None, None, *plain, 4, -100,
                                                        5.0, 0.3), seed=44)
    cos, target, coef = on(device, cos, target, coef)
    samples.append(("sharded_margin_stats", (cos, target, None, None, *plain, 4, -100, 5.0, 0.3)))
    samples.append(("sharded_margin_grad", (cos, target, None, None, coef, *plain, False, 4, -100,
                                            5.0, 0.3)))
    # inplace_backward's op overwrites its own copy of cos.
    samples.append(("sharded_margin_grad_inplace", (cos.clone(), target, None, None, coef, *plain,
                                                    False, 4, -100, 5.0, 0.3)))
    samples.append(("sharded_margin_grad_inplace", (cos.clone(), target, None, None, coef,
                                                    30.0, 1.0, 0.5, 0.1, True, 4, -100)))
    return samples


def _cos_and_target(device):
    return on(device, cosines(4, 7), torch.tensor([0, 1, 2, 3]))


def _class_range_cases():
    """Class ranges that do not tile [0, num_classes) at world size 1, and the ElasticFace+
    keywords, which no sharded op takes."""
    return [
        option("class_start<0", dict(class_start=-1), ValueError,
               "the shard of rank 0 leaves [0, 7); shards must tile [0, 7) (rank 0: [-1,"),
        option("shard exceeds", dict(class_start=3), ValueError,
               "the shard of rank 0 leaves [0, 7); shards must tile [0, 7) (rank 0: [3,"),
        option("num_classes small", dict(num_classes=5), ValueError,
               "the shard of rank 0 leaves [0, 5); shards must tile [0, 5) (rank 0: [0,"),
        option("float class_start", dict(class_start=0.0), TypeError,
               "class_start must be an int, got float"),
        option("elastic_plus", dict(m2=0.5, m2_std=0.1, elastic_plus=True), ValueError,
               "elastic_plus=True is not supported when sharded (it ranks every row's ta"),
    ]


_RANK_0 = "on rank 0, "


def sharded_bad_inputs():
    fn = lambda: fusedloss.sharded_margin_cross_entropy  # noqa: E731
    return bad_inputs(fn, _cos_and_target, scores_cases("local_cos", _RANK_0)
                      + _class_range_cases() + margin_option_cases() + extra_negative_cases()
                      + [option("inplace_backward without grad", dict(inplace_backward=True),
                                ValueError, "inplace_backward=True needs local_cos that "
                                "requires grad")], **_whole(7))


def sharded_fuzz(data, device, triton):
    """The margin family's cosines and options at world size 1."""
    cos, target = fuzz_cosines(data, device, triton)
    kw = dict(margin_fuzz_options(data, cos.dtype), **_whole(cos.shape[1]))
    return FuzzCase(lambda backend: fusedloss.sharded_margin_cross_entropy(cos, target,
                                                                       backend=backend, **kw),
                    [cos], cos.dtype)


def sharded_stress(device):
    cos, _, _, target = stress_inputs(device)
    return [Sample("arcface 16x300", (cos, target), dict(m2=0.5, **_whole(300)))]


def sharded_memcheck():
    """C = 1031 (not a multiple of any block), an ignored row; fp32 and bf16."""
    cos, target = cosines(11, 1031, seed=3), class_targets(11, 1031, seed=4, ignored=(2,))
    return [Sample(f"arcface 11x1031 {dtype}", (cos.to(dtype), target),
                   dict(m2=0.5, reduction="none", **_whole(1031)))
            for dtype in (torch.float32, torch.bfloat16)]


# ---- linear_sharded_margin_cross_entropy -------------------------------------------------------

_LINEAR_NAMES = ("loss", "grad embeddings", "grad weight_shard")


def linear_samples(device):
    def s(id_, n, c, d, kwargs, dtype=torch.float32, ignored=(), alter=None):
        x, w = linear_inputs(n, c, d, dtype)
        if alter is not None:
            x, w = alter(x, w)
        return Sample(id_, on(device, x, w, class_targets(n, c, ignored=ignored)),
                      dict(kwargs, **_whole(c)), _LINEAR_NAMES)

    samples = [s(f"{name} 7x33 D=17", 7, 33, 17, dict(kw, reduction="none"), ignored=(3,))
               for name, kw in MARGINS.items()]
    samples += [
        s("N=1 C=1", 1, 1, 8, dict(m2=0.5)),
        s("plain CE, no normalisation", 6, 41, 24, dict(scale=1.0, normalize=False)),
        s("smoothing, z-term, block 16", 5, 70, 16,
          dict(m3=0.35, label_smoothing=0.1, lse_square_scale=1e-3, block_size=16)),
        s("detached, sum", 5, 19, 8, dict(m2=0.5, margin_grad="detached", reduction="sum")),
        s("C=130, D=32", 4, 130, 32, dict(m2=0.5, scale=16.0), ignored=(1,)),
        s("column-major embeddings, strided weight", 6, 19, 12, dict(m2=0.5),
          alter=lambda x, w: (transposed(x), torch.cat([w, w], 1)[:, :12])),
    ]
    samples += [s(f"{dtype}", 5, 37, 16, dict(m2=0.5, scale=16.0), dtype, ignored=(2,))
                for dtype in (torch.float64, torch.float16, torch.bfloat16)]
    return samples + epilogue_samples(lambda n, c: linear_inputs(n, c, 12), device,
                                      _LINEAR_NAMES, _whole)


def linear_op_samples(device):
    """Arguments of fusedloss::sharded_margin_linear_stats and sharded_margin_linear_grad: the
    shard [4, 17) of 20 classes as in sharded_op_samples, normalised or not, block sizes 0
    (the backend chooses) and 4."""
    samples = []
    for k, (dtype, rows, normalize, block) in enumerate([(torch.float32, False, True, 0),
                                                         (torch.float64, True, False, 4),
                                                         (torch.bfloat16, False, True, 0),
                                                         (torch.float32, True, True, 4)]):
        _, x, w, target, row_m2 = _shard_problem(6, 13, 12, dtype, seed=50 + k)
        m = (row_m2, row_m2 / 4) if rows else (None, None)
        hyper = (30.0, 1.0, 0.5, 0.1) if not rows else (64.0, 1.35, 0.0, 0.0)
        scale = hyper if normalize else (1.0,) + hyper[1:]
        stats = reference.sharded_margin_linear_stats(x, w, target, *m, *scale, normalize, 4,
                                                      -100, block)
        coef = _coefficients(stats, seed=60 + k)
        x, w, target, coef, *m = on(device, x, w, target, coef, *m)
        x.requires_grad_(k == 0), w.requires_grad_(k == 0)
        samples.append(("sharded_margin_linear_stats",
                        (x, w, target, *m, *scale, normalize, 4, -100, block)))
        samples.append(("sharded_margin_linear_grad",
                        (x, w, target, *m, coef, *scale, k % 2 == 1, normalize, 4, -100, block)))
    _, x, w, target, _ = _shard_problem(6, 13, 12, torch.float32, seed=54)
    plain = (16.0, 1.0, 0.0, 0.0)
    coef = _coefficients(reference.sharded_margin_linear_stats(
        x, w, target, None, None, *plain, True, 4, -100, 0, 5.0, 0.3), seed=64)
    x, w, target, coef = on(device, x, w, target, coef)
    samples.append(("sharded_margin_linear_stats",
                    (x, w, target, None, None, *plain, True, 4, -100, 0, 5.0, 0.3)))
    samples.append(("sharded_margin_linear_grad",
                    (x, w, target, None, None, coef, *plain, False, True, 4, -100, 0, 5.0, 0.3)))
    return samples


def _x_w_target(device):
    x, w = linear_inputs(4, 7, 5)
    return on(device, x, w, torch.tensor([0, 1, 2, 3]))


def linear_bad_inputs():
    fn = lambda: fusedloss.linear_sharded_margin_cross_entropy  # noqa: E731
    return bad_inputs(fn, _x_w_target, linear_cases("embeddings", "weight_shard", "C_local",
                                                    where=_RANK_0) + _class_range_cases() + [
        option("negative block", dict(block_size=-1), ValueError,
               "block_size must be a positive int or None, got -1"),
    ] + margin_option_cases() + extra_negative_cases(), **_whole(7))


def linear_fuzz(data, device, triton):
    """The margin family's fused linear inputs and options at world size 1."""
    x, w, target, kw = fuzz_linear(data, device)
    kw = dict(kw, **_whole(w.shape[0]))
    return FuzzCase(lambda backend: fusedloss.linear_sharded_margin_cross_entropy(
        x, w, target, backend=backend, **kw), [x, w], x.dtype)


def linear_stress(device):
    _, x, w, target = stress_inputs(device)
    return [Sample("cosface 16x300 D=32", (x, w, target), dict(m3=0.35, **_whole(300)),
                   _LINEAR_NAMES)]


def linear_memcheck():
    """C = 1031, D = 40 (no multiples of any tile), an ignored row; fp32 and bf16."""
    x, w = linear_inputs(11, 1031, 40, seed=5)
    target = class_targets(11, 1031, seed=4, ignored=(2,))
    return [Sample(f"cosface 11x1031 D=40 {dtype}", (x.to(dtype), w.to(dtype), target),
                   dict(m3=0.35, reduction="none", **_whole(1031)), _LINEAR_NAMES)
            for dtype in (torch.float32, torch.bfloat16)]


# Why torch.compile(fullgraph=True) cannot trace these functions, even at world size 1.
NO_COMPILE = ("the agreement on errors before the collectives is not traceable: "
              "fusedloss.distributed.fingerprint (zlib.crc32 of a dataclass repr, which calls "
              "_thread.get_ident) and distributed.bad_target (a Python branch on "
              "bool(bad.any()) of the target's values)")
# Why they synchronise with the host on a GPU.
HOST_SYNC = ("the ranks agree on bad inputs before any collective (the targets are read on the "
             "host), and the collectives themselves synchronise")

SPECS = [
    OpSpec("sharded_margin_cross_entropy", "sharded", reference.sharded_margin_stats,
           ops=("sharded_margin_stats", "sharded_margin_grad", "sharded_margin_grad_inplace"),
           backends=("cpu", "triton"),
           samples=sharded_samples, op_samples=sharded_op_samples,
           compile_sample=None, no_compile=NO_COMPILE, host_sync=HOST_SYNC,
           bad_inputs=sharded_bad_inputs,
           fuzz=sharded_fuzz, stress=sharded_stress,
           empty_batch=empty_batch(lambda: fusedloss.sharded_margin_cross_entropy, (0, 7),
                                   **_whole(7)),
           memcheck=sharded_memcheck),
    OpSpec("linear_sharded_margin_cross_entropy", "sharded",
           reference.sharded_margin_linear_stats,
           ops=("sharded_margin_linear_stats", "sharded_margin_linear_grad"),
           backends=("cpu", "triton"),
           samples=linear_samples, op_samples=linear_op_samples,
           compile_sample=None, no_compile=NO_COMPILE, host_sync=HOST_SYNC,
           bad_inputs=linear_bad_inputs,
           fuzz=linear_fuzz, stress=linear_stress,
           empty_batch=empty_batch(lambda: fusedloss.linear_sharded_margin_cross_entropy,
                                   (0, 5), (7, 5), **_whole(7)),
           memcheck=linear_memcheck),
]


# ---- modules -----------------------------------------------------------------------------------

def partial_fc_bad_inputs():
    """Constructor arguments, and options that may be checked at construction or at the first
    forward (those cases construct and forward, so that either passes); bad forwards, at
    world size 1."""
    x, _, target = _x_w_target("cpu")
    return [
        module_bad("rate 0", lambda: nn.PartialFC(5, 10, sample_rate=0.0), ValueError,
                   "sample_rate must lie in (0, 1], got 0.0"),
        module_bad("rate > 1", lambda: nn.PartialFC(5, 10, sample_rate=1.5), ValueError,
                   "sample_rate must lie in (0, 1], got 1.5"),
        module_bad("dim 0", lambda: nn.PartialFC(0, 10), ValueError,
                   "embedding_dim and num_classes must be >= 1, got 0 and 10"),
        module_bad("unknown preset", lambda: nn.PartialFC(5, 10, loss="arcfase"), ValueError,
                   "unknown loss preset 'arcfase'"),
        module_bad("elastic plus preset",
                   lambda: nn.PartialFC(5, 10, loss="elastic_arcface_plus")(x, target),
                   ValueError, "elastic_plus=True is not supported when sharded"),
        module_bad("scale<=0", lambda: nn.PartialFC(5, 10, scale=0.0)(x, target), ValueError,
                   "scale must be > 0, got 0.0"),
        module_bad("negative block", lambda: nn.PartialFC(5, 10, block_size=-1)(x, target),
                   ValueError, "block_size must be a positive int or None, got -1"),
        module_bad("label out of range", lambda: nn.PartialFC(5, 10)(
            x, torch.tensor([0, 1, 2, 10])), ValueError,
            "on rank 0, local_labels[3] = 10 is outside [0, 10) and is not ignore_ind"),
        module_bad("wrong D", lambda: nn.PartialFC(6, 10)(x, target), ValueError,
                   "local_embeddings on rank(s) [0] are not [n, 6] tensors of dtype "
                   "torch.float32"),
        module_bad("float labels", lambda: nn.PartialFC(5, 10)(x, target.float()), ValueError,
                   "local_labels on rank(s) [0] are not integer tensors of shape [n] matching "
                   "local_embeddings"),
    ]


MODULE_SPECS = [
    ModuleSpec("PartialFC", "sharded", partial_fc_bad_inputs),
]


# ---- the ops themselves ------------------------------------------------------------------------

def kernel_arguments(op):
    """Valid arguments of this family's ops by schema name (None for another family's op):
    the whole class range [0, 6) on one shard."""
    rows = dict(target=torch.arange(4), row_m2=None, row_m3=None, **KERNEL_MARGIN, softcap=0.0,
                filter_threshold=0.0)
    linear = dict(embeddings=torch.randn(4, 8), weight=torch.randn(6, 8), **rows,
                  normalize=True, class_start=0, ignore_index=-100)
    cos = dict(cos=torch.rand(4, 6) * 2 - 1, **rows)
    return {
        "sharded_margin_stats": lambda: dict(cos, class_start=0, ignore_index=-100),
        "sharded_margin_grad": lambda: dict(cos, coef=torch.zeros(4, 4), detach_margin=False,
                                            class_start=0, ignore_index=-100),
        "sharded_margin_grad_inplace": lambda: dict(cos, coef=torch.zeros(4, 4),
                                                    detach_margin=False, class_start=0,
                                                    ignore_index=-100),
        "sharded_margin_linear_stats": lambda: dict(linear, block_size=0),
        "sharded_margin_linear_grad": lambda: dict(linear, coef=torch.zeros(4, 4),
                                                   detach_margin=False, block_size=0),
    }.get(op, lambda: None)()


def kernel_value_checks():
    """Wrong shapes between the sharded ops' arguments."""
    return [
        KernelBadInput(op, "coef [4, 3]", lambda: dict(coef=torch.zeros(4, 3)), ValueError, "coef")
        for op in ("sharded_margin_grad", "sharded_margin_linear_grad")
    ] + [
        KernelBadInput(op, f"{name}", lambda kw=kw: kw, ValueError, message)
        for op in ("sharded_margin_stats", "sharded_margin_grad", "sharded_margin_grad_inplace",
                   "sharded_margin_linear_stats", "sharded_margin_linear_grad")
        for name, kw, message in (("softcap with a margin", dict(softcap=5.0), "softcap needs no"),
                                  ("negative softcap", dict(softcap=-1.0, m2=0.0),
                                   "softcap must"),
                                  ("threshold 2", dict(filter_threshold=2.0), "filter_threshold"))
    ] + [
        KernelBadInput(op, "D mismatch", lambda: dict(weight=torch.randn(6, 7)), ValueError,
                       "share D")
        for op in ("sharded_margin_linear_stats", "sharded_margin_linear_grad")
    ]
