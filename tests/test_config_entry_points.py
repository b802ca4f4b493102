"""flag > `-c` file > constant, for every knob of every entry point built on common/config.py (#19 item 3).

The entry points are found, not listed: every runnable module of the repository whose parser is a
ConfigArgumentParser (captured at its parse, so nothing runs).
For each of its options the test writes a config file setting it, and checks that the file's value replaces
the constant and that the flag on the command line replaces the file's value.
"""
import argparse
import importlib
import os

import pytest
import yaml

from common.config import FILE_DEST, ConfigArgumentParser, settable_actions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
