"""The Proteus objective: student + projection heads, compared with a frozen teacher.

Each objective is one entry of OBJECTIVES (name, heads, default weight, loss function); `register_objective`
adds one, and pretrain.main gets its --lambda-<name> knob, the distiller its heads and the logs its losses.

Inputs for a batch of B images with N patches (student and teacher on the same grid):
    x          (B, 3, H, W)  the augmented, ImageNet-normalised batch (teacher and student see the same)
    masks      (B, N) bool   True = patch replaced by the student's mask token
    masked_rows (M,) long    the samples that carry a mask (sorted), M = int(B * mask_probability)
    t_cls      (B, Dc_t)     teacher summary (CLS after its final LayerNorm; C-RADIO: k summary tokens, k x Dt)
    t_patch    (B, N, Dt)    teacher patch tokens after its final LayerNorm
Losses (mean squared errors, mean over every element, as nn.MSELoss):
    L_token = mean_{B x Dc_t} (token_head(s_cls) - t_cls)^2
    L_fea   = mean over the B x Dc_t + B x N x Dt elements of ([token_head(s_cls), fea_head(s_patch)] - [t_cls, t_patch])^2
              (the CLS is position 0 and goes through the *token* head, as in the original)
    L_patch = mean_{|I| x Dt} (patch_head(s_masked[I]) - t_patch[I])^2 over the masked tokens I
    L       = l_token L_token + l_fea L_fea + l_patch L_patch
The original returned NaN for L_patch when nothing was masked (mean of an empty tensor); here an empty
set gives 0. CLIP teachers use L_token only (their patch tokens get no training signal), and heads of
objectives that are switched off are not built, so DDP needs no `find_unused_parameters`.

Several teachers: each has its own heads and the three losses above on its own targets (re-normalised
input, patch tokens resampled to the common grid, optionally PHI-S-normalised: see pretrain/targets.py);
L = sum_t w_t L_t. One teacher is exactly the single-teacher objective (same heads, same checkpoint keys).

One student pass: the unmasked views of all B samples and the masked views of the M masked samples are
concatenated along the batch, (B + M, 3, H, W). The original ran the masked view for all B samples and
threw B - M of them away; the result is the same (tested), the work is (B + M) / 2B of it.
"""
import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from common.errors import ConfigError
from models import ProjectionHead

@dataclass(frozen=True)
class Objective:
    """One distillation objective: its name (--lambda-<name>, the `<teacher>/<name>` log key), the heads it
    trains, its default weight, its loss and whether it needs the masked view."""
    name: str
    heads: tuple[str, ...]  # keys of HEADS; a head is built when an objective that uses it is on
    default_lambda: float
    loss: Callable[["LossInputs"], torch.Tensor]  # -> scalar, fp32
    help: str
    masked: bool = False  # trained on the masked view: also needs --mask-probability > 0


# Projection heads: name -> the part it maps, student's onto teacher's: "cls" (B, Dc) -> the summary (B, Dt_cls),
# "patch" (B, N, Dp) -> the patch tokens (B, N, Dt). Checkpoints hold one teacher's heads as `<name>_head`. In this
# order they are built (and draw their initial weights).
HEADS = {"token": "cls", "fea": "patch", "patch": "patch"}
OBJECTIVES: dict[str, Objective] = {}  # name -> Objective, in loss (and log) order


def register_objective(name: str, heads: tuple[str, ...], default_lambda: float, loss, help: str = "",
                       masked: bool = False, new_heads: dict | None = None) -> Objective:
    """Add an objective (and any heads of its own, name -> "cls" | "patch"): pretrain.main gets a
    --lambda-<name> knob, the distiller builds its heads and logs `<teacher>/<name>`."""
    if name in OBJECTIVES or not name.isidentifier():
        raise ValueError(f"objective name {name!r} is taken or not an identifier")
    HEADS.update(new_heads or {})
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise ValueError(f"objective {name}: unknown head(s) {unknown}; known: {list(HEADS)}")
    OBJECTIVES[name] = Objective(name, tuple(heads), float(default_lambda), loss, help, masked)
    return OBJECTIVES[name]


class LossInputs:
    """One teacher's side of a step, as the loss functions see it (projections computed once, when asked)."""

    def __init__(self, heads, s_cls, s_patch, s_masked, masks, masked_rows, t_cls, t_patch):
        self.heads, self.s_cls, self.s_patch, self.s_masked = heads, s_cls, s_patch, s_masked
        self.masks, self.masked_rows, self.t_cls, self.t_patch = masks, masked_rows, t_cls, t_patch

    @functools.cached_property
    def cls_sq(self) -> torch.Tensor:
        """Sum of squared errors of the token head's CLS projection (shared by L_token and L_fea)."""
        return _mse_sum(self.heads["token"](self.s_cls), self.t_cls)  # (B, Dt) vs (B, Dt)


def token_loss(x: LossInputs) -> torch.Tensor:
    return x.cls_sq / x.t_cls.numel()


def fea_loss(x: LossInputs) -> torch.Tensor:
    patch_sq = _mse_sum(x.heads["fea"](x.s_patch), x.t_patch)  # (B, N, Dt) vs (B, N, Dt)
    return (x.cls_sq + patch_sq) / (x.t_cls.numel() + x.t_patch.numel())


def patch_loss(x: LossInputs) -> torch.Tensor:
    sel = x.masks[x.masked_rows]  # (M, N): sample-major order, as the original's flat index list
    pred = x.heads["patch"](x.s_masked[sel])  # (|I|, Dt)
    target = x.t_patch[x.masked_rows][sel]  # (|I|, Dt)
    return _mse_sum(pred, target) / max(target.numel(), 1)  # empty set -> 0, not NaN


register_objective("token", ("token",), 1.0, token_loss, "weight of the CLS-token loss")
register_objective("fea", ("token", "fea"), 1.0, fea_loss, "weight of the feature loss (CLS + all patches, unmasked "
                                                           "view)")
register_objective("patch", ("patch",), 1.0, patch_loss, "weight of the masked-patch loss", masked=True)


@dataclass(frozen=True)
class TargetSpec:
    """One teacher as the distiller sees it: its unique key, widths, trained objectives and weight.

    `dim`: width of the patch targets; `cls_dim`: width of the summary target (None: `dim`; C-RADIO's concatenated
    summary tokens are k x dim)."""
    key: str
    dim: int
    objectives: tuple[str, ...]
    weight: float = 1.0
    cls_dim: int | None = None

    def width(self, part: str) -> int:
        """Width of the target `part` ("cls" or "patch")."""
        return (self.cls_dim or self.dim) if part == "cls" else self.dim


def select_objectives(patch_targets: bool, lambdas: dict, mask_probability: float) -> tuple[str, ...]:
    """Which objectives are trained for a teacher (lambda > 0; a masked one also needs masking).

    A teacher whose patch tokens are no training target (`Teacher.patch_targets` False: CLIP, whose patch
    tokens OpenAI never trains directly) gets the token objective only.
    """
    if not patch_targets:
        return ("token",)
    chosen = tuple(n for n, o in OBJECTIVES.items() if lambdas[n] > 0 and (not o.masked or mask_probability > 0))
    if not chosen:
        masked = [f"--lambda-{n}" for n, o in OBJECTIVES.items() if o.masked]
        raise ConfigError(f"every objective is off: set at least one of "
                         f"{' / '.join(f'--lambda-{n}' for n in OBJECTIVES)} > 0"
                         + (f" ({', '.join(masked)} also needs --mask-probability > 0)" if masked else ""))
    return chosen


def _mse_sum(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors in at least fp32 (autocast leaves head outputs in bf16/fp16)."""
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    return (pred.to(dtype) - target.to(dtype)).pow(2).sum()


class ProteusDistiller(nn.Module):
    """Student backbone + projection heads for every teacher: everything that trains, and all that DDP wraps.

    Args:
        student: a `models.DinoVisionTransformer` or `models.TimmStudent`
            (forward_features(x, masks[, grid]) -> dict(cls (B, Dc), patch (B, N, Dp))).
        targets: one TargetSpec per teacher (order = loss order).
        lambdas: dict objective name -> weight, applied within each teacher.
        grid: (gh, gw), the token grid every patch target lives on (N = gh * gw).
    Heads: `heads[teacher key][head name]` (HEADS), a ModuleDict per teacher. Losses come back as a dict keyed
    `<teacher key>/<objective>` plus the weighted total `loss` = sum_t w_t sum_o lambda_o L_{t,o}.
    """

    def __init__(self, student: nn.Module, targets: list[TargetSpec], lambdas: dict, grid: tuple[int, int]):
        super().__init__()
        keys = [t.key for t in targets]
        if len(set(keys)) != len(keys) or not keys:
            raise ValueError(f"teacher keys must be unique and at least one, got {keys}")
        self.student, self.targets, self.grid = student, tuple(targets), tuple(grid)
        self.lambdas = {o: float(lambdas[o]) for t in targets for o in t.objectives}
        cls_dim, patch_dim = student.embed_dim, getattr(student, "patch_dim", student.embed_dim)
        self.heads = nn.ModuleDict()
        dims = {"cls": cls_dim, "patch": patch_dim}
        for t in targets:
            used = {h for o in t.objectives for h in OBJECTIVES[o].heads}
            self.heads[t.key] = nn.ModuleDict({h: ProjectionHead(dims[part], t.width(part))
                                               for h, part in HEADS.items() if h in used})
        self.masked_view = any(OBJECTIVES[o].masked for t in targets for o in t.objectives)
        if getattr(student, "has_mask_token", True):
            # without a masked view the mask token never gets a gradient: freeze it (DDP rejects unused params)
            student.mask_token.requires_grad_(self.masked_view)

    @property
    def loss_names(self) -> list[str]:
        """The keys of forward()'s dict, in a fixed order (one all-reduce packs them)."""
        return ["loss"] + [f"{t.key}/{o}" for t in self.targets for o in OBJECTIVES if o in t.objectives]

    # ---- checkpoint layout: one teacher keeps the historical `token_head` / `fea_head` / `patch_head` names
    def head_state_dicts(self) -> dict:
        single = len(self.targets) == 1
        return {(f"{o}_head" if single else f"{key}/{o}"): head.state_dict()
                for key, heads in self.heads.items() for o, head in heads.items()}

    def load_head_state_dicts(self, state: dict) -> None:
        own = {name: None for name in self.head_state_dicts()}
        if set(state) != set(own):
            raise ValueError(f"the checkpoint's heads {sorted(state)} do not match this configuration's "
                             f"{sorted(own)} (teachers or objectives changed?); use a new --output-dir or the "
                             f"original --teacher / --lambda-* settings")
        single = len(self.targets) == 1
        for key, heads in self.heads.items():
            for o, head in heads.items():
                head.load_state_dict(state[f"{o}_head" if single else f"{key}/{o}"])

    def student_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict:
        """The student's dict(cls (B, Dc), patch (B, N, Dp)) on the distillation grid."""
        if getattr(self.student, "has_mask_token", True):  # a ViT on the grid, masking with its mask token
            return self.student.forward_features(x, masks)
        return self.student.forward_features(x, masks, grid=self.grid)  # timm: resampled, pixel masking

    def student_pass(self, x: torch.Tensor, masks: torch.Tensor, masked_rows: torch.Tensor):
        """One forward over [x, x[masked_rows] with masks]; returns (s_cls (B,Dc), s_patch (B,N,Dp), s_masked (M,N,Dp))."""
        B = x.shape[0]
        if not self.masked_view:
            out = self.student_features(x)
            return out["cls"], out["patch"], None
        views = torch.cat([x, x[masked_rows]])  # (B + M, 3, H, W)
        view_masks = torch.cat([torch.zeros_like(masks), masks[masked_rows]])  # (B + M, N)
        out = self.student_features(views, view_masks)
        return out["cls"][:B], out["patch"][:B], out["patch"][B:]

    def forward(self, x, masks, masked_rows, targets: dict) -> dict:
        """targets: teacher key -> dict(cls (B, Dt), patch (B, N, Dt) on `grid`)."""
        s_cls, s_patch, s_masked = self.student_pass(x, masks, masked_rows)
        losses, total = {}, 0
        for t in self.targets:
            inputs = LossInputs(self.heads[t.key], s_cls, s_patch, s_masked, masks, masked_rows,
                                targets[t.key]["cls"], targets[t.key]["patch"])
            own = {o: OBJECTIVES[o].loss(inputs) for o in OBJECTIVES if o in t.objectives}
            losses.update({f"{t.key}/{o}": v for o, v in own.items()})
            weighted = sum(self.lambdas[o] * v for o, v in own.items())
            total = total + (weighted if t.weight == 1.0 else t.weight * weighted)
        return {"loss": total, **losses}
