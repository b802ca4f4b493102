"""tools.export (timm folder, ONNX graph, DINOv2 .pth), hubconf.py, and the README's "Use your distilled
model" snippets, each run as written.

Tiny students: vit_tiny with depth 2 / width 64 / 2 heads at 56 px, and timm's convnext_atto. The run dirs
are written here in pretrain.main's format (pretrain/state.py: checkpoint.pth with student / student_ema /
heads / optimizer / config / progress keys; config.json; student_backbone[_ema].pth flat, timm students'
with the timm model's own keys).
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import types

import pytest
import torch

import models
from tools import export

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(depth=2, embed_dim=64, num_heads=2)
SIZE = 56

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------
# Run dirs in pretrain.main's format
# ----------------------------------------------------------------------------------------------------------
def pretrain_config(student: str, student_kwargs: str, data_root: str) -> dict:
    return {"tool": "pretrain", "student": student, "student_kwargs": student_kwargs, "patch_size": 14,
            "input_size": SIZE, "teacher": "dinov2_vits14", "teacher_checkpoint": "/data/teachers/t.pth",
            "objectives": {"dinov2_vits14": ["token", "fea", "patch"]}, "lambda_token": 1.0, "lambda_fea": 1.0,
            "lambda_patch": 1.0, "mask_probability": 0.5, "epochs": 2, "global_batch": 4, "lr": 0.05,
            "ema_decay": 0.99, "precision": "fp32", "data_path": [data_root], "steps_per_epoch": 6,
            "total_steps": 12, "git_sha": "0123abc"}


def write_run(run, student: str, student_kwargs: str = "", **build_kwargs) -> str:
    """A run dir as pretrain.main leaves it mid-run plus its final exports; returns its path."""
    os.makedirs(run, exist_ok=True)
    torch.manual_seed(1)
    online = models.build_student(student, 14, SIZE, **build_kwargs)
    ema = models.build_student(student, 14, SIZE, **build_kwargs)  # other weights: EMA vs online is visible
    cfg = pretrain_config(student, student_kwargs, "/home/someone/imagenet/train")
    ckpt = {"student": online.state_dict(), "student_ema": ema.state_dict(),
            "heads": {"token_head": {"weight": torch.zeros(3, 3)}}, "target_norm": None,
            "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "scaler": None,
            "epoch": 1, "step_in_epoch": 2, "global_step": 8, "rng": [], "mask_rng": [], "bad_images": 0,
            "config": cfg}
    torch.save(ckpt, os.path.join(run, "checkpoint.pth"))
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({**cfg, "resumed_from": None, "argv": []}, f)
    for name, module in (("student_backbone.pth", online), ("student_backbone_ema.pth", ema)):
        weights = module.model if models.is_timm_name(student) else module  # pretrain.state.backbone_weights
        torch.save(weights.state_dict(), os.path.join(run, name))
    return str(run)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory) -> str:
    run = write_run(tmp_path_factory.mktemp("vit") / "run", "vit_tiny", "depth=2,embed_dim=64,num_heads=2", **TINY)
    os.makedirs(os.path.join(run, "eval", "linear"))
    with open(os.path.join(run, "eval", "linear", "results.json"), "w") as f:
        json.dump(linear_results(os.path.join(run, "checkpoint.pth"), top1=61.25, top5=83.5), f)
    return run


def linear_results(weights: str, **scores) -> dict:
    """A results.json as linear_eval writes it for `weights` (the online student of a one-student file)."""
    from common import probe

    return {**scores, "arch": "vit_tiny", "feature_seconds": 3.0, "pretrained": weights, "ema": False,
            "student": None, "backbone": probe.backbone_identity(weights, "vit_tiny", 14, TINY, img_size=SIZE)}


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory) -> str:
    return write_run(tmp_path_factory.mktemp("timm") / "run", "timm:convnext_atto")


def run_export(capsys, *argv) -> tuple[int, str, str]:
    rc = export.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def images(n: int = 2, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def timm_vit_features(model, x) -> dict:
    with torch.no_grad():
        tokens = model.forward_features(x)
        return {"cls": tokens[:, 0], "patch": tokens[:, model.num_prefix_tokens:], "forward": model(x)}


def ours(model, x) -> dict:
    with torch.no_grad():
        out = model.forward_features(x)
        return {"cls": out["cls"], "patch": out["patch"], "forward": model(x)}


def max_diffs(a: dict, b: dict) -> dict:
    return {k: (a[k] - b[k]).abs().max().item() for k in a}


# ----------------------------------------------------------------------------------------------------------
# --to timm
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ema", [False, True])
def test_timm_folder_loads_via_local_dir_with_identical_features(vit_run, tmp_path, capsys, ema):
    import timm

    out = tmp_path / "proteus_tiny"
    rc, stdout, err = run_export(capsys, f"{vit_run}/checkpoint.pth", "--to", "timm", "--output", out,
                                 *(["--ema"] if ema else []))
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    reference = models.load_backbone(f"{vit_run}/checkpoint.pth", "vit_tiny", 14, SIZE, ema=ema, **TINY)
    x = images()
    assert max_diffs(timm_vit_features(loaded, x), ours(reference, x)) == {"cls": 0, "patch": 0, "forward": 0}
    other = models.load_backbone(f"{vit_run}/checkpoint.pth", "vit_tiny", 14, SIZE, ema=not ema, **TINY)
    assert not torch.equal(ours(other, x)["cls"], timm_vit_features(loaded, x)["cls"])  # --ema picks the weights


def test_timm_config_describes_the_weights_and_their_preprocessing(vit_run, tmp_path, capsys):
    out = tmp_path / "t"
    assert run_export(capsys, f"{vit_run}/checkpoint.pth", "--to", "timm", "--output", out)[0] == 0
    with open(out / "config.json") as f:
        cfg = json.load(f)
    assert cfg["architecture"] == "vit_small_patch14_dinov2" and cfg["num_classes"] == 0
    args = cfg["model_args"]
    assert (args["embed_dim"], args["depth"], args["num_heads"], args["patch_size"]) == (64, 2, 2, 14)
    pre = cfg["pretrained_cfg"]
    assert pre["input_size"] == [3, SIZE, SIZE] and pre["num_classes"] == 0
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]
    assert pre["interpolation"] == "bicubic" and pre["crop_pct"] == pytest.approx(0.875)
    assert not {"tag", "license", "paper_ids"} & set(pre)  # timm's own DINOv2 release is not these weights


def test_model_card_lists_teacher_recipe_steps_and_results(vit_run, tmp_path, capsys):
    out = tmp_path / "card"
    assert run_export(capsys, f"{vit_run}/checkpoint.pth", "--to", "timm", "--output", out)[0] == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n")
    assert "dinov2_vits14" in card and "| steps | 8 of 12 optimizer steps |" in card
    assert "| lambda_patch | `1.0` |" in card and "| epochs | `2` |" in card
    assert "| eval/linear | top1 | 61.25 |" in card and "top5" in card
    assert "feature_seconds" not in card and "/home/someone" not in card  # no timings, no local paths
    assert "`train`" in card  # the data path, by its last component


def test_card_of_a_bare_weights_file_lists_only_its_own_results(tmp_path, capsys):
    """A weights file outside any run: the results in its folder computed from other weights (hashed, or
    named by path) are not this model's and stay off its card."""
    folder = tmp_path / "models"
    os.makedirs(folder / "eval")
    paths = {}
    for name, seed in (("mine", 0), ("other", 1)):
        torch.manual_seed(seed)
        paths[name] = str(folder / f"{name}.pth")
        torch.save(models.build_student("vit_tiny", 14, SIZE, **TINY).state_dict(), paths[name])
    scores = {"mine": 70.5, "other": 12.25, "other_by_path": 33.75}
    for name, top1 in scores.items():
        os.makedirs(folder / "eval" / name)
        record = linear_results(paths[name.split("_")[0]], top1=top1)
        if name == "other_by_path":  # written before results recorded the weights' hash
            del record["backbone"]
        with open(folder / "eval" / name / "results.json", "w") as f:
            json.dump(record, f)
    out = folder / "export"
    rc, _, err = run_export(capsys, paths["mine"], "--to", "timm", "--output", out, "--arch", "vit_tiny",
                            "--model-kwargs", "depth=2,embed_dim=64,num_heads=2", "--img-size", SIZE)
    assert rc == 0, err
    card = (out / "README.md").read_text()
    assert "| eval/mine | top1 | 70.5 |" in card
    assert "12.25" not in card and "33.75" not in card and "eval/other" not in card


def test_timm_folder_from_a_flat_backbone_with_registers(tmp_path, capsys):
    """student_backbone.pth + config.json beside it; registers map to timm's reg_token layout."""
    import timm

    run = write_run(tmp_path / "run", "vit_tiny", "depth=2,embed_dim=64,num_heads=2,num_register_tokens=2",
                    num_register_tokens=2, **TINY)
    out = tmp_path / "reg"
    rc, _, err = run_export(capsys, f"{run}/student_backbone.pth", "--to", "timm", "--output", out)
    assert rc == 0, err
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert loaded.num_prefix_tokens == 3
    reference = models.load_backbone(f"{run}/student_backbone.pth", "vit_tiny", 14, SIZE, **TINY)
    assert max_diffs(timm_vit_features(loaded, images()), ours(reference, images())) == {
        "cls": 0, "patch": 0, "forward": 0}
    assert "run's final weights (12 optimizer steps planned)" in (out / "README.md").read_text()


def test_timm_student_keeps_its_architecture(timm_run, tmp_path, capsys):
    import timm

    out = tmp_path / "convnext"
    rc, _, err = run_export(capsys, f"{timm_run}/checkpoint.pth", "--to", "timm", "--output", out)
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["architecture"] == "convnext_atto"
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    student = models.build_student("timm:convnext_atto", img_size=SIZE)
    student.load_state_dict(torch.load(f"{timm_run}/checkpoint.pth", weights_only=True)["student"])
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), student.eval()(x))  # pre-logits
        assert torch.equal(loaded.forward_features(x), student.model.forward_features(x))


# ----------------------------------------------------------------------------------------------------------
# --to onnx
# ----------------------------------------------------------------------------------------------------------
def tamper(path: str) -> str:
    """Change one weight of the saved graph by 1 %: a silent export bug of the kind users report."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(path)
    biggest = max(proto.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    biggest.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(biggest) * 1.01, biggest.name))
    onnx.save(proto, path)
    return biggest.name


@pytest.fixture(scope="module")
def vit_onnx(vit_run, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    assert export.main([f"{vit_run}/checkpoint.pth", "--to", "onnx", "--output", out]) == 0
    return out


def test_onnx_graph_matches_pytorch_at_any_batch_size(vit_run, vit_onnx):
    import onnx
    import onnxruntime as ort

    reference = models.load_backbone(f"{vit_run}/checkpoint.pth", "vit_tiny", 14, SIZE, **TINY)
    session = ort.InferenceSession(vit_onnx, providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = images(batch)
        cls, patch = session.run(["cls", "patch"], {"images": x.numpy()})
        ref = ours(reference, x)
        assert cls.shape == (batch, 64) and patch.shape == (batch, 16, 64)
        assert (torch.from_numpy(cls) - ref["cls"]).abs().max() <= 1e-4 * ref["cls"].abs().max()
        assert (torch.from_numpy(patch) - ref["patch"]).abs().max() <= 1e-4 * ref["patch"].abs().max()
    meta = {p.key: p.value for p in onnx.load(vit_onnx).metadata_props}
    assert meta["proteus.arch"] == "vit_tiny" and meta["proteus.input_size"] == f"3x{SIZE}x{SIZE}"
    assert meta["proteus.source"] == "checkpoint.pth"


def test_onnx_check_fails_when_the_graph_is_tampered_with(vit_run, vit_onnx, tmp_path):
    import shutil

    src = export.read_source(f"{vit_run}/checkpoint.pth")
    model = export.build_backbone(src)
    inputs = export.check_inputs(SIZE, None)
    assert len(export.check_onnx(vit_onnx, model, inputs)) == 4  # the untampered graph passes
    tampered = str(tmp_path / "tampered.onnx")
    shutil.copy(vit_onnx, tampered)
    tamper(tampered)
    with pytest.raises(export.CheckFailed, match="does not reproduce the PyTorch model within 0.0001"):
        export.check_onnx(tampered, model, inputs)


def test_onnx_export_that_fails_its_check_exits_3_and_writes_nothing(vit_run, tmp_path, capsys, monkeypatch):
    real_write = export.write_onnx

    def write_then_break(model, src, path, opset):
        real_write(model, src, path, opset)
        tamper(path)

    monkeypatch.setattr(export, "write_onnx", write_then_break)
    out = tmp_path / "broken.onnx"
    rc, _, err = run_export(capsys, f"{vit_run}/checkpoint.pth", "--to", "onnx", "--output", out)
    assert rc == export.EXIT_CHECK_FAILED == 3
    assert "self-check failed, nothing written" in err and "max |diff|" in err
    assert os.listdir(tmp_path) == []  # neither the graph nor its temporary file


def test_onnx_check_on_real_images_of_a_timm_student(timm_run, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (80 + 10 * i, 70), (40 * i, 90, 200)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")  # skipped, not fatal
    out = tmp_path / "convnext.onnx"
    rc, stdout, err = run_export(capsys, f"{timm_run}/checkpoint.pth", "--to", "onnx", "--output", out,
                                 "--check-images", tmp_path / "imgs")
    assert rc == 0, err
    assert f"3 images of {tmp_path / 'imgs'}: cls: max |diff|" in stdout and "random, batch 3: patch" in stdout


# ----------------------------------------------------------------------------------------------------------
# --to dinov2
# ----------------------------------------------------------------------------------------------------------
def test_dinov2_export_is_the_backbone_state_dict_and_loads(vit_run, tmp_path, capsys):
    out = tmp_path / "tiny_dinov2.pth"
    rc, stdout, err = run_export(capsys, f"{vit_run}/checkpoint.pth", "--to", "dinov2", "--output", out, "--ema")
    assert rc == 0, err
    written = torch.load(out, weights_only=True)
    ema = torch.load(f"{vit_run}/student_backbone_ema.pth", weights_only=True)
    assert written.keys() == ema.keys() and all(torch.equal(written[k], ema[k]) for k in ema)
    loaded = models.load_backbone(str(out), "vit_tiny", 14, SIZE, **TINY)
    reference = models.load_backbone(f"{vit_run}/checkpoint.pth", "vit_tiny", 14, SIZE, ema=True, **TINY)
    assert max_diffs(ours(loaded, images()), ours(reference, images())) == {"cls": 0, "patch": 0, "forward": 0}
    assert "--arch vit_tiny --patch-size 14 --model-kwargs" in stdout
    rc, _, err = run_export(capsys, f"{vit_run}/checkpoint.pth", "--to", "dinov2", "--output", out, "--overwrite")
    assert rc == 0 and not torch.equal(torch.load(out, weights_only=True)["cls_token"], ema["cls_token"]), err


# ----------------------------------------------------------------------------------------------------------
# User errors: one message, exit 2, nothing written
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, expected", [
    ("missing", "checkpoint file not found"),
    ("no_arch", "cannot tell the architecture"),
    ("wrong_arch", "checkpoint does not fit vit_small"),
    ("contradicts_run", "--arch vit_small contradicts run"),
    ("bad_kwargs", "--model-kwargs expects key=int pairs"),
    ("timm_to_dinov2", "has no DINOv2 layout"),
    ("exists", "exists; pass --overwrite"),
    ("no_ema", "holds no `student_ema`"),
    ("images_not_onnx", "--check-images is for --to onnx"),
    ("missing_images", "no such folder"),
])
def test_user_errors_exit_2_with_one_message(vit_run, timm_run, tmp_path, capsys, case, expected):
    flat = tmp_path / "lonely" / "student_backbone.pth"  # no config.json beside it
    flat.parent.mkdir()
    torch.save(torch.load(f"{vit_run}/student_backbone.pth", weights_only=True), flat)
    (tmp_path / "taken").mkdir()
    out = tmp_path / "out"
    argv = {"missing": [tmp_path / "nope.pth", "--to", "timm", "--output", out],
            "no_arch": [flat, "--to", "dinov2", "--output", out],
            "wrong_arch": [flat, "--to", "timm", "--output", out, "--arch", "vit_small", "--model-kwargs", ""],
            # a flag that says something else than the run is refused, naming both (models.run)
            "contradicts_run": [f"{vit_run}/checkpoint.pth", "--to", "timm", "--output", out, "--arch", "vit_small",
                                "--model-kwargs", ""],
            "bad_kwargs": [flat, "--to", "timm", "--output", out, "--arch", "vit_tiny", "--model-kwargs", "depth:2"],
            "timm_to_dinov2": [f"{timm_run}/checkpoint.pth", "--to", "dinov2", "--output", out],
            "exists": [f"{vit_run}/checkpoint.pth", "--to", "dinov2", "--output", tmp_path / "taken"],
            "no_ema": [flat, "--to", "dinov2", "--output", out, "--arch", "vit_tiny", "--ema"],
            "images_not_onnx": [f"{vit_run}/checkpoint.pth", "--to", "timm", "--output", out,
                                "--check-images", tmp_path],
            "missing_images": [f"{vit_run}/checkpoint.pth", "--to", "onnx", "--output", out,
                               "--check-images", tmp_path / "nothing"]}[case]
    rc, stdout, err = run_export(capsys, *argv)
    assert rc == 2 and err.startswith("tools.export: error: ") and expected in err, err
    assert not out.exists() and os.listdir(tmp_path / "taken") == []
    assert sorted(os.listdir(tmp_path)) == ["lonely", "taken"]  # no temporary left behind


def _user_folder(path) -> str:
    os.makedirs(path)
    with open(os.path.join(path, "precious.txt"), "w") as f:
        f.write("precious")
    return str(path)


@pytest.mark.parametrize("to, target", [("dinov2", "user_dir"), ("timm", "user_dir"), ("timm", "run_dir"),
                                        ("onnx", "export_plus_user_file")])
def test_overwrite_never_deletes_a_folder_it_did_not_write(vit_run, tmp_path, capsys, to, target):
    run = shutil.copytree(vit_run, tmp_path / "run")
    if target == "user_dir":
        out = _user_folder(tmp_path / "mine")
    elif target == "run_dir":
        out = str(run)
    else:  # an earlier timm export, to which the user added a file
        out = str(tmp_path / "exported")
        assert run_export(capsys, f"{run}/checkpoint.pth", "--to", "timm", "--output", out)[0] == 0
        with open(os.path.join(out, "precious.txt"), "w") as f:
            f.write("precious")
    before = sorted(os.listdir(out))
    rc, _, err = run_export(capsys, f"{run}/checkpoint.pth", "--to", to, "--output", out, "--overwrite")
    assert rc == 2 and err.count("error:") == 1 and "did not write" in err, err
    assert sorted(os.listdir(out)) == before  # the run dir keeps checkpoint.pth, config.json, ...
    if target != "run_dir":
        assert open(os.path.join(out, "precious.txt")).read() == "precious"


def test_overwrite_replaces_an_earlier_timm_export(vit_run, tmp_path, capsys):
    out = tmp_path / "proteus_tiny"
    assert run_export(capsys, f"{vit_run}/checkpoint.pth", "--to", "timm", "--output", out)[0] == 0
    assert json.loads((out / "config.json").read_text())["tool"] == "tools.export"
    first = (out / "model.safetensors").read_bytes()
    rc, _, err = run_export(capsys, f"{vit_run}/checkpoint.pth", "--to", "timm", "--output", out, "--ema",
                            "--overwrite")
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() != first  # the EMA weights replaced the student's


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_output_fails_before_the_model_is_built(vit_run, tmp_path, capsys, monkeypatch, where):
    (tmp_path / "afile").write_text("x")
    out = {"under_a_file": tmp_path / "afile" / "sub" / "x.pth", "proc": "/proc/proteus-export-test/x.pth"}[where]
    monkeypatch.setattr(export, "read_source", lambda *a, **k: pytest.fail("the checkpoint was read"))
    rc, stdout, err = run_export(capsys, f"{vit_run}/checkpoint.pth", "--to", "dinov2", "--output", out)
    assert rc == 2 and err.count("\n") == 1 and f"cannot write --output {out}" in err, err
    assert sorted(os.listdir(tmp_path)) == ["afile"] and not os.path.exists("/proc/proteus-export-test")


@pytest.mark.slow
def test_command_line_entry_point(tmp_path):
    """`python -m tools.export` runs main: a user error is one line on stderr, exit 2, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "tools.export", str(tmp_path / "x.pth"), "--to", "onnx",
                           "--output", str(tmp_path / "x.onnx")], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"tools.export: error: checkpoint file not found: {tmp_path}/x.pth"]


# ----------------------------------------------------------------------------------------------------------
# hubconf.py
# ----------------------------------------------------------------------------------------------------------
def test_hubconf_loads_weights_and_random_init(vit_run, monkeypatch):
    x = torch.randn(2, 3, SIZE, SIZE)
    reference = models.load_backbone(f"{vit_run}/checkpoint.pth", "vit_tiny", 14, SIZE, ema=True, **TINY)
    for weights in (f"{vit_run}/checkpoint.pth", f"{vit_run}/student_backbone_ema.pth"):
        hub = torch.hub.load(REPO, "proteus_vit_tiny", source="local", weights=weights, img_size=SIZE,
                             ema=weights.endswith("checkpoint.pth"), **TINY)
        assert not hub.training and torch.equal(ours(hub, x)["cls"], ours(reference, x)["cls"])
    # a caller's own `models` module (a common name) neither hides ours nor gets replaced
    foreign = types.ModuleType("models")
    monkeypatch.setitem(sys.modules, "models", foreign)
    random_init = torch.hub.load(REPO, "proteus_vit_small", source="local", img_size=SIZE, depth=1)
    assert ours(random_init, x)["cls"].shape == (2, 384) and sys.modules["models"] is foreign


# ----------------------------------------------------------------------------------------------------------
# The README's "Use your distilled model" snippets, as written there (copy any change both ways)
# ----------------------------------------------------------------------------------------------------------
EXPORT_COMMANDS = """\
python -m tools.export output/pretrain/checkpoint.pth --to timm --output proteus_vit_small_timm
python -m tools.export output/pretrain/checkpoint.pth --to onnx --output proteus_vit_small.onnx
python -m tools.export output/pretrain/checkpoint.pth --to dinov2 --output proteus_vit_small_dinov2.pth
"""

TIMM_SNIPPET = """\
import timm
import torch
from PIL import Image

model = timm.create_model("local-dir:proteus_vit_small_timm", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
with torch.no_grad():
    features = model(transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0))  # (1, 384) CLS
"""

ONNX_SNIPPET = """\
import numpy as np
import onnxruntime as ort

session = ort.InferenceSession("proteus_vit_small.onnx")
images = np.random.randn(4, 3, 224, 224).astype(np.float32)  # ImageNet-normalised, any batch size
cls, patch = session.run(["cls", "patch"], {"images": images})  # (4, 384), (4, 256, 384)
"""

HUB_SNIPPET = """\
import torch

model = torch.hub.load("proteus", "proteus_vit_small", source="local",  # "proteus": your clone of this repo
                       weights="output/pretrain/student_backbone.pth")
x = torch.randn(1, 3, 224, 224)  # ImageNet-normalised
with torch.no_grad():
    features = model(x)  # (1, 384) CLS; model.forward_features(x) also gives the patch tokens
"""

DINOV2_SNIPPET = """\
import torch
from dinov2.models.vision_transformer import vit_small  # github.com/facebookresearch/dinov2

model = vit_small(patch_size=14, img_size=224, init_values=1.0, block_chunks=0).eval()
model.load_state_dict(torch.load("proteus_vit_small_dinov2.pth", weights_only=True))
x = torch.randn(1, 3, 224, 224)
with torch.no_grad():
    features = model.forward_features(x)["x_norm_clstoken"]  # (1, 384)
"""

SNIPPETS = {"bash": [EXPORT_COMMANDS], "python": [TIMM_SNIPPET, ONNX_SNIPPET, HUB_SNIPPET, DINOV2_SNIPPET]}


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """A user's folder after a full-size ViT-S/14 run (random weights): the README's commands run in it."""
    from PIL import Image

    root = tmp_path_factory.mktemp("user")
    torch.manual_seed(3)
    student = models.build_student("vit_small", 14, 224)
    cfg = {**pretrain_config("vit_small", "", "/data/train"), "input_size": 224}
    run = root / "output" / "pretrain"
    run.mkdir(parents=True)
    torch.save({"student": student.state_dict(), "student_ema": None, "heads": {}, "optimizer": {},
                "global_step": 12, "epoch": 2, "step_in_epoch": 0, "config": cfg}, run / "checkpoint.pth")
    torch.save(student.state_dict(), run / "student_backbone.pth")
    (run / "config.json").write_text(json.dumps(cfg))
    Image.new("RGB", (300, 240), (120, 60, 30)).save(root / "image.jpg")
    os.symlink(REPO, root / "proteus")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for line in EXPORT_COMMANDS.splitlines():
            words = shlex.split(line)
            assert words[:3] == ["python", "-m", "tools.export"]
            assert export.main(words[3:]) == 0
    finally:
        os.chdir(cwd)
    return root, student.eval()


def run_snippet(code: str, where, monkeypatch) -> dict:
    monkeypatch.chdir(where)
    namespace = {}
    exec(compile(code, "<README snippet>", "exec"), namespace)
    return namespace


@pytest.mark.slow
def test_readme_timm_snippet(user_dir, monkeypatch):
    import timm

    root, student = user_dir
    ns = run_snippet(TIMM_SNIPPET, root, monkeypatch)
    from PIL import Image

    transform = timm.data.create_transform(input_size=224, interpolation="bicubic", crop_pct=0.875)
    x = transform(Image.open(root / "image.jpg").convert("RGB")).unsqueeze(0)
    assert torch.equal(ns["features"], ours(student, x)["cls"])


@pytest.mark.slow
def test_readme_onnx_snippet(user_dir, monkeypatch):
    root, student = user_dir
    ns = run_snippet(ONNX_SNIPPET, root, monkeypatch)
    ref = ours(student, torch.from_numpy(ns["images"]))
    assert ns["cls"].shape == (4, 384) and ns["patch"].shape == (4, 256, 384)
    assert (torch.from_numpy(ns["cls"]) - ref["cls"]).abs().max() <= 1e-4 * ref["cls"].abs().max()


def test_readme_hub_snippet(user_dir, monkeypatch):
    root, student = user_dir
    ns = run_snippet(HUB_SNIPPET, root, monkeypatch)
    assert torch.equal(ns["features"], ours(student, ns["x"])["cls"])


def test_readme_dinov2_snippet(user_dir, monkeypatch):
    root, student = user_dir
    ns = run_snippet(DINOV2_SNIPPET, root, monkeypatch)
    ref = ours(student, ns["x"])["cls"]  # DINOv2's own attention sums in another order: not bit-identical
    assert ns["features"].shape == (1, 384) and torch.allclose(ns["features"], ref, atol=1e-5, rtol=1e-4)


def readme_blocks() -> dict | None:
    """{language: [code]} of the README's "Use your distilled model" section, None while it has none."""
    import re

    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = re.search(r"^(#+) Use your distilled model\n(.*?)(?=^\1 |\Z)", text, re.M | re.S)
    if section is None:
        return None
    blocks = {}
    for lang, code in re.findall(r"^```(\w+)\n(.*?)^```", section.group(2), re.M | re.S):
        blocks.setdefault(lang, []).append(code)
    return blocks


def test_readme_section_shows_exactly_the_tested_snippets():
    blocks = readme_blocks()
    assert blocks is not None, "README.md has no 'Use your distilled model' section"
    assert blocks == SNIPPETS


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_tolerance_is_one_line_exit_2(tmp_path, capsys, value):
    out = tmp_path / "model.onnx"
    rc, _, err = run_export(capsys, str(tmp_path / "weights.pth"), "--to", "onnx", "--output", out,
                            f"--tolerance={value}")
    assert rc == 2 and err.strip().splitlines() == [f"tools.export: error: --tolerance must be a finite number, "
                                                    f"got {value}"], err
    assert not out.exists()
