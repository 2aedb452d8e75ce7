"""Specs of the margin family: margin_cross_entropy (logits) and linear_margin_cross_entropy
(fused with the classifier matmul), and the modules MarginCrossEntropy and MarginSoftmaxHead."""
import torch

import fusedloss
from fusedloss import nn
from ..reference import margin as reference
from . import _draw
from ._build import (bad_inputs, class_loss_option_cases, empty_batch, fuzz_linear_draw,
                     linear_cases, module_bad, not_finite, option, row_op_spec, scores_cases)
from . import (FuzzCase, KernelBadInput, ModuleSpec, OpSpec, Sample, generator, on,
               with_ignored)


def cosines(n, c, dtype=torch.float32, seed=0):
    return (torch.rand(n, c, generator=generator(seed), dtype=torch.float64) * 2 - 1).to(dtype)


def class_targets(n, c, seed=1, ignored=()):
    return with_ignored(torch.randint(0, c, (n,), generator=generator(seed)), ignored)


def transposed(t):
    return t.t().contiguous().t()


# ---- margin_cross_entropy -------------------------------------------------------------------

MARGINS = {"arcface": dict(m2=0.5), "cosface": dict(m3=0.35), "sphereface": dict(m1=1.35),
           "combined": dict(m1=1.0, m2=0.3, m3=0.2)}


def margin_samples(device):
    """Every margin variant on a prime shape with ignored rows; N = 1, C = 1; every dtype;
    strided and column-major cosines; the options that change the row's epilogue."""
    samples = [Sample(f"{name} 7x33",
                      on(device, cosines(7, 33), class_targets(7, 33, ignored=(2,))),
                      dict(kw, reduction="none"))
               for name, kw in MARGINS.items()]
    samples += [
        Sample("N=1", on(device, cosines(1, 5), class_targets(1, 5)), dict(m2=0.5)),
        Sample("C=1", on(device, cosines(4, 1), class_targets(4, 1)),
               dict(m3=0.35, reduction="sum")),
        Sample("smoothing, z-term", on(device, cosines(6, 129), class_targets(6, 129)),
               dict(m2=0.5, label_smoothing=0.1, lse_square_scale=1e-3)),
        Sample("detached", on(device, cosines(5, 17), class_targets(5, 17)),
               dict(m2=0.5, margin_grad="detached", reduction="sum")),
        Sample("row-strided", on(device, cosines(5, 80)[:, :37], class_targets(5, 37)),
               dict(m2=0.5)),
        Sample("column-major", on(device, transposed(cosines(6, 31)), class_targets(6, 31)),
               dict(m3=0.35)),
    ] + epilogue_samples(lambda n, c: (cosines(n, c),), device)
    samples += [Sample(f"{dtype}",
                       on(device, cosines(5, 67, dtype), class_targets(5, 67, ignored=(0,))),
                       dict(m2=0.5))
                for dtype in (torch.float64, torch.float16, torch.bfloat16)]
    return samples


def margin_op_samples(device):
    """Arguments of fusedloss::margin_cross_entropy covering its branches."""
    samples = []
    for dtype, grad in [(torch.float32, True), (torch.float32, False), (torch.float64, True),
                        (torch.bfloat16, True)]:
        cos = cosines(5, 33, dtype).to(device).requires_grad_(grad)
        target = class_targets(5, 33, ignored=(0,)).to(device)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        rows = torch.full((5,), 0.4, dtype=acc, device=device)
        samples.append(("margin_cross_entropy", (cos, target, None, None, 64.0, 1.0, 0.5, 0.0,
                                                 False, 0.1, 1e-3, -100, grad)))
        samples.append(("margin_cross_entropy", (cos, target, rows, rows / 4, 30.0, 1.35, 0.0,
                                                 0.0, True, 0.0, 0.0, -100, grad)))
    return samples


def margin_compile_sample(device):
    return Sample("arcface, smoothing", on(device, cosines(8, 50), class_targets(8, 50)),
                  dict(m2=0.5, label_smoothing=0.1))


def margin_option_cases():
    """The bad margin keywords, refused alike by every function of the margin and sharded
    families (MarginOptions.check, and Python's TypeError for a keyword that is none)."""
    return [
        option("scale<=0", dict(scale=0.0), ValueError, "scale must be > 0, got 0.0"),
        option("negative std", dict(m2_std=-0.1), ValueError, "m2_std must be >= 0.0, got -0.1"),
        option("m1<1", dict(m1=0.5), ValueError, "m1 must be >= 1.0, got 0.5"),
        option("smoothing>1", dict(label_smoothing=1.5), ValueError,
               "label_smoothing must lie in [0.0, 1.0], got 1.5"),
        option("negative z-term", dict(lse_square_scale=-1.0), ValueError,
               "lse_square_scale must be >= 0.0, got -1.0"),
        not_finite("m2"),
        option("unknown margin_grad", dict(margin_grad="approx"), ValueError,
               "unknown margin_grad 'approx'"),
        option("elastic_plus without std", dict(elastic_plus=True), ValueError,
               "elastic_plus=True needs m2_std > 0 or m3_std > 0"),
        option("negative tau", dict(tau=-0.5), ValueError, "tau must be >= 0.0, got -0.5"),
        not_finite("tau", float("inf")),
        option("smoothing with tau", dict(tau=1.5, label_smoothing=0.1), ValueError,
               "label_smoothing > 0 needs tau = 1"),
        option("softcap with a margin", dict(softcap=30.0, m2=0.5), ValueError,
               "softcap needs no margin"),
        option("softcap <= 0", dict(softcap=0.0), ValueError, "softcap must be > 0, got 0.0"),
        option("threshold > 1", dict(interclass_filtering_threshold=1.5), ValueError,
               "interclass_filtering_threshold must lie in [0.0, 1.0], got 1.5"),
        option("negative threshold", dict(interclass_filtering_threshold=-0.1), ValueError,
               "interclass_filtering_threshold must lie in [0.0, 1.0], got -0.1"),
    ] + class_loss_option_cases("margin")


def extra_negative_cases():
    """Bad extra_negatives, refused alike by the four margin entry points: not 1-D, not
    floating, not the dtype of the inputs (fp32 here)."""
    return [
        option("extra_negatives 2-D", dict(extra_negatives=torch.zeros(1, 3)), ValueError,
               "extra_negatives must be 1-D"),
        option("extra_negatives int64", dict(extra_negatives=torch.zeros(3, dtype=torch.long)),
               TypeError, "extra_negatives must be float16, bfloat16, float32 or float64"),
        option("extra_negatives fp64", dict(extra_negatives=torch.zeros(3, dtype=torch.float64)),
               TypeError, "extra_negatives must have the dtype of"),
    ]


def _cos_and_target(device):
    return on(device, cosines(4, 7), torch.tensor([0, 1, 2, 3]))


def margin_bad_inputs():
    fn = lambda: fusedloss.margin_cross_entropy  # noqa: E731
    return bad_inputs(fn, _cos_and_target, scores_cases("cos") + margin_option_cases() + [
        ("no classes", lambda cos, t: (cos[:, :0], t), {}, ValueError,
         "cos must have at least one class (C >= 1)"),
        option("inplace_backward without grad", dict(inplace_backward=True), ValueError,
               "inplace_backward=True needs cos that requires grad"),
    ] + extra_negative_cases())


def margin_fuzz_options(data, dtype):
    """The margin keywords of a drawn call on inputs of `dtype`. tau < 1 only for 32- and
    64-bit inputs: its gradient, w = p_y^(tau - 1) times the cross-entropy's, reaches 1e8 at
    scale 16, beyond fp16 (the gradient's dtype), where inf is the right answer."""
    wide = dtype in (torch.float32, torch.float64)
    tau = _draw.pick(data, [1.0, 1.0, 0.5, 1.7, 2.0] if wide else [1.0, 1.0, 1.7, 2.0])
    kw = dict(scale=_draw.pick(data, [1.0, 16.0, 64.0]), m1=_draw.pick(data, [1.0, 1.35, 2.0]),
              m2=_draw.pick(data, [0.0, 0.3, 0.5]), m3=_draw.pick(data, [0.0, 0.2, 0.35]),
              margin_grad=_draw.pick(data, ["exact", "detached"]),
              label_smoothing=_draw.pick(data, [0.0, 0.1]) if tau == 1.0 else 0.0,
              lse_square_scale=_draw.pick(data, [0.0, 1e-4]), tau=tau,
              interclass_filtering_threshold=_draw.pick(data, [0.0, 0.0, 0.3]),
              reduction=_draw.pick(data, ["mean", "sum", "none"]))
    if kw["m1"] == 1.0 and kw["m2"] == 0.0 and kw["m3"] == 0.0:
        kw["softcap"] = _draw.pick(data, [None, 5.0])  # a cap only without margins
    return kw


def fuzz_cosines(data, device, triton):
    """(cos [N, C] requiring grad, target with ignored rows): N, C around the kernels' blocks,
    any dtype, row-major or column-major."""
    n = _draw.pick(data, _draw.SMALL_SIZES[:12])
    c = _draw.pick(data, _draw.SMALL_SIZES if triton else _draw.CLASS_SIZES)
    dtype = _draw.pick(data, _draw.DTYPES)
    cos = (torch.rand(n, c, dtype=torch.float64, generator=_draw.generator(data)) * 2 - 1)
    cos = _draw.strided(cos.to(dtype), _draw.flag(data)).to(device).requires_grad_()
    return cos, _draw.targets(data, n, c).to(device)


def margin_fuzz(data, device, triton):
    cos, target = fuzz_cosines(data, device, triton)
    kw = margin_fuzz_options(data, cos.dtype)
    return FuzzCase(lambda backend: fusedloss.margin_cross_entropy(cos, target, backend=backend,
                                                                   **kw),
                    [cos], cos.dtype)


def stress_inputs(device):
    g = generator(5)
    cos = torch.rand(16, 300, generator=g).mul(2).sub(1)
    x, w = torch.randn(16, 32, generator=g), torch.randn(300, 32, generator=g)
    target = torch.randint(0, 300, (16,), generator=g)
    return on(device, cos, x, w, target)


def margin_stress(device):
    cos, _, _, target = stress_inputs(device)
    return [Sample("arcface 16x300", (cos, target), dict(m2=0.5))]


def margin_memcheck():
    """Tails (C = 1031, not a multiple of any block), an ignored row, strided rows; fp32, bf16."""
    cos, target = cosines(9, 1031), class_targets(9, 1031, ignored=(4,))
    return [Sample(f"{name} {dtype}", (cos.to(dtype)[:, :1000], target.clamp(max=999)),
                   dict(kw, reduction="none"))
            for dtype in (torch.float32, torch.bfloat16)
            for name, kw in (("arcface, smoothing", dict(m2=0.5, label_smoothing=0.1)),
                             ("sphereface", dict(m1=1.35)))]


def epilogue_samples(inputs, device, names=("loss", "grad"), extra=lambda c: {}):
    """The options of the stats engine (tau, with margins, the z-term and ignored rows;
    softcap; the inter-class filtering), on inputs(n, c), with the keywords extra(c)."""
    def sample(id_, n, c, ignored, **kw):
        return Sample(id_, on(device, *inputs(n, c), class_targets(n, c, ignored=ignored)),
                      dict(kw, **extra(c)), names)
    return [
        sample("GCE tau=1.7, arcface", 7, 33, (2,), tau=1.7, m2=0.5, reduction="none"),
        sample("sum-exp tau=0, scale 8", 5, 40, (), tau=0.0, scale=8.0, reduction="sum"),
        sample("MAE tau=2, cosface, z-term", 6, 29, (1,), tau=2.0, m3=0.35,
               lse_square_scale=1e-3),
        sample("tau=0.5 detached", 4, 17, (), tau=0.5, scale=16.0, m2=0.3,
               margin_grad="detached"),
        sample("softcap 5, scale 16, smoothing", 6, 37, (3,), softcap=5.0, scale=16.0,
               label_smoothing=0.1, reduction="none"),
        sample("softcap 30, tau=1.5", 5, 21, (), softcap=30.0, tau=1.5),
        sample("filtering 0.3, arcface", 7, 40, (1,), interclass_filtering_threshold=0.3,
               m2=0.5, reduction="none"),
        sample("filtering 0.2, softcap, z-term", 5, 33, (), interclass_filtering_threshold=0.2,
               softcap=8.0, scale=16.0, lse_square_scale=1e-3),
    ]


# ---- linear_margin_cross_entropy ---------------------------------------------------------------

def linear_inputs(n, c, d, dtype=torch.float32, seed=2):
    g = generator(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(c, d, generator=g, dtype=torch.float64).to(dtype))


_LINEAR_NAMES = ("loss", "grad embeddings", "grad weight")


def linear_samples(device):
    samples = [Sample(f"{name} 7x33 D=17", on(device, *linear_inputs(7, 33, 17),
                                              class_targets(7, 33, ignored=(3,))),
                      dict(kw, reduction="none"), _LINEAR_NAMES)
               for name, kw in MARGINS.items()]
    samples += [
        Sample("N=1 C=1", on(device, *linear_inputs(1, 1, 8), class_targets(1, 1)), dict(m2=0.5),
               _LINEAR_NAMES),
        Sample("plain CE, no normalisation",
               on(device, *linear_inputs(6, 41, 24), class_targets(6, 41)),
               dict(scale=1.0, normalize=False), _LINEAR_NAMES),
        Sample("smoothing, z-term, block 16",
               on(device, *linear_inputs(5, 70, 16), class_targets(5, 70)),
               dict(m3=0.35, label_smoothing=0.1, lse_square_scale=1e-3, block_size=16),
               _LINEAR_NAMES),
        Sample("column-major embeddings",
               on(device, transposed(linear_inputs(6, 19, 12)[0]), linear_inputs(6, 19, 12)[1],
                  class_targets(6, 19)), dict(m2=0.5), _LINEAR_NAMES),
    ]
    samples += [Sample(f"{dtype}",
                       on(device, *linear_inputs(5, 37, 16, dtype), class_targets(5, 37)),
                       dict(m2=0.5), _LINEAR_NAMES)
                for dtype in (torch.float64, torch.bfloat16)]
    return samples + epilogue_samples(lambda n, c: linear_inputs(n, c, 12), device,
                                      _LINEAR_NAMES)


def linear_op_samples(device):
    """Arguments of fusedloss::margin_linear_cross_entropy covering its branches."""
    samples = []
    for dtype, grad, normalize in [(torch.float32, True, True), (torch.float32, False, True),
                                   (torch.float64, True, False), (torch.bfloat16, True, True)]:
        x, w = (t.to(device).requires_grad_(grad) for t in linear_inputs(6, 21, 12, dtype))
        target = class_targets(6, 21, ignored=(1,)).to(device)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        row = torch.linspace(0.5, 1.5, 6, dtype=acc, device=device)
        samples.append(("margin_linear_cross_entropy",
                        (x, w, target, None, None, None, 64.0, 1.0, 0.5, 0.0, False, 0.1, 0.0,
                         -100, normalize, 0, False, grad)))
        samples.append(("margin_linear_cross_entropy",
                        (x, w, target, row * 0.4, row * 0.1, row, 30.0, 1.35, 0.0, 0.0, True,
                         0.0, 1e-3, -100, normalize, 4, True, grad)))
    return samples


def linear_compile_sample(device):
    return Sample("arcface", on(device, *linear_inputs(8, 40, 16), class_targets(8, 40)),
                  dict(m2=0.5),
                  _LINEAR_NAMES)


def _x_w_target(device):
    return on(device, *linear_inputs(4, 7, 5), torch.tensor([0, 1, 2, 3]))


def linear_bad_inputs():
    fn = lambda: fusedloss.linear_margin_cross_entropy  # noqa: E731
    return bad_inputs(fn, _x_w_target, linear_cases("embeddings", "weight") + [
        ("no classes", lambda x, w, t: (x, w[:0], t), {}, ValueError,
         "weight must have at least one class (C >= 1)"),
        option("negative block", dict(block_size=-1), ValueError,
               "block_size must be a positive int or None, got -1"),
    ] + margin_option_cases() + extra_negative_cases())


def fuzz_linear(data, device):
    """(x, w, target, options) of the fused linear margin ops: shapes around the tiles."""
    n, c, d, dtype, gen, x = fuzz_linear_draw(data)
    w = torch.randn(c, d, dtype=torch.float64, generator=gen).to(dtype)
    x, w = x.to(device).requires_grad_(), w.to(device).requires_grad_()
    target = _draw.targets(data, n, c).to(device)
    kw = margin_fuzz_options(data, dtype)
    # Normalisation only for D > 1: a 1-D row normalises to +-1 whatever its value, so the
    # gradient through F.normalize is 0 in exact arithmetic and rounding noise of size
    # eps |g| / |x| in fp32, which no comparison with the fp64 oracle can judge.
    kw["normalize"] = d > 1 and _draw.flag(data)
    if not kw["normalize"]:
        kw["scale"] = 1.0
    return x, w, target, kw


def linear_fuzz(data, device, triton):
    x, w, target, kw = fuzz_linear(data, device)
    return FuzzCase(lambda backend: fusedloss.linear_margin_cross_entropy(x, w, target,
                                                                      backend=backend, **kw),
                    [x, w], x.dtype)


def linear_stress(device):
    _, x, w, target = stress_inputs(device)
    return [Sample("arcface 16x300 D=32", (x, w, target), dict(m2=0.5), _LINEAR_NAMES)]


def linear_memcheck():
    x, w = linear_inputs(37, 1031, 72)
    return [Sample(f"arcface 37x1031 D=72 {dtype}", (x.to(dtype), w.to(dtype),
                                                     class_targets(37, 1031, ignored=(5,))),
                   dict(m2=0.5, reduction="none"), _LINEAR_NAMES)
            for dtype in (torch.float32, torch.bfloat16)]


SPECS = [
    row_op_spec("margin_cross_entropy", "margin", reference.margin_cross_entropy,
                samples=margin_samples, op_samples=margin_op_samples,
                compile_sample=margin_compile_sample, bad_inputs=margin_bad_inputs,
                fuzz=margin_fuzz, stress=margin_stress, memcheck=margin_memcheck),
    OpSpec("linear_margin_cross_entropy", "margin", reference.linear_margin_cross_entropy,
           ops=("margin_linear_cross_entropy",), backends=("cpu", "triton"),
           samples=linear_samples, op_samples=linear_op_samples,
           compile_sample=linear_compile_sample, bad_inputs=linear_bad_inputs,
           fuzz=linear_fuzz, stress=linear_stress,
           empty_batch=empty_batch(lambda: fusedloss.linear_margin_cross_entropy, (0, 5), (7, 5)),
           memcheck=linear_memcheck),
]


# ---- modules -----------------------------------------------------------------------------------

def margin_module_bad_inputs():
    cos, target = _cos_and_target("cpu")
    return [
        module_bad("unknown preset", lambda: nn.MarginCrossEntropy("arcfase"), ValueError,
                   "unknown loss preset 'arcfase'; expected one of ('arcface', 'cosface', 'c"),
        module_bad("scale<=0 at construction", lambda: nn.MarginCrossEntropy(scale=0.0),
                   ValueError, "scale must be > 0, got 0.0"),
        module_bad("wrong target", lambda: nn.MarginCrossEntropy()(cos, target[:2]),
                   ValueError, "target must have shape [4]"),
    ]


def head_bad_inputs():
    x, _, target = _x_w_target("cpu")
    return [
        module_bad("dim 0", lambda: nn.MarginSoftmaxHead(0, 10), ValueError,
                   "embedding_dim and num_classes must be >= 1, got 0 and 10"),
        module_bad("wrong D", lambda: nn.MarginSoftmaxHead(4, 10)(x, target), ValueError,
                   "embeddings [N, D] and weight [C, D] must share D, got (4, 5) and (10, 4)"),
        module_bad("m1<1 at construction", lambda: nn.MarginSoftmaxHead(5, 10, m1=0.5),
                   ValueError, "m1 must be >= 1.0, got 0.5"),
    ]


MODULE_SPECS = [
    ModuleSpec("MarginCrossEntropy", "margin", margin_module_bad_inputs),
    ModuleSpec("MarginSoftmaxHead", "margin", head_bad_inputs),
]


# ---- the ops themselves ------------------------------------------------------------------------

# The hyperparameters of the kernel-level calls: N = 4 rows, C = 6 classes, D = 8.
KERNEL_MARGIN = dict(scale=16.0, m1=1.0, m2=0.5, m3=0.0)


def _rows(n=4):
    return dict(target=torch.arange(n), row_m2=None, row_m3=None)


def kernel_arguments(op):
    """Valid arguments of this family's ops by schema name (None for another family's op)."""
    if op == "margin_cross_entropy":
        return dict(cos=torch.rand(4, 6) * 2 - 1, **_rows(), **KERNEL_MARGIN, detach_margin=False,
                    label_smoothing=0.0, lse_square_scale=0.0, ignore_index=-100,
                    compute_grad=True)
    if op == "margin_linear_cross_entropy":
        return dict(embeddings=torch.randn(4, 8), weight=torch.randn(6, 8), **_rows(),
                    row_grad=None, **KERNEL_MARGIN, detach_margin=False, label_smoothing=0.0,
                    lse_square_scale=0.0, ignore_index=-100, normalize=True, block_size=0,
                    deterministic=False, compute_grad=True)
    return None


def kernel_value_checks():
    """Wrong values of margin_cross_entropy's and margin_linear_cross_entropy's arguments."""
    return [
        KernelBadInput("margin_cross_entropy", "label_smoothing 1.5",
                       lambda: dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        KernelBadInput("margin_linear_cross_entropy", "D mismatch",
                       lambda: dict(weight=torch.randn(6, 7)), ValueError, "share D"),
        KernelBadInput("margin_linear_cross_entropy", "weight fp64",
                       lambda: dict(weight=torch.randn(6, 8, dtype=torch.float64)), TypeError,
                       "dtype"),
    ]
