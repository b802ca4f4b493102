"""Issue #10 for pretrain.main, tested the way the world behaves: signals to the process group (with
DataLoader workers, and under torchrun), a changed flag on resume, two runs on one directory, foreign and
unreadable checkpoints, a full disk (RLIMIT_FSIZE: the kernel refuses the write), orphan temp files and
every knob validated before any work."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain import main as pretrain_main
from tests.pretrain.helpers import (FAULTY_PRETRAIN, PYTHON, REPO, read_log, teacher_ckpt, text_log,  # noqa: F401
                                    tiny_args, tiny_data, train_losses, write_image_folder)
from tests.pretrain.helpers_hostile_inputs import one_message, run  # noqa: F401


@pytest.mark.slow
@pytest.mark.parametrize("case", ["empty_class", "inside_data", "binary_list", "bare_tensor_teacher", "big_batch"])
def test_bad_data_and_files_are_user_errors(case, tmp_path, tiny_data, teacher_ckpt, capsys):
    import shutil

    data, teacher, out = tiny_data, teacher_ckpt, str(tmp_path / "out")
    if case == "empty_class":
        data = str(tmp_path / "data")
        shutil.copytree(tiny_data, data)
        os.makedirs(os.path.join(data, "n_empty"))
        (tmp_path / "data" / "n_empty" / "readme.txt").write_text("no images here")
    elif case == "inside_data":
        data = str(tmp_path / "data")
        shutil.copytree(tiny_data, data)
        out = os.path.join(data, "run")
    elif case == "binary_list":
        data = str(tmp_path / "list.txt")
        with open(data, "wb") as f:
            f.write(bytes(range(256)) * 4)
    elif case == "bare_tensor_teacher":
        teacher = str(tmp_path / "tensor.pth")
        torch.save(torch.zeros(3), teacher)
    code = pretrain_main.main(tiny_args(data, teacher, out, epochs=1, batch_size=32 if case == "big_batch" else 4))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("pretrain.main: error:") and "Traceback" not in err, err
    needle = {"empty_class": "n_empty", "inside_data": "inside --data-path", "binary_list": "not a text file",
              "bare_tensor_teacher": "not a state dict", "big_batch": "less than one batch of 32"}[case]
    assert needle in err, err


def _flatten(image_folder: str, out) -> str:
    os.makedirs(out, exist_ok=True)
    for c in sorted(os.listdir(image_folder)):
        for f in sorted(os.listdir(os.path.join(image_folder, c))):
            shutil.copy(os.path.join(image_folder, c, f), os.path.join(out, f"{c}_{f}"))
    return str(out)


@pytest.mark.slow
def test_flat_folder_and_list_file_train(tmp_path, tiny_data, teacher_ckpt):
    flat = _flatten(tiny_data, tmp_path / "flat")
    assert pretrain_main.main(tiny_args(flat, teacher_ckpt, str(tmp_path / "a"), epochs=1, pca_every_epochs=1)) == 0
    assert "data: 24 images, 6 steps/epoch" in text_log(str(tmp_path / "a"))
    listing = tmp_path / "images.txt"
    names = sorted(os.listdir(flat))
    listing.write_text("# one path per line\n" + "\n".join(os.path.join("flat", n) for n in names) + "\n")
    assert pretrain_main.main(tiny_args(str(listing), teacher_ckpt, str(tmp_path / "b"), epochs=1)) == 0
    assert train_losses(str(tmp_path / "a")) == train_losses(str(tmp_path / "b"))  # same images, same order


def test_missing_listed_image_is_a_clear_error(tmp_path, tiny_data, teacher_ckpt, capsys):
    listing = tmp_path / "images.txt"
    listing.write_text("nope.jpg\n")
    assert pretrain_main.main(tiny_args(str(listing), teacher_ckpt, str(tmp_path / "o"))) == 2
    assert "listed images do not exist" in capsys.readouterr().err


# ==============================================================================================================
# 2. An ambiguous data layout is never resolved silently
# ==============================================================================================================
def _mixed_root(tmp_path) -> str:
    root = write_image_folder(tmp_path / "mixed", n_per_class=6)
    for i in range(3):  # a few loose images at the top of an ImageFolder root
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(os.path.join(root, f"loose{i}.jpg"))
    return root


@pytest.mark.slow
def test_imagefolder_with_loose_images_is_refused_by_training_and_make_shards(tmp_path, teacher_ckpt):
    root = _mixed_root(tmp_path)
    rc, _, err = run("pretrain.main", tiny_args(root, teacher_ckpt, str(tmp_path / "run")))
    one_message(rc, err, "mixes 3 loose images", "2 sub-folder(s)")
    assert not os.path.exists(tmp_path / "run")
    from tools import make_shards  # noqa: PLC0415

    rc, _, err = run(make_shards.__name__, [root, str(tmp_path / "shards")])
    one_message(rc, err, "mixes 3 loose images")
    assert not os.path.exists(tmp_path / "shards" / "shards-000000.tar")


@pytest.mark.slow
def test_the_log_states_what_each_data_path_was_read_as(tmp_path, tiny_data, teacher_ckpt):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(8):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(flat / f"{i}.jpg")
    out = str(tmp_path / "run")
    rc, _, err = run("pretrain.main", tiny_args(tiny_data, teacher_ckpt, out, epochs=1, pca_every_epochs=0)
                     + ["--data-path", tiny_data, str(flat)])
    assert rc == 0, err[-3000:]
    text = open(os.path.join(out, "pretrain.log")).read()
    assert f"{tiny_data}: ImageFolder, 24 images in 2 class folders" in text
    assert f"{flat}: flat folder (no class sub-folders), 8 images" in text


@pytest.mark.slow
def test_a_list_file_with_a_byte_order_mark_is_read(tmp_path, tiny_data, teacher_ckpt):
    listing = tmp_path / "train.txt"
    paths = [os.path.join(tiny_data, c, f"{i}.JPEG") for c in ("n00000000", "n00000001") for i in range(4)]
    listing.write_text("\n".join(paths) + "\n", encoding="utf-8-sig")  # as Windows Notepad saves it
    out = str(tmp_path / "run")
    rc, _, err = run("pretrain.main", tiny_args(str(listing), teacher_ckpt, out, epochs=1, pca_every_epochs=0))
    assert rc == 0, err[-3000:]
    assert f"{listing}: list file, 8 images" in open(os.path.join(out, "pretrain.log")).read()
