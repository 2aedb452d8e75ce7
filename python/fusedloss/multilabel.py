"""The multi-label margin loss of MLCD ("Multi-label Cluster Discrimination", 2024) on
normalised logits: each row has up to 64 positive classes, separated from the negatives by
two log-sum-exps. The row math is derived in csrc/include/fusedloss/multilabel.h; the oracle
is fusedloss.reference.multilabel. The authors' loss code is not public: this is the loss as
formulated in the docstring below."""
import torch

from . import _checks
from ._ops import compiling, reduce_rows, resolve_backend, result_dtype, row_grad_op
from .reference import multilabel as reference

MAX_POSITIVES = 64
_FN = "multilabel_margin_cross_entropy"
# fusedloss::multilabel_margin_cross_entropy(cos, targets, scale, m1, m2, m3, detach_margin,
# ignore_index, compute_grad)
OP = row_grad_op("multilabel", _FN, num_tensors=2)


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
    ``cos``, accumulated in fp32 (fp64 for fp64). The kernels write the gradient during the
    forward pass: forward plus backward hold one ``N x C`` buffer. ``backend``: "auto",
    "reference", "cpu" or "triton" (no CUDA C++ kernel; on CUDA tensors "auto" takes Triton).
    """
    check_inputs(_FN, "cos", cos, targets)
    check_options(_FN, scale, m1, m2, m3, margin_grad, ignore_index, reduction)
    backend = resolve_backend(backend, cos.device, OP.name)
    target_values(_FN, targets, cos.shape[1], ignore_index)
    if backend == "reference":
        return reference.multilabel_margin_cross_entropy(
            cos, targets, scale=scale, m1=m1, m2=m2, m3=m3, margin_grad=margin_grad,
            ignore_index=ignore_index, reduction=reduction).to(result_dtype(cos))
    targets = targets.long()
    compute_grad = cos.requires_grad and torch.is_grad_enabled()
    loss_rows, _ = OP.for_backend(backend)(
        cos, targets, float(scale), float(m1), float(m2), float(m3), margin_grad == "detached",
        ignore_index, compute_grad)
    return reduce_rows(loss_rows, has_positive(targets, ignore_index), reduction,
                       result_dtype(cos))


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
    _checks.floating_tensor(fn, name, cos, ndim=2)
    check_targets(fn, targets, cos.shape[0])
    _checks.same_device(fn, **{name: cos, "targets": targets})
    if cos.shape[1] == 0:
        raise ValueError(f"{fn}: {name} must have at least one class (C >= 1), got shape "
                         f"{tuple(cos.shape)}")


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
