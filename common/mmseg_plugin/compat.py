"""Compatibility shims that let mmsegmentation 1.2.2 run on our stack (mmcv-lite, torch >= 2.6, CPU DDP).

Each shim is measured in ../shared/reference/environment.md (OpenMMLab section):
- mmcv-lite has no compiled `mmcv._ext`, so `import mmcv.ops` fails, and four mmseg modules import it
  unguarded. Nothing we use needs a compiled op; `point_sample` is pure PyTorch in mmcv-lite's own
  `mmcv/ops/point_sample.py`. `install_mmcv_ops_shim()` must run before the first `import mmseg.models`.
- torch >= 2.6 loads with `weights_only=True`; mmengine's checkpoints hold a `HistoryBuffer` and numpy
  scalars/arrays (message hub), so resume and test-from-checkpoint fail. We allow-list exactly those
  types instead of turning the safe loader off, and only around the Runner's own checkpoint loads
  (`mmengine_checkpoint_globals`): every other load in the process keeps the default list.
- mmengine's pytorch launcher calls `torch.cuda.set_device` unconditionally and passes `device_ids` to
  DDP, so it cannot run on CPU. The entry points initialise the process group with
  `common.dist.init_distributed` (gloo on CPU, nccl on GPU) and we register a DDP wrapper that drops
  `device_ids` for CPU modules.
"""
import importlib.util
import os
import sys
import types

import torch

_SHIM_NAME = "mmcv.ops"


def _has_compiled_mmcv() -> bool:
    try:
        return importlib.util.find_spec("mmcv._ext") is not None
    except ModuleNotFoundError:
        return False


def _sigmoid_focal_loss_unavailable(*args, **kwargs):
    raise RuntimeError("mmcv.ops.sigmoid_focal_loss needs the compiled mmcv (mmcv-full); this project uses "
                       "mmcv-lite. Use CrossEntropyLoss / SiLogLoss, or install full mmcv 2.1.0.")


def install_mmcv_ops_shim() -> None:
    """Register a pure-PyTorch `mmcv.ops` (point_sample only) when mmcv has no compiled extension.

    Idempotent, and a no-op with a full mmcv build. Any other `mmcv.ops.X` raises ModuleNotFoundError,
    which is what mmseg's optional heads (cc_head, psa_head, point_head) catch.
    """
    if _SHIM_NAME in sys.modules or _has_compiled_mmcv():
        return
    import mmcv  # the package itself imports fine; only mmcv.ops needs `_ext`

    path = os.path.join(os.path.dirname(mmcv.__file__), "ops", "point_sample.py")
    spec = importlib.util.spec_from_file_location("mmcv.ops.point_sample", path)
    point_sample_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(point_sample_mod)

    ops = types.ModuleType(_SHIM_NAME)
    ops.__file__ = __file__
    ops.point_sample = point_sample_mod.point_sample
    ops.sigmoid_focal_loss = _sigmoid_focal_loss_unavailable

    def __getattr__(name):  # module-level getattr (PEP 562): anything else is "not installed"
        if name.startswith("__"):  # import machinery probes __path__ etc. with hasattr
            raise AttributeError(name)
        raise ModuleNotFoundError(f"mmcv.ops.{name} needs the compiled mmcv; this project runs on mmcv-lite "
                                  f"with a shim that only provides point_sample")

    ops.__getattr__ = __getattr__
    sys.modules[_SHIM_NAME] = ops
    sys.modules["mmcv.ops.point_sample"] = point_sample_mod
    mmcv.ops = ops


def mmengine_checkpoint_globals() -> torch.serialization.safe_globals:
    """A context in which torch's safe loader also accepts the non-tensor types of mmengine checkpoints.

    Found with `torch.serialization.get_unsafe_globals_in_checkpoint` on an mmengine checkpoint: the
    message hub stores `HistoryBuffer`s of numpy arrays and numpy scalars, and each HistoryBuffer pickles
    its statistics methods as `getattr(buffer, 'min')`. Allowing `getattr` only lets the unpickler
    *look up* attributes (calling the result is still refused unless it is itself allow-listed), but it is
    still more than a weights file needs, hence a context for mmengine's own loads and not the process.
    """
    import numpy as np
    from mmengine.logging import HistoryBuffer

    dtypes = {type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")}
    return torch.serialization.safe_globals([
        HistoryBuffer, np.ndarray, np.dtype, *dtypes, getattr,
        np._core.multiarray._reconstruct, np._core.multiarray.scalar,
    ])
