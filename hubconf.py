"""torch.hub entry points: Proteus students (DINOv2-layout ViTs) from a local clone of this repository.

    model = torch.hub.load("path/to/clone", "proteus_vit_small", source="local",
                           weights="output/pretrain/student_backbone.pth")

`weights` takes what `models.load_backbone` takes: a run's checkpoint.pth (add ema=True for its EMA),
student_backbone[_ema].pth, a `python -m tools.export --to dinov2` file, or an official DINOv2 file;
None gives a randomly initialised student. Size overrides (depth=2, embed_dim=64, ...) and img_size,
patch_size pass through. The model comes back in eval mode; model(x) is the CLS feature (B, D) and
model.forward_features(x) gives dict(cls, patch).
"""
import hashlib
import importlib.util
import os
import sys

dependencies = ["torch", "timm"]

_ROOT = os.path.dirname(os.path.realpath(__file__))


def _is_ours(module) -> bool:
    path = getattr(module, "__file__", None)
    return bool(path) and os.path.dirname(os.path.realpath(path)) == os.path.join(_ROOT, "models")


def _models():
    """This clone's models/ package, imported under a private name: `models` is a common module name,
    and one the caller already imported must neither hide ours nor be replaced by it."""
    imported = sys.modules.get("models")
    if _is_ours(imported):
        return imported  # this very package, already imported (from inside the repo): no second copy
    name = f"_proteus_models_{hashlib.sha1(_ROOT.encode()).hexdigest()[:10]}"
    if name not in sys.modules:
        package = os.path.join(_ROOT, "models")
        spec = importlib.util.spec_from_file_location(name, os.path.join(package, "__init__.py"),
                                                      submodule_search_locations=[package])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: its submodules import each other relatively
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _student(arch: str, weights, patch_size: int, img_size: int, ema: bool, overrides: dict):
    return _models().load_backbone(weights, arch, patch_size=patch_size, img_size=img_size, ema=ema, **overrides)


def proteus_vit_tiny(weights=None, patch_size=14, img_size=224, ema=False, **overrides):
    """Proteus ViT-Ti/14 (192-d); `weights` None = random init."""
    return _student("vit_tiny", weights, patch_size, img_size, ema, overrides)


def proteus_vit_small(weights=None, patch_size=14, img_size=224, ema=False, **overrides):
    """Proteus ViT-S/14 (384-d); `weights` None = random init."""
    return _student("vit_small", weights, patch_size, img_size, ema, overrides)


def proteus_vit_base(weights=None, patch_size=14, img_size=224, ema=False, **overrides):
    """Proteus ViT-B/14 (768-d); `weights` None = random init."""
    return _student("vit_base", weights, patch_size, img_size, ema, overrides)


def proteus_vit_large(weights=None, patch_size=14, img_size=224, ema=False, **overrides):
    """Proteus ViT-L/14 (1024-d); `weights` None = random init."""
    return _student("vit_large", weights, patch_size, img_size, ema, overrides)
