"""nn.Module wrappers of the fusedloss ops, with named margin presets."""
import math

import torch

from .margin import margin_cross_entropy
from .margin_linear import linear_margin_cross_entropy
from .spherical import spherical_z_loss
from .spherical_factored import FactoredSphericalLinear  # noqa: F401  (a module of this namespace)
from .spherical_linear import linear_spherical_z_loss

# Margin presets: the defaults of the papers and of insightface's training configs. Any
# keyword given to a module overrides its preset; margin_grad is "exact" unless given.
PRESETS = {
    # ArcFace, Deng et al., CVPR 2019; insightface's arcface configs: s = 64, m = 0.5.
    "arcface": dict(scale=64.0, m2=0.5),
    # CosFace, Wang et al., CVPR 2018 (s = 64); insightface's cosface configs use m = 0.4.
    "cosface": dict(scale=64.0, m3=0.4),
    # insightface's combined margin loss (m1, m2, m3) = (1.0, 0.3, 0.2).
    "combined": dict(scale=64.0, m1=1.0, m2=0.3, m3=0.2),
    # ElasticFace, Boutros et al., CVPRW 2022: margins drawn from N(m, sigma) per sample;
    # the "+" variants deal them by target cosine. Values from the paper's released configs.
    "elastic_arcface": dict(scale=64.0, m2=0.5, m2_std=0.05),
    "elastic_arcface_plus": dict(scale=64.0, m2=0.5, m2_std=0.0175, elastic_plus=True),
    "elastic_cosface": dict(scale=64.0, m3=0.35, m3_std=0.05),
    "elastic_cosface_plus": dict(scale=64.0, m3=0.35, m3_std=0.02, elastic_plus=True),
}


def preset(loss: str, **overrides) -> dict:
    """The keyword arguments of preset `loss`, with `overrides` taking precedence."""
    if loss not in PRESETS:
        raise ValueError(f"unknown loss preset {loss!r}; expected one of {tuple(PRESETS)}")
    return {**PRESETS[loss], **overrides}


class MarginCrossEntropy(torch.nn.Module):
    """Margin softmax cross-entropy on cosine logits: ``forward(cos, target)``.

    A drop-in for insightface's ``CombinedMarginLoss`` followed by cross-entropy. ``loss``
    names a preset (see ``PRESETS``: arcface, cosface, combined, elastic_arcface,
    elastic_arcface_plus, elastic_cosface, elastic_cosface_plus); every keyword of
    :func:`fusedloss.margin_cross_entropy` given here overrides the preset.
    """

    def __init__(self, loss: str = "arcface", **kwargs):
        super().__init__()
        self.loss = loss
        self.kwargs = preset(loss, **kwargs)

    def forward(self, cos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return margin_cross_entropy(cos, target, **self.kwargs)

    def extra_repr(self) -> str:
        return f"loss={self.loss!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class MarginSoftmaxHead(torch.nn.Module):
    """A classifier head that never forms the logits: ``forward(embeddings, target)`` returns
    the margin softmax loss of ``normalize(embeddings) @ normalize(weight).T`` through
    :func:`fusedloss.linear_margin_cross_entropy`.

    Holds one parameter, ``weight`` [num_classes, embedding_dim], initialised from
    ``normal(0, 0.01)`` as insightface's partial_fc does. ``loss`` names a preset (see
    ``PRESETS``); keywords of :func:`fusedloss.linear_margin_cross_entropy` given here
    (``scale``, margins, ``normalize``, ``block_size``, ``backend``, ...) override it.
    """

    def __init__(self, embedding_dim: int, num_classes: int, loss: str = "arcface", *,
                 device=None, dtype=None, **kwargs):
        super().__init__()
        if embedding_dim < 1 or num_classes < 1:
            raise ValueError(f"MarginSoftmaxHead: embedding_dim and num_classes must be >= 1, "
                             f"got {embedding_dim} and {num_classes}")
        self.loss = loss
        self.kwargs = preset(loss, **kwargs)
        self.weight = torch.nn.Parameter(
            torch.empty(num_classes, embedding_dim, device=device, dtype=dtype).normal_(0, 0.01))

    def forward(self, embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return linear_margin_cross_entropy(embeddings, self.weight, target, **self.kwargs)

    def extra_repr(self) -> str:
        c, d = self.weight.shape
        return f"embedding_dim={d}, num_classes={c}, loss={self.loss!r}"


class SphericalZLoss(torch.nn.Module):
    """The spherical Z-loss on logits, ``forward(logits, target)``: see
    :func:`fusedloss.spherical_z_loss` (a, b, ignore_index, reduction, backend)."""

    def __init__(self, a: float = 1.0, b: float = 0.0, **kwargs):
        super().__init__()
        self.kwargs = dict(a=a, b=b, **kwargs)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return spherical_z_loss(logits, target, **self.kwargs)


class SphericalLinear(torch.nn.Module):
    """An output layer ``o = hidden @ weight.T + bias`` trained with the spherical Z-loss
    without forming ``o``: ``forward(hidden, target)`` returns the loss through
    :func:`fusedloss.linear_spherical_z_loss`, at a cost independent of N x C.

    ``weight [num_classes, in_features]`` and ``bias [num_classes]`` are initialised as
    ``torch.nn.Linear`` initialises them. ``logits(hidden)`` forms the outputs (for
    evaluation); ``topk(hidden, k)`` finds the k best classes per row a block of classes at a
    time, never holding all N x C outputs.
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, a: float = 1.0,
                 b: float = 0.0, *, device=None, dtype=None, **kwargs):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(num_classes, in_features, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.empty(num_classes, device=device, dtype=dtype)) if bias else None
        self.kwargs = dict(a=a, b=b, **kwargs)
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
