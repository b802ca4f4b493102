"""linear_eval/: end-to-end linear probe and kNN on colour classes, exact resume, head selection on a
held-out part of train, robustness sets (200-class subset mapping, ImageNet-C mCE), the head grid and the kNN vote."""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from linear_eval import engine  # noqa: E402
from linear_eval import main as le_main  # noqa: E402
from linear_eval.data import ResumableSampler  # noqa: E402
from linear_eval.grid import DEFAULT_LRS, LinearHeadGrid, build_grid_optimizer  # noqa: E402
from linear_eval.knn import knn_classify  # noqa: E402
from linear_eval.robustness import ALEXNET_ERROR, class_mapping, mean_corruption_error  # noqa: E402

TINY = json.dumps({"depth": 4, "embed_dim": 32, "num_heads": 2})
COLOURS = {"n01": (220, 30, 30), "n02": (30, 200, 40), "n03": (40, 40, 220), "n04": (230, 220, 40)}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_folder(root, per_class, classes=tuple(COLOURS), seed=0, size=32):
    """ImageFolder of noisy single-colour images: ROOT/<wnid>/<i>.png."""
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            px = np.clip(np.array(COLOURS[c])[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(os.path.join(root, c, f"{i}.png"))
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("in")
    return {"train": write_folder(base / "train", 12), "val": write_folder(base / "val", 6, seed=1),
            "a": write_folder(base / "a", 3, classes=("n02", "n04"), seed=2),
            "c": os.path.dirname(os.path.dirname(write_folder(base / "c" / "fog" / "1", 2, seed=3)))}


def argv(data, out, *extra):
    return ["--train-root", data["train"], "--val-root", data["val"], "--arch", "vit_tiny", "--model-kwargs", TINY,
            "--image-size", "28", "--batch-size", "8", "--num-workers", "0", "--output-dir", str(out),
            "--lrs", "1e-3", "0.1", *extra]


def test_linear_probe_end_to_end_with_robustness(data, tmp_path):
    res = le_main.run(argv(data, tmp_path / "run", "--epochs", "2", "--epoch-length", "10", "--eval-period", "10",
                            "--lrs", "0.5", "2.0", "--imagenet-a", data["a"], "--imagenet-c", data["c"]))
    with open(tmp_path / "run" / "results.json") as f:
        saved = json.load(f)
    assert saved["selection"] == "val" and saved["best_head"] in saved["heads_val"]
    assert len(saved["heads_val"]) == 2 * 2 * 2  # n_last {1,4} x avgpool x 2 lrs
    assert res["top1"] >= 90.0 and res["top5"] == 100.0  # colours are linearly separable; 4 classes < 5
    assert [h["iteration"] for h in saved["history"]] == [10, 20]
    assert res["robustness"]["imagenet_a"]["top1"] >= 90.0  # 2-class subset, targets mapped onto it
    c = res["robustness"]["imagenet_c"]
    assert c["mCE"] == pytest.approx(100 * (c["errors"]["fog/1"] / 100) / ALEXNET_ERROR["fog"])
    assert os.path.isfile(tmp_path / "run" / "checkpoint.pth") and os.path.isfile(tmp_path / "run" / "log.txt")


def test_resume_continues_exactly(data, tmp_path, monkeypatch):
    flags = ("--epochs", "1", "--epoch-length", "6", "--eval-period", "3", "--checkpoint-period", "3")
    full = le_main.run(argv(data, tmp_path / "full", *flags))

    real_save = engine.save_state

    def save_then_die(output_dir, grid, opt, sched, it, history, meta):
        real_save(output_dir, grid, opt, sched, it, history, meta)
        if it == 3:
            raise KeyboardInterrupt("simulated pre-emption after the iteration-3 checkpoint")

    monkeypatch.setattr(engine, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        le_main.run(argv(data, tmp_path / "cut", *flags))
    monkeypatch.setattr(engine, "save_state", real_save)
    resumed = le_main.run(argv(data, tmp_path / "cut", *flags))

    a = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)
    assert b["iteration"] == a["iteration"] == 6
    for k in a["grid"]:
        torch.testing.assert_close(a["grid"][k], b["grid"][k])
    assert resumed["heads_val"] == full["heads_val"]
    assert [h["iteration"] for h in resumed["history"]] == [3, 6]


def test_resume_refuses_other_settings(data, tmp_path):
    le_main.run(argv(data, tmp_path / "r", "--epochs", "1", "--epoch-length", "2"))
    with pytest.raises(ValueError, match="max_iter"):
        le_main.run(argv(data, tmp_path / "r", "--epochs", "2", "--epoch-length", "2"))


def test_precision_is_resolved_logged_and_recorded(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROTEUS_CPU_BF16", "0")  # a CPU without native bf16: auto means fp32
    res = le_main.run(argv(data, tmp_path / "auto", "--mode", "knn"))
    assert res["precision"] == "fp32" and "PROTEUS_CPU_BF16=0" in res["precision_reason"]
    with open(tmp_path / "auto" / "config.json") as f:
        config = json.load(f)
    assert config["tool"] == "linear_eval" and config["precision_resolved"] == "fp32"
    assert "precision fp32 (auto: PROTEUS_CPU_BF16=0" in capsys.readouterr().out
    monkeypatch.setenv("PROTEUS_CPU_BF16", "1")
    assert le_main.run(argv(data, tmp_path / "bf16", "--mode", "knn"))["precision"] == "bf16"
    old_flag = le_main.run(argv(data, tmp_path / "alias", "--mode", "knn", "--autocast", "none"))  # the old name
    assert (old_flag["precision"], old_flag["precision_reason"]) == ("fp32", "requested")


def test_head_selection_on_train_holdout(data, tmp_path):
    res = le_main.run(argv(data, tmp_path / "h", "--epochs", "1", "--epoch-length", "4", "--selection",
                            "train-holdout", "--holdout-fraction", "0.25"))
    assert res["selection"] == "train-holdout"
    assert res["top1"] == res["heads_val"][res["best_head"]]["top1"]  # reported on val, chosen elsewhere


def test_knn_mode(data, tmp_path):
    res = le_main.run(argv(data, tmp_path / "k", "--mode", "knn", "--pretrained", "none"))
    assert set(res) >= {"k10", "k20"} and res["k10"]["top1"] >= 95.0


def test_results_record_the_backbone_by_its_weights_hash(data, tmp_path):
    """What tools.export's model card matches results to: the evaluated weights' content hash, EMA and student."""
    from common.checkpoint import file_fingerprint
    from models import build_vit

    weights = str(tmp_path / "tiny.pth")
    torch.save(build_vit("vit_tiny", patch_size=14, img_size=28, **json.loads(TINY)).state_dict(), weights)
    le_main.run(argv(data, tmp_path / "k", "--mode", "knn", "--pretrained", weights))
    with open(tmp_path / "k" / "results.json") as f:
        backbone = json.load(f)["backbone"]
    assert backbone["weights"] == file_fingerprint(weights) and backbone["ema"] is False


def test_missing_train_root_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageFolder layout"):
        le_main.run(["--train-root", str(tmp_path / "x"), "--val-root", str(tmp_path / "y"),
                      "--output-dir", str(tmp_path / "o")])


def test_grid_has_52_heads_with_dinov2_init_and_scaled_lrs():
    grid = LinearHeadGrid(32, 10)
    assert len(grid.heads) == 52
    dims = {c.name: grid.heads[c.name].in_features for c in grid.configs}
    assert set(dims.values()) == {32, 64, 128, 160}
    narrow = LinearHeadGrid(32, 10, (1,), patch_dim=8)  # a timm model whose feature map is narrower than its CLS
    assert {h.in_features for h in narrow.heads.values()} == {32, 40}
    assert {k: v.shape for k, v in narrow(torch.randn(2, 1, 32), torch.randn(2, 8)).items()} == \
        {c.name: (2, 10) for c in narrow.configs}
    w = grid.heads[grid.configs[0].name].weight.detach()
    assert abs(float(w.std()) - 0.01) < 0.002 and float(grid.heads[grid.configs[0].name].bias.detach().abs().sum()) == 0
    opt, sched = build_grid_optimizer(grid, global_batch=512, max_iter=10)
    assert [g["lr"] for g in opt.param_groups[:13]] == pytest.approx([lr * 2 for lr in DEFAULT_LRS])
    for _ in range(10):
        opt.step()
        sched.step()
    assert max(g["lr"] for g in opt.param_groups) == pytest.approx(0.0, abs=1e-12)  # cosine to 0 per iteration


def test_knn_vote_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    scores = knn_classify(bank, labels, torch.tensor([[1.0, 0.05]]), num_classes=2, k=2, temperature=0.07)
    assert scores.argmax(1).item() == 0 and scores[0, 1] == 0  # the 2 nearest are both class 0
    scores = knn_classify(bank, labels, torch.tensor([[0.0, 1.0]]), num_classes=2, k=3, temperature=0.07)
    sims = torch.nn.functional.normalize(bank, dim=1) @ torch.tensor([0.0, 1.0])
    torch.testing.assert_close(scores[0], torch.stack([(sims[:2] / 0.07).exp().sum(), (sims[2] / 0.07).exp()]))


def test_resumable_sampler_restarts_mid_stream():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    stream = take(ResumableSampler(10, seed=3), 25)  # crosses two pass boundaries
    assert sorted(stream[:10]) == list(range(10)) and stream[:10] != stream[10:20]
    assert take(ResumableSampler(10, seed=3, start=13), 12) == stream[13:25]
    shards = [take(ResumableSampler(10, rank=r, world=2, seed=3), 5) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(10))


def test_class_mapping_and_mce_by_hand():
    train = ["n01", "n02", "n03"]
    assert class_mapping(["n03", "n01"], train) == {0: 2, 1: 0}
    assert class_mapping(["0", "2"], train) == {0: 0, 1: 2}  # ImageNet-V2's integer folders
    with pytest.raises(ValueError, match="neither a training class"):
        class_mapping(["cat"], train)
    errs = {("fog", 1): 0.5, ("fog", 2): 0.7, ("snow", 1): 0.4}
    out = mean_corruption_error(errs)
    ce_fog, ce_snow = 100 * 0.6 / ALEXNET_ERROR["fog"], 100 * 0.4 / ALEXNET_ERROR["snow"]
    assert out["CE"] == pytest.approx({"fog": ce_fog, "snow": ce_snow})
    assert out["mCE"] == pytest.approx((ce_fog + ce_snow) / 2)
    assert len(out["missing"]) == 13
