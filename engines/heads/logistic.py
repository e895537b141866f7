"""L2-regularised logistic regression fitted by Newton's method (deterministic, numpy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LogisticHead:
    """``p = sigmoid(x @ weights + bias)`` on raw (unstandardised) embeddings."""

    weights: np.ndarray  # (D,) float64
    bias: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.weights + self.bias

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(x)))


def _objective(z: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float) -> float:
    # sum of log-losses, log(1 + e^z) - y z, computed stably, plus the penalty on the weights (not the bias)
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * np.dot(w[:-1], w[:-1]))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, max_iter: int = 100, tol: float = 1e-9) -> LogisticHead:
    """Minimise ``sum(log-loss) + l2/2 * |w|^2`` over features standardised on ``x``.

    Standardisation (mean 0, unit variance; constant features left unscaled) is folded back
    into the returned weights, so the head applies to raw embeddings. ``l2 = 1`` is
    scikit-learn's default ``C = 1``. Needs both classes in ``y``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError("x must be (N, D) with one label per row")
    if y.min() == y.max():
        raise ValueError("logistic regression needs both classes")
    if l2 <= 0:
        raise ValueError("l2 must be positive")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    design = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    penalty = np.full(design.shape[1], l2)
    penalty[-1] = 0.0
    w = np.zeros(design.shape[1])
    w[-1] = np.log(y.mean() / (1 - y.mean()))
    z = design @ w
    loss = _objective(z, y, w, l2)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-z))
        grad = design.T @ (p - y) + penalty * w
        hess = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty) + 1e-10 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while True:  # backtracking keeps every step a descent step
            candidate = w - t * step
            z_new = design @ candidate
            new_loss = _objective(z_new, y, candidate, l2)
            if new_loss <= loss or t < 1e-8:
                break
            t /= 2
        w, z, done = candidate, z_new, loss - new_loss < tol * max(1.0, abs(loss))
        loss = new_loss
        if done:
            break
    weights = w[:-1] / scale
    return LogisticHead(weights=weights, bias=float(w[-1] - weights @ mean))
