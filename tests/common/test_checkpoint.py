"""common/: atomic checkpoints with history and fallback, image-folder checks, JSON logs."""

import os

import pytest
import torch

from common.checkpoint import atomic_save, file_fingerprint, load_latest, save_with_history
from tests.pretrain.helpers import _sha  # noqa: F401


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


def test_rotation_never_overwrites_a_file_it_did_not_write(tmp_path):
    out = str(tmp_path)
    save_with_history({"step": 0}, out, keep_last=2)
    torch.save({"precious": torch.ones(3)}, os.path.join(out, "checkpoint.1.pth"))  # a user's file in the slot
    digest = _sha(os.path.join(out, "checkpoint.1.pth"))
    save_with_history({"step": 1}, out, keep_last=2)  # rotates checkpoint.pth onto checkpoint.1.pth
    aside = [n for n in os.listdir(out) if n.startswith("checkpoint.1.pth.foreign-")]
    assert len(aside) == 1 and _sha(os.path.join(out, aside[0])) == digest
    save_with_history({"step": 2}, out, keep_last=2)  # our own files rotate as before
    assert torch.load(os.path.join(out, "checkpoint.1.pth"))["step"] == 1
    assert len([n for n in os.listdir(out) if ".foreign-" in n]) == 1
