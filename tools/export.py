"""Export a distilled student for use elsewhere: a timm / Hugging Face folder, an ONNX graph, a DINOv2 .pth.

    python -m tools.export RUN --to {timm,onnx,dinov2} --output PATH [--ema] [--student KEY]

RUN is a `pretrain.main` run dir (its finished export, else its checkpoint.pth), any `checkpoint.pth` of
one (any step) or a flat `student_backbone[_ema].pth` (models.run.resolve_run). The architecture is read
from the run's config.json (else the checkpoint's own config); --arch, --patch-size and --model-kwargs
give it for a file with neither and must agree with the run otherwise (a contradiction is an error naming
both); --img-size sets the export's input size. With several students, --student KEY picks one, from the
finished run or a mid-run checkpoint.pth. The model card lists the run's evaluation results (RUN/eval/).

- timm:   PATH/config.json + model.safetensors + README.md (a model card): the layout of a Hugging Face
          Hub repo, loaded by `timm.create_model("local-dir:PATH", pretrained=True)`. A ViT student becomes
          timm's DINOv2 ViT (`vit_<size>_patch14[_reg4]_dinov2`, the exact sizes in `model_args`; ViT-Ti
          has no timm DINOv2 name and uses ViT-S's with its own sizes); a timm student keeps its name.
- onnx:   one graph: input `images` (batch, 3, S, S), ImageNet-normalised; outputs `cls` (batch, D) and
          `patch` (batch, N, D), the features `forward_features` gives. The batch is dynamic, S is fixed.
- dinov2: the flat DINOv2-keyed state dict that student_backbone.pth holds, which DINOv2's own
          `vit_small(...)`, `models.load_backbone` and every evaluation here read. ViT students only.

Every export checks itself before anything appears at PATH. The timm folder and the DINOv2 file are
reloaded (timm's `local-dir:`, `models.load_backbone`) and must give bit-identical features. The ONNX
graph is run by onnxruntime on random inputs at two batch sizes and on the images of --check-images; for
each output, max |onnx - torch| / max |torch| must stay within --tolerance (default 1e-4). Float32
kernels that sum in another order differ by about 1e-6 of the feature scale; a changed weight or a
mistranslated op shows up far above 1e-4.
--overwrite replaces a file, or a folder an earlier `--to timm` wrote (its config.json says
`"tool": "tools.export"` and it holds only the three files); any other folder is refused.
Exit codes: 0 done; 2 a user error (one message, no traceback); 3 a failed self-check (PATH not written).
"""
import argparse
import contextlib
import functools
import glob
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from common.backbone_flags import check_against_run
from common.checkpoint import file_fingerprint
from common.config import CheckedArgumentParser
from common.errors import CheckpointError, ConfigError, DataError, MissingFileError, cli
from common import rundir
from common.log import read_json
from common.probe import is_random_init
from common.rundir import TOOL_KEY, run_dir_owner
from models.teachers import IMAGENET_MEAN, IMAGENET_STD
from models.timm_student import is_timm_name, timm_model_keys
from models.vit import STUDENTS, DinoVisionTransformer, build_student, parse_size_kwargs
from models.run import RunBackbone, pick_student, resolve_run, run_students
from models.weights import (EVAL_ALLOWED_MISSING, PROTEUS_TRAINING_GLOBALS, backbone_state_dict, fit_pos_embed,
                            load_backbone, load_state_dict_checked, read_checkpoint)
from pretrain.losses import OBJECTIVES

PROG = "tools.export"
FORMATS = ("timm", "onnx", "dinov2")
EXIT_CHECK_FAILED = 3  # a user error exits 2 (common.errors.cli)
TOLERANCE = 1e-4  # ONNX: max |onnx - torch| over max |torch|, per output
OPSET = 17
# The evaluation view (common.data.build_eval_transform): bicubic resize to S * 256/224, centre crop S.
EVAL_VIEW = dict(interpolation="bicubic", crop_pct=224 / 256, crop_mode="center")
# timm's DINOv2 ViT names per student size (ViT-Ti has none: it reuses ViT-S's with its own sizes).
TIMM_VIT = {"vit_tiny": "vit_small", "vit_small": "vit_small", "vit_base": "vit_base", "vit_large": "vit_large"}
# pretrained_cfg fields that describe timm's own release of an architecture, not these weights.
TIMM_SOURCE_FIELDS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes", "description")
# The recipe a model card lists, when the run's configuration has it.
# (the objectives' --lambda-<name> weights come between the two parts, in the registry's order)
CARD_RECIPE = (("teacher", "teacher_weight", "objectives"),
               ("mask_probability", "mask_ratio", "epochs", "global_batch", "lr", "lr_scaled", "weight_decay",
                "precision", "data_path", "single_image", "git_sha"))
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_CHECK_IMAGES = 16
# What `--to timm` writes; its config.json carries the run-dir marker ("tool": PROG) so that --overwrite
# knows the folder is ours.
TIMM_FILES = ("config.json", "model.safetensors", "README.md")


class CheckFailed(RuntimeError):
    """An export gives other features than the PyTorch model it came from (not the user's mistake)."""


# ----------------------------------------------------------------------------------------------------------
# The source: weights and architecture of one checkpoint
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Source:
    path: str
    arch: str  # "vit_small", or "timm:convnext_atto"
    patch_size: int
    img_size: int
    kwargs: dict  # size overrides (the run's --student-kwargs), or a timm student's own arguments
    state_dict: dict  # DINOv2 keys (ViT students) or the timm model's own keys (timm students)
    ema: bool
    config: dict = field(default_factory=dict)  # the run's configuration; {} when none was found
    global_step: int | None = None  # None for the flat backbone files, written when the run finished
    run_dir: str | None = None  # the pretraining run the weights belong to (its eval/ results go on the card)
    key: str | None = None  # the student's key in a several-student run
    student: str | None = None  # the student selected inside a several-student checkpoint.pth
    holds_students: bool = False  # a checkpoint.pth (student / student_ema): --ema and the student select in it

    @property
    def is_timm(self) -> bool:
        return is_timm_name(self.arch)


def read_source(path: str, ema: bool = False, arch: str | None = None, patch_size: int | None = None,
                img_size: int | None = None, model_kwargs: str | None = None, student: str | None = None) -> Source:
    """The weights of `path` (a run dir, its checkpoint.pth, an export) and the architecture they belong to.

    The run's values (models.run.resolve_run) fill what the flags leave out; a flag that contradicts the run
    (another arch, patch size or size override) is a ConfigError naming both. --img-size may differ (the
    export's input size). `student` picks one student of a several-student run or checkpoint.
    """
    run = resolve_run(path, student=student, ema=ema)
    ckpt = read_checkpoint(run.weights, allowed_globals=PROTEUS_TRAINING_GLOBALS)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{run.weights} holds a {type(ckpt).__name__}, not a checkpoint or state dict")
    own = ckpt.get("config") if isinstance(ckpt.get("config"), dict) and ckpt["config"].get("student") else None
    if run.arch is None and own is not None:  # a checkpoint.pth moved away from its run: its own configuration
        spec = pick_student(run_students(own), student, f"checkpoint {run.weights}")
        run = RunBackbone(weights=run.weights, arch=spec["arch"], kwargs=parse_kwargs(spec["kwargs"]),
                          patch_size=int(own.get("patch_size") or 14), img_size=int(own.get("input_size") or 224),
                          student=spec["key"] if len(run_students(own)) > 1 else None, config=own)
    elif run.arch is None and student and arch is None:  # no run: --student is the architecture (old alias)
        arch, run.student = student, None
    config = run.config if run.arch is not None else {}
    if run.arch is not None:
        check_against_run(run, arch, patch_size, parse_kwargs(model_kwargs) if model_kwargs is not None else None)
    arch = arch or run.arch
    if not arch:
        raise ConfigError(f"cannot tell the architecture of {run.weights}: it holds no run configuration and there "
                          f"is no pretrain config.json beside it; pass --arch (vit_tiny/small/base/large or "
                          f"timm:<name>) and, if the run changed them, --patch-size, --img-size, --model-kwargs")
    try:
        sd = backbone_state_dict(ckpt, ema=ema, student=run.student)
    except CheckpointError as err:
        raise CheckpointError(f"{run.weights}: {err}") from None
    if is_timm_name(arch):  # checkpoint.pth holds TimmStudent keys
        sd = timm_model_keys(sd)
    kwargs = parse_kwargs(model_kwargs) if model_kwargs is not None else dict(run.kwargs)
    holds_students = isinstance(ckpt.get("student"), dict) or isinstance(ckpt.get("students"), dict)
    step = ckpt.get("global_step") if holds_students else None
    return Source(run.weights, arch, int(patch_size or run.patch_size or 14), int(img_size or run.img_size or 224),
                  kwargs, sd, ema, config, step, run_dir=run.run_dir, key=run.key, student=run.student,
                  holds_students=holds_students)


def parse_kwargs(text) -> dict:
    """'depth=2,embed_dim=64' or JSON ('{"depth": 2}'), as pretraining's --student-kwargs takes them."""
    return parse_size_kwargs(text, "--model-kwargs", ints_only=False)


def build_backbone(src: Source) -> nn.Module:
    """The student of `src` with its weights loaded strictly, in eval mode on the CPU."""
    what = f"{src.arch} (patch {src.patch_size}, {src.img_size} px, {src.kwargs or 'no size overrides'}) from " \
           f"{src.path}"
    if src.is_timm:
        model = _build(src.arch, img_size=src.img_size, **src.kwargs)
        load_state_dict_checked(model.model, src.state_dict, what=what)
        return model.eval()
    if src.arch not in STUDENTS:
        raise ConfigError(f"unknown architecture {src.arch!r}; expected one of {STUDENTS} or timm:<name>")
    kwargs = dict(src.kwargs)
    if "register_tokens" in src.state_dict:  # registers are taken from the weights, as load_backbone does
        kwargs.setdefault("num_register_tokens", src.state_dict["register_tokens"].shape[1])
    model = _build(src.arch, patch_size=src.patch_size, img_size=src.img_size, **kwargs)
    load_state_dict_checked(model, fit_pos_embed(src.state_dict, model), allowed_missing=EVAL_ALLOWED_MISSING,
                            what=what)
    return model.eval()


def _build(arch: str, **kwargs) -> nn.Module:
    try:
        return build_student(arch, **kwargs)
    except (TypeError, ValueError) as err:  # unknown timm name or keyword, sizes that do not fit
        raise ConfigError(f"cannot build {arch} with {kwargs}: {err}") from err


def features(model: nn.Module, x: torch.Tensor) -> dict:
    """dict(cls=(B, D), patch=(B, N, D)) of a DinoVisionTransformer or TimmStudent."""
    with torch.no_grad():
        out = model.eval().forward_features(x)
    return {"cls": out["cls"], "patch": out["patch"]}


def timm_features(model: nn.Module, x: torch.Tensor) -> dict:
    """The same two features from a plain timm model: pre-logits, and the final tokens or feature map."""
    with torch.no_grad():
        feats = model.eval().forward_features(x)
        cls = model.forward_head(feats, pre_logits=True)
    patch = feats.flatten(2).transpose(1, 2) if feats.ndim == 4 else feats[:, model.num_prefix_tokens:]
    return {"cls": cls, "patch": patch}


def require_identical(ours: dict, theirs: dict, what: str) -> None:
    for name, ref in ours.items():
        got = theirs[name]
        if got.shape != ref.shape or not torch.equal(got, ref):
            diff = (got - ref).abs().max().item() if got.shape == ref.shape else f"shape {tuple(got.shape)}"
            raise CheckFailed(f"{what}: `{name}` differs from the PyTorch model (max |diff| {diff}, expected 0)")


def random_images(img_size: int, batch: int, seed: int = 0) -> torch.Tensor:
    """Normalised-image-like inputs: standard normal, seeded so every check sees the same ones."""
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# Writing: nothing appears at PATH until its self-check passed
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def staged(output: str, overwrite: bool):
    """Yield a temporary sibling of `output`; it replaces `output` only if the block finishes."""
    output = os.path.abspath(output)
    check_replaceable(output, overwrite)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    tmp = f"{output}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
        _remove(output)
        os.replace(tmp, output)
    finally:
        _remove(tmp)


def check_replaceable(output: str, overwrite: bool) -> None:
    """--overwrite replaces a file or a timm folder this tool wrote, never any other folder (rmtree)."""
    if not os.path.lexists(output):
        return
    if not overwrite:
        raise ConfigError(f"--output {output} exists; pass --overwrite to replace it, or choose another path")
    if not os.path.isdir(output) or os.path.islink(output):
        return  # a file or a link: replacing it removes only that entry
    foreign = sorted(set(os.listdir(output)) - set(TIMM_FILES))
    if run_dir_owner(output) != PROG or foreign:
        why = f"it holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which tools.export " \
              f"does not write" if foreign else f"it has no {TOOL_KEY!r} in config.json"
        raise ConfigError(f"--output {output} is a folder that tools.export did not write ({why}); --overwrite "
                          f"only replaces a file or an earlier timm export. Choose another path, or remove the "
                          f"folder yourself if it is yours to delete")


def check_writable(output: str) -> None:
    """Refuse an --output whose folder cannot be created or written, before the model is built."""
    folder = os.path.dirname(os.path.abspath(output))
    rundir.check_writable(folder, f"cannot write --output {output}: its folder {folder} cannot be created or "
                          f"written", "choose a path in a folder you can write", keep=False)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


# ----------------------------------------------------------------------------------------------------------
# --to timm
# ----------------------------------------------------------------------------------------------------------
def data_config(img_size: int) -> dict:
    """The preprocessing the student was trained and evaluated with (ImageNet statistics)."""
    return dict(input_size=(3, img_size, img_size), mean=IMAGENET_MEAN, std=IMAGENET_STD, **EVAL_VIEW)


def to_timm(model: nn.Module, src: Source) -> nn.Module:
    """A timm model holding the student's weights: the TimmStudent's own, or timm's DINOv2 ViT."""
    if src.is_timm:
        return model.model
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    name = f"{TIMM_VIT[src.arch]}_patch14{'_reg4' if model.num_register_tokens else ''}_dinov2"
    vit = timm.create_model(name, pretrained=False, num_classes=0, **timm_vit_args(model))
    # DINOv2 keys -> timm's (registers: CLS absorbs its position, the position table loses its CLS row)
    load_state_dict_checked(vit, checkpoint_filter_fn(dict(model.state_dict()), vit), what=f"timm {name}")
    return vit.eval()


def timm_vit_args(model: DinoVisionTransformer) -> dict:
    """The arguments that rebuild `model` as a timm VisionTransformer with the same computation."""
    block = model.blocks[0]
    if not hasattr(block.mlp, "fc1"):
        raise ConfigError("a SwiGLU ViT has no timm DINOv2 equivalent here; export it --to dinov2 or --to onnx")
    return dict(img_size=model.patch_embed.img_size[0], patch_size=model.patch_size, embed_dim=model.embed_dim,
                depth=len(model.blocks), num_heads=model.num_heads,
                mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
                init_values=1.0 if hasattr(block.ls1, "gamma") else None,  # LayerScale or not; values are loaded
                reg_tokens=model.num_register_tokens, no_embed_class=bool(model.num_register_tokens))


def export_timm(model: nn.Module, src: Source, output: str, overwrite: bool) -> str:
    from timm.models import save_for_hf

    timm_model = to_timm(model, src)
    with staged(output, overwrite) as tmp:
        save_for_hf(timm_model, tmp, safe_serialization=True, data_config=data_config(src.img_size))
        architecture = forget_timm_release(os.path.join(tmp, "config.json"))
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(src, architecture, os.path.basename(os.path.abspath(output))))
        check_timm_folder(tmp, model, src.img_size)
    return (f"timm folder {output} ({architecture}): `timm.create_model(\"local-dir:{output}\", pretrained=True)` "
            f"gives the same features bit for bit")


def forget_timm_release(config_path: str) -> str:
    """Drop what config.json inherited from timm's own release of the architecture (its tag, licence,
    paper): these weights are not that release. Returns the architecture name."""
    with open(config_path) as f:
        cfg = json.load(f)
    for key in TIMM_SOURCE_FIELDS:
        cfg["pretrained_cfg"].pop(key, None)
    cfg[TOOL_KEY] = PROG  # timm ignores unknown top-level keys
    with open(config_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return cfg["architecture"]


def check_timm_folder(folder: str, model: nn.Module, img_size: int) -> None:
    import timm

    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    x = random_images(img_size, 2)
    require_identical(features(model, x), timm_features(reloaded, x), "timm local-dir reload")


def model_card(src: Source, architecture: str, title: str) -> str:
    """README.md of the timm folder: what was distilled from what, how, for how long, and how it scored.

    Paths are shown by their last component: the card is meant to be published with the weights."""
    cfg = src.config
    sizes = ", ".join(f"{k}={v}" for k, v in src.kwargs.items())
    rows = [("student", f"{src.arch} (patch {src.patch_size}, {src.img_size} px{', ' + sizes if sizes else ''})"),
            ("timm architecture", f"`{architecture}`"),
            ("weights", f"EMA of the student (decay {cfg.get('ema_decay', '?')})" if src.ema else "the student"),
            ("source", f"`{os.path.basename(src.path)}` of run `{os.path.basename(os.path.dirname(src.path))}`")]
    keys = (*CARD_RECIPE[0], *(f"lambda_{name}" for name in OBJECTIVES), *CARD_RECIPE[1])
    rows += [(key, f"`{_card_value(cfg[key])}`") for key in keys if cfg.get(key) not in (None, "", [], {})]
    rows.append(("steps", steps_line(src)))
    teacher = f" from `{cfg['teacher']}`" if cfg.get("teacher") else ""
    lines = ["---", "library_name: timm", "tags: [image-feature-extraction, timm, proteus, distillation]", "---",
             f"# {title}", "", f"A {src.arch} distilled{teacher} with Proteus (ICLR 2025), exported by "
             f"`python -m tools.export`.", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
             "## Use", "", "```python", "import timm", "from PIL import Image", "",
             f'model = timm.create_model("local-dir:{title}", pretrained=True).eval()',
             "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
             'features = model(transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0))  # pre-logits',
             "```", ""]
    return "\n".join(lines + results_section(src))


def _card_value(value) -> str:
    """A configuration value as card text; paths lose their local part."""
    if isinstance(value, (list, tuple)):
        return ", ".join(_card_value(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return os.path.basename(value.rstrip(os.sep)) if isinstance(value, str) and os.sep in value else str(value)


def steps_line(src: Source) -> str:
    total = src.config.get("total_steps")
    if src.global_step is not None:
        return f"{src.global_step}" + (f" of {total}" if total else "") + " optimizer steps"
    return (f"the run's final weights ({total} optimizer steps planned)" if total
            else "unknown (a backbone file without its run's config.json)")


def results_section(src: Source) -> list[str]:
    """The results.json / test_metrics.json in the run dir (else the weights' folder) or below (the evaluations
    write into RUN/eval/) that were computed from these weights (`credits`), as a table."""
    root = src.run_dir or os.path.dirname(src.path)
    patterns = [os.path.join(root, *["*"] * depth, name) for depth in range(7)
                for name in ("results.json", "test_metrics.json")]
    found = sorted(path for pattern in patterns for path in glob.glob(pattern))
    fingerprint = functools.cache(lambda: file_fingerprint(src.path))  # hashed once, and only when needed
    rows = [row for path in found for row in result_rows(path, root, src, fingerprint)]
    if not rows:
        return ["## Evaluation", "", "No evaluation results of these weights were found beside them.", ""]
    return ["## Evaluation", "", "| results | metric | value |", "|---|---|---|", *rows, ""]


def credits(results: dict, path: str, src: Source, fingerprint) -> bool:
    """Whether the results at `path` were computed from the exported weights. The evaluations record their
    backbone: its weights' content hash ("backbone": linear_eval, fine_grained, a dense test_metrics.json),
    else (older results) the weights file, which must be unchanged since; in a checkpoint.pth also the student
    and the EMA choice. Results that record no backbone, or another one, belong to other weights."""
    backbone = results.get("backbone") if isinstance(results.get("backbone"), dict) else {}
    if src.holds_students and bool(backbone.get("ema", results.get("ema"))) != src.ema:
        return False
    if isinstance(backbone.get("weights"), str):
        if src.holds_students and (backbone.get("student") or None) != (src.student or None):
            return False
        return backbone["weights"] == fingerprint()
    weights = results.get("pretrained")
    if not isinstance(weights, str) or is_random_init(weights):
        return False
    return (os.path.realpath(weights) == os.path.realpath(src.path) and (results.get("student") or None) == src.key
            and os.path.getmtime(path) >= os.path.getmtime(src.path))


def result_rows(path: str, root: str, src: Source, fingerprint) -> list[str]:
    results = read_json(path)
    if not isinstance(results, dict) or not credits(results, path, src, fingerprint):
        return []  # another model's results, or a half-written or foreign file: not on this card
    if isinstance(results.get("metrics"), dict):  # a dense test_metrics.json
        results = results["metrics"]
    where = os.path.relpath(os.path.dirname(path), root)
    where += f" ({results['dataset']})" if "dataset" in results else ""
    return [f"| {where} | {key} | {value:.4g} |" for key, value in results.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.endswith("_seconds")]


# ----------------------------------------------------------------------------------------------------------
# --to onnx
# ----------------------------------------------------------------------------------------------------------
class FeatureGraph(nn.Module):
    """What the ONNX graph computes: images -> (cls, patch)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor):
        out = self.backbone.forward_features(images)
        return out["cls"], out["patch"]


def export_onnx(model: nn.Module, src: Source, output: str, overwrite: bool, tolerance: float = TOLERANCE,
                check_images: str | None = None, opset: int = OPSET) -> str:
    inputs = check_inputs(src.img_size, check_images)  # before the export: a bad folder fails fast
    with staged(output, overwrite) as tmp:
        write_onnx(model, src, tmp, opset)
        report = check_onnx(tmp, model, inputs, tolerance)
    return f"ONNX graph {output} (opset {opset}, dynamic batch); parity with PyTorch:\n" + "\n".join(report)


def write_onnx(model: nn.Module, src: Source, path: str, opset: int) -> None:
    onnx, _ = _onnx_packages()
    graph = FeatureGraph(model).eval()  # eval: the exporter puts the module back in the mode it found
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice and tracer warnings
        warnings.simplefilter("ignore")
        # dynamo=False: the TorchScript exporter needs no onnxscript; the spatial size is fixed, so the
        # position embedding is folded into a constant and only the batch is dynamic
        torch.onnx.export(graph, (random_images(src.img_size, 2),), path, dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["cls", "patch"],
                          dynamic_axes={"images": {0: "batch"}, "cls": {0: "batch"}, "patch": {0: "batch"}})
    proto = onnx.load(path)
    meta = {"proteus.arch": src.arch, "proteus.patch_size": src.patch_size, "proteus.kwargs": json.dumps(src.kwargs),
            "proteus.input_size": f"3x{src.img_size}x{src.img_size}", "proteus.mean": list(IMAGENET_MEAN),
            "proteus.std": list(IMAGENET_STD), "proteus.ema": src.ema,
            "proteus.source": os.path.basename(src.path)}  # no local path: the graph is meant to be shared
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=str(value))
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def check_inputs(img_size: int, image_dir: str | None) -> dict:
    """{name: input batch}: random at two batch sizes (the batch is dynamic), and real images if given."""
    inputs = {"random, batch 2": random_images(img_size, 2, seed=1),
              "random, batch 3": random_images(img_size, 3, seed=2)}
    if image_dir:
        images = load_images(image_dir, img_size)
        inputs[f"{len(images)} images of {image_dir}"] = images
    return inputs


def load_images(image_dir: str, img_size: int) -> torch.Tensor:
    """Up to MAX_CHECK_IMAGES images under `image_dir`, in the evaluation view (unreadable ones skipped)."""
    import timm.data
    from PIL import Image

    if not os.path.isdir(image_dir):
        raise MissingFileError(f"--check-images {image_dir}: no such folder")
    paths = sorted(os.path.join(root, name) for root, _, files in os.walk(image_dir) for name in files
                   if name.lower().endswith(IMAGE_EXTENSIONS))
    transform = timm.data.create_transform(**data_config(img_size))
    batch = []
    for path in paths:
        try:
            with Image.open(path) as img:
                batch.append(transform(img.convert("RGB")))
        except (OSError, ValueError, SyntaxError):  # PIL's errors for truncated or non-image files
            continue
        if len(batch) == MAX_CHECK_IMAGES:
            break
    if not batch:
        raise DataError(f"--check-images {image_dir}: no readable image ({', '.join(IMAGE_EXTENSIONS)}) in it")
    return torch.stack(batch)


def check_onnx(path: str, model: nn.Module, inputs: dict, tolerance: float = TOLERANCE) -> list[str]:
    """Run the graph at `path` with onnxruntime and compare every output with the PyTorch model.

    Returns one line per input and output; raises CheckFailed when an output's max |onnx - torch| exceeds
    `tolerance` x max |torch| (or its shape differs).
    """
    _, ort = _onnx_packages()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    report, failures = [], []
    for name, x in inputs.items():
        ref = features(model, x)
        got = dict(zip(("cls", "patch"), session.run(["cls", "patch"], {"images": x.numpy()})))
        for key, value in ref.items():
            line, ok = compare(torch.from_numpy(got[key]), value, tolerance, f"{name}: {key}")
            report.append(line)
            if not ok:
                failures.append(line)
    if failures:
        raise CheckFailed(f"the ONNX graph {path} does not reproduce the PyTorch model within {tolerance:g} "
                          f"of the feature scale:\n  " + "\n  ".join(failures))
    return report


def compare(got: torch.Tensor, ref: torch.Tensor, tolerance: float, label: str) -> tuple[str, bool]:
    if got.shape != ref.shape:
        return f"  {label}: shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}", False
    diff = (got - ref).abs().max().item()
    scale = ref.abs().max().item() or 1.0
    line = f"  {label}: max |diff| {diff:.3g} = {diff / scale:.3g} of max |feature| {scale:.3g} (limit {tolerance:g})"
    return line, diff <= tolerance * scale


def _onnx_packages():
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ConfigError(f"--to onnx needs the onnx and onnxruntime packages ({err}); install them with "
                          f"`pip install -r requirements.txt`") from err
    return onnx, onnxruntime


# ----------------------------------------------------------------------------------------------------------
# --to dinov2
# ----------------------------------------------------------------------------------------------------------
def export_dinov2(model: nn.Module, src: Source, output: str, overwrite: bool) -> str:
    if src.is_timm:
        raise ConfigError(f"{src.arch} is a timm model: it has no DINOv2 layout. Use --to timm (or --to onnx)")
    sizes = {k: v for k, v in src.kwargs.items() if k != "num_register_tokens"}  # registers: read from the file
    with staged(output, overwrite) as tmp:
        torch.save(model.state_dict(), tmp)
        reloaded = load_backbone(tmp, src.arch, patch_size=src.patch_size, img_size=src.img_size, **sizes)
        x = random_images(src.img_size, 2)
        require_identical(features(model, x), features(reloaded, x), "DINOv2 .pth reload")
    flags = f"--arch {src.arch} --patch-size {src.patch_size}"
    flags += f" --model-kwargs '{json.dumps(sizes)}'" if sizes else ""
    return f"DINOv2 state dict {output}: models.load_backbone / the evaluations read it ({flags})"


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = CheckedArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a pretrain.main run dir, its checkpoint.pth (any step), or "
                                      "student_backbone[_ema].pth")
    p.add_argument("--to", required=True, choices=FORMATS, help="timm folder, ONNX graph or DINOv2 .pth")
    p.add_argument("--output", required=True, help="the folder (timm) or file (onnx, dinov2) to write")
    p.add_argument("--ema", action="store_true", help="export the student's EMA (checkpoint.pth: student_ema)")
    p.add_argument("--student", metavar="KEY", help="several-student run: the student to export (its folder name, "
                   "e.g. vit_tiny), from the finished run or a mid-run checkpoint.pth; a file of no run: the arch")
    p.add_argument("--arch", help="vit_tiny/small/base/large or timm:<name> (default: the run's --student)")
    p.add_argument("--patch-size", type=int, help="ViT patch size (default: the run's)")
    p.add_argument("--img-size", "--image-size", "--input-size", dest="img_size", type=int,
                   help="input size S of the export (default: the run's --input-size)")
    p.add_argument("--model-kwargs", "--student-kwargs", dest="model_kwargs",
                   help="size overrides, depth=2,embed_dim=64 or JSON (default: the run's --student-kwargs)")
    p.add_argument("--check-images", metavar="DIR", help="onnx: also check parity on (up to 16) images of DIR")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help="onnx: max |onnx - torch| allowed, as a share of max |torch| per output")
    p.add_argument("--opset", type=int, default=OPSET, help="onnx: opset version")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def check_args(args) -> None:
    """What can be refused before the checkpoint is read."""
    check_replaceable(os.path.abspath(args.output), args.overwrite)
    check_writable(args.output)
    if args.check_images and args.to != "onnx":
        raise ConfigError("--check-images is for --to onnx (the timm and DINOv2 exports are checked bit for bit)")
    if args.check_images and not os.path.isdir(args.check_images):
        raise MissingFileError(f"--check-images {args.check_images}: no such folder")
    if not args.tolerance >= 0:
        raise ConfigError(f"--tolerance must be >= 0, got {args.tolerance}")
    for flag in ("patch_size", "img_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")


def export(args) -> str:
    src = read_source(args.checkpoint, args.ema, args.arch, args.patch_size, args.img_size, args.model_kwargs,
                      student=args.student)
    model = build_backbone(src)
    if args.to == "timm":
        return export_timm(model, src, args.output, args.overwrite)
    if args.to == "onnx":
        return export_onnx(model, src, args.output, args.overwrite, args.tolerance, args.check_images, args.opset)
    return export_dinov2(model, src, args.output, args.overwrite)


@cli(PROG)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    try:
        print(export(args))
    except CheckFailed as err:
        print(f"{PROG}: self-check failed, nothing written at {args.output}: {err}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
