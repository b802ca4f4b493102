"""pretrain/pipeline.py: the fast DeiT augmentation draws what timm's draws and produces the same images.

- parameters: from the same seeds, the fast path and timm's transform pick the same crop, flip, RandAugment
  ops and magnitudes and erasing box (the same random calls, in the same order);
- statistics: over many draws, the distributions of crop area and aspect ratio, flip rate, op frequencies and
  magnitudes, erasing rate and area agree with timm's, and the output pixels' mean / std agree within
  sampling error, for the CPU path, the uint8 batch finished by DeviceAugment and the GPU path on CPU tensors;
- pixels: every RandAugment op agrees with timm's PIL op (point ops exactly; affine ones within bicubic
  interpolation tolerance), and a crop resized by the fast path agrees with timm's crop within interpolation
  tolerance, DCT-reduced (PIL draft) decode included.
"""
import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from common import data as cdata
from pretrain import pipeline as P

SIZE = 64  # small output: the statistics tests draw thousands of samples in a few seconds


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A natural-ish image: smooth gradients, blobs and texture (edges and flat areas both present)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.stack([128 + 100 * np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _seed(s: int) -> None:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


class _Recorder:
    """Records the parameters timm's transform draws, by wrapping its random parts."""

    def __init__(self, ref):
        self.rows = []
        rrc, flip, ra, *_ = ref.transforms
        erase = ref.transforms[-1]
        orig_params, orig_flip = rrc.get_params, flip.forward

        def get_params(img, scale, ratio):
            out = orig_params(img, scale, ratio)
            self.rows.append({"crop": out})
            return out

        def flip_forward(img):
            before = torch.get_rng_state()
            out = orig_flip(img)
            torch.set_rng_state(before)
            self.rows[-1]["flip"] = bool(torch.rand(1) < flip.p)
            return out

        rrc.get_params = get_params
        flip.forward = flip_forward
        for i, op in enumerate(ra.ops):
            op.aug_fn = self._wrap(i, op.aug_fn)
        orig_erase = erase._erase

        def _erase(img, chan, h, w, dtype):
            state = random.getstate()
            self.rows[-1]["erase"] = P.sample_erase(erase.probability, h, w, erase.min_area, erase.max_area,
                                                    erase.log_aspect_ratio)[:5]
            random.setstate(state)
            return orig_erase(img, chan, h, w, dtype)

        erase._erase = _erase

    def _wrap(self, i, fn):
        def aug(img, *level, **kw):
            self.rows[-1].setdefault("ops", []).append((i, tuple(level)))
            return fn(img, *level, **kw)
        return aug


def _fast_params(t: P.FastDeiTTransform, img: Image.Image):
    """The parameters the fast path draws for one sample (the same calls FastDeiTTransform makes)."""
    crop = P.sample_crop(img.width, img.height, t.scale, t.ratio)
    flip = bool(torch.rand(1) < t.flip_p)
    ops = P.sample_rand_augment(t.ra)
    erase = P.sample_erase(t.re_prob, *t.size, *t.re_area, t.re_log_aspect)
    return {"crop": crop, "flip": flip, "ops": ops, "erase": erase[:5]}


def test_same_seeds_same_parameters_as_timm():
    img = _photo(200, 150)
    ref = cdata.build_train_transform(SIZE)
    rec = _Recorder(ref)
    fast = P.FastDeiTTransform(SIZE)
    for s in range(300):
        _seed(s)
        ref(img)
        _seed(s)
        got = _fast_params(fast, img)
        want = rec.rows[-1]
        assert got["crop"] == want["crop"] and got["flip"] == want["flip"], s
        assert got["ops"] == want.get("ops", []), s
        assert got["erase"] == want["erase"], s


def _draws(n: int, seed0: int, fn) -> list:
    out = []
    for s in range(n):
        _seed(seed0 + s)
        out.append(fn())
    return out


def _within(a: np.ndarray, b: np.ndarray, z: float = 4.5) -> bool:
    """Means of two independent samples agree within z standard errors."""
    se = math.sqrt(a.var() / len(a) + b.var() / len(b)) + 1e-12
    return abs(a.mean() - b.mean()) <= z * se


@pytest.mark.slow
def test_parameter_distributions_match_timm_independent_seeds():
    """Different seeds for the two paths: the distributions (not just the draws) agree within sampling error."""
    img = _photo(200, 150)
    ref = cdata.build_train_transform(SIZE)
    rec = _Recorder(ref)
    fast = P.FastDeiTTransform(SIZE)
    n = 2000
    for s in range(n):
        _seed(10_000 + s)
        rec.rows.append({})
        rrc = ref.transforms[0]
        rec.rows[-1] = {"crop": rrc.get_params(img, rrc.scale, rrc.ratio)}
        rec.rows.pop(-2)
        rec.rows[-1]["flip"] = bool(torch.rand(1) < 0.5)
        ops = []
        for op in np.random.choice(ref.transforms[2].ops, 2, replace=True):
            if random.random() > op.prob:
                continue
            m = max(0.0, min(random.gauss(op.magnitude, op.magnitude_std), 10.0))
            ops.append((ref.transforms[2].ops.index(op), tuple(op.level_fn(m, op.hparams)) if op.level_fn else ()))
        rec.rows[-1]["ops"] = ops
        er = ref.transforms[-1]
        rec.rows[-1]["erase"] = P.sample_erase(er.probability, SIZE, SIZE, er.min_area, er.max_area,
                                               er.log_aspect_ratio)[:5]
    want = rec.rows[-n:]
    got = _draws(n, 50_000, lambda: _fast_params(fast, img))

    def stats(rows):
        crop = np.array([r["crop"] for r in rows], dtype=float)
        area = crop[:, 2] * crop[:, 3] / (img.width * img.height)
        aspect = np.log(crop[:, 3] / crop[:, 2])
        flip = np.array([r["flip"] for r in rows], dtype=float)
        ops = [o for r in rows for o in r["ops"]]
        freq = np.bincount([i for i, _ in ops], minlength=15) / len(rows)
        erase = np.array([r["erase"] for r in rows], dtype=float)
        return area, aspect, flip, ops, freq, erase

    a_area, a_aspect, a_flip, a_ops, a_freq, a_erase = stats(want)
    b_area, b_aspect, b_flip, b_ops, b_freq, b_erase = stats(got)
    assert _within(a_area, b_area) and _within(a_aspect, b_aspect) and _within(a_flip, b_flip)
    assert _within(a_area ** 2, b_area ** 2) and _within(a_aspect ** 2, b_aspect ** 2)
    # op frequencies: each op's count per sample is binomial-ish; 2 layers x p 0.5 / 15 ops = 1/15 per sample
    se = np.sqrt((a_freq + b_freq) / n) + 1e-9
    assert np.all(np.abs(a_freq - b_freq) <= 4.5 * se), (a_freq, b_freq)
    for k in range(15):  # magnitudes per op (absolute level: the sign is a fair coin in both)
        la = np.array([abs(lv[0]) for i, lv in a_ops if i == k and lv], dtype=float)
        lb = np.array([abs(lv[0]) for i, lv in b_ops if i == k and lv], dtype=float)
        if len(la) > 30 and len(lb) > 30 and la.std() + lb.std() > 0:
            assert _within(la, lb), k
    assert _within(a_erase[:, 0], b_erase[:, 0])  # erasing rate
    on_a, on_b = a_erase[a_erase[:, 0] == 1], b_erase[b_erase[:, 0] == 1]
    assert _within(on_a[:, 3] * on_a[:, 4], on_b[:, 3] * on_b[:, 4])  # erased area


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                                  "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                                  "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                                  "TranslateXRel", "TranslateYRel"])
def test_rand_augment_ops_match_timm_pixels(name):
    """CPU kernels (PIL / OpenCV) and the batched tensor ops (DeviceAugment) against timm's PIL op."""
    t = P.FastDeiTTransform(96)
    i = next(k for k, op in enumerate(t.ra.ops) if op.name == name)
    op = t.ra.ops[i]
    geometric = name in P.GEOMETRIC
    for mag, s in ((3, 0), (9, 1)):
        level = op.level_fn(mag, op.hparams) if op.level_fn else ()
        img = _photo(96, 96, s)
        ref = np.asarray(op.aug_fn(img, *level, **op.kwargs)).astype(np.float32)
        cpu = P.apply_rand_augment_cpu(t.ra, [(i, level)], np.array(img)).astype(np.float32)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
        dev = t.device_augment.augment(x, P.aug_row(False, [(i, level)], 2)[None])[0].permute(1, 2, 0).numpy()
        for got in (cpu, dev):
            diff = np.abs(got - ref)
            if geometric:  # bicubic a=-0.75 (OpenCV / torch) vs PIL's a=-0.5; edges of the fill differ
                assert diff.mean() < 2.0 and (diff > 24).mean() < 0.02, (name, diff.mean())
            else:
                assert diff.max() <= 1 and diff.mean() < 0.05, (name, diff.max(), diff.mean())


@pytest.mark.parametrize("size,draft", [((140, 110), False), ((800, 640), True)])
def test_crop_pixels_match_timm_within_interpolation_tolerance(size, draft):
    """No RandAugment / erasing: the fast path's crop of the JPEG (torchvision decode + torch antialiased
    bicubic, or PIL draft at 1/2..1/8 for crops >= 2x the output) against timm's crop of the fully decoded image."""
    data = _jpeg(_photo(*size, seed=3))
    ref = cdata.build_train_transform(SIZE, None, 0.0)  # RRC, flip, ColorJitter (RNG: torch), no erasing
    ref.transforms = [ref.transforms[0], ref.transforms[1]]
    fast = P.FastDeiTTransform(SIZE, None, 0.0)
    fast.jitter = None
    reductions, diffs = [], []
    for s in range(20):
        _seed(s)
        want = np.asarray(ref(Image.open(io.BytesIO(data)).convert("RGB"))).astype(np.float32)
        _seed(s)
        im = Image.open(io.BytesIO(data))
        crop = P.sample_crop(im.width, im.height, fast.scale, fast.ratio)
        reductions.append(P.draft_reduction(crop[2], crop[3], SIZE, SIZE))
        _seed(s)
        chw, _, row = fast(fast.decode(Image.open(io.BytesIO(data))))
        got = chw.permute(1, 2, 0).numpy().astype(np.float32)
        if row[0] > 0.5:
            got = got[:, ::-1]
        diffs.append(np.abs(got - want).mean())
    assert (max(reductions) > 1) == draft
    # JPEG decoders differ by <= 1-2 levels; DCT-domain scaling is a box-like prefilter before bicubic
    assert np.mean(diffs) < (2.5 if draft else 1.0), np.mean(diffs)
    assert max(diffs) < (5.0 if draft else 2.0), max(diffs)


def _reference_batch(images: list[bytes], seeds) -> torch.Tensor:
    ref = cdata.build_train_transform(SIZE)
    out = []
    for s in seeds:
        _seed(s)
        out.append(ref(Image.open(io.BytesIO(images[s % len(images)])).convert("RGB")))
    return torch.stack(out)


def _fast_samples(t, images, seeds) -> list:
    """What the worker hands over for each seeded draw (one image per seed)."""
    samples = []
    for s in seeds:
        _seed(s)
        samples.append(t(t.decode(Image.open(io.BytesIO(images[s % len(images)])))))
    return samples


def _fast_cpu_batch(images, seeds) -> torch.Tensor:
    return torch.stack(_fast_samples(P.FastDeiTTransform(SIZE, finish_on_device=False), images, seeds))


def _fast_device_batch(images, seeds) -> torch.Tensor:
    t = P.FastDeiTTransform(SIZE, finish_on_device=True)
    batch = default_collate(_fast_samples(t, images, seeds))
    assert batch[0].dtype == torch.uint8 and batch[0].shape[1] == 3
    images, dropped = P.batch_prepare_fn(t)(batch, torch.device("cpu"))
    assert dropped == 0
    return images


def _gpu_path_batch(images, seeds) -> torch.Tensor:
    pipe = P.GpuDeiTPipeline(P.FastDeiTTransform(SIZE))
    samples = []
    for s in seeds:
        _seed(s)
        samples.append(pipe.sample(images[s % len(images)]))
    images, dropped = pipe.finish(pipe.collate(samples), "cpu")
    assert dropped == 0
    return images


@pytest.fixture(scope="module")
def jpegs():
    return [_jpeg(_photo(int(w), int(h), seed=k)) for k, (w, h) in
            enumerate([(120, 90), (90, 120), (150, 100), (100, 100), (140, 105), (110, 140)])]


@pytest.mark.slow
@pytest.mark.parametrize("path", ["cpu", "device", "gpu_on_cpu"])
def test_output_pixel_statistics_match_timm(path, jpegs):
    """Mean / std of the output pixels (per channel) over many samples from the same seeds agree with timm's
    within sampling error; per-sample means correlate (same crops, flips, ops, erasing boxes)."""
    fn = {"cpu": _fast_cpu_batch, "device": _fast_device_batch, "gpu_on_cpu": _gpu_path_batch}[path]
    seeds = range(240)
    ref, got = _reference_batch(jpegs, seeds), fn(jpegs, seeds)
    assert got.shape == ref.shape and got.dtype == torch.float32
    ref_m, got_m = ref.mean((2, 3)), got.mean((2, 3))  # per sample and channel
    for c in range(3):
        assert _within(ref_m[:, c].numpy(), got_m[:, c].numpy(), z=3.0)
        assert _within(ref.std((2, 3))[:, c].numpy(), got.std((2, 3))[:, c].numpy(), z=3.0)
    corr = np.corrcoef(ref_m.flatten().numpy(), got_m.flatten().numpy())[0, 1]
    assert corr > 0.97, corr
    # erased samples: the same boxes, normal(0, 1) noise in both
    assert abs(ref.mean().item() - got.mean().item()) < 0.05


def test_cpu_and_device_paths_are_identical(jpegs):
    """The worker-finished CPU path and the uint8 batch finished by DeviceAugment differ only where RandAugment's
    affine ops run (OpenCV vs torch bicubic): elsewhere they are the same bits, erasing noise included."""
    seeds = range(40)
    a, b = _fast_cpu_batch(jpegs, seeds), _fast_device_batch(jpegs, seeds)
    same = (a == b).flatten(1).all(1)
    assert same.float().mean() > 0.6
    assert (a - b).abs().mean() < 0.02


def test_draft_reduction_keeps_the_crop_at_least_the_output():
    assert P.draft_reduction(448, 448, 224, 224) == 2
    assert P.draft_reduction(447, 900, 224, 224) == 1
    assert P.draft_reduction(1800, 1900, 224, 224) == 8
    assert P.draft_reduction(900, 1000, 224, 224) == 4


def test_truncated_jpeg_is_a_bad_image(tmp_path):
    data = _jpeg(_photo(200, 150))
    path = tmp_path / "cls" / "bad.jpg"
    path.parent.mkdir()
    path.write_bytes(data[: len(data) // 3])
    (tmp_path / "cls" / "good.jpg").write_bytes(data)
    ds = cdata.SafeImageFolder(str(tmp_path), transform=P.FastDeiTTransform(SIZE, finish_on_device=False))
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert ds[0] is None
    assert ds[1][0].shape == (3, SIZE, SIZE)


def test_sample_crop_is_timms_get_params():
    from timm.data.transforms import RandomResizedCropAndInterpolation

    img = Image.new("RGB", (333, 500))
    for s in range(200):
        random.seed(s)
        want = RandomResizedCropAndInterpolation.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        random.seed(s)
        assert P.sample_crop(333, 500, (0.08, 1.0), (3 / 4, 4 / 3)) == want


def test_num_workers_auto():
    assert P.resolve_num_workers(3) == 3 and P.resolve_num_workers(0) == 0
    assert P.resolve_num_workers("auto", local_world_size=1, cpus=12) == 11
    assert P.resolve_num_workers("auto", local_world_size=8, cpus=96) == 11
    assert P.resolve_num_workers("auto", local_world_size=1, cpus=1) == 0
    assert P.resolve_num_workers("auto", local_world_size=1, cpus=256) == P.MAX_AUTO_WORKERS
    assert P.WORKERS_AUTO == "auto" and type(P.WORKERS_AUTO)("4") == 4
    with pytest.raises(ValueError):
        type(P.WORKERS_AUTO)("many")


def test_single_image_and_decoded_inputs():
    """Decoded PIL images (single-image runs, tar shards) take the same path without the lazy decode."""
    t = P.FastDeiTTransform(SIZE)
    chw, erase, row = t(_photo(120, 90).convert("L"))
    assert chw.shape == (3, SIZE, SIZE) and chw.dtype == torch.uint8 and erase.shape == (6,) and row.shape == (5,)
