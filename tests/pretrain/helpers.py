"""Shared tiny set-up for the pretrain tests (imported by the tests of several folders).

A random-weight official-format DINOv2 ViT-S/14 teacher file, a 2-class synthetic ImageFolder and the
argument list of a tiny run: vit_tiny with depth 2 / width 64 at 56 px (4x4 patches), CPU, fp32,
--num-workers 0 (the setting in which resume is bitwise exact).
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import models
from pretrain import main as pretrain_main
from pretrain.engine import EXIT_PREEMPTED
from pretrain.losses import ProteusDistiller, TargetSpec, select_objectives
from tests import fault_injection
from tools import make_shards

os.environ["HF_HUB_OFFLINE"] = "1"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
FAULTY_PRETRAIN = os.path.join(REPO, "tests", "fault_injection.py")  # pretrain.main with a fault at a step


def write_image_folder(root, n_per_class: int = 12, n_classes: int = 2, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        os.makedirs(os.path.join(root, f"n{c:08d}"), exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(img).save(os.path.join(root, f"n{c:08d}", f"{i}.JPEG"))
    return str(root)


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> str:
    import models

    path = tmp_path_factory.mktemp("teacher") / "dinov2_vits14_random.pth"
    torch.manual_seed(0)
    torch.save(models.build_vit("vit_small", patch_size=14, img_size=518).state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    return write_image_folder(tmp_path_factory.mktemp("data") / "train")


def tiny_args(data_root: str, teacher_file: str, out: str, **overrides) -> list[str]:
    """CLI of a tiny CPU run; overrides use flag names without dashes, e.g. epochs=3."""
    args = dict(data_path=data_root, output_dir=out, teacher="dinov2_vits14", teacher_checkpoint=teacher_file,
                student="vit_tiny", student_kwargs="depth=2,embed_dim=64,num_heads=2", input_size=56,
                batch_size=4, epochs=2, warmup_epochs=1, lr=0.05, num_workers=0, precision="fp32",
                log_every=1, save_every_steps=2, pca_every_epochs=1, device="cpu")
    args.update(overrides)
    argv = []
    for k, v in args.items():
        argv += [f"--{k.replace('_', '-')}"] + ([str(x) for x in v] if isinstance(v, list) else [str(v)])
    return argv


def run_module(argv: list[str], env_extra: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})}
    return subprocess.run([PYTHON, "-m", "pretrain.main", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, **kwargs)


def read_log(out: str) -> list[dict]:
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def train_losses(out: str) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_log(out) if "train/loss" in r}


def text_log(out: str) -> str:
    with open(os.path.join(out, "pretrain.log")) as f:
        return f.read()


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _ckpt(out: str, name: str = "checkpoint.pth") -> dict:
    return torch.load(os.path.join(out, name), weights_only=True)


def _stopped_run(tiny_data, teacher_ckpt, out, monkeypatch, at_step: int = 2, **overrides):
    """A tiny run stopped by an in-process SIGTERM after step `at_step` (checkpoint at that step + 0..1)."""
    argv = tiny_args(tiny_data, teacher_ckpt, out, **overrides)
    with fault_injection.injected(signal_at=at_step):
        assert pretrain_main.main(argv) == EXIT_PREEMPTED
    return argv


B, DT = 6, 8  # batch, teacher width


def tiny_distiller(objectives=("token", "fea", "patch"), lambdas=None):
    torch.manual_seed(0)
    student = models.build_student("vit_tiny", patch_size=14, img_size=28, depth=2, embed_dim=16, num_heads=2)
    nn.init.normal_(student.mask_token, std=0.5)  # a non-zero mask token makes the masked view differ
    lambdas = lambdas or {"token": 1.0, "fea": 0.5, "patch": 2.0}
    return ProteusDistiller(student, [TargetSpec("t", DT, tuple(objectives))], lambdas, grid=(2, 2)).double()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tiny_data):
    out = str(tmp_path_factory.mktemp("shards"))
    assert make_shards.main([tiny_data, out, "--shard-size", "5"]) == 0  # 24 images -> 5 shards (last: 4)
    return out
