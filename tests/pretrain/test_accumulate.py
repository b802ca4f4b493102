"""#19 item 3: gradient accumulation (pretrain/accumulate.py) and the batch-scaled --min-lr default, on CPU."""
import contextlib
import json
import os
import signal
import subprocess

import pytest
import torch

from common.dist import init_distributed
from common.errors import ConfigError
from pretrain import accumulate, config
from pretrain import main as pretrain_main
from pretrain import state as ckpt_state
from pretrain.data import build_data
from tests.pretrain.helpers import PYTHON, REPO, read_log, teacher_ckpt, text_log, tiny_args, write_image_folder  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data32(tmp_path_factory) -> str:
    return write_image_folder(tmp_path_factory.mktemp("acc") / "train", n_per_class=16)  # 32 images


def _state(path: str) -> dict:
    return torch.load(path, weights_only=True)


# ---- the plan: G / (B x N) micro-batches, or the fix -------------------------------------------------------
def test_plan_divides_or_names_the_fix():
    assert accumulate.plan_batches(4, 16, 1) == accumulate.BatchPlan(4, 4, 1)
    assert accumulate.plan_batches(0, 512, 8) == accumulate.BatchPlan(64, 1, 8)  # auto: no accumulation
    assert accumulate.plan_batches(0, 0, 2) == accumulate.BatchPlan(128, 1, 2)  # the constant
    assert accumulate.plan_batches(32, 512, 4).accum == 4
    with pytest.raises(ConfigError, match="not a multiple of --batch-size 5; use --batch-size 4"):
        accumulate.plan_batches(5, 16, 1)
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        accumulate.plan_batches(4, 16, 3)


def test_file_global_batch_and_flag_batch_size_accumulate_recorded_in_config_json(tmp_path, data32, teacher_ckpt):
    cfg_file = tmp_path / "recipe.yaml"
    cfg_file.write_text("global_batch_size: 16\n")
    out = str(tmp_path / "run")
    argv = ["-c", str(cfg_file)] + tiny_args(data32, teacher_ckpt, out, batch_size=4, epochs=1, pca_every_epochs=0)
    assert pretrain_main.main(argv) == 0
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["batch_size"], cfg["accum_steps"], cfg["global_batch"], cfg["global_batch_size"]) == (4, 4, 16, 16)
    assert cfg["steps_per_epoch"] == 2  # 32 images / 16 per optimizer step: the schedule counts optimizer steps
    assert [r["step"] for r in read_log(out) if "train/loss" in r] == [1, 2]
    assert "4 micro-batches" in text_log(out)


def test_min_lr_default_scales_with_the_batch_and_batch_size_4_trains(tmp_path, teacher_ckpt):
    data8 = write_image_folder(tmp_path / "train", n_per_class=4)  # 2 steps per epoch
    argv = tiny_args(data8, teacher_ckpt, str(tmp_path / "run"), epochs=5, pca_every_epochs=0)  # 5 = warm-up
    drop = {"--lr", "--warmup-epochs"}  # lr, warm-up and floor at their defaults (lr 5e-4)
    argv = [a for i, a in enumerate(argv) if a not in drop and (i == 0 or argv[i - 1] not in drop)]
    assert pretrain_main.main(argv) == 0  # --batch-size 4: peak lr 3.9e-6 < the old fixed floor 1e-5
    with open(tmp_path / "run" / "config.json") as f:
        cfg = json.load(f)
    assert cfg["min_lr_requested"] == "auto" and cfg["min_lr"] == pytest.approx(1e-5 * 4 / 512)
    assert accumulate.default_min_lr(512, 512) == 1e-5  # identical at the reference batch
    bad = pretrain_main.parse_config(argv + ["--min-lr", "1e-5"])  # explicit and above the peak: still an error
    with pytest.raises(ConfigError, match="--min-lr 1e-05 is above the peak learning rate"):
        config.validate_config(bad, pretrain_main.KNOBS, world_size=1)


# ---- the accumulated update is the one-batch update --------------------------------------------------------
class _CountingDDP(torch.nn.Module):
    """Stands in for DDP: counts the micro-batches run under no_sync (DDP all-reduces on the others)."""

    def __init__(self, module):
        super().__init__()
        self.module, self.skipped_syncs, self.calls = module, 0, 0

    def forward(self, *args):
        self.calls += 1
        return self.module(*args)

    @contextlib.contextmanager
    def no_sync(self):
        self.skipped_syncs += 1
        yield


def _trainer(tmp_path, data, teacher, name, **overrides):
    """The trainer pretrain.main.train builds (fresh start), without training."""
    args = tiny_args(data, teacher, str(tmp_path / name), epochs=2, pca_every_epochs=0, lr=0.05, **overrides)
    cfg = pretrain_main.parse_config(args)
    config.validate_config(cfg, pretrain_main.KNOBS, world_size=1)
    info = init_distributed("cpu")
    cfg = config.derive(cfg, info)
    ckpt_state.seed_everything(cfg["seed"])
    data = build_data(cfg, info)
    teachers, objectives = pretrain_main.build_teachers(cfg, info.device)
    cfg = config.freeze({**cfg, "resume_changes": [], "steps_per_epoch": data.steps_per_epoch,
                         "objectives": objectives})
    return pretrain_main.build_trainer(cfg, info, data, teachers, None)


def _rel(a: dict, b: dict, ref: dict) -> float:
    """max over tensors of ||a - b|| / ||ref||."""
    return max(((a[k] - b[k]).norm() / ref[k].norm().clamp_min(1e-30)).item() for k in a if ref[k].norm() > 0)


@pytest.mark.parametrize("students", ["vit_tiny", "vit_tiny,vit_small"])
def test_accumulated_update_equals_one_batch_update(tmp_path, data32, teacher_ckpt, students):
    one = _trainer(tmp_path, data32, teacher_ckpt, "one", batch_size=16, student=students)
    acc = _trainer(tmp_path, data32, teacher_ckpt, "acc", batch_size=4, global_batch_size=16, student=students)
    assert (one.cfg["accum_steps"], acc.cfg["accum_steps"]) == (1, 4)
    assert one.cfg["lr_scaled"] == acc.cfg["lr_scaled"] and one.steps_per_epoch == acc.steps_per_epoch == 2
    for run_one, run_acc in zip(one.students, acc.students):
        w0 = run_one.distiller.state_dict()
        assert all(torch.equal(w0[k], v) for k, v in run_acc.distiller.state_dict().items())  # same start
        run_acc.model = _CountingDDP(run_acc.distiller)
    for tr in (one, acc):  # warm-up over: a full-size step
        tr.progress.global_step = tr.steps_per_epoch
        for r in tr.students:
            r.step_schedule(tr.progress.global_step)
    rng = ckpt_state.capture_rng()  # the augmentation draws from the process's RNG here (--num-workers 0)
    (images, _), _ = next(iter(one.loader))
    ckpt_state.restore_rng(rng)
    (images_acc, _), _ = next(iter(acc.loader))
    assert torch.equal(images, images_acc)  # the loader gives the whole step's images: same augmentation
    assert torch.equal(one.mask_gen.generator.get_state(), acc.mask_gen.generator.get_state())  # same masks
    grads, updates, losses, norms = {}, {}, {}, {}  # {(run, student key): {param: tensor}}
    for name, tr in (("one", one), ("acc", acc)):
        step = tr.update

        def capture(run, want_norm, name=name, step=step):  # the optimizer's input: the step's gradient
            grads[name, run.key] = {k: p.grad.double().clone() for k, p in run.distiller.named_parameters()
                                    if p.grad is not None}
            return step(run, want_norm)

        tr.update = capture
        before = {r.key: {k: v.double() for k, v in r.distiller.state_dict().items()} for r in tr.students}
        stats, extras, _ = tr.train_step(images, 0, 1, want_norm=True)
        for r in tr.students:
            updates[name, r.key] = {k: v.double() - before[r.key][k] for k, v in r.distiller.state_dict().items()}
        losses[name], norms[name] = stats, [v for k, v in extras.items() if k.endswith("grad_norm")]
    assert all(r.model.calls == 4 and r.model.skipped_syncs == 3 for r in acc.students)  # one all-reduce per step
    for r in acc.students:
        g_one, g_acc = grads["one", r.key], grads["acc", r.key]
        assert g_one.keys() == g_acc.keys() and len(g_one) > 40
        rel_grad = _rel(g_acc, g_one, g_one)
        # AdamW's first step is lr * g / (|g| + eps) per element: where the true gradient is zero (the attention
        # key bias: softmax ignores it) g is rounding noise, which that ratio does not damp. The update is
        # compared on the elements whose gradient is above that noise (|g| > 1e3 eps); the gradient everywhere.
        sure = {k: g_one[k].abs() > 1e3 * 1e-8 for k in g_one}
        upd = {n: {k: updates[n, r.key][k][sure[k]] for k in sure} for n in ("one", "acc")}
        rel_update = _rel(upd["acc"], upd["one"], upd["one"])
        rel_all = _rel(updates["acc", r.key], updates["one", r.key], updates["one", r.key])
        print(f"{r.key}: accumulated (4 x 4) vs one batch (16), per tensor ||a - b|| / ||b||: gradient "
              f"{rel_grad:.2e}, AdamW update {rel_update:.2e} ({rel_all:.2e} with the zero-gradient elements)")
        assert rel_grad <= 1e-6
        assert rel_update <= 1e-6
    print(f"losses {losses['acc']} vs {losses['one']}, grad norms {norms['acc']} vs {norms['one']}")
    assert norms["acc"] == pytest.approx(norms["one"], rel=1e-6)
    assert losses["acc"] == pytest.approx(losses["one"], rel=1e-6)  # logged losses: means over the global batch


# ---- kill -9 between micro-batches: the resume replays the step ------------------------------------------
@pytest.mark.slow
def test_kill9_between_micro_batches_resumes_bitwise(tmp_path, data32, teacher_ckpt):
    common = dict(batch_size=4, global_batch_size=8, epochs=2, save_every_steps=2, pca_every_epochs=0)
    ref_out, out = str(tmp_path / "reference"), str(tmp_path / "killed")
    assert pretrain_main.main(tiny_args(data32, teacher_ckpt, ref_out, **common)) == 0  # 4 steps/epoch, 8 steps
    argv = tiny_args(data32, teacher_ckpt, out, **common)
    # a hard crash between two micro-batches of step index 6: rank 0 SIGKILLs itself as the second one starts
    kill = ("import os, signal, sys; from pretrain.engine import Trainer; losses = Trainer.student_losses\n"
            "def student_losses(self, *a, micro=0, **k):\n"
            "    if self.progress.global_step == 6 and micro == 1: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return losses(self, *a, micro=micro, **k)\n"
            "Trainer.student_losses = student_losses\n"
            "from pretrain import main; sys.exit(main.main(sys.argv[1:]))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # one thread
    killed = subprocess.run([PYTHON, "-c", kill, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert _state(os.path.join(out, "checkpoint.pth"))["global_step"] == 6  # the last step boundary
    assert pretrain_main.main(argv) == 0
    assert "epoch 1, batch 2/4, step 6" in text_log(out)
    for name in ("student_backbone.pth", "student_backbone_ema.pth"):
        ref, got = _state(os.path.join(ref_out, name)), _state(os.path.join(out, name))
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), name  # bitwise
    ref_log = {r["step"]: r["train/loss"] for r in read_log(ref_out) if "train/loss" in r}
    got_log = {r["step"]: r["train/loss"] for r in read_log(out) if "train/loss" in r}
    assert all(got_log[s] == ref_log[s] for s in range(7, 9))
