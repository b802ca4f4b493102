"""A second, independent forward of Meta's Perception Encoder (PE-core) vision tower, for the teacher tests.

transformers and open_clip both run PE on timm, so nothing installable can check our timm-based teacher. This
module computes PE-core's outputs from a state dict in Meta's release layout (`visual.conv1.weight`,
`visual.transformer.resblocks.N.attn.in_proj_weight`, `visual.attn_pool.probe`, ... as in PE-Core-*.pt) with
plain torch ops. It was written from reading `core/vision_encoder/pe.py` and `rope.py` of
github.com/facebookresearch/perception_models (commit 3e352cc); each step names the behaviour it follows.
It is deliberately unoptimised and shares no code with timm or with models/.
"""
import math

import torch
import torch.nn.functional as F


def _ln(x, sd, name, eps):
    # Meta: norm_layer = nn.LayerNorm(eps=1e-5) everywhere (ln_pre, ln_1/ln_2, ln_post, attn_pool.layernorm)
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _mlp(x, sd, name):
    # Meta: nn.Sequential(c_fc, nn.GELU() (the exact erf GELU), c_proj)
    h = F.gelu(F.linear(x, sd[name + ".c_fc.weight"], sd[name + ".c_fc.bias"]))
    return F.linear(h, sd[name + ".c_proj.weight"], sd[name + ".c_proj.bias"])


def _attention(q, k, v, heads):
    """Softmax attention, (B, Sq, D) x (B, Sk, D) -> (B, Sq, D); q, k, v already projected (and rotated)."""
    b, sq, d = q.shape
    hd = d // heads
    q, k, v = (t.reshape(b, -1, heads, hd).transpose(1, 2) for t in (q, k, v))
    w = (q @ k.transpose(-1, -2)) * hd ** -0.5  # Meta: scale = head_dim ** -0.5 (SelfAttention / nn.MHA)
    return (w.softmax(-1) @ v).transpose(1, 2).reshape(b, sq, d)


def rope_angles(grid_h, grid_w, head_dim, cls_token):
    """(S, head_dim) rotation angles per token, as Meta's Rope2D.update_grid builds them.

    Meta: RotaryEmbedding(dim=head_dim // 2) with the default "lang" frequencies 1 / 10000 ** (2i / (head_dim/2)),
    i < head_dim / 4; each angle (position * frequency) is repeated twice in a row (interleaved pairs). The
    positions are plain integer patch indices, on any grid (no rescaling to the pretraining grid), shifted by
    +1 when there is a class token; the class token gets angle 0 (no rotation). The first head_dim / 2
    channels take the x (column) angles, the second half the y (row) angles: cat([freqs_x, freqs_y]).
    """
    half = head_dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(0, half, 2, dtype=torch.float32) / half)  # (head_dim / 4,)
    off = 1 if cls_token else 0
    ys = torch.arange(grid_h, dtype=torch.float32) + off
    xs = torch.arange(grid_w, dtype=torch.float32) + off
    ang_y = (ys[:, None] * freqs).repeat_interleave(2, -1)[:, None, :].expand(grid_h, grid_w, half)
    ang_x = (xs[:, None] * freqs).repeat_interleave(2, -1)[None, :, :].expand(grid_h, grid_w, half)
    ang = torch.cat([ang_x, ang_y], -1).reshape(grid_h * grid_w, head_dim)
    if cls_token:
        ang = torch.cat([torch.zeros(1, head_dim), ang])
    return ang


def apply_rope(t, ang):
    """Meta's apply_rotary_emb with rotate_half on interleaved pairs: (t0, t1) -> (t0 c - t1 s, t1 c + t0 s).

    t: (B, heads, S, head_dim); ang: (S, head_dim). Every channel of the head is rotated (rot_dim = head_dim)."""
    t0, t1 = t[..., 0::2], t[..., 1::2]
    rotated = torch.stack([-t1, t0], -1).flatten(-2)
    return t * ang.cos() + rotated * ang.sin()


def pe_core_forward(sd: dict, x: torch.Tensor, num_heads: int, pool_heads: int = 8, eps: float = 1e-5):
    """(pooled, patch) of Meta's PE-core vision tower for the (already PE-normalised) batch x.

    pooled: the attention-pooling head's output, before `proj` (Meta's VisionTransformer.forward is
    proj(attn_pool(ln_post(tokens)))). patch: ln_post(tokens) without the class token (forward_features(norm=True,
    strip_cls_token=True)). `pool_heads`: Meta's PEConfig.attn_pooler_heads, 8 for every PE-core config.
    """
    sd = {k[len("visual."):]: v.float() for k, v in sd.items() if k.startswith("visual.")}
    x = x.float()
    conv = sd["conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    b, _, h, w = x.shape
    gh, gw = h // patch, w // patch
    # Meta: conv1 (bias=False), then permute(0, 2, 3, 1).reshape: tokens in row-major (y, x) order
    tok = F.conv2d(x, conv, stride=patch).permute(0, 2, 3, 1).reshape(b, gh * gw, width)
    cls = "class_embedding" in sd  # Meta: use_cls_token (False for G14: no class token, no pos row for it)
    if cls:
        tok = torch.cat([sd["class_embedding"].view(1, 1, width).expand(b, 1, width), tok], 1)
    # Meta's _sample_abs_posemb: the stored (square) grid as is at its own size, else bilinear
    # (align_corners=False, no antialias) to the new grid; the class token's row is never resampled
    pos = sd["positional_embedding"]
    pos_cls, pos_grid = (pos[:1], pos[1:]) if cls else (pos[:0], pos)
    g = math.isqrt(pos_grid.shape[0])
    if (gh, gw) != (g, g):
        pos_grid = F.interpolate(pos_grid.reshape(1, g, g, width).permute(0, 3, 1, 2), size=(gh, gw),
                                 mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(gh * gw, width)
    tok = tok + torch.cat([pos_cls, pos_grid])[None]
    tok = _ln(tok, sd, "ln_pre", eps)  # Meta: ln_pre after the position embedding
    ang = rope_angles(gh, gw, width // num_heads, cls)
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    for i in range(depth):
        p = f"transformer.resblocks.{i}."
        hdn = _ln(tok, sd, p + "ln_1", eps)
        # Meta's SelfAttention: one in_proj (3D, D) whose output splits as (3, D): q, k, v in that order;
        # RoPE on q and k per head, after the split into heads; then out_proj
        q, k, v = F.linear(hdn, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]).chunk(3, -1)
        hd = width // num_heads
        q, k = (apply_rope(t.reshape(b, -1, num_heads, hd).transpose(1, 2), ang).transpose(1, 2).reshape(b, -1, width)
                for t in (q, k))
        a = F.linear(_attention(q, k, v, num_heads), sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
        # Meta: x + ls_1(attn(ln_1(x))), x + ls_2(mlp(ln_2(x))); LayerScale only when ls_init_value is set
        tok = tok + a * sd.get(p + "ls_1.gamma", 1.0)
        tok = tok + _mlp(_ln(tok, sd, p + "ln_2", eps), sd, p + "mlp") * sd.get(p + "ls_2.gamma", 1.0)
    tok = _ln(tok, sd, "ln_post", eps)  # Meta: forward_features(norm=True) normalises every token
    patch_tokens = tok[:, 1:] if cls else tok
    # Meta's AttentionPooling over all tokens (class token included): the probe queries through
    # nn.MultiheadAttention (packed in_proj, pool_heads heads, out_proj); no residual around the attention;
    # then y + mlp(layernorm(y)); squeeze(1). `visual.proj` (into the text space) is not applied.
    ap = "attn_pool."
    wq, wk, wv = sd[ap + "attn.in_proj_weight"].chunk(3)
    bq, bk, bv = sd[ap + "attn.in_proj_bias"].chunk(3)
    probe = sd[ap + "probe"].expand(b, -1, -1)
    y = _attention(F.linear(probe, wq, bq), F.linear(tok, wk, bk), F.linear(tok, wv, bv), pool_heads)
    y = F.linear(y, sd[ap + "attn.out_proj.weight"], sd[ap + "attn.out_proj.bias"])
    y = y + _mlp(_ln(y, sd, ap + "layernorm", eps), sd, ap + "mlp")
    return y.squeeze(1), patch_tokens
