"""Logistic regression for the fine-grained protocol: full-batch L-BFGS multinomial (or per-class binary)
L2 logistic regression in PyTorch with scikit-learn's objective, z-scoring, and the C sweep (`sweep_logreg`)."""
import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# The fine-grained C sweep: wd in logspace(-6, 5, 45), C = 1 / wd.
C_SWEEP = tuple(float(1.0 / wd) for wd in np.logspace(-6, 5, 45))


def zscore(fit: torch.Tensor, *others: torch.Tensor):
    """Standardise every feature dimension with the mean/std of `fit`; returns (fit, *others) transformed."""
    mean = fit.mean(dim=0, keepdim=True)
    std = fit.std(dim=0, keepdim=True).clamp_min(1e-8)  # constant dimensions stay 0 instead of NaN
    return tuple((t - mean) / std for t in (fit, *others))


@dataclass
class LogReg:
    """Linear classifier (K, D) + (K,); multilabel = K independent binary problems (VOC)."""
    weight: torch.Tensor
    bias: torch.Tensor
    multilabel: bool
    iterations: int = 0

    def decision_function(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight) @ self.weight.T + self.bias  # (N, K)


def fit_logreg(x: torch.Tensor, y: torch.Tensor, C: float, num_classes: int, init: LogReg | None = None,
               max_iter: int = 1000, tol: float = 1e-4) -> LogReg:
    """L2-regularised logistic regression with scikit-learn's objective, by full-batch L-BFGS.

    sklearn minimises C * sum_i loss_i + ||W||^2 / 2 (bias unpenalised); we minimise the same divided
    by C * N (mean loss + ||W||^2 / (2 C N)) so gradients stay O(1) across the sweep in float32.
    x (N, D) float; y (N,) int64 class ids (softmax / multinomial) or (N, K) {0,1} (one binary problem
    per column, solved jointly: the sum of separable convex objectives has the same minimiser).
    `init` warm-starts from a neighbouring C's solution. `tol` bounds the largest gradient entry.
    """
    multilabel = y.dim() == 2
    x = x.float()
    n, d = x.shape
    w = torch.zeros(num_classes, d, device=x.device) if init is None else init.weight.detach().clone()
    b = torch.zeros(num_classes, device=x.device) if init is None else init.bias.detach().clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    y = y.to(x.device)
    y_float = y.float() if multilabel else None
    l2 = 1.0 / (C * n)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25),
                            tolerance_grad=tol, tolerance_change=1e-10, history_size=10,
                            line_search_fn="strong_wolfe")
    evals = [0]

    def closure():
        opt.zero_grad(set_to_none=False)
        logits = torch.addmm(b, x, w.T)  # (N, K)
        if multilabel:
            data = F.binary_cross_entropy_with_logits(logits, y_float, reduction="sum") / n
        else:
            data = F.cross_entropy(logits, y)
        loss = data + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        evals[0] += 1
        return loss

    with _few_threads(x.device, n * d * num_classes):
        opt.step(closure)
    iters = opt.state[opt._params[0]].get("n_iter", 0) if opt.state else 0
    return LogReg(w.detach(), b.detach(), multilabel, int(iters))


@contextlib.contextmanager
def _few_threads(device: torch.device, work: int, small: int = 4_000_000):
    """One CPU thread for small problems: thread start/sync per op costs more than the tiny matmuls,
    and with oversubscribed cores (other jobs running) intra-op threads can slow a fit down 50x."""
    if device.type != "cpu" or work >= small or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class SweepResult:
    best_C: float
    val_scores: list  # one per C, in C_SWEEP order
    test_score: float
    model: LogReg


def sweep_logreg(train: tuple, val: tuple, trainval: tuple, test: tuple, metric, num_classes: int,
                 cs=C_SWEEP, device: torch.device | str = "cpu", max_iter: int = 1000,
                 tol: float = 1e-4) -> SweepResult:
    """The fine-grained protocol: z-score, pick C on val, refit on train+val, score on test.

    Each argument is (features (N, D), targets); `metric(scores (N, K), targets) -> float` (higher is
    better). Fits run from the most to the least regularised C, each warm-started from the previous
    (the solutions move smoothly with C, and strongly regularised problems converge in a few steps).
    Ties keep the first C in `cs` order (large C first), as the original's strict '>' did.
    """
    xtr, xva = zscore(train[0].to(device), val[0].to(device))
    ytr = train[1].to(device)
    order = np.argsort(cs)  # ascending C = descending regularisation
    scores = [None] * len(cs)
    prev = None
    for i in order:
        prev = fit_logreg(xtr, ytr, cs[i], num_classes, init=prev, max_iter=max_iter, tol=tol)
        scores[i] = float(metric(prev.decision_function(xva).cpu(), val[1]))
        log.info("C=%.3g val=%.2f (%d iterations)", cs[i], scores[i], prev.iterations)
    best = max(range(len(cs)), key=lambda i: (scores[i], -i))  # first index among the maxima
    xtv, xte = zscore(trainval[0].to(device), test[0].to(device))
    final = fit_logreg(xtv, trainval[1].to(device), cs[best], num_classes, max_iter=max_iter, tol=tol)
    test_score = float(metric(final.decision_function(xte).cpu(), test[1]))
    return SweepResult(cs[best], scores, test_score, final)
