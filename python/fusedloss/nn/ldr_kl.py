"""nn.Module wrappers of the LDR-KL family: LDRKLLoss (on logits, fusedloss.ldr_kl_loss) and
LDRKLLinear (an output layer whose loss is fusedloss.linear_ldr_kl_loss, never forming the
logits). The LDR options (lam, margin) reach them through their keywords."""
from typing import Optional

import torch

from .. import _checks
from .._ops import BACKENDS
from ..ldr_kl import check_options, ldr_kl_loss, linear_ldr_kl_loss
from ..margin_linear import check_block_size


def _checked(owner, lam, margin, ignore_index, reduction, backend):
    if torch.is_tensor(lam):
        raise TypeError(f"{owner}: lam must be a float here; pass per-row temperatures to "
                        "forward(..., lam=...)")
    check_options(owner, lam, margin, ignore_index, reduction, None)
    _checks.choice(owner, "backend", backend, ("auto",) + BACKENDS)


class LDRKLLoss(torch.nn.Module):
    """``forward(logits, target, lam=None)``: :func:`fusedloss.ldr_kl_loss` with this module's
    ``lam`` (a positive float), ``margin``, ``ignore_index``, ``reduction`` and ``backend``
    (defaults of the authors' LDRLoss_V1); a tensor ``lam`` [N] given to forward replaces the
    module's for that call (ALDR-KL). Bad keywords raise at construction."""

    def __init__(self, lam: float = 1.0, margin: float = 2.0, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        _checked("LDRKLLoss", lam, margin, ignore_index, reduction, backend)
        self.kwargs = dict(lam=lam, margin=margin, ignore_index=ignore_index, reduction=reduction,
                           backend=backend)

    def forward(self, logits, target, lam: Optional[torch.Tensor] = None):
        kwargs = self.kwargs if lam is None else dict(self.kwargs, lam=lam)
        return ldr_kl_loss(logits, target, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class LDRKLLinear(torch.nn.Module):
    """An output layer ``hidden @ weight.T + bias`` trained with LDR-KL:
    ``forward(hidden, target, lam=None)`` returns :func:`fusedloss.linear_ldr_kl_loss`
    without forming the ``N x C`` logits. Parameters as ``torch.nn.Linear(in_features,
    num_classes, bias)`` (its initialisation); keywords as LDRKLLoss, plus ``block_size``."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, *,
                 lam: float = 1.0, margin: float = 2.0, ignore_index: int = -100,
                 reduction: str = "mean", block_size: Optional[int] = None,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ValueError(f"LDRKLLinear: in_features and num_classes must be >= 1, got "
                             f"{in_features} and {num_classes}")
        _checked("LDRKLLinear", lam, margin, ignore_index, reduction, backend)
        check_block_size("LDRKLLinear", block_size)
        layer = torch.nn.Linear(in_features, num_classes, bias, device=device, dtype=dtype)
        self.weight, self.bias = layer.weight, layer.bias
        self.kwargs = dict(lam=lam, margin=margin, ignore_index=ignore_index, reduction=reduction,
                           block_size=block_size, backend=backend)

    def forward(self, hidden, target, lam: Optional[torch.Tensor] = None):
        kwargs = self.kwargs if lam is None else dict(self.kwargs, lam=lam)
        return linear_ldr_kl_loss(hidden, self.weight, target, self.bias, **kwargs)

    def extra_repr(self) -> str:
        c, d = self.weight.shape
        return (f"in_features={d}, num_classes={c}, bias={self.bias is not None}, "
                + ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items()))
