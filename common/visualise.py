"""The paper's Fig. 3: PCA of student vs teacher patch features on a fixed batch, as one RGB image.

Each model's patch features (over the whole batch) are projected on their first three principal
components, min-max scaled to [0, 1] and shown as RGB, next to the input image:
    rows = images, columns = [input | teacher PCA | student PCA]
PCA uses a deterministic SVD (no random projections) so logging never touches the training RNG.
"""
import torch
import torch.nn.functional as F

from common.data import IMAGENET_MEAN, IMAGENET_STD


def pca_rgb(patch: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, N, D) features -> (B, 3, grid, grid) in [0, 1]: the first three principal components."""
    B, N, D = patch.shape
    x = patch.float().reshape(B * N, D)
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    proj = x @ vh[:3].T  # (B*N, 3)
    lo, hi = proj.min(0).values, proj.max(0).values
    proj = (proj - lo) / (hi - lo).clamp_min(1e-6)
    return proj.reshape(B, grid, grid, 3).permute(0, 3, 1, 2)


@torch.no_grad()
def pca_figure(images: torch.Tensor, teacher_patch: torch.Tensor, student_patch: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) normalised; patches (B, N, D*) -> (B*H, 3*W, 3) uint8 HWC grid image."""
    B, _, H, W = images.shape
    grid = int(round(student_patch.shape[1] ** 0.5))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (images.float().cpu() * std + mean).clamp(0, 1)
    cols = [rgb] + [F.interpolate(pca_rgb(p.cpu(), grid), size=(H, W), mode="nearest")
                    for p in (teacher_patch, student_patch)]
    fig = torch.cat(cols, dim=3)  # (B, 3, H, 3W)
    fig = torch.cat(list(fig), dim=1)  # (3, B*H, 3W)
    return (fig.permute(1, 2, 0) * 255).round().to(torch.uint8)
