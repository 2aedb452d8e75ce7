"""linear_spherical_z_loss: the spherical Z-loss of the output layer o = hidden @ weight^T + bias,
computed without the N x C outputs, at a cost of O(C d^2 + N d^2) instead of O(N C d).

The per-row math (mu, the floored sigma, z_c, the loss and the gradient structure
alpha + beta o_k + gamma [k = c]) is that of csrc/include/fusedloss/spherical.h. The loss
depends on a row of outputs only through o_c, sum_j o_j and the spread about the mean, and
each of those is a small quadratic form of the row's hidden vector.

Notation. A bias is the weight of a hidden feature that is always 1: with x_i = [h_i, 1] and
y_j = [w_j, q_j] (q = bias; without one, x_i = h_i and y_j = w_j), o_ij = x_i . y_j. D is
d + 1 with a bias, d without; rows i of X [N, D], classes j of Y [C, D], c = c_i the target.

Forward. Take any centre y~, here the computed mean row of Y, and the centred rows
y'_j = y_j - y~ (Y' = Y - 1 y~^T). For every centre, exactly:

    o_ij        = x_i . y~ + e_ij,            e_ij = x_i . y'_j
    mu_i        = x_i . y~ + m_i,             m_i  = x_i . s / C,   s = Y'^T 1   (D)
    o_ij - mu_i = e_ij - m_i
    C sigma_i^2 = sum_j e_ij^2 - C m_i^2 = x_i^T K x_i - C m_i^2,   K = Y'^T Y'  (D x D)
    o_ic - mu_i = x_i . y'_c - m_i            (a gather of the target rows)

With a column of ones appended, A = [Y' | 1] (C x (D + 1)), the single product
A^T A = [[K, s], [s^T, C]] gives K and s: O(C d^2), one pass over W in blocks of rows. A row
then costs O(d^2). The centre only matters for rounding: with y~ the mean row, s is rounding
residue, m_i is tiny (C m_i^2 is the correction term of the compensated two-pass variance),
and every quantity above has the size of the spread, not of the mean. A common component of
the rows of W, or a large common bias, never enters K, so nothing cancels. The uncentred Gram
matrix would get C sigma^2 as the difference of x^T Y^T Y x and C mu^2, two numbers of size
C mu^2: a relative error of eps (mu / sigma)^2, about 6e-4 in fp32 when mu = 100 sigma.

Backward. spherical.h gives dL_i/do_ij = alpha_i + beta_i o_ij + gamma_i [j = c_i] with
g = sigmoid(a (b - z_c)), gamma = -g / sigma, beta = g z_c / (C sigma^2) (0 where sigma is
floored) and alpha = g / (C sigma) - beta mu. About the centre,
alpha + beta o_ij = beta (e_ij - m_i) + g / (C sigma), so

    delta_ij = dL_i/do_ij = kappa_i + beta_i e_ij + gamma_i [j = c_i],
    kappa_i  = g_i / (C sigma_i) - beta_i m_i.

Let rho_i be the incoming gradient of row i's loss (the reduction's weight; 0 on ignored
rows). A row's gradient sums to zero over j (shift invariance: C g / (C sigma) + gamma = 0 and
sum_j (o_ij - mu_i) = 0), so the mean row y~ drops out of the hidden gradient; and
sum_j e_ij y'_j = K x_i:

    dL/dx_i = rho_i sum_j delta_ij y_j = rho_i sum_j delta_ij y'_j
            = rho_i [ beta_i K x_i + kappa_i s + gamma_i y'_c ]
    dL/dY   = sum_i rho_i delta_i x_i^T
            = 1 p^T + Y' G + scatter into rows c_i of rho_i gamma_i x_i,
              G = X^T diag(rho beta) X (D x D),   p = X^T (rho kappa)   (D)

dL/dh and dL/dW are the first d columns of dL/dx and dL/dY, dL/dbias the last column of
dL/dY. The weight gradient is a structured update: a term along the all-ones vector, a
product with a D x D matrix (Y' G = Y G - 1 (G y~)^T, the part along 1 folded into p), and a
scatter into the target rows. With A as above, A [G; p^T] = Y' G + 1 p^T is one
product per block of rows, written straight into the gradient: G costs O(N d^2), the update
O(C d^2).

Cost and memory: O(C d^2 + N d^2) time; besides the inputs and the gradients, O(d^2) for K
and G, O(N d) for X, K x_i and the gathered target rows (ignored rows enter as x = 0), O(N)
per-row statistics, and one block of A (about 2^22 elements) at a time: no N x C matrix, in
forward or backward, and no copy of W. Reductions run in fp32 (fp64 for fp64 inputs);
fp16/bf16 weights are read in their dtype and converted a block at a time; gradients are
written in the inputs' dtype.
"""
import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _checks
from ._ops import accumulation_dtype, reduce_rows, result_dtype
from .reference import spherical as reference
from .reference.spherical import SIGMA_FLOOR
from .spherical import check_options, options_of, spherical_keywords

_FN = "linear_spherical_z_loss"
_BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
# Elements of A = [Y - 1 y~^T | 1] per block of rows: 16 MiB in fp32. Fewer, larger products
# keep the per-call synchronisation of the threads of a matrix product out of the way.
_BLOCK_ELEMENTS = 1 << 22


@spherical_keywords
def linear_spherical_z_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
    **options,
) -> torch.Tensor:
    """The spherical Z-loss of ``o = hidden @ weight.T + bias``, without forming ``o``.

    ``hidden [N, d]``, ``weight [C, d]`` (C >= 2), ``bias [C]`` or None, one floating dtype
    and one device; ``target [N]`` holds class indices in ``[0, C)`` or ``ignore_index``.
    Per row, ``mu = mean(o)``, ``sigma = max(std(o), 1e-12)`` (population std, floored),
    ``z_c = (o_c - mu) / sigma`` and the loss is ``softplus(a * (b - z_c)) / a``; ``a > 0``.
    ``reduction`` is "mean" (over rows that are not ignored), "sum" or "none", as in
    ``F.cross_entropy``. The result equals ``spherical_z_loss(hidden @ weight.T + bias, ...)``
    up to rounding.

    The loss needs only the column sums of ``weight``, the Gram matrix of its centred rows and
    the target rows, so the cost is O(C d^2 + N d^2) rather than O(N C d), and memory is
    O(C d + d^2): no ``N x C`` matrix in forward or backward (derivation in this module's
    docstring). Centring keeps it exact up to rounding when the outputs' mean is large
    against their spread. Against forming the outputs, the saving in arithmetic is about
    ``min(N, C) / d`` (and the ``N x C`` memory): large for a wide output layer on a modest
    ``d``, small when ``d`` is comparable to ``N`` or ``C``.

    Backends: "auto", "cpu" and "cuda" all run the same factored implementation, written
    with torch ops (matrix products, index_add), on CPU and CUDA tensors alike; "cpu" and
    "cuda" only insist on the tensors' device. It is bound by its matrix products, so it has
    no hand-written kernel and no "triton" backend. "reference" forms the ``N x C`` outputs
    (the oracle). Gradients flow to ``hidden``, ``weight`` and ``bias``; double backward is
    not supported.
    """
    a, b, ignore_index, reduction = options_of(_FN, options)
    _check_inputs(hidden, weight, target, bias, a, b, ignore_index, reduction, backend)
    _checks.target_values(_FN, target, weight.shape[0], ignore_index)
    if backend == "reference":
        return reference.linear_spherical_z_loss(
            hidden, weight, target, bias, a=a, b=b, ignore_index=ignore_index, reduction=reduction,
        ).to(result_dtype(hidden))
    target = target.long()
    loss_rows = _LinearSphericalZLoss.apply(hidden, weight, bias, target, float(a), float(b),
                                            ignore_index)
    return reduce_rows(loss_rows, target != ignore_index, reduction, result_dtype(hidden))


def _check_inputs(hidden, weight, target, bias, a, b, ignore_index, reduction, backend):
    _checks.floating_tensor(_FN, "hidden", hidden, ndim=2)
    _checks.floating_tensor(_FN, "weight", weight, ndim=2)
    if bias is not None:
        _checks.floating_tensor(_FN, "bias", bias, ndim=1)
    _checks.target_tensor(_FN, target, hidden.shape[0])
    _checks.same_device(_FN, hidden=hidden, weight=weight, bias=bias, target=target)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{_FN}: hidden and {name} must share a dtype, got "
                            f"{hidden.dtype} and {t.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{_FN}: hidden [N, d] and weight [C, d] must share d, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if weight.shape[0] < 2:
        raise ValueError(f"{_FN}: needs at least 2 classes (weight [C, d] with C >= 2), got "
                         f"C = {weight.shape[0]}: with one class the spread of the outputs is "
                         "zero by definition and z is undefined")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{_FN}: bias must have shape [C] = [{weight.shape[0]}] (one entry per "
                         f"row of weight), got {tuple(bias.shape)}")
    check_linear_options(_FN, a, b, ignore_index, reduction, backend)
    if backend in ("cpu", "cuda") and hidden.device.type != backend:
        raise ValueError(f"{_FN}: backend {backend!r} runs on {backend} tensors, got tensors on "
                         f"{hidden.device}")


def check_linear_options(fn: str, a, b, ignore_index, reduction, backend) -> None:
    """The keywords of linear_spherical_z_loss: those of every spherical Z-loss op, and a
    backend other than "triton"."""
    check_options(fn, a, b, ignore_index, reduction)
    _checks.choice(fn, "backend", backend, _BACKENDS)
    if backend == "triton":
        raise ValueError(f"{fn}: no Triton kernel for linear_spherical_z_loss; the factored "
                         "implementation is matmul-bound and runs on any device (use backend="
                         "'auto')")


class _Classes:
    """Y = [W | bias] (rows y_j), its centre y~ (the mean row), blocks of A = [Y - 1 y~^T | 1]."""

    def __init__(self, weight, bias, acc, centre=None):
        self.weight, self.bias, self.acc = weight, bias, acc
        self.num_classes, self.d = weight.shape
        self.D = self.d + (bias is not None)
        if centre is not None:  # the backward's view of the forward's classes
            self.centre = centre
            return
        self.centre = torch.zeros(self.D, dtype=acc, device=weight.device)
        if weight.dtype == acc:
            self.centre[:self.d] = weight.sum(0)
        else:  # converted a block at a time, never a whole copy of W
            for lo, hi in self.blocks():
                self.centre[:self.d] += weight[lo:hi].to(acc).sum(0)
        if bias is not None:
            self.centre[self.d] = bias.to(acc).sum()
        self.centre /= self.num_classes

    def blocks(self):
        step = max(1, _BLOCK_ELEMENTS // (self.D + 1))
        for lo in range(0, self.num_classes, step):
            yield lo, min(lo + step, self.num_classes)

    def block_buffer(self):
        rows = min(self.num_classes, max(1, _BLOCK_ELEMENTS // (self.D + 1)))
        buf = torch.empty(rows, self.D + 1, dtype=self.acc, device=self.weight.device)
        buf[:, self.D] = 1
        return buf

    def fill(self, buf, lo, hi):
        """A[lo:hi] = [y'_lo .. y'_hi | 1], in buf (made by block_buffer)."""
        a = buf[:hi - lo]
        a[:, :self.d].copy_(self.weight[lo:hi])  # (no out= into a column slice: torch.compile
        if self.bias is not None:                  # refuses a non-contiguous out= tensor)
            a[:, self.d].copy_(self.bias[lo:hi])
        a[:, :self.D].sub_(self.centre)
        return a

    def centred_rows(self, index):
        """y'_j for j in index: [len(index), D]."""
        rows = self.weight[index].to(self.acc)
        if self.bias is not None:
            rows = torch.cat([rows, self.bias[index].to(self.acc)[:, None]], 1)
        return rows - self.centre

    def gram(self):
        """A^T A = [[K, s], [s^T, C]] over all classes."""
        buf = self.block_buffer()
        M = torch.zeros(self.D + 1, self.D + 1, dtype=self.acc, device=self.weight.device)
        for lo, hi in self.blocks():
            a = self.fill(buf, lo, hi)
            M.addmm_(a.t(), a)
        return M


def _augmented_hidden(hidden, bias, acc):
    x = hidden.to(acc)
    if bias is not None:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
    return x


def _without_autocast(device: torch.device):
    """Autocast off on `device` (the statistics are accumulated in acc dtype); nothing to turn
    off on a device without autocast (meta tensors, for shape inference)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class _LinearSphericalZLoss(torch.autograd.Function):
    """Per-row losses (acc dtype, 0 on ignored rows) of o = hidden @ weight^T + bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, a, b, ignore_index):
        with _without_autocast(hidden.device):
            acc = accumulation_dtype(hidden)
            classes = _Classes(weight, bias, acc)
            num_classes, D = classes.num_classes, classes.D
            M = classes.gram()
            K, s = M[:D, :D], M[:D, D]
            valid = target != ignore_index
            safe = torch.where(valid, target, torch.zeros_like(target))
            # Ignored rows become x = 0: finite statistics whatever they held, no gradient.
            X = torch.where(valid[:, None], _augmented_hidden(hidden, bias, acc), 0.0)

            KX = X @ K                                          # rows K x_i (K symmetric)
            m = (X @ s) / num_classes                           # x_i . s / C
            sum_sq = ((KX * X).sum(1) - num_classes * m * m).clamp_min(0)  # C sigma^2
            sigma_raw = (sum_sq / num_classes).sqrt()
            floored = sigma_raw <= SIGMA_FLOOR                  # False for NaN: NaN propagates
            sigma = sigma_raw.clamp_min(SIGMA_FLOOR)
            z = ((X * classes.centred_rows(safe)).sum(1) - m) / sigma
            loss = torch.where(valid, F.softplus(a * (b - z)) / a, torch.zeros_like(z))

        ctx.a, ctx.b, ctx.hidden_dtype = a, b, hidden.dtype
        ctx.save_for_backward(X, weight, bias, classes.centre, safe, valid, s, KX, m, sigma, z,
                              floored)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        X, weight, bias, centre, safe, valid, s, KX, m, sigma, z, floored = ctx.saved_tensors
        a, b = ctx.a, ctx.b
        classes = _Classes(weight, bias, X.dtype, centre)
        need_h, need_w, need_q = ctx.needs_input_grad[:3]
        grad_h = grad_w = grad_q = None
        with _without_autocast(X.device):
            acc, d = X.dtype, classes.d
            num_classes = classes.num_classes
            zero = torch.zeros_like(z)
            rho = torch.where(valid, grad_rows.to(acc), zero)
            g = torch.sigmoid(a * (b - z))
            gamma = -g / sigma
            beta = torch.where(floored, zero, g * z / (num_classes * sigma * sigma))
            kappa = g / (num_classes * sigma) - beta * m
            r_beta, r_kappa = rho * beta, rho * kappa
            r_gamma = torch.where(valid, rho * gamma, zero)

            if need_h:
                grad_x = (r_beta[:, None] * KX + r_kappa[:, None] * s
                          + r_gamma[:, None] * classes.centred_rows(safe))
                grad_h = grad_x[:, :d].to(ctx.hidden_dtype).contiguous()
            if need_w or need_q:
                # [G; p^T] = [X^T diag(rho beta) X; (rho kappa)^T X]: A [G; p^T] = Y' G + 1 p^T
                update = torch.cat([(X * r_beta[:, None]).t() @ X, (r_kappa @ X)[None]], 0)
                # the scatter into the target rows, rho_i gamma_i x_i (0 on ignored rows)
                scatter = torch.where(valid[:, None], r_gamma[:, None] * X, torch.zeros_like(X))
                if need_w:
                    grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
                if need_q:
                    grad_q = torch.empty(num_classes, dtype=acc, device=X.device)
                buf = classes.block_buffer()
                for lo, hi in classes.blocks():
                    a_blk = classes.fill(buf, lo, hi)
                    if need_w and grad_w.dtype == acc:
                        torch.mm(a_blk, update[:, :d], out=grad_w[lo:hi])
                    elif need_w:
                        # fp16/bf16: add this block's part of the scatter in acc, round once
                        block = a_blk @ update[:, :d]
                        inside = (safe >= lo) & (safe < hi)
                        block.index_add_(0, (safe - lo).clamp(0, hi - lo - 1),
                                         torch.where(inside[:, None], scatter[:, :d], 0.0))
                        grad_w[lo:hi].copy_(block)
                    if need_q:
                        torch.mv(a_blk, update[:, d], out=grad_q[lo:hi])
                if need_w and grad_w.dtype == acc:
                    grad_w.index_add_(0, safe, scatter[:, :d])
                if need_q:
                    grad_q = grad_q.index_add_(0, safe, scatter[:, d]).to(bias.dtype)
        return grad_h, grad_w, grad_q, None, None, None, None
