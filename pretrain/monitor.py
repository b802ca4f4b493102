"""Watching a long pretraining run: the progress line, an optional W&B mirror of the metrics, a kNN probe.

Progress line (every --log-every steps), for one student:
    epoch 3 [120/2502] step 7626/750600  loss 1.2345 (token 0.41 fea 0.40 patch 0.43)  lr 4.98e-04  gnorm 1.23
        data 3%  1234 img/s  eta 71:02:11  mem 38.2G
`data`: the share of the window's wall time the loop waited for the loader (above a few % the GPUs starve:
more --num-workers or faster storage); `mem`: peak GPU memory allocated in the window (CUDA only). With
several students the shared part is one line and each student gets a line of its own beneath it.

--wandb PROJECT: everything MetricLogger writes to TensorBoard (scalars, PCA images) also goes to Weights &
Biases, plus the run's config. Off by default; wandb is imported only then (not a dependency of training).
WANDB_MODE=offline writes the run under OUTPUT/wandb/ and sends nothing (`wandb sync` uploads it later).
The W&B run id derives from the output dir, so a resumed run continues the same W&B run.

--monitor-knn TRAIN_DIR,VAL_DIR: every --monitor-every epochs, a weighted kNN classifier (k 20, T 0.07, DINO's
protocol) on the CLS features of the EMA student (the student without EMA) over at most MONITOR_TRAIN /
MONITOR_VAL images of two ImageFolders (evenly spaced, the same images every time), centre crops at the
training size; top-1 goes to log.txt (`monitor/knn_top1`), TensorBoard and the console. Rank 0 only, no
training RNG is used, so results and resumes are as without it.
"""
import hashlib
import importlib.util
import json
import logging
import math
import os
import time

import torch
import torch.nn.functional as F

from common.errors import ConfigError
from common.log import MetricLogger

log = logging.getLogger("pretrain")

MONITOR_TRAIN, MONITOR_VAL = 5000, 2000  # images of the kNN probe (a few seconds on a GPU)
KNN_K, KNN_T = 20, 0.07


# ---- the progress line -------------------------------------------------------------------------------------
class DataWait:
    """The share of wall time the loop spent waiting for the loader, since the last `take()`."""

    def __init__(self):
        self.seconds, self.t_last = 0.0, time.perf_counter()

    def wrap(self, iterator):
        it = iter(iterator)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - t0
            yield item

    def take(self) -> float:
        now = time.perf_counter()
        share = min(self.seconds / max(now - self.t_last, 1e-9), 1.0)
        self.seconds, self.t_last = 0.0, now
        return share


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last call (then reset); None off CUDA."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def progress_lines(head: str, students: list[dict], img_per_s: float, data_share: float, eta: str,
                   mem_gib: float | None) -> list[str]:
    """The progress line(s). `students`: [{key, loss, parts {name: value}, lr, grad_norm}] (key None for one)."""
    tail = f"data {100 * data_share:.0f}%  {img_per_s:.1f} img/s  eta {eta}" + (
        f"  mem {mem_gib:.1f}G" if mem_gib is not None else "")

    def student(s: dict) -> str:
        parts = " ".join(f"{k} {v:.4f}" for k, v in s["parts"].items())
        norm = s["grad_norm"]
        return (f"loss {s['loss']:.4f} ({parts})  lr {s['lr']:.2e}"
                + (f"  gnorm {norm:.3g}" if norm is not None and math.isfinite(norm) else ""))

    if len(students) == 1:
        return [f"{head}  {student(students[0])}  {tail}"]
    width = max(len(s["key"]) for s in students)
    return [f"{head}  {tail}"] + [f"  {s['key']:<{width}}  {student(s)}" for s in students]


def short_loss_names(names: list[str]) -> dict:
    """`teacher/objective` -> `objective` when there is one teacher, else the names as they are."""
    teachers = {n.split("/", 1)[0] for n in names if "/" in n}
    return {n: (n.split("/", 1)[1] if len(teachers) == 1 and "/" in n else n) for n in names}


# ---- W&B ---------------------------------------------------------------------------------------------------
def check_wandb(project: str) -> None:
    """ConfigError (one line, before any work) if --wandb is given and wandb is not installed."""
    if project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"--wandb {project}: the wandb package is not installed (pip install wandb; "
                          f"requirements.txt names the tested version), or drop --wandb")


class TrackedMetricLogger(MetricLogger):
    """MetricLogger (log.txt + TensorBoard) that also sends every scalar and image to a W&B run."""

    def __init__(self, output_dir: str, project: str, config: dict, enabled: bool = True):
        super().__init__(output_dir, enabled=enabled)
        self.run = None
        if not self.enabled:
            return
        import wandb  # lazily: only with --wandb

        out = os.path.abspath(output_dir)
        self.run = wandb.init(project=project, dir=out, name=os.path.basename(out.rstrip(os.sep)),
                              id=hashlib.sha1(out.encode()).hexdigest()[:16], resume="allow",
                              config=json.loads(json.dumps(dict(config), default=str)))  # a plain dict
        self._wandb = wandb

    def log(self, step: int, prefix: str = "", write_json: bool = True, **scalars) -> None:
        super().log(step, prefix, write_json, **scalars)
        if self.run is not None:
            clean = {f"{prefix}{k}": float(v) for k, v in scalars.items()
                     if isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool)}
            self.run.log(clean, step=step)

    def image(self, tag: str, img_hwc, step: int) -> None:
        super().image(tag, img_hwc, step)
        if self.run is not None:
            self.run.log({tag: self._wandb.Image(img_hwc)}, step=step)

    def close(self) -> None:
        super().close()
        if self.run is not None:
            self.run.finish()
            self.run = None


def metric_logger(cfg: dict, is_main: bool) -> MetricLogger:
    if cfg.get("wandb"):
        return TrackedMetricLogger(cfg["output_dir"], cfg["wandb"], cfg, enabled=is_main)
    return MetricLogger(cfg["output_dir"], enabled=is_main)


# ---- kNN probe during pretraining --------------------------------------------------------------------------
def parse_knn_dirs(text: str) -> tuple[str, str] | None:
    """--monitor-knn TRAIN_DIR,VAL_DIR -> (train, val); ConfigError naming what is wrong."""
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--monitor-knn takes TRAIN_DIR,VAL_DIR (two ImageFolders with the same class folders), "
                          f"got {text!r}")
    for p in parts:
        if not os.path.isdir(p):
            raise ConfigError(f"--monitor-knn: {p!r} is not a folder (expected an ImageFolder ROOT/<class>/<img>)")
    return parts[0], parts[1]


def evenly(n: int, k: int) -> list[int]:
    return list(range(n)) if n <= k else [int(i * n / k) for i in range(k)]


class KnnMonitor:
    """A small fixed kNN probe of the student's features (rank 0)."""

    def __init__(self, train_dir: str, val_dir: str, input_size: int, batch_size: int, num_workers: int):
        from common import data as cdata

        tf = cdata.build_eval_transform(resize=input_size * 256 // 224, crop=input_size)
        train = cdata.SafeImageFolder(train_dir, tf, on_bad_image="fail")
        val = cdata.SafeImageFolder(val_dir, tf, on_bad_image="fail")
        if train.classes != val.classes:
            raise ConfigError(f"--monitor-knn: {train_dir} and {val_dir} have different class folders")
        self.sets = {"train": torch.utils.data.Subset(train, evenly(len(train), MONITOR_TRAIN)),
                     "val": torch.utils.data.Subset(val, evenly(len(val), MONITOR_VAL))}
        self.num_classes = len(train.classes)
        self.batch_size, self.num_workers = batch_size, min(num_workers, 4)

    @torch.no_grad()
    def features(self, model, name: str, device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
        from common.probe import frozen_features

        loader = torch.utils.data.DataLoader(self.sets[name], batch_size=self.batch_size, shuffle=False,
                                             num_workers=self.num_workers, generator=torch.Generator())
        feats, labels = [], []
        for images, targets in loader:
            with autocast():
                cls, _ = frozen_features(model, images.to(device, non_blocking=True), 1)
            feats.append(F.normalize(cls[:, -1].float(), dim=1))
            labels.append(targets.to(device))
        return torch.cat(feats), torch.cat(labels)

    @torch.no_grad()
    def top1(self, model, device, autocast) -> float:
        was_training = model.training
        model.eval()
        try:
            train_f, train_y = self.features(model, "train", device, autocast)
            val_f, val_y = self.features(model, "val", device, autocast)
        finally:
            model.train(was_training)
        return knn_top1(train_f, train_y, val_f, val_y, self.num_classes)


def knn_top1(train_f, train_y, val_f, val_y, num_classes: int, k: int = KNN_K, t: float = KNN_T,
             chunk: int = 256) -> float:
    """Top-1 (%) of DINO's weighted kNN: the k most cosine-similar training features vote exp(sim / t)."""
    k = min(k, train_f.shape[0])
    correct = 0
    for i in range(0, val_f.shape[0], chunk):
        sim, idx = (val_f[i:i + chunk] @ train_f.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (sim / t).exp())
        correct += int((votes.argmax(1) == val_y[i:i + chunk]).sum())
    return 100.0 * correct / max(val_f.shape[0], 1)


def build_knn_monitor(cfg: dict, is_main: bool) -> KnnMonitor | None:
    dirs = parse_knn_dirs(cfg.get("monitor_knn", ""))
    if dirs is None or not is_main:
        return None
    monitor = KnnMonitor(*dirs, cfg["input_size"], cfg["batch_size"], cfg["num_workers"])
    log.info("kNN monitor: %d train / %d val images of %d classes, every %d epoch(s)", len(monitor.sets["train"]),
             len(monitor.sets["val"]), monitor.num_classes, cfg["monitor_every"])
    return monitor


def run_knn_monitor(trainer, epoch: int) -> None:
    """The probe after `epoch` (0-based) if it is due: EMA student if any, else the student, per student."""
    monitor, every = getattr(trainer, "knn_monitor", None), trainer.cfg.get("monitor_every", 1)
    if monitor is None or (epoch + 1) % every and epoch + 1 != trainer.cfg["epochs"]:
        return
    t0 = time.perf_counter()
    scalars = {}
    for run in trainer.students:
        model = run.ema.module if run.ema is not None else run.distiller.student
        name = f"{run.key}/knn_top1" if trainer.multi else "knn_top1"
        scalars[name] = monitor.top1(model, trainer.dist_info.device, trainer.autocast)
    trainer.metrics.log(trainer.progress.global_step, prefix="monitor/", epoch=epoch, **scalars)
    log.info("kNN monitor after epoch %d (%s): %s (%.1f s)", epoch, "EMA" if trainer.students[0].ema else "student",
             "  ".join(f"{k} {v:.2f}" for k, v in scalars.items()), time.perf_counter() - t0)
