"""Data benchmark: images per CPU-second of the DeiT training augmentation, timm's and ours, in one run.

    python -m tools.benchmark --data IMAGE_DIR --json OUT [--images 200] [--rounds 3] [--input-size 224]
    python -m tools.benchmark --data make:DIR ...   # first writes ImageNet-like test JPEGs into DIR

One process, one thread (torch, PIL and OpenCV single-threaded). Every pipeline does the whole per-image CPU
work a DataLoader worker does, from reading the file to the collated batch and the copy into the pinned
batch (a plain copy where there is no CUDA to pin with), measured in CPU seconds (time.process_time), so
neighbours on a shared machine change the result less than wall time would. The pipelines alternate in
rounds over the same images so that they see the same machine state:

- `timm`: the reference, timm's create_transform DeiT path (PIL decode, RandomResizedCrop bicubic, flip,
  RandAugment rand-m9-mstd0.5-inc1, ToTensor, Normalize, RandomErasing 0.25 pixel), as common/data.py
  builds it (what pretrain.main used before #21), its float batch pinned as for GPU training;
  `timm_cpu_only`: the same without the pinned copy (CPU-only training pins nothing);
- `cpu`: ours with the whole augmentation on the CPU (CPU-only training: the float, normalised, erased batch,
  not pinned), compared with `timm_cpu_only` (`cpu_vs_timm`);
- `gpu_worker`: ours when training on a GPU: the worker's part only (decode through the uint8 batch); the cast,
  normalisation and erasing run on the GPU in the training step.

The JSON also holds the per-stage breakdown (read, decode, crop/resize, flip, RandAugment, to-tensor,
normalise, erase) before and after, and the CPU cores per GPU each pipeline needs to feed the paper's four
pairs at the step rate one H100 reaches at `--mfu` of its dense bf16 peak (FLOPs derived below), and the
measured GPU-decode rate where a GPU is present.
"""
import argparse
import glob
import io
import json
import math
import os
import platform
import random
import time

import numpy as np
import torch
from PIL import Image

from common.config import CheckedArgumentParser
from common.errors import ConfigError, cli

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s, SXM data sheet
# The paper's DINOv2 pairs (student <- teacher): (width, depth, MLP hidden, SwiGLU) per ViT.
VITS = {"vit_tiny": (192, 12, 768, False), "vit_small": (384, 12, 1536, False), "vit_base": (768, 12, 3072, False),
        "vit_large": (1024, 24, 4096, False), "vit_giant2": (1536, 40, 4096, True)}
PAPER_PAIRS = (("Ti/14<-S/14", "vit_tiny", "vit_small"), ("S/14<-B/14", "vit_small", "vit_base"),
               ("B/14<-L/14", "vit_base", "vit_large"), ("L/14<-g/14", "vit_large", "vit_giant2"))


def vit_forward_flops(arch: str, tokens: int) -> float:
    """Forward FLOPs per image: 2 x multiply-adds of the block matmuls (qkv, proj, MLP; SwiGLU has three MLP
    matrices) plus attention's two N x N x d products. Patch embedding and heads are < 1 % and left out."""
    d, depth, hidden, swiglu = VITS[arch]
    linear = 4 * d * d + (3 if swiglu else 2) * d * hidden
    return depth * (2 * tokens * linear + 4 * tokens * tokens * d)


def pair_flops(student: str, teacher: str, input_size: int = 224, patch: int = 14,
               mask_probability: float = 0.5) -> dict:
    """FLOPs per image of one training step: teacher forward, student forward + backward (3 x forward) over
    the unmasked view and the masked view of `mask_probability` of the batch (the trainer's one pass)."""
    tokens = (input_size // patch) ** 2 + 1
    t = vit_forward_flops(teacher, tokens)
    s = 3 * vit_forward_flops(student, tokens) * (1 + mask_probability)
    return {"teacher_gflop": t / 1e9, "student_gflop": s / 1e9, "total_gflop": (t + s) / 1e9}


def feed_table(rates: dict, mfu: float, input_size: int = 224, measured_step_img_s: float = 0.0) -> list[dict]:
    """Cores per GPU each pipeline needs for each paper pair's H100 step rate at `mfu` (and a measured rate)."""
    rows = []
    for name, student, teacher in PAPER_PAIRS:
        f = pair_flops(student, teacher, input_size)
        step = H100_BF16_PEAK * mfu / (f["total_gflop"] * 1e9)
        rows.append({"pair": name, **{k: round(v, 1) for k, v in f.items()}, "h100_img_per_s": round(step),
                     **{f"cores_{k}": round(step / v, 1) for k, v in rates.items() if v > 0}})
    if measured_step_img_s > 0:
        rows.append({"pair": "measured", "h100_img_per_s": round(measured_step_img_s),
                     **{f"cores_{k}": round(measured_step_img_s / v, 1) for k, v in rates.items() if v > 0}})
    return rows


# ----------------------------------------------------------------------------------------------------------
# ImageNet-like test JPEGs
# ----------------------------------------------------------------------------------------------------------
def source_photos() -> list[np.ndarray]:
    """Real photos that install offline (scikit-image's bundled data); [] if it is not installed."""
    try:
        from skimage import data as skd
    except ImportError:
        return []
    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry", "retina"):
        try:
            img = np.asarray(getattr(skd, name)())
        except Exception:  # noqa: BLE001 - a missing bundled file only narrows the set
            continue
        if img.ndim == 3 and img.shape[2] >= 3:
            out.append(img[..., :3].astype(np.uint8))
    try:
        left, _, _ = skd.stereo_motorcycle()
        out.append(np.asarray(left)[..., :3].astype(np.uint8))
    except Exception:  # noqa: BLE001
        pass
    return out


def synthetic_photo(rng: np.random.Generator, h: int = 512, w: int = 512) -> np.ndarray:
    """A natural-ish image: smooth colour field plus 1/f noise and a few edges (fallback without skimage)."""
    f = np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2
    amp = 1 / np.maximum(np.sqrt(f), 1 / max(h, w))
    chans = [np.real(np.fft.ifft2(amp * np.exp(2j * np.pi * rng.random((h, w))))) for _ in range(3)]
    img = np.stack(chans, -1)
    img = (img - img.min()) / (np.ptp(img) + 1e-9) * 255
    return img.astype(np.uint8)


def make_test_images(folder: str, n: int = 200, seed: int = 0, quality: int = 90) -> list[str]:
    """`n` ImageNet-like JPEGs (sides 333-500 px as ImageNet's typical 500x375 / 500x333, quality 90) made
    from random crops of real photos (scikit-image's data), rescaled and flipped; synthetic without them."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = source_photos() or [synthetic_photo(rng) for _ in range(4)]
    paths = []
    for k in range(n):
        src = Image.fromarray(photos[k % len(photos)])
        long_side = int(rng.integers(400, 501))
        short = max(333, round(long_side / float(rng.choice([4 / 3, 3 / 2, 1.0, 4 / 3]))))
        w, h = (long_side, short) if rng.random() < 0.75 else (short, long_side)  # mostly landscape
        frac = float(rng.uniform(0.6, 1.0))
        cw, ch = src.width * frac, src.width * frac * h / w
        if ch > src.height:
            ch, cw = src.height * frac, src.height * frac * w / h
        x0, y0 = float(rng.uniform(0, src.width - cw)), float(rng.uniform(0, src.height - ch))
        img = src.resize((w, h), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        path = os.path.join(folder, f"img_{k:05d}.jpg")
        img.save(path, quality=quality)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------
# The pipelines, as one worker runs them
# ----------------------------------------------------------------------------------------------------------
def _pin_or_copy(batch):
    """What the DataLoader's pin thread does to a batch: pin it (CUDA), else the equivalent host copy."""
    tensors = batch if isinstance(batch, (list, tuple)) else [batch]
    for t in tensors:
        if torch.cuda.is_available():
            t.pin_memory()
        else:
            t.clone()


def make_pipelines(input_size: int):
    """{name: (worker part: paths -> collated batch, pinned)}: what a DataLoader worker does per batch, and
    whether the batch is then pinned (GPU training) or used as it is (CPU-only training)."""
    from common import data as cdata
    from pretrain.pipeline import FastDeiTTransform
    from torch.utils.data import default_collate

    ref = cdata.build_train_transform(input_size)
    fast_cpu = FastDeiTTransform(input_size, finish_on_device=False)
    fast_gpu = FastDeiTTransform(input_size, finish_on_device=True)

    def timm_one(path):
        return ref(cdata.load_rgb(path))

    def fast_one(t):
        return lambda path: t(t.decode(cdata.open_image(path)))

    def batch_of(one):
        return lambda paths: default_collate([one(p) for p in paths])

    return {"timm": (batch_of(timm_one), True), "cpu": (batch_of(fast_one(fast_cpu)), False),
            "gpu_worker": (batch_of(fast_one(fast_gpu)), True)}


def measure(paths: list[str], input_size: int, rounds: int, batch: int, seed: int = 0) -> dict:
    """img per CPU-second of each pipeline; pipelines alternate batch by batch over the same images.

    timm's is reported twice: with the pinned copy of its float batch (`timm`, GPU training: what the
    GPU-worker path is compared with) and without (`timm_cpu_only`: what the CPU-only path is compared with;
    CPU-only training pins nothing)."""
    pipes = make_pipelines(input_size)
    work = {k: 0.0 for k in pipes}
    pin = {k: 0.0 for k in pipes}
    n = 0
    batches = [paths[i:i + batch] for i in range(0, len(paths), batch)]
    for run, _ in pipes.values():  # warm-up: page cache, imports, first-call allocations
        run(batches[0])
    for r in range(rounds):
        for b, chunk in enumerate(batches):
            order = list(pipes) if (r + b) % 2 == 0 else list(pipes)[::-1]
            for name in order:
                run, pinned = pipes[name]
                _seed(seed + r * 1000 + b)
                t0 = time.process_time()
                out = run(chunk)
                t1 = time.process_time()
                if pinned:
                    _pin_or_copy(out)
                work[name] += t1 - t0
                pin[name] += time.process_time() - t1
            n += len(chunk)
    out = {f"{k}_img_per_cpu_s": n / (work[k] + pin[k]) for k in pipes}
    out["timm_cpu_only_img_per_cpu_s"] = n / work["timm"]
    out["pin_ms_per_img"] = {k: round(pin[k] / n * 1e3, 3) for k in pipes if pin[k]}
    return out


def _seed(s: int) -> None:
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def breakdown(paths: list[str], input_size: int, seed: int = 0) -> dict:
    """ms of CPU per image per stage, before (timm) and after (ours): read, decode, crop/resize, flip,
    RandAugment, to-tensor, normalise, erase (ours: normalise + erase are on the GPU when training on one)."""
    from timm.data.transforms import RandomResizedCropAndInterpolation  # noqa: F401 (import cost outside)
    from common import data as cdata
    from pretrain.pipeline import (FastDeiTTransform, _decode_jpeg, _hflip, apply_rand_augment_cpu, draft_reduction, erase_,
                                   sample_crop, sample_rand_augment)

    ref = cdata.build_train_transform(input_size)
    rrc, flip, ra, to_tensor, norm, erase = ref.transforms
    fast = FastDeiTTransform(input_size, finish_on_device=True)
    before = {k: 0.0 for k in ("read", "decode", "crop_resize", "flip", "rand_augment", "to_tensor", "normalise",
                               "erase")}
    after = dict(before)
    clock = time.process_time

    def tick(d, key, t0):
        t1 = clock()
        d[key] += t1 - t0
        return t1

    _seed(seed)
    for p in paths:
        t = clock()
        with open(p, "rb") as f:
            data = f.read()
        t = tick(before, "read", t)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        t = tick(before, "decode", t)
        img = rrc(img)
        t = tick(before, "crop_resize", t)
        img = flip(img)
        t = tick(before, "flip", t)
        img = ra(img)
        t = tick(before, "rand_augment", t)
        x = to_tensor(img)
        t = tick(before, "to_tensor", t)
        x = norm(x)
        t = tick(before, "normalise", t)
        erase(x)
        tick(before, "erase", t)
    _seed(seed)
    aug = fast.device_augment
    for p in paths:
        t = clock()
        with open(p, "rb") as f:
            data = f.read()
        t = tick(after, "read", t)
        im = Image.open(io.BytesIO(data))
        top, left, h, w = sample_crop(im.width, im.height, fast.scale, fast.ratio)
        r = draft_reduction(h, w, *fast.size)
        if r > 1:
            im.draft("RGB", (im.width // r, im.height // r))
            r = im.decoderconfig[0]
            im.load()
        else:
            chw = _decode_jpeg(data)
        t = tick(after, "decode", t)
        hwc = fast._resize(im, top, left, h, w, "bicubic", r) if r > 1 else \
            fast._resize_chw(chw, top, left, h, w, "bicubic")
        t = tick(after, "crop_resize", t)
        flip = bool(torch.rand(1) < 0.5)
        ops = sample_rand_augment(fast.ra)
        if ops:
            arr = np.ascontiguousarray(hwc.permute(1, 2, 0).numpy())
            t = tick(after, "to_tensor", t)
            arr = _hflip(arr) if flip else arr
            t = tick(after, "flip", t)
            arr = apply_rand_augment_cpu(fast.ra, ops, arr)
            t = tick(after, "rand_augment", t)
            x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        else:
            x = hwc.flip(-1) if flip else hwc.contiguous()
            t = tick(after, "flip", t)
        x = x[None].float()
        t = tick(after, "to_tensor", t)
        y = aug.normalise(x)
        t = tick(after, "normalise", t)
        erase_(y, fast._sample_erase()[None])
        tick(after, "erase", t)
    n = len(paths)
    return {"before_ms": {k: round(v / n * 1e3, 3) for k, v in before.items()},
            "after_ms": {k: round(v / n * 1e3, 3) for k, v in after.items()},
            "after_gpu_worker_does_only": ["read", "decode", "crop_resize", "to_tensor (only the uint8 HWC batch: the float cast is on the GPU)"],
            "note": "after: the CPU-only path (cpu_img_per_cpu_s); training on a GPU, flip, RandAugment, the float "
                    "cast, normalisation and erasing run on the GPU (pretrain/pipeline.py DeviceAugment)"}


def gpu_decode_rate(paths: list[str], input_size: int, batch: int = 64, seconds: float = 5.0) -> dict:
    """Images/s of the GPU path (decode + augment on the GPU) on the first CUDA device; {} without one."""
    if not torch.cuda.is_available():
        return {}
    from pretrain.pipeline import FastDeiTTransform, GpuDeiTPipeline

    pipe = GpuDeiTPipeline(FastDeiTTransform(input_size))
    blobs = [open(p, "rb").read() for p in paths[:batch]]
    samples = pipe.collate([pipe.sample(b) for b in blobs])
    dev = torch.device("cuda")
    pipe.finish(samples, dev)
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        pipe.finish(samples, dev)
        n += len(blobs)
    torch.cuda.synchronize()
    return {"gpu_decode_augment_img_per_s": n / (time.perf_counter() - t0), "gpu": torch.cuda.get_device_name(0)}


def cpu_name() -> dict:
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model.strip():
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"cpu": model, "avx512_bf16": "avx512_bf16" in flags, "amx": any(f.startswith("amx") for f in flags),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def parser() -> argparse.ArgumentParser:
    p = CheckedArgumentParser("tools.benchmark --data", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="folder of JPEGs (flat or ImageFolder), or make:DIR to write "
                                                 "ImageNet-like test JPEGs into DIR first")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--images", type=int, default=200, help="images per round (the first N found / made)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32, help="images per collated batch")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--mfu", type=float, default=0.45, help="H100 bf16 MFU the step rates assume")
    p.add_argument("--step-img-per-s", type=float, default=0.0, help="a measured GPU step rate to feed (img/s)")
    p.add_argument("--no-breakdown", action="store_true")
    return p


def find_images(folder: str, n: int) -> list[str]:
    exts = (".jpg", ".jpeg", ".JPEG", ".JPG")
    paths = sorted(p for e in exts for p in glob.glob(os.path.join(folder, "**", "*" + e), recursive=True))
    if not paths:
        raise ConfigError(f"no JPEGs under {folder!r}: give a folder of .jpg/.jpeg files, or make:{folder} to "
                          f"write ImageNet-like test ones")
    return paths[:n]


@cli("tools.benchmark --data")
def main(argv=None) -> int:
    a = parser().parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from pretrain.pipeline import _cv2
    _cv2()  # OpenCV single-threaded
    folder = a.data
    if folder.startswith("make:"):
        folder = folder[5:]
        make_test_images(folder, a.images)
    paths = find_images(folder, a.images)
    from common import data as cdata  # noqa: F401  (imports outside the timed part)

    rates = measure(paths, a.input_size, a.rounds, a.batch)
    pin_ms = rates.pop("pin_ms_per_img")
    out = {"images": len(paths), "input_size": a.input_size, "rounds": a.rounds, "threads": 1, **cpu_name(),
           **{k: round(v, 1) for k, v in rates.items()}, "pin_ms_per_img": pin_ms}
    out["gpu_worker_vs_timm"] = round(rates["gpu_worker_img_per_cpu_s"] / rates["timm_img_per_cpu_s"], 2)
    out["cpu_vs_timm"] = round(rates["cpu_img_per_cpu_s"] / rates["timm_cpu_only_img_per_cpu_s"], 2)
    gpu = gpu_decode_rate(paths, a.input_size)
    out.update(gpu)
    out["mfu"] = a.mfu
    short = {k.replace("_img_per_cpu_s", ""): v for k, v in rates.items() if k != "timm_cpu_only_img_per_cpu_s"}
    out["cores_per_gpu"] = feed_table(short, a.mfu, a.input_size, a.step_img_per_s)
    if not a.no_breakdown:
        out["breakdown"] = breakdown(paths, a.input_size)
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
