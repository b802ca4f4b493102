"""--data-pipeline gpu (pretrain/pipeline.py GpuDeiTPipeline), on CPU tensors: workers read bytes and draw the
fast path's parameters; the training process decodes and augments. Non-JPEG images are decoded in the worker;
a file no decoder reads is skipped and counted, or one BadImageError; kill -9 and resume stay bitwise exact.
(No CUDA here: scripts/gpu_check.sh runs the CUDA path where a GPU is lent.)"""
import io
import os
import random
import signal
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from common import data as cdata
from pretrain import data as pdata
from pretrain import main as pretrain_main
from pretrain import pipeline as P
from tests.pretrain.helpers import (FAULTY_PRETRAIN, PYTHON, REPO, read_log, shard_dir, teacher_ckpt,  # noqa: F401
                                    text_log, tiny_args, tiny_data, train_losses, write_image_folder)
from tests.pretrain.helpers_hostile_inputs import one_message, run  # noqa: F401

SIZE = 32


def _seed(s: int) -> None:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _mixed_files(root) -> dict[str, bytes]:
    """One of each kind the GPU path meets: RGB JPEG (device), greyscale JPEG (device), PNG, CMYK JPEG and
    16-bit PNG (decoded in the worker), and a truncated JPEG whose header reads (no decoder reads the rest)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))
    jpeg = _encode(rgb, "JPEG", quality=90)
    files = {"rgb.jpg": jpeg, "grey.jpg": _encode(rgb.convert("L"), "JPEG"), "rgb.png": _encode(rgb, "PNG"),
             "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
             "deep.png": _encode(Image.fromarray(rng.integers(0, 65535, (60, 80), dtype=np.uint16)), "PNG"),
             "truncated.jpg": jpeg[: len(jpeg) // 3]}
    os.makedirs(root, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    return files


def test_same_seeds_same_parameters_as_the_fast_path(tmp_path):
    """Per sample from the same seed: the fast path's crop (its first draw), flip + RandAugment row and erasing
    row; JPEGs travel as bytes, the rest as the worker's crop, which is the fast path's own."""
    files = _mixed_files(tmp_path)
    fast, gpu = P.FastDeiTTransform(SIZE, finish_on_device=True), P.GpuDeiTPipeline(P.FastDeiTTransform(SIZE))
    for s, (name, data) in enumerate(sorted(files.items()) * 20):
        if name == "truncated.jpg":
            continue
        path = os.path.join(tmp_path, name)
        _seed(s)
        with Image.open(io.BytesIO(data)) as im:
            crop = P.sample_crop(im.width, im.height, fast.scale, fast.ratio)
        _seed(s)
        chw, erase, aug = fast(fast.decode(cdata.open_image(path)))
        _seed(s)
        got = gpu(gpu.decode(cdata.open_image(path)))
        assert torch.equal(got["erase"], erase) and torch.equal(got["aug"], aug), (name, s)
        on_device = name in ("rgb.jpg", "grey.jpg")
        assert (got["jpeg"] is not None) == on_device and (got["image"] is None) == on_device, name
        if on_device:
            assert got["crop"][:4].tolist() == list(crop) and got["name"] == path
        else:
            assert torch.equal(got["image"], chw), name


def _batch(ds, idx, transform):
    return pdata.collate_fn(transform)([ds[i] for i in idx])


def test_mixed_batch_decodes_and_drops_the_unreadable(tmp_path):
    """A list-file dataset with the GPU transform: one batch holding every kind; the truncated JPEG is dropped on
    the device and counted (skip) or names itself in one BadImageError (fail)."""
    files = _mixed_files(tmp_path / "img")
    for mode in ("skip", "fail"):
        t = P.GpuDeiTPipeline(P.FastDeiTTransform(SIZE), on_bad_image=mode)
        ds = cdata.ImageListDataset(str(tmp_path / "img"), t, on_bad_image=mode)
        (images, targets), n_bad = _batch(ds, range(len(ds)), t)
        assert n_bad == 0 and len(images["jpeg_len"]) == len(files) and targets.shape == (len(files),)
        if mode == "skip":
            with pytest.warns(UserWarning, match="skipping unreadable image .*truncated.jpg"):
                x, dropped = P.batch_prepare_fn(t)(images, torch.device("cpu"))
            assert dropped == 1 and x.shape == (len(files) - 1, 3, SIZE, SIZE) and x.dtype == torch.float32
            assert torch.isfinite(x).all()
        else:
            with pytest.raises(cdata.BadImageError, match="truncated.jpg"):
                t.finish(images, "cpu")


def test_a_jpeg_libjpeg_refuses_is_decoded_by_pil(tmp_path, monkeypatch):
    """The per-image fallback: where torchvision's decoder fails, PIL decodes on the CPU; the batch is whole."""
    _mixed_files(tmp_path / "img")
    t = P.GpuDeiTPipeline(P.FastDeiTTransform(SIZE), on_bad_image="fail")
    ds = cdata.ImageListDataset(str(tmp_path / "img"), t)
    keep = [i for i, (p, _) in enumerate(ds.samples) if not p.endswith("truncated.jpg")]
    (images, _), _ = _batch(ds, keep, t)
    _seed(0)
    want, _ = t.finish(images, "cpu")
    import torchvision.io

    def refuse(*a, **k):
        raise RuntimeError("decoder refused it")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuse)
    got, dropped = t.finish(images, "cpu")
    assert dropped == 0 and torch.equal(got, want)


def test_pixel_limit_applies_in_the_worker(tmp_path):
    _mixed_files(tmp_path / "img")
    t = P.GpuDeiTPipeline(P.FastDeiTTransform(SIZE))
    ds = cdata.ImageListDataset(str(tmp_path / "img"), t)
    ds.max_pixels = 100
    with pytest.warns(UserWarning, match="decompression bombs"):
        assert ds[0] is None


def test_selected_by_the_knob_with_a_slow_path_line(caplog):
    cfg = {"input_size": SIZE, "aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "train_interpolation": "bicubic",
           "crop_scale": [0.08, 1.0], "data_pipeline": "gpu", "on_bad_image": "fail"}
    with caplog.at_level("INFO", logger="pretrain"):
        t = P.train_transform(cfg, torch.device("cpu"))
    assert isinstance(t, P.GpuDeiTPipeline) and t.on_bad_image == "fail"
    assert "slow path" in caplog.text


def test_a_policy_the_gpu_path_lacks_falls_back_to_the_fast_path_not_timms(caplog):
    """--aa '' (ColorJitter) has no device version: the fast path (which has it) runs, not timm's slower one."""
    cfg = {"input_size": SIZE, "aa": "", "reprob": 0.25, "train_interpolation": "bicubic",
           "crop_scale": [0.08, 1.0], "data_pipeline": "gpu", "on_bad_image": "skip"}
    with caplog.at_level("INFO", logger="pretrain"):
        t = P.train_transform(cfg, torch.device("cpu"))
    assert isinstance(t, P.FastDeiTTransform) and t.jitter is not None
    assert "fast instead of gpu" in caplog.text and "ColorJitter" in caplog.text


# ---- training runs ---------------------------------------------------------------------------------------
def _mixed_folder(tmp_path) -> str:
    data = write_image_folder(tmp_path / "train", n_per_class=11)  # 22 JPEGs + 5 of _mixed_files = 27: 6 steps
    files = _mixed_files(tmp_path / "extra")
    for name in ("grey.jpg", "rgb.png", "cmyk.jpg", "deep.png", "truncated.jpg"):
        with open(os.path.join(data, "n00000000", name), "wb") as f:
            f.write(files[name])
    return data


@pytest.mark.slow
def test_tiny_run_on_mixed_images_skips_and_counts_the_bad_one(tmp_path, teacher_ckpt):
    data, out = _mixed_folder(tmp_path), str(tmp_path / "run")
    argv = tiny_args(data, teacher_ckpt, out, epochs=1, data_pipeline="gpu", num_workers=1, pca_every_epochs=0)
    assert pretrain_main.main(argv) == 0
    losses = train_losses(out)
    assert len(losses) == 6 and all(np.isfinite(v) for v in losses.values())
    assert [r["epoch/bad_images"] for r in read_log(out) if "epoch/bad_images" in r] == [1]
    assert "slow path" in text_log(out)


@pytest.mark.slow
def test_tiny_run_on_mixed_images_fails_with_one_line(tmp_path, teacher_ckpt):
    data, out = _mixed_folder(tmp_path), str(tmp_path / "run")
    argv = tiny_args(data, teacher_ckpt, out, epochs=1, data_pipeline="gpu", on_bad_image="fail", pca_every_epochs=0)
    rc, _, err = run("pretrain.main", argv, timeout=300)
    one_message(rc, err, "truncated.jpg")
    assert len([ln for ln in err.splitlines() if "error" in ln.lower()]) == 1, err[-3000:]


def _kill9_resume(tmp_path, data, teacher_ckpt, workers: int, pipeline: str = "gpu") -> None:
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    extra = dict(data_pipeline=pipeline, num_workers=workers, pca_every_epochs=0)
    assert pretrain_main.main(tiny_args(data, teacher_ckpt, ref_out, **extra)) == 0  # 2 epochs, 12 steps
    argv = tiny_args(data, teacher_ckpt, out, **extra)
    killed = subprocess.run([PYTHON, FAULTY_PRETRAIN, "--kill-at-step", "8", "--", *argv], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                 "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["global_step"] == 8
    assert pretrain_main.main(argv) == 0
    for name in ("student_backbone.pth", "student_backbone_ema.pth"):
        ref = torch.load(os.path.join(ref_out, name), weights_only=True)
        got = torch.load(os.path.join(out, name), weights_only=True)
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), name  # bitwise
    assert all(train_losses(out)[s] == train_losses(ref_out)[s] for s in range(9, 13))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_kill9_then_resume_is_bitwise_with_workers(tmp_path, tiny_data, teacher_ckpt, workers):
    _kill9_resume(tmp_path, tiny_data, teacher_ckpt, workers)


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["fast", "timm"])
def test_every_pipeline_resumes_bitwise_mid_epoch_with_workers(tmp_path, tiny_data, teacher_ckpt, pipeline):
    """Each sample's augmentation is seeded by its place in the run, not by the worker's history: before that,
    a resumed epoch's workers restarted their random streams and drew other crops than the uninterrupted run."""
    _kill9_resume(tmp_path, tiny_data, teacher_ckpt, 2, pipeline)


@pytest.mark.slow
def test_shards_kill9_then_resume_is_bitwise(tmp_path, shard_dir, teacher_ckpt):
    _kill9_resume(tmp_path, os.path.join(shard_dir, "shards-{000000..000004}.tar"), teacher_ckpt, 2)


def test_a_collated_batch_crosses_from_a_worker_in_a_few_tensors(tmp_path):
    """Every tensor of a worker's batch is one shared-memory file descriptor while the batch is in flight: one
    per image (B x prefetch_factor per worker) exhausted a 1024 open-file limit at batch 256, the worker's queue
    failed with 'Too many open files' and the loader hung. The batch must hold a fixed number of tensors."""
    files = _mixed_files(tmp_path / "img")
    t = P.GpuDeiTPipeline(P.FastDeiTTransform(SIZE))
    ds = cdata.ImageListDataset(str(tmp_path / "img"), t)
    counts = []
    for n in (len(ds), 4 * len(ds)):
        (images, _), _ = _batch(ds, [i % len(ds) for i in range(n)], t)
        counts.append(sum(isinstance(v, torch.Tensor) for v in images.values())
                      + sum(isinstance(x, torch.Tensor) for v in images.values() if isinstance(v, list) for x in v))
        x, dropped = P.batch_prepare_fn(t)(images, torch.device("cpu"))  # and still finishes the same batch
        assert dropped == n // len(files) and x.shape == (n - dropped, 3, SIZE, SIZE)
    assert counts[0] == counts[1] <= 8, counts
