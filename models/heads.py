"""Projection heads from the student's width into the teacher's feature space."""
import torch.nn as nn


class ProjectionHead(nn.Sequential):
    """LayerNorm(D_s) -> Linear(D_s -> D_t), PyTorch default init (as Proteus). Applied per token."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))
