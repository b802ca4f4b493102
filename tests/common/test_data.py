"""Image decoding: 16-bit and float images scaled (not clipped) to 8 bits; decompression bombs are bad images."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from common import data as cdata
from common.data import (SafeImageFolder, build_pretrain_dataset, check_image_folder, collate_skip_bad, load_rgb,
                         set_max_image_pixels)
from common.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _restore_pixel_limit():
    before = cdata._max_image_pixels
    yield
    set_max_image_pixels(before)


def _pixel(path) -> tuple:
    img = load_rgb(str(path))
    assert img.mode == "RGB"
    return img.getpixel((0, 0))


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"  # what PIL makes of a 16-bit PNG
    img = np.asarray(load_rgb(str(tmp_path / "g16.png")))
    assert img.shape == (1, 4, 3) and (img[..., 0] == img[..., 2]).all()
    assert img[0, :, 0].tolist() == [0, 64, 128, 255]  # PIL's convert("RGB") gives 0, 255, 255, 255


def test_float_tiffs_are_scaled_by_their_range(tmp_path):
    Image.fromarray(np.full((2, 2), 0.5, np.float32)).save(tmp_path / "unit.tiff")
    assert _pixel(tmp_path / "unit.tiff") == (128, 128, 128)  # [0, 1] floats; convert("RGB") gives black
    Image.fromarray(np.array([[200.0, 300.0]], np.float32)).save(tmp_path / "wide.tiff")
    assert np.asarray(load_rgb(str(tmp_path / "wide.tiff")))[0, :, 0].tolist() == [200, 255]  # [0, 255], clipped


def test_8bit_images_are_unchanged(tmp_path):
    Image.new("L", (2, 2), 77).save(tmp_path / "l.png")
    Image.new("RGB", (2, 2), (1, 2, 3)).save(tmp_path / "rgb.png")
    assert _pixel(tmp_path / "l.png") == (77, 77, 77) and _pixel(tmp_path / "rgb.png") == (1, 2, 3)


def _folder_with_bomb(root):
    """root/a/{ok_0,ok_1}.png and root/a/bomb.png: 20000 x 20000 pixels in a ~50 kB file."""
    (root / "a").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (8, 8), (i, i, i)).save(root / "a" / f"ok_{i}.png")
    Image.new("1", (20000, 20000)).save(root / "a" / "bomb.png")
    assert (root / "a" / "bomb.png").stat().st_size < 100_000
    return root


def test_decompression_bomb_is_a_bad_image_skipped_counted_or_failed(tmp_path):
    root = _folder_with_bomb(tmp_path / "data")
    to_tensor = lambda im: torch.tensor(im.size)  # noqa: E731
    ds = build_pretrain_dataset([str(root)], to_tensor, on_bad_image="skip")
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*bomb\.png.*400000000 pixels.*above 89478485"):
        batch, n_bad = collate_skip_bad([ds[i] for i in range(len(ds))])
    assert n_bad == 1 and batch[0].shape == (2, 2)
    strict = build_pretrain_dataset([str(root)], to_tensor, on_bad_image="fail")
    bomb = [i for i, (p, _) in enumerate(strict.samples) if p.endswith("bomb.png")][0]
    with pytest.raises(DataError, match=r"bomb\.png.*--max-image-pixels.*--on-bad-image skip"):
        strict[bomb]
    with pytest.raises(RuntimeError):  # what callers caught before
        strict[bomb]


def test_pixel_limit_is_configurable_and_kept_by_the_dataset(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(root / "a" / "big.png")
    Image.new("RGB", (8, 8)).save(root / "a" / "small.png")
    set_max_image_pixels(100)
    ds = build_pretrain_dataset([str(root)], None, on_bad_image="skip")
    set_max_image_pixels(None)  # the dataset keeps the limit it was built with (spawned workers too)
    with pytest.warns(UserWarning, match="16x16 = 256 pixels .images above 100 pixels"):
        got = [ds[i] for i in range(len(ds))]
    assert got[0] is None and got[1][0].size == (8, 8)
    assert load_rgb(str(root / "a" / "big.png")).size == (16, 16)  # no limit now
    with pytest.raises(ConfigError):
        set_max_image_pixels(0)


def _image_folder(root, n=2):
    for c in ("a", "b"):
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(root / c / f"{i}.png")


def test_layout_errors_name_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*ROOT/<class_name>/<image>"):
        check_image_folder(str(tmp_path / "missing"))
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match=r"no class sub-folders \(found loose files such as \['loose.png'\]"):
        check_image_folder(str(tmp_path))
    os.makedirs(tmp_path / "x" / "empty_class")
    with pytest.raises(ValueError, match="1 class folders but no image files"):
        check_image_folder(str(tmp_path / "x"))


def test_safe_image_folder_skips_and_counts_broken_files(tmp_path):
    _image_folder(tmp_path)
    (tmp_path / "a" / "zero.png").write_bytes(b"")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0not really a jpeg")
    ds = SafeImageFolder(str(tmp_path), transform=lambda im: torch.tensor(im.size))
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        batch, n_bad = collate_skip_bad([ds[i] for i in range(len(ds))])
    assert n_bad == 2 and batch[0].shape == (4, 2)
    strict = SafeImageFolder(str(tmp_path), on_bad_image="fail")
    bad_index = [i for i, (p, _) in enumerate(strict.samples) if p.endswith("zero.png")][0]
    with pytest.raises(RuntimeError, match="zero.png.*--on-bad-image skip"):
        strict[bad_index]
