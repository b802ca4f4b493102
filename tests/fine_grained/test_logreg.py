"""fine_grained/logreg.py: the logistic regression against scikit-learn's solution, and the C sweep."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fine_grained import logreg

pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n=300, d=12, k=4, seed=0):
    g = np.random.default_rng(seed)
    y = g.integers(0, k, n)
    x = g.normal(0, 0.6, (k, d))[y] + g.normal(0, 1, (n, d))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


@pytest.mark.parametrize("C", [0.01, 1.0])
def test_multinomial_logreg_matches_sklearn(C):
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs()
    ours = logreg.fit_logreg(x, y, C, num_classes=4, tol=1e-7)
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=5000).fit(x.double().numpy(), y.numpy())

    def objective(w, b):  # sklearn's, divided by C * N
        w, b = torch.as_tensor(w).double(), torch.as_tensor(b).double()
        return float(F.cross_entropy(x.double() @ w.T + b, y) + 0.5 / (C * len(y)) * w.pow(2).sum())

    # float32 L-BFGS reaches the float64 optimum's objective to float32 resolution
    assert objective(ours.weight, ours.bias) == pytest.approx(objective(ref.coef_, ref.intercept_), rel=1e-6)
    torch.testing.assert_close(ours.weight.double(), torch.tensor(ref.coef_), atol=5e-3, rtol=0)


def test_multilabel_logreg_is_per_class_binary():
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs()
    targets = torch.stack([y == 0, y == 1, y >= 2], dim=1).float()  # (N, 3) 0/1
    ours = logreg.fit_logreg(x, targets, 0.5, num_classes=3, tol=1e-7)
    for k in range(3):
        ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=5000).fit(x.double().numpy(), targets[:, k].numpy())
        torch.testing.assert_close(ours.weight[k].double(), torch.tensor(ref.coef_[0]), atol=2e-3, rtol=0)


def test_sweep_selects_on_val_and_breaks_ties_to_the_first():
    x, y = _blobs(400)
    calls = []

    def constant_metric(scores, targets):
        calls.append(len(targets))
        return 50.0

    res = logreg.sweep_logreg((x[:200], y[:200]), (x[200:300], y[200:300]), (x[:300], y[:300]), (x[300:], y[300:]),
                             constant_metric, num_classes=4, cs=(10.0, 1.0, 0.1))
    assert res.best_C == 10.0 and len(res.val_scores) == 3  # all tied: the first C in sweep order wins
    assert calls == [100, 100, 100, 100]  # 3 val scores, then the test score of the refit

    def accuracy(scores, targets):
        return 100.0 * float((scores.argmax(1) == targets).float().mean())

    res = logreg.sweep_logreg((x[:200], y[:200]), (x[200:300], y[200:300]), (x[:300], y[:300]), (x[300:], y[300:]),
                             accuracy, num_classes=4)
    assert res.val_scores[int(np.argmax(res.val_scores))] == max(res.val_scores)
    assert res.best_C == logreg.C_SWEEP[int(np.argmax(res.val_scores))] and res.test_score > 60.0
    assert len(logreg.C_SWEEP) == 45
    assert logreg.C_SWEEP[0] == pytest.approx(1e6) and logreg.C_SWEEP[-1] == pytest.approx(1e-5)
