"""Specs of the spherical family: spherical_z_loss (logits) and linear_spherical_z_loss (the
output layer o = hidden @ weight^T + bias, factored), and the modules SphericalZLoss,
SphericalLinear and FactoredSphericalLinear.

Per row, mu = mean(o), sigma = max(std(o), 1e-12), z_c = (o_c - mu) / sigma and the loss is
softplus(a (b - z_c)) / a. With C = 2 the standardised outputs are +-1 whatever the logits, so
the loss is constant and its gradient is 0 in exact arithmetic, rounding noise of size
eps / sigma otherwise: the C = 2 samples keep sigma ~ 1 (noise far below the absolute floor of
the comparison), and the fuzz draws C >= 3."""
import torch

import fusedloss
from fusedloss import nn
from ..reference import spherical as reference
from . import _draw
from ._build import (bad_inputs, class_loss_option_cases, empty_batch, linear_cases, module_bad,
                     not_finite, option, row_op_spec, scores_cases)
from . import (FuzzCase, KernelBadInput, ModuleSpec, OpSpec, Sample, generator, on,
               with_ignored)
from .margin import stress_inputs


def _logits(n, c, dtype=torch.float32, seed=0, mean=0.0, spread=1.0):
    """mean + spread * N(0, 1), drawn in fp64 and rounded to `dtype`."""
    x = torch.randn(n, c, generator=generator(seed), dtype=torch.float64)
    return (mean + spread * x).to(dtype)


def class_targets(n, c, seed=1, ignored=(), ignore_index=-100):
    return with_ignored(torch.randint(0, c, (n,), generator=generator(seed)), ignored,
                        ignore_index)


def transposed(t):
    return t.t().contiguous().t()


# ---- spherical_z_loss ------------------------------------------------------------------------

HYPER = {"a=1 b=0": dict(a=1.0, b=0.0), "sharp a=4 b=1.5": dict(a=4.0, b=1.5),
         "soft a=0.25 b=-1": dict(a=0.25, b=-1.0)}


def spherical_samples(device):
    """Each (a, b) on a prime shape with ignored rows; N = 1, C = 2 (the smallest legal C),
    C = 130 (past a block of 128); a mean 100 times the spread (the compensated variance);
    strided, column-strided and column-major logits; every reduction; every row ignored; a
    custom ignore_index and int32 targets; every dtype."""
    samples = [Sample(f"{name} 7x33", on(device, _logits(7, 33, spread=2.0),
                                         class_targets(7, 33, ignored=(2, 5))),
                      dict(kw, reduction="none"))
               for name, kw in HYPER.items()]
    samples += [
        Sample("N=1", on(device, _logits(1, 5), class_targets(1, 5)), dict(a=2.0, b=0.5)),
        Sample("C=2", on(device, _logits(4, 2), class_targets(4, 2)), dict(reduction="none")),
        Sample("N=1 C=2 fp64", on(device, _logits(1, 2, torch.float64), class_targets(1, 2)), {}),
        Sample("C=130 sum", on(device, _logits(5, 130, spread=3.0), class_targets(5, 130)),
               dict(reduction="sum")),
        Sample("mean 100 x spread", on(device, _logits(6, 41, mean=100.0), class_targets(6, 41)),
               dict(a=2.0, b=1.0, reduction="none")),
        Sample("row-strided", on(device, _logits(5, 80)[:, :37], class_targets(5, 37)),
               dict(a=2.0)),
        Sample("column-strided", on(device, _logits(6, 62)[:, ::2], class_targets(6, 31)),
               dict(b=0.5)),
        Sample("column-major", on(device, transposed(_logits(6, 31)), class_targets(6, 31)),
               dict(a=0.5, b=1.0, reduction="sum")),
        Sample("every row ignored, sum", on(device, _logits(3, 9), class_targets(3, 9,
                                                                         ignored=(0, 1, 2))),
               dict(reduction="sum")),
        Sample("ignore_index=3, int32 target",
               on(device, _logits(6, 17), class_targets(6, 17, ignored=(1,), ignore_index=3)
                  .to(torch.int32)), dict(ignore_index=3, reduction="none")),
    ]
    samples += [Sample(f"{dtype}", on(device, _logits(5, 67, dtype, mean=0.3, spread=2.0),
                                      class_targets(5, 67, ignored=(0,))), dict(a=2.0, b=0.5))
                for dtype in (torch.float64, torch.float16, torch.bfloat16)]
    return samples


def spherical_op_samples(device):
    """Arguments of fusedloss::spherical_z_loss covering its branches: every dtype, with and
    without the fused gradient, an ignored row, a row stride of 40."""
    samples = []
    for k, (dtype, grad, a, b) in enumerate([
            (torch.float32, True, 1.0, 0.0), (torch.float32, False, 2.0, 0.5),
            (torch.float64, True, 0.5, -1.0), (torch.bfloat16, True, 1.0, 0.0),
            (torch.float16, True, 3.0, 1.0)]):
        logits = _logits(5, 33, dtype, seed=10 + k, mean=1.0, spread=2.0)
        target = class_targets(5, 33, seed=20 + k, ignored=(0,))
        logits, target = on(device, logits, target)
        samples.append(("spherical_z_loss", (logits.requires_grad_(grad), target, a, b, -100,
                                             grad)))
    wide, target = on(device, _logits(6, 40, seed=16)[:, :33], class_targets(6, 33, seed=26))
    samples.append(("spherical_z_loss", (wide.requires_grad_(), target, 1.0, 0.0, -100, True)))
    return samples


def spherical_compile_sample(device):
    return Sample("a=2 b=0.5, ignored row", on(device, _logits(8, 50, mean=3.0),
                                               class_targets(8, 50, ignored=(2,))),
                  dict(a=2.0, b=0.5))


def _logits_and_target(device):
    return on(device, _logits(4, 7), torch.tensor([0, 1, 2, 3]))


def spherical_option_cases(unknown: str):
    """The bad keywords that both spherical Z-loss functions refuse (spherical.check_options),
    and `unknown`, a keyword the function does not take."""
    return [
        option("a<=0", dict(a=0.0), ValueError, "a must be > 0, got 0.0"),
        not_finite("a"),
        not_finite("b", float("inf")),
    ] + class_loss_option_cases(unknown)


def spherical_bad_inputs():
    fn = lambda: fusedloss.spherical_z_loss  # noqa: E731
    return bad_inputs(fn, _logits_and_target, scores_cases("logits") + [
        ("C=1", lambda s, t: (s[:, :1], t * 0), {}, ValueError,
         "needs C >= 2 classes (the spread of one output is zero by definition), got logits of "
         "shape (4, 1)"),
    ] + spherical_option_cases("scale"))


def spherical_fuzz(data, device, triton):
    """Logits of any spread (1e-2 .. 30) and offset, any dtype, strided or not, ignored rows.
    C >= 3: with two classes the standardised outputs are always +-1, the loss is constant
    and its gradient is rounding noise around 0 of size eps / sigma, which no relative
    comparison can judge (the C = 2 samples and test_spherical check that case)."""
    n = _draw.pick(data, _draw.SMALL_SIZES[:12])
    c = _draw.pick(data, [s for s in (_draw.SMALL_SIZES if triton else _draw.CLASS_SIZES)
                          if s >= 3])
    dtype = _draw.pick(data, _draw.DTYPES)
    spread = _draw.pick(data, [1e-2, 1.0, 30.0])
    offset = _draw.pick(data, [0.0, 5.0])
    logits = torch.randn(n, c, dtype=torch.float64, generator=_draw.generator(data))
    logits = (logits * spread + offset).to(dtype)
    logits = _draw.strided(logits, _draw.flag(data)).to(device).requires_grad_()
    target = _draw.targets(data, n, c).to(device)
    kw = dict(a=_draw.pick(data, [1.0, 0.5]), b=_draw.pick(data, [0.0, 0.1]),
              reduction=_draw.pick(data, ["mean", "sum", "none"]))
    return FuzzCase(lambda backend: fusedloss.spherical_z_loss(logits, target, backend=backend,
                                                               **kw),
                    [logits], dtype)


def spherical_stress(device):
    cos, _, _, target = stress_inputs(device)
    return [Sample("16x300", (cos, target), {})]


def spherical_memcheck():
    """C = 1031 (not a multiple of any block), every other column (strided rows), an ignored
    row; fp32 and bf16."""
    logits = _logits(9, 2 * 1031, seed=7)[:, ::2]
    target = class_targets(9, 1031, seed=8, ignored=(3,))
    return [Sample(f"9x1031 strided {dtype}", (logits.to(dtype), target),
                   dict(reduction="none"))
            for dtype in (torch.float32, torch.bfloat16)]


# ---- linear_spherical_z_loss -------------------------------------------------------------------

_LINEAR_NAMES = ("loss", "grad hidden", "grad weight", "grad bias")


def _layer(n, c, d, dtype=torch.float32, seed=2, bias=True, mean=0.0):
    """(hidden [N, d], weight [C, d], bias [C] or None); `mean` shifts every output by about
    mean * d (a common component of the rows of W), the case the centring is for."""
    g = generator(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64) / d ** 0.5 + mean
    q = torch.randn(c, generator=g, dtype=torch.float64) if bias else None
    return h.to(dtype), w.to(dtype), None if q is None else q.to(dtype)


def _linear_sample(id_, device, n, c, d, kwargs, dtype=torch.float32, bias=True, ignored=(),
                   alter=None, **layer):
    h, w, q = _layer(n, c, d, dtype, bias=bias, **layer)
    if alter is not None:
        h, w = alter(h, w)
    target = class_targets(n, c, ignored=ignored)
    return Sample(id_, on(device, h, w, target, q), kwargs, _LINEAR_NAMES)


def linear_samples(device):
    """Each (a, b), with and without a bias, on a prime shape with ignored rows; N = 1, C = 2,
    d = 1; outputs whose mean is large against their spread; column-major hidden, strided
    weight; every reduction; every dtype."""
    s = _linear_sample
    samples = [s(f"{name} 7x33 d=17", device, 7, 33, 17, dict(kw, reduction="none"),
                 ignored=(3,))
               for name, kw in HYPER.items()]
    samples += [
        s("no bias", device, 6, 29, 8, dict(a=2.0, b=0.5), bias=False),
        s("N=1", device, 1, 11, 5, {}),
        s("C=2", device, 5, 2, 4, dict(reduction="none"), dtype=torch.float64),
        s("d=1", device, 6, 13, 1, dict(reduction="sum")),
        s("mean 30 x spread", device, 6, 41, 12, dict(reduction="none"), mean=3.0),
        s("column-major hidden, strided weight", device, 6, 19, 12, dict(b=1.0),
          alter=lambda h, w: (transposed(h), torch.cat([w, w], 1)[:, :12])),
        s("C=130, every row ignored but one", device, 5, 130, 9, dict(a=0.5),
          ignored=(0, 1, 3, 4)),
    ]
    samples += [s(f"{dtype}", device, 5, 37, 16, dict(a=2.0, b=0.5), dtype=dtype, ignored=(2,))
                for dtype in (torch.float64, torch.float16, torch.bfloat16)]
    return samples


def linear_compile_sample(device):
    h, w, q = _layer(8, 40, 16)
    return Sample("bias, a=2 b=0.5", on(device, h, w, class_targets(8, 40, ignored=(1,)), q),
                  dict(a=2.0, b=0.5), _LINEAR_NAMES)


def _hidden_weight_target(device):
    h, w, _ = _layer(4, 7, 5)
    return on(device, h, w, torch.tensor([0, 1, 2, 3]))


def _with_bias(make_bias):
    """The alter that appends a bias, make_bias(device), to (hidden, weight, target)."""
    return lambda h, w, t: (h, w, t, make_bias(h.device))


def linear_bad_inputs():
    fn = lambda: fusedloss.linear_spherical_z_loss  # noqa: E731
    return bad_inputs(fn, _hidden_weight_target, linear_cases("hidden", "weight", dim="d") + [
        ("C=1", lambda h, w, t: (h, w[:1], torch.zeros_like(t)), {}, ValueError,
         "needs at least 2 classes (weight [C, d] with C >= 2), got C = 1"),
        ("bias shape", _with_bias(lambda d: torch.rand(3, device=d)), {}, ValueError,
         "bias must have shape [C] = [7] (one entry per row of weight), got (3,)"),
        ("2-D bias", _with_bias(lambda d: torch.rand(7, 1, device=d)), {}, ValueError,
         "bias must be 1-D, got shape (7, 1)"),
        ("bias dtype", _with_bias(lambda d: torch.rand(7, dtype=torch.float64, device=d)), {},
         TypeError, "hidden and bias must share a dtype, got torch.float32 and torch.float64"),
    ] + spherical_option_cases("block_size"))


def linear_fuzz(data, device, triton):
    """Shapes around the blocks, with or without a bias, a common component of the rows of W
    (outputs whose mean is large against their spread), any dtype, strided hidden."""
    n = _draw.pick(data, _draw.SMALL_SIZES[:12])
    c = _draw.pick(data, [s for s in _draw.SMALL_SIZES if s >= 3])
    d = _draw.pick(data, [1, 3, 16, 17, 33])
    dtype = _draw.pick(data, _draw.DTYPES)
    mean = _draw.pick(data, [0.0, 3.0])
    gen = _draw.generator(data)
    h = torch.randn(n, d, dtype=torch.float64, generator=gen).to(dtype)
    h = _draw.strided(h, _draw.flag(data)).to(device).requires_grad_()
    w = (torch.randn(c, d, dtype=torch.float64, generator=gen) / d ** 0.5 + mean).to(dtype)
    w = w.to(device).requires_grad_()
    leaves = [h, w]
    q = None
    if _draw.flag(data):
        q = torch.randn(c, dtype=torch.float64, generator=gen).to(dtype).to(device)
        q.requires_grad_()
        leaves.append(q)
    target = _draw.targets(data, n, c).to(device)
    kw = dict(a=_draw.pick(data, [1.0, 0.5]), b=_draw.pick(data, [0.0, 0.1]),
              reduction=_draw.pick(data, ["mean", "sum", "none"]))
    return FuzzCase(lambda backend: fusedloss.linear_spherical_z_loss(h, w, target, q,
                                                                  backend=backend, **kw),
                    leaves, dtype)


def linear_stress(device):
    _, x, w, target = stress_inputs(device)
    return [Sample("16x300 d=32, no bias", (x, w, target), {}, _LINEAR_NAMES[:3])]


SPECS = [
    row_op_spec("spherical_z_loss", "spherical", reference.spherical_z_loss,
                samples=spherical_samples, op_samples=spherical_op_samples,
                compile_sample=spherical_compile_sample, bad_inputs=spherical_bad_inputs,
                fuzz=spherical_fuzz, stress=spherical_stress, memcheck=spherical_memcheck),
    # No op: "cpu" and "cuda" run the same factored torch implementation (matrix products),
    # insisting on the tensors' device; there is no Triton kernel (backend="triton" raises).
    OpSpec("linear_spherical_z_loss", "spherical", reference.linear_spherical_z_loss,
           ops=(), backends=("cpu", "cuda"),
           samples=linear_samples, op_samples=lambda device: [],
           compile_sample=linear_compile_sample, bad_inputs=linear_bad_inputs,
           fuzz=linear_fuzz, stress=linear_stress,
           empty_batch=empty_batch(lambda: fusedloss.linear_spherical_z_loss, (0, 5), (7, 5))),
]


# ---- modules -----------------------------------------------------------------------------------

def z_loss_module_bad_inputs():
    """Hyperparameters are checked at construction or at the first forward (either passes:
    each such case constructs and forwards), bad calls at forward."""
    logits, target = _logits_and_target("cpu")
    return [
        module_bad("a<0", lambda: nn.SphericalZLoss(a=-1.0)(logits, target), ValueError,
                   "a must be > 0, got -1.0"),
        module_bad("nan b", lambda: nn.SphericalZLoss(b=float("nan"))(logits, target),
                   ValueError, "b must be a finite number, got nan"),
        module_bad("unknown reduction",
                   lambda: nn.SphericalZLoss(reduction="avg")(logits, target), ValueError,
                   "unknown reduction 'avg'"),
        module_bad("wrong target", lambda: nn.SphericalZLoss()(logits, target[:2]),
                   ValueError, "target must have shape [4]"),
        module_bad("C=1", lambda: nn.SphericalZLoss()(logits[:, :1], target * 0),
                   ValueError, "needs C >= 2 classes"),
    ]


def linear_module_bad_inputs():
    h, _, target = _hidden_weight_target("cpu")
    return [
        module_bad("wrong D", lambda: nn.SphericalLinear(6, 10)(h, target), ValueError,
                   "hidden [N, d] and weight [C, d] must share d, got (4, 5) and (10, 6)"),
        module_bad("a<=0", lambda: nn.SphericalLinear(5, 10, a=0.0)(h, target), ValueError,
                   "a must be > 0, got 0.0"),
        module_bad("nan b", lambda: nn.SphericalLinear(5, 10, b=float("nan"))(h, target),
                   ValueError, "b must be a finite number, got nan"),
        module_bad("wrong target", lambda: nn.SphericalLinear(5, 10)(h, target[:3]),
                   ValueError, "target must have shape [4]"),
        module_bad("target out of range",
                   lambda: nn.SphericalLinear(5, 3)(h, target), ValueError,
                   "target[3] = 3 is outside [0, 3)"),
    ]


def factored_module_bad_inputs():
    h, _, target = _hidden_weight_target("cpu")
    return [
        module_bad("lr<0", lambda: nn.FactoredSphericalLinear(5, 10, lr=-0.1), ValueError,
                   "lr must be >= 0.0, got -0.1"),
        module_bad("one class", lambda: nn.FactoredSphericalLinear(5, 1, lr=0.1), ValueError,
                   "num_classes >= 2"),
        module_bad("reduction none",
                   lambda: nn.FactoredSphericalLinear(5, 10, lr=0.1, reduction="none"),
                   ValueError, "reduction must be 'mean' or 'sum', got 'none'"),
        module_bad("a<=0", lambda: nn.FactoredSphericalLinear(5, 10, lr=0.1, a=0.0),
                   ValueError, "a must be > 0, got 0.0"),
        module_bad("stabilize_every 0",
                   lambda: nn.FactoredSphericalLinear(5, 10, lr=0.1, stabilize_every=0),
                   ValueError, "stabilize_every must be >= 1, got 0"),
        module_bad("wrong D", lambda: nn.FactoredSphericalLinear(6, 10, lr=0.1)(h, target),
                   ValueError, "hidden must be [N, 6], got (4, 5)"),
        module_bad("float target",
                   lambda: nn.FactoredSphericalLinear(5, 10, lr=0.1)(h, target.float()),
                   ValueError, "target must be an integer tensor [N]"),
        module_bad("target out of range",
                   lambda: nn.FactoredSphericalLinear(5, 3, lr=0.1)(h, target), ValueError,
                   "target values must lie in [0, 3)"),
    ]


MODULE_SPECS = [
    ModuleSpec("SphericalZLoss", "spherical", z_loss_module_bad_inputs),
    ModuleSpec("SphericalLinear", "spherical", linear_module_bad_inputs),
    ModuleSpec("FactoredSphericalLinear", "spherical", factored_module_bad_inputs),
]


# ---- the ops themselves ------------------------------------------------------------------------

def kernel_arguments(op):
    """Valid arguments of spherical_z_loss by schema name (None for another family's op)."""
    if op != "spherical_z_loss":
        return None
    return dict(logits=torch.randn(4, 6), target=torch.arange(4), a=1.0, b=0.0,
                ignore_index=-100, compute_grad=True)


def kernel_value_checks():
    """spherical_z_loss needs two classes at least."""
    return [KernelBadInput("spherical_z_loss", "C = 1", lambda: dict(logits=torch.randn(4, 1)),
                           ValueError, "C >= 2")]
