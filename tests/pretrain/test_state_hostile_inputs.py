"""Issue #22: hostile and careless inputs end in a correct result or one clear message (exit 2), never a hang, a
silent misread or a late traceback. One section per class of the issue."""

import subprocess

import pytest

from tests.pretrain.helpers import PYTHON, REPO, read_log, teacher_ckpt, tiny_args, tiny_data, write_image_folder  # noqa: F401
from tests.pretrain.helpers_hostile_inputs import ENV, run  # noqa: F401

# ==============================================================================================================
# 7. The lesser ones
# ==============================================================================================================
FSIZE_RUNNER = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from pretrain.main import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_disk_full_from_the_start_stops_at_the_first_save_and_says_nothing_was_saved(tmp_path, tiny_data,
                                                                                      teacher_ckpt):
    from pretrain.state import EXIT_SAVE_FAILED

    out = str(tmp_path / "run")
    argv = tiny_args(tiny_data, teacher_ckpt, out, epochs=3, save_every_steps=0, pca_every_epochs=0)
    proc = subprocess.run([PYTHON, "-c", FSIZE_RUNNER, str(200_000), *argv], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_SAVE_FAILED, text[-3000:]
    assert "first checkpoint could not be written" in text and "nothing has been saved" in text
    assert "holds the weights" not in text and "Traceback" not in text
    assert max(r["step"] for r in read_log(out) if "train/loss" in r) == 6  # stopped after epoch 0 (6 steps) of 3
