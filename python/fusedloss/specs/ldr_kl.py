"""Specs of the LDR-KL family: ldr_kl_loss (logits) and linear_ldr_kl_loss (the output layer
hidden @ weight^T + bias, fused). Both run on the margin kernels (fusedloss/ldr_kl.py), so
their op samples are the margin family's; these samples cover what LDR-KL adds: the
temperature, the margin, the bias column. A per-row lam tensor is a keyword, which the shared
samples keep on the CPU (tests/test_no_host_sync.py moves only the inputs to another
device): the fuzz strategies draw it on the device, and tests/test_ldr_kl.py compares it
with the oracle."""
import torch

import fusedloss
from fusedloss import nn
from ..reference import ldr_kl as reference
from . import _draw
from ._build import (at, bad_inputs, class_loss_option_cases, empty_batch, fuzz_linear_draw,
                     linear_cases, module_bad, not_finite, option, scores_cases)
from . import FuzzCase, ModuleSpec, OpSpec, Sample, generator, on, with_ignored

_LOGITS_BACKENDS = ("cpu", "cuda", "triton")
_LINEAR_BACKENDS = ("cpu", "triton")


def _logits(n, c, dtype=torch.float32, seed=0, spread=3.0):
    return (spread * torch.randn(n, c, generator=generator(seed), dtype=torch.float64)).to(dtype)


def _targets(n, c, seed=1, ignored=()):
    return with_ignored(torch.randint(0, c, (n,), generator=generator(seed)), ignored)


def transposed(t):
    return t.t().contiguous().t()


# ---- ldr_kl_loss -------------------------------------------------------------------------------

def ldr_samples(device):
    """LDRLoss_V1's defaults, small and large lam, margin 0 (KL-regularised DRO without
    margin); N = 1, C = 1; ignored rows and every reduction; strided and
    column-major logits; every dtype."""
    s = lambda id_, n, c, kw, dtype=torch.float32, ignored=(): Sample(  # noqa: E731
        id_, on(device, _logits(n, c, dtype), _targets(n, c, ignored=ignored)), kw)
    return [
        s("defaults 7x33", 7, 33, dict(reduction="none"), ignored=(2,)),
        s("lam 0.1", 6, 29, dict(lam=0.1)),
        s("lam 10 margin 0", 5, 17, dict(lam=10.0, margin=0.0, reduction="sum")),
        s("N=1", 1, 5, dict(lam=0.5)),
        s("C=1", 4, 1, dict(reduction="sum")),
        s("C=130", 5, 130, dict(margin=1.0, lam=2.0)),
        Sample("row-strided", on(device, _logits(5, 80)[:, :37], _targets(5, 37)), dict(lam=0.7)),
        Sample("column-major", on(device, transposed(_logits(6, 31)), _targets(6, 31)),
               dict(margin=0.3)),
        s("every row ignored, sum", 3, 9, dict(reduction="sum"), ignored=(0, 1, 2)),
        s("fp64", 5, 67, dict(lam=0.5), torch.float64, ignored=(0,)),
        s("fp16", 5, 67, {}, torch.float16),
        s("bf16", 5, 67, dict(lam=2.0), torch.bfloat16),
    ]


def ldr_compile_sample(device):
    return Sample("lam 0.5", on(device, _logits(8, 50), _targets(8, 50, ignored=(2,))),
                  dict(lam=0.5))


def lam_cases(n, at_rows):
    """The bad temperatures: a non-positive or NaN float, a tensor of the wrong shape or
    dtype, a tensor with a non-positive value."""
    return [
        option("lam<=0", dict(lam=0.0), ValueError, "lam must be > 0, got 0.0"),
        not_finite("lam"),
        (f"lam tensor [{n + 1}]", at_rows, dict(lam=torch.ones(n + 1)), ValueError,
         f"a lam tensor must have shape [{n}] (one per row), got ({n + 1},)"),
        ("int lam tensor", at_rows, dict(lam=torch.ones(n, dtype=torch.long)), TypeError,
         "a lam tensor must be floating, got torch.int64"),
        ("lam tensor with a 0", at_rows, dict(lam=torch.tensor([1.0] * (n - 1) + [0.0])),
         ValueError, f"every lam must be finite and > 0, got lam[{n - 1}] = 0.0", ("cpu",)),
        not_finite("margin"),
    ]


def _logits_and_target(device):
    return on(device, _logits(4, 7), torch.tensor([0, 1, 2, 3]))


def _cpu_only(*inputs):
    """The good inputs, moved to the CPU, where the lam tensors of lam_cases are."""
    return tuple(t.cpu() for t in inputs)


def ldr_bad_inputs():
    fn = lambda: fusedloss.ldr_kl_loss  # noqa: E731
    return bad_inputs(fn, _logits_and_target, scores_cases("logits") + lam_cases(4, _cpu_only)
                      + class_loss_option_cases("scale") + [
        ("no classes", lambda z, t: (z[:, :0], t), {}, ValueError,
         "logits must have at least one class (C >= 1)"),
    ])


def _fuzz_options(data, n, device):
    lam = _draw.pick(data, [1.0, 0.3, 4.0, "rows"])
    if lam == "rows":
        lam = (0.2 + 3 * torch.rand(n, dtype=torch.float64,
                                    generator=_draw.generator(data))).to(device)
    return dict(lam=lam, margin=_draw.pick(data, [2.0, 0.0, 0.5]),
                reduction=_draw.pick(data, ["mean", "sum", "none"]))


def ldr_fuzz(data, device, triton):
    n = _draw.pick(data, _draw.SMALL_SIZES[:12])
    c = _draw.pick(data, _draw.SMALL_SIZES if triton else _draw.CLASS_SIZES)
    dtype = _draw.pick(data, _draw.DTYPES)
    z = 4 * torch.randn(n, c, dtype=torch.float64, generator=_draw.generator(data))
    z = _draw.strided(z.to(dtype), _draw.flag(data)).to(device).requires_grad_()
    target = _draw.targets(data, n, c).to(device)
    kw = _fuzz_options(data, n, device)
    return FuzzCase(lambda backend: fusedloss.ldr_kl_loss(z, target, backend=backend, **kw),
                    [z], dtype)


def ldr_stress(device):
    g = generator(5)
    z, t = torch.randn(16, 300, generator=g) * 3, torch.randint(0, 300, (16,), generator=g)
    return [Sample("16x300", on(device, z, t), dict(lam=0.5))]


# ---- linear_ldr_kl_loss ------------------------------------------------------------------------

_LINEAR_NAMES = ("loss", "grad hidden", "grad weight", "grad bias")


def _layer(n, c, d, dtype=torch.float32, seed=2, bias=True):
    g = generator(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64) * 2 / d ** 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    return h.to(dtype), w.to(dtype), b.to(dtype) if bias else None


def _linear(id_, device, n, c, d, kw, dtype=torch.float32, bias=True, ignored=()):
    h, w, b = _layer(n, c, d, dtype, bias=bias)
    return Sample(id_, on(device, h, w, _targets(n, c, ignored=ignored), b),
                  kw, _LINEAR_NAMES)


def linear_samples(device):
    """Defaults with a bias; no bias; N = 1, C = 1, D = 1; a block
    size; every reduction and dtype."""
    s = _linear
    return [
        s("defaults 7x33 D=17", device, 7, 33, 17, dict(reduction="none"), ignored=(3,)),
        s("no bias lam 0.5", device, 6, 29, 8, dict(lam=0.5), bias=False),
        s("N=1 C=1 D=1", device, 1, 1, 1, {}),
        s("block 16 sum", device, 5, 70, 16, dict(block_size=16, reduction="sum", lam=2.0)),
        s("fp64", device, 5, 37, 16, dict(lam=0.3), dtype=torch.float64),
        s("bf16", device, 5, 37, 16, {}, dtype=torch.bfloat16),
    ]


def linear_compile_sample(device):
    return _linear("lam 0.5", device, 8, 40, 16, dict(lam=0.5))


def _h_w_target_bias(device):
    h, w, b = _layer(4, 7, 5)
    return on(device, h, w, torch.tensor([0, 1, 2, 3]), b)


def linear_bad_inputs():
    fn = lambda: fusedloss.linear_ldr_kl_loss  # noqa: E731
    return bad_inputs(fn, _h_w_target_bias,
                      linear_cases("hidden", "weight") + lam_cases(4, _cpu_only)
                      + class_loss_option_cases("scale") + [
        ("bias [6]", at(3, lambda b: b[:6]), {}, ValueError,
         "bias must have shape [7] (one per class), got (6,)"),
        ("bias fp64", at(3, lambda b: b.double()), {}, TypeError,
         "bias must have the dtype of hidden, got torch.float64 and torch.float32"),
        ("no classes", lambda h, w, t, b: (h, w[:0], t, None), {}, ValueError,
         "weight must have at least one class (C >= 1)"),
        option("negative block", dict(block_size=-1), ValueError,
               "block_size must be a positive int or None, got -1"),
    ])


def linear_fuzz(data, device, triton):
    n, c, d, dtype, gen, h = fuzz_linear_draw(data)
    h = h.to(device).requires_grad_()
    w = (2 * torch.randn(c, d, dtype=torch.float64, generator=gen) / d ** 0.5).to(dtype)
    w = w.to(device).requires_grad_()
    b = None
    if _draw.flag(data):
        b = torch.randn(c, dtype=torch.float64, generator=gen).to(dtype).to(device)
        b.requires_grad_()
    target = _draw.targets(data, n, c).to(device)
    kw = _fuzz_options(data, n, device)
    return FuzzCase(lambda backend: fusedloss.linear_ldr_kl_loss(h, w, target, bias=b,
                                                             backend=backend, **kw),
                    [t for t in (h, w, b) if t is not None], dtype)


def linear_stress(device):
    h, w, b = _layer(16, 300, 32)
    return [Sample("16x300 D=32", on(device, h, w, _targets(16, 300), b), dict(lam=0.5),
                   _LINEAR_NAMES)]


SPECS = [
    OpSpec("ldr_kl_loss", "ldr_kl", reference.ldr_kl_loss, ops=("margin_cross_entropy",),
           backends=_LOGITS_BACKENDS, samples=ldr_samples, op_samples=lambda device: [],
           compile_sample=ldr_compile_sample, bad_inputs=ldr_bad_inputs, fuzz=ldr_fuzz,
           stress=ldr_stress,
           empty_batch=empty_batch(lambda: fusedloss.ldr_kl_loss, (0, 7))),
    OpSpec("linear_ldr_kl_loss", "ldr_kl", reference.linear_ldr_kl_loss,
           ops=("margin_linear_cross_entropy",), backends=_LINEAR_BACKENDS,
           samples=linear_samples, op_samples=lambda device: [],
           compile_sample=linear_compile_sample, bad_inputs=linear_bad_inputs,
           fuzz=linear_fuzz, stress=linear_stress,
           empty_batch=empty_batch(lambda: fusedloss.linear_ldr_kl_loss, (0, 5), (7, 5))),
]
def loss_module_bad_inputs():
    z, t = _logits_and_target("cpu")
    return [
        module_bad("lam<=0 at construction", lambda: nn.LDRKLLoss(lam=0.0), ValueError,
                   "lam must be > 0, got 0.0"),
        module_bad("tensor lam at construction", lambda: nn.LDRKLLoss(lam=torch.ones(4)),
                   TypeError, "lam must be a float here"),
        module_bad("lam tensor [3] in forward", lambda: nn.LDRKLLoss()(z, t, lam=torch.ones(3)),
                   ValueError, "a lam tensor must have shape [4] (one per row), got (3,)"),
    ]


def linear_module_bad_inputs():
    h, w, t, b = _h_w_target_bias("cpu")
    return [
        module_bad("in_features 0", lambda: nn.LDRKLLinear(0, 7), ValueError,
                   "in_features and num_classes must be >= 1, got 0 and 7"),
        module_bad("nan margin", lambda: nn.LDRKLLinear(5, 7, margin=float("nan")), ValueError,
                   "margin must be a finite number"),
        module_bad("wrong D", lambda: nn.LDRKLLinear(4, 7)(h, t), ValueError,
                   "hidden [N, D] and weight [C, D] must share D, got (4, 5) and (7, 4)"),
    ]


MODULE_SPECS = [ModuleSpec("LDRKLLoss", "ldr_kl", loss_module_bad_inputs),
                ModuleSpec("LDRKLLinear", "ldr_kl", linear_module_bad_inputs)]


def kernel_arguments(op):
    """This family has no op of its own."""
    return None


def kernel_value_checks():
    return []
