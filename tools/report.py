"""Gather run dirs into the README's results table, the fine-grained table and plots.

    python -m tools.report RUN_DIR... [--output DIR]      # default DIR: the first RUN_DIR's report/

Every RUN_DIR is searched recursively for what the tools write, read as each tool writes it:
- pretrain `log.txt` (MetricLogger JSON lines with "step"; losses "train/loss" and
  "train/<teacher>/<objective>") -> a loss-curve PNG per run;
- linear_eval `results.json` ("mode": "linear" -> "top1" of the selected head; "knn" -> "k<k>": {"top1"});
- fine_grained `results.json` ("dataset", "metric", "test_score" in percent);
- segmentation / depth `test_metrics.json` ("metrics": {"mIoU": ...} / {"rmse": ...});
- the demo's `results.json` ("random_init" / "distilled" / "teacher" in percent, a "transfer" block).
Which tool wrote a dir is its config.json "tool" (common.rundir.run_dir_owner). The evaluations write into
the pretraining run (RUN/eval/...), so `report RUN` shows every number of that run; beside them, a "paper
target" row per student size of the runs read (the released Proteus models: PAPER_TARGETS).

A model (a table row) is one evaluated checkpoint file (with its EMA flag), or, for the random-init
baseline, one architecture; a dense run's model is its `model.backbone.checkpoint` option. When two files
give the same cell, the newer one is shown and the older is listed under "Sources".
Writes DIR/report.md and DIR/*.png.
"""
import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

from common.config import CheckedArgumentParser
from common.errors import ConfigError, MissingFileError, cli
from common.log import read_json, write_text
from common.rundir import run_dir_owner
from fine_grained.datasets import PAPER_DATASETS as PAPER_FINE_GRAINED
from pretrain.losses import OBJECTIVES

# PAPER_FINE_GRAINED: the paper's 12 fine-grained datasets, the mean of which is its "Fine-grained" column.
# OBJECTIVES: the loss names a pretrain log.txt holds ("train/<teacher>/<objective>").
OBJ_LABEL = {"token": "token (CLS)", "fea": "feature (all tokens)", "patch": "patch (masked tokens)"}  # else the name
DEMO_MODELS = {"random_init": "random-init student", "distilled": "distilled student", "teacher": "teacher"}
DENSE = {"segmentation": ("ADE20K mIoU", "mIoU"), "depth": ("NYU RMSE", "rmse")}  # tool: (column, metric key)
LINEAR = "ImageNet linear top-1"
# The paper's released Proteus models (distilled from DINOv2; README table, paper Tables 1-7): the target a run
# of that student size is shown beside. ADE20K: UperNet fine-tune mIoU; NYU: DPT fine-tune RMSE.
PAPER_TARGETS = {"vit_tiny": (75.2, 80.2, 40.7, 0.423), "vit_small": (81.8, 85.8, 50.0, 0.350),
                 "vit_base": (84.9, 88.6, 54.4, 0.303), "vit_large": (86.2, 91.0, 57.7, 0.240)}
SKIP_DIRS = {"tensorboard", "__pycache__"}
LOOKED_FOR = ("pretrain log.txt (config.json \"tool\": \"pretrain\"), linear_eval and fine_grained results.json, "
              "segmentation / depth test_metrics.json, the demo's results.json (random_init / distilled / teacher)")


@dataclass
class Cell:
    value: float
    path: str
    mtime: float


@dataclass
class LossRun:
    """One pretrain run's logged losses: total [(step, value)] and {(teacher, objective): [(step, value)]}."""
    name: str
    path: str
    total: list
    series: dict
    bad_lines: int = 0


@dataclass
class Found:
    cells: dict = field(default_factory=dict)  # model key -> {column: Cell}
    labels: dict = field(default_factory=dict)  # model key -> label
    metrics: dict = field(default_factory=dict)  # fine-grained dataset -> metric name
    runs: list = field(default_factory=list)  # LossRun
    demos: list = field(default_factory=list)  # (path, {dataset: {model: percent}})
    sources: list = field(default_factory=list)  # (path, what)
    skipped: list = field(default_factory=list)  # (path, why)
    targets: list = field(default_factory=list)  # student archs of the pretrain runs read (paper targets shown)


# ==========================================================================================================
# Reading run dirs
# ==========================================================================================================
def scan(run_dirs: list) -> Found:
    """Everything recognisable under each run dir; MissingFileError for a dir with nothing to report."""
    found = Found()
    for root in run_dirs:
        if not os.path.isdir(root):
            raise MissingFileError(f"run dir {root} does not exist or is not a directory")
        before = len(found.sources)
        for path in walk(root):
            read_dir(path, found)
        if len(found.sources) == before:
            skipped = "".join(f"; skipped {p} ({why})" for p, why in found.skipped if _under(p, root))
            raise MissingFileError(f"nothing to report under {root}: looked (recursively) for {LOOKED_FOR}"
                                   f"{skipped}. Pass a run dir written by one of these tools")
    return found


def walk(root: str):
    """Dirs under root (root included) that hold a file some tool writes; not TensorBoard or hidden dirs."""
    for path, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        if {"results.json", "log.txt", "test_metrics.json"} & set(files):
            yield path


def read_dir(path: str, found: Found) -> None:
    tool = run_dir_owner(path)
    config = read_json(os.path.join(path, "config.json")) if tool else None
    config = config if isinstance(config, dict) else {}
    if tool == "pretrain":
        archs = [s.get("arch") for s in config.get("students") or [] if isinstance(s, dict)] or \
            str(config.get("student", "")).split(",")
        found.targets += [a for a in archs if a in PAPER_TARGETS and a not in found.targets]
    for name, reader in (("results.json", read_results), ("test_metrics.json", read_dense),
                         ("log.txt", read_log)):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            reader(file, tool, config, found)


def read_results(path: str, tool: str | None, config: dict, found: Found) -> None:
    r = read_json(path)
    if not isinstance(r, dict):
        found.skipped.append((path, "not a JSON object" if r is not None else "unreadable JSON"))
    elif is_demo(r):
        found.demos.append((path, demo_scores(r)))
        found.sources.append((path, "demo results"))
    elif tool == "linear_eval" or (tool is None and r.get("mode") in ("linear", "knn")):
        read_linear(path, r, config, found)
    elif tool == "fine_grained" or (tool is None and {"dataset", "metric", "test_score"} <= set(r)):
        read_fine_grained(path, r, config, found)
    else:
        found.skipped.append((path, f"a results.json of {tool or 'no known tool'}"))


def read_linear(path: str, r: dict, config: dict, found: Found) -> None:
    model = eval_model(r, config, found)
    if r.get("mode") == "knn":
        scores = {f"kNN top-1 ({k[1:]}-NN)": v["top1"] for k, v in r.items()
                  if re.fullmatch(r"k\d+", k) and isinstance(v, dict) and _is_number(v.get("top1"))}
    else:
        scores = {LINEAR: r["top1"]} if _is_number(r.get("top1")) else {}
    if model is None or not scores:
        found.skipped.append((path, "linear_eval results without pretrained/arch or top-1"))
        return
    for column, value in scores.items():
        put(found, model, column, value, path)
    found.sources.append((path, f"linear_eval {r.get('mode', 'linear')} -> {found.labels[model]}"))


def read_fine_grained(path: str, r: dict, config: dict, found: Found) -> None:
    model = eval_model(r, config, found)
    if model is None or not _is_number(r.get("test_score")) or not isinstance(r.get("dataset"), str):
        found.skipped.append((path, "fine_grained results without pretrained/arch or test_score"))
        return
    dataset = r["dataset"]
    if dataset == "imagefolder" and config.get("data_root"):  # several imagefolder sets: named by their folder
        dataset = os.path.basename(os.path.normpath(config["data_root"]))
        dataset = f"imagefolder:{dataset}" if dataset in PAPER_FINE_GRAINED else dataset
    found.metrics[dataset] = r.get("metric", "?")
    put(found, model, f"fg:{dataset}", r["test_score"], path)
    found.sources.append((path, f"fine_grained {dataset} -> {found.labels[model]}"))


def read_dense(path: str, tool: str | None, config: dict, found: Found) -> None:
    r = read_json(path)
    metrics = r.get("metrics") if isinstance(r, dict) else None
    if not isinstance(metrics, dict):
        found.skipped.append((path, "no \"metrics\" object"))
        return
    if tool not in DENSE:  # a work dir without its marker: the metric names say which task it was
        tool = "segmentation" if "mIoU" in metrics else "depth" if "rmse" in metrics else None
    column, key = DENSE.get(tool, (None, None))
    if key not in metrics:
        found.skipped.append((path, f"metrics {sorted(metrics)} hold neither mIoU nor rmse"))
        return
    model = dense_model(config, r.get("config", ""), found, r.get("backbone"))
    put(found, model, column, metrics[key], path)
    found.sources.append((path, f"{tool} {key} -> {found.labels[model]}"))


def read_log(path: str, tool: str | None, config: dict, found: Found) -> None:
    rows, bad = read_jsonl(path)
    if tool not in ("pretrain", None):
        return  # linear_eval's log.txt: its results.json says what counts
    run_dir = os.path.dirname(path)
    students = [s.get("key") for s in config.get("students") or [] if isinstance(s, dict)]
    if len(students) > 1:  # one run, several students: their keys prefix every logged value
        for key, arch in zip(students, (s.get("arch", "?") for s in config["students"])):
            own = [{"step": r["step"], **{f"train/{k[len(f'train/{key}/'):]}": v for k, v in r.items()
                                          if k.startswith(f"train/{key}/")}} for r in rows]
            add_loss_run(found, path, own, bad, tool,
                         f"{pretrain_label(run_dir, {**config, 'student': arch})} [{key}]")
        return
    add_loss_run(found, path, rows, bad, tool, pretrain_label(run_dir, config))


def add_loss_run(found: Found, path: str, rows: list, bad: int, tool: str | None, name: str) -> None:
    total, series = loss_series(rows)
    if not series and not (tool == "pretrain" and total):
        if tool == "pretrain":
            found.skipped.append((path, f"no training step logged ({name})"))
        return
    found.runs.append(LossRun(name, os.path.dirname(path), total, series, bad))
    found.sources.append((path, f"pretrain losses of {name}, {len(total)} logged steps"
                                + (f", {bad} unreadable lines skipped" if bad else "")))


def read_jsonl(path: str) -> tuple[list, int]:
    """Rows of a JSON-lines file and the count of unreadable lines (a run killed mid-write leaves half a line)."""
    rows, bad = [], 0
    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict) and _is_number(row.get("step")):
                rows.append(row)
    return rows, bad


def loss_series(rows: list) -> tuple[list, dict]:
    """(total, {(teacher, objective): points}) from the per-step "train/" rows, one point per step.

    A resumed run logs again the steps after its last checkpoint: the later rows are the run that continued.
    """
    by_step = {int(r["step"]): r for r in rows if _is_number(r.get("train/loss"))}
    total, series = [], {}
    for step in sorted(by_step):
        row = by_step[step]
        total.append((step, row["train/loss"]))
        for key, value in row.items():
            name = loss_name(key)
            if name and _is_number(value):
                series.setdefault(name, []).append((step, value))
    return total, series


def loss_name(key: str) -> tuple[str, str] | None:
    """(teacher, objective) of a log key "train/<teacher>/<objective>"."""
    if key.startswith("train/") and key.count("/") >= 2:
        teacher, objective = key[len("train/"):].rsplit("/", 1)
        if objective in OBJECTIVES:
            return teacher, objective
    return None


# ---- models: what a row is ------------------------------------------------------------------------------
def eval_model(r: dict, config: dict, found: Found):
    """The model key of a linear_eval / fine_grained result (its results.json, else its config.json)."""
    pretrained = r.get("pretrained", config.get("pretrained"))
    arch = r.get("arch", config.get("arch"))
    if not isinstance(pretrained, str) or not isinstance(arch, str):
        return None
    if pretrained == "none":
        kwargs = config.get("model_kwargs") or {}
        return model_key(found, ("random", arch, json.dumps(kwargs, sort_keys=True)), f"{arch}, random init")
    return checkpoint_model(found, pretrained, bool(r.get("ema", config.get("ema", False))),
                            r.get("student") or config.get("student"))


def dense_model(config: dict, config_file: str, found: Found, backbone: dict | None = None):
    """A dense run's model: the backbone its launcher recorded (test_metrics.json / config.json "backbone"),
    else the checkpoint passed on the command line, else its config file."""
    for known in (backbone, config.get("backbone")):
        if isinstance(known, dict) and isinstance(known.get("checkpoint"), str):
            return checkpoint_model(found, known["checkpoint"], bool(known.get("ema")), known.get("student"))
    options = config.get("cfg_options") or {}
    for key in ("model.backbone.checkpoint", "model.backbone.checkpoint_path"):
        if isinstance(options.get(key), str) and options[key] not in ("", "none", "None"):
            return checkpoint_model(found, options[key], False)
    stem = os.path.splitext(os.path.basename(config.get("config") or config_file or "unknown"))[0]
    return model_key(found, ("config", stem), f"{stem} (backbone as in its config)")


def checkpoint_model(found: Found, checkpoint: str, ema: bool, student: str | None = None):
    """Keyed by the real path (the same file reached by two relative paths is one model) and, in a
    several-student checkpoint, the student's key."""
    path = os.path.realpath(os.path.expanduser(checkpoint))
    key = ("checkpoint", path, ema) + ((student,) if student else ())
    if key in found.labels:
        return key
    run_dir = os.path.dirname(path)
    config = read_json(os.path.join(run_dir, "config.json")) if run_dir_owner(run_dir) == "pretrain" else None
    ema_tag = " EMA" if ema or "_ema" in os.path.basename(path) else ""
    if isinstance(config, dict) and student:
        arch = next((s.get("arch") for s in config.get("students") or [] if isinstance(s, dict)
                     and s.get("key") == student), student)
        step = f" step {config_step(path)}" if os.path.basename(path).startswith("checkpoint") else ""
        label = f"{pretrain_label(run_dir, {**config, 'student': arch})} [{student}{step}]{ema_tag}"
    elif isinstance(config, dict):
        label = pretrain_label(run_dir, config) + ema_tag
    else:
        label = os.path.join(os.path.basename(run_dir), os.path.basename(path)) + ema_tag
    return model_key(found, key, label)


def config_step(path: str):
    from models.run import checkpoint_step  # reads global_step only (mmap)

    return checkpoint_step(path)


def pretrain_label(run_dir: str, config: dict) -> str:
    teachers = " + ".join(str(config.get("teacher", "?")).split(","))
    return f"{os.path.basename(os.path.normpath(run_dir))}: {config.get('student', '?')} ← {teachers}"


def model_key(found: Found, key: tuple, label: str) -> tuple:
    """Register `key`; a label another model already has gets the key's detail appended, so rows differ."""
    if key not in found.labels:
        taken = set(found.labels.values())
        found.labels[key] = label if label not in taken else f"{label} [{' '.join(map(str, key[1:]))}]"
    return key


def put(found: Found, model: tuple, column: str, value, path: str) -> None:
    """One table cell; of two files for the same cell the newer is shown, the older listed as not used."""
    new = Cell(float(value), path, os.path.getmtime(path))
    row = found.cells.setdefault(model, {})
    old = row.get(column)
    if old is not None:
        new, dropped = (new, old) if new.mtime >= old.mtime else (old, new)
        found.skipped.append((dropped.path, f"older than {new.path} for {found.labels[model]} / {column}"))
    row[column] = new


# ---- the demo's results.json ----------------------------------------------------------------------------
def is_demo(r: dict) -> bool:
    return all(_is_number(r.get(m)) for m in DEMO_MODELS)


def demo_scores(r: dict) -> dict:
    """{dataset: {model: percent}}: the top level (Fashion-MNIST), then every block within two levels that has
    the three models, e.g. "transfer" (named by its "dataset" key, else its own key); other keys are ignored."""
    return {str(r.get("dataset", "fashion_mnist")): demo_row(r), **demo_blocks(r, depth=2)}


def demo_blocks(obj, depth: int) -> dict:
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    out = {}
    for key, block in items:
        if isinstance(block, dict) and is_demo(block):
            out[str(block.get("dataset") or key)] = demo_row(block)
        elif depth > 1:
            out.update(demo_blocks(block, depth - 1))
    return out


def demo_row(r: dict) -> dict:
    return {m: float(r[m]) for m in DEMO_MODELS}


# ==========================================================================================================
# Tables (Markdown)
# ==========================================================================================================
def fine_grained_datasets(found: Found) -> list:
    """The paper's datasets in its order, then any others (imagefolder sets) sorted: fine_grained.summarize's order."""
    present = {c[3:] for row in found.cells.values() for c in row if c.startswith("fg:")}
    return [d for d in PAPER_FINE_GRAINED if d in present] + sorted(present - set(PAPER_FINE_GRAINED))


def fine_grained_mean(row: dict) -> float | None:
    """Mean over the 12 paper datasets; None unless all 12 are there (a partial mean is not the paper's number).
    The same rule as fine_grained/summarize.py `table`."""
    scores = [row.get(f"fg:{d}") for d in PAPER_FINE_GRAINED]
    if any(s is None for s in scores):
        return None
    return sum(s.value for s in scores) / len(scores)


def knn_columns(found: Found) -> list:
    """kNN columns present, by k."""
    names = {c for row in found.cells.values() for c in row if c.startswith("kNN")}
    return sorted(names, key=lambda c: int(re.search(r"\((\d+)-NN\)", c).group(1)))


def results_table(found: Found) -> str | None:
    """The README's table: one row per model that has any of its columns; None when no model has."""
    knn = knn_columns(found)
    header = ["model", LINEAR, *knn, "fine-grained mean (12)", "ADE20K mIoU", "NYU RMSE"]
    rows = []
    for model, row in found.cells.items():
        mean = fine_grained_mean(row)
        values = [_cell(row, LINEAR), *(_cell(row, c) for c in knn), _fmt(mean, 2),
                  _cell(row, "ADE20K mIoU"), _cell(row, "NYU RMSE", 3)]
        if any(v != "—" for v in values):
            rows.append([found.labels[model], *values])
    if rows:  # the paper's number for each student size of the runs read, beside them
        for arch in found.targets:
            lin, fg, ade, nyu = PAPER_TARGETS[arch]
            rows.append([f"paper target: Proteus {arch}", _fmt(lin, 2), *("—" for _ in knn), _fmt(fg, 2),
                         _fmt(ade, 2), _fmt(nyu, 3)])
    return markdown_table(header, rows) if rows else None


def fine_grained_table(found: Found) -> str:
    datasets = fine_grained_datasets(found)
    rows = [[found.labels[m], *(_cell(row, f"fg:{d}") for d in datasets), _fmt(fine_grained_mean(row), 2)]
            for m, row in found.cells.items() if any(c.startswith("fg:") for c in row)]
    text = markdown_table(["model", *datasets, "mean (12)"], rows)
    metrics = ", ".join(f"{d} {found.metrics[d]}" for d in datasets)
    return f"{text}\n\nMetrics (test split, percent): {metrics}."


def missing_fine_grained(found: Found) -> list:
    """Lines naming, per model with some but not all 12 paper datasets, which ones are missing."""
    lines = []
    for model, row in found.cells.items():
        have = [d for d in PAPER_FINE_GRAINED if f"fg:{d}" in row]
        if have and len(have) < len(PAPER_FINE_GRAINED):
            missing = [d for d in PAPER_FINE_GRAINED if d not in have]
            lines.append(f"- {found.labels[model]}: no 12-dataset mean, missing {', '.join(missing)}")
    return lines


def demo_table(scores: dict) -> str:
    datasets = list(scores)
    rows = [[label, *(_fmt(scores[d][m], 2) for d in datasets)] for m, label in DEMO_MODELS.items()]
    rows.append(["distilled - random-init (points)",
                 *(f"{scores[d]['distilled'] - scores[d]['random_init']:+.2f}" for d in datasets)])
    return markdown_table(["model (test accuracy, %)", *datasets], rows)


def markdown_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(row: dict, column: str, digits: int = 2) -> str:
    cell = row.get(column)
    return _fmt(None if cell is None else cell.value, digits)


def _fmt(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


# ==========================================================================================================
# Plots (PNG)
# ==========================================================================================================
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on clusters or CI
    import matplotlib.pyplot as plt
    return plt


def loss_panels(run: LossRun) -> dict:
    """{panel title: {line label: points}}: one teacher shares its panel with the total; several get one each,
    and the weighted total its own."""
    teachers = list(dict.fromkeys(t for t, _ in run.series))
    panels = {} if len(teachers) == 1 else {"total loss": {}}
    for t in teachers:
        panels[f"teacher {t}"] = {OBJ_LABEL.get(o, o): pts for (tt, o), pts in run.series.items() if tt == t}
    first = next(iter(panels))
    panels[first] = {"total (weighted sum)": run.total, **panels[first]}
    return panels


def log_scale(ax) -> None:
    """Log y axis in plain numbers (0.1, 2): minor ticks labelled too within a decade, at 2 and 5 within
    three (a loss curve often spans one or two decades, where powers of ten alone give one or two labels)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    shown = range(1, 10) if hi / lo < 10 else (2, 5) if hi / lo < 1000 else ()

    def minor(v, _):
        return f"{v:g}" if round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in shown else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def loss_plot(run: LossRun, path: str) -> None:
    plt = _pyplot()
    panels = loss_panels(run)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for label, pts in lines.items():
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=label, lw=2 if label.startswith("total") else 1.2)
        values = [v for pts in lines.values() for _, v in pts if math.isfinite(v)]
        if values and min(values) > 0:
            log_scale(ax)  # losses fall by orders of magnitude; a zero (nothing masked) needs linear
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimisation step")
        ax.set_ylabel("loss (MSE to the teacher)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Distillation losses: {run.name}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grouped_bars(groups: list, series: dict, path: str, title: str, xlabel: str, ylabel: str) -> None:
    """Bars of series {name: [value or None per group]} side by side within each group."""
    plt = _pyplot()
    n = max(len(series), 1)
    width = min(0.8 / n, 0.35)
    fig, ax = plt.subplots(figsize=(max(7.0, 3.0 + len(groups) * (0.35 * n + 0.5)), 4.4))
    colours = plt.get_cmap("tab10").colors
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g, v in enumerate(values) if v is not None]
        bars = ax.bar(xs, [v for v in values if v is not None], width, label=name, color=colours[i % 10])
        if len(groups) * n <= 40:  # values on the bars while they stay readable
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
    tilt = len(groups) > 4 or max(map(len, groups)) > 16  # dataset names overlap unless tilted
    ax.set_xticks(range(len(groups)), groups, rotation=20 if tilt else 0, ha="right" if tilt else "center")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(title="model", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def probe_bars(found: Found, path: str) -> bool:
    """Accuracy per model and probe (linear, kNN, each fine-grained dataset); False when there is none."""
    columns = [LINEAR] if any(LINEAR in r for r in found.cells.values()) else []
    columns += knn_columns(found) + [f"fg:{d}" for d in fine_grained_datasets(found)]
    series = {found.labels[m]: [row[c].value if c in row else None for c in columns]
              for m, row in found.cells.items() if any(c in row for c in columns)}
    if not series:
        return False
    groups = [c[3:] if c.startswith("fg:") else c for c in columns]
    means = {found.labels[m]: fine_grained_mean(row) for m, row in found.cells.items()}
    if any(v is not None for v in means.values()):
        groups.append("fine-grained mean (12)")
        for label, values in series.items():
            values.append(means[label])
    grouped_bars(groups, series, path, "Frozen-feature probes (linear_eval, fine_grained)", "probe / dataset",
                 "test score (%)")
    return True


def demo_bars(scores: dict, path: str) -> None:
    datasets = list(scores)
    series = {label: [scores[d][m] for d in datasets] for m, label in DEMO_MODELS.items()}
    grouped_bars(datasets, series, path, "Demo: logistic-regression probe on frozen features", "dataset",
                 "test accuracy (%)")


# ==========================================================================================================
# The report
# ==========================================================================================================
def make_figures(found: Found, out: str) -> dict:
    """{"probe": name or None, "demos": [name], "runs": [name]}: PNGs written into out."""
    names = set()
    figures = {"probe": "probe_accuracy.png" if probe_bars(found, os.path.join(out, "probe_accuracy.png")) else None,
               "demos": [], "runs": []}
    for i, (_, scores) in enumerate(found.demos):
        figures["demos"].append(_unique(f"demo_accuracy{'' if i == 0 else f'_{i + 1}'}", names))
        demo_bars(scores, os.path.join(out, figures["demos"][-1]))
    for run in found.runs:
        figures["runs"].append(_unique("loss_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(run.path)), names))
        loss_plot(run, os.path.join(out, figures["runs"][-1]))
    return figures


def _unique(stem: str, taken: set) -> str:
    name, i = f"{stem}.png", 2
    while name in taken:
        name, i = f"{stem}_{i}.png", i + 1
    taken.add(name)
    return name


def render(found: Found, figures: dict, run_dirs: list) -> str:
    parts = ["# Proteus report", "",
             f"`python -m tools.report {' '.join(run_dirs)}`: {len(found.sources)} files read.", ""]
    table = results_table(found)
    if table:
        parts += ["## Results", "", table, "",
                  f"{LINEAR}: linear_eval's selected head; fine-grained mean: the 12 paper datasets, only when all "
                  f"12 are present (as fine_grained.summarize); ADE20K / NYU: test_metrics.json.", ""]
    if any(c.startswith("fg:") for row in found.cells.values() for c in row):
        parts += ["## Fine-grained datasets", "", fine_grained_table(found), "", *missing_fine_grained(found), ""]
    if figures["probe"]:
        parts += [f"![probe accuracy]({figures['probe']})", ""]
    for (path, scores), png in zip(found.demos, figures["demos"]):
        parts += [f"## Demo (`{path}`)", "", demo_table(scores), "", f"![demo accuracy]({png})", ""]
    for run, png in zip(found.runs, figures["runs"]):
        parts += [f"## Pretraining: {run.name}", "", loss_summary(run), "", f"![losses]({png})", ""]
    parts += ["## Sources", "", *(f"- `{p}`: {what}" for p, what in found.sources)]
    parts += [f"- not used: `{p}` ({why})" for p, why in found.skipped]
    return "\n".join(parts) + "\n"


def loss_summary(run: LossRun) -> str:
    first, last = run.total[0], run.total[-1]
    lines = [f"`{run.path}`: {len(run.total)} logged steps up to step {last[0]}; total loss "
             f"{first[1]:.4f} → {last[1]:.4f}."]
    if run.series:
        rows = [[t, OBJ_LABEL.get(o, o), f"{pts[0][1]:.4f}", f"{pts[-1][1]:.4f}"] for (t, o), pts in run.series.items()]
        lines += ["", markdown_table(["teacher", "objective", "first", "last"], rows)]
    return "\n".join(lines)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _under(path: str, root: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)


def parse_args(argv=None) -> argparse.Namespace:
    p = CheckedArgumentParser("tools.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs, searched recursively")
    p.add_argument("--output", default=None, help="folder for report.md and the PNGs (default: RUN_DIR[0]/report)")
    args = p.parse_args(argv)
    args.output = args.output or os.path.join(args.run_dirs[0], "report")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ConfigError(f"--output {args.output} exists and is not a directory; pass a folder")
    return args


@cli("tools.report")
def main(argv=None) -> int:
    args = parse_args(argv)
    found = scan(args.run_dirs)  # refuses a dir with nothing to report before writing anything
    os.makedirs(args.output, exist_ok=True)
    figures = make_figures(found, args.output)
    report = os.path.join(args.output, "report.md")
    write_text(report, render(found, figures, args.run_dirs))
    table = results_table(found)
    if table:
        print(table)
    print(f"\n{report} and {len(figures['runs']) + len(figures['demos']) + bool(figures['probe'])} PNGs in "
          f"{args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
