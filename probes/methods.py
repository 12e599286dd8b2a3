"""Direction-finding methods: plain functions from contrast activations to a concept direction.

A method takes positive and negative activations for every layer at once,
``pos: [n_layers, n_pos, d_model]`` and ``neg: [n_layers, n_neg, d_model]``, and returns a
:class:`Fit`: one unit direction per layer, oriented so that positives project higher, and a
threshold on that projection for classification. Given 2-D input ``[n, d_model]`` (one layer) a
method returns ``direction: [d_model]`` and a scalar ``threshold``. The regression methods
(:data:`REGRESSION_METHODS`: ``ridge``) also take ``target=``, a continuous value per text (e.g. the
organism's exact log-odds), and fit the direction to predict it rather than the 0/1 label.

Every layer is fitted in the same batched tensor operations; nothing loops over layers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["Fit", "METHODS", "PAIRED_METHODS", "REGRESSION_METHODS", "RIDGE_ALPHAS", "ccs", "diffmean", "logreg", "pca", "ridge", "sklearn_c"]


@dataclass(frozen=True)
class Fit:
    """A fitted concept direction.

    ``direction``: ``[n_layers, d_model]`` (or ``[d_model]`` for one layer), unit norm per layer,
    oriented so that positives project higher (all zeros for a layer without any signal).
    ``threshold``: ``[n_layers]`` (or a 0-d tensor): classify ``x · direction > threshold`` as positive.
    """

    direction: Tensor
    threshold: Tensor
    alpha: Tensor | None = None  # ridge: the penalty chosen per layer ([n_layers] or 0-d); None for the others


def _as_layers(pos: Tensor, neg: Tensor, *, paired: bool) -> tuple[Tensor, Tensor, bool]:
    """Check shapes and return float32 ``[n_layers, n, d_model]`` views plus whether input was 2-D."""
    pos, neg = torch.as_tensor(pos), torch.as_tensor(neg)
    if pos.dim() != neg.dim() or pos.dim() not in (2, 3):
        raise ValueError(
            f"pos and neg must both be [n, d_model] or [n_layers, n, d_model]; "
            f"got shapes {tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    single = pos.dim() == 2
    if single:
        pos, neg = pos.unsqueeze(0), neg.unsqueeze(0)
    if pos.shape[0] != neg.shape[0] or pos.shape[2] != neg.shape[2]:
        raise ValueError(
            f"pos and neg disagree on n_layers or d_model: {tuple(pos.shape)} vs {tuple(neg.shape)}"
        )
    if pos.shape[1] == 0 or neg.shape[1] == 0:
        raise ValueError("pos and neg each need at least one sample")
    if paired and pos.shape[1] != neg.shape[1]:
        raise ValueError(
            f"this method needs paired activations (pos[i] pairs with neg[i]), "
            f"but n_pos={pos.shape[1]} and n_neg={neg.shape[1]}"
        )
    return pos.float(), neg.float(), single


def _unit(v: Tensor) -> Tensor:
    """Normalise the last dim to unit length; a zero vector stays zero."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def _midpoint(pos: Tensor, neg: Tensor, direction: Tensor) -> Tensor:
    """``[n_layers]``: the projection halfway between the mean positive and the mean negative."""
    mean_pos = torch.einsum("lnd,ld->l", pos, direction) / pos.shape[1]
    mean_neg = torch.einsum("lnd,ld->l", neg, direction) / neg.shape[1]
    return (mean_pos + mean_neg) / 2


def _orient(pos: Tensor, neg: Tensor, direction: Tensor) -> Tensor:
    """Flip each layer's direction so the mean positive projects above the mean negative."""
    gap = torch.einsum("ld,ld->l", pos.mean(1) - neg.mean(1), direction)
    return torch.where(gap[:, None] < 0, -direction, direction)


def _result(direction: Tensor, threshold: Tensor, single: bool, alpha: Tensor | None = None) -> Fit:
    if single:
        return Fit(direction=direction[0].contiguous(), threshold=threshold[0].contiguous(),
                   alpha=None if alpha is None else alpha[0].contiguous())
    return Fit(direction=direction.contiguous(), threshold=threshold.contiguous(), alpha=alpha)


# --------------------------------------------------------------------------------------- diffmean


@torch.no_grad()
def diffmean(pos: Tensor, neg: Tensor) -> Fit:
    """Difference of means: ``mean(pos) - mean(neg)``, normalised.

    Returns a :class:`Fit` with ``direction: [n_layers, d_model]`` and ``threshold: [n_layers]``
    (the midpoint of the two class means' projections); ``[d_model]`` and a scalar for 2-D input.
    """
    pos, neg, single = _as_layers(pos, neg, paired=False)
    direction = _unit(pos.mean(1) - neg.mean(1))
    return _result(direction, _midpoint(pos, neg, direction), single)


# ----------------------------------------------------------------------------------------- logreg


def sklearn_c(l2: float, n_samples: int) -> float:
    """The scikit-learn ``LogisticRegression(C=...)`` that poses the same problem as ``logreg(l2=...)``.

    ``logreg`` minimises ``mean_i logloss_i + l2/2 * |w|^2`` (intercept not penalised);
    scikit-learn (lbfgs, newton-cg, ...) minimises ``C * sum_i logloss_i + 1/2 * |w|^2``, which is the
    same objective times ``C * n``. So ``C = 1 / (l2 * n_samples)``, with ``n_samples = n_pos + n_neg``.
    """
    return 1.0 / (l2 * n_samples)


def _logistic_objective(margin: Tensor, y: Tensor, w: Tensor, l2: float) -> Tensor:
    """``[L]``: mean logistic loss of ``margin: [L, n]`` against ``y: [n]`` plus ``l2/2 * |w|^2``."""
    loss = (torch.nn.functional.softplus(margin) - y * margin).mean(1)
    return loss + 0.5 * l2 * (w * w).sum(1)


def _preconditioner(centred: Tensor, curvature: float, l2: float) -> Callable[[Tensor], Tensor]:
    """``H0^{-1}`` for ``H0 = curvature/n * X^T X + l2 * I``, the logistic Hessian at ``w = 0``.

    ``centred: [L, n, d]``. Returns a function mapping ``g: [L, d, m]`` to ``H0^{-1} g: [L, d, m]``. When
    ``d <= n`` it factors ``H0`` (``d x d``); otherwise it uses the Woodbury identity and factors
    ``K + (n * l2 / curvature) * I`` with ``K = X X^T`` (``n x n``), so the cost is
    ``O(n * d * min(n, d))`` either way.
    """
    n_layers, n, d = centred.shape
    if d <= n:
        h0 = torch.bmm(centred.transpose(1, 2), centred).mul_(curvature / n)
        h0.diagonal(dim1=1, dim2=2).add_(l2)
        # Jacobi scaling keeps the float32 factorisation accurate when feature scales differ a lot.
        jacobi = h0.diagonal(dim1=1, dim2=2).rsqrt().unsqueeze(2)  # [L, d, 1]
        scaled = h0.mul_(jacobi).mul_(jacobi.transpose(1, 2))
        chol, info = torch.linalg.cholesky_ex(scaled)
        if bool((info != 0).any()):  # too ill-conditioned for float32
            chol = torch.linalg.cholesky(scaled.double())

        def apply(g: Tensor) -> Tensor:
            half = torch.linalg.solve_triangular(chol, (g * jacobi).to(chol.dtype), upper=False)
            return torch.linalg.solve_triangular(chol.mT, half, upper=True).to(g.dtype) * jacobi

        return apply

    # (l2 I + c/n X^T X)^{-1} = (I - X^T (K + (n l2 / c) I)^{-1} X) / l2
    gram = torch.bmm(centred, centred.transpose(1, 2)).double()
    gram.diagonal(dim1=1, dim2=2).add_(n * l2 / curvature)
    chol = torch.linalg.cholesky(gram)

    def apply(g: Tensor) -> Tensor:
        inner = torch.cholesky_solve(torch.bmm(centred, g).double(), chol).float()  # [L, n, m]
        return (g - torch.bmm(centred.transpose(1, 2), inner)) / l2

    return apply


def _lbfgs_logistic(
    centred: Tensor, y: Tensor, l2: float, max_iter: int, tol: float, memory: int = 10
) -> tuple[Tensor, Tensor, Tensor]:
    """Batched, preconditioned L-BFGS for L2-regularised logistic regression, one problem per layer.

    ``centred: [L, n, d]`` (features centred over samples), ``y: [n]`` (0/1). Minimises
    ``mean logloss(centred @ w + c, y) + l2/2 * |w|^2`` for every layer at once. The initial inverse
    Hessian of each L-BFGS step is ``gamma * H0^{-1}`` (``H0``: the exact Hessian at ``w = 0``;
    ``gamma``: the usual secant scaling), so the number of steps hardly depends on how the features
    are scaled or correlated. A layer stops once its largest gradient entry is at most ``tol``; a stopped layer is
    frozen, so its result does not depend on which layers share the batch.
    Returns ``w: [L, d]``, ``c: [L]`` and ``converged: [L]`` (bool).
    """
    n_layers, n, d = centred.shape
    y = y.to(centred.dtype)
    prior = float(y.mean().clamp(1e-6, 1 - 1e-6))
    curvature = prior * (1 - prior)
    h0_inverse = _preconditioner(centred, curvature, l2)

    def precondition(g: Tensor) -> Tensor:  # [L, d + 1, m]; the intercept is decoupled from w
        return torch.cat([h0_inverse(g[:, :d]), g[:, d:] / curvature], 1)

    def gradient(margin: Tensor, w: Tensor) -> Tensor:  # [L, d + 1]
        residual = (torch.sigmoid(margin) - y) / n
        grad_w = torch.bmm(residual.unsqueeze(1), centred).squeeze(1) + l2 * w
        return torch.cat([grad_w, residual.sum(1, keepdim=True)], 1)

    w = centred.new_zeros(n_layers, d)
    c = torch.full((n_layers,), math.log(prior / (1 - prior)), dtype=centred.dtype, device=centred.device)
    margin = c[:, None].expand(n_layers, n).clone()
    objective = _logistic_objective(margin, y, w, l2)
    grad = gradient(margin, w)
    history: list[tuple[Tensor, Tensor, Tensor]] = []  # (step, gradient change, 1 / step·change)
    converged = torch.zeros(n_layers, dtype=torch.bool, device=centred.device)

    for _ in range(max_iter):
        converged |= grad.abs().amax(1) <= tol
        if bool(converged.all()):
            break
        # Two-loop recursion.
        q = grad.clone()
        alphas = []
        for step, change, rho in reversed(history):
            alpha = rho * (step * q).sum(1)
            q -= alpha[:, None] * change
            alphas.append(alpha)
        if history:  # the usual secant scaling s·y / y·H0^{-1} y of the initial matrix
            step, change, rho = history[-1]
            both = precondition(torch.stack([q, change], 2))
            h0_change = both[:, :, 1]
            gamma = torch.where(rho > 0, 1 / (rho * (change * h0_change).sum(1)).clamp_min(1e-30), 1.0)
            z = both[:, :, 0] * gamma[:, None]
        else:
            z = precondition(q.unsqueeze(2)).squeeze(2)
        for (step, change, rho), alpha in zip(history, reversed(alphas)):
            beta = rho * (change * z).sum(1)
            z += step * (alpha - beta)[:, None]
        direction = torch.where(converged[:, None], 0.0, -z)

        d_margin = torch.bmm(centred, direction[:, :d].unsqueeze(2)).squeeze(2) + direction[:, d:]
        slope = (grad * direction).sum(1)
        t = torch.ones(n_layers, dtype=centred.dtype, device=centred.device)
        # Backtracking (Armijo) line search per layer; the unit step is almost always taken.
        for _ in range(20):
            trial = _logistic_objective(
                margin + t[:, None] * d_margin, y, w + t[:, None] * direction[:, :d], l2
            )
            short = (trial > objective + 1e-4 * t * slope) & ~converged
            if not bool(short.any()):
                break
            t = torch.where(short, t / 2, t)
        else:  # no decrease within float precision: that layer is as good as it gets
            t = torch.where(short, 0.0, t)
            converged |= short

        step = t[:, None] * direction
        w = w + step[:, :d]
        c = c + step[:, d]
        margin = margin + t[:, None] * d_margin
        objective = _logistic_objective(margin, y, w, l2)
        new_grad = gradient(margin, w)
        change = new_grad - grad
        grad = new_grad
        step_change = (step * change).sum(1)
        valid = step_change > 0
        rho = torch.where(valid, 1.0 / step_change.where(valid, 1.0), 0.0)
        history.append((step, change, rho))
        if len(history) > memory:
            history.pop(0)
    converged |= grad.abs().amax(1) <= tol
    return w, c, converged


@torch.no_grad()
def logreg(
    pos: Tensor, neg: Tensor, l2: float = 1e-2, max_iter: int = 500, tol: float = 1e-4
) -> Fit:
    """L2-regularised logistic regression, every layer fitted at once by batched L-BFGS.

    Minimises ``mean_i logloss(x_i · w + b, y_i) + l2/2 * |w|^2`` per layer, with ``y = 1`` for
    ``pos`` and ``0`` for ``neg`` and the intercept ``b`` not penalised: the same problem as
    scikit-learn's ``LogisticRegression(C=sklearn_c(l2, n_pos + n_neg))`` on the same features, and
    the same stopping rule (largest gradient entry of that mean objective ``<= tol``; scikit-learn's
    default ``tol`` is also ``1e-4``). L-BFGS is preconditioned with the exact Hessian at ``w = 0``,
    computed once per layer in one batched product, which is what makes it converge in a few tens
    of steps where unpreconditioned L-BFGS needs hundreds. Warns if a layer has not converged after
    ``max_iter`` steps.

    Returns a :class:`Fit`: ``direction: [n_layers, d_model] = w / |w|`` and
    ``threshold: [n_layers] = -b / |w|`` (so ``x · w + b > 0`` ⇔ projection > threshold);
    ``[d_model]`` and a scalar for 2-D input.
    """
    if l2 <= 0:
        raise ValueError(f"l2 must be positive, got {l2}")
    pos, neg, single = _as_layers(pos, neg, paired=False)
    x = torch.cat([pos, neg], dim=1)  # [L, n, d]
    y = torch.cat([pos.new_ones(pos.shape[1]), neg.new_zeros(neg.shape[1])])
    mean = x.mean(1)
    w, c, converged = _lbfgs_logistic(x.sub_(mean[:, None, :]), y, l2, max_iter, tol)
    if not bool(converged.all()):
        layers = converged.logical_not().nonzero().squeeze(1).tolist()
        warnings.warn(f"logreg did not converge in {max_iter} steps at layers {layers}", stacklevel=2)
    b = c - torch.einsum("ld,ld->l", mean, w)
    norm = w.norm(dim=1).clamp_min(torch.finfo(w.dtype).tiny)
    return _result(w / norm[:, None], -b / norm, single)


# -------------------------------------------------------------------------------------------- pca


@torch.no_grad()
def pca(pos: Tensor, neg: Tensor) -> Fit:
    """First principal component of the paired differences ``pos[i] - neg[i]``.

    The component is taken about the origin (uncentred second moment), which is what repeng's
    ``pca_diff`` approximates by flipping random pairs before its centred PCA: the differences of a
    contrast set share one sign, so centring would remove the very direction being sought. Oriented
    so that the mean difference projects positive. Needs ``n_pos == n_neg`` (raises ``ValueError``).

    Returns a :class:`Fit`: ``direction: [n_layers, d_model]``, ``threshold: [n_layers]`` (midpoint
    of the mean positive and mean negative projections); ``[d_model]`` and a scalar for 2-D input.
    """
    pos, neg, single = _as_layers(pos, neg, paired=True)
    diff = pos - neg  # [L, n, d]
    n, d = diff.shape[1:]
    if n >= d:
        moment = torch.bmm(diff.transpose(1, 2), diff).double()  # [L, d, d]
        direction = torch.linalg.eigh(moment).eigenvectors[:, :, -1].float()
    else:
        gram = torch.bmm(diff, diff.transpose(1, 2)).double()  # [L, n, n]
        top = torch.linalg.eigh(gram).eigenvectors[:, :, -1].float()  # [L, n]
        direction = _unit(torch.einsum("lnd,ln->ld", diff, top))
    direction = _orient(pos, neg, direction)
    return _result(direction, _midpoint(pos, neg, direction), single)


# -------------------------------------------------------------------------------------------- ccs


def _burns_normalise(x: Tensor) -> tuple[Tensor, Tensor]:
    """Centre ``x: [L, n, d]`` over samples and divide by the per-dimension std; returns it and the std."""
    centred = x - x.mean(1, keepdim=True)
    std = centred.pow(2).mean(1, keepdim=True).sqrt()
    std = torch.where(std > 1e-6 * std.amax(2, keepdim=True).clamp_min(1e-30), std, 1.0)
    return centred / std, std.squeeze(1)


def _ccs_loss(p0: Tensor, p1: Tensor) -> Tensor:
    """Burns et al.'s loss per probe: ``mean(min(p0, p1)^2) + mean((p0 - (1 - p1))^2)`` over dim -2."""
    confidence = torch.minimum(p0, p1).pow(2).mean(-2)
    consistency = (p0 - (1 - p1)).pow(2).mean(-2)
    return confidence + consistency


def ccs(
    pos: Tensor,
    neg: Tensor,
    n_restarts: int = 10,
    epochs: int = 1000,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    swap_sides: bool = True,
) -> Fit:
    """Contrast-Consistent Search (Burns et al., 2022) on paired contrast activations.

    Each side of the pairs is normalised on its own as in Burns et al.: centred and divided by its
    per-dimension standard deviation. A linear probe ``p = sigmoid(x · w + b)`` is trained full-batch
    with AdamW (Burns's defaults: ``lr=1e-3``, ``weight_decay=0.01``, 1000 epochs, 10 restarts) on
    ``mean(min(p0, p1)^2) + mean((p0 - (1 - p1))^2)``; every layer and every restart is one batched
    problem, and per layer the restart with the lowest final loss is kept.

    ``swap_sides``: in a concept contrast set ``pos[i]`` always holds the concept, so normalising
    each side would subtract exactly the concept direction. With ``swap_sides=True`` (the default)
    the two members of each pair are assigned to the two sides by a seeded coin flip, which restores
    Burns's setting (the latent attribute varies across pairs on each side) without using any label.
    Pass ``False`` for Burns-style data whose sides are fixed phrasings ("... Yes" / "... No") and
    whose truth varies across pairs; there the per-side centring removes the phrasing direction.

    CCS is unsupervised, so its sign is arbitrary: the direction is then oriented so that the mean
    projection of ``pos`` exceeds that of ``neg``. The direction is mapped back to raw activation
    space by dividing by the mean of the two sides' per-dimension std. Needs ``n_pos == n_neg``
    (raises ``ValueError``). Deterministic given ``seed``.

    Returns a :class:`Fit`: ``direction: [n_layers, d_model]``, ``threshold: [n_layers]`` (midpoint
    of the mean positive and mean negative projections); ``[d_model]`` and a scalar for 2-D input.
    """
    pos, neg, single = _as_layers(pos, neg, paired=True)
    n_layers, n, d = pos.shape
    if n < 2:
        raise ValueError("ccs needs at least two pairs")
    generator = torch.Generator().manual_seed(seed)
    if swap_sides:
        flip = (torch.rand(n, generator=generator) < 0.5).to(pos.device)[None, :, None]
        side0, side1 = torch.where(flip, neg, pos), torch.where(flip, pos, neg)
    else:
        side0, side1 = pos, neg
    x0, std0 = _burns_normalise(side0)
    x1, std1 = _burns_normalise(side1)

    weight = torch.randn(n_layers, d, n_restarts, generator=generator) / math.sqrt(d)
    weight = weight.to(pos.device).requires_grad_()
    bias = pos.new_zeros(n_layers, 1, n_restarts, requires_grad=True)
    optimiser = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)

    def losses() -> Tensor:  # [L, n_restarts]
        p0 = torch.sigmoid(torch.bmm(x0, weight) + bias)  # [L, n, R]
        p1 = torch.sigmoid(torch.bmm(x1, weight) + bias)
        return _ccs_loss(p0, p1)

    with torch.enable_grad():
        for _ in range(epochs):
            optimiser.zero_grad(set_to_none=True)
            # Restarts and layers are independent problems; summing keeps their gradients apart.
            losses().sum().backward()
            optimiser.step()

    with torch.no_grad():
        best = losses().argmin(1)  # [L]
        w = weight.detach()[torch.arange(n_layers, device=pos.device), :, best]  # [L, d]
        direction = _unit(w / ((std0 + std1) / 2))
        direction = _orient(pos, neg, direction)
        threshold = _midpoint(pos, neg, direction)
    return _result(direction, threshold, single)


# ------------------------------------------------------------------------------------------ ridge

RIDGE_ALPHAS: tuple[float, ...] = tuple(10.0**k for k in range(-6, 3))
"""``ridge``'s penalty grid, relative to each layer's feature scale: α = r · trace(XᵀX) / d_model for
each r here (so the grid means the same for a 64-wide organism and a 4096-wide model)."""


@torch.no_grad()
def ridge(pos: Tensor, neg: Tensor, target: Tensor | None = None, alphas: tuple[float, ...] = RIDGE_ALPHAS) -> Fit:
    """Ridge regression of a continuous target on the activations, every layer at once.

    ``target: [n_pos + n_neg]`` is one value per text in the order ``cat(pos, neg)`` (for the organism,
    the exact log-odds of fair of each contrast prefix); without it the target is the 0/1 label (a
    linear probability probe). Per layer it minimises ``|y − X w − b|² + α |w|²`` (intercept not
    penalised: the same problem as scikit-learn's ``Ridge(alpha=α)``), with α chosen from
    ``alphas × trace(XᵀX)/d_model`` by exact leave-one-out error (as ``RidgeCV`` does, through one
    eigendecomposition per layer of the ``[d, d]`` or, when d > n, the ``[n, n]`` Gram matrix).
    Unlike a classifier, it is asked to rank *inside* each class too: a saturated posterior of log-odds
    +12 must project above one of +6.

    Returns a :class:`Fit`: ``direction: [n_layers, d_model] = w / |w|`` (oriented so that a higher
    target projects higher), ``threshold: [n_layers]`` (the midpoint of the mean positive and mean
    negative projections) and ``alpha: [n_layers]`` (the chosen penalty, absolute); ``[d_model]`` and
    scalars for 2-D input.
    """
    pos, neg, single = _as_layers(pos, neg, paired=False)
    x = torch.cat([pos, neg], dim=1).double()  # [L, n, d]
    n_layers, n, d = x.shape
    if target is None:
        y = torch.cat([x.new_ones(pos.shape[1]), x.new_zeros(neg.shape[1])])
    else:
        y = torch.as_tensor(target).to(x.device, torch.float64)
        if y.shape != (n,):
            raise ValueError(f"target must be [n_pos + n_neg] = [{n}], got shape {tuple(y.shape)}")
        if not bool(torch.isfinite(y).all()):
            raise ValueError("target must be finite")
    if n < 3:
        raise ValueError("ridge needs at least three texts")
    if not alphas or min(alphas) <= 0:
        raise ValueError(f"alphas must be positive, got {alphas}")
    mean_x = x.mean(1, keepdim=True)
    centred, y_centred = x - mean_x, y - y.mean()
    # Thin SVD of each layer's centred X through the smaller Gram matrix: X = U S Vᵀ.
    if d <= n:
        eigvals, v = torch.linalg.eigh(centred.mT @ centred)  # [L, d], [L, d, d]
    else:
        eigvals, u = torch.linalg.eigh(centred @ centred.mT)  # [L, n], [L, n, n]
    keep = eigvals > eigvals.amax(1, keepdim=True).clamp_min(1e-300) * 1e-10
    s2 = torch.where(keep, eigvals, 0.0)
    sv = s2.sqrt()
    inverse_sv = torch.where(keep, 1 / sv.where(keep, 1.0), 0.0)[:, None, :]
    if d <= n:
        u = centred @ v * inverse_sv  # [L, n, k]
    else:
        u = u * keep[:, None, :]
        v = centred.mT @ u * inverse_sv  # [L, d, k]
    grid = torch.tensor(alphas, dtype=torch.float64, device=x.device)[None, :] * (s2.sum(1, keepdim=True) / d).clamp_min(1e-300)  # [L, A]
    uty = torch.einsum("lnk,n->lk", u, y_centred)
    shrink = s2[:, None, :] / (s2[:, None, :] + grid[:, :, None])  # [L, A, k]
    fitted = torch.einsum("lnk,lak->lan", u, shrink * uty[:, None, :])
    leverage = torch.einsum("lnk,lak->lan", u * u, shrink) + 1.0 / n  # the intercept's leverage too
    loo = ((y_centred - fitted) / (1 - leverage).clamp_min(1e-12)).pow(2).mean(2)  # [L, A]
    alpha = grid.gather(1, loo.argmin(1, keepdim=True)).squeeze(1)  # [L]
    w = torch.einsum("ldk,lk->ld", v, sv / (s2 + alpha[:, None]) * uty)
    direction = _unit(w).float()
    return _result(direction, _midpoint(pos, neg, direction), single, alpha)


METHODS: dict[str, Callable[..., Fit]] = {
    "diffmean": diffmean,
    "logreg": logreg,
    "pca": pca,
    "ccs": ccs,
    "ridge": ridge,
}
"""Every direction-finding method by name; each is ``method(pos, neg, **options) -> Fit``."""

REGRESSION_METHODS: frozenset[str] = frozenset({"ridge"})
"""The methods that take ``target=`` (a continuous value per text) and fit it rather than the label."""

PAIRED_METHODS: frozenset[str] = frozenset({"pca", "ccs"})
"""The methods that need ``pos[i]`` paired with ``neg[i]``."""
