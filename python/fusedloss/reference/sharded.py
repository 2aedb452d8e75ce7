"""The four sharded margin contracts (fusedloss/_schemas.py, family "sharded") in dense
PyTorch: the oracle of the cpu and triton kernels.

This rank holds the classes [class_start, class_start + C_local) of every row; target holds
global class ids. The stats are the per-row partials that fusedloss.sharded combines across
ranks; the grads turn the combined per-row coefficients (lse, a, b, d) back into this shard's
gradient. Everything is computed in the accumulation dtype (fp64 for fp64 inputs, else fp32);
the derivative of the margin logit comes from autograd through
fusedloss.reference.margin.target_logit, so nothing here depends on the kernels' derivation.
"""
import torch
import torch.nn.functional as F

from .._ops import accumulation_dtype
from .margin import target_logit


def _local_target(target, num_local, class_start, ignore_index):
    """(is the row's target in this shard, its local column where it is, else 0)."""
    target = target.long()
    local = target - class_start
    here = (target != ignore_index) & (local >= 0) & (local < num_local)
    return here, torch.where(here, local, torch.zeros_like(local))


def _margins(row_m2, row_m3, m2, m3, dtype):
    return (m2 if row_m2 is None else row_m2.to(dtype),
            m3 if row_m3 is None else row_m3.to(dtype))


def _logits(cos, target, row_m2, row_m3, scale, m1, m2, m3, detach_margin, class_start,
            ignore_index, softcap, filter_threshold):
    """(z [N, C_local] with the margin logit in the target column where it is local,
    here [N], col [N]), in the dtype of cos; non-target cosines above filter_threshold
    (when > 0) set to 0, every logit capped at softcap (when > 0)."""
    here, col = _local_target(target, cos.shape[1], class_start, ignore_index)
    m2, m3 = _margins(row_m2, row_m3, m2, m3, cos.dtype)
    cos_y = cos.gather(1, col[:, None]).squeeze(1)
    z_y = target_logit(cos_y, scale=scale, m1=m1, m2=m2, m3=m3,
                       margin_grad="detached" if detach_margin else "exact")
    is_target = F.one_hot(col, cos.shape[1]).bool() & here[:, None]
    if filter_threshold > 0:
        cos = torch.where((cos > filter_threshold) & ~is_target, torch.zeros_like(cos), cos)
    z = torch.where(is_target, z_y[:, None], scale * cos)
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    return z, is_target, here


def sharded_margin_stats(cos, target, row_m2, row_m3, scale, m1, m2, m3, class_start,
                         ignore_index, softcap=0.0, filter_threshold=0.0):
    """[N, 3] = (lse_other, z_y or 0, sum_z) of this shard; ignored rows (-inf, 0, 0)."""
    cos = cos.detach().to(accumulation_dtype(cos))
    z, is_target, here = _logits(cos, target, row_m2, row_m3, scale, m1, m2, m3, False,
                                 class_start, ignore_index, softcap, filter_threshold)
    ninf = torch.full_like(z, -float("inf"))
    lse_other = torch.logsumexp(torch.where(is_target, ninf, z), dim=1)
    z_y = torch.where(here, (z * is_target).sum(1), torch.zeros_like(lse_other))
    sum_z = z.sum(1)
    valid = target != ignore_index
    stats = torch.stack([lse_other, z_y, sum_z], dim=1)
    ignored = torch.tensor([-float("inf"), 0.0, 0.0], dtype=stats.dtype, device=stats.device)
    return torch.where(valid[:, None], stats, ignored)


def _coef_objective(cos, target, row_m2, row_m3, coef, scale, m1, m2, m3, detach_margin,
                    class_start, ignore_index, softcap, filter_threshold):
    """A scalar whose gradient with respect to cos is the grad contract:
    sum_i [ sum_{local j != y} (a_i exp(s c_ij - lse_i) - b_i s c_ij) + d_i z_y(c_iy) ] over the
    rows that are not ignored (their coefficients are zeroed first, so that whatever the caller
    left there cannot turn into 0 * inf in the gradient)."""
    z, is_target, _ = _logits(cos, target, row_m2, row_m3, scale, m1, m2, m3, detach_margin,
                              class_start, ignore_index, softcap, filter_threshold)
    valid = (target != ignore_index)[:, None]
    coef = torch.where(valid, coef.to(cos.dtype), torch.zeros_like(coef, dtype=cos.dtype))
    lse, a, b, d = coef.unbind(1)
    other = a[:, None] * torch.exp(z - lse[:, None]) - b[:, None] * z
    per_entry = torch.where(is_target, d[:, None] * z, other)
    return torch.where(valid, per_entry, torch.zeros_like(per_entry)).sum()


def sharded_margin_grad(cos, target, row_m2, row_m3, coef, scale, m1, m2, m3, detach_margin,
                        class_start, ignore_index, softcap=0.0, filter_threshold=0.0):
    """d/d cos of the combined loss for this shard, given coef [N, 4] = (lse, a, b, d)."""
    with torch.enable_grad():
        c = cos.detach().to(accumulation_dtype(cos)).requires_grad_(True)
        objective = _coef_objective(c, target, row_m2, row_m3, coef, scale, m1, m2, m3,
                                    detach_margin, class_start, ignore_index, softcap,
                                    filter_threshold)
        (grad,) = torch.autograd.grad(objective, c)
    return grad.to(cos.dtype)


def _cosines(embeddings, weight, normalize):
    if normalize:
        embeddings, weight = F.normalize(embeddings), F.normalize(weight)
    return embeddings @ weight.t()


def sharded_margin_linear_stats(embeddings, weight, target, row_m2, row_m3, scale, m1, m2, m3,
                                normalize, class_start, ignore_index, block_size, softcap=0.0,
                                filter_threshold=0.0):
    """sharded_margin_stats of cos = normalize(embeddings) @ normalize(weight)^T (without
    normalize: embeddings @ weight^T); block_size has no meaning here."""
    acc = accumulation_dtype(embeddings)
    cos = _cosines(embeddings.detach().to(acc), weight.detach().to(acc), normalize)
    return sharded_margin_stats(cos, target, row_m2, row_m3, scale, m1, m2, m3, class_start,
                                ignore_index, softcap, filter_threshold)


def sharded_margin_linear_grad(embeddings, weight, target, row_m2, row_m3, coef, scale, m1, m2,
                               m3, detach_margin, normalize, class_start, ignore_index,
                               block_size, softcap=0.0, filter_threshold=0.0):
    """(this shard's contribution to grad_embeddings, grad_weight), in the inputs' dtypes."""
    acc = accumulation_dtype(embeddings)
    with torch.enable_grad():
        x = embeddings.detach().to(acc).requires_grad_(True)
        w = weight.detach().to(acc).requires_grad_(True)
        objective = _coef_objective(_cosines(x, w, normalize), target, row_m2, row_m3, coef,
                                    scale, m1, m2, m3, detach_margin, class_start, ignore_index,
                                    softcap, filter_threshold)
        grad_x, grad_w = torch.autograd.grad(objective, (x, w))
    return grad_x.to(embeddings.dtype), grad_w.to(weight.dtype)
