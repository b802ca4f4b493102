"""-c/--config FILE (common/config.py): precedence flag > file > constant, values through each flag's own type,
clear user errors, .py configs parsed and never run, the paper's configs/pretrain/ runs, and the dense configs'
per-size backbone bases."""
import argparse
import glob
import importlib
import json
import os
import re
import time

import pytest
import yaml

from common.config import FILE_DEST, ConfigArgumentParser, read_config_file, settable_actions
from common.errors import ConfigError, MissingFileError
from pretrain import config as pretrain_config
from pretrain import main as pretrain_main
from tests.pretrain.helpers import PYTHON, REPO, read_log, teacher_ckpt, tiny_args, tiny_data, write_image_folder  # noqa: F401
from tests.pretrain.helpers_hostile_inputs import one_message, run  # noqa: F401

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


@pytest.mark.slow
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


@pytest.mark.slow
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


SKIP_DIRS = {".venv", "tests", ".git", "shared", "data", "output", "runs"}


FACTORY_NAMES = ("build_parser", "get_args_parser", "parse_config", "parse_args")


class _Built(Exception):
    def __init__(self, parser):
        self.parser = parser


def candidate_modules() -> list[str]:
    """Dotted names of the repository's runnable modules (a __main__ guard) that build a parser."""
    out = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            if '__name__ == "__main__"' in text and ("ConfigArgumentParser" in text or "build_parser(" in text):
                out.append(os.path.relpath(path, REPO)[:-3].replace(os.sep, "."))
    return out


def parser_factory(module_name: str):
    """A function returning a fresh parser of the module (a config file changes a parser's defaults), or None
    when the module's parser is not a ConfigArgumentParser."""
    module = importlib.import_module(module_name)

    def capture(func):
        """The parser `func([])` parses with: stopped at its parse, so nothing runs."""
        original = ConfigArgumentParser.parse_known_args

        def stop(self, *a, **k):
            raise _Built(self)

        ConfigArgumentParser.parse_known_args = stop
        try:
            func([])
        except _Built as built:
            return built.parser
        except (Exception, SystemExit):  # noqa: BLE001 - a plain argparse parser (or another signature)
            return None
        finally:
            ConfigArgumentParser.parse_known_args = original
        return None

    for name in FACTORY_NAMES:
        func = getattr(module, name, None)
        if not callable(func):
            continue
        if name in ("build_parser", "get_args_parser"):
            try:
                parser = func()
            except TypeError:  # takes arguments: not a zero-argument builder
                continue
            factory = func
        else:
            parser = capture(func)
            factory = lambda func=func: capture(func)  # noqa: E731
        return factory if isinstance(parser, ConfigArgumentParser) else None
    return None


def entry_points() -> dict:
    """{module: parser factory} for every runnable module whose parser is a ConfigArgumentParser."""
    out = {}
    for name in candidate_modules():
        factory = parser_factory(name)
        if factory is not None:
            out[name] = factory
    return out


# ---- values: two different valid values per option, as command-line text ---------------------------------
CANDIDATES = ["7", "5", "3", "0.25", "0.5", "alpha", "beta", "depth=2", "depth=3", "vit_tiny", "vit_base",
              "dinov2_vits14", "dinov2_vitl14", '{"depth": 2}', "1e-3"]


def convert(action, text):
    out = (action.type or str)(text)
    if action.choices is not None and out not in action.choices:
        raise ValueError(text)
    return out


def two_values(action, tmp_path) -> tuple[str, str]:
    """(file text, flag text): valid, different from each other and from the constant."""
    default = action.default[0] if isinstance(action.default, list) and action.default else action.default
    if action.choices is not None:
        texts = [str(c) for c in action.choices]
    else:
        texts = [str(tmp_path / "some_file"), str(tmp_path)] + CANDIDATES if action.type is None else CANDIDATES
        if action.type is int:
            texts = [str((default or 0) + d) for d in (3, 5)]
        elif action.type is float:
            texts = [repr(float(default or 0) + d) for d in (0.25, 0.5)]
    picked, seen = [], []
    for text in texts:
        try:
            value = convert(action, text)
        except Exception:  # noqa: BLE001 - a type function refusing the candidate, however it says so
            continue
        if value == default or value in seen:
            continue
        picked.append(text)
        seen.append(value)
        if len(picked) == 2:
            return picked[0], picked[1]
    if len(picked) == 1 and action.choices is not None:  # two choices: the flag gives the constant back
        return picked[0], str(default)
    raise AssertionError(f"no two valid values found for {action.option_strings}")


def yaml_value(action, text):
    return [text] if action.nargs in ("+", "*") or isinstance(action.nargs, int) else text


def parsed(action, texts):
    values = [convert(action, t) for t in texts]
    return values if action.nargs in ("+", "*") or isinstance(action.nargs, int) else values[0]


def required_argv(parser, skip, tmp_path) -> list[str]:
    out = []
    for a in parser._actions:
        if a.required and a.option_strings and a is not skip:
            out += [a.option_strings[0], *([two_values(a, tmp_path)[0]] if a.nargs != 0 else [])]
    return out


def knobs(parser) -> list:
    """Every option a config file may set, by its first long flag (each action once)."""
    seen, out = set(), []
    for key, action in settable_actions(parser).items():
        if id(action) not in seen and "--" + key.replace("_", "-") in action.option_strings:
            seen.add(id(action))
            out.append((key, action))
    return out


def check_knob(factory, key: str, index: int, tmp_path) -> str | None:
    """flag > file > constant for the index-th knob; None if it holds, else what went wrong."""
    parser = factory()
    _, action = knobs(parser)[index]
    flag = next(o for o in action.option_strings if o.startswith("--"))
    base = required_argv(parser, action, tmp_path)
    constant = None if action.required else getattr(parser.parse_args(base), action.dest)
    cfg = tmp_path / f"{key}.yaml"
    if isinstance(action, argparse.BooleanOptionalAction):
        file_value, flag_argv, flag_value = (not action.default), [flag if action.default else
                                                                    "--no-" + flag[2:]], bool(action.default)
    elif isinstance(action, argparse._StoreConstAction):  # store_true / store_const: the flag turns it on
        file_value, flag_argv, flag_value = False, [flag], action.const
    else:
        file_text, flag_text = two_values(action, tmp_path)
        file_value, flag_argv = yaml_value(action, file_text), [flag, flag_text]
        flag_value = parsed(action, [flag_text])
    cfg.write_text(yaml.safe_dump({key: file_value}))
    from_file = getattr(factory().parse_args(["-c", str(cfg)] + base), action.dest)
    expected_file = (file_value if isinstance(action, (argparse.BooleanOptionalAction,)) else
                     (action.const if file_value else action.default)
                     if isinstance(action, argparse._StoreConstAction) else
                     parsed(action, file_value if isinstance(file_value, list) else [file_value]))
    from_flag = getattr(factory().parse_args(["-c", str(cfg)] + base + flag_argv), action.dest)
    problems = []
    if from_file != expected_file:
        problems.append(f"file gave {from_file!r}, expected {expected_file!r}")
    if from_flag != flag_value:
        problems.append(f"flag {' '.join(flag_argv)} gave {from_flag!r} over the file's {file_value!r}")
    if not action.required and constant != factory().get_default(action.dest):
        problems.append(f"without flag or file: {constant!r}, the constant is {action.default!r}")
    return "; ".join(problems) or None


ENTRY_POINTS = entry_points()


def test_entry_points_are_found():
    assert {"pretrain.main", "linear_eval.main", "fine_grained.main"} <= set(ENTRY_POINTS), sorted(ENTRY_POINTS)
    assert any(m.endswith("benchmark") for m in ENTRY_POINTS), sorted(ENTRY_POINTS)


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_flag_beats_file_beats_constant_for_every_knob(module, tmp_path):
    factory = ENTRY_POINTS[module]
    parser = factory()
    assert isinstance(parser, ConfigArgumentParser)
    names = knobs(parser)
    assert len(names) >= 5, module
    failures = {}
    for i, (key, action) in enumerate(names):
        problem = check_knob(factory, key, i, tmp_path)
        if problem:
            failures[key] = problem
    assert not failures, f"{module}: " + "\n".join(f"{k}: {v}" for k, v in failures.items())
    assert all(a.dest != FILE_DEST for _, a in names)


# ==============================================================================================================
# 5. Every value is validated before work starts
# ==============================================================================================================
@pytest.mark.slow
@pytest.mark.parametrize("module,argv,needle", [
    ("demo.run", ["--time-budget", "inf"], "--time-budget must be a finite number"),
    ("demo.run", ["--time-budget", "nan"], "--time-budget must be a finite number"),
    ("demo.run", ["--lr=-inf"], "--lr must be a finite number"),
    ("demo.run", ["--num-workers", "-1"], "--num-workers must be >= 0"),
    ("demo.run", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("demo.run", ["--epochs", "1", "--warmup-epochs", "3"], "--warmup-epochs 3 is more than --epochs 1"),
    ("linear_eval.main", ["--holdout-fraction", "nan"], "--holdout-fraction must be a finite number"),
    ("pretrain.main", ["--lr", "inf"], "--lr must be a finite number"),
])
def test_non_finite_and_late_failing_values_are_refused_up_front(tmp_path, module, argv, needle):
    out = tmp_path / "out"
    rc, _, err = run(module, ["--output-dir", str(out), *argv], timeout=120)
    one_message(rc, err, needle)
    assert not out.exists()


@pytest.mark.slow
def test_a_config_file_cannot_smuggle_in_a_non_finite_value(tmp_path, tiny_data, teacher_ckpt):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: .inf\n")
    rc, _, err = run("pretrain.main", ["-c", str(cfg), "--output-dir", str(tmp_path / "o")], timeout=120)
    one_message(rc, err, "must be a finite number")


# ==============================================================================================================
# 6. Parsing is bounded
# ==============================================================================================================
@pytest.mark.slow
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("\n".join(lines) + "\n")  # ~500 bytes, 9^9 strings once expanded
    t0 = time.time()
    rc, _, err = run("pretrain.main", ["-c", str(cfg)], timeout=60)
    one_message(rc, err, "YAML aliases (*a) are not allowed")
    assert time.time() - t0 < 60
