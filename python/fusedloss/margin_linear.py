"""Fused linear margin softmax: normalisation, the classifier matmul, the margin and the
loss in one op, without the N x C logits. The per-row math is that of
fusedloss.margin_cross_entropy (csrc/include/fusedloss/margin.h); the matmul tiling is
described beside each kernel (csrc/cpu/margin_linear.cpp, triton_kernels/margin_linear.py)."""
from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks
from ._ops import (Op, accumulation_dtype, fused_grads, keep_fused_grads, reduce_rows,
                   result_dtype, scale_fused)
from .margin import (check_generator, elastic_margins, engine_kwargs, margin_keywords,
                     options_of, reference_result, resolve_engine_backend, uses_engine)
from .reference import margin as reference

_FN = "linear_margin_cross_entropy"
_NUM_INPUTS = 18  # of the schema fusedloss::margin_linear_cross_entropy


def _fake(x, w, target, row_m2, row_m3, row_grad, scale, m1, m2, m3, detach_margin,
          label_smoothing, lse_square_scale, ignore_index, normalize, block_size, deterministic,
          compute_grad):
    loss = x.new_empty(x.shape[0], dtype=accumulation_dtype(x))
    if compute_grad:
        return loss, x.new_empty(x.shape), w.new_empty(w.shape)
    return loss, x.new_empty(0), w.new_empty(0)


def _setup_context(ctx, inputs, output):
    x, w, target, row_m2, row_m3, row_grad, *hyper, _compute_grad = inputs
    ctx.hyper = hyper
    # Gradients weighted by a forward row_grad are not those of the loss: never reused.
    ctx.reusable = row_grad is None
    keep_fused_grads(ctx, output[1:], (x, w, target, row_m2, row_m3))


def _backward(ctx, grad_loss, _grad_x, _grad_w):
    """The forward made the gradients of sum_i loss_i. With the same incoming gradient on
    every row (reduction "mean" or "sum") they only need scaling; otherwise (reduction
    "none" with per-row weights), or once spent, they are recomputed with row_grad."""
    if grad_loss is None:
        return (None,) * _NUM_INPUTS
    (x, w, target, row_m2, row_m3), grads = fused_grads(ctx)
    same_on_every_row = grad_loss.shape[0] > 0 and grad_loss.stride(0) == 0
    if ctx.reusable and grads is not None and grads[0].shape == x.shape and same_on_every_row:
        grad_x, grad_w = (scale_fused(ctx, g, grad_loss[0]) for g in grads)
    else:
        row_grad = grad_loss.to(accumulation_dtype(x)).contiguous()
        _, grad_x, grad_w = ctx.op(x, w, target, row_m2, row_m3, row_grad, *ctx.hyper, True)
    return (grad_x, grad_w) + (None,) * (_NUM_INPUTS - 2)


OP = Op("margin_linear", "margin_linear_cross_entropy", fake=_fake, setup_context=_setup_context,
        backward=_backward)


@margin_keywords
def linear_margin_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    generator: Optional[torch.Generator] = None,
    normalize: bool = True,
    block_size: Optional[int] = None,
    deterministic: bool = False,
    extra_negatives: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
    **margin,
):
    """:func:`fusedloss.margin_cross_entropy` of
    ``cos = normalize(embeddings) @ normalize(weight).T``, without storing the ``N x C`` matrix
    in forward or backward.

    ``embeddings [N, D]`` and ``weight [C, D]`` share one floating dtype; ``target [N]`` holds
    class indices.

    Margin keywords, with the defaults, meaning and checks of margin_cross_entropy:
    ``scale``, ``m1``, ``m2``, ``m3`` (the margin logit), ``m2_std``, ``m3_std``,
    ``elastic_plus``, ``generator`` (ElasticFace; ElasticFace+ orders rows by their target
    cosine ``x_hat_i . w_hat_{y_i}``), ``margin_grad``, ``label_smoothing``,
    ``lse_square_scale`` (PaLM's auxiliary term ``lambda * logsumexp(z)^2`` per row, not
    :func:`fusedloss.linear_spherical_z_loss`), ``tau`` (the comp-sum family), ``softcap``
    (Gemma 2's logit cap, without margins: with ``normalize=False, scale=1`` a capped LM
    head), ``interclass_filtering_threshold``, ``ignore_index``, ``reduction``, and the call
    keywords ``extra_negatives`` and ``return_lse``. tau != 1, softcap, the filtering,
    extra_negatives and return_lse run on the stats engine of the sharded family (the fused
    product in a statistics pass, recomputed in backward's gradient pass) on the cpu, triton
    and reference backends; ``deterministic`` holds there too.

    Keywords of the fused product:

    * ``normalize``: with True both inputs are L2-normalised exactly as ``F.normalize`` does
      (``x / max(||x||, 1e-12)``) and gradients flow through the normalisation; with False
      they are used as they are (with ``scale=1`` and no margins: plain fused linear
      cross-entropy, as for a language-model head).
    * ``block_size``: the tiling block of the backend, a positive int; None: the backend
      chooses. The triton backend takes it as the embedding rows per tile, rounded up to a
      power of two in [16, 256] and capped per dtype at the largest tile whose kernels compile
      for sm_90 without register spills: at most 64 rows in fp64 and 128 otherwise in the
      forward tiles, 32 in fp64 and 64 otherwise in the embedding-gradient pass, 32 in the
      weight-gradient pass: the backend's own tile sizes, so block_size can make tiles smaller,
      never larger (larger tiles spill hundreds of bytes to tens of KB per thread).
    * ``deterministic``: True promises bit-identical results run to run for the same inputs,
      block_size, TF32 setting, software and device (every backend here is deterministic in
      that sense; the flag keeps the promise explicit). The triton backend's splits follow
      the GPU's SM count, so another SM count (a MIG slice included) may differ in the last
      bits.
    * ``backend``: "auto", "reference", "cpu", "cuda" or "triton".
    """
    opts = options_of(_FN, margin)
    _check_inputs(embeddings, weight, target, block_size)
    opts.check(_FN)
    check_generator(_FN, generator, embeddings.device)
    engine = uses_engine(opts, extra_negatives, return_lse)
    if engine:
        from . import sharded
        sharded.check_extra_negatives(_FN, extra_negatives, "embeddings", embeddings)
    backend = resolve_engine_backend(_FN, backend, embeddings.device, OP.name, engine,
                                     "sharded_margin_linear_stats")
    _checks.target_values(_FN, target, weight.shape[0], opts.ignore_index)
    row_m2, row_m3 = elastic_margins(
        opts, target,
        lambda: _target_cosines(embeddings, weight, target, opts.ignore_index, normalize),
        accumulation_dtype(embeddings), generator)
    if backend == "reference":
        return reference_result(reference.linear_margin_cross_entropy(
            embeddings, weight, target, normalize=normalize,
            **opts.reference_kwargs(row_m2, row_m3),
            **engine_kwargs(extra_negatives, return_lse)), result_dtype(embeddings))
    target = target.long()
    if engine:
        return sharded.local_linear_margin_loss(
            embeddings, weight, target, row_m2, row_m3, opts, backend, normalize,
            kernel_block_size(block_size), extra_negatives, return_lse)
    compute_grad = torch.is_grad_enabled() and (embeddings.requires_grad or weight.requires_grad)
    loss_rows, _, _ = OP.for_backend(backend)(
        embeddings, weight, target, row_m2, row_m3, None, *opts.kernel_args(), normalize,
        kernel_block_size(block_size), deterministic, compute_grad)
    return reduce_rows(loss_rows, target != opts.ignore_index, opts.reduction,
                       result_dtype(embeddings))


def check_block_size(fn: str, block_size) -> None:
    """block_size is None (the backend chooses) or a positive int."""
    if block_size is not None:
        _checks.integer(fn, block_size=block_size)
        if block_size <= 0:
            raise ValueError(f"{fn}: block_size must be a positive int or None, got {block_size}")


def kernel_block_size(block_size: Optional[int]) -> int:
    """The block_size argument of the op schemas, where 0 means "the backend chooses"."""
    return 0 if block_size is None else block_size


def _check_inputs(embeddings, weight, target, block_size):
    _checks.embeddings_and_weight(_FN, embeddings, weight, target)
    if weight.shape[0] == 0:
        raise ValueError(f"{_FN}: weight must have at least one class (C >= 1)")
    check_block_size(_FN, block_size)


def _target_cosines(x, w, target, ignore_index, normalize):
    """x_hat_i . w_hat_{y_i} (0 for ignored rows), in O(N D)."""
    safe = torch.where(target != ignore_index, target, torch.zeros_like(target)).long()
    x, w_y = x.detach(), w.detach()[safe]
    if normalize:
        x, w_y = F.normalize(x), F.normalize(w_y)
    return (x * w_y).sum(1)
