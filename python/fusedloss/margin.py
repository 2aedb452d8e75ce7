"""Margin softmax cross-entropy on normalised logits: ArcFace, CosFace, SphereFace, their
combination and ElasticFace, as one op. The row math is derived in
csrc/include/fusedloss/margin.h; the oracle is fusedloss.reference.margin."""
from dataclasses import dataclass, fields
from typing import Optional

import torch

from . import _checks
from ._keywords import fields_as_keywords, refuse_unknown, shares_keywords
from ._ops import accumulation_dtype, resolve_backend, result_dtype, row_grad_loss, row_grad_op
from .reference import margin as reference

_FN = "margin_cross_entropy"
# fusedloss::margin_cross_entropy(cos, target, row_m2, row_m3, scale, m1, m2, m3,
# detach_margin, label_smoothing, lse_square_scale, ignore_index, compute_grad)
OP = row_grad_op("margin", _FN, num_tensors=4)


@dataclass(frozen=True)
class MarginOptions:
    """The keyword arguments shared by every margin op, with their defaults, declared here
    only: the public functions of the margin and sharded families show them in their
    signatures in this order, in front of `generator` (see `margin_keywords`)."""

    scale: float = 64.0
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    m2_std: float = 0.0
    m3_std: float = 0.0
    elastic_plus: bool = False
    margin_grad: str = "exact"
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    tau: float = 1.0
    softcap: Optional[float] = None
    interclass_filtering_threshold: float = 0.0
    ignore_index: int = -100
    reduction: str = "mean"

    def check(self, fn: str) -> None:
        _checks.positive(fn, scale=self.scale)
        _checks.at_least(fn, 1.0, m1=self.m1)
        _checks.finite(fn, m2=self.m2, m3=self.m3)
        _checks.at_least(fn, 0.0, m2_std=self.m2_std, m3_std=self.m3_std)
        _checks.in_range(fn, 0.0, 1.0, label_smoothing=self.label_smoothing)
        _checks.finite(fn, lse_square_scale=self.lse_square_scale)
        _checks.at_least(fn, 0.0, lse_square_scale=self.lse_square_scale)
        _checks.integer(fn, ignore_index=self.ignore_index)
        _checks.choice(fn, "margin_grad", self.margin_grad, ("exact", "detached"))
        _checks.choice(fn, "reduction", self.reduction, _checks.REDUCTIONS)
        if self.elastic_plus and self.m2_std == 0 and self.m3_std == 0:
            raise ValueError(f"{fn}: elastic_plus=True needs m2_std > 0 or m3_std > 0")
        _checks.finite(fn, tau=self.tau)
        _checks.at_least(fn, 0.0, tau=self.tau)
        if self.tau != 1.0 and self.label_smoothing != 0.0:
            raise ValueError(f"{fn}: label_smoothing > 0 needs tau = 1 (the comp-sum loss of "
                             f"smoothed targets is not defined), got tau={self.tau}")
        if self.softcap is not None:
            _checks.finite(fn, softcap=self.softcap)
            _checks.positive(fn, softcap=self.softcap)
            if self.has_margin:
                raise ValueError(f"{fn}: softcap needs no margin (m1 = 1, m2 = m3 = 0, no "
                                 "ElasticFace draws): a capped margin logit is not defined")
        _checks.in_range(fn, 0.0, 1.0,
                         interclass_filtering_threshold=self.interclass_filtering_threshold)

    @property
    def has_margin(self) -> bool:
        return (self.m1 != 1.0 or self.m2 != 0.0 or self.m3 != 0.0 or self.m2_std != 0.0
                or self.m3_std != 0.0)

    @property
    def needs_epilogue(self) -> bool:
        """True when the row needs the stats engine of fusedloss.sharded (its epilogue in
        Python, its logit transforms in the stats and grad kernels): every option that the
        single-pass fused kernels do not implement."""
        return (self.tau != 1.0 or self.softcap is not None
                or self.interclass_filtering_threshold != 0.0)

    def reference_kwargs(self, row_m2, row_m3):
        """The keywords of the reference oracle, with the per-row margins where drawn."""
        return dict(scale=self.scale, m1=self.m1, m2=self.m2 if row_m2 is None else row_m2,
                    m3=self.m3 if row_m3 is None else row_m3, margin_grad=self.margin_grad,
                    label_smoothing=self.label_smoothing,
                    lse_square_scale=self.lse_square_scale, tau=self.tau,
                    softcap=self.softcap,
                    interclass_filtering_threshold=self.interclass_filtering_threshold,
                    ignore_index=self.ignore_index, reduction=self.reduction)

    def kernel_args(self):
        """scale, m1, m2, m3, detach_margin, label_smoothing, lse_square_scale, ignore_index,
        as the schemas take them."""
        return (float(self.scale), float(self.m1), float(self.m2), float(self.m3),
                self.margin_grad == "detached", float(self.label_smoothing),
                float(self.lse_square_scale), self.ignore_index)


MARGIN_KEYWORDS = tuple(f.name for f in fields(MarginOptions))
# Gives a function that takes the margin keywords as **margin a signature that shows them,
# with MarginOptions' defaults and annotations, in front of its `generator` parameter.
margin_keywords = shares_keywords(fields_as_keywords(MarginOptions), before="generator")


def options_of(fn: str, margin: dict) -> MarginOptions:
    """MarginOptions of the **margin keywords of public function `fn`, which is decorated with
    margin_keywords; a keyword that is no margin option raises Python's own TypeError."""
    refuse_unknown(fn, margin, MARGIN_KEYWORDS)
    return MarginOptions(**margin)


def margin_options(fn: str, kwargs: dict) -> MarginOptions:
    """MarginOptions from the keywords of an op that forwards them, unknown ones refused."""
    unknown = sorted(set(kwargs) - set(MARGIN_KEYWORDS))
    if unknown:
        raise TypeError(f"{fn}: unexpected keyword argument(s) {unknown}")
    return MarginOptions(**kwargs)


@margin_keywords
def margin_cross_entropy(
    cos: torch.Tensor,
    target: torch.Tensor,
    *,
    generator: Optional[torch.Generator] = None,
    extra_negatives: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
    backend: str = "auto",
    **margin,
):
    r"""Softmax cross-entropy over margin-adjusted cosine logits.

    ``cos`` [N, C] holds cosines between normalised embeddings and class centres (fp32,
    fp64, fp16 or bf16); ``target`` [N] holds class indices. The logits are

    * ``z_y = scale * (psi(m1 * theta + m2) - m3)`` for the target, with
      ``theta = arccos(clamp(cos_y, -1, 1))`` and ``psi(phi) = (-1)^k cos(phi) - 2k``,
      ``k = floor(phi / pi)``: plain ``cos(phi)`` up to ``phi = pi``, continued past pi so
      that ``z_y`` is continuous and decreasing in theta on all of [0, pi] (SphereFace's
      continuation). With ``m1 = 1`` and ``m2 = 0`` (CosFace) ``z_y = scale * (cos_y - m3)``
      and no arccos is taken.
    * ``z_j = scale * cos_j`` for every other class,

    followed by cross-entropy exactly as :func:`torch.nn.functional.cross_entropy` with
    ``label_smoothing``, ``ignore_index`` and ``reduction``. ArcFace is ``m2=0.5``, CosFace
    ``m3=0.35``, SphereFace ``m1>1``, insightface's combined margin ``(1.0, 0.3, 0.2)``.

    ``margin_grad="exact"`` differentiates through the margin; its derivative
    ``m1 sin(phi) / sin(theta)`` diverges at theta = 0 and pi, so it is evaluated with theta
    clamped to [0.01, pi - 0.01] rad (the loss value uses the true theta). With
    ``margin_grad="detached"`` the margin is a constant shift of the target logit and
    ``d z_y / d cos_y = scale`` (insightface's ArcFace).

    ElasticFace: with ``m2_std > 0`` (ElasticArcFace) or ``m3_std > 0`` (ElasticCosFace),
    every call draws ``torch.normal(m, std, (N,), generator=generator)`` on the device of
    ``cos`` (fp64 for fp64 inputs, else fp32), one margin per row in row order, m2 first
    when both are drawn. Without ``elastic_plus`` row i uses draw i. With
    ``elastic_plus=True`` (ElasticFace+) the draws of the rows that are not ignored are
    sorted and dealt out by target cosine: the row with the lowest ``cos_y`` gets the
    largest margin, ties broken by row index. The same generator state gives the same
    draws on every backend.

    ``lse_square_scale`` (lambda >= 0, default 0) adds PaLM's auxiliary "z-loss" term
    ``lambda * logsumexp(z)^2`` to the loss of every row that is not ignored, with ``z`` the
    margin-adjusted logits above; it keeps the log-partition function near 0 so that the
    logits do not drift (PaLM uses 1e-4). It costs nothing extra: the kernels already hold
    the log-sum-exp. It is independent of ``label_smoothing`` (added to the row's loss) and
    is reduced with it. It is not :func:`fusedloss.spherical_z_loss`: that is a different
    classification loss (de Brebisson and Vincent's Z-loss, a softplus of the standardised
    target output, shift- and scale-invariant in the outputs), which replaces the
    cross-entropy, whereas this term is a regulariser added to it that depends on the
    absolute level of the logits.

    ``tau`` (>= 0, default 1) selects a loss of the comp-sum family (Mao, Mohri and Zhong,
    *Cross-Entropy Loss Functions: Theoretical Analysis and Applications*, 2023): with
    ``p_y = softmax(z)_y`` the row's loss is ``(p_y^(tau - 1) - 1) / (1 - tau)``, computed in
    log space as ``expm1((1 - tau) ce) / (1 - tau)`` with ``ce = -log p_y``; tau = 1 is the
    cross-entropy (bit for bit), 0 the sum-exponential loss, 1 + q the generalised
    cross-entropy with parameter q, 2 the mean absolute error ``1 - p_y``. For tau < 1 the
    exact value can exceed fp32 (at scale 64): the loss is then inf, as the math says.
    ``label_smoothing > 0`` with tau != 1 is refused (undefined); ``lse_square_scale`` adds.

    ``softcap`` (None: off; > 0) caps every logit as Gemma 2 does, ``z -> softcap *
    tanh(z / softcap)``, before the softmax; only without margins (m1 = 1, m2 = m3 = 0, no
    ElasticFace draws), since a capped margin logit is not defined. Gradients are exact.

    ``interclass_filtering_threshold`` (t in [0, 1], 0: off) is insightface's inter-class
    filtering: in every row, a non-target cosine above t is set to 0 (so its logit is 0)
    and gets no gradient.

    ``extra_negatives`` (None or a 1-D tensor ``e [L]`` of the dtype and device of ``cos``)
    appends the same L cosines to every row as extra negative columns ``scale * e`` (UNPG's
    in-batch negative pairs, see :func:`fusedloss.unpg_negatives`): the result is that of
    F.cross_entropy on ``[z | scale * e]`` with the same target, ``label_smoothing`` spread
    over C + L columns, and tau, ``lse_square_scale``, ignore_index and the reduction as
    above, without an N x L matrix: the columns add ``log sum_l exp(scale e_l)`` to every
    row's partition function, and ``e`` gets its gradient in O(N + L).

    ``return_lse=True`` returns ``(loss, lse)`` with ``lse [N]`` the log-sum-exp of every
    row's logits (the extra columns included; 0 for ignored rows), in fp32 (fp64 for fp64),
    differentiable: z-loss or distillation terms built on it get exact gradients.

    ``inplace_backward=True`` writes the gradient into the storage of ``cos`` (which must be
    contiguous and require grad), so that forward and backward together add no ``N x C``
    buffer: the caller promises not to read ``cos`` after backward (as flash-attn's and
    quack's option). If another node of the graph saved ``cos`` for its own backward, it
    raises there (autograd's version counter: ``cos`` counts as modified in place), never
    a gradient computed from overwritten values; a second backward through the graph raises
    the same way. The saving is for a ``cos`` produced in the graph (the classifier's
    output): for a leaf ``cos`` autograd copies the gradient into ``.grad``, as it does for
    any gradient that aliases a live tensor.

    tau != 1, softcap, interclass_filtering_threshold, extra_negatives, return_lse and
    inplace_backward run on the stats engine of the sharded family (a statistics pass over
    ``cos``, the epilogue in O(N), a gradient pass in backward) on the cpu, triton and
    reference backends; it has
    no CUDA C++ kernel, so "auto" takes triton for CUDA tensors and "cuda" is refused.

    The loss has the dtype of ``cos`` (fp32 under autocast, as cross_entropy); it is
    accumulated in fp32 (fp64 for fp64). An empty batch gives 0 for "sum" and NaN for
    "mean", like cross_entropy. ``backend``: "auto", "reference", "cpu", "cuda" or
    "triton" (see :func:`fusedloss.backends`).
    """
    opts = options_of(_FN, margin)
    _check_inputs(cos, target)
    opts.check(_FN)
    check_generator(_FN, generator, cos.device)
    engine = uses_engine(opts, extra_negatives, return_lse) or bool(inplace_backward)
    if engine:
        from . import sharded
        sharded.check_extra_negatives(_FN, extra_negatives, "cos", cos)
        sharded.check_inplace(_FN, inplace_backward, cos)
    backend = resolve_engine_backend(_FN, backend, cos.device, OP.name, engine)
    _checks.target_values(_FN, target, cos.shape[1], opts.ignore_index)
    row_m2, row_m3 = elastic_margins(opts, target,
                                     lambda: target_cosines(cos, target, opts.ignore_index),
                                     accumulation_dtype(cos), generator)
    if backend == "reference":
        return reference_result(
            reference.margin_cross_entropy(cos, target, **opts.reference_kwargs(row_m2, row_m3),
                                           **engine_kwargs(extra_negatives, return_lse)),
            result_dtype(cos))
    if engine:
        return sharded.local_margin_loss(cos, target.long(), row_m2, row_m3, opts, backend,
                                         extra_negatives, return_lse, bool(inplace_backward))
    return row_grad_loss(OP, backend, cos, target.long(), (row_m2, row_m3, *opts.kernel_args()),
                         opts.ignore_index, opts.reduction)


ENGINE_STATS_OP = "sharded_margin_stats"  # the stats kernel of the engine (fusedloss.sharded)


def uses_engine(opts: MarginOptions, extra_negatives, return_lse: bool) -> bool:
    """True when a single-process call runs on the stats engine of fusedloss.sharded."""
    return opts.needs_epilogue or extra_negatives is not None or bool(return_lse)


def resolve_engine_backend(fn, backend, device, op_name, engine, stats_op=ENGINE_STATS_OP):
    """resolve_backend for op `op_name`, or, on the engine, for its stats op `stats_op`
    (no CUDA C++ kernel: "cuda" is refused with the reason)."""
    if engine and backend == "cuda":
        raise RuntimeError(f"{fn}: tau != 1, softcap, interclass_filtering_threshold, "
                           "extra_negatives, return_lse and inplace_backward run on the stats "
                           "kernels, which have "
                           "cpu and triton backends but no CUDA C++ kernel; use backend='triton' "
                           "or 'auto'")
    return resolve_backend(backend, device, stats_op if engine else op_name)


def engine_kwargs(extra_negatives, return_lse):
    """The oracle's keywords of the engine-only options that are set."""
    kw = {}
    if extra_negatives is not None:
        kw["extra_negatives"] = extra_negatives
    if return_lse:
        kw["return_lse"] = True
    return kw


def reference_result(out, dtype):
    """The oracle's loss in the result dtype; with return_lse its lse in the accumulation
    dtype, as the kernels give it."""
    if isinstance(out, tuple):
        loss, lse = out
        return loss.to(dtype), lse.to(accumulation_dtype(lse))
    return out.to(dtype)


def _check_inputs(cos, target):
    _checks.rows_and_target(_FN, "cos", cos, target)
    if cos.shape[1] == 0:
        raise ValueError(f"{_FN}: cos must have at least one class (C >= 1), got shape "
                         f"{tuple(cos.shape)}")


def check_generator(fn, generator, device):
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"{fn}: generator is on {generator.device}, the inputs on {device}")


def elastic_margins(opts: MarginOptions, target, target_cosines, acc_dtype, generator):
    """The per-row ElasticFace margins (None where the margin is a constant).
    `target_cosines()` gives cos_y [N]; it is called only for elastic_plus."""
    n = target.shape[0]

    def draw(mean, std):
        if std == 0:
            return None
        return torch.normal(float(mean), float(std), (n,), generator=generator, dtype=acc_dtype,
                            device=target.device)

    draws = (draw(opts.m2, opts.m2_std), draw(opts.m3, opts.m3_std))
    if not opts.elastic_plus:
        return draws
    valid = target != opts.ignore_index
    order = _rows_by_target_cosine(target_cosines(), valid)
    return tuple(None if d is None else _deal_largest_first(d, order, valid) for d in draws)


def _rows_by_target_cosine(cos_y, valid):
    """Row indices, not-ignored rows first by ascending target cosine, then ignored rows."""
    last = torch.full_like(cos_y, float("inf"), dtype=torch.float32)
    key = torch.where(valid, cos_y.detach().float(), last)
    return torch.sort(key, stable=True).indices


def target_cosines(cos, target, ignore_index):
    """cos[i, target[i]] (0 for ignored rows)."""
    safe = torch.where(target != ignore_index, target, torch.zeros_like(target)).long()
    return cos.detach().gather(1, safe[:, None]).squeeze(1)


def _deal_largest_first(draws, order, valid):
    """Give the largest draw of the valid rows to order[0], the next to order[1], and so on;
    ignored rows (at the end of `order`) keep their own draw."""
    key = torch.where(valid, draws, torch.full_like(draws, -float("inf")))
    dealt = torch.sort(key, descending=True, stable=True).values
    dealt = torch.where(valid[order], dealt, draws[order])
    return torch.empty_like(draws).scatter_(0, order, dealt)
