"""`ProteusViT`: our student ViT (models.build_student) as an mmseg backbone.

Design decisions (see segmentation/README.md):
- Position embeddings: the ViT is built at the crop size (518 -> a 37x37 grid) and checkpoints are
  resampled to it once at load with DINOv2's interpolation (models.load_backbone), so fine-tuning learns
  a 37x37 table as the original did; any other input size is interpolated at run time by the ViT.
- Final norm: `final_norm=False` by default, as in the original Proteus evaluation (its mmseg MAE
  backbone dropped the student's final LayerNorm, and the paper's numbers were produced that way).
  `final_norm=True` applies the final LayerNorm to every tapped layer (DINOv2's own dense protocol).
- Parameters that receive no gradient (mask token, final norm when unused, blocks after the last tapped
  one) are frozen, so DDP runs without `find_unused_parameters`.
"""

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmseg.registry import MODELS

from models import backbone_state_dict, build_student, load_state_dict_checked, read_checkpoint
from models.weights import EVAL_ALLOWED_MISSING, PROTEUS_TRAINING_GLOBALS, fit_pos_embed


@MODELS.register_module()
class ProteusViT(BaseModule):
    """DINOv2-layout ViT returning the maps of `out_indices` blocks, optionally paired with the CLS token.

    Args:
        arch: vit_tiny | vit_small | vit_base | vit_large.
        patch_size: 14 (Proteus students) or 16.
        img_size: training crop; the position embedding is stored for this size (multiple of patch_size).
        checkpoint: any file models.load_backbone accepts (our checkpoint.pth / student_backbone.pth,
            original Proteus release files, official DINOv2), or None for random init.
        ema: take the EMA student from a pretrain checkpoint.
        student: the key of one student in a several-student pretrain checkpoint.pth (`--backbone RUN
            --student KEY` of the launchers sets it).
        out_indices: block indices whose outputs are returned, shallow to deep.
        final_norm: apply the final LayerNorm to the returned features (see module doc).
        output_cls_token: return `[map (B, D, h, w), cls (B, D)]` per level (DPT's readout needs it).
        frozen: probing mode: no gradients, always in eval mode, forward under no_grad.
        drop_path_rate: stochastic depth for fine-tuning (linear over blocks).
        num_register_tokens: registers of the checkpoint (0 for Proteus students).
        overrides: extra build_student kwargs, e.g. dict(depth=2, embed_dim=64, num_heads=2) in tests.
    """

    def __init__(self, arch="vit_small", patch_size=14, img_size=518, checkpoint=None, ema=False,
                 out_indices=(3, 5, 7, 11), final_norm=False, output_cls_token=False, frozen=False,
                 drop_path_rate=0.0, num_register_tokens=0, overrides=None, student=None, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}: use a crop of "
                             f"518 for patch 14 or 512 for patch 16")
        self.vit = build_student(arch, patch_size=patch_size, img_size=img_size, drop_path_rate=drop_path_rate,
                                 num_register_tokens=num_register_tokens, **(overrides or {}))
        depth = len(self.vit.blocks)
        self.out_indices = sorted(int(i) for i in out_indices)
        if not self.out_indices or self.out_indices[0] < 0 or self.out_indices[-1] >= depth:
            raise ValueError(f"out_indices {list(out_indices)} must be block indices in [0, {depth - 1}] for "
                             f"{arch} with {depth} blocks")
        self.arch, self.patch_size, self.img_size, self.ema = arch, patch_size, img_size, ema
        self.checkpoint, self.student = checkpoint, student
        self.final_norm, self.output_cls_token, self.frozen = final_norm, output_cls_token, frozen
        self.embed_dim = self.vit.embed_dim
        self._freeze_unused()
        if frozen:
            self.vit.requires_grad_(False)

    def _freeze_unused(self):
        """Parameters outside the computed graph would break DDP without find_unused_parameters."""
        self.vit.mask_token.requires_grad_(False)
        if not self.final_norm:
            self.vit.norm.requires_grad_(False)
        for block in self.vit.blocks[self.out_indices[-1] + 1:]:
            block.requires_grad_(False)

    def init_weights(self):
        """Load the backbone checkpoint (called by the Runner before training, not before testing).

        Overridden on purpose: mmengine's default would call `DinoVisionTransformer.init_weights` and
        re-randomise the ViT. Loading uses the pieces of models.load_backbone (strict, clear errors naming
        the missing / unexpected keys) directly on this ViT, which has drop path / overrides.
        """
        if self.checkpoint in (None, "", "none"):
            print_log(f"ProteusViT: {self.arch} randomly initialised (no checkpoint)", logger="current")
            return
        hint = "put the Proteus backbone there or pass --cfg-options model.backbone.checkpoint=PATH (None = random init)"
        ckpt = read_checkpoint(self.checkpoint, hint=hint, allowed_globals=PROTEUS_TRAINING_GLOBALS)
        sd = backbone_state_dict(ckpt, ema=self.ema, student=self.student)
        # straight into this ViT (it carries drop path / size overrides), with load_backbone's own rules:
        # strict, pos-embed resampled to the crop, only the unused mask token may be absent
        absent = load_state_dict_checked(self.vit, fit_pos_embed(sd, self.vit), allowed_missing=EVAL_ALLOWED_MISSING,
                                         what=f"ProteusViT({self.arch}) from {self.checkpoint} (the dense backbone "
                                              f"must match the checkpoint's size)")
        print_log(f"ProteusViT: loaded {self.checkpoint} into {self.arch}/{self.patch_size} at {self.img_size} px "
                  f"({len(sd)} tensors; left at init: {absent or 'none'})", logger="current")

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.vit.eval()  # probing: drop path and any dropout stay off
        return self

    def forward(self, x: torch.Tensor):
        """x: (B, 3, H, W), H and W multiples of the patch size. Returns a tuple, one entry per out index."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            outs = self.vit.get_intermediate_layers(x, n=self.out_indices, reshape=True,
                                                    return_class_token=True, norm=self.final_norm)
        if self.output_cls_token:
            return tuple([fmap, cls] for fmap, cls in outs)  # [(B, D, h, w), (B, D)] per level
        return tuple(fmap for fmap, _ in outs)
