"""The pair-loss ops in plain PyTorch, dense: the oracle every backend is tested against.

Each function follows the contract of its schema in fusedloss/_schemas.py
(fusedloss::pair_extrema, fusedloss::pair_row_stats) and forms the whole N x M similarity matrix, which the kernels
never do. Gradients come from ordinary autograd, so nothing here depends on the kernels'
derivation of dstats/dS.

Notation: x [N, D] queries, r [M, D] references, S_ij = x_i . r_j, computed in fp32 (fp64 for
fp64 inputs) whatever the input dtype. Pair (i, j) is positive when labels[i] ==
ref_labels[j], negative otherwise; with self_offset >= 0 column (self_offset + i) mod M is no
pair of row i at all. distance 1 replaces S by the euclidean distance d_ij = |x_i - r_j|, whose
gradient is taken as 0 where d_ij = 0 (as torch.cdist's); where S_ij or a norm is NaN, d_ij and
its gradient are NaN (a NaN input gives a NaN score, on every backend). It is formed as the
kernels form it (csrc/include/fusedloss/pairs.h, "Near-duplicate pairs"): the Gram form
sqrt(max(|x_i|^2 + |r_j|^2 - 2 S_ij, 0)), except for the near pairs, d^2 < NEAR_FRACTION
(|x_i|^2 + |r_j|^2), where it cancels and d^2 = sum_k (x_ik - r_jk)^2 is taken from the
differences instead. So the oracle is accurate for every pair (in fp64: relative error
~1e-14 and below), an exact duplicate is at distance 0 exactly, and it stays O(N M) in
memory, plus O(D) per near pair.
"""
from typing import Optional, Sequence

import torch

from .._ops import accumulation_dtype

# Kinds of pair_row_stats, and how many statistics each writes per row.
MULTI_SIMILARITY, SUPCON, CONTRASTIVE, ORTHOGONAL_PROJECTION = 0, 1, 2, 3
NUM_STATS = {MULTI_SIMILARITY: 2, SUPCON: 3, CONTRASTIVE: 4, ORTHOGONAL_PROJECTION: 4}
SIMILARITY, EUCLIDEAN = 0, 1
# kappa of pairs.h: below this fraction of |x|^2 + |r|^2, d^2 comes from the differences.
NEAR_FRACTION = 2.0 ** -6


def scores(x: torch.Tensor, ref: torch.Tensor, distance: int) -> torch.Tensor:
    """[N, M]: S (distance 0) or the euclidean distance d (distance 1), in fp32 (fp64 for fp64)."""
    acc = accumulation_dtype(x)
    x, ref = x.to(acc), ref.to(acc)
    sim = x @ ref.T
    if distance == SIMILARITY:
        return sim
    norms = (x * x).sum(1, keepdim=True) + (ref * ref).sum(1)
    squared = norms - 2 * sim
    near = (squared < NEAR_FRACTION * norms).nonzero(as_tuple=True)
    direct = (x[near[0]] - ref[near[1]]).square().sum(1)
    squared = squared.index_put(near, direct)
    # sqrt except where d^2 <= 0, so that d = 0 has gradient 0, not inf * 0. A NaN d^2 goes
    # through the sqrt: d is NaN, and so is its derivative, as the kernels' a = w / d is
    # (pairs.h: a NaN score gets a NaN gradient, whatever weight w the loss gives it).
    root = ~(squared <= 0)
    return torch.where(root, torch.where(root, squared, 1.0).sqrt(), 0.0)


def pair_masks(labels: torch.Tensor, ref_labels: torch.Tensor, self_offset: int):
    """(positive, negative) boolean [N, M] masks; a row's excluded self column is in neither."""
    same = labels[:, None] == ref_labels[None, :]
    n, m = same.shape
    paired = torch.ones_like(same)
    if self_offset >= 0 and n > 0 and m > 0:
        rows = torch.arange(n, device=labels.device)
        paired[rows, (self_offset + rows) % m] = False
    return same & paired, ~same & paired


def _masked_extreme(values: torch.Tensor, mask: torch.Tensor, largest: bool):
    """(value, first index) of the largest / smallest masked entry of each row; (-inf / +inf, -1)
    for a row without any."""
    empty = float("-inf") if largest else float("inf")
    filled = torch.where(mask, values, empty)
    if values.shape[1] == 0:
        n = values.shape[0]
        return filled.new_full((n,), empty), torch.full((n,), -1, dtype=torch.long,
                                                        device=values.device)
    best, index = filled.max(1) if largest else filled.min(1)
    any_pair = mask.any(1)
    return torch.where(any_pair, best, empty), torch.where(any_pair, index, -1)


def pair_extrema(x: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor,
                 ref_labels: torch.Tensor, distance: int, self_offset: int):
    """The hardest positive and negative of each row: (values [N, 2], indices [N, 2] int64).

    distance 0: (min positive S, max negative S), empty rows (+inf, -inf).
    distance 1: (max positive d, min negative d), empty rows (-inf, +inf).
    Indices are the first column on ties, -1 where there is no such pair.
    """
    values = scores(x, ref, distance)
    pos, neg = pair_masks(labels, ref_labels, self_offset)
    hardest_pos_largest = distance == EUCLIDEAN
    pos_value, pos_index = _masked_extreme(values, pos, largest=hardest_pos_largest)
    neg_value, neg_index = _masked_extreme(values, neg, largest=not hardest_pos_largest)
    return torch.stack([pos_value, neg_value], 1), torch.stack([pos_index, neg_index], 1)


def _log_one_plus_sum_exp(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(1 + sum_{mask} exp(z)) per row, max-rescaled (the 1 is exp of a zero column)."""
    masked = torch.where(mask, z, float("-inf"))
    return torch.logsumexp(torch.cat([masked.new_zeros(z.shape[0], 1), masked], 1), 1)


def _log_sum_exp(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log sum_{mask} exp(z) per row, max-rescaled; -inf (with zero gradient) for an empty row."""
    any_pair = mask.any(1, keepdim=True)
    # Empty rows take a harmless finite row, so that their gradient is 0 rather than NaN.
    safe = torch.where(mask, z, torch.where(any_pair, float("-inf"), 0.0))
    return torch.where(any_pair.squeeze(1), torch.logsumexp(safe, 1), float("-inf"))


def _multi_similarity(score, pos, neg, thresholds, alpha, beta, base, epsilon):
    if thresholds is not None:
        max_neg, min_pos = thresholds[:, :1].to(score.dtype), thresholds[:, 1:].to(score.dtype)
        pos = pos & (score - epsilon < max_neg)
        neg = neg & (score + epsilon > min_pos)
    return torch.stack([_log_one_plus_sum_exp(-alpha * (score - base), pos),
                        _log_one_plus_sum_exp(beta * (score - base), neg)], 1)


def _supcon(score, pos, neg, temperature):
    z = score / temperature
    return torch.stack([_log_sum_exp(z, pos | neg), torch.where(pos, z, 0.0).sum(1),
                        pos.sum(1).to(z.dtype)], 1)


def _contrastive(score, pos, neg, distance, pos_margin, neg_margin):
    if distance == EUCLIDEAN:
        pos_loss, neg_loss = (score - pos_margin).relu(), (neg_margin - score).relu()
    else:
        pos_loss, neg_loss = (pos_margin - score).relu(), (score - neg_margin).relu()
    pos_loss, neg_loss = torch.where(pos, pos_loss, 0.0), torch.where(neg, neg_loss, 0.0)
    return torch.stack([pos_loss.sum(1), (pos_loss > 0).sum(1).to(score.dtype),
                        neg_loss.sum(1), (neg_loss > 0).sum(1).to(score.dtype)], 1)


def _orthogonal_projection(score, pos, neg, absolute):
    negative = score.abs() if absolute else score
    return torch.stack([torch.where(pos, score, 0.0).sum(1), pos.sum(1).to(score.dtype),
                        torch.where(neg, negative, 0.0).sum(1), neg.sum(1).to(score.dtype)], 1)


def pair_row_stats(x: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor,
                   ref_labels: torch.Tensor, thresholds: Optional[torch.Tensor], kind: int,
                   distance: int, hyper: Sequence[float], self_offset: int) -> torch.Tensor:
    """Per-row statistics [N, K] of loss `kind` (fp32, fp64 for fp64), differentiable in x and ref.

    kind 0, multi-similarity, hyper = (alpha, beta, base, epsilon), K = 2:
      (log(1 + sum_{kept pos} exp(-alpha (S - base))),
       log(1 + sum_{kept neg} exp(beta (S - base))));
      with thresholds [N, 2] = (max_neg, min_pos) a positive is kept iff S - epsilon < max_neg_i
      and a negative iff S + epsilon > min_pos_i (strict); without thresholds all pairs are kept.
    kind 1, supcon / info-nce, hyper = (temperature,), K = 3:
      (log sum_{all pairs} exp(S / t) (-inf without pairs), sum_{pos} S / t, number of positives).
    kind 2, contrastive, hyper = (pos_margin, neg_margin), K = 4:
      (sum of positive losses, how many are > 0, sum of negative losses, how many are > 0), the
      pair losses relu(d - pos_margin) / relu(neg_margin - d) with distance 1 and
      relu(pos_margin - S) / relu(S - neg_margin) with distance 0.
    kind 3, orthogonal projection, hyper = (absolute,) (0 or 1), K = 4:
      (sum_{pos} S, number of positives, sum_{neg} f(S), number of negatives), f(S) = |S| when
      absolute, else S.
    The library uses kinds 0, 1 and 3 with distance 0 only; with distance 1 this oracle applies
    them to d in place of S.
    """
    score = scores(x, ref, distance)
    pos, neg = pair_masks(labels, ref_labels, self_offset)
    if kind == MULTI_SIMILARITY:
        return _multi_similarity(score, pos, neg, thresholds, *hyper)
    if kind == SUPCON:
        return _supcon(score, pos, neg, *hyper)
    if kind == CONTRASTIVE:
        return _contrastive(score, pos, neg, distance, *hyper)
    if kind == ORTHOGONAL_PROJECTION:
        return _orthogonal_projection(score, pos, neg, *hyper)
    raise ValueError(f"pair_row_stats: unknown kind {kind}; expected 0, 1, 2 or 3")


def unpg_negatives(x: torch.Tensor, labels: torch.Tensor, whisker: float) -> torch.Tensor:
    """UNPG's negative pairs (Jung et al., 2022), dense, as the authors' procedure: the scores
    S_ij = x_i . x_j (fp32, fp64 for fp64) of the pairs i < j with labels[i] != labels[j],
    sorted ascending into s [L]; Q1 = s[floor(L / 4)], Q3 = s[floor(3 L / 4)], and the values
    in [Q1 - whisker (Q3 - Q1), Q3 + whisker (Q3 - Q1)] kept, in ascending order, followed by
    the NaN ones (a NaN embedding), which are always kept. L = 0 gives an empty tensor.
    Differentiable in x through the kept pairs."""
    score = scores(x, x, SIMILARITY)
    n = labels.shape[0]
    upper = torch.ones(n, n, dtype=torch.bool, device=labels.device).triu(1)
    values = score[upper & (labels[:, None] != labels[None, :])]
    if values.numel() == 0:
        return values
    ordered = values.sort().values
    count = ordered.numel()
    q1, q3 = ordered[count // 4].detach(), ordered[(3 * count) // 4].detach()
    spread = q3 - q1
    kept = ((ordered >= q1 - whisker * spread) & (ordered <= q3 + whisker * spread)
            | ordered.isnan())
    return ordered[kept]
