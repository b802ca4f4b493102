"""Publisher file layouts -> timm state dicts, for the teacher families that run on timm's implementations.

Each function takes the flat state dict read from the publisher's file (by the safe readers in
`models.teachers`) and returns the keys of the timm model named in the family row. Layouts that timm's own
`checkpoint_filter_fn` already knows (Meta's DINOv3 `.pth`, Meta's PE `.pt`, open_clip, NVIDIA's RADIO
`model.safetensors`, timm's own files) go through it; the Hugging Face transformers layouts are mapped here
(C-RADIO's transformers layout onto NVIDIA's, so that one converter, timm's, reads both).
"""
import torch

from .errors import CheckpointError


def is_hf_dinov3(sd: dict) -> bool:
    return "embeddings.cls_token" in sd and any(k.startswith("model.layer.") or k.startswith("layer.") for k in sd)


class _FileKeys(dict):
    """A publisher file's state dict: a key it lacks is the file's fault (truncated, or another model's), so the
    lookup itself raises one CheckpointError naming the key and the layout expected."""

    def __init__(self, sd: dict, layout: str):
        super().__init__(sd)
        self.layout = layout

    def __missing__(self, key):
        raise CheckpointError(f"the teacher file has no `{key}`: not a complete {self.layout} model.safetensors "
                              f"(truncated, or another model's file)")


def _depth(sd: _FileKeys, prefix: str) -> int:
    """Number of blocks of a transformers state dict whose block keys start `<prefix><i>.`."""
    blocks = [int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)]
    if not blocks:
        sd[prefix + "0"]  # raises: the file has no blocks
    return 1 + max(blocks)


def _fused_qkv(sd: dict, a: str) -> torch.Tensor:
    """transformers' separate q/k/v projections as timm's one fused (3D, D) qkv weight."""
    return torch.cat([sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]])


def hf_dinov3_to_timm(sd: dict) -> dict:
    """transformers `DINOv3ViTModel` (facebook/dinov3-*-pretrain-lvd1689m model.safetensors) -> timm Eva."""
    sd = _FileKeys({k[len("model."):] if k.startswith("model.layer.") else k: v for k, v in sd.items()},
                   "transformers DINOv3ViTModel")
    out = {"cls_token": sd["embeddings.cls_token"], "reg_token": sd["embeddings.register_tokens"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
           "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
    for i in range(_depth(sd, "layer.")):
        p, q = f"layer.{i}.", f"blocks.{i}."
        a = p + "attention."
        out[q + "attn.qkv.weight"] = _fused_qkv(sd, a)
        if a + "q_proj.bias" in sd:
            out[q + "attn.q_bias"], out[q + "attn.v_bias"] = sd[a + "q_proj.bias"], sd[a + "v_proj.bias"]
        out[q + "attn.proj.weight"], out[q + "attn.proj.bias"] = sd[a + "o_proj.weight"], sd[a + "o_proj.bias"]
        out[q + "gamma_1"], out[q + "gamma_2"] = sd[p + "layer_scale1.lambda1"], sd[p + "layer_scale2.lambda1"]
        for n in ("norm1", "norm2"):
            out[f"{q}{n}.weight"], out[f"{q}{n}.bias"] = sd[f"{p}{n}.weight"], sd[f"{p}{n}.bias"]
        names = ({"gate_proj": "fc1_g", "up_proj": "fc1_x", "down_proj": "fc2"} if p + "mlp.gate_proj.weight" in sd
                 else {"up_proj": "fc1", "down_proj": "fc2"})
        for src, dst in names.items():
            for t in ("weight", "bias"):
                if f"{p}mlp.{src}.{t}" in sd:
                    out[f"{q}mlp.{dst}.{t}"] = sd[f"{p}mlp.{src}.{t}"]
    return out


def is_hf_siglip(sd: dict) -> bool:
    return any(k.startswith("vision_model.embeddings.") for k in sd) or "embeddings.position_embedding.weight" in sd \
        and "head.probe" in sd


def hf_siglip_to_timm(sd: dict) -> dict:
    """transformers `SiglipModel` / `SiglipVisionModel` (google/siglip2-*-patch16-224 model.safetensors) -> timm ViT.

    Only the vision tower is kept (a full SiglipModel file also holds the text tower)."""
    if any(k.startswith("vision_model.") for k in sd):
        sd = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
    sd = _FileKeys(sd, "transformers SigLIP")
    out = {"patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embedding.bias"],
           "pos_embed": sd["embeddings.position_embedding.weight"][None],
           "norm.weight": sd["post_layernorm.weight"], "norm.bias": sd["post_layernorm.bias"]}
    for i in range(_depth(sd, "encoder.layers.")):
        p, q = f"encoder.layers.{i}.", f"blocks.{i}."
        a = p + "self_attn."
        for t in ("weight", "bias"):
            out[f"{q}attn.qkv.{t}"] = torch.cat([sd[f"{a}q_proj.{t}"], sd[f"{a}k_proj.{t}"], sd[f"{a}v_proj.{t}"]])
            out[f"{q}attn.proj.{t}"] = sd[f"{a}out_proj.{t}"]
            out[f"{q}norm1.{t}"], out[f"{q}norm2.{t}"] = sd[f"{p}layer_norm1.{t}"], sd[f"{p}layer_norm2.{t}"]
            out[f"{q}mlp.fc1.{t}"], out[f"{q}mlp.fc2.{t}"] = sd[f"{p}mlp.fc1.{t}"], sd[f"{p}mlp.fc2.{t}"]
    if "head.probe" in sd:  # the attention-pooling (MAP) head: the image embedding
        d = sd["head.probe"].shape[-1]
        w, b = sd["head.attention.in_proj_weight"], sd["head.attention.in_proj_bias"]
        out.update({"attn_pool.latent": sd["head.probe"], "attn_pool.q.weight": w[:d], "attn_pool.q.bias": b[:d],
                    "attn_pool.kv.weight": w[d:], "attn_pool.kv.bias": b[d:]})
        for t in ("weight", "bias"):
            out[f"attn_pool.proj.{t}"] = sd[f"head.attention.out_proj.{t}"]
            out[f"attn_pool.norm.{t}"] = sd[f"head.layernorm.{t}"]
            out[f"attn_pool.mlp.fc1.{t}"], out[f"attn_pool.mlp.fc2.{t}"] = sd[f"head.mlp.fc1.{t}"], sd[f"head.mlp.fc2.{t}"]
    return out


def is_hf_aimv2(sd: dict) -> bool:
    return "embeddings.patch_embed.weight" in sd and "embeddings.rms_norm.weight" in sd \
        or "vision_model.embeddings.rms_norm.weight" in sd


def hf_aimv2_to_timm(sd: dict) -> dict:
    """transformers `Aimv2VisionModel` (apple/aimv2-*-patch14-* model.safetensors) -> timm ViT (aimv2_*)."""
    if any(k.startswith("vision_model.") for k in sd):
        sd = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
    sd = _FileKeys(sd, "transformers Aimv2VisionModel")
    if "embeddings.position_embedding.weight" not in sd:
        raise CheckpointError("a native-resolution AIMv2 file (apple/aimv2-*-native: 2-D sin-cos positions, no "
                              "stored position table) has no timm implementation to run it on; use a "
                              "fixed-resolution apple/aimv2-*-patch14-{224,336,448} file")
    out = {"patch_embed.proj.weight": sd["embeddings.patch_embed.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embed.bias"],
           "patch_embed.norm.weight": sd["embeddings.rms_norm.weight"],
           "pos_embed": sd["embeddings.position_embedding.weight"][None], "norm.weight": sd["rms_norm.weight"]}
    for i in range(_depth(sd, "encoder.layers.")):
        p, q = f"encoder.layers.{i}.", f"blocks.{i}."
        a = p + "attention."
        out[q + "attn.qkv.weight"] = _fused_qkv(sd, a)
        out[q + "attn.proj.weight"] = sd[a + "out_proj.weight"]
        out[q + "norm1.weight"], out[q + "norm2.weight"] = sd[p + "rms_norm1.weight"], sd[p + "rms_norm2.weight"]
        out[q + "mlp.fc1_g.weight"], out[q + "mlp.fc1_x.weight"] = sd[p + "ffn.gate_proj.weight"], sd[p + "ffn.up_proj.weight"]
        out[q + "mlp.fc2.weight"] = sd[p + "ffn.down_proj.weight"]
    return out  # an attention-pooling `head.*` (classification probes) is not part of the teacher


def is_hf_radio(sd: dict) -> bool:
    return "embeddings.cls_register_token" in sd and "embeddings.patch_projection.weight" in sd


def hf_radio_to_nvidia(sd: dict, layer_scale: bool) -> dict:
    """transformers `RadioModel` (model.safetensors) -> NVIDIA's trust_remote_code layout (`radio_model.*`).

    `layer_scale`: whether the timm model holds LayerScale (C-RADIOv3-B/L: NVIDIA's `ls1/ls2.grandma`, sic). The
    others have none, so their `lambda1` must be ones (transformers' identity default; files may omit the keys).
    The video patch projection (Nemotron's packed frames) is not part of an image teacher and is dropped.
    """
    sd = _FileKeys(sd, "transformers RadioModel")
    m = "radio_model.model."
    out = {m + "patch_generator.embedder.weight": sd["embeddings.patch_projection.weight"],  # (D, 3 p p)
           m + "patch_generator.pos_embed": sd["embeddings.position_embedding"],  # (1, G*G, D): the stored grid
           m + "patch_generator.cls_token.token": sd["embeddings.cls_register_token"]}  # (cls + registers, D)
    for k in ("summary_idxs", "input_conditioner.norm_mean", "input_conditioner.norm_std"):
        if k in sd:
            out["radio_model." + k] = sd[k]
    for i in range(_depth(sd, "encoder.layer.")):
        p, q = f"encoder.layer.{i}.", f"{m}blocks.{i}."
        a = p + "attention."
        for t in ("weight", "bias"):
            out[f"{q}attn.qkv.{t}"] = torch.cat([sd[f"{a}{n}_proj.{t}"] for n in "qkv"])
            out[f"{q}attn.proj.{t}"] = sd[f"{a}o_proj.{t}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{q}{n}.{t}"] = sd[f"{p}{n}.{t}"]
        for j in (1, 2):
            lam = sd.get(f"{p}layer_scale{j}.lambda1")  # (D,)
            if layer_scale:
                out[f"{q}ls{j}.grandma"] = torch.ones_like(sd[f"{p}norm1.weight"]) if lam is None else lam
            elif lam is not None and not bool((lam == 1).all()):
                raise CheckpointError(f"{p}layer_scale{j}.lambda1 is not all ones, but this C-RADIO architecture "
                                      f"has no LayerScale (pick the row of the file's model)")
    return out
