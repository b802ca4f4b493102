"""common/probe.py: backbone loading with size overrides, the one-pass features and their gathering order."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402
from common import probe  # noqa: E402
from common.probe import Progress  # noqa: E402

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


def test_extract_features_reorders_by_index_and_drops_padding():
    order = probe._unique_order(torch.tensor([3, 1, 2, 1, 0]))  # a DistributedSampler pads with repeats
    assert torch.tensor([3, 1, 2, 1, 0])[order].tolist() == [0, 1, 2, 3]


def test_progress_lines_rate_eta_and_pauses():
    now = [0.0]
    p = Progress("it", total=7, every=3, seconds=100.0, clock=lambda: now[0])
    due = []
    for step in range(1, 8):
        now[0] += 0.5  # 0.5 s per batch of 10 images: 20 img/s
        if step == 4:
            with p.paused():  # an evaluation: neither throughput nor ETA
                now[0] += 30.0
        if p.update(10):
            due.append((p.done, round(p.img_per_s, 6), round(p.eta_s, 6)))
    assert due == [(3, 20.0, 2.0), (6, 20.0, 0.5), (7, 20.0, 0.0)]  # every 3 batches and the last one
    assert p.line == "it 7/7  20.0 img/s  eta 0:00:00"
    slow = Progress("features", total=100, every=50, seconds=10.0, clock=lambda: now[0])
    now[0] += 12.0  # one batch slower than the time limit: a line now, not after 50 batches
    assert slow.update(8) and slow.line.startswith("features 1/100  0.7 img/s  eta 0:19:48")
