"""Issue #14 item 4: pretraining data as a flat folder, a list file and WebDataset tar shards.

Shards: written by `python -m tools.make_shards`, streamed by pretrain/shards.py; a kill -9 and resume
gives bitwise the same weights as an uninterrupted run (CPU fp32), with DataLoader workers too; a broken
sample inside a shard is skipped and counted.
"""

import os
import tarfile

from tests.pretrain.helpers import (FAULTY_PRETRAIN, PYTHON, REPO, read_log, shard_dir, teacher_ckpt,  # noqa: F401
                                    text_log, tiny_args, tiny_data, train_losses)
from tools import make_shards


def test_make_shards_writes_tar_files_and_an_index(shard_dir):
    import json

    names = sorted(n for n in os.listdir(shard_dir) if n.endswith(".tar"))
    assert names == [f"shards-{i:06d}.tar" for i in range(5)]
    index = json.load(open(os.path.join(shard_dir, "shards.json")))
    assert [e["nsamples"] for e in index["shardlist"]] == [5, 5, 5, 5, 4]
    with tarfile.open(os.path.join(shard_dir, names[0])) as tf:
        members = tf.getnames()
    assert len(members) == 10 and {m.rsplit(".", 1)[1] for m in members} == {"jpeg", "cls"}


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
