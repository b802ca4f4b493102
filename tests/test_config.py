"""-c/--config FILE (common/config.py): precedence flag > file > constant, values through each flag's own type,
clear user errors, .py configs parsed and never run, the paper's configs/pretrain/ runs, and the dense configs'
per-size backbone bases."""
import argparse
import glob
import json
import os
import re

import pytest

from common.config import ConfigArgumentParser, read_config_file
from common.errors import ConfigError, MissingFileError
from pretrain import config as pretrain_config
from pretrain import main as pretrain_main
from test_pretrain_fixtures import REPO, teacher_ckpt, tiny_args, tiny_data, write_image_folder  # noqa: F401

PRETRAIN_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "pretrain", "*.yaml")))


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def toy_parser() -> ConfigArgumentParser:
    p = ConfigArgumentParser("toy", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ratio", type=float, nargs="+", default=[0.5])
    p.add_argument("--pair", type=float, nargs=2, default=[0.9, 0.999])
    p.add_argument("--mode", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--kwargs", type=json.loads, default=None)
    p.add_argument("--fast", action="store_true")
    p.add_argument("--decay", default=True, action=argparse.BooleanOptionalAction)
    p.add_argument("--tag", action="append")
    return p


# ---- precedence and recording --------------------------------------------------------------------------------
def test_flag_beats_file_beats_constant(tmp_path):
    cfg_file = write(tmp_path / "run.yaml", "teacher: dinov2_vitl14\nstudent: vit_base\nlr: 1e-3\nepochs: 50\n")
    cfg = pretrain_main.parse_config(["-c", cfg_file, "--lr", "2e-3"])
    assert cfg["lr"] == 2e-3  # flag over file
    assert (cfg["teacher"], cfg["student"], cfg["epochs"]) == ("dinov2_vitl14", "vit_base", 50)  # file over constant
    assert cfg["warmup_epochs"] == 5 and cfg["mask_ratio"] == [0.5]  # constants where the file is silent
    assert cfg["config_file"] == os.path.abspath(cfg_file)
    assert cfg["config_values"] == {"teacher": "dinov2_vitl14", "student": "vit_base", "lr": 1e-3, "epochs": 50}
    plain = pretrain_main.parse_config([])
    assert (plain["config_file"], plain["config_values"], plain["lr"]) == ("", {}, 5e-4)


def test_config_file_and_values_in_config_json(tmp_path, tiny_data, teacher_ckpt):
    out = str(tmp_path / "run")
    argv = tiny_args(tiny_data, teacher_ckpt, out, epochs=1, pca_every_epochs=0, save_every_steps=0)
    i = argv.index("--lr")
    del argv[i:i + 2]  # the learning rate and the seed come from the file
    cfg_file = write(tmp_path / "tiny.yaml", "lr: 0.02\nseed: 7\nmask-ratio: [0.2, 0.6]\n")
    assert pretrain_main.main(["-c", cfg_file, *argv]) == 0
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    assert written["config_file"] == cfg_file
    assert written["config_values"] == {"lr": 0.02, "seed": 7, "mask_ratio": [0.2, 0.6]}
    assert (written["lr"], written["seed"], written["mask_ratio"], written["epochs"]) == (0.02, 7, [0.2, 0.6], 1)


# ---- values go through the flag's own type ------------------------------------------------------------------
def test_values_are_converted_by_the_flags_types(tmp_path):
    path = write(tmp_path / "c.yaml", "out: o\nsteps: 3\nratio: 0.25\npair: [0.5, 0.75]\nmode: 'on'\n"
                                      "kwargs: {depth: 2}\nfast: true\ndecay: false\n")
    args = toy_parser().parse_args(["-c", path])
    assert (args.out, args.steps, args.ratio, args.pair, args.mode) == ("o", 3, [0.25], [0.5, 0.75], "on")
    assert (args.kwargs, args.fast, args.decay, args.limit) == ({"depth": 2}, True, False, None)
    # PyYAML reads 5e-4 as a string: the flag's float() takes it, as on the command line
    assert toy_parser().parse_args(["-c", write(tmp_path / "f.yaml", "out: o\nratio: [5e-4, 1]\n")]).ratio == [5e-4, 1.0]


@pytest.mark.parametrize("text, message", [
    ("steps: ten", "not a valid int for --steps"),
    ("steps: 2.5", "not a valid int for --steps"),
    ("mode: on", "is a boolean, but --mode takes str. YAML reads yes/no/on/off"),
    ("mode: fast", "'fast' is not one of auto, on, off"),
    ("pair: [0.5]", "takes 2 values"),
    ("ratio: []", "takes at least one value"),
    ("fast: 1", "takes true or false"),
    ("steps: null", "null is not a value of --steps"),
    ("out: [a, b]", "--out takes one value"),
    ("out: 2024-01-31", "expected a number or a string for --out, got date"),
    ("tag: x", "--tag cannot be set from a config file"),
    ("stepz: 3", "unknown key 'stepz'. Did you mean steps?"),
    ("steps: 3\nsteps: 4", "key 'steps' is given twice"),
    ("- a\n- b", "expected a mapping"),
    ("steps: [1", "not valid YAML"),
])
def test_bad_values_are_config_errors(tmp_path, text, message):
    path = write(tmp_path / "bad.yaml", text + "\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        toy_parser().parse_args(["-c", path, "--out", "o"])


def test_unknown_key_lists_the_valid_keys(tmp_path):
    path = write(tmp_path / "c.yaml", "learning_rate: 1e-3\n")
    with pytest.raises(ConfigError) as err:
        pretrain_main.parse_config(["-c", path])
    assert "unknown key 'learning_rate'" in str(err.value)
    assert all(k in str(err.value) for k in ("lr", "data_path", "mask_ratio", "teacher_checkpoint"))


def test_a_key_set_twice_through_dash_and_underscore_is_refused(tmp_path):
    path = write(tmp_path / "c.yaml", "data-path: [a]\ndata_path: [b]\n")
    with pytest.raises(ConfigError, match="both set data_path"):
        pretrain_main.parse_config(["-c", path])


def test_required_flags_can_come_from_the_file(tmp_path, capsys):
    assert toy_parser().parse_args(["-c", write(tmp_path / "c.yaml", "out: from_file\n")]).out == "from_file"
    with pytest.raises(SystemExit) as exit_info:  # still required without the file
        toy_parser().parse_args([])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err


# ---- entry points: exit 2, one line, no traceback -----------------------------------------------------------
@pytest.mark.parametrize("name, text, message", [
    ("missing.yaml", None, "config file '{path}' does not exist"),
    ("bad.yaml", "lr: [1e-3\n", "is not valid YAML"),
    ("bad.toml", "lr = 1\n", "expected a YAML (.yaml, .yml, .json) or Python constants (.py) file"),
    ("bad.yaml", "student: vit_huge\nepochs: many\n", "epochs: 'many' is not a valid int for --epochs"),
])
def test_entry_point_reports_config_errors_with_exit_2(tmp_path, capsys, name, text, message):
    path = str(tmp_path / name) if text is None else write(tmp_path / name, text)
    assert pretrain_main.main(["-c", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain.main: error: ") and message.format(path=path) in err
    assert "Traceback" not in err


def test_every_entry_point_takes_config(tmp_path):
    from fine_grained import main as fine_grained_main
    from linear_eval import main as linear_main
    from tools import benchmark

    train, val = write_image_folder(tmp_path / "train", 1), write_image_folder(tmp_path / "val", 1)
    path = write(tmp_path / "eval.yaml", f"train_root: {train}\nval-root: {val}\noutput_dir: {tmp_path / 'o'}\n"
                                         f"lrs: [0.1, 1]\narch: vit_tiny\n")
    args = linear_main.parse_args(["-c", path, "--arch", "vit_base"])
    assert (args.train_root, args.val_root, args.lrs, args.arch) == (train, val, [0.1, 1.0], "vit_base")
    assert args.config_file == path and args.config_values["lrs"] == [0.1, 1.0]
    path = write(tmp_path / "fg.yaml", f"dataset: dtd\ndata_root: {tmp_path}\noutput_dir: {tmp_path / 'o'}\n"
                                       f"max_iter: 20\nmultiple: true\n")
    args = fine_grained_main.parse_args(["-c", path])
    assert (args.dataset, args.max_iter, args.multiple, args.config_file) == ("dtd", 20, True, path)
    path = write(tmp_path / "bench.yaml", "steps: 2\nstudent: vit_tiny\nno_sdpa: true\n")
    args = benchmark.parse_args(["-c", path, "--steps", "3"])
    assert (args.steps, args.student, args.no_sdpa, args.config_file) == (3, "vit_tiny", True, path)


# ---- Python constants: parsed, never run ---------------------------------------------------------------------
def test_python_constants_are_read_without_running_them(tmp_path):
    path = write(tmp_path / "run.py", '"""ViT-B from DINOv2-L."""\nTEACHER = "dinov2_vitl14"\nMASK_RATIO = (0.1, 0.5)\n'
                                      'LR: float = -1e-3\nPIN_MEM = False\n')
    assert read_config_file(path) == {"teacher": "dinov2_vitl14", "mask_ratio": (0.1, 0.5), "lr": -1e-3,
                                      "pin_mem": False}
    cfg = pretrain_main.parse_config(["-c", path])
    assert (cfg["teacher"], cfg["mask_ratio"], cfg["pin_mem"]) == ("dinov2_vitl14", [0.1, 0.5], False)


@pytest.mark.parametrize("payload", [
    "import os\nos.system('touch {marker}')\n",
    "TEACHER = __import__('os').system('touch {marker}')\n",
    "TEACHER = open('{marker}', 'w')\n",
    "exec(\"open('{marker}', 'w')\")\n",
    "def f():\n    open('{marker}', 'w')\nTEACHER = f()\n",
    "teacher = 'dinov2_vitl14'\n",  # not UPPER_CASE: refused too
])
def test_python_config_code_never_runs(tmp_path, payload):
    marker = tmp_path / "ran"
    path = write(tmp_path / "evil.py", payload.format(marker=marker))
    with pytest.raises(ConfigError, match="never run|must be a literal"):
        pretrain_main.parse_config(["-c", path])
    assert not marker.exists()


def test_missing_file_is_a_missing_file_error(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        read_config_file(str(tmp_path / "nope.yaml"))


# ---- configs/pretrain: the paper's runs -------------------------------------------------------------------------
@pytest.mark.parametrize("name, shown", [
    ("vit_small_dinov2.yaml", ["(default: 512)", "(default: output/proteus_small_dinov2)", "(default: vit_small)"]),
    ("vit_base_dinov2.yaml", ["(default: dinov2_vitl14)", "(default: vit_base)", "(default: 512)"]),
])
def test_help_shows_the_config_values_as_defaults(capsys, name, shown):
    with pytest.raises(SystemExit) as exit_info:  # python -m pretrain.main -c configs/pretrain/NAME --help
        pretrain_main.main(["-c", os.path.join(REPO, "configs", "pretrain", name), "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert all(s in text for s in shown), [s for s in shown if s not in text]
    assert "(default: output/pretrain)" not in text and "(default: 0)" in text  # a constant the file leaves alone
    assert f"Defaults from {os.path.join(REPO, 'configs', 'pretrain', name)}" in text


def test_the_paper_runs_are_all_there():
    names = {os.path.basename(p) for p in PRETRAIN_CONFIGS}
    assert {f"vit_{s}_dinov2.yaml" for s in ("tiny", "small", "base", "large")} <= names
    assert {"vit_base_synclr.yaml", "vit_base_clip.yaml", "vit_small_dinov2_single_image.yaml"} <= names
    assert any("classes" in n for n in names) and any("per_class" in n for n in names)


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=os.path.basename)
def test_pretrain_config_validates_and_repeats_no_default(tmp_path, path):
    values = read_config_file(path)  # unknown keys and bad values fail in the parse below
    data = write_image_folder(tmp_path / "data", 1)
    image = os.path.join(data, "n00000000", "0.JPEG")
    cfg = pretrain_main.parse_config(["-c", path, "--data-path", data] +
                                     (["--single-image", image] if "single_image" in values else []))
    pretrain_config.validate_config(cfg, pretrain_main.KNOBS, world_size=8)
    defaults = {k.name: k.default for k in pretrain_config.expand(pretrain_main.KNOBS)}
    repeated = {k: v for k, v in cfg["config_values"].items() if v == defaults[k]}
    assert not repeated, f"{path} repeats pretrain.main's defaults {repeated}"
    assert cfg["global_batch_size"] == 512 and cfg["output_dir"] != defaults["output_dir"]


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=os.path.basename)
def test_pretrain_config_header_gives_its_command_and_target(path):
    with open(path) as f:
        header = "".join(line[1:] for line in f.read().split("\n\n")[0].splitlines() if line.startswith("#"))
    rel = os.path.relpath(path, REPO)
    assert re.search(rf"-m pretrain\.main -c {re.escape(rel)}\b", header), f"{rel}: no command naming this file"
    # the paper's number it targets, or an explicit "none" for runs the paper does not have (modern teachers)
    assert re.search(r"Target: (ImageNet linear ~?\d+\.\d+ top-1, fine-grained mean ~?\d+\.\d+|none \()", header), rel


# ---- dense configs: each leaf takes its size from a backbone base ---------------------------------------------
SIZES = {"t14": ("vit_tiny", 192), "s14": ("vit_small", 384), "b14": ("vit_base", 768), "l14": ("vit_large", 1024)}
DENSE_LEAVES = sorted(p for task in ("segmentation", "depth")
                      for p in glob.glob(os.path.join(REPO, task, "configs", "*proteus-vit-*.py")))


@pytest.mark.parametrize("path", DENSE_LEAVES, ids=os.path.basename)
def test_dense_leaf_takes_the_size_of_its_name(path):
    from mmengine.config import Config

    size = re.search(r"proteus-vit-(\w\d\d)_", path).group(1)
    arch, width = SIZES[size]
    cfg = Config.fromfile(path, import_custom_modules=False).to_dict()
    assert "proteus_vit" not in cfg  # the size table is popped, not left in the resolved config
    backbone, head = cfg["model"]["backbone"], cfg["model"]["decode_head"]
    assert (backbone["arch"], backbone["checkpoint"]) == (arch, f"pretrained/proteus-vit-{size}.pth")
    assert backbone["out_indices"] == ([7, 11, 15, 23] if size == "l14" else [3, 5, 7, 11])
    assert head["in_channels"] == [width] * 4
    if "upernet" in path:
        assert (head["channels"], cfg["model"]["neck"]["embed_dim"]) == (width, width)
        assert cfg["model"]["auxiliary_head"]["in_channels"] == width
        assert backbone["drop_path_rate"] == (0.2 if size == "l14" else 0.1)
    if "dpt" in path:
        assert (head["embed_dims"], head["post_process_channels"]) == (width, [width // 8, width // 4, width // 2, width])
        assert (backbone.get("frozen", False), backbone["drop_path_rate"]) == ((True, 0.0) if "frozen" in path else (False, 0.1))


def test_model_flags_are_one_vocabulary_across_entry_points():
    from common.backbone_flags import resolve_backbone
    from fine_grained.main import get_args_parser as fine_grained_parser
    from linear_eval.main import get_args_parser as linear_eval_parser
    from pretrain.main import parse_config

    cfg = parse_config(["--arch", "timm:resnet18", "--model-kwargs", "depth=2", "--image-size", "112"])
    assert (cfg["student"], cfg["student_kwargs"], cfg["input_size"]) == ("timm:resnet18", "depth=2", 112)
    for parser, extra in ((linear_eval_parser(), ["--train-root", "a", "--val-root", "b", "--output-dir", "o"]),
                          (fine_grained_parser(), ["--dataset", "imagefolder", "--data-root", "a", "--output-dir", "o"])):
        a = parser.parse_args(extra + ["--student", "vit_tiny", "--student-kwargs", "depth=2,embed_dim=64",
                                       "--input-size", "56"])
        b = parser.parse_args(extra + ["--arch", "vit_tiny", "--model-kwargs", '{"depth": 2, "embed_dim": 64}',
                                       "--image-size", "56"])
        for args in (a, b):  # without a run, --student names the architecture (with one it picks a student)
            resolve_backbone(args, "probe")
        assert (a.arch, a.model_kwargs, a.image_size) == (b.arch, b.model_kwargs, b.image_size) == (
            "vit_tiny", {"depth": 2, "embed_dim": 64}, 56)
