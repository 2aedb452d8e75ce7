"""nn.Module wrappers of the margin family, with named margin presets:
MarginCrossEntropy (on cosine logits, fusedloss.margin_cross_entropy) and MarginSoftmaxHead
(the fused classifier, fusedloss.linear_margin_cross_entropy)."""
from dataclasses import dataclass
from typing import Optional

import torch

from .. import _checks
from .._ops import BACKENDS
from ..margin import margin_cross_entropy, margin_options
from ..margin_linear import check_block_size, linear_margin_cross_entropy
from ..multilabel import check_options as check_multilabel_options
from ..multilabel_linear import linear_multilabel_margin_cross_entropy
from ..pairs import unpg_negatives

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


def split_keywords(owner: str, kwargs: dict, call_keywords: tuple) -> tuple:
    """(MarginOptions, the other keywords) of a module's keywords `kwargs`: the keywords named
    in `call_keywords` go to the function as they are, every other one must be a margin option.
    Raises as the functions do for an unknown keyword, a bad margin option, a bad block_size
    or an unknown backend, with `owner` (the module's name) in the message."""
    call = {k: v for k, v in kwargs.items() if k in call_keywords}
    opts = margin_options(owner, {k: v for k, v in kwargs.items() if k not in call_keywords})
    opts.check(owner)
    check_block_size(owner, call.get("block_size"))
    _checks.choice(owner, "backend", call.get("backend", "auto"), ("auto",) + BACKENDS)
    return opts, call


@dataclass(frozen=True)
class UnpgOptions:
    """The ``unpg=True`` option of the heads: the batch's negative pairs as shared columns."""

    whisker: float
    ignore_index: int
    normalize: bool

    def negatives(self, embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """unpg_negatives of the rows whose target is not ignore_index; None for inputs that
        the loss function's own checks, which follow, reject."""
        if not (torch.is_tensor(embeddings) and torch.is_tensor(target)
                and embeddings.is_floating_point() and embeddings.dim() == 2
                and not target.is_floating_point() and target.dtype != torch.bool
                and target.shape == embeddings.shape[:1] and target.device == embeddings.device):
            return None
        kept = target != self.ignore_index
        return unpg_negatives(embeddings[kept], target[kept], whisker=self.whisker,
                              normalize=self.normalize)


def unpg_options(owner: str, unpg, whisker, ignore_index: int, normalize) -> Optional[UnpgOptions]:
    """The checked UNPG options of a head, None when ``unpg`` is False."""
    if not isinstance(unpg, bool):
        raise TypeError(f"{owner}: unpg must be a bool, got {type(unpg).__name__}")
    _checks.at_least(owner, 0.0, unpg_whisker=whisker)
    return UnpgOptions(float(whisker), ignore_index, normalize) if unpg else None


# The margin options that the multi-label loss takes (multilabel=True on the heads).
MULTILABEL_OPTIONS = ("scale", "m1", "m2", "m3", "margin_grad", "ignore_index", "reduction")


def multilabel_keywords(owner: str, multilabel, kwargs: dict, call_keywords: tuple,
                        unpg: bool) -> bool:
    """Whether a head runs the multi-label loss (MLCD; labels [N, K]); with multilabel=True
    every keyword must be one it takes (the margin options MULTILABEL_OPTIONS at values it
    accepts, and `call_keywords`), and unpg must be off."""
    if not isinstance(multilabel, bool):
        raise TypeError(f"{owner}: multilabel must be a bool, got {type(multilabel).__name__}")
    if not multilabel:
        return False
    other = sorted(k for k in kwargs if k not in MULTILABEL_OPTIONS + call_keywords)
    if other:
        raise ValueError(f"{owner}: {other} do not apply with multilabel=True (it takes "
                         f"{MULTILABEL_OPTIONS + call_keywords})")
    if unpg:
        raise ValueError(f"{owner}: unpg=True does not apply with multilabel=True")
    o = {k: kwargs.get(k, d) for k, d in (("scale", 64.0), ("m1", 1.0), ("m2", 0.0),
                                            ("m3", 0.0), ("margin_grad", "exact"),
                                            ("ignore_index", -100), ("reduction", "mean"))}
    check_multilabel_options(owner, o["scale"], o["m1"], o["m2"], o["m3"], o["margin_grad"],
                             o["ignore_index"], o["reduction"])
    return True


def unpg_repr(unpg: Optional[UnpgOptions]) -> str:
    return "" if unpg is None else f", unpg=True, unpg_whisker={unpg.whisker}"


class MarginCrossEntropy(torch.nn.Module):
    """Margin softmax cross-entropy on cosine logits: ``forward(cos, target)``.

    A drop-in for insightface's ``CombinedMarginLoss`` followed by cross-entropy. ``loss``
    names a preset (see ``PRESETS``: arcface, cosface, combined, elastic_arcface,
    elastic_arcface_plus, elastic_cosface, elastic_cosface_plus); every keyword of
    :func:`fusedloss.margin_cross_entropy` given here overrides the preset. Bad keywords
    raise here, as the function would raise them.
    """

    def __init__(self, loss: str = "arcface", **kwargs):
        super().__init__()
        self.loss = loss
        self.kwargs = preset(loss, **kwargs)
        split_keywords("MarginCrossEntropy", self.kwargs, ("generator", "backend"))

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
    (``scale``, margins, ``normalize``, ``block_size``, ``deterministic``, ``generator``,
    ``backend``, ...) override it. Bad keywords raise here, as the function would raise them.

    ``unpg=True`` (UNPG, Jung et al. 2022) adds the batch's own negative pairs to the softmax:
    :func:`fusedloss.unpg_negatives` of the batch (rows whose target is ``ignore_index`` left
    out; ``unpg_whisker`` its Tukey whisker, ``normalize`` as the head's) joined to every row
    as shared extra columns, ``extra_negatives`` of the linear op: the authors' concatenation
    ``[z_i | scale * e]`` without the ``N x (C + L)`` logits.

    ``multilabel=True`` (MLCD): ``forward(embeddings, labels)`` with ``labels [N, K]`` (the
    positive classes of each row, padded with ``ignore_index``) returns
    :func:`fusedloss.linear_multilabel_margin_cross_entropy`; the preset's and the given
    margin keywords apply (``scale``, ``m1``, ``m2``, ``m3``, ``margin_grad``, ``ignore_index``,
    ``reduction``, ``normalize``, ``block_size``, ``backend``), any other keyword and
    ``unpg`` raise here.
    """

    CALL_KEYWORDS = ("normalize", "block_size", "deterministic", "generator", "backend")

    def __init__(self, embedding_dim: int, num_classes: int, loss: str = "arcface", *,
                 unpg: bool = False, unpg_whisker: float = 1.5, multilabel: bool = False,
                 device=None, dtype=None, **kwargs):
        super().__init__()
        if embedding_dim < 1 or num_classes < 1:
            raise ValueError(f"MarginSoftmaxHead: embedding_dim and num_classes must be >= 1, "
                             f"got {embedding_dim} and {num_classes}")
        self.loss = loss
        self.kwargs = preset(loss, **kwargs)
        self.multilabel = multilabel_keywords("MarginSoftmaxHead", multilabel, self.kwargs,
                                              ("normalize", "block_size", "backend"), unpg)
        opts, _ = split_keywords("MarginSoftmaxHead", self.kwargs, self.CALL_KEYWORDS)
        self.unpg = unpg_options("MarginSoftmaxHead", unpg, unpg_whisker, opts.ignore_index,
                                 self.kwargs.get("normalize", True))
        self.weight = torch.nn.Parameter(
            torch.empty(num_classes, embedding_dim, device=device, dtype=dtype).normal_(0, 0.01))

    def forward(self, embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            return linear_multilabel_margin_cross_entropy(embeddings, self.weight, target,
                                                          **self.kwargs)
        extra = {}
        if self.unpg is not None:
            extra["extra_negatives"] = self.unpg.negatives(embeddings, target)
        return linear_margin_cross_entropy(embeddings, self.weight, target, **self.kwargs,
                                           **extra)

    def extra_repr(self) -> str:
        c, d = self.weight.shape
        return f"embedding_dim={d}, num_classes={c}, loss={self.loss!r}" + unpg_repr(self.unpg)

