"""Issue #22: hostile and careless inputs end in a correct result or one clear message (exit 2), never a hang, a
silent misread or a late traceback. One section per class of the issue."""

import os
import signal
import subprocess
import time

import pytest

from tests.pretrain.helpers import PYTHON, REPO, read_log, teacher_ckpt, tiny_args, tiny_data, write_image_folder  # noqa: F401

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def start(module: str, argv: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    """A tool as a user starts it: its own process group (signals go to the group, as from SLURM or `timeout`)."""
    return subprocess.Popen([PYTHON, "-m", module, *argv], cwd=REPO, env={**ENV, **(env_extra or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str, float]:
    t0 = time.time()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s:\n{out[-2000:]}\n{err[-3000:]}")
    return proc.returncode, out, err, time.time() - t0


def run(module: str, argv: list[str], timeout: float = 300, env_extra: dict | None = None):
    return finish(start(module, argv, env_extra), timeout)[:3]


def one_message(rc: int, err: str, *needles: str) -> None:
    """Exit 2, no traceback, and the message says what is wrong."""
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for n in needles:
        assert n in err, err[-3000:]
