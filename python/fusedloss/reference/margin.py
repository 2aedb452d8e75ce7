"""The margin softmax cross-entropy in plain PyTorch: the oracle every backend is tested against.

The math (logits, the SphereFace continuation past pi, the clamped margin derivative,
label smoothing, the auxiliary term lambda lse^2) is derived in csrc/include/fusedloss/margin.h. This file writes it with
ordinary autograd so that nothing here depends on the kernels' derivation of the gradient.
"""
import math

import torch
import torch.nn.functional as F

THETA_EPS = 0.01  # rad; the margin derivative is evaluated at theta in [eps, pi - eps]


def _continued_cos(phi):
    """psi(phi) = (-1)^k cos(phi) - 2k with k = floor(phi / pi): decreasing on all of R."""
    k = torch.floor(phi / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * torch.cos(phi) - 2.0 * k


def _straight_through_clamp(x, lo, hi):
    """clamp(x, lo, hi) in value, identity in gradient."""
    return x + (x.clamp(lo, hi) - x).detach()


def target_logit(cos_y, *, scale, m1, m2, m3, margin_grad):
    """z_y = s * (psi(m1 * theta + m2) - m3), with its derivative taken at the clamped theta.

    m2 and m3 may be floats or per-row tensors. CosFace (m1 = 1, m2 = 0 as floats) never
    calls arccos.
    """
    if margin_grad == "detached":
        shifted = target_logit(cos_y.detach(), scale=scale, m1=m1, m2=m2, m3=m3, margin_grad="exact")
        return scale * cos_y + (shifted - scale * cos_y).detach()
    if not torch.is_tensor(m2) and m1 == 1.0 and m2 == 0.0:
        return scale * (cos_y - m3)
    theta = torch.acos(cos_y.clamp(-1.0, 1.0))
    value = scale * (_continued_cos(m1 * theta + m2) - m3)
    # Gradient path: the same function at theta kept inside [eps, pi - eps].
    lo, hi = math.cos(math.pi - THETA_EPS), math.cos(THETA_EPS)
    theta_c = torch.acos(_straight_through_clamp(cos_y, lo, hi))
    grad_path = scale * (_continued_cos(m1 * theta_c + m2) - m3)
    return value.detach() + grad_path - grad_path.detach()


def margin_cross_entropy(cos, target, *, scale=64.0, m1=1.0, m2=0.0, m3=0.0, margin_grad="exact",
                         label_smoothing=0.0, lse_square_scale=0.0, tau=1.0, softcap=None,
                         interclass_filtering_threshold=0.0, extra_negatives=None,
                         return_lse=False, ignore_index=-100, reduction="mean"):
    """Margin softmax cross-entropy, computed in the precision of `cos` (pass fp64 for an oracle).

    m2 and m3 are floats or per-row tensors of shape [N] (ElasticFace draws, already
    made by the caller). Every argument has the meaning of fusedloss.margin_cross_entropy;
    each option is written the plain way: the filtered cosines by torch.where, the softcap
    on the logits, the extra negatives as literal columns [z | scale * e], tau on
    F.cross_entropy's per-row loss.
    """
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    target_mask = F.one_hot(safe_target, cos.shape[1]).bool()
    cos_y = cos.gather(1, safe_target[:, None]).squeeze(1)
    if interclass_filtering_threshold > 0:
        # insightface: a non-target cosine above the threshold becomes 0, with no gradient.
        dirty = (cos > interclass_filtering_threshold) & ~target_mask
        cos = torch.where(dirty, torch.zeros_like(cos), cos)
    z_y = target_logit(cos_y, scale=scale, m1=m1, m2=m2, m3=m3, margin_grad=margin_grad)
    logits = torch.where(target_mask, z_y[:, None], scale * cos)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if extra_negatives is not None:
        shared = (scale * extra_negatives.to(logits.dtype))[None, :]
        logits = torch.cat([logits, shared.expand(logits.shape[0], -1)], dim=1)
    plain = (lse_square_scale == 0 and tau == 1.0 and not return_lse)
    if plain:
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    rows = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    if tau != 1.0:  # comp-sum: (p_y^(tau - 1) - 1) / (1 - tau) with -log p_y = rows
        rows = torch.expm1((1.0 - tau) * rows) / (1.0 - tau)
    lse = torch.logsumexp(logits, dim=1)
    # PaLM's auxiliary term lambda * logsumexp(z)^2 on the rows that are not ignored.
    rows = rows + torch.where(valid, lse_square_scale * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows.sum() / valid.sum()
    if return_lse:
        return out, torch.where(valid, lse, torch.zeros_like(lse))
    return out


def linear_margin_cross_entropy(embeddings, weight, target, *, normalize=True, **kwargs):
    """margin_cross_entropy of cos = normalize(embeddings) @ normalize(weight)^T (or of
    embeddings @ weight^T without normalize), materialising the N x C matrix."""
    if normalize:
        embeddings, weight = F.normalize(embeddings), F.normalize(weight)
    return margin_cross_entropy(embeddings @ weight.t(), target, **kwargs)
