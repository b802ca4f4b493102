"""Loading a file never runs code from it: real payloads that write a marker file, which must never appear.

Every payload is first shown to be live (the unsafe loader does write its marker), so a test that passes
is a test of our loaders, not of a dud payload.
"""
import io
import os
import pickle
import zipfile

import pytest
import torch

from models import build_teacher, load_backbone, read_checkpoint
from models.errors import CheckpointError, UserError

pytestmark = pytest.mark.usefixtures("one_thread")


class ScriptedPayload(torch.nn.Module):
    """A TorchScript module whose __setstate__ (run by torch.jit.load) creates the file `marker`."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.written = torch.zeros(4, dtype=torch.uint8)

    def forward(self, x):
        return x * self.weight

    @torch.jit.export
    def __getstate__(self):
        return (self.marker, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]):
        self.marker = state[0]
        self.weight = state[1]
        self.training = state[2]
        self.written = torch.from_file(self.marker, True, 4, dtype=torch.uint8).fill_(65)  # creates the file


class PickledPayload:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _torchscript_payload(tmp_path, name: str) -> tuple[str, str]:
    marker = str(tmp_path / f"{name}.marker")
    path = str(tmp_path / f"{name}.pt")
    torch.jit.script(ScriptedPayload(marker)).save(path)
    return path, marker


def _pickled_payload(tmp_path, name: str) -> tuple[str, str]:
    marker = str(tmp_path / f"{name}.marker")
    path = str(tmp_path / f"{name}.pth")
    torch.save({"model": {"w": torch.ones(1)}, "extra": PickledPayload(marker)}, path)
    return path, marker


def test_the_payloads_are_live(tmp_path):
    path, marker = _torchscript_payload(tmp_path, "live_ts")
    torch.jit.load(path)  # what the old fallback did
    assert os.path.exists(marker)
    path, marker = _pickled_payload(tmp_path, "live_pickle")
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)


def test_torchscript_payload_never_runs(tmp_path):
    path, marker = _torchscript_payload(tmp_path, "ts")
    with pytest.raises(CheckpointError, match="without running its code"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_backbone(path, "vit_tiny", img_size=28, depth=1)
    with pytest.raises(CheckpointError):
        build_teacher("clip_vitb16", checkpoint=path)
    assert not os.path.exists(marker)


def test_torchscript_archive_with_a_pickled_global_is_refused(tmp_path):
    # a TorchScript-shaped zip whose data.pkl calls os.system: refused by name, nothing run
    marker = tmp_path / "crafted.marker"
    path = tmp_path / "crafted.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("crafted/data.pkl", pickle.dumps(PickledPayload(str(marker)), protocol=2))
        zf.writestr("crafted/constants.pkl", pickle.dumps((), protocol=2))
        zf.writestr("crafted/code/__torch__.py", "class M(Module):\n  __parameters__ = []\n")
        zf.writestr("crafted/version", "3\n")
    with pytest.raises(CheckpointError, match=r"refers to (posix|os)\.system.*nothing was run"):
        read_checkpoint(str(path))
    assert not marker.exists()


def test_pickled_payload_is_refused_naming_the_file_and_the_global(tmp_path):
    path, marker = _pickled_payload(tmp_path, "pickle")
    for load in (lambda: read_checkpoint(path), lambda: load_backbone(path, "vit_tiny", img_size=28, depth=1),
                 lambda: build_teacher("dinov2_vits14", checkpoint=path)):
        with pytest.raises(CheckpointError, match=rf"(?s)refused to load {path}.*(posix|os)\.system.*plain state dict"):
            load()
    assert not os.path.exists(marker)


class _TinyClip(torch.nn.Module):
    """OpenAI-like layout: visual.* parameters, a buffer, a plain tensor attribute (not in a state dict)."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Module()
        self.visual.conv1 = torch.nn.Conv2d(3, 8, 4, stride=4, bias=False)
        self.visual.ln_post = torch.nn.LayerNorm(8)
        self.visual.class_embedding = torch.nn.Parameter(torch.randn(8))
        self.register_buffer("counts", torch.arange(5))
        self.logit_scale = torch.nn.Parameter(torch.ones([]))
        self.attn_mask = torch.full((2, 2), float("-inf"))

    def forward(self, x):
        tokens = self.visual.conv1(x).flatten(2).transpose(1, 2) + self.visual.class_embedding
        return self.visual.ln_post(tokens).sum() * self.logit_scale + self.attn_mask.sum() * 0


@pytest.mark.parametrize("how", ["trace", "script_fp16"])
def test_genuine_torchscript_archive_gives_its_exact_tensors(tmp_path, how):
    torch.manual_seed(0)
    module = _TinyClip().eval()
    if how == "trace":
        archive = torch.jit.trace(module, torch.randn(1, 3, 8, 8))
    else:  # OpenAI's CLIP files hold fp16 weights
        archive = torch.jit.script(module.half())
    path = str(tmp_path / f"{how}.pt")
    archive.save(path)
    want = torch.jit.load(path).state_dict()  # our own archive: safe to run here, as the reference
    got = read_checkpoint(path)
    assert list(got) == list(want) and "visual.conv1.weight" in got and "attn_mask" not in got
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_poisoned_hub_cache_is_refused_without_network(tmp_path, monkeypatch):
    # the default DINOv2 download: a file already in torch.hub's cache under the URL's name is used as is
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("network touched"))
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    marker = tmp_path / "hub.marker"
    torch.save({"pos_embed": PickledPayload(str(marker))}, cache / "dinov2_vits14_pretrain.pth")
    with pytest.raises(CheckpointError, match=r"(?s)dinov2_vits14_pretrain\.pth.*(posix|os)\.system"):
        build_teacher("dinov2_vits14")
    torch.jit.script(ScriptedPayload(str(marker))).save(str(cache / "dinov2_vitb14_pretrain.pth"))
    with pytest.raises(UserError):
        build_teacher("dinov2_vitb14")
    assert not marker.exists()


def _getattr_pickle(obj_global: bytes, attr: str, call_arg: str | None = None) -> bytes:
    """A protocol-2 pickle of getattr(<obj_global>, attr) and, with call_arg, of calling the result."""
    body = b"cbuiltins\ngetattr\n" + obj_global + b"X" + len(attr).to_bytes(4, "little") + attr.encode() + b"\x86R"
    if call_arg is not None:
        body += b"X" + len(call_arg).to_bytes(4, "little") + call_arg.encode() + b"\x85R"
    return b"\x80\x02" + body + b"."


def test_mmseg_plugin_keeps_getattr_out_of_the_process_allow_list(tmp_path):
    pytest.importorskip("mmseg")
    import common.mmseg_plugin  # noqa: F401  (what the dense entry points import first)

    marker = tmp_path / "getattr.marker"
    # getattr(__import__('os'), 'system')('touch marker'), and a harmless getattr a process-wide list lets through
    payload = _getattr_pickle(b"cbuiltins\n__import__\nX\x02\x00\x00\x00os\x85R", "system", f"touch {marker}")
    probe = _getattr_pickle(b"ccollections\nOrderedDict\n", "__name__")
    for data in (payload, probe):
        with pytest.raises(pickle.UnpicklingError, match="getattr"):
            torch.load(io.BytesIO(data), weights_only=True)
    assert not marker.exists()


def test_mmengine_checkpoint_types_load_inside_their_scope_only():
    pytest.importorskip("mmseg")
    from common.mmseg_plugin import mmengine_checkpoint_globals
    from mmengine.logging import HistoryBuffer

    buf = io.BytesIO()
    torch.save({"message_hub": HistoryBuffer([1.0, 2.0], [1, 1])}, buf)
    with mmengine_checkpoint_globals():
        buf.seek(0)
        assert torch.load(buf, weights_only=True)["message_hub"].mean() == 1.5
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buf, weights_only=True)
