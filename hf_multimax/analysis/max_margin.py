"""Max-margin token selection (Tarzanagh, Li, Zhang, Oymak; arXiv 2306.13596 / 2308.16898).

Attention model f(X) = v^T X^T softmax(X W z) with logistic loss: gradient descent on W diverges in
norm but converges in direction to the attention-SVM solution

    W_mm = argmin ||W||_F  s.t.  (x_t - x_opt)^T W z <= -1   for every input and every t != opt,

which separates each input's optimal token from the others with margin 1. This module solves the
SVM (least-distance programming through scipy's NNLS) and tracks corr(W, W_mm) along gradient
descent for many seeds at once.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import nnls

__all__ = [
    "MaxMarginProblem",
    "att_svm",
    "att_svm_batch",
    "correlation",
    "gradient_descent",
    "make_problem",
    "selected_tokens",
    "track_gradient_descent",
]


class MaxMarginProblem:
    """A batch of `S` independent problems (one per seed).

    Attributes:
        X (`torch.Tensor`): `[S, n, T, d]` unit-norm tokens.
        z (`torch.Tensor`): `[S, n, d]` the query token of each input (its first token).
        y (`torch.Tensor`): `[S, n]` labels in {-1, +1}.
        v (`torch.Tensor`): `[S, d]` the fixed prediction head.
        opt (`torch.Tensor`): `[S, n]` index of each input's optimal token, argmax_t y * v^T x_t.
    """

    def __init__(self, X, z, y, v):
        self.X, self.z, self.y, self.v = X, z, y, v
        self.opt = (y[..., None] * torch.einsum("sntd,sd->snt", X, v)).argmax(-1)


def make_problem(seeds: int = 20, n: int = 6, T: int = 8, d: int = 10, seed: int = 0) -> MaxMarginProblem:
    """The reproduction setting (docs/methods.md, section 4): unit-normalised Gaussian tokens, random +-1 labels,
    a random unit head `v`, float64."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(seeds, n, T, d, generator=g, dtype=torch.float64)
    X = X / X.norm(dim=-1, keepdim=True)
    y = torch.randint(0, 2, (seeds, n), generator=g).double() * 2 - 1
    v = torch.randn(seeds, d, generator=g, dtype=torch.float64)
    v = v / v.norm(dim=-1, keepdim=True)
    return MaxMarginProblem(X, X[:, :, 0], y, v)


def att_svm(X: np.ndarray, z: np.ndarray, opt: np.ndarray) -> np.ndarray:
    """Solve the Frobenius attention-SVM for one problem.

    A hard-margin SVM without bias on the features a = vec((x_opt - x_t) z^T), i.e.
    min ||w|| s.t. A w >= 1, solved as least-distance programming with NNLS (Lawson & Hanson,
    ch. 23): u = nnls([A^T; 1^T], e_last), r = [A^T; 1^T] u - e_last, w = -r[:-1] / r[-1].

    Args:
        X (`np.ndarray`): `[n, T, d]` tokens. z (`np.ndarray`): `[n, d]` queries.
        opt (`np.ndarray`): `[n]` optimal token indices.

    Returns:
        `[d, d]` W_mm. Raises `ValueError` when the constraints are infeasible.
    """
    n, T, d = X.shape
    rows = []
    for i in range(n):
        for t in range(T):
            if t != opt[i]:
                rows.append(np.outer(X[i, opt[i]] - X[i, t], z[i]).ravel())
    A = np.asarray(rows)  # [m, d*d]
    E = np.vstack([A.T, np.ones((1, len(A)))])
    f = np.zeros(E.shape[0])
    f[-1] = 1.0
    u, _ = nnls(E, f, maxiter=50 * E.shape[1])
    r = E @ u - f
    if abs(r[-1]) < 1e-12:
        raise ValueError("the attention-SVM constraints are infeasible for this problem")
    return (-r[:-1] / r[-1]).reshape(d, d)


def _gradient(problem: MaxMarginProblem, W: torch.Tensor) -> torch.Tensor:
    """dL/dW for L = mean_i softplus(-y_i f_i), per seed, in closed form.

    With s_t = x_t^T W z, p = softmax(s), h_t = v^T x_t and f = sum_t p_t h_t, dL/ds_t = c p_t
    (h_t - f). Autograd forms h_t - f as a difference of nearly equal numbers once attention
    saturates, and the gradient sinks into float64 rounding (~1e-18) long before 2000 steps, after
    which normalised steps follow noise. Written relative to the most attended token r
    (h_t - f = (h_t - h_r) - sum_s p_s (h_s - h_r)) every term stays representable.
    """
    X, z, y, v = problem.X, problem.z, problem.y, problem.v
    scores = torch.einsum("sntd,sde,sne->snt", X, W, z)
    p = torch.softmax(scores, dim=-1)
    h = torch.einsum("sntd,sd->snt", X, v)
    h_ref = h.gather(-1, scores.argmax(-1, keepdim=True))
    dh = h - h_ref
    f_minus_ref = (p * dh).sum(-1, keepdim=True)
    f = h_ref.squeeze(-1) + f_minus_ref.squeeze(-1)
    c = -y * torch.sigmoid(-y * f) / y.shape[-1]  # d softplus(-y f) / d f, averaged over inputs
    d_scores = c[..., None] * p * (dh - f_minus_ref)
    return torch.einsum("snt,sntd,sne->sde", d_scores, X, z)


def gradient_descent(problem: MaxMarginProblem, steps: int = 2000, lr: float = 0.1, record=None) -> dict:
    """Normalised gradient descent on W from zero, all seeds at once (one `[S, d, d]` tensor).

    Returns:
        `{step: W [S, d, d]}` at the steps in `record` (default: 10, 100, 500, 1000, steps).
    """
    record = set(record or [10, 100, 500, 1000, steps])
    S, _, _, d = problem.X.shape
    W = torch.zeros(S, d, d, dtype=torch.float64)
    snapshots = {}
    for step in range(1, steps + 1):
        grad = _gradient(problem, W)
        W -= lr * grad / grad.flatten(1).norm(dim=-1).clamp_min(1e-300)[:, None, None]
        if step in record:
            snapshots[step] = W.clone()
    return snapshots


def selected_tokens(problem: MaxMarginProblem, W: torch.Tensor) -> torch.Tensor:
    """`[S, n]`: the token each input's attention puts most weight on under W."""
    return torch.einsum("sntd,sde,sne->snt", problem.X, W, problem.z).argmax(-1)


def att_svm_batch(problem: MaxMarginProblem, opt: torch.Tensor | None = None) -> torch.Tensor:
    """`[S, d, d]`: W_mm per seed for the given selected tokens (default: the globally optimal ones)."""
    opt = problem.opt if opt is None else opt
    return torch.stack([
        torch.from_numpy(att_svm(problem.X[s].numpy(), problem.z[s].numpy(), opt[s].numpy()))
        for s in range(problem.X.shape[0])
    ])


def correlation(W: torch.Tensor, W_mm: torch.Tensor) -> torch.Tensor:
    """`[S]`: <W, W_mm> / (||W|| ||W_mm||)."""
    W, W_mm = W.flatten(1), W_mm.flatten(1)
    return (W * W_mm).sum(-1) / (W.norm(dim=-1) * W_mm.norm(dim=-1))


def track_gradient_descent(problem: MaxMarginProblem, steps: int = 2000, lr: float = 0.1, record=None,
                           local: bool = True) -> dict:
    """corr(W_step, W_mm) along normalised gradient descent.

    With `local=True` W_mm separates the tokens that gradient descent ends up selecting (the
    locally optimal tokens: argmax of the final attention); with `local=False` the globally optimal
    ones (argmax of y * v^T x_t), which gradient descent need not find from every start.

    Returns:
        `{"corr": {step: [S]}, "W_mm": [S, d, d], "selected": [S, n], "global_optimal_share": float}`.
    """
    snapshots = gradient_descent(problem, steps, lr, record)
    final = snapshots[max(snapshots)]
    selected = selected_tokens(problem, final) if local else problem.opt
    W_mm = att_svm_batch(problem, selected)
    return {
        "corr": {step: correlation(W, W_mm) for step, W in sorted(snapshots.items())},
        "W_mm": W_mm,
        "selected": selected,
        "global_optimal_share": (selected_tokens(problem, final) == problem.opt).double().mean().item(),
    }
