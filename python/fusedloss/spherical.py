"""The spherical Z-loss of de Brebisson and Vincent (2016) on logits. The row math and its
gradient are derived in csrc/include/fusedloss/spherical.h; the oracle is
fusedloss.reference.spherical."""
import torch

from . import _checks
from ._keywords import defaults, keywords_of, refuse_unknown, shares_keywords
from ._ops import resolve_backend, result_dtype, row_grad_loss, row_grad_op
from .reference import spherical as reference

_FN = "spherical_z_loss"

# fusedloss::spherical_z_loss(logits, target, a, b, ignore_index, compute_grad)
OP = row_grad_op("spherical", _FN, num_tensors=2)


def spherical_z_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    a: float = 1.0,
    b: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""The Z-loss of de Brebisson and Vincent (2016), "The Z-loss: a shift and scale
    invariant classification loss belonging to the Spherical Family", arXiv:1604.08859.

    ``logits`` [N, C] (fp32, fp64, fp16 or bf16, C >= 2) holds the outputs ``o`` of a
    classifier; ``target`` [N] holds class indices. Per row::

        mu    = mean_k o_k
        sigma = max(sqrt(mean_k (o_k - mu)^2), 1e-12)
        z_c   = (o_c - mu) / sigma
        loss  = softplus(a * (b - z_c)) / a

    The loss sees the outputs only through ``o_c``, ``sum(o)`` and ``sum(o^2)`` (it belongs
    to the spherical family) and is invariant to ``o -> alpha * o + beta`` for every
    ``alpha > 0``: it rewards the target for standing out of the row by many standard
    deviations, as a rank-based metric (top-k) does, not for any absolute logit value.

    ``a > 0`` (sharpness of the softplus) and ``b`` (the z-score beyond which the loss
    flattens out) are the paper's two hyperparameters. The paper gives no universal values:
    it tunes them per task and per target metric (top-1 against top-k); the defaults
    ``a=1, b=0`` are the plain ``softplus(-z_c)``, which the authors' own Z-loss code
    (github.com/pascal20100/factored_output_layer, example/timing_example.py) also uses.

    sigma floor: the spread is floored at ``1e-12`` (csrc/include/fusedloss/spherical.h
    ``kSigmaFloor``), not regularised by an epsilon under the square root, so the loss is
    exactly shift- and scale-invariant whenever the spread of a row exceeds the floor. Only
    a row whose outputs are all equal (to rounding) hits the floor; there sigma is held
    constant, the gradient has no component along ``o - mu``, and the loss and gradient are
    those of ``z_c = (o_c - mu) / 1e-12`` (very large: such a row has no direction that
    separates the target).

    Not the PaLM z-loss: the auxiliary term ``lse_square_scale * logsumexp(logits)^2`` of
    PaLM (Chowdhery et al., 2022) is a regulariser added to softmax cross-entropy that keeps
    the log-partition function near 0; it is neither shift- nor scale-invariant and is not
    a classification loss on its own. This function is the classification loss of de
    Brebisson and Vincent, named ``spherical_z_loss`` to keep the two apart.

    The mean and the spread are accumulated in fp32 (fp64 for fp64 logits), the spread
    about the mean (two passes over the row, corrected for the rounding of the mean), so a
    row whose mean is large against its spread loses no digits. ``ignore_index`` and
    ``reduction`` ("mean" over the rows that are not ignored, "sum", "none") are as in
    :func:`torch.nn.functional.cross_entropy`; an ignored row contributes 0 and gets a zero
    gradient. The loss has the dtype of ``logits`` (fp32 under autocast). ``backend``:
    "auto", "reference", "cpu", "cuda" or "triton" (see :func:`fusedloss.backends`).
    """
    _check_inputs(logits, target)
    check_options(_FN, a, b, ignore_index, reduction)
    backend = resolve_backend(backend, logits.device, OP.name)
    _checks.target_values(_FN, target, logits.shape[1], ignore_index)
    target = target.long()
    if backend == "reference":
        return reference.spherical_z_loss(logits, target, a=a, b=b, ignore_index=ignore_index,
                                          reduction=reduction).to(result_dtype(logits))
    return row_grad_loss(OP, backend, logits, target, (float(a), float(b), ignore_index),
                         ignore_index, reduction)


# The keywords of every spherical Z-loss op, declared (with their defaults and annotations) by
# spherical_z_loss's signature alone.
SPHERICAL_KEYWORDS = ("a", "b", "ignore_index", "reduction")
_PARAMETERS = keywords_of(spherical_z_loss, SPHERICAL_KEYWORDS)
_DEFAULTS = defaults(_PARAMETERS)
# Gives a function that takes those keywords as **options a signature that shows them, as
# spherical_z_loss declares them, in front of its `backend` parameter.
spherical_keywords = shares_keywords(_PARAMETERS, before="backend")


def options_of(fn: str, options: dict) -> tuple:
    """(a, b, ignore_index, reduction) of the **options of public function `fn`, which is
    decorated with spherical_keywords: the given values over spherical_z_loss's defaults; a
    keyword that is none of them raises Python's own TypeError."""
    refuse_unknown(fn, options, SPHERICAL_KEYWORDS)
    options = {**_DEFAULTS, **options}
    return tuple(options[name] for name in SPHERICAL_KEYWORDS)


def check_options(fn: str, a, b, ignore_index, reduction) -> None:
    """The keywords of every spherical Z-loss op: a > 0, b finite, an int ignore_index and
    a known reduction."""
    _checks.positive(fn, a=a)
    _checks.finite(fn, b=b)
    _checks.integer(fn, ignore_index=ignore_index)
    _checks.choice(fn, "reduction", reduction, _checks.REDUCTIONS)


def _check_inputs(logits, target):
    _checks.rows_and_target(_FN, "logits", logits, target)
    if logits.shape[1] < 2:
        raise ValueError(f"{_FN}: needs C >= 2 classes (the spread of one output is zero by "
                         f"definition), got logits of shape {tuple(logits.shape)}")
