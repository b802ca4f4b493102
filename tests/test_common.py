"""common/: atomic checkpoints with history and fallback, image-folder checks, JSON logs."""
import json
import os

import pytest
import torch
from PIL import Image

from common.checkpoint import atomic_save, file_fingerprint, load_latest, save_with_history
from common.data import SafeImageFolder, check_image_folder, collate_skip_bad
from common.log import MetricLogger, write_json


def test_history_keeps_last_k_and_falls_back_on_corruption(tmp_path, caplog):
    for i in range(4):
        save_with_history({"step": i, "w": torch.full((3,), float(i))}, str(tmp_path), keep_last=3)
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".")) == [
        "checkpoint.1.pth", "checkpoint.2.pth", "checkpoint.pth"]
    state, path = load_latest(str(tmp_path), keep_last=3)
    assert state["step"] == 3 and path.endswith("checkpoint.pth")
    with open(tmp_path / "checkpoint.pth", "r+b") as f:  # a save that died half-way (or bit rot)
        f.truncate(os.path.getsize(tmp_path / "checkpoint.pth") // 2)
    state, path = load_latest(str(tmp_path), keep_last=3)
    assert state["step"] == 2 and path.endswith("checkpoint.1.pth")
    assert "unreadable" in caplog.text and "falling back" in caplog.text
    assert load_latest(str(tmp_path / "empty")) == (None, None)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    atomic_save({"step": 1}, str(tmp_path / "c.pth"))

    class Unpicklable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")  # what a full disk looks like mid-write

    with pytest.raises(OSError, match="previous file at that path, if any, is intact"):
        atomic_save({"step": 2, "bad": Unpicklable()}, str(tmp_path / "c.pth"))
    assert torch.load(tmp_path / "c.pth")["step"] == 1
    assert os.listdir(tmp_path) == ["c.pth"]  # no temp files left behind
    assert len(file_fingerprint(str(tmp_path / "c.pth"))) == 64


def _image_folder(root, n=2):
    for c in ("a", "b"):
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(root / c / f"{i}.png")


def test_layout_errors_name_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*ROOT/<class_name>/<image>"):
        check_image_folder(str(tmp_path / "missing"))
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match=r"no class sub-folders \(found loose files such as \['loose.png'\]"):
        check_image_folder(str(tmp_path))
    os.makedirs(tmp_path / "x" / "empty_class")
    with pytest.raises(ValueError, match="1 class folders but no image files"):
        check_image_folder(str(tmp_path / "x"))


def test_safe_image_folder_skips_and_counts_broken_files(tmp_path):
    _image_folder(tmp_path)
    (tmp_path / "a" / "zero.png").write_bytes(b"")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0not really a jpeg")
    ds = SafeImageFolder(str(tmp_path), transform=lambda im: torch.tensor(im.size))
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        batch, n_bad = collate_skip_bad([ds[i] for i in range(len(ds))])
    assert n_bad == 2 and batch[0].shape == (4, 2)
    strict = SafeImageFolder(str(tmp_path), on_bad_image="fail")
    bad_index = [i for i, (p, _) in enumerate(strict.samples) if p.endswith("zero.png")][0]
    with pytest.raises(RuntimeError, match="zero.png.*--on-bad-image skip"):
        strict[bad_index]


def test_metric_logger_writes_json_lines_and_tensorboard(tmp_path):
    logger = MetricLogger(str(tmp_path))
    logger.log(10, loss=torch.tensor(0.5), lr=1e-3)
    logger.close()
    rows = [json.loads(line) for line in open(tmp_path / "log.txt")]
    assert rows[0]["step"] == 10 and rows[0]["loss"] == 0.5
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    write_json(str(tmp_path / "r.json"), {"acc": torch.tensor(1.5)})
    assert json.load(open(tmp_path / "r.json")) == {"acc": 1.5}
    MetricLogger(None).log(1, loss=1.0)  # non-main ranks: a no-op, nothing written
