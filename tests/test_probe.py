"""common/probe.py: backbone loading with size overrides, the one-pass features, the head grid, kNN, and the
logistic regression against scikit-learn's solution."""
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models  # noqa: E402
from common import probe  # noqa: E402

TINY = {"depth": 4, "embed_dim": 32, "num_heads": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_backbone_overrides_load_strictly_and_freeze(tmp_path):
    src = models.build_vit("vit_tiny", patch_size=14, img_size=28, **TINY)
    torch.save({"model": src.state_dict()}, tmp_path / "ckpt.pth")
    model = probe.build_frozen_backbone(str(tmp_path / "ckpt.pth"), "vit_tiny", 14, img_size=28, model_kwargs=TINY)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(model(x), src.eval()(x))
    with pytest.raises(ValueError, match="does not fit"):  # wrong size: the strict loader names the mismatch
        probe.build_frozen_backbone(str(tmp_path / "ckpt.pth"), "vit_tiny", 14, model_kwargs={**TINY, "embed_dim": 64})


def test_fingerprint_follows_content_not_path(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"w": torch.zeros(2)}, a)
    shutil.copy(a, b)  # same bytes, another path
    fa, fb = (probe.backbone_fingerprint(str(p), "vit_tiny", 14, TINY) for p in (a, b))
    assert fa == fb
    torch.save({"w": torch.ones(2)}, b)
    assert probe.backbone_fingerprint(str(b), "vit_tiny", 14, TINY) != fa


def test_frozen_features_one_pass_matches_the_feature_api():
    model = probe.build_frozen_backbone("none", "vit_tiny", 14, img_size=28, model_kwargs=TINY)
    x = torch.randn(3, 3, 28, 28)
    cls, patch_mean = probe.frozen_features(model, x, 4)
    assert cls.shape == (3, 4, 32) and patch_mean.shape == (3, 32)
    out = model.forward_features(x)
    torch.testing.assert_close(cls[:, -1], out["cls"])  # last block, after the final norm
    torch.testing.assert_close(patch_mean, out["patch"].mean(1))
    assert probe.head_input(cls, patch_mean, 4, True).shape == (3, 5 * 32)
    with pytest.raises(ValueError, match="4 last blocks requested from a 2-block"):
        probe.frozen_features(probe.build_frozen_backbone("none", "vit_tiny", model_kwargs={**TINY, "depth": 2}), x, 4)


def test_grid_has_52_heads_with_dinov2_init_and_scaled_lrs():
    grid = probe.LinearHeadGrid(32, 10)
    assert len(grid.heads) == 52
    dims = {c.name: grid.heads[c.name].in_features for c in grid.configs}
    assert set(dims.values()) == {32, 64, 128, 160}
    w = grid.heads[grid.configs[0].name].weight.detach()
    assert abs(float(w.std()) - 0.01) < 0.002 and float(grid.heads[grid.configs[0].name].bias.detach().abs().sum()) == 0
    opt, sched = probe.build_grid_optimizer(grid, global_batch=512, max_iter=10)
    assert [g["lr"] for g in opt.param_groups[:13]] == pytest.approx([lr * 2 for lr in probe.DEFAULT_LRS])
    for _ in range(10):
        opt.step()
        sched.step()
    assert max(g["lr"] for g in opt.param_groups) == pytest.approx(0.0, abs=1e-12)  # cosine to 0 per iteration


def test_extract_features_reorders_by_index_and_drops_padding():
    order = probe._unique_order(torch.tensor([3, 1, 2, 1, 0]))  # a DistributedSampler pads with repeats
    assert torch.tensor([3, 1, 2, 1, 0])[order].tolist() == [0, 1, 2, 3]


def test_knn_vote_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    scores = probe.knn_classify(bank, labels, torch.tensor([[1.0, 0.05]]), num_classes=2, k=2, temperature=0.07)
    assert scores.argmax(1).item() == 0 and scores[0, 1] == 0  # the 2 nearest are both class 0
    scores = probe.knn_classify(bank, labels, torch.tensor([[0.0, 1.0]]), num_classes=2, k=3, temperature=0.07)
    sims = torch.nn.functional.normalize(bank, dim=1) @ torch.tensor([0.0, 1.0])
    torch.testing.assert_close(scores[0], torch.stack([(sims[:2] / 0.07).exp().sum(), (sims[2] / 0.07).exp()]))


def _blobs(n=300, d=12, k=4, seed=0):
    g = np.random.default_rng(seed)
    y = g.integers(0, k, n)
    x = g.normal(0, 0.6, (k, d))[y] + g.normal(0, 1, (n, d))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


@pytest.mark.parametrize("C", [0.01, 1.0])
def test_multinomial_logreg_matches_sklearn(C):
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs()
    ours = probe.fit_logreg(x, y, C, num_classes=4, tol=1e-7)
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
    ours = probe.fit_logreg(x, targets, 0.5, num_classes=3, tol=1e-7)
    for k in range(3):
        ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=5000).fit(x.double().numpy(), targets[:, k].numpy())
        torch.testing.assert_close(ours.weight[k].double(), torch.tensor(ref.coef_[0]), atol=2e-3, rtol=0)


def test_sweep_selects_on_val_and_breaks_ties_to_the_first():
    x, y = _blobs(400)
    calls = []

    def constant_metric(scores, targets):
        calls.append(len(targets))
        return 50.0

    res = probe.sweep_logreg((x[:200], y[:200]), (x[200:300], y[200:300]), (x[:300], y[:300]), (x[300:], y[300:]),
                             constant_metric, num_classes=4, cs=(10.0, 1.0, 0.1))
    assert res.best_C == 10.0 and len(res.val_scores) == 3  # all tied: the first C in sweep order wins
    assert calls == [100, 100, 100, 100]  # 3 val scores, then the test score of the refit

    def accuracy(scores, targets):
        return 100.0 * float((scores.argmax(1) == targets).float().mean())

    res = probe.sweep_logreg((x[:200], y[:200]), (x[200:300], y[200:300]), (x[:300], y[:300]), (x[300:], y[300:]),
                             accuracy, num_classes=4)
    assert res.val_scores[int(np.argmax(res.val_scores))] == max(res.val_scores)
    assert res.best_C == probe.C_SWEEP[int(np.argmax(res.val_scores))] and res.test_score > 60.0
    assert len(probe.C_SWEEP) == 45
    assert probe.C_SWEEP[0] == pytest.approx(1e6) and probe.C_SWEEP[-1] == pytest.approx(1e-5)
