"""linear_eval and fine_grained with `--arch timm:<name>`: a tiny timm CNN (convnext_atto) at random init and from
the files `pretrain.main --student timm:<name>` writes (the export `student_backbone.pth`, the `checkpoint.pth`
student / EMA student), loaded strictly; the grid keeps only the final features; a file of another
architecture is refused."""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import models  # noqa: E402
from common import probe  # noqa: E402
from common.errors import CheckpointError, ConfigError  # noqa: E402
from fine_grained import main as fg_main  # noqa: E402
from linear_eval import main as le_main  # noqa: E402
from pretrain.state import backbone_weights  # noqa: E402 - the exporter itself: the files are the real format

ARCH = "timm:convnext_atto"
SIZE = 32  # convnext's stride is 32: a 1 x 1 final feature map; 64 px gives 2 x 2
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 220), (230, 220, 40)]

pytestmark = pytest.mark.usefixtures("one_thread")


def write_folder(root, per_class, seed, size=SIZE):
    """root/<class>/<i>.png: noisy single-colour images, four classes."""
    rng = np.random.default_rng(seed)
    for k, rgb in enumerate(COLOURS):
        os.makedirs(os.path.join(root, f"c{k}"), exist_ok=True)
        for i in range(per_class):
            px = np.clip(np.array(rgb)[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(os.path.join(root, f"c{k}", f"{i}.png"))
    return str(root)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Colour folders (train / val / test) and a 'trained' convnext_atto saved the way pretrain.main saves it."""
    base = tmp_path_factory.mktemp("timm")
    write_folder(base / "data" / "train", 12, seed=0)
    write_folder(base / "data" / "val", 4, seed=1)
    write_folder(base / "data" / "test", 5, seed=2)
    torch.manual_seed(1)
    student = models.build_student(ARCH, img_size=SIZE)
    torch.manual_seed(2)
    ema = models.build_student(ARCH, img_size=SIZE)  # stands in for the EMA: other weights, same keys
    paths = {"export": str(base / "student_backbone.pth"), "checkpoint": str(base / "checkpoint.pth"),
             "wrong_arch": str(base / "resnet.pth"), "vit": str(base / "vit.pth")}
    torch.save(backbone_weights(student), paths["export"])
    torch.save({"student": student.state_dict(), "student_ema": ema.state_dict(), "global_step": 3}, paths["checkpoint"])
    torch.save(backbone_weights(models.build_student("timm:resnet10t", img_size=SIZE)), paths["wrong_arch"])
    torch.save(models.build_vit("vit_tiny", img_size=28, depth=2, embed_dim=32, num_heads=2).state_dict(), paths["vit"])
    return {"data": str(base / "data"), "student": student.eval(), "ema": ema.eval(), **paths}


def test_timm_backbone_loads_the_export_and_the_checkpoint_strictly(files):
    x = torch.randn(2, 3, SIZE, SIZE)
    expected = files["student"].get_intermediate_layers(x, n=1, return_class_token=True)[0]
    for path in (files["export"], files["checkpoint"]):
        model = probe.build_frozen_backbone(path, ARCH, img_size=SIZE)
        assert isinstance(model, models.TimmStudent) and not model.training
        assert not any(p.requires_grad for p in model.parameters())
        cls, patch_mean = probe.frozen_features(model, x, 1)
        assert cls.shape == (2, 1, 320) and patch_mean.shape == (2, 320)
        torch.testing.assert_close(cls[:, 0], expected[1], rtol=0, atol=0)  # pooled pre-logits
        torch.testing.assert_close(patch_mean, expected[0].mean(1), rtol=0, atol=0)
    ema = probe.build_frozen_backbone(files["checkpoint"], ARCH, img_size=SIZE, ema=True)
    torch.testing.assert_close(ema(x), files["ema"](x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="student_ema"):  # the export holds no EMA
        probe.build_frozen_backbone(files["export"], ARCH, img_size=SIZE, ema=True)
    with pytest.raises(ConfigError, match="only its final features"):
        probe.frozen_features(model, x, 4)


def test_timm_random_init_is_seeded_and_other_architectures_are_refused(files):
    x = torch.randn(2, 3, SIZE, SIZE)
    a, b = (probe.build_frozen_backbone("none", ARCH, img_size=SIZE) for _ in range(2))
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)  # the feature cache relies on it
    assert not torch.equal(a(x), files["student"](x))
    for path in (files["wrong_arch"], files["vit"]):  # a ResNet's weights, a DINOv2 ViT's
        with pytest.raises(CheckpointError, match="does not fit timm:convnext_atto"):
            probe.build_frozen_backbone(path, ARCH, img_size=SIZE)
    with pytest.raises(CheckpointError, match="does not fit vit_tiny"):  # and the other way round
        probe.build_frozen_backbone(files["export"], "vit_tiny", img_size=28)


def fg_argv(files, out, tmp_path, *extra):
    return ["--dataset", "imagefolder", "--data-root", files["data"], "--arch", ARCH, "--image-size", str(SIZE),
            "--num-workers", "0", "--batch-size", "64", "--cache-dir", str(tmp_path / "cache"),
            "--output-dir", str(out), "--max-iter", "100", *extra]


def test_fine_grained_probes_a_timm_student(files, tmp_path):
    trained = fg_main.run(fg_argv(files, tmp_path / "trained", tmp_path, "--pretrained", files["export"]))
    random = fg_main.run(fg_argv(files, tmp_path / "random", tmp_path, "--pretrained", "none"))
    for res in (trained, random):
        assert res["arch"] == ARCH and res["sizes"]["test"] == 20
        assert res["test_score"] >= 90.0  # colours are linearly separable even on random features
    assert len(os.listdir(tmp_path / "cache")) == 4  # train + test per backbone: the weights key the cache
    again = fg_main.run(fg_argv(files, tmp_path / "again", tmp_path, "--pretrained", files["export"]))
    assert again["test_score"] == trained["test_score"] and len(os.listdir(tmp_path / "cache")) == 4


def le_argv(files, out, *extra):
    data = files["data"]
    return ["--train-root", os.path.join(data, "train"), "--val-root", os.path.join(data, "val"), "--arch", ARCH,
            "--image-size", str(SIZE), "--batch-size", "8", "--num-workers", "0", "--lrs", "0.5", "2.0",
            "--output-dir", str(out), *extra]


def test_linear_eval_probes_a_timm_student_on_its_final_features(files, tmp_path):
    res = le_main.run(le_argv(files, tmp_path / "lin", "--pretrained", files["checkpoint"], "--epochs", "2",
                              "--epoch-length", "10", "--eval-period", "10"))
    # no --n-last-blocks: a timm arch gets the last block only, with and without the mean patch token
    assert sorted(res["heads_val"]) == sorted(f"blocks1_avgpool{a}_lr{lr}" for a in (0, 1) for lr in ("5e-01", "2e+00"))
    assert res["arch"] == ARCH and res["top1"] >= 90.0
    with open(tmp_path / "lin" / "config.json") as f:
        assert json.load(f)["n_last_blocks"] == [1]
    knn = le_main.run(le_argv(files, tmp_path / "knn", "--mode", "knn", "--pretrained", "none"))
    assert knn["k10"]["top1"] >= 90.0
