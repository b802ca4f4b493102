"""Position-embedding resampling: the one implementation used everywhere in the project.

DINOv2 builds its hub models at 518 px (a 37x37 grid) and interpolates the patch part of the position
embedding at run time: bicubic, no antialias, with target grid + 0.1 expressed as a *scale factor*
(the +0.1 avoids floating-point rounding down to one row too few). Reproducing exactly that is what makes
our DINOv2 teachers equal the official model at 224 px, so the same function serves run-time
interpolation (teachers at 224, students at 518 for dense tasks) and load-time resampling of checkpoints.
"""
import math

import torch
import torch.nn.functional as F

INTERPOLATE_OFFSET = 0.1


def resample_patch_pos_embed(patch_pos: torch.Tensor, grid_hw: tuple[int, int],
                             offset: float = INTERPOLATE_OFFSET) -> torch.Tensor:
    """Resample a square grid of patch position embeddings to another grid.

    Args:
        patch_pos: (1, M*M, D) position embeddings of the patch tokens only (no prefix tokens).
        grid_hw: target grid (rows, cols).
        offset: DINOv2's interpolation offset; 0 means resize to an exact `size` instead.
    Returns:
        (1, rows*cols, D) in the dtype of `patch_pos`.
    """
    num_patches, dim = patch_pos.shape[1], patch_pos.shape[2]
    side = int(math.sqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"position embedding has {num_patches} patch rows, which is not a square grid")
    rows, cols = grid_hw
    if (rows, cols) == (side, side):
        return patch_pos
    grid = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, M, M)
    if offset:
        scale = ((rows + offset) / side, (cols + offset) / side)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
    else:
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=False)
    if grid.shape[-2:] != (rows, cols):
        raise RuntimeError(f"pos-embed interpolation produced {tuple(grid.shape[-2:])}, expected {(rows, cols)}")
    return grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(patch_pos.dtype)


def resample_pos_embed(pos_embed: torch.Tensor, grid_hw: tuple[int, int], num_prefix_tokens: int = 1,
                       offset: float = INTERPOLATE_OFFSET) -> torch.Tensor:
    """Resample a (1, P + M*M, D) position embedding whose first `num_prefix_tokens` rows (CLS) are kept."""
    prefix, patch = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    return torch.cat([prefix, resample_patch_pos_embed(patch, grid_hw, offset)], dim=1)
