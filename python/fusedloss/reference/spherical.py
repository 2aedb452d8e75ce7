"""The spherical Z-loss in plain PyTorch: the oracle of fusedloss.spherical_z_loss.

Math: csrc/include/fusedloss/spherical.h. Autograd differentiates this code directly."""
import torch
import torch.nn.functional as F

# The floor of sigma, csrc/include/fusedloss/spherical.h kSigmaFloor. Its one definition in
# Python: the other backends' Python and Triton code import it from here.
SIGMA_FLOOR = 1e-12


def spherical_z_loss(logits, target, *, a=1.0, b=0.0, ignore_index=-100, reduction="mean"):
    """softplus(a (b - z_c)) / a with z_c = (o_c - mean(o)) / max(std(o), floor), per row;
    reduced as F.cross_entropy reduces (mean over rows that are not ignored)."""
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    mu = logits.mean(1, keepdim=True)
    # Floored before the square root (same value): sqrt's derivative at 0 would be inf.
    sigma = (logits - mu).pow(2).mean(1).clamp_min(SIGMA_FLOOR**2).sqrt()
    z = (logits.gather(1, safe[:, None]).squeeze(1) - mu.squeeze(1)) / sigma
    loss = torch.where(valid, F.softplus(a * (b - z)) / a, torch.zeros_like(z))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()


def linear_spherical_z_loss(hidden, weight, target, bias=None, *, a=1.0, b=0.0, ignore_index=-100,
                            reduction="mean"):
    """spherical_z_loss of o = hidden @ weight^T + bias, materialising the N x C outputs: the
    oracle of fusedloss.linear_spherical_z_loss."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return spherical_z_loss(logits, target, a=a, b=b, ignore_index=ignore_index,
                            reduction=reduction)
