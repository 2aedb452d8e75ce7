"""nn.Modules of the spherical family: SphericalZLoss (on logits, fusedloss.spherical_z_loss),
SphericalLinear (the output layer trained through fusedloss.linear_spherical_z_loss) and
FactoredSphericalLinear (the same layer trained by exact factored SGD; its update lives in
fusedloss.spherical_factored)."""
import math

import torch

from .. import _checks
from .._ops import BACKENDS
from ..spherical import check_options, spherical_z_loss
from ..spherical_factored import FactoredSphericalLinear
from ..spherical_linear import check_linear_options, linear_spherical_z_loss

__all__ = ["FactoredSphericalLinear", "SphericalLinear", "SphericalZLoss"]


class SphericalZLoss(torch.nn.Module):
    """The spherical Z-loss on logits, ``forward(logits, target)``: see
    :func:`fusedloss.spherical_z_loss`, whose keywords these are and whose checks run here."""

    def __init__(self, a: float = 1.0, b: float = 0.0, *, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        check_options("SphericalZLoss", a, b, ignore_index, reduction)
        _checks.choice("SphericalZLoss", "backend", backend, ("auto",) + BACKENDS)
        self.kwargs = dict(a=a, b=b, ignore_index=ignore_index, reduction=reduction,
                           backend=backend)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return spherical_z_loss(logits, target, **self.kwargs)


class SphericalLinear(torch.nn.Module):
    """An output layer ``o = hidden @ weight.T + bias`` trained with the spherical Z-loss
    without forming ``o``: ``forward(hidden, target)`` returns the loss through
    :func:`fusedloss.linear_spherical_z_loss`, at a cost independent of N x C.

    ``weight [num_classes, in_features]`` and ``bias [num_classes]`` are initialised as
    ``torch.nn.Linear`` initialises them. ``a``, ``b``, ``ignore_index``, ``reduction`` and
    ``backend`` are the keywords of linear_spherical_z_loss, checked here as it checks them.
    ``logits(hidden)`` forms the outputs (for evaluation); ``topk(hidden, k)`` finds the k best
    classes per row a block of classes at a time, never holding all N x C outputs.
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, a: float = 1.0,
                 b: float = 0.0, *, ignore_index: int = -100, reduction: str = "mean",
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if in_features < 1 or num_classes < 2:
            raise ValueError("SphericalLinear: needs in_features >= 1 and num_classes >= 2, got "
                             f"{in_features} and {num_classes}")
        check_linear_options("SphericalLinear", a, b, ignore_index, reduction, backend)
        self.weight = torch.nn.Parameter(
            torch.empty(num_classes, in_features, device=device, dtype=dtype))
        self.bias = (torch.nn.Parameter(torch.empty(num_classes, device=device, dtype=dtype))
                     if bias else None)
        self.kwargs = dict(a=a, b=b, ignore_index=ignore_index, reduction=reduction,
                           backend=backend)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight.shape[1])
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return linear_spherical_z_loss(hidden, self.weight, target, self.bias, **self.kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight, self.bias)

    @torch.no_grad()
    def topk(self, hidden: torch.Tensor, k: int, block: int = 65536):
        """(values, indices) of the k largest outputs per row, computed `block` classes at a
        time: memory O(N (k + block)), not O(N C)."""
        num_classes = self.weight.shape[0]
        if not 1 <= k <= num_classes:
            raise ValueError(f"SphericalLinear.topk: k must lie in [1, {num_classes}], got {k}")
        best_values = best_indices = None
        for start in range(0, num_classes, block):
            stop = min(start + block, num_classes)
            bias = None if self.bias is None else self.bias[start:stop]
            out = torch.nn.functional.linear(hidden, self.weight[start:stop], bias)
            values, indices = out.topk(min(k, stop - start), dim=1)
            indices += start
            if best_values is not None:
                values = torch.cat([best_values, values], dim=1)
                indices = torch.cat([best_indices, indices], dim=1)
                values, pick = values.topk(min(k, values.shape[1]), dim=1)
                indices = indices.gather(1, pick)
            best_values, best_indices = values, indices
        return best_values, best_indices

    def extra_repr(self) -> str:
        c, d = self.weight.shape
        return f"in_features={d}, num_classes={c}, bias={self.bias is not None}, " + \
            ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
