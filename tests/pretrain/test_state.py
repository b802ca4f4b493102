"""Issue #10 for pretrain.main, tested the way the world behaves: signals to the process group (with
DataLoader workers, and under torchrun), a changed flag on resume, two runs on one directory, foreign and
unreadable checkpoints, a full disk (RLIMIT_FSIZE: the kernel refuses the write), orphan temp files and
every knob validated before any work."""

import os
import subprocess

import pytest

from pretrain import main as pretrain_main
from pretrain.state import EXIT_SAVE_FAILED
from tests.pretrain.helpers import (ENV, PYTHON, REPO, _sha, _stopped_run, read_log, teacher_ckpt,  # noqa: F401
                                    text_log, tiny_args, tiny_data, train_losses)


def test_orphan_temp_files_of_killed_saves_are_removed_at_start(tmp_path, tiny_data, teacher_ckpt):
    out = tmp_path / "run"
    out.mkdir()
    orphan, mine = out / "checkpoint.new.pth.k3x_9a2b.tmp", out / "notes.tmp"
    orphan.write_bytes(b"x" * 1000)
    mine.write_text("keep me")
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, str(out), epochs=1)) == 0
    assert not orphan.exists() and mine.read_text() == "keep me"


# ---- a full disk: saves fail, training goes on, the run stops after N failures in a row --------------------
FSIZE_RUNNER = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG, as on a full disk
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from pretrain.main import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_disk_full_keeps_previous_checkpoint_and_stops_after_n_failures(tmp_path, tiny_data, teacher_ckpt,
                                                                          monkeypatch):
    out = str(tmp_path / "run")
    argv = _stopped_run(tiny_data, teacher_ckpt, out, monkeypatch, pca_every_epochs=0)  # good checkpoint @2
    good = _sha(os.path.join(out, "checkpoint.pth"))
    limit = os.path.getsize(os.path.join(out, "checkpoint.pth")) // 2  # logs fit, a checkpoint does not
    run = subprocess.run([PYTHON, "-c", FSIZE_RUNNER, str(limit), *argv, "--max-save-failures", "3"], cwd=REPO,
                         env=ENV, capture_output=True, text=True, timeout=180)
    text = run.stdout + run.stderr
    assert run.returncode == EXIT_SAVE_FAILED, text[-3000:]
    assert "3 checkpoint writes in a row failed" in text and "Traceback" not in text
    assert text.count("training continues; the next save retries") == 2
    assert _sha(os.path.join(out, "checkpoint.pth")) == good  # the previous checkpoint is intact
    assert max(train_losses(out)) >= 6  # training went on past the first failed save (step 4)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
