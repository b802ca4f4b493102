"""Reading checkpoints and loading state dicts with errors that say what is wrong.

Loading a file never runs code from it. Pickled checkpoints go through torch's safe loader
(`weights_only=True`); the few non-tensor types a known format needs are allow-listed for that one load
only. TorchScript archives (OpenAI's CLIP `.pt` files) are never given to `torch.jit.load`, which runs
the archive's code: their tensors are read from the archive's `data.pkl` by an unpickler that knows only
tensors and inert stand-ins for the archive's classes (`_read_torchscript`).

Every load in the project goes through `load_state_dict_checked`: strict, or with an explicit set of
keys that may be missing. Never a silent `strict=False`.
"""
import argparse
import collections
import logging
import os
import pickle
import re
import zipfile

import torch
import torch.nn as nn

from .errors import CheckpointError, MissingFileError
from .pos_embed import resample_pos_embed

# The original Proteus training checkpoint ({"model", "optimizer", "lr_scheduler", "epoch", "model_ema",
# "scaler", "args"}) pickles its command line as an argparse.Namespace; everything else in it is plain.
PROTEUS_TRAINING_GLOBALS = (argparse.Namespace,)


def read_checkpoint(path: str, hint: str = "", allowed_globals=()) -> dict:
    """Read a checkpoint without running code from it; `allowed_globals` are trusted for this load only.

    Missing file: MissingFileError. Unreadable, or needing a type the safe loader refuses: CheckpointError.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint file not found: {path}" + (f"\n{hint}" if hint else ""))
    names = _zip_names(path)
    if names is not None and _is_torchscript(names):  # before torch.load, which hands these to torch.jit.load
        return _read_torchscript(path)
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))  # torch names the type it refused
        if refused:
            raise CheckpointError(_refusal_message(path, refused)) from err
        raise _unreadable(path, err) from err
    except Exception as err:  # noqa: BLE001 - zip, EOF and storage errors all mean "not a readable file"
        raise _unreadable(path, err) from err


def _unreadable(path: str, err: Exception) -> CheckpointError:
    reason = re.sub(r"\x1b\[\d+m", "", str(err))  # torch's messages carry terminal bold codes
    return CheckpointError(f"could not read checkpoint {path} (truncated, corrupted or not a PyTorch file?): "
                           f"{type(err).__name__}: {reason}")


def _refusal_message(path: str, refused: list[str]) -> str:
    return (f"refused to load {path}: it holds {', '.join(refused)}, which the safe loader (weights_only) does "
            f"not accept because unpickling it could run code from the file. If you trust the file's source, "
            f"convert it once to a plain state dict and pass that instead, e.g. python -c \"import torch; "
            f"ckpt = torch.load('{path}', weights_only=False); torch.save(ckpt['model'], 'weights.pth')\" "
            f"(with the key that holds the weights)")


def _zip_names(path: str) -> list[str] | None:
    """The member names of a zip file, None for any other file.

    A file that starts like a zip but cannot be listed is an error here, so that torch's own (more
    lenient) zip reader never decides on its own whether it is TorchScript.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return None
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise _unreadable(path, err) from err


def _is_torchscript(names: list[str]) -> bool:
    """TorchScript archives hold a `constants.pkl` and a `code/` folder; torch.save never writes either."""
    return any(n.rsplit("/", 1)[-1] == "constants.pkl" or "/code/" in f"/{n}" for n in names)


# ----------------------------------------------------------------------------------------------------------
# TorchScript archives: their tensors, read without running their code
# ----------------------------------------------------------------------------------------------------------
# An archive's data.pkl pickles the module tree: each module is a `__torch__.*` class whose state is a dict
# of its attributes (parameters, buffers, submodules, flags); each tensor is `_rebuild_tensor_v2` over a
# storage named by a persistent id ("storage", <dtype>Storage, key, device, numel) and kept in data/<key>.
# The classes' code (and any __setstate__ they define) is TorchScript under code/, and it is never run.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


class _ScriptObject:
    """Stands in for one of the archive's classes: keeps what was pickled, has no behaviour of its own."""

    qualname = ""

    def __init__(self, *args):
        self.state = None

    def __setstate__(self, state):
        self.state = state  # a module's attribute dict, or whatever a custom __getstate__ returned


def _as_is(value, *_):
    """torch.jit._pickle's list builders and type tags return their first argument unchanged."""
    return value


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _TorchScriptUnpickler(pickle.Unpickler):
    """Resolves only the names a TorchScript data.pkl uses for tensors and modules; anything else is refused."""

    _ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                ("collections", "OrderedDict"): collections.OrderedDict,  # empty backward-hook dicts
                ("torch", "device"): torch.device,
                **{("torch.jit._pickle", f"build_{kind}list"): _as_is for kind in ("int", "double", "bool", "tensor")},
                ("torch.jit._pickle", "restore_type_tag"): _as_is}

    def __init__(self, file, read_storage, where: str):
        super().__init__(file)
        self.read_storage, self.where, self.classes = read_storage, where, {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise CheckpointError(f"refused to load TorchScript archive {self.where}: its data.pkl refers to "
                              f"{module}.{name}, which is not a tensor or module type (nothing was run)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str)):
            raise CheckpointError(f"TorchScript archive {self.where}: unexpected persistent id {pid!r}")
        return self.read_storage(pid[2], pid[1])


def _read_torchscript(path: str) -> dict:
    """The parameters and buffers of a TorchScript archive (what `torch.jit.load(path).state_dict()` gives)."""
    try:
        with zipfile.ZipFile(path) as zf:
            prefix = _archive_prefix(zf.namelist(), path)
            if f"{prefix}byteorder" in zf.namelist() and zf.read(f"{prefix}byteorder").strip() == b"big":
                raise CheckpointError(f"TorchScript archive {path} was written on a big-endian machine; "
                                      f"save its state dict there and pass that file")
            declared = _declared_tensors(zf, prefix)
            storages = {}

            def read_storage(key, dtype):
                if key not in storages:
                    raw = bytearray(zf.read(f"{prefix}data/{key}"))
                    storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
                return storages[key]

            with zf.open(f"{prefix}data.pkl") as f:
                root = _TorchScriptUnpickler(f, read_storage, path).load()
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged archive fails in many ways, all "unreadable"
        raise _unreadable(path, err) from err
    sd = _module_tensors(root, declared) if isinstance(root, _ScriptObject) else {}
    if not sd:
        raise CheckpointError(f"TorchScript archive {path} holds no module parameters that can be read without "
                              f"running its code (a custom __setstate__?); export a plain state dict instead")
    return sd


def _archive_prefix(names: list[str], path: str) -> str:
    """Archives hold one top-level folder (its name varies) with data.pkl inside."""
    tops = [n[: -len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(tops) != 1:
        raise CheckpointError(f"TorchScript archive {path} has no single <folder>/data.pkl; not a module archive")
    return tops[0]


def _declared_tensors(zf: zipfile.ZipFile, prefix: str) -> dict:
    """{qualified class name: its `__parameters__` + `__buffers__`}, read as text from code/ (never run).

    Other tensor attributes of a module (plain `self.x = tensor`) are not in its state dict. Archives
    from old torch versions list no `__buffers__`: their classes are left out, so all their tensors count.
    """
    declared = {}
    for name in zf.namelist():
        if not (name.startswith(f"{prefix}code/") and name.endswith(".py")):
            continue
        module = name[len(prefix) + len("code/"): -len(".py")].replace("/", ".")
        text = zf.read(name).decode("utf-8", "replace")
        for cls in re.finditer(r"^class (\w+)\(.*\n((?:  .*\n?)*)", text, re.M):
            lists = [re.search(rf"^  {field} = \[(.*)\]$", cls.group(2), re.M)
                     for field in ("__parameters__", "__buffers__")]
            if all(lists):
                declared[f"{module}.{cls.group(1)}"] = [n for m in lists for n in re.findall(r'"([^"]*)"', m.group(1))]
    return declared


def _module_tensors(obj: _ScriptObject, declared: dict, prefix: str = "", ancestors: frozenset = frozenset()) -> dict:
    """The state dict of one unpickled module tree: its own parameters and buffers, then its submodules'."""
    if id(obj) in ancestors or not isinstance(obj.state, dict):  # a cycle (crafted file) or custom state
        return {}
    attrs = obj.state
    names = declared.get(obj.qualname)
    if names is None:  # no declaration found: every tensor attribute
        names = [k for k, v in attrs.items() if isinstance(v, torch.Tensor)]
    out = {f"{prefix}{n}": attrs[n] for n in names if isinstance(attrs.get(n), torch.Tensor)}
    for key, value in attrs.items():
        if isinstance(value, _ScriptObject):
            out.update(_module_tensors(value, declared, f"{prefix}{key}.", ancestors | {id(obj)}))
    return out


# ----------------------------------------------------------------------------------------------------------
# State dicts: unwrapping, strict loading, the evaluation loader
# ----------------------------------------------------------------------------------------------------------
def unwrap_state_dict(ckpt: dict, prefix: str = "") -> dict:
    """Descend into `state_dict` / `model` wrappers, keep keys under `prefix` (stripped), drop `module.`."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"the checkpoint holds a {type(ckpt).__name__}, not a state dict (a dict of tensors)")
    sd = ckpt
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def load_state_dict_checked(module: nn.Module, state_dict: dict, allowed_missing=(), what: str = "model"):
    """Load strictly, except for the keys in `allowed_missing`; raise one CheckpointError listing every problem."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict) - set(allowed_missing))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [f"{k}: checkpoint {_shape(state_dict[k])} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state_dict)) if _shape(state_dict[k]) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint does not fit {what}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                lines.append(f"  {title}: {shown}")
        lines.append("  Check the architecture / patch size flags against the checkpoint.")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state_dict, strict=False)
    return sorted(set(own) - set(state_dict))  # the allowed keys that were actually missing


def _shape(value):
    return tuple(value.shape) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}, not a tensor"


def fit_pos_embed(state_dict: dict, model: nn.Module) -> dict:
    """Resample a checkpoint's `pos_embed` to the model's grid (e.g. official 518-px DINOv2 -> 224)."""
    pos = state_dict.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is None or target is None or pos.shape == target.shape:
        return state_dict
    grid = model.patch_embed.grid_size
    return {**state_dict, "pos_embed": resample_pos_embed(pos, tuple(grid), num_prefix_tokens=1)}


def backbone_state_dict(ckpt: dict, ema: bool = False, student: str | None = None) -> dict:
    """Extract a DINOv2-format backbone state dict from any checkpoint we accept.

    - our pretrain `checkpoint.pth`: keys `student` / `student_ema` (DINOv2 format already); with several
      students, `students` = {key: {student, student_ema, ...}}: `student` (its key) picks one;
    - our exports `student_backbone[_ema].pth` and official DINOv2 `dinov2_vit?14_pretrain.pth`: flat;
    - original Proteus release / training checkpoints: `model` dict with `student.backbone.*` keys (the
      training checkpoint's EMA, `model_ema`, is the backbone alone).
    """
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"the checkpoint holds a {type(ckpt).__name__}, not a state dict")
    if isinstance(ckpt.get("students"), dict):  # pretrain.main with several students
        keys = ", ".join(map(str, ckpt["students"]))
        if student is None:
            raise CheckpointError(f"the checkpoint holds {len(ckpt['students'])} students ({keys}); pick one with "
                                  f"--student KEY")
        if not isinstance(ckpt["students"].get(student), dict):
            raise CheckpointError(f"the checkpoint holds no student {student!r}; its students: {keys}")
        ckpt = ckpt["students"][student]
    if ema:
        for key in ("student_ema", "model_ema"):
            if isinstance(ckpt.get(key), dict):
                return unwrap_state_dict(ckpt[key])
        raise CheckpointError("ema=True but the checkpoint holds no `student_ema` (pass the full checkpoint.pth "
                              "or the exported student_backbone_ema.pth, or drop the EMA flag)")
    if "student" in ckpt and isinstance(ckpt["student"], dict):
        return ckpt["student"]
    sd = unwrap_state_dict(ckpt)
    if any(k.startswith("student.backbone.") for k in sd):
        return {k[len("student.backbone."):]: v for k, v in sd.items() if k.startswith("student.backbone.")}
    return sd


# Keys a backbone checkpoint may lack: exports made with timm drop the (unused at eval) mask token.
EVAL_ALLOWED_MISSING = ("mask_token",)


def load_backbone(path: str | None, arch: str, patch_size: int = 14, img_size: int = 224, ema: bool = False,
                  student: str | None = None, **overrides):
    """The one loader for evaluation: build `arch` and load any accepted checkpoint strictly.

    `path` None or "none" gives the random-init baseline. The position embedding is resampled to the
    model's grid (official DINOv2 files are 518 px). Registers are taken from the checkpoint.
    `overrides` (e.g. depth=2, embed_dim=64, num_heads=2) change the size, for tiny test models.
    `student`: the key of one student in a several-student pretrain checkpoint.pth (models.run.resolve_run).
    Returns the model in eval mode.
    """
    from .vit import build_vit  # local: vit imports this module's siblings only
    from .timm_student import is_timm_name

    if is_timm_name(arch):
        return load_timm_backbone(path, arch, img_size=img_size, ema=ema, student=student, **overrides)

    if path in (None, "", "none"):
        model = build_vit(arch, patch_size=patch_size, img_size=img_size, **overrides)
        return model.eval()
    ckpt = read_checkpoint(path, allowed_globals=PROTEUS_TRAINING_GLOBALS)
    try:
        sd = backbone_state_dict(ckpt, ema=ema, student=student)
    except CheckpointError as err:  # name the file
        raise CheckpointError(f"{path}: {err}") from None
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    model = build_vit(arch, patch_size=patch_size, img_size=img_size, num_register_tokens=regs, **overrides)
    absent = load_state_dict_checked(model, fit_pos_embed(sd, model), allowed_missing=EVAL_ALLOWED_MISSING,
                                     what=f"{arch} (patch {patch_size}) from {path}")
    if absent:  # allowed, but say so: e.g. timm exports carry no mask token (unused at evaluation)
        logging.getLogger(__name__).info("%s: keys not in the checkpoint, left at init: %s", path, absent)
    return model.eval()


def load_timm_backbone(path: str | None, arch: str, img_size: int = 224, ema: bool = False, student: str | None = None,
                       **kwargs) -> nn.Module:
    from .vit import build_student  # local: vit imports this module's siblings only

    """`timm:<name>` for evaluation: the `models.TimmStudent` that `pretrain.main --student timm:<name>` trains,
    its timm model loaded strictly. Returns it in eval mode.

    Accepted files: the export `student_backbone[_ema].pth` (the timm model's own state dict, no classifier),
    a pretrain `checkpoint.pth` (its `student` / `student_ema` hold the TimmStudent's state dict, whose keys
    carry the `model.` prefix of the wrapped timm model), or a TimmStudent state dict. `path` None / "none":
    random init. `kwargs` go to `timm.create_model` (as pretraining's --student-kwargs).
    """
    student = build_student(arch, img_size=img_size, **kwargs)
    if path in (None, "", "none"):
        return student.eval()
    ckpt = read_checkpoint(path)
    try:
        sd = backbone_state_dict(ckpt, ema=ema, student=student)
    except CheckpointError as err:  # name the file
        raise CheckpointError(f"{path}: {err}") from None
    from .timm_student import timm_model_keys

    load_state_dict_checked(student.model, timm_model_keys(sd), what=f"{arch} from {path}")
    return student.eval()
