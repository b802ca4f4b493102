"""Issue #10 for pretrain.main, tested the way the world behaves: signals to the process group (with
DataLoader workers, and under torchrun), a changed flag on resume, two runs on one directory, foreign and
unreadable checkpoints, a full disk (RLIMIT_FSIZE: the kernel refuses the write), orphan temp files and
every knob validated before any work."""

import os
import subprocess

import pytest

from common.runlock import RunDirLock
from pretrain import main as pretrain_main
from tests.pretrain.helpers import (ENV, PYTHON, REPO, read_log, teacher_ckpt, text_log, tiny_args,  # noqa: F401
                                    tiny_data, train_losses)

# ---- one run per directory -------------------------------------------------------------------------------
HOLDER = ("import sys; from common.runlock import RunDirLock; l = RunDirLock(sys.argv[1]).acquire(); "
          "print('locked', flush=True); sys.stdin.read()")


@pytest.mark.slow
def test_second_run_on_a_directory_fails_naming_the_holder_and_a_killed_holder_does_not_block(
        tmp_path, tiny_data, teacher_ckpt):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([PYTHON, "-c", HOLDER, out], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([PYTHON, "-m", "pretrain.main", *tiny_args(tiny_data, teacher_ckpt, out, epochs=1)],
                                cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"PID {holder.pid} on host" in second.stderr and "Traceback" not in second.stderr
        assert not os.path.exists(os.path.join(out, "config.json"))
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    assert pretrain_main.main(tiny_args(tiny_data, teacher_ckpt, out, epochs=1)) == 0


def test_lock_is_exclusive_in_process(tmp_path):
    with RunDirLock(str(tmp_path)):
        with pytest.raises(Exception, match=f"PID {os.getpid()}"):
            RunDirLock(str(tmp_path)).acquire()
    RunDirLock(str(tmp_path)).acquire().release()  # free again
