"""OpenMMLab plugin shared by segmentation/ and depth/: compatibility shims + registered components.

Importing this package installs the mmcv-lite `mmcv.ops` shim *before* mmseg's models are imported,
then registers into mmseg's registries:
- MODELS: `ProteusViT` (backbone), `LinearProbeHead` (linear dense probe);
- OPTIM_WRAPPER_CONSTRUCTORS: `ViTLayerDecayOptimWrapperConstructor`;
- MODEL_WRAPPERS: `DeviceAwareDDP` (DDP that also runs on CPU/gloo).
Configs load it with `custom_imports = dict(imports=['common.mmseg_plugin'])`; the entry points import
it before anything else.
"""
from .compat import install_mmcv_ops_shim, mmengine_checkpoint_globals

install_mmcv_ops_shim()

from .backbone import ProteusViT  # noqa: E402  (must follow the shim)
from .ddp import DeviceAwareDDP  # noqa: E402
from .heads import LinearProbeHead  # noqa: E402
from .optim import ViTLayerDecayOptimWrapperConstructor, vit_layer_id  # noqa: E402

__all__ = ["DeviceAwareDDP", "LinearProbeHead", "ProteusViT", "ViTLayerDecayOptimWrapperConstructor",
           "install_mmcv_ops_shim", "mmengine_checkpoint_globals", "vit_layer_id"]
