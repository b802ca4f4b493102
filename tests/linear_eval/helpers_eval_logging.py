"""linear_eval and fine_grained log as pretraining does: JSON lines in log.txt and TensorBoard scalars under
tensorboard/; feature extraction and the linear probe's training print progress with img/s and ETA, and the
printed training loss is the mean over the log window."""

import json
import os

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = json.dumps({"depth": 2, "embed_dim": 32, "num_heads": 2})


COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 220)]


def write_folder(root, per_class, seed):
    rng = np.random.default_rng(seed)
    for k, rgb in enumerate(COLOURS):
        os.makedirs(os.path.join(root, f"c{k}"), exist_ok=True)
        for i in range(per_class):
            px = np.clip(np.array(rgb)[None, None] + rng.normal(0, 25, (28, 28, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(os.path.join(root, f"c{k}", f"{i}.png"))
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("logdata")
    return {"train": write_folder(base / "train", 8, 0), "val": write_folder(base / "val", 3, 1),
            "test": write_folder(base / "test", 3, 2), "root": str(base)}


def json_lines(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "log.txt")) as f:
        return [json.loads(line) for line in f]  # every line is one JSON object


def tensorboard_scalars(run_dir) -> dict:
    """{tag: [(step, value), ...]} read back from the run's events file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = os.listdir(os.path.join(run_dir, "tensorboard"))
    assert len(files) == 1 and files[0].startswith("events.out.tfevents.")
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
