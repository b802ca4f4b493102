"""`-c/--config FILE` for every entry point: a file of flag values applied over the constants, under the flags.

    parser = ConfigArgumentParser("pretrain.main", ...)   # a drop-in argparse.ArgumentParser
    args = parser.parse_args(argv)                          # flag > config file > constant

The file is YAML (`.yaml`, `.yml`, `.json`) or Python constants (`.py`), one key per flag:

    teacher: dinov2_vitl14        # or `teacher-checkpoint`: dashes and underscores are the same key
    mask_ratio: [0.1, 0.5]        # a list for a flag that takes several values
                                  # a .py file: TEACHER = "dinov2_vitl14" (UPPER_CASE = literal, nothing else)

Each value goes through the flag's own type and choices, as if typed on the command line, and becomes
that flag's default, so `--help` shows it and an explicit flag still wins. An unknown key, a value the
flag refuses, or an unreadable file is a ConfigError (a missing file a MissingFileError): exit 2 before
any work. A `.py` config is parsed, never run. The parsed namespace records the file (`config_file`,
absolute; "" without one) and the values it set (`config_values`), so config.json names both.
"""
import argparse
import ast
import difflib
import json
import math
import os
import sys

import yaml

from common.errors import ConfigError, MissingFileError, UserError

__all__ = ["ConfigArgumentParser", "read_config_file", "apply_config", "config_drift", "CheckedArgumentParser"]

FILE_DEST, VALUES_DEST = "config_file", "config_values"
YAML_SUFFIXES, PY_SUFFIXES = (".yaml", ".yml", ".json"), (".py",)  # JSON is YAML
YAML_BOOL_HINT = "YAML reads yes/no/on/off/true/false as booleans: quote the value ('on') if you mean the word"


class CheckedArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose float values must be finite (check_finite): the base of every entry point's
    parser, with or without -c."""

    def _get_value(self, action, arg_string):
        value = super()._get_value(action, arg_string)
        check_finite(value, flag_of(action) if action.option_strings else action.dest, arg_string)
        return value


class ConfigArgumentParser(CheckedArgumentParser):
    """argparse.ArgumentParser with `-c/--config FILE`, whose values become the defaults before parsing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("-c", "--config", dest=FILE_DEST, default="", metavar="FILE",
                          help="YAML (or Python constants) file of flag values: flag > file > built-in default")

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        path = self._config_path(args)
        values = apply_config(self, path) if path else {}
        namespace, extras = super().parse_known_args(args, namespace)
        setattr(namespace, FILE_DEST, os.path.abspath(path) if path else "")
        setattr(namespace, VALUES_DEST, values)
        return namespace, extras

    def _config_path(self, args: list) -> str:
        """-c's value, read by a parser that knows only -c (so --help and missing required flags wait for the
        real parse, which then shows the file's values as defaults). A malformed -c is left to that parse."""
        first = argparse.ArgumentParser(prog=self.prog, add_help=False, allow_abbrev=self.allow_abbrev,
                                        exit_on_error=False)
        first.add_argument("-c", "--config", dest=FILE_DEST, default="")
        try:
            known, _ = first.parse_known_args(args)
        except argparse.ArgumentError:
            return ""
        return getattr(known, FILE_DEST)


def apply_config(parser: argparse.ArgumentParser, path: str) -> dict:
    """Set the values of config file `path` as `parser`'s defaults; returns them as {dest: value}."""
    raw = read_config_file(path)
    actions = settable_actions(parser)
    chosen = {}  # dest -> (key, action, value)
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in actions:
            raise ConfigError(unknown_key_message(path, key, actions))
        action = actions[name]
        if action.dest in chosen:
            raise ConfigError(f"config {path}: {chosen[action.dest][0]!r} and {key!r} both set {action.dest}; keep one")
        chosen[action.dest] = (key, action, value)
    values = {dest: convert(action, key, value, path) for dest, (key, action, value) in chosen.items()}
    parser.set_defaults(**values)
    for key, action, _ in chosen.values():
        action.required = False  # the file gave it
    if values:
        parser.epilog = "\n".join(filter(None, [parser.epilog, f"Defaults from {os.path.abspath(path)}: "
                                                              f"{', '.join(values)}."]))
    return values


def settable_actions(parser: argparse.ArgumentParser) -> dict:
    """{key: action} for every option a config file may set: each long flag (--data-path -> data_path, not the
    --no- half of --x/--no-x) and each dest. A flag's own name wins over another flag's dest."""
    out = {}
    options = [a for a in parser._actions if a.option_strings and a.dest not in (FILE_DEST, "help")]
    for action in options:
        for opt in action.option_strings:
            negative = isinstance(action, argparse.BooleanOptionalAction) and opt.startswith("--no-")
            if opt.startswith("--") and not negative:
                out.setdefault(opt[2:].replace("-", "_"), action)
    for action in options:
        out.setdefault(action.dest, action)
    return out


def unknown_key_message(path: str, key: str, actions: dict) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), list(actions), n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return (f"config {path}: unknown key {key!r}.{hint} Valid keys (the flags of this command, dashes or "
            f"underscores): {', '.join(sorted(actions))}")


def check_finite(value, flag: str, given) -> None:
    """Every float value of every flag, from the command line or a config file: inf and nan are refused where
    they are given, not deep in the run where they break a plan, a schedule or a loss."""
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{flag} must be a finite number, got {given}")


# ---- values: through the flag's own type and choices ------------------------------------------------------
def convert(action: argparse.Action, key: str, value, path: str):
    """`value` (from YAML or a Python literal) as the flag would have parsed it from the command line."""
    where = f"config {path}: {key}"
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreConstAction)):  # store_true too
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: takes true or false (the flag {flag_of(action)}), got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return value
        return action.const if value else action.default  # true: as if the flag were given
    if type(action) is not argparse._StoreAction:
        raise ConfigError(f"{where}: {flag_of(action)} cannot be set from a config file (it is not a plain value "
                          f"flag); give it on the command line")
    nargs = action.nargs
    if nargs in (None, argparse.OPTIONAL):
        return scalar(action, value, where)
    if nargs not in (argparse.ONE_OR_MORE, argparse.ZERO_OR_MORE) and not isinstance(nargs, int):
        raise ConfigError(f"{where}: {flag_of(action)} cannot be set from a config file")
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if (nargs == argparse.ONE_OR_MORE and not items) or (isinstance(nargs, int) and len(items) != nargs):
        want = "at least one value" if nargs == argparse.ONE_OR_MORE else f"{nargs} values"
        raise ConfigError(f"{where}: takes {want} (a YAML list such as [0.1, 0.5]), got {value!r}")
    return [scalar(action, v, f"{where}[{i}]") for i, v in enumerate(items)]


def scalar(action: argparse.Action, value, where: str):
    """One value: the text the command line would have carried, through action.type, then action.choices."""
    if value is None:
        if action.default is None:
            return None
        raise ConfigError(f"{where}: null is not a value of {flag_of(action)} (default "
                          f"{action.default!r}); drop the key to keep the default")
    func = action.type or str
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r} is a boolean, but {flag_of(action)} takes "
                          f"{type_name(action)}. {YAML_BOOL_HINT}")
    if isinstance(value, (list, tuple, dict)):
        if func is str:
            raise ConfigError(f"{where}: {flag_of(action)} takes one value, got {value!r} (a "
                              f"comma-separated list is one string: 'a,b')")
        text = json.dumps(value)  # structured flags (--model-kwargs) parse JSON text
    elif isinstance(value, (str, int, float)):
        text = value if isinstance(value, str) else repr(value)
    else:  # a YAML date, Python bytes, ...
        raise ConfigError(f"{where}: expected a number or a string for {flag_of(action)}, got "
                          f"{type(value).__name__} {value!r}")
    if not callable(func):
        raise ConfigError(f"{where}: {flag_of(action)} has no callable type; give it on the command line")
    try:
        out = func(text)
    except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {value!r} is not a valid {type_name(action)} for {flag_of(action)} "
                          f"({e})") from e
    if action.choices is not None and out not in action.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    check_finite(out, f"{where}: {flag_of(action)}", value)
    return out


def type_name(action: argparse.Action) -> str:
    name = getattr(action.type, "__name__", "value") if action.type else "str"
    return "value" if name == "<lambda>" else name


def flag_of(action: argparse.Action) -> str:
    return next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])


# ---- files: YAML, or Python constants read without running them --------------------------------------------
def read_config_file(path: str) -> dict:
    """{key: value} of a config file; MissingFileError / ConfigError saying what is wrong and where."""
    if not os.path.exists(path):
        raise MissingFileError(f"config file {path!r} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in YAML_SUFFIXES + PY_SUFFIXES:
        raise ConfigError(f"config file {path!r}: expected a YAML (.yaml, .yml, .json) or Python constants (.py) "
                          f"file, got {suffix or 'no suffix'!r}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path!r} cannot be read: {e}") from e
    return read_yaml(text, path) if suffix in YAML_SUFFIXES else read_py_constants(text, path)


def read_yaml(text: str, path: str) -> dict:
    class UniqueKeyLoader(yaml.SafeLoader):
        """SafeLoader that refuses a key given twice (PyYAML would keep the last one silently)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

        def compose_node(self, parent, index):
            """Aliases are refused: nested anchors/aliases expand exponentially (a 1 kB file, gigabytes)."""
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise AliasRefused(f"config file {path!r} line {event.start_mark.line + 1}: YAML aliases (*"
                                   f"{event.anchor}) are not allowed in configs; write the value out")
            return super().compose_node(parent, index)

    class AliasRefused(yaml.YAMLError):
        pass

    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass: no Python objects
    except AliasRefused as e:
        raise ConfigError(str(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"config file {path!r}: expected a mapping of flag names to values (key: value lines), "
                          f"got {type(data).__name__}")
    return data


def read_py_constants(text: str, path: str) -> dict:
    """UPPER_CASE = literal assignments (and a docstring); anything else is refused, nothing is executed."""
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as e:
        raise ConfigError(f"config file {path!r} line {e.lineno}: not valid Python ({e.msg})") from e
    out = {}
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # module docstring
        target = assigned_name(node)
        if target is None or target.id != target.id.upper():
            raise ConfigError(f"config file {path!r} line {node.lineno}: only UPPER_CASE = literal assignments "
                              f"are allowed (the file is parsed, never run)")
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, SyntaxError, TypeError) as e:
            raise ConfigError(f"config file {path!r} line {node.lineno}: {target.id} must be a literal (number, "
                              f"string, True/False/None, list or dict of those), not an expression") from e
        key = target.id.lower()
        if key in out:
            raise ConfigError(f"config file {path!r} line {node.lineno}: {target.id} is given twice")
        out[key] = value
    return out


def assigned_name(node: ast.stmt) -> ast.Name | None:
    """The name of `NAME = value` / `NAME: type = value`; None for any other statement."""
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = node.targets[0]
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        target = node.target
    else:
        return None
    return target if isinstance(target, ast.Name) else None


def size_kwargs(text: str) -> dict:
    """argparse type of --model-kwargs / --student-kwargs: 'depth=2,embed_dim=64' or JSON, one vocabulary.

    A bad value raises the plain UserError, which argparse does not catch: the entry point's boundary
    prints it as `prog: error: ...` like every other user error (exit 2)."""
    import models

    try:
        return models.parse_size_kwargs(text, "--model-kwargs", ints_only=False)
    except ValueError as e:
        raise UserError(str(e)) from None


def config_drift(old: dict, new: dict, keys, default=None, normalise=None) -> dict:
    """{key: (old, new)} for each of `keys` whose value differs between a checkpoint's record (`old`) and this
    run (`new`): what every resumable entry point compares before it refuses a changed configuration.

    default(key): the value of a key `old` does not record; normalise(key, value): the comparable form
    (e.g. absolute paths)."""
    out = {}
    for k in keys:
        a, b = old.get(k, default(k) if default else None), new.get(k)
        if normalise is not None:
            a, b = normalise(k, a), normalise(k, b)
        if a != b:
            out[k] = (a, b)
    return out
