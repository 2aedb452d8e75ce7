"""The multi-label margin loss of MLCD ("Multi-label Cluster Discrimination", 2024) on
normalised logits: each row has up to 64 positive classes, separated from the negatives by
two log-sum-exps. The row math is derived in csrc/include/fusedloss/multilabel.h; the oracle
is fusedloss.reference.multilabel. The authors' loss code is not public: this is the loss as
formulated in the docstring below.

Two ops: forward reduces each row to (lse_neg, lse_pos) (multilabel_margin_stats, one read
of cos), the loss softplus(lse_neg) + softplus(lse_pos) is formed here, and backward writes
the gradient from the per-row weights dL/dlse (multilabel_margin_grad, one read of cos and
one write). Unlike the margin ops, whose kernels write the gradient during forward and
scale it in backward (five N x C passes), this moves three N x C arrays; both hold one
N x C buffer, and the same two ops serve a shard of the classes (fusedloss.multilabel_sharded)."""
import torch

from . import _checks
from ._ops import (Op, accumulation_dtype, compiling, reduce_rows, resolve_backend,
                   result_dtype)
from .reference import multilabel as reference

MAX_POSITIVES = 64
_FN = "multilabel_margin_cross_entropy"


def _stats_fake(cos, targets, *hyper):
    return cos.new_empty(cos.shape[0], 2, dtype=accumulation_dtype(cos))


def _grad_fake(cos, targets, coef, *hyper):
    return cos.new_empty(cos.shape)


GRAD_OP = Op("multilabel", "multilabel_margin_grad", fake=_grad_fake)


def _stats_setup_context(ctx, inputs, output):
    cos, targets, *hyper = inputs
    ctx.hyper = tuple(hyper)
    ctx.save_for_backward(cos, targets, output)


def _stats_backward(ctx, grad_stats):
    """d/dcos of sum_i (g_neg_i lse_neg_i + g_pos_i lse_pos_i): the grad op with coef =
    (g_neg, lse_neg, g_pos, lse_pos), on the backend of the forward op."""
    cos, targets, stats = ctx.saved_tensors
    nones = (None,) * (1 + len(ctx.hyper))
    if grad_stats is None:
        return (None,) + nones
    coef = torch.stack((grad_stats[:, 0], stats[:, 0], grad_stats[:, 1], stats[:, 1]), dim=1)
    grad_op = GRAD_OP.triton if ctx.op is STATS_OP.__dict__.get("triton") else GRAD_OP.cpp
    return (grad_op(cos, targets, coef.to(stats.dtype).contiguous(), *ctx.hyper),) + nones


STATS_OP = Op("multilabel", "multilabel_margin_stats", fake=_stats_fake,
              setup_context=_stats_setup_context, backward=_stats_backward)


def softplus_rows(stats: torch.Tensor) -> torch.Tensor:
    """softplus(lse_neg) + softplus(lse_pos) per row, log(1 + exp(x)) = logaddexp(x, 0)."""
    return torch.logaddexp(stats, torch.zeros_like(stats)).sum(dim=1)


def multilabel_margin_cross_entropy(
    cos: torch.Tensor,
    targets: torch.Tensor,
    *,
    scale: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    margin_grad: str = "exact",
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""Multi-label margin loss (MLCD) over cosine logits.

    ``cos [N, C]`` holds cosines between normalised embeddings and class centres (fp32, fp64,
    fp16 or bf16); ``targets [N, K]`` (integer, ``1 <= K <= 64``) lists each row's positive
    classes, entries equal to ``ignore_index`` being padding and a class listed twice counting
    once. With ``P_i`` the positives of row i and ``psi(c) = cos(m1 * arccos(c) + m2) - m3``
    (the margin transform of :func:`fusedloss.margin_cross_entropy`, continued past pi the
    same way; no arccos when ``m1 = 1, m2 = 0``), the row loss is

        ``log(1 + sum_{j not in P_i} exp(scale * cos_ij))
        + log(1 + sum_{p in P_i} exp(-scale * psi(cos_ip)))``.

    The negatives' sum skips the positive columns; it is never formed as all minus positives,
    which would cancel catastrophically when the positives dominate (scale 64). A row whose
    targets are all padding is ignored (loss 0, left out of the mean). ``margin_grad``,
    ``reduction`` and empty batches as in margin_cross_entropy. The loss has the dtype of
    ``cos``, accumulated in fp32 (fp64 for fp64). Forward keeps two statistics per row and
    backward writes the gradient from them: forward plus backward read ``cos`` twice, write
    one ``N x C`` gradient and hold no other ``N x C`` buffer. ``backend``: "auto",
    "reference", "cpu" or "triton" (no CUDA C++ kernel; on CUDA tensors "auto" takes Triton).
    """
    check_inputs(_FN, "cos", cos, targets)
    check_options(_FN, scale, m1, m2, m3, margin_grad, ignore_index, reduction)
    backend = resolve_backend(backend, cos.device, STATS_OP.name)
    target_values(_FN, targets, cos.shape[1], ignore_index)
    if backend == "reference":
        return reference.multilabel_margin_cross_entropy(
            cos, targets, scale=scale, m1=m1, m2=m2, m3=m3, margin_grad=margin_grad,
            ignore_index=ignore_index, reduction=reduction).to(result_dtype(cos))
    targets = targets.long()
    stats = STATS_OP.for_backend(backend)(
        cos, targets, float(scale), float(m1), float(m2), float(m3), margin_grad == "detached",
        0, cos.shape[1], ignore_index)
    valid = has_positive(targets, ignore_index)
    rows = torch.where(valid, softplus_rows(stats), stats.new_zeros(()))
    return reduce_rows(rows, valid, reduction, result_dtype(cos))


def has_positive(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """[N] bool: the row lists at least one positive (else it is ignored)."""
    return (targets != ignore_index).any(dim=1)


def check_targets(fn: str, targets, n: int) -> None:
    """targets [n, K] of integer class indices, 1 <= K <= 64."""
    if not torch.is_tensor(targets):
        raise TypeError(f"{fn}: targets must be a tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{fn}: targets must hold integer class indices, got {targets.dtype}")
    if targets.dim() != 2 or targets.shape[0] != n:
        raise ValueError(f"{fn}: targets must have shape [{n}, K] (the positive classes of each "
                         f"row, padded with ignore_index), got {tuple(targets.shape)}")
    if not 1 <= targets.shape[1] <= MAX_POSITIVES:
        raise ValueError(f"{fn}: targets must have 1 to {MAX_POSITIVES} columns (positives per "
                         f"row), got K = {targets.shape[1]}")


def check_inputs(fn: str, name: str, cos, targets) -> None:
    """check_cos_targets, and cos has at least one class."""
    check_cos_targets(fn, name, cos, targets)
    if cos.shape[1] == 0:
        raise ValueError(f"{fn}: {name} must have at least one class (C >= 1), got shape "
                         f"{tuple(cos.shape)}")


def check_cos_targets(fn: str, name: str, cos, targets) -> None:
    """cos [N, C] floating (called `name` in errors; C may be 0, as in an empty shard) and
    targets [N, K] (check_targets), on one device."""
    _checks.floating_tensor(fn, name, cos, ndim=2)
    check_targets(fn, targets, cos.shape[0])
    _checks.same_device(fn, **{name: cos, "targets": targets})


def check_linear_inputs(fn: str, embeddings, weight_name: str, weight, classes: str,
                        targets) -> None:
    """embeddings [N, D] and weight [classes, D] (called `weight_name` in errors) floating, of
    one dtype and one D; targets [N, K] (check_targets); all on one device."""
    _checks.floating_tensor(fn, "embeddings", embeddings, ndim=2)
    _checks.floating_tensor(fn, weight_name, weight, ndim=2)
    check_targets(fn, targets, embeddings.shape[0])
    _checks.same_device(fn, **{"embeddings": embeddings, weight_name: weight,
                               "targets": targets})
    if weight.dtype != embeddings.dtype:
        raise TypeError(f"{fn}: embeddings and {weight_name} must share a dtype, got "
                        f"{embeddings.dtype} and {weight.dtype}")
    if weight.shape[1] != embeddings.shape[1]:
        raise ValueError(f"{fn}: embeddings [N, D] and {weight_name} [{classes}, D] must share "
                         f"D, got {tuple(embeddings.shape)} and {tuple(weight.shape)}")


def check_block_size(fn: str, block_size) -> None:
    """block_size is None or a positive int (rows of cosines per block)."""
    if block_size is not None:
        _checks.integer(fn, block_size=block_size)
        if block_size <= 0:
            raise ValueError(f"{fn}: block_size must be a positive int or None, got "
                             f"{block_size}")


def check_options(fn, scale, m1, m2, m3, margin_grad, ignore_index, reduction) -> None:
    _checks.positive(fn, scale=scale)
    _checks.at_least(fn, 1.0, m1=m1)
    _checks.finite(fn, m2=m2, m3=m3)
    _checks.choice(fn, "margin_grad", margin_grad, ("exact", "detached"))
    _checks.integer(fn, ignore_index=ignore_index)
    _checks.choice(fn, "reduction", reduction, _checks.REDUCTIONS)


def target_values(fn: str, targets: torch.Tensor, num_classes: int, ignore_index: int,
                  class_start: int = 0) -> None:
    """Every entry of targets is in [class_start, class_start + C) or is ignore_index: read
    on the CPU (a ValueError naming the entry), queued on the device elsewhere, as
    _checks.target_values."""
    if compiling() or targets.numel() == 0:
        return
    end = class_start + num_classes
    bad = (targets != ignore_index) & ((targets < class_start) | (targets >= end))
    if targets.device.type != "cpu":
        torch._assert_async(~bad.any(), f"{fn}: a target is outside [{class_start}, {end}) and "
                                        f"is not ignore_index ({ignore_index})")
        return
    if bool(bad.any()):
        i, k = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{fn}: targets[{i}, {k}] = {int(targets[i, k])} is outside "
                         f"[{class_start}, {end}) and is not ignore_index ({ignore_index})")
