"""LDR-KL, the label-distributionally robust loss with a KL regulariser, in plain PyTorch:
the oracle of fusedloss.ldr_kl_loss and fusedloss.linear_ldr_kl_loss.

Row loss (Zhu, Ying, Yang, "Label Distributionally Robust Losses for Multi-class
Classification", ICML 2023), with logits z [C], target y, margin c and temperature lam > 0:

    L = lam * log( (1/C) * sum_k exp((z_k - z_y + c [k != y]) / lam) )

written here straight from the formula, with ordinary autograd. `lam` is a float or a
per-row tensor [N]; no gradient flows into it.
"""
import math

import torch
import torch.nn.functional as F


def ldr_kl_loss(logits, target, *, lam=1.0, margin=2.0, ignore_index=-100, reduction="mean"):
    """LDR-KL per row, reduced as F.cross_entropy (mean over the rows not ignored)."""
    n, c = logits.shape
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    z_y = logits.gather(1, safe[:, None])
    shift = margin * (1.0 - F.one_hot(safe, c).to(logits.dtype))
    lam = lam.detach().to(logits.dtype)[:, None] if torch.is_tensor(lam) else lam
    inner = torch.logsumexp((logits - z_y + shift) / lam, dim=1, keepdim=True) - math.log(c)
    rows = (lam * inner).squeeze(1)
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum()


def linear_ldr_kl_loss(hidden, weight, target, *, bias=None, **kwargs):
    """ldr_kl_loss of the logits hidden @ weight^T + bias, materialising the N x C matrix."""
    return ldr_kl_loss(F.linear(hidden, weight, bias), target, **kwargs)
