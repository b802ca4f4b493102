"""Issue #14 item 4: pretraining data as a flat folder, a list file and WebDataset tar shards.

Shards: written by `python -m tools.make_shards`, streamed by pretrain/shards.py; a kill -9 and resume
gives bitwise the same weights as an uninterrupted run (CPU fp32), with DataLoader workers too; a broken
sample inside a shard is skipped and counted.
"""
import io
import os
import shutil
import signal
import subprocess
import tarfile

import pytest
import torch

from pretrain import main as pretrain_main
from tools import make_shards
from test_pretrain_fixtures import (FAULTY_PRETRAIN, PYTHON, REPO, read_log, teacher_ckpt, text_log, tiny_args, tiny_data,  # noqa: F401
                                    train_losses)


def _flatten(image_folder: str, out) -> str:
    os.makedirs(out, exist_ok=True)
    for c in sorted(os.listdir(image_folder)):
        for f in sorted(os.listdir(os.path.join(image_folder, c))):
            shutil.copy(os.path.join(image_folder, c, f), os.path.join(out, f"{c}_{f}"))
    return str(out)


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


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tiny_data):
    out = str(tmp_path_factory.mktemp("shards"))
    assert make_shards.main([tiny_data, out, "--shard-size", "5"]) == 0  # 24 images -> 5 shards (last: 4)
    return out


SPEC = "shards-{000000..000004}.tar"


def test_make_shards_writes_tar_files_and_an_index(shard_dir):
    import json

    names = sorted(n for n in os.listdir(shard_dir) if n.endswith(".tar"))
    assert names == [f"shards-{i:06d}.tar" for i in range(5)]
    index = json.load(open(os.path.join(shard_dir, "shards.json")))
    assert [e["nsamples"] for e in index["shardlist"]] == [5, 5, 5, 5, 4]
    with tarfile.open(os.path.join(shard_dir, names[0])) as tf:
        members = tf.getnames()
    assert len(members) == 10 and {m.rsplit(".", 1)[1] for m in members} == {"jpeg", "cls"}


def test_shards_kill9_then_resume_is_exact_with_workers(tmp_path, shard_dir, teacher_ckpt):
    workers = 2  # the stronger case: with 0 workers the main process's RNG state alone would suffice
    spec = os.path.join(shard_dir, SPEC)
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    argv_ref = tiny_args(spec, teacher_ckpt, ref_out, num_workers=workers, pca_every_epochs=1)
    assert pretrain_main.main(argv_ref) == 0
    assert "data: 24 samples in 5 shards, 6 steps/epoch" in text_log(ref_out)
    argv = tiny_args(spec, teacher_ckpt, out, num_workers=workers, pca_every_epochs=1)
    killed = subprocess.run([PYTHON, FAULTY_PRETRAIN, "--kill-at-step", "8", "--", *argv], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert ckpt["global_step"] == 8 and ckpt["data_state"]  # mid-epoch 1, positions per loader role
    assert pretrain_main.main(argv) == 0
    ref = torch.load(os.path.join(ref_out, "student_backbone.pth"), weights_only=True)
    got = torch.load(os.path.join(out, "student_backbone.pth"), weights_only=True)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert all(train_losses(out)[s] == train_losses(ref_out)[s] for s in range(9, 13))


def test_broken_sample_in_a_shard_is_skipped_and_counted(tmp_path, shard_dir, teacher_ckpt):
    bad_dir = tmp_path / "bad"
    shutil.copytree(shard_dir, bad_dir)
    shard = str(bad_dir / "shards-000004.tar")
    with tarfile.open(shard, "a") as tf:  # a 25th sample whose image bytes are not an image
        info = tarfile.TarInfo("999999999.jpg")
        payload = b"not a jpeg at all" * 10
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    os.remove(bad_dir / "shards.json")  # counted from the tar files instead: 25 samples
    out = str(tmp_path / "run")
    assert pretrain_main.main(tiny_args(str(bad_dir / SPEC), teacher_ckpt, out, epochs=1)) == 0
    assert "counting the samples of 5 shards" in text_log(out)
    assert [r for r in read_log(out) if "epoch/bad_images" in r][-1]["epoch/bad_images"] == 1


def test_make_shards_refuses_bad_outputs_and_never_overwrites(tmp_path, tiny_data, shard_dir, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert make_shards.main([tiny_data, str(blocker)]) == 2
    assert make_shards.main([tiny_data, os.path.join(tiny_data, "shards")]) == 2  # inside the source
    before = sorted(os.listdir(shard_dir))
    assert make_shards.main([tiny_data, shard_dir]) == 2  # already holds shards
    err = capsys.readouterr().err
    assert "not a folder" in err and "inside the source" in err and "already holds" in err
    assert "Traceback" not in err and sorted(os.listdir(shard_dir)) == before


def test_corrupt_shard_is_a_clear_error(tmp_path, shard_dir, teacher_ckpt, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    os.remove(bad / "shards.json")
    (bad / "shards-000002.tar").write_bytes(b"not a tar file at all" * 100)
    assert pretrain_main.main(tiny_args(str(bad / SPEC), teacher_ckpt, str(tmp_path / "o"))) == 2
    err = capsys.readouterr().err
    assert "shards-000002.tar is not a readable tar file" in err and "Traceback" not in err
