"""FactoredSphericalLinear: the exact factored plain-SGD update of Vincent, de Brebisson and
Bouthillier (NeurIPS 2015, "Efficient Exact Gradient Update for training Deep Networks with
Very Large Sparse Targets") applied to the spherical Z-loss output layer.

Notation as in spherical_linear.py: a bias is the weight of an always-1 feature, x_i = [h_i, 1]
and y_j = [w_j, q_j] (without a bias x_i = h_i, y_j = w_j), D = d + 1 with a bias, d without;
Y [C, D] holds the rows y_j, X [m, D] the rows x_i, c_i the targets.

State (all O(C D + D^2) memory; Y is never formed during training):

    Y = V U + 1 w^T           V [C, D], U [D, D], w [D]
    Uinv = U^-1               [D, D]
    s = Y^T 1                 [D]      column sums of Y
    K = Y'^T Y'               [D, D]   Gram matrix of the centred rows Y' = Y - 1 s^T / C

K is the centred form of the paper's Q = Y^T Y (Q = K + s s^T / C, exposed as ``gram()``):
centring keeps the spread of the outputs free of cancellation when their mean is large
(spherical_linear.py explains why); it costs nothing more to maintain.

Forward, O(m D^2). With the centre y~ = s / C, the centred rows sum to zero, so the mean of a
row's centred outputs m_i = x_i . (Y'^T 1) / C is exactly 0 and

    C sigma_i^2 = x_i^T K x_i,    z_i = x_i . (y_c - y~) / sigma_i,    y_c = V[c] U + w.

Backward (spherical_linear.py): with rho_i the incoming weight of row i's loss, g, beta, gamma
as in spherical.h, kappa_i = g_i / (C sigma_i) (m_i = 0):

    dL/dx_i = rho_i (beta_i K x_i + gamma_i y'_c)
    dL/dY   = Y' G + 1 p^T + T,   G = X^T diag(rho beta) X,   p = X^T (rho kappa),
              T = scatter into rows c_i of rho_i gamma_i x_i.

The SGD step Y <- Y - lr dL/dY. With Y' G = Y G - 1 (G y~)^T, R = lr rho beta (m),
M = I - lr G = I - X^T diag(R) X (symmetric), r = lr p - lr G y~ and t_i = -lr rho_i gamma_i x_i:

    Y_new = Y M - 1 r^T + scatter(t)

which the factors absorb as

    U    <- U M            = U - (U X^T) diag(R) X                       (right product)
    Uinv <- M^-1 Uinv      = Uinv + X^T diag(R) (I_m - X X^T diag(R))^-1 (X Uinv)  (Woodbury)
    w    <- M w - r                                                      (the part along 1)
    V[c] += (sum of t_i over rows i with c_i = c) Uinv_new               (the scatter)

and the bookkeeping, with P = sum_i y'_{c_i} t_i^T (old centred target rows), tau = sum_i t_i,
T~ the t_i summed per distinct target (so that T^T T = T~^T T~):

    s <- s - C lr p + tau          (M s - C r = s - C lr p: the columns of Y' G sum to zero)
    K <- M K M + M P + P^T M + T~^T T~ - tau tau^T / C

(Y_new' = Y' M + T', T' = T - 1 tau^T / C, and Y'^T 1 = 0.) Every product above involves X
(m rows) or the m x m matrix X K X^T, so a step costs O(m D^2 + m^2 D + m^3), independent of C:
the gathers and the scatter touch m rows of V.

Stabilisation. Rounding drifts U, Uinv, K and s away from the exact relations, and U can grow
ill-conditioned (M is a product of near-identity factors). Every ``stabilize_every`` steps
(default 1000) the layer folds the factors, V <- V U + 1 w^T, U = Uinv = I, w = 0, and recomputes
s and K exactly from V (centred Gram, in blocks): O(C D^2) time, O(C D) memory for the new V,
amortised O(C D^2 / stabilize_every) per step. ``stabilize()`` runs it on demand. Measured
(C = 2000, d = 16, m = 32, lr = 1, bias, 1000 steps, no stabilisation at all): cond(U) grew
from 1 to 1.07 and the effective weight stayed within 9e-7 (fp32) and 3e-15 (fp64) relative of
a dense fp64 SGD run, so the period is generous; at C = 200k, d = 32 a fold costs ~0.25 s on 2
CPU cores against ~2 ms per factored step, i.e. ~0.25 ms per step amortised at period 1000. A step
whose M is (nearly) singular cannot be absorbed by U^-1 (det M = det(I_m - X X^T diag(R)),
Sylvester): when the condition number of that m x m matrix exceeds ``cond_limit`` (1e8 in
fp64, 1e4 otherwise) the step folds V <- V U M + 1 w_new^T, adds the scatter to V directly and
recomputes s and K (O(C D^2), counted in ``refolds``; it does not occur at sensible learning
rates).

When it applies. The update is exactly that of ``torch.optim.SGD(lr=lr)`` (no momentum, no
weight decay, no dampening or nesterov) on a dense ``SphericalLinear`` with the same weights
and bias, and the same reduction. The layer's weight is not an ``nn.Parameter``: no optimiser
sees it, so learning-rate schedules must set ``layer.lr``; gradient accumulation over several
forwards before one backward is refused (each backward applies its own step, and a backward
whose forward preceded another step raises); ``backward(retain_graph=True)`` twice would apply
the step twice. The gradient with respect to ``hidden`` flows back normally (computed with the
weights before the step, as the dense layer's is). Forward without grad (eval, no_grad) changes
nothing.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _checks
from .reference.spherical import SIGMA_FLOOR
from .spherical import check_options

_BLOCK_ROWS = 1 << 16


class FactoredSphericalLinear(torch.nn.Module):
    """Spherical Z-loss output layer trained by exact factored plain SGD, at a cost per step
    independent of the number of classes (see this module's docstring for the equations).

    ``forward(hidden, target)`` returns the loss (``reduction`` "mean" over non-ignored rows or
    "sum"); backward propagates to ``hidden`` and applies one SGD step with learning rate
    ``lr`` to the factored weight. ``weight()``, ``bias()`` and ``logits(hidden)`` materialise
    the effective parameters (O(C D^2); for evaluation and tests). Initialised as
    ``SphericalLinear`` (``torch.nn.Linear``'s init) unless ``load_dense`` is used.
    """

    def __init__(self, in_features: int, num_classes: int, lr: float, a: float = 1.0,
                 b: float = 0.0, bias: bool = True, *, ignore_index: int = -100,
                 reduction: str = "mean", stabilize_every: int = 1000, device=None, dtype=None):
        super().__init__()
        if in_features < 1 or num_classes < 2:
            raise ValueError("FactoredSphericalLinear: needs in_features >= 1 and num_classes "
                             f">= 2, got {in_features} and {num_classes}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"FactoredSphericalLinear: reduction must be 'mean' or 'sum', got "
                             f"{reduction!r}")
        _checks.at_least("FactoredSphericalLinear", 0.0, lr=lr)  # as torch.optim.SGD
        check_options("FactoredSphericalLinear", a, b, ignore_index, reduction)
        _checks.integer("FactoredSphericalLinear", stabilize_every=stabilize_every)
        if stabilize_every < 1:
            raise ValueError(f"FactoredSphericalLinear: stabilize_every must be >= 1, got "
                             f"{stabilize_every}")
        self.in_features, self.num_classes = in_features, num_classes
        self.has_bias = bool(bias)
        self.lr, self.a, self.b = float(lr), float(a), float(b)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.stabilize_every = int(stabilize_every)
        self.steps = 0          # SGD steps applied
        self._version = 0       # bumped by every change of the state
        dtype = dtype or torch.get_default_dtype()
        D = in_features + self.has_bias
        kw = dict(device=device, dtype=dtype)
        self.register_buffer("V", torch.zeros(num_classes, D, **kw))
        self.register_buffer("U", torch.eye(D, **kw))
        self.register_buffer("Uinv", torch.eye(D, **kw))
        self.register_buffer("w", torch.zeros(D, **kw))
        self.register_buffer("s", torch.zeros(D, **kw))
        self.register_buffer("K", torch.zeros(D, D, **kw))
        self.refolds = 0        # steps whose M was too ill-conditioned for U^-1 (folded)
        # Largest condition number of the m x m Woodbury matrix before a step folds instead.
        self.cond_limit = 1e8 if dtype == torch.float64 else 1e4
        self.reset_parameters()

    @property
    def D(self) -> int:
        return self.V.shape[1]

    # ----------------------------------------------------------------- state management
    @torch.no_grad()
    def reset_parameters(self) -> None:
        weight = torch.empty(self.num_classes, self.in_features, dtype=self.V.dtype,
                             device=self.V.device)
        torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        bias = None
        if self.has_bias:
            bound = 1 / math.sqrt(self.in_features)
            bias = torch.empty(self.num_classes, dtype=weight.dtype,
                               device=weight.device).uniform_(-bound, bound)
        self.load_dense(weight, bias)

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """Set the effective weight [C, d] (and bias [C] when the layer has one)."""
        if tuple(weight.shape) != (self.num_classes, self.in_features):
            raise ValueError(f"load_dense: weight must be [{self.num_classes}, "
                             f"{self.in_features}], got {tuple(weight.shape)}")
        if (bias is not None) != self.has_bias:
            raise ValueError("load_dense: give a bias exactly when the layer has one")
        self.V[:, :self.in_features].copy_(weight)
        if bias is not None:
            self.V[:, self.in_features].copy_(bias)
        self.U.copy_(torch.eye(self.D, dtype=self.U.dtype, device=self.U.device))
        self.Uinv.copy_(self.U)
        self.w.zero_()
        self._recompute_statistics()

    def _recompute_statistics(self) -> None:
        """s = V^T 1 and K = centred Gram of V, exactly (U = I, w = 0 assumed)."""
        V = self.V
        self.s.copy_(V.sum(0))
        centre = self.s / self.num_classes
        K = torch.zeros_like(self.K)
        for lo in range(0, self.num_classes, _BLOCK_ROWS):
            blk = V[lo:lo + _BLOCK_ROWS] - centre
            K.addmm_(blk.t(), blk)
        self.K.copy_(K)
        self._version += 1

    @torch.no_grad()
    def stabilize(self) -> None:
        """Fold the factors: V <- V U + 1 w^T, U = Uinv = I, w = 0; recompute s and K exactly.
        O(C D^2) time."""
        self._fold()
        self._recompute_statistics()

    def _fold(self) -> None:
        for lo in range(0, self.num_classes, _BLOCK_ROWS):
            blk = self.V[lo:lo + _BLOCK_ROWS]
            blk.copy_(torch.addmm(self.w, blk, self.U))  # a new block, then copied back
        eye = torch.eye(self.D, dtype=self.U.dtype, device=self.U.device)
        self.U.copy_(eye)
        self.Uinv.copy_(eye)
        self.w.zero_()
        self._version += 1

    # ----------------------------------------------------------------- effective parameters
    @torch.no_grad()
    def effective(self) -> torch.Tensor:
        """Y = V U + 1 w^T, [C, D] (O(C D^2))."""
        return torch.addmm(self.w, self.V, self.U)

    def weight(self) -> torch.Tensor:
        """The effective weight W [C, d], materialised."""
        return self.effective()[:, :self.in_features]

    def bias(self) -> Optional[torch.Tensor]:
        """The effective bias [C], materialised, or None."""
        return self.effective()[:, self.in_features] if self.has_bias else None

    def gram(self) -> torch.Tensor:
        """Q = Y^T Y = K + s s^T / C from the bookkeeping (D x D)."""
        return self.K + torch.outer(self.s, self.s) / self.num_classes

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        Y = self.effective()
        out = hidden.to(Y.dtype) @ Y[:, :self.in_features].t()
        if self.has_bias:
            out = out + Y[:, self.in_features]
        return out

    # ----------------------------------------------------------------- training
    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 2 or hidden.shape[1] != self.in_features:
            raise ValueError(f"FactoredSphericalLinear: hidden must be [N, {self.in_features}], "
                             f"got {tuple(hidden.shape)}")
        if target.shape != (hidden.shape[0],) or target.dtype.is_floating_point:
            raise ValueError("FactoredSphericalLinear: target must be an integer tensor [N], "
                             f"got {target.dtype} {tuple(target.shape)}")
        target = target.long()
        valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= self.num_classes))
        if bool(bad.any()):
            raise ValueError(f"FactoredSphericalLinear: target values must lie in [0, "
                             f"{self.num_classes}) or equal ignore_index={self.ignore_index}")
        # A fresh leaf that requires grad, so that backward (and with it the step) runs even
        # when hidden does not require grad; it receives no gradient.
        trigger = torch.zeros((), device=hidden.device, requires_grad=torch.is_grad_enabled())
        loss = _FactoredStep.apply(hidden, trigger, self, target, valid)
        return loss.to(hidden.dtype)

    @torch.no_grad()
    def _rows(self, hidden, target, valid):
        """X (ignored rows zeroed), safe targets, centred target rows y'_c."""
        dt = self.V.dtype
        X = hidden.detach().to(dt)
        if self.has_bias:
            X = torch.cat([X, X.new_ones(X.shape[0], 1)], 1)
        X = torch.where(valid[:, None], X, 0.0)
        safe = torch.where(valid, target, torch.zeros_like(target))
        yc = torch.addmm(self.w - self.s / self.num_classes, self.V[safe], self.U)
        return X, safe, yc

    @torch.no_grad()
    def _apply_step(self, X, safe, valid, yc, KX, rho_beta, rho_kappa, rho_gamma):
        """One SGD step Y <- Y - lr dL/dY on the factors and the bookkeeping (module docstring)."""
        lr, C = self.lr, self.num_classes
        R = lr * rho_beta                                     # [m]
        XR = X * R[:, None]                                   # diag(R) X, [m, D]
        centre = self.s / C
        p = X.t() @ rho_kappa                                 # [D]
        G_lr_centre = XR.t() @ (X @ centre)                   # lr G y~
        r = lr * p - G_lr_centre
        t = X * (-lr * rho_gamma)[:, None]                    # rows t_i (0 on ignored rows)
        uniq, inv = torch.unique(safe[valid], return_inverse=True)
        # t summed per distinct target, as a product with the [k, m] one-hot of inv (O(m^2 D))
        onehot = inv[None, :] == torch.arange(uniq.shape[0], device=X.device)[:, None]
        T_agg = onehot.to(X.dtype) @ t[valid]
        tau = t.sum(0)

        # K <- M K M + M P + P^T M + T~^T T~ - tau tau^T / C, M = I - X^T diag(R) X
        K = self.K
        GK = XR.t() @ KX                                      # lr G K
        GKG = XR.t() @ ((KX @ X.t()) @ XR)                    # lr G K lr G
        P = yc.t() @ t                                        # sum_i y'_c t_i^T
        MP = P - XR.t() @ (X @ P)
        K_new = K - GK - GK.t() + GKG + MP + MP.t() + T_agg.t() @ T_agg - torch.outer(tau, tau) / C
        self.K.copy_((K_new + K_new.t()) / 2)
        self.s.add_(p, alpha=-C * lr).add_(tau)

        # U <- U M; w <- M w - r; Uinv <- M^-1 Uinv (Woodbury); V[c] += T~ Uinv_new
        m = X.shape[0]
        self.U.sub_((self.U @ X.t()) @ XR)
        self.w.sub_(XR.t() @ (X @ self.w)).sub_(r)
        inner = torch.eye(m, dtype=X.dtype, device=X.device) - X @ XR.t()   # I - X X^T diag(R)
        # det M = det(inner) (Sylvester): an ill-conditioned inner means a (nearly) singular
        # step M, which U^-1 cannot absorb. Then fold instead (O(C D^2), rare).
        if bool(torch.linalg.cond(inner) <= self.cond_limit):
            self.Uinv.add_(XR.t() @ torch.linalg.solve(inner, X @ self.Uinv))
            # uniq holds distinct rows: a gather and an index_put touch m rows. (index_add_
            # is avoided here and above: on this CPU build it ran through scatter_add_ at tens
            # of ms per call, growing with C, which made the step time depend on C.)
            self.V.index_put_((uniq,), self.V[uniq] + T_agg @ self.Uinv)
        else:
            self.refolds += 1
            self._fold()
            self.V.index_put_((uniq,), self.V[uniq] + T_agg)
            self._recompute_statistics()   # paid for already: make s and K exact too
        self.steps += 1
        self._version += 1
        if self.steps % self.stabilize_every == 0:
            self.stabilize()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, lr={self.lr}, "
                f"bias={self.has_bias}, a={self.a}, b={self.b}, reduction={self.reduction!r}, "
                f"stabilize_every={self.stabilize_every}")


class _FactoredStep(torch.autograd.Function):
    """Loss of the factored layer; backward returns dL/dhidden and applies the SGD step."""

    @staticmethod
    def forward(ctx, hidden, trigger, layer, target, valid):
        C = layer.num_classes
        with torch.no_grad():
            X, safe, yc = layer._rows(hidden, target, valid)
            KX = X @ layer.K
            sum_sq = (KX * X).sum(1).clamp_min(0)             # C sigma^2 (m = 0 exactly)
            sigma_raw = (sum_sq / C).sqrt()
            floored = sigma_raw <= SIGMA_FLOOR
            sigma = sigma_raw.clamp_min(SIGMA_FLOOR)
            z = (X * yc).sum(1) / sigma
            a, b = layer.a, layer.b
            rows = torch.where(valid, F.softplus(a * (b - z)) / a, torch.zeros_like(z))
            n = valid.sum()
            weight = (1.0 / n.clamp_min(1)) if layer.reduction == "mean" else torch.ones(())
            loss = rows.sum() * weight.to(rows.dtype)
        ctx.layer, ctx.version, ctx.hidden_dtype = layer, layer._version, hidden.dtype
        ctx.row_weight = weight
        ctx.save_for_backward(X, safe, valid, yc, KX, sigma, z, floored)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        layer = ctx.layer
        if layer._version != ctx.version:
            raise RuntimeError("FactoredSphericalLinear: the layer changed between this "
                               "forward and its backward (another step or stabilisation ran); "
                               "the factored update needs one backward per forward, in order")
        X, safe, valid, yc, KX, sigma, z, floored = ctx.saved_tensors
        C, a, b = layer.num_classes, layer.a, layer.b
        zero = torch.zeros_like(z)
        rho = torch.where(valid, grad_loss.to(z.dtype) * ctx.row_weight.to(z.dtype), zero)
        g = torch.sigmoid(a * (b - z))
        gamma = -g / sigma
        beta = torch.where(floored, zero, g * z / (C * sigma * sigma))
        kappa = g / (C * sigma)
        rho_beta, rho_kappa, rho_gamma = rho * beta, rho * kappa, rho * gamma
        grad_h = None
        if ctx.needs_input_grad[0]:
            grad_x = rho_beta[:, None] * KX + rho_gamma[:, None] * yc
            grad_h = grad_x[:, :layer.in_features].to(ctx.hidden_dtype)
        layer._apply_step(X, safe, valid, yc, KX, rho_beta, rho_kappa, rho_gamma)
        return grad_h, None, None, None, None
