"""The Proteus objective (spec §1.7): student + three projection heads, compared with a frozen teacher.

Inputs for a batch of B images with N patches (student and teacher on the same grid):
    x          (B, 3, H, W)  the augmented, ImageNet-normalised batch (teacher and student see the same)
    masks      (B, N) bool   True = patch replaced by the student's mask token
    masked_rows (M,) long    the samples that carry a mask (sorted), M = int(B * mask_probability)
    t_cls      (B, Dt)       teacher CLS after its final LayerNorm
    t_patch    (B, N, Dt)    teacher patch tokens after its final LayerNorm
Losses (mean squared errors, mean over every element, as nn.MSELoss):
    L_token = mean_{B x Dt} (token_head(s_cls) - t_cls)^2
    L_fea   = mean_{B x (1+N) x Dt} ([token_head(s_cls), fea_head(s_patch)] - [t_cls, t_patch])^2
              (the CLS is position 0 and goes through the *token* head, as in the original)
    L_patch = mean_{|I| x Dt} (patch_head(s_masked[I]) - t_patch[I])^2 over the masked tokens I
    L       = l_token L_token + l_fea L_fea + l_patch L_patch
The original returned NaN for L_patch when nothing was masked (mean of an empty tensor); here an empty
set gives 0. CLIP teachers use L_token only (their patch tokens get no training signal), and heads of
objectives that are switched off are not built, so DDP needs no `find_unused_parameters`.

One student pass: the unmasked views of all B samples and the masked views of the M masked samples are
concatenated along the batch, (B + M, 3, H, W). The original ran the masked view for all B samples and
threw B - M of them away; the result is the same (tested), the work is (B + M) / 2B of it.
"""
import torch
import torch.nn as nn

from models import ProjectionHead

OBJECTIVES = ("token", "fea", "patch")


def select_objectives(teacher_name: str, lambdas: dict, mask_probability: float) -> tuple[str, ...]:
    """Which of token / fea / patch are trained (lambda > 0; patch also needs masking; CLIP: token only)."""
    if teacher_name.startswith("clip_"):
        return ("token",)
    chosen = tuple(o for o in OBJECTIVES if lambdas[o] > 0 and (o != "patch" or mask_probability > 0))
    if not chosen:
        raise ValueError("every objective is off: set at least one of --lambda-token / --lambda-fea / "
                         "--lambda-patch > 0 (--lambda-patch also needs --mask-probability > 0)")
    return chosen


def _mse_sum(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors in at least fp32 (autocast leaves head outputs in bf16/fp16)."""
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    return (pred.to(dtype) - target.to(dtype)).pow(2).sum()


class ProteusDistiller(nn.Module):
    """Student backbone + projection heads: everything that trains, and all that DDP wraps.

    Args:
        student: a `models.DinoVisionTransformer` (forward_features(x, masks) -> dict(cls, patch)).
        teacher_dim: Dt, the width the heads project into.
        objectives: subset of ("token", "fea", "patch"); see `select_objectives`.
        lambdas: dict token/fea/patch -> weight.
    """

    def __init__(self, student: nn.Module, teacher_dim: int, objectives, lambdas: dict):
        super().__init__()
        self.student, self.objectives = student, tuple(objectives)
        self.lambdas = {o: float(lambdas[o]) if o in self.objectives else 0.0 for o in OBJECTIVES}
        d = student.embed_dim
        # the token head also projects the CLS inside L_fea, so it exists whenever token or fea is on
        self.token_head = ProjectionHead(d, teacher_dim) if {"token", "fea"} & set(self.objectives) else None
        self.fea_head = ProjectionHead(d, teacher_dim) if "fea" in self.objectives else None
        self.patch_head = ProjectionHead(d, teacher_dim) if "patch" in self.objectives else None
        # without a masked view the mask token never gets a gradient: freeze it (DDP rejects unused params)
        student.mask_token.requires_grad_(self.patch_head is not None)

    def student_pass(self, x: torch.Tensor, masks: torch.Tensor, masked_rows: torch.Tensor):
        """One forward over [x, x[masked_rows] with masks]; returns (s_cls (B,D), s_patch (B,N,D), s_masked (M,N,D))."""
        B = x.shape[0]
        if self.patch_head is None:
            out = self.student.forward_features(x)
            return out["cls"], out["patch"], None
        views = torch.cat([x, x[masked_rows]])  # (B + M, 3, H, W)
        view_masks = torch.cat([torch.zeros_like(masks), masks[masked_rows]])  # (B + M, N)
        out = self.student.forward_features(views, view_masks)
        return out["cls"][:B], out["patch"][:B], out["patch"][B:]

    def forward(self, x, masks, masked_rows, t_cls, t_patch) -> dict:
        s_cls, s_patch, s_masked = self.student_pass(x, masks, masked_rows)
        zero = s_cls.new_zeros((), dtype=torch.float32)
        losses = {"loss_token": zero, "loss_fea": zero, "loss_patch": zero}
        if self.token_head is not None:
            cls_pred = self.token_head(s_cls)  # (B, Dt)
            cls_sq = _mse_sum(cls_pred, t_cls)
            losses["loss_token"] = cls_sq / t_cls.numel()
        if self.fea_head is not None:
            patch_sq = _mse_sum(self.fea_head(s_patch), t_patch)  # (B, N, Dt) vs (B, N, Dt)
            losses["loss_fea"] = (cls_sq + patch_sq) / (t_cls.numel() + t_patch.numel())
        if self.patch_head is not None:
            sel = masks[masked_rows]  # (M, N): sample-major order, as the original's flat index list
            pred = self.patch_head(s_masked[sel])  # (|I|, Dt)
            target = t_patch[masked_rows][sel]  # (|I|, Dt)
            losses["loss_patch"] = _mse_sum(pred, target) / max(target.numel(), 1)  # empty set -> 0, not NaN
        losses["loss"] = sum(self.lambdas[o] * losses[f"loss_{o}"] for o in OBJECTIVES)
        return losses
