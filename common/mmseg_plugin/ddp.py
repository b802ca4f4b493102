"""A DDP model wrapper that also works on CPU (gloo): see compat.py for why mmengine's does not."""
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS  # the root registry: Runner.wrap_model looks it up there


@MODEL_WRAPPERS.register_module()
class DeviceAwareDDP(MMDistributedDataParallel):
    """mmengine's DDP wrapper, minus `device_ids` when the module lives on CPU (torch rejects them there).

    The Runner passes `device_ids=[LOCAL_RANK]` to every DDP subclass; on GPU they are kept.
    """

    def __init__(self, module, device_ids=None, **kwargs):
        on_cpu = next(module.parameters()).device.type == "cpu"
        super().__init__(module=module, device_ids=None if on_cpu else device_ids, **kwargs)
