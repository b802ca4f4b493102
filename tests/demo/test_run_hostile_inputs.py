"""Issue #22: hostile and careless inputs end in a correct result or one clear message (exit 2), never a hang, a
silent misread or a late traceback. One section per class of the issue."""

import os
import subprocess

import pytest

from tests.pretrain.helpers import PYTHON, REPO, read_log, teacher_ckpt, tiny_args, tiny_data, write_image_folder  # noqa: F401
from tests.pretrain.helpers_hostile_inputs import ENV, one_message, run  # noqa: F401

# ==============================================================================================================
# 4. Every tool that writes a run dir takes the run-dir lock, the demo included
# ==============================================================================================================
HOLDER = ("import sys, time; from common.runlock import RunDirLock; l = RunDirLock(sys.argv[1], 'demo output dir')"
          ".acquire(); print('held', flush=True); time.sleep(120)")


@pytest.mark.slow
def test_a_second_demo_on_the_same_output_dir_stops_before_touching_it(tmp_path):
    from demo import run as demo

    out = tmp_path / "demo"
    for name in (".", *demo.RUN_DIRS):  # a first demo's folders, mid-run
        demo.mark(str(out / name))
    (out / "distil" / "checkpoint.pth").write_bytes(b"the first demo's")
    holder = subprocess.Popen([PYTHON, "-c", HOLDER, str(out)], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, _, err = run("demo.run", ["--output-dir", str(out), "--quick", "--data-dir", str(tmp_path / "data")],
                         timeout=120)
    finally:
        holder.kill()
        holder.wait()
    one_message(rc, err, "is in use by", f"PID {holder.pid}")
    assert (out / "distil" / "checkpoint.pth").read_bytes() == b"the first demo's"
    assert not os.path.exists(tmp_path / "data")  # nothing started
