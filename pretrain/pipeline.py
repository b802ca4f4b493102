"""The DeiT training augmentation with less CPU work per image, and the same distribution as timm's.

timm's DeiT view (common/data.py build_train_transform) is: full JPEG decode -> RandomResizedCrop (bicubic)
-> horizontal flip -> RandAugment rand-m9-mstd0.5-inc1 -> ToTensor -> Normalize -> RandomErasing (pixel mode).
`FastDeiTTransform` draws every random parameter with the same calls on the same generators, in the same
order (Python's `random` for the crop, RandAugment's magnitudes and the erasing box, torch for the flip,
numpy for RandAugment's op choice), so from the same seeds it picks the same crop, flip, ops, magnitudes and
erasing box as timm. What changes is the work:

- the crop is sampled on the full-size geometry from the JPEG header, then the JPEG is decoded at the largest
  DCT-domain reduction (PIL `draft`: 1/2, 1/4, 1/8) that still leaves the crop at least as large as the
  output, and the crop and the bicubic resize are one PIL call (`resize(box=...)`);
- images stay uint8 up to the batch (pinned by the DataLoader); the float cast, normalisation and random
  erasing run on the batch on the training device (`prepare_batch`), per sample, with the erasing box and a
  noise seed drawn in the worker: the erasing noise is normal(0, 1) as timm's, from a per-sample seeded
  generator, so resume stays exact whatever the device.

On a CPU-only run the worker finishes the sample itself (`finish_on_device=False`): the same code on a batch
of one. `GpuDeiTPipeline` is --data-pipeline gpu: workers only read the file and draw the parameters; JPEG
decode (torchvision.io.decode_jpeg, batched), crop/resize, flip, RandAugment, normalisation and erasing run
on the batch on the device, per sample (non-JPEG images are decoded and cropped in the worker). It runs on
CPU tensors too (that is how it is tested).
"""
import io
import math
import os
import random
import warnings

import numpy as np
import torch
from PIL import Image

from common import data as cdata

# one row of the erasing parameters per sample: applied (0/1), top, left, height, width, noise seed
ERASE_FIELDS = 6
DRAFT_SCALES = (8, 4, 2)  # libjpeg's DCT-domain reductions PIL's draft can give (1/8, 1/4, 1/2)


class _IntOrAuto(str):
    """The --num-workers knob's type: "auto", or a number (returned as an int)."""

    def __new__(cls, value):
        text = str(value).strip()
        if text == "auto":
            return super().__new__(cls, text)
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected 'auto' or an integer, got {value!r}") from None


WORKERS_AUTO = _IntOrAuto("auto")
MAX_AUTO_WORKERS = 16


def resolve_num_workers(requested, local_world_size: int | None = None, cpus: int | None = None) -> int:
    """Workers per process: `requested` when it is a number, else (auto) from the CPUs this process may use.

    Auto: the CPUs in this process's affinity mask (what SLURM, taskset or a container grant), shared by the
    node's processes (LOCAL_WORLD_SIZE, set by torchrun), less one for the training process itself, at most
    16 (more only adds start-up time and memory); 0 (load in the training process) when no CPU is spare.
    """
    if not (isinstance(requested, str) and requested.strip() == "auto"):
        return int(requested)
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(0, min(MAX_AUTO_WORKERS, cpus // max(1, local_world_size) - 1))


def loader_kwargs(num_workers: int) -> dict:
    """DataLoader settings beside the worker count: a deeper prefetch (uint8 batches are a quarter of the float
    ones). Workers are not persistent: the epoch's sampler / shard state and worker seeds reach them when the
    epoch's iterator starts them (pretrain/engine.py), which resume exactness relies on."""
    return {"prefetch_factor": 4} if num_workers > 0 else {}


def train_transform(cfg: dict, device: torch.device):
    """The training transform pretrain.main uses: FastDeiTTransform (finished on the device when training on
    a GPU, in the worker on a CPU), GpuDeiTPipeline with --data-pipeline gpu, timm's with --data-pipeline timm
    or a policy the fast path does not cover."""
    import logging

    log = logging.getLogger("pretrain")
    args = (cfg["input_size"], cfg["aa"] or None, cfg["reprob"], cfg["train_interpolation"])
    choice = cfg.get("data_pipeline", "fast")
    try:
        if choice == "gpu":
            t = GpuDeiTPipeline(FastDeiTTransform(*args, scale=tuple(cfg["crop_scale"])), cfg["on_bad_image"])
            if device.type != "cuda":
                log.info("data pipeline: gpu on a %s device decodes and augments the batches in the training "
                         "process, on the CPU: the slow path (for tests; use fast without a GPU)", device.type)
            return t
    except ValueError as e:  # a policy the GPU path lacks (ColorJitter): the fast path has it
        log.info("data pipeline: fast instead of gpu (%s)", e)
        choice = "fast"
    try:
        if choice == "fast":
            return FastDeiTTransform(*args, scale=tuple(cfg["crop_scale"]), finish_on_device=device.type == "cuda")
    except ValueError as e:
        log.info("data pipeline: timm's transform (%s)", e)
    return cdata.build_train_transform(*args, scale=cfg["crop_scale"])


def attach(loader, transform) -> None:
    """Tell the trainer how to finish this loader's batches on the device (see to_device)."""
    loader.prepare_batch = batch_prepare_fn(transform)


def to_device(loader, batch_images, device) -> tuple[torch.Tensor, int]:
    """(the float (B', 3, H, W) batch on `device`, images dropped there: unreadable only once decoded there)."""
    prepare = getattr(loader, "prepare_batch", None)
    if prepare is None:
        return batch_images.to(device, non_blocking=True), 0
    return prepare(batch_images, device)


def sample_crop(width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """timm's RandomResizedCropAndInterpolation.get_params on a (width, height) geometry: (top, left, h, w),
    with the same random calls (a test checks it against timm's own)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = random.uniform(*scale) * area
        aspect = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draft_reduction(crop_h: int, crop_w: int, out_h: int, out_w: int) -> int:
    """The largest JPEG DCT reduction r in (8, 4, 2) with the crop still >= the output at 1/r; else 1."""
    for r in DRAFT_SCALES:
        if crop_h // r >= out_h and crop_w // r >= out_w:
            return r
    return 1


def sample_rand_augment(ra) -> list[tuple[int, tuple]]:
    """The ops timm's RandAugment `ra` would apply, as [(op index, level args)], with timm's random calls.

    Mirrors RandAugment.__call__ (numpy picks the ops) and AugmentOp.__call__ (Python's random decides whether
    the op fires and draws its magnitude; the level function may draw the sign), so the generators move as
    they do in timm.
    """
    if ra is None:
        return []
    if ra.choice_weights is None:  # what np.random.choice(ops, n, replace=True) draws, without its object array
        idx = np.random.randint(0, len(ra.ops), size=ra.num_layers)
    else:
        idx = np.random.choice(len(ra.ops), ra.num_layers, replace=False, p=ra.choice_weights)
    out = []
    for i in idx:
        op = ra.ops[i]
        if op.prob < 1.0 and random.random() > op.prob:
            continue
        magnitude = op.magnitude
        if op.magnitude_std > 0:
            if op.magnitude_std == float("inf"):
                magnitude = random.uniform(0, magnitude)
            else:
                magnitude = random.gauss(magnitude, op.magnitude_std)
        magnitude = max(0.0, min(magnitude, op.magnitude_max or 10.0))
        level = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else tuple()
        out.append((int(i), tuple(level)))
    return out


def apply_rand_augment_pil(ra, ops, img: Image.Image) -> Image.Image:
    """timm's own ops (PIL), as RandAugment applies them."""
    for i, level in ops:
        op = ra.ops[i]
        img = op.aug_fn(img, *level, **op.kwargs)
    return img


def apply_rand_augment_cpu(ra, ops, hwc: np.ndarray) -> np.ndarray:
    """The fastest CPU kernels measured per op (tools.benchmark --data): timm's PIL ops for the point ops,
    OpenCV's warpAffine (bicubic, constant fill, one thread) for rotate/shear/translate, about 8x faster than
    PIL's bicubic affine at 224 px. (H, W, 3) uint8 in and out."""
    img = None
    for i, level in ops:
        op = ra.ops[i]
        if op.name in GEOMETRIC and op.kwargs.get("resample") in (Image.BICUBIC, Image.BILINEAR) and _cv2():
            if img is not None:
                hwc, img = np.asarray(img), None
            hwc = _warp_affine(hwc, pil_affine_matrix(op.name, level[0], hwc.shape[1], hwc.shape[0]),
                               op.kwargs["fillcolor"], op.kwargs["resample"] == Image.BICUBIC)
        else:
            img = op.aug_fn(Image.fromarray(hwc) if img is None else img, *level, **op.kwargs)
    return hwc if img is None else np.asarray(img)


_CV2 = []


def _cv2():
    if not _CV2:
        try:
            import cv2

            cv2.setNumThreads(1)  # a loader worker is one core; OpenCV's pool would oversubscribe it
            _CV2.append(cv2)
        except ImportError:
            _CV2.append(None)
    return _CV2[0]


def _warp_affine(hwc: np.ndarray, m: tuple, fill, bicubic: bool) -> np.ndarray:
    """PIL's Image.transform(AFFINE, m) with OpenCV: PIL maps continuous output coordinates (pixel centres at
    k + 0.5) to input ones; warpAffine's inverse map works on pixel indices, hence the half-pixel shifts."""
    cv2 = _cv2()
    a, b, c, d, e, f = m
    inv = np.array([[a, b, c + 0.5 * (a + b) - 0.5], [d, e, f + 0.5 * (d + e) - 0.5]], dtype=np.float64)
    flags = (cv2.INTER_CUBIC if bicubic else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(np.ascontiguousarray(hwc), inv, (hwc.shape[1], hwc.shape[0]), flags=flags,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(float(v) for v in fill))


def sample_erase(re_prob: float, height: int, width: int, min_area=0.02, max_area=1 / 3,
                 log_aspect=(math.log(0.3), math.log(1 / 0.3))) -> list[int]:
    """timm RandomErasing._erase's box (one region), with its random calls; [applied, top, left, h, w, seed].

    Where timm would fill the box with torch normal noise, one torch draw gives the seed of that noise.
    """
    row = [0, 0, 0, 0, 0, 0]
    if random.random() > re_prob:
        return row
    area = height * width
    for _ in range(10):
        target_area = random.uniform(min_area, max_area) * area
        aspect = math.exp(random.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            top = random.randint(0, height - h)
            left = random.randint(0, width - w)
            seed = int(torch.randint(0, 2**62, (1,)).item())
            return [1, top, left, h, w, seed]
    return row


# ----------------------------------------------------------------------------------------------------------
# Per-sample parameter rows (what a worker sends beside the uint8 image when the device finishes the sample)
# ----------------------------------------------------------------------------------------------------------
# aug row (float32): flip, then per RandAugment layer (op index or -1, level)
def aug_row(flip: bool, ops: list[tuple[int, tuple]], n_layers: int) -> torch.Tensor:
    row = [1.0 if flip else 0.0] + [-1.0, 0.0] * n_layers
    for k, (i, level) in enumerate(ops):
        row[1 + 2 * k], row[2 + 2 * k] = float(i), float(level[0]) if level else 0.0
    return torch.tensor(row, dtype=torch.float32)


def _decode_jpeg(data: bytes) -> torch.Tensor | None:
    """torchvision's libjpeg-turbo decode to (3, H, W) uint8; None where it cannot (PIL then decodes)."""
    try:  # deprecated in torchvision 0.29 for TorchCodec: without it, PIL decodes
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (ImportError, AttributeError, RuntimeError):
        return None


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bilinear": InterpolationMode.BILINEAR, "nearest": InterpolationMode.NEAREST}.get(
        name, InterpolationMode.BICUBIC)


class FastDeiTTransform:
    """DeiT's training view, same distribution as timm's, less CPU work (see the module docstring).

    Called on a decoded PIL image (single-image runs, tar shards) or on what `decode` returned (files: the
    dataset opens the file lazily and `decode` decodes only the scale the crop needs). Returns, with
    `finish_on_device`, (uint8 (3, H, W), erasing row, aug row): flip, RandAugment, the float cast, normalisation
    and erasing are then done on the batch by `DeviceAugment` (the training step's prepare_batch). Without
    it, the finished float32 (3, H, W) as timm's transform returns, RandAugment by timm's own PIL ops.
    """

    decodes = True  # datasets: open lazily and call decode() (common/data.py _SafeLoading)

    def __init__(self, input_size: int = 224, auto_augment: str | None = cdata.DEIT_AUTO_AUGMENT,
                 re_prob: float = 0.25, interpolation: str = "bicubic", mean=cdata.IMAGENET_MEAN,
                 std=cdata.IMAGENET_STD, scale=(0.08, 1.0), finish_on_device: bool = True, draft: bool = True):
        ref = cdata.build_train_transform(input_size, auto_augment, re_prob, interpolation, mean, std, scale)
        steps = ref.transforms
        rrc = steps[0]
        self.size = tuple(rrc.size)  # (h, w)
        self.scale, self.ratio = tuple(rrc.scale), tuple(rrc.ratio)
        self.interpolation = interpolation
        self.flip_p = next((t.p for t in steps if type(t).__name__ == "RandomHorizontalFlip"), 0.0)
        self.ra = next((t for t in steps if type(t).__name__ == "RandAugment"), None)
        self.jitter = None if auto_augment else next((t for t in steps if type(t).__name__ == "ColorJitter"), None)
        if auto_augment and self.ra is None:
            raise ValueError(f"auto_augment {auto_augment!r}: only timm RandAugment policies (rand-...) have a fast "
                             f"path; use the reference transform")
        if self.ra is not None and self.ra.choice_weights is not None:
            raise ValueError("weighted RandAugment (rand-...-w) has no fast path; use the reference transform")
        self.n_layers = self.ra.num_layers if self.ra is not None else 0
        erasing = next((t for t in steps if type(t).__name__ == "RandomErasing"), None)
        self.re_prob = erasing.probability if erasing is not None else 0.0
        self.re_area, self.re_log_aspect = (0.02, 1 / 3), (math.log(0.3), math.log(1 / 0.3))
        if erasing is not None:
            self.re_area, self.re_log_aspect = (erasing.min_area, erasing.max_area), tuple(erasing.log_aspect_ratio)
        self.mean, self.std = tuple(mean), tuple(std)
        self.finish_on_device, self.draft = finish_on_device, draft
        self.device_augment = DeviceAugment(self)

    # -- decode + crop: worker CPU ------------------------------------------------------------------------
    def _resample_name(self) -> str:
        if self.interpolation == "random":  # timm's RandomResizedCropAndInterpolation draws it after the crop
            return random.choice(("bilinear", "bicubic"))
        return self.interpolation

    def decode(self, img: Image.Image) -> "_Cropped":
        """An opened, not yet decoded image -> its random crop resized to the output size, decoded at the
        smallest JPEG DCT scale that keeps the crop >= the output (a truncated file fails here: OSError)."""
        top, left, h, w = sample_crop(img.width, img.height, self.scale, self.ratio)
        mode = self._resample_name()
        r = draft_reduction(h, w, *self.size) if self.draft and img.format == "JPEG" else 1
        if r > 1:
            img.draft("RGB", (img.width // r, img.height // r))
            r = img.decoderconfig[0] if img.decoderconfig else 1  # what the decoder will really give
        elif img.format == "JPEG" and img.mode in ("RGB", "L") and isinstance(getattr(img, "fp", None), io.BytesIO):
            chw = _decode_jpeg(img.fp.getvalue())  # no PIL -> numpy copy; same libjpeg-turbo
            if chw is not None and tuple(chw.shape[1:]) == (img.height, img.width):
                return _Cropped(self._resize_chw(chw, top, left, h, w, mode))
        img.load()
        rgb = img if img.mode == "RGB" else cdata._to_rgb8(img)
        return _Cropped(self._resize(rgb, top, left, h, w, mode, r))

    def _resize_chw(self, chw: torch.Tensor, top, left, h, w, mode: str) -> torch.Tensor:
        import torch.nn.functional as NF

        crop = chw[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)  # faster
        kw = {"antialias": True, "align_corners": False} if mode != "nearest" else {}
        return NF.interpolate(crop, size=self.size, mode=mode if mode != "nearest" else "nearest-exact", **kw)[0]

    def _resize(self, rgb: Image.Image, top, left, h, w, mode: str, r: int = 1) -> torch.Tensor:
        """(3, H, W) uint8 of the crop resized to the output: torch's uint8 antialiased kernels (4x PIL's on
        one core), or PIL's box resize where the crop is fractional at a DCT-reduced scale."""
        if r > 1:
            from timm.data.transforms import str_to_pil_interp

            out = rgb.resize(self.size[::-1], str_to_pil_interp(mode), box=(left / r, top / r, (left + w) / r,
                                                                             (top + h) / r))
            return torch.from_numpy(np.array(out)).permute(2, 0, 1)
        return self._resize_chw(torch.from_numpy(np.array(rgb)).permute(2, 0, 1), top, left, h, w, mode)

    def crop(self, img: Image.Image) -> torch.Tensor:
        """RandomResizedCrop of an already decoded image (same parameters and kernels as decode)."""
        top, left, h, w = sample_crop(img.width, img.height, self.scale, self.ratio)
        return self._resize(img.convert("RGB") if img.mode != "RGB" else img, top, left, h, w, self._resample_name())

    # -- the rest ----------------------------------------------------------------------------------------
    def _sample_erase(self) -> torch.Tensor:
        if self.re_prob <= 0:
            return torch.zeros(ERASE_FIELDS, dtype=torch.int64)
        return torch.tensor(sample_erase(self.re_prob, *self.size, *self.re_area, self.re_log_aspect),
                            dtype=torch.int64)

    def __call__(self, sample):
        chw = sample.image if isinstance(sample, _Cropped) else self.crop(sample)
        flip = bool(torch.rand(1) < self.flip_p)  # torchvision RandomHorizontalFlip's draw
        if self.jitter is not None:  # --aa '': timm's ColorJitter (PIL) here, in timm's order
            img = Image.fromarray(chw.permute(1, 2, 0).numpy())
            img = self.jitter(img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img)
            chw, flip = torch.from_numpy(np.array(img)).permute(2, 0, 1), False
        ops = sample_rand_augment(self.ra)
        if self.finish_on_device:
            return chw.contiguous(), self._sample_erase(), aug_row(flip, ops, self.n_layers)
        if ops:  # HWC for PIL / OpenCV
            hwc = np.ascontiguousarray(chw.permute(1, 2, 0).numpy())
            hwc = apply_rand_augment_cpu(self.ra, ops, _hflip(hwc) if flip else hwc)
            x = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
        else:
            x = chw.flip(-1) if flip else chw.contiguous()
        x = self.device_augment.normalise(x[None].float())
        return erase_(x, self._sample_erase()[None])[0]

    def __repr__(self) -> str:
        return (f"FastDeiTTransform(size={self.size}, scale={self.scale}, rand_augment={self.ra is not None}, "
                f"re_prob={self.re_prob}, finish_on_device={self.finish_on_device}, draft={self.draft})")


def _hflip(hwc: np.ndarray) -> np.ndarray:
    cv2 = _cv2()
    return cv2.flip(hwc, 1) if cv2 is not None else np.ascontiguousarray(hwc[:, ::-1])


class _Cropped:
    """A sample whose crop is decoded and resized already (FastDeiTTransform.decode): (3, H, W) uint8."""

    __slots__ = ("image",)

    def __init__(self, image: torch.Tensor):
        self.image = image


def erase_(x: torch.Tensor, erase: torch.Tensor) -> torch.Tensor:
    """Fill each sample's erasing box (rows of `sample_erase`) with normal(0, 1) noise from its own seed."""
    rows = erase.tolist() if erase.device.type == "cpu" else erase.cpu().tolist()
    g = None
    for b, (on, top, left, h, w, seed) in enumerate(rows):
        if on:
            g = g or _generator(x.device)
            g.manual_seed(seed)
            x[b, :, top:top + h, left:left + w] = torch.randn((x.shape[1], h, w), generator=g, device=x.device)
    return x


_GENERATORS: dict = {}


def _generator(device) -> torch.Generator:
    """One generator per device and process, reseeded per sample (making one costs more than the noise)."""
    key = (os.getpid(), str(device))
    if key not in _GENERATORS:
        _GENERATORS[key] = torch.Generator(device=device)
    return _GENERATORS[key]


# ----------------------------------------------------------------------------------------------------------
# Device side: flip, RandAugment, cast, normalise, erase on the batch with the per-sample rows
# ----------------------------------------------------------------------------------------------------------
class DeviceAugment:
    """(B, 3, H, W) uint8 + erasing rows + aug rows -> the normalised float32 (B, 3, H, W) batch.

    RandAugment's ops are timm's (timm/data/auto_augment.py, PIL semantics) on float images holding uint8
    values: after each op the values are rounded and clipped as PIL's uint8 output is. The samples of a
    layer that drew the same op run as one batched call; the geometric ops (rotate, shear, translate) are
    one bicubic grid_sample over all the samples that drew any of them.
    """

    def __init__(self, t: FastDeiTTransform):
        self.names = [op.name for op in t.ra.ops] if t.ra is not None else []
        self.fill = tuple(t.ra.ops[0].kwargs.get("fillcolor", (128, 128, 128))) if t.ra is not None else (128,) * 3
        self.n_layers, self.mean, self.std = t.n_layers, t.mean, t.std
        self._cache = {}

    def _consts(self, device):
        key = device
        if key not in self._cache:
            m = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
            s = 1.0 / (torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0)
            fill = torch.tensor(self.fill, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self._cache[key] = (m, s, fill)
        return self._cache[key]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        m, s, _ = self._consts(x.device)
        return x.sub_(m).mul_(s) if not x.requires_grad else (x - m) * s

    def __call__(self, images: torch.Tensor, erase: torch.Tensor | None = None,
                 aug: torch.Tensor | None = None) -> torch.Tensor:
        x = images.float()  # (B, 3, H, W) uint8 values
        if aug is not None:
            x = self.augment(x, aug.to(x.device))
        x = self.normalise(x.contiguous())
        return x if erase is None else erase_(x, erase)

    def augment(self, x: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
        flip = aug[:, 0] > 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        rows = aug.cpu()
        for layer in range(self.n_layers):
            ops, levels = rows[:, 1 + 2 * layer].long(), aug[:, 2 + 2 * layer]
            geo = [i for i in ops.unique().tolist() if i >= 0 and self.names[i] in GEOMETRIC]
            if geo:
                idx = torch.nonzero(torch.isin(ops, torch.tensor(geo))).flatten()
                names = [self.names[i] for i in ops[idx].tolist()]
                x[idx.to(x.device)] = self._affine(x[idx.to(x.device)], names, levels[idx.to(x.device)].tolist())
            for i in ops.unique().tolist():
                if i < 0 or self.names[i] in GEOMETRIC:
                    continue
                idx = torch.nonzero(ops == i).flatten().to(x.device)
                x[idx] = point_op(self.names[i], x[idx], levels[idx])
        return x

    def _affine(self, x: torch.Tensor, names: list[str], levels: list[float]) -> torch.Tensor:
        """PIL's affine transforms (output pixel centre u -> input a u + b v + c), bicubic, filled with fill."""
        import torch.nn.functional as NF

        b, _, h, w = x.shape
        theta = torch.tensor([to_normalised_theta(pil_affine_matrix(n, lv, w, h), w, h)
                              for n, lv in zip(names, levels)], dtype=x.dtype, device=x.device)
        grid = torch.matmul(self._base_grid(h, w, x.device), theta.transpose(1, 2)).view(b, h, w, 2)
        fill = self._consts(x.device)[2]
        y = NF.grid_sample(x - fill, grid, mode="bicubic", padding_mode="zeros", align_corners=False) + fill
        return y.round_().clamp_(0, 255)

    def _base_grid(self, h: int, w: int, device) -> torch.Tensor:
        key = ("grid", h, w, str(device))
        if key not in self._cache:
            xs = (torch.arange(w, dtype=torch.float32, device=device) * 2 + 1) / w - 1
            ys = (torch.arange(h, dtype=torch.float32, device=device) * 2 + 1) / h - 1
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            self._cache[key] = torch.stack([gx, gy, torch.ones_like(gx)], -1).view(1, h * w, 3)
        return self._cache[key]


GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")


def pil_affine_matrix(name: str, level: float, w: int, h: int) -> tuple:
    """(a, b, c, d, e, f) of timm's op as PIL applies it: input = (a x + b y + c, d x + e y + f)."""
    if name == "ShearX":
        return (1, level, 0, 0, 1, 0)
    if name == "ShearY":
        return (1, 0, 0, level, 1, 0)
    if name == "TranslateXRel":
        return (1, 0, level * w, 0, 1, 0)
    if name == "TranslateYRel":
        return (1, 0, 0, 0, 1, level * h)
    if name == "TranslateX":
        return (1, 0, level, 0, 1, 0)
    if name == "TranslateY":
        return (1, 0, 0, 0, 1, level)
    if name == "Rotate":  # PIL Image.rotate: about the centre (w/2, h/2), counter-clockwise
        a = -math.radians(level)
        cx, cy = w / 2.0, h / 2.0
        ca, sa = math.cos(a), math.sin(a)
        return (ca, sa, cx - ca * cx - sa * cy, -sa, ca, cy + sa * cx - ca * cy)
    raise ValueError(name)


def to_normalised_theta(m: tuple, w: int, h: int) -> list:
    """PIL's pixel-coordinate affine map -> affine_grid's theta in [-1, 1] coordinates (align_corners=False:
    normalised n = 2 u / size - 1 with u the continuous coordinate, pixel centres at k + 0.5)."""
    a, b, c, d, e, f = m
    # u_in = a u + b v + c with u = (n_x + 1) w / 2: n_in_x = a n_x + b (h / w) n_y + (a + b h / w - 1 + 2 c / w)
    return [[a, b * h / w, a + b * h / w - 1 + 2 * c / w],
            [d * w / h, e, d * w / h + e - 1 + 2 * f / h]]


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert('L') of (B, 3, H, W) uint8 values: (R 19595 + G 38470 + B 7471 + 2^15) >> 16."""
    return torch.floor((x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 32768) / 65536)


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: Image.blend(degenerate, image, factor), clipped to uint8."""
    f = factor.view(-1, 1, 1, 1)
    return torch.floor(degenerate + f * (x - degenerate)).clamp_(0, 255)  # PIL truncates


def point_op(name: str, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """timm's non-geometric RandAugment ops (PIL semantics) on (B, 3, H, W) float uint8 values, per-sample level."""
    lv = level.view(-1, 1, 1, 1)
    if name == "AutoContrast":  # ImageOps.autocontrast: per channel, [min, max] -> [0, 255], int() truncation
        lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
        scale = 255.0 / (hi - lo).clamp_min(1)
        return torch.where(hi > lo, torch.floor((x - lo) * scale).clamp_(0, 255), x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Invert":
        return 255.0 - x
    if name.startswith("Posterize"):  # bits >= 8: unchanged (timm)
        step = torch.pow(2.0, 8 - lv.clamp(0, 8))
        return torch.where(lv >= 8, x, torch.floor(x / step) * step)
    if name == "SolarizeAdd":  # pixels < 128 get + add, clipped
        return torch.where(x < 128, (x + lv).clamp_(0, 255), x)
    if name.startswith("Solarize"):  # pixels >= threshold inverted
        return torch.where(x >= lv, 255.0 - x, x)
    if name.startswith("Color"):
        return _blend(x, _luma(x).expand_as(x), level)
    if name.startswith("Contrast"):  # degenerate: the mean of the L histogram, rounded
        mean = torch.floor(_luma(x).mean((1, 2, 3), keepdim=True) + 0.5)
        return _blend(x, mean.expand_as(x), level)
    if name.startswith("Brightness"):
        return _blend(x, torch.zeros_like(x), level)
    if name.startswith("Sharpness"):  # degenerate: PIL's SMOOTH filter, the border pixels unchanged
        import torch.nn.functional as NF

        k = torch.ones(3, 1, 3, 3, dtype=x.dtype, device=x.device)
        k[:, :, 1, 1] = 5
        smooth = torch.floor(NF.conv2d(x, k, groups=3) / 13 + 0.5)
        degenerate = x.clone()
        degenerate[:, :, 1:-1, 1:-1] = smooth
        return _blend(x, degenerate, level)
    raise ValueError(f"no batched implementation of the RandAugment op {name!r}")


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize per image and channel: PIL's LUT from the histogram (step from all but the last bin)."""
    b, c, h, w = x.shape
    v = x.reshape(b * c, h * w).long()
    hist = torch.zeros(b * c, 256, dtype=torch.float32, device=x.device).scatter_add_(1, v, torch.ones_like(
        v, dtype=torch.float32))
    idx = torch.arange(256, device=x.device).expand(b * c, 256)
    last = torch.where(hist > 0, idx, torch.zeros_like(idx)).amax(1, keepdim=True)
    step = torch.floor((hist.sum(1, keepdim=True) - hist.gather(1, last)) / 255)
    cum = torch.cumsum(hist, 1) - hist  # counts below each value
    lut = torch.floor((torch.floor(step / 2) + cum) / step.clamp_min(1)).clamp_(0, 255)
    lut = torch.where(step > 0, lut, idx.float())
    return lut.gather(1, v).float().reshape(b, c, h, w)


def prepare_batch(batch_images, device: torch.device, augment: DeviceAugment | None = None) -> torch.Tensor:
    """The training step's input: a float batch moves to the device as it is; FastDeiTTransform's (uint8
    images, erasing rows, aug rows) move as uint8 and are flipped, augmented, normalised and erased there."""
    if isinstance(batch_images, torch.Tensor):
        return batch_images.to(device, non_blocking=True)
    images, erase, aug = batch_images
    return (augment or DeviceAugment(FastDeiTTransform()))(images.to(device, non_blocking=True), erase,
                                                           aug.to(device, non_blocking=True))


def batch_prepare_fn(transform):
    """The engine's prepare_batch(batch_images, device) -> (images, dropped) for a training transform."""
    finish = getattr(transform, "finish", None)
    if finish is not None:  # GpuDeiTPipeline: decoded on the device, where an image may still turn out bad
        return finish
    augment = getattr(transform, "device_augment", None)

    def prepare(batch_images, device):
        return prepare_batch(batch_images, device, augment), 0

    return prepare


# ----------------------------------------------------------------------------------------------------------
# Optional GPU path: workers read bytes and draw parameters; the device decodes and augments the batch
# ----------------------------------------------------------------------------------------------------------
class GpuDeiTPipeline:
    """--data-pipeline gpu: JPEG decode + the whole augmentation on the training device, per-sample parameters.

    Worker (the dataset calls `decode` on the opened header, then the pipeline itself; `sample(bytes)` is both):
    a JPEG PIL reads as RGB or greyscale travels as its file bytes with the crop drawn on its header geometry;
    anything else (PNG, CMYK JPEG, 16-bit, ...) is decoded and cropped in the worker as on the fast path and
    travels as the cropped uint8 image. Then flip, RandAugment and erasing are drawn. Every draw is the fast
    path's call, in its order, so the same seeds give the same parameters. `collate` batches the samples.
    Device (`finish(batch, device)`): the JPEGs are decoded (torchvision.io.decode_jpeg, batched on CUDA), a
    JPEG the device decoder rejects is decoded on the CPU, each crop is resized (antialiased bicubic), then
    DeviceAugment. An image no decoder reads is dropped and counted (on_bad_image skip) or BadImageError.
    """

    decodes = True  # datasets: open lazily and call decode() (common/data.py _SafeLoading, pretrain/shards.py)

    def __init__(self, transform: FastDeiTTransform, on_bad_image: str = "skip"):
        if transform.jitter is not None:
            raise ValueError("ColorJitter (--aa '') has no GPU path; use the reference transform")
        self.t, self.on_bad_image = transform, on_bad_image
        self.device_augment = transform.device_augment

    # -- worker ----------------------------------------------------------------------------------------------
    def decode(self, img: Image.Image) -> "_Cropped | _Pending":
        """An opened, not yet decoded image -> the JPEG's bytes + its crop, or (not for the device decoder)
        the crop decoded and resized here (FastDeiTTransform.decode: the same draws)."""
        fp = getattr(img, "fp", None)
        if img.format != "JPEG" or img.mode not in ("RGB", "L") or not isinstance(fp, io.BytesIO):
            return self.t.decode(img)
        crop = sample_crop(img.width, img.height, self.t.scale, self.t.ratio)
        bilinear = self.t._resample_name() == "bilinear"
        data = torch.frombuffer(bytearray(fp.getvalue()), dtype=torch.uint8)
        return _Pending(data, torch.tensor([*crop, bilinear, img.height, img.width]), img.filename or "")

    def __call__(self, sample) -> dict:
        """decode()'s result (or a decoded PIL image: single-image runs) -> the sample: bytes or cropped image,
        and the rows of the device's work. The rest of the draws, as FastDeiTTransform.__call__ makes them."""
        if isinstance(sample, Image.Image):
            sample = _Cropped(self.t.crop(sample))
        flip = bool(torch.rand(1) < self.t.flip_p)
        ops = sample_rand_augment(self.t.ra)
        pending = isinstance(sample, _Pending)
        return {"jpeg": sample.data if pending else None, "image": None if pending else sample.image.contiguous(),
                "crop": sample.crop if pending else torch.zeros(CROP_FIELDS, dtype=torch.int64),
                "name": sample.name if pending else "", "erase": self.t._sample_erase(),
                "aug": aug_row(flip, ops, self.t.n_layers)}

    def sample(self, data: bytes) -> dict:
        return self(self.decode(Image.open(io.BytesIO(data))))

    @staticmethod
    def collate(samples: list[dict]) -> dict:
        """The JPEGs' bytes concatenated (+ each sample's length, 0 where it is a cropped image), the cropped
        images stacked, names listed, rows stacked. A fixed number of tensors: each is one shared-memory file
        descriptor while a worker's batch is in flight, and one per image exhausts a 1024 open-file limit."""
        jpegs = [s["jpeg"] for s in samples if s["jpeg"] is not None]
        images = [s["image"] for s in samples if s["jpeg"] is None]
        return {"jpeg": torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8),
                "jpeg_len": torch.tensor([0 if s["jpeg"] is None else s["jpeg"].numel() for s in samples]),
                "image": torch.stack(images) if images else None, "name": [s["name"] for s in samples],
                **{k: torch.stack([s[k] for s in samples]) for k in ("crop", "erase", "aug")}}

    @staticmethod
    def _unpack(batch: dict) -> tuple[list, list]:
        """collate's batch -> per sample, the JPEG bytes (or None) and the cropped image (or None)."""
        lengths = batch["jpeg_len"].tolist()
        chunks = iter(torch.split(batch["jpeg"], [n for n in lengths if n]))
        images = iter(batch["image"] if batch["image"] is not None else ())
        jpeg = [next(chunks) if n else None for n in lengths]
        return jpeg, [None if n else next(images) for n in lengths]

    # -- device ----------------------------------------------------------------------------------------------
    def finish(self, batch: dict, device) -> tuple[torch.Tensor, int]:
        """The collated batch -> (the normalised float (B', 3, H, W) batch on `device`, B - B' images dropped)."""
        dev = torch.device(device)
        jpeg, images = self._unpack(batch)
        idx = [i for i, d in enumerate(jpeg) if d is not None]
        decoded = dict(zip(idx, self._decode([jpeg[i] for i in idx], dev)))
        out, keep = [], []
        for i, row in enumerate(batch["crop"].tolist()):
            img = images[i]
            if img is None:
                img = self._checked(decoded[i], row, batch["name"][i])
                img = None if img is None else self._resize(img, row)
            if img is not None:
                out.append(img.to(dev, non_blocking=True).float())  # worker-cropped uint8 beside CUDA floats
                keep.append(i)
        dropped = len(batch["crop"]) - len(keep)
        if not out:
            return torch.empty((0, 3, *self.t.size), device=dev), dropped
        rows = torch.tensor(keep)
        images = torch.stack(out)  # (B', 3, H, W) float, uint8 values
        return self.device_augment(images, batch["erase"][rows], batch["aug"][rows].to(dev)), dropped

    def __repr__(self) -> str:
        return f"GpuDeiTPipeline({self.t!r}, on_bad_image={self.on_bad_image})"

    def _decode(self, data: list[torch.Tensor], dev) -> list:
        """(3, h, w) uint8 per JPEG on `dev`, or the error of the last decoder that failed on it."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if dev.type == "cuda" and data:
            try:
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=dev)
            except RuntimeError:
                pass  # one file the device decoder rejects fails the batched call: one by one below
        return [self._decode_one(d, dev) for d in data]

    @staticmethod
    def _decode_one(data: torch.Tensor, dev):
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=dev)
        except RuntimeError:
            pass  # libjpeg-turbo / nvJPEG refused it: PIL may still read it (on the CPU)
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
                rgb = cdata._to_rgb8(im)
            return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).to(dev)
        except cdata.BAD_IMAGE_ERRORS as e:
            return e

    def _checked(self, img, row: list[int], name: str):
        """The decoded image, or None (skip: warned and counted as the dataset's bad images are) / BadImageError."""
        if isinstance(img, torch.Tensor) and tuple(img.shape[1:]) == tuple(row[5:7]):
            return img
        why = img if not isinstance(img, torch.Tensor) else f"decoded {tuple(img.shape[1:])}, header {row[5:7]}"
        if self.on_bad_image == "fail":
            raise cdata.BadImageError(f"unreadable image {name or '(name unknown)'}: {why} (use --on-bad-image "
                                      f"skip to skip it)")
        warnings.warn(f"skipping unreadable image {name or '(name unknown)'}: {why}", stacklevel=1)
        return None

    def _resize(self, img: torch.Tensor, row: list[int]) -> torch.Tensor:
        """(3, h, w) uint8 -> the crop resized to the output, (3, H, W) uint8 values (float on CUDA)."""
        import torch.nn.functional as NF

        top, left, h, w, bilinear = row[:5]
        mode = "bilinear" if bilinear else ("bicubic" if self.t.interpolation in ("random", "bicubic")
                                            else self.t.interpolation)
        crop = img[None, :, top:top + h, left:left + w]
        if crop.device.type != "cpu":  # CUDA's antialiased kernels take float; round back to uint8 values
            crop = crop.float()
        kw = {"antialias": True, "align_corners": False} if mode != "nearest" else {}
        y = NF.interpolate(crop, size=self.t.size, mode=mode if mode != "nearest" else "nearest-exact", **kw)
        return y[0] if y.dtype == torch.uint8 else y[0].round_().clamp_(0, 255)


CROP_FIELDS = 7  # the GPU path's crop row: top, left, height, width, bilinear, then the header's height, width


class _Pending:
    """A JPEG for the device decoder (GpuDeiTPipeline.decode): its bytes, crop row and file name."""

    __slots__ = ("data", "crop", "name")

    def __init__(self, data: torch.Tensor, crop: torch.Tensor, name: str):
        self.data, self.crop, self.name = data, crop, name
