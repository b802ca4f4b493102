"""common/: atomic checkpoints with history and fallback, image-folder checks, JSON logs."""

import json
import os

import torch

from common.log import MetricLogger, write_json


def test_metric_logger_writes_json_lines_and_tensorboard(tmp_path):
    logger = MetricLogger(str(tmp_path))
    logger.log(10, loss=torch.tensor(0.5), lr=1e-3)
    logger.close()
    rows = [json.loads(line) for line in open(tmp_path / "log.txt")]
    assert rows[0]["step"] == 10 and rows[0]["loss"] == 0.5
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    write_json(str(tmp_path / "r.json"), {"acc": torch.tensor(1.5)})
    assert json.load(open(tmp_path / "r.json")) == {"acc": 1.5}
    MetricLogger(None).log(1, loss=1.0)  # non-main ranks: a no-op, nothing written
