"""The objective, masking, one-pass student and schedule against the spec's formulas (§1.4, §1.5, §1.7)."""

import os

import pytest
import torch

from pretrain.masking import MaskGenerator, validate_mask_config

os.environ["HF_HUB_OFFLINE"] = "1"


def test_mask_generator_fixed_ratio_and_probability():
    gen = MaskGenerator(256, 0.5, [0.5], seed=0)
    masks, rows = gen(128)
    assert rows.numel() == 64 and masks.sum(1)[rows].eq(128).all()  # 64 masked samples x 128 tokens
    assert masks.sum() == 64 * 128 and not masks[~torch.isin(torch.arange(128), rows)].any()


def test_mask_generator_stratified_range():
    gen = MaskGenerator(100, 1.0, [0.1, 0.5], seed=0)
    masks, rows = gen(8)
    counts = sorted(masks.sum(1).tolist())
    edges = torch.linspace(0.1, 0.5, 9)
    for i, k in enumerate(counts):  # one ratio per stratum of [0.1, 0.5]
        assert int(100 * edges[i]) <= k <= int(100 * edges[i + 1])


@pytest.mark.parametrize("prob,ratio,needle", [(0.5, [1.5], "--mask-ratio must lie in [0, 1]"),
                                               (1.2, [0.5], "--mask-probability must be in [0, 1]"),
                                               (0.5, [0.6, 0.2], "LO <= HI")])
def test_mask_config_errors(prob, ratio, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        validate_mask_config(prob, ratio)
