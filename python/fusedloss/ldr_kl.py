"""LDR-KL (label-distributionally robust loss, KL regulariser) on logits and fused with the
output layer, as a margin softmax cross-entropy in disguise: no kernel of its own.

With logits z, target y, margin c and temperature lam,

    L = lam * log((1/C) sum_k exp((z_k - z_y + c [k != y]) / lam))
      = lam * ( log sum_k exp(z'_k) - z'_y ) - lam * log C,
        z'_k = z_k / lam (k != y),   z'_y = (z_y - c) / lam,

and the bracket is the row cross-entropy of fusedloss.margin_cross_entropy with
scale = 1 / lam and the CosFace margin m3 = c (m1 = 1, m2 = 0: no arccos). Its gradient:

    dL/dz_k = lam * dCE/dz'_k * dz'_k/dz_k = dCE/dz'_k = softmax(z')_k - [k = y],

so the margin kernels' fused gradient, scaled by lam * (1 / lam) = 1, is the gradient of L.
A per-row lam_i (ALDR-KL) cannot be the kernels' scalar scale, so the logits are divided by
lam_i (one N x C temporary on logits, and one division of the gradient in backward) and
the margin becomes the per-row m3 = c / lam_i, which the margin kernels take as ElasticFace
does (row_m3). On the fused linear form the division is of the hidden rows instead:
(h_i W^T + b) / lam_i = [h_i, 1] / lam_i . [W, b]^T, O(N D), never N x C.
"""
import math
from typing import Optional, Union

import torch

from . import _checks
from . import margin as margin_family
from . import margin_linear
from ._ops import accumulation_dtype, compiling, reduce_rows, resolve_backend, result_dtype
from .reference import ldr_kl as reference

Lam = Union[float, torch.Tensor]


def ldr_kl_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    lam: Lam = 1.0,
    margin: float = 2.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""LDR-KL loss of Zhu, Ying and Yang (ICML 2023), defaults of the authors' ``LDRLoss_V1``.

    ``logits [N, C]`` (fp32, fp64, fp16 or bf16), ``target [N]`` class indices. Row loss

        ``lam_i * log((1/C) * sum_k exp((z_k - z_y + margin * [k != y]) / lam_i))``

    ``lam``: a positive float, or a tensor ``[N]`` of positive per-row temperatures (the
    adaptive ALDR-KL, driven from outside; no gradient flows into it). ``margin``: a finite
    float. ``ignore_index`` and ``reduction`` as in ``F.cross_entropy`` (an empty batch gives
    0 for "sum" and NaN for "mean"). The authors' optional logit transform
    ``softplus(z) / mean(softplus(z))`` is the caller's preprocessing. Computed as the margin
    cross-entropy with ``scale = 1 / lam`` and ``m3 = margin`` (see fusedloss/ldr_kl.py); a
    tensor ``lam`` costs one ``N x C`` temporary ``logits / lam``. ``backend``: "auto",
    "reference", "cpu", "cuda" or "triton".
    """
    fn = "ldr_kl_loss"
    _checks.rows_and_target(fn, "logits", logits, target)
    if logits.shape[1] == 0:
        raise ValueError(f"{fn}: logits must have at least one class (C >= 1), got shape "
                         f"{tuple(logits.shape)}")
    check_options(fn, lam, margin, ignore_index, reduction, logits)
    backend = resolve_backend(backend, logits.device, margin_family.OP.name)
    _checks.target_values(fn, target, logits.shape[1], ignore_index)
    if backend == "reference":
        return reference.ldr_kl_loss(logits, target, lam=lam, margin=margin,
                                     ignore_index=ignore_index,
                                     reduction=reduction).to(result_dtype(logits))
    acc = accumulation_dtype(logits)
    scale, row_m3, m3, lam_rows = _as_margin(lam, margin, acc)
    if row_m3 is not None:
        logits = logits / lam_rows[:, None].to(logits.dtype)
    opts = margin_family.MarginOptions(scale=scale, m3=m3, ignore_index=ignore_index)
    target = target.long()
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    ce, _ = margin_family.OP.for_backend(backend)(logits, target, None, row_m3,
                                                  *opts.kernel_args(), compute_grad)
    return _reduce(ce, lam_rows, target, logits.shape[1], ignore_index, reduction,
                   result_dtype(logits))


def linear_ldr_kl_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    lam: Lam = 1.0,
    margin: float = 2.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    block_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`fusedloss.ldr_kl_loss` of the logits ``hidden @ weight.T + bias`` without
    storing the ``N x C`` matrix, on the kernels of
    :func:`fusedloss.linear_margin_cross_entropy` (``normalize=False``).

    ``hidden [N, D]``, ``weight [C, D]``, ``bias [C]`` or None, one floating dtype. A bias
    is appended as a column of the weight (a ``C x (D + 1)`` copy per call, O(C D)); a
    tensor ``lam`` divides the hidden rows (O(N D)). ``block_size``: the tiling block, as
    in linear_margin_cross_entropy.
    """
    fn = "linear_ldr_kl_loss"
    _checks.embeddings_and_weight(fn, hidden, weight, target, name="hidden")
    if weight.shape[0] == 0:
        raise ValueError(f"{fn}: weight must have at least one class (C >= 1)")
    if bias is not None:
        _checks.floating_tensor(fn, "bias", bias, ndim=1)
        _checks.same_device(fn, hidden=hidden, bias=bias)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{fn}: bias must have the dtype of hidden, got {bias.dtype} and "
                            f"{hidden.dtype}")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{fn}: bias must have shape [{weight.shape[0]}] (one per class), "
                             f"got {tuple(bias.shape)}")
    margin_linear.check_block_size(fn, block_size)
    check_options(fn, lam, margin, ignore_index, reduction, hidden)
    backend = resolve_backend(backend, hidden.device, margin_linear.OP.name)
    _checks.target_values(fn, target, weight.shape[0], ignore_index)
    if backend == "reference":
        return reference.linear_ldr_kl_loss(hidden, weight, target, bias=bias, lam=lam,
                                            margin=margin, ignore_index=ignore_index,
                                            reduction=reduction).to(result_dtype(hidden))
    acc = accumulation_dtype(hidden)
    scale, row_m3, m3, lam_rows = _as_margin(lam, margin, acc)
    x, w = hidden, weight
    if bias is not None:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        w = torch.cat([w, bias[:, None]], dim=1)
    if row_m3 is not None:
        x = x / lam_rows[:, None].to(x.dtype)
    opts = margin_family.MarginOptions(scale=scale, m3=m3, ignore_index=ignore_index)
    target = target.long()
    compute_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    ce, _, _ = margin_linear.OP.for_backend(backend)(
        x, w, target, None, row_m3, None, *opts.kernel_args(), False,
        margin_linear.kernel_block_size(block_size), False, compute_grad)
    return _reduce(ce, lam_rows, target, weight.shape[0], ignore_index, reduction,
                   result_dtype(hidden))


def check_options(fn: str, lam, margin, ignore_index, reduction, rows: torch.Tensor) -> None:
    """lam a positive float or a floating tensor [N] of positive values on the device of
    `rows` (None: a module's construction, where lam is a float); margin finite; ignore_index
    an int; reduction known."""
    if torch.is_tensor(lam) and rows is not None:
        n = rows.shape[0]
        if not lam.dtype.is_floating_point:
            raise TypeError(f"{fn}: a lam tensor must be floating, got {lam.dtype}")
        if lam.dim() != 1 or lam.shape[0] != n:
            raise ValueError(f"{fn}: a lam tensor must have shape [{n}] (one per row), got "
                             f"{tuple(lam.shape)}")
        _checks.same_device(fn, **{"lam": lam, "target rows": rows})
        _check_positive_values(fn, lam.detach())
    else:
        _checks.positive(fn, lam=lam)
    _checks.finite(fn, margin=margin)
    _checks.integer(fn, ignore_index=ignore_index)
    _checks.choice(fn, "reduction", reduction, _checks.REDUCTIONS)


def _check_positive_values(fn, lam):
    """Every lam_i > 0 and finite: read on the CPU, asserted on the device elsewhere (no host
    sync), as _checks.target_values does."""
    if compiling() or lam.numel() == 0:
        return
    bad = ~(torch.isfinite(lam) & (lam > 0))
    if lam.device.type != "cpu":
        torch._assert_async(~bad.any(), f"{fn}: every lam must be finite and > 0")
        return
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{fn}: every lam must be finite and > 0, got lam[{row}] = "
                         f"{float(lam[row])}")


def _as_margin(lam, margin, acc):
    """(scale, row_m3 or None, m3, lam): the margin keywords of the LDR-KL row."""
    if torch.is_tensor(lam):
        lam = lam.detach().to(acc)
        return 1.0, (margin / lam).contiguous(), 0.0, lam
    return 1.0 / lam, None, float(margin), lam


def _reduce(ce, lam, target, num_classes, ignore_index, reduction, dtype):
    """lam * (ce - log C) on the rows not ignored, reduced."""
    valid = target != ignore_index
    rows = torch.where(valid, lam * (ce - math.log(num_classes)), torch.zeros_like(ce))
    return reduce_rows(rows, valid, reduction, dtype)
