"""The multi-label margin loss (MLCD) in plain PyTorch: the oracle of
fusedloss.multilabel_margin_cross_entropy and its linear form.

Row loss, with P the row's positive classes (targets [N, K], padding = ignore_index, a class
listed twice is one positive) and z_p the margin logit of margin_cross_entropy
(fusedloss.reference.margin.target_logit):

    L = log(1 + sum_{j not in P} exp(s c_j)) + log(1 + sum_{p in P} exp(-z_p)),

both log-sum-exps taken over a positive mask with an extra zero logit, straight from the
formula with ordinary autograd. A row without positives has loss 0 and leaves the mean.
"""
import torch
import torch.nn.functional as F

from .margin import target_logit


def positive_mask(targets, num_classes, ignore_index):
    """[N, C] bool: column j is a positive of row i."""
    hits = torch.zeros(targets.shape[0], num_classes, dtype=torch.float32,
                       device=targets.device)
    if num_classes == 0:
        return hits > 0
    listed = targets != ignore_index
    safe = torch.where(listed, targets, torch.zeros_like(targets)).long()
    return hits.scatter_reduce(1, safe, listed.float(), "amax") > 0


def _log1p_sum_exp(x):
    """log(1 + sum_j exp(x_j)) per row, x = -inf where an entry is left out."""
    return torch.logsumexp(F.pad(x, (1, 0), value=0.0), dim=1)


def multilabel_margin_cross_entropy(cos, targets, *, scale=64.0, m1=1.0, m2=0.0, m3=0.0,
                                    margin_grad="exact", ignore_index=-100, reduction="mean"):
    """MLCD loss, computed in the precision of `cos` (pass fp64 for an oracle)."""
    n, c = cos.shape
    pos = positive_mask(targets, c, ignore_index)
    valid = pos.any(dim=1)
    out = torch.full_like(cos, -float("inf"))
    negatives = _log1p_sum_exp(torch.where(pos, out, scale * cos))
    z = target_logit(cos, scale=scale, m1=m1, m2=m2, m3=m3, margin_grad=margin_grad)
    positives = _log1p_sum_exp(torch.where(pos, -z, out))
    rows = torch.where(valid, negatives + positives, torch.zeros_like(negatives))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum()


def linear_multilabel_margin_cross_entropy(embeddings, weight, targets, *, normalize=True,
                                           **kwargs):
    """multilabel_margin_cross_entropy of normalize(embeddings) @ normalize(weight)^T (or of
    embeddings @ weight^T without normalize), materialising the N x C matrix."""
    if normalize:
        embeddings, weight = F.normalize(embeddings), F.normalize(weight)
    return multilabel_margin_cross_entropy(embeddings @ weight.t(), targets, **kwargs)


def multilabel_margin_stats(cos, targets, scale, m1, m2, m3, detach_margin, class_start,
                            num_classes, ignore_index):
    """(lse_neg, lse_pos) [N, 2] of the shard [class_start, class_start + C_local) of the
    classes, as fusedloss::multilabel_margin_stats: the log-sum-exps over the shard's
    negatives and positives, -inf for an empty sum (with a zero gradient)."""
    local = targets - class_start
    inside = (targets != ignore_index) & (local >= 0) & (local < cos.shape[1])
    pos = positive_mask(torch.where(inside, local, torch.full_like(local, -1)), cos.shape[1], -1)
    out = torch.full_like(cos, -float("inf"))
    z = target_logit(cos, scale=scale, m1=m1, m2=m2, m3=m3,
                     margin_grad="detached" if detach_margin else "exact")
    return torch.stack((_safe_lse(torch.where(pos, out, scale * cos)),
                        _safe_lse(torch.where(pos, -z, out))), dim=1)


def _safe_lse(x):
    """logsumexp over dim 1; -inf with a zero gradient for a row of -inf (or no column)."""
    if x.shape[1] == 0:  # -inf, still a function of x (an empty gradient)
        return x.sum(dim=1) - float("inf")
    top = x.detach().max(dim=1, keepdim=True).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(x - top).sum(dim=1)
    some = total > 0
    return torch.where(some, top.squeeze(1) + torch.log(torch.where(some, total, 1.0)),
                       -float("inf"))
