"""The training loop: one step = one teacher forward, then per student one pass (forward + backward), and
AdamW + EMA for every student whose losses are finite (pretrain/students.py: one or several students).

Fault tolerance (issue #7):
- SIGTERM / SIGUSR1 set a flag; every rank learns of it through the per-step all-reduce, finishes the
  step, rank 0 writes checkpoint.pth, and the process exits with EXIT_PREEMPTED (75, "try again"): the
  same command resumes. Time to exit: the rest of the current step plus one checkpoint write.
- A non-finite loss stops the run before the optimizer step (weights stay those of the last good step)
  with a message naming the step, the three losses and the last good checkpoint; exit EXIT_NONFINITE (3).
  With fp16 the GradScaler skips overflowing steps; `max_bad_steps` consecutive skipped or non-finite
  steps stop the run the same way.
- Unreadable images are skipped by the dataset and counted (log.txt `bad_images`).
Faults for tests are injected by the tests (tests/fault_injection.py wraps Trainer methods).
"""
import logging
import math
import signal
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from common import probe
from common.dist import DistInfo, barrier
from common.errors import DataError
from common.log import MetricLogger
from . import accumulate, monitor
from . import state as ckpt_state
from . import pipeline
from .students import prefixed
from .targets import prepare_targets
from common.visualise import pca_figure

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, rerun the same command (SLURM script requeues on it)
EXIT_NONFINITE = 3  # non-finite loss: a configuration problem, do not requeue blindly
# "checkpoint, then exit 75": SLURM, `timeout`, container runtimes, Ctrl-C and a closed terminal
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
# Several processes: a rank that receives a signal while waiting for data waits this much longer for its batch, so
# that the step's all-reduce can stop every rank at the same step with a checkpoint; then it stops without one.
DATA_WAIT_GRACE_S = 5.0
NO_CHECKPOINT = "none written yet"  # Trainer.last_good until a checkpoint exists (written or resumed from)


class StopTraining(Exception):
    """Raised to end the run early with a message and a process exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class PreemptionFlag:
    """Records preemption signals instead of dying; the loop checks `signum` after each step.

    SIGINT is one of them (Ctrl-C signals the whole process group, as SLURM and `timeout` do with SIGTERM).
    A signal the process inherited as ignored (SIGHUP under nohup) stays ignored.
    """

    def __init__(self, signals=PREEMPT_SIGNALS):
        self.signum = 0
        self.signals = tuple(signals)
        self.waiting, self.grace_s = False, 0.0  # the main thread is blocked waiting for a batch (see wait_for)
        self._previous = {}
        for s in signals:
            if signal.getsignal(s) is not signal.SIG_IGN:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum
        if self.waiting:  # no step is running to notice the flag: the wait itself must end
            self._end_wait()

    def _end_wait(self) -> None:
        if self.grace_s > 0:  # the batch may still come in time for the step that stops every rank together
            signal.signal(signal.SIGALRM, self._give_up)
            signal.setitimer(signal.ITIMER_REAL, self.grace_s)
        else:
            self._give_up()

    def _give_up(self, *_):
        if self.waiting:
            self.waiting = False
            raise DataWaitInterrupted(self.signum)

    def wait_for(self, iterator, grace_s: float = 0.0):
        """Yield from `iterator` (a DataLoader's); a signal received while waiting for the next item, or before
        the wait began, raises DataWaitInterrupted (after `grace_s` seconds more if the batch has not come by
        then): a batch that never comes (a stuck worker or file system) cannot keep the run from stopping."""
        self.grace_s = grace_s
        while True:
            self.waiting = True
            if self.signum:
                self._end_wait()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.waiting = False
            yield item

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @contextmanager
    def held(self):
        """Hold the signals back (they stay pending, then reach the handler) while DataLoader workers start.

        A worker inherits the signal mask: started with the signals blocked, it cannot die of one that arrives
        before its worker_init_fn has set them to ignored and unblocked them (torch's own worker set-up installs
        a SIGTERM handler that exits). Without this, a signal to the process group at an epoch start (workers
        are started anew each epoch) killed a worker and the whole run, with no checkpoint.
        """
        old = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _finite_flags(targets: dict) -> torch.Tensor:
    """(teachers,) bool on the device, without a host sync: every target tensor of that teacher is finite."""
    flags = [torch.stack([torch.isfinite(v).all() for v in t.values() if isinstance(v, torch.Tensor)]).all()
             for t in targets.values()]
    return torch.stack(flags)


class DataWaitInterrupted(BaseException):
    """A preemption signal arrived while the trainer waited for a batch (raised from the signal handler; a
    BaseException, so that no `except Exception` of the data code on the way swallows it)."""


def _kill_workers(iterator) -> None:
    """SIGKILL the DataLoader workers of `iterator` that are still alive: they ignore the preemption signals (so
    that the main process can save), and one stuck in a read would otherwise keep the process from exiting (torch's
    shutdown only sends SIGTERM). Unregistered first, so that torch's SIGCHLD check does not report their end."""
    alive = [w for w in getattr(iterator, "_workers", ()) if w.is_alive()]
    if not alive:
        return
    if getattr(iterator, "_worker_pids_set", False):
        try:
            torch._C._remove_worker_pids(id(iterator))
        except RuntimeError:
            pass
        iterator._worker_pids_set = False
    for w in alive:
        w.kill()


@dataclass
class Trainer:
    """Everything the loop touches. `students`: one StudentRun per --student entry (pretrain/students.py),
    each with its distiller (student + heads), DDP wrapper, AdamW, schedule, scaler and EMA.

    `teachers`: {key: frozen Teacher}, in the distillers' target order; `grids`: {key: its token grid};
    `normaliser`: a fitted pretrain.targets.TargetNormaliser, or None. Every student shares the teacher
    forward, the masks and the targets of a step.
    """
    cfg: dict
    dist_info: DistInfo
    students: list
    teachers: dict
    mask_gen: object
    loader: torch.utils.data.DataLoader
    loader_generator: torch.Generator
    steps_per_epoch: int
    metrics: MetricLogger
    progress: ckpt_state.Progress = field(default_factory=ckpt_state.Progress)
    pca_batch: torch.Tensor | None = None
    last_good: str = NO_CHECKPOINT
    preempt: PreemptionFlag | None = None
    grids: dict = field(default_factory=dict)
    normaliser: torch.nn.Module | None = None
    knn_monitor: object = None  # pretrain/monitor.py KnnMonitor (--monitor-knn, rank 0): built from cfg if None
    data_wait: monitor.DataWait = field(default_factory=monitor.DataWait)
    _targets_finite: torch.Tensor | None = None  # per teacher: were this step's targets finite (bool, on device)
    _save_failures: int = 0  # consecutive failed checkpoint writes
    _save_error: str = ""

    def __post_init__(self):
        if self.knn_monitor is None:
            self.knn_monitor = monitor.build_knn_monitor(self.cfg, self.dist_info.is_main)

    @property
    def distiller(self) -> torch.nn.Module:
        """The first student's distiller (its grid is every student's; the PCA figure shows it)."""
        return self.students[0].distiller

    @property
    def multi(self) -> bool:
        return len(self.students) > 1

    def prefix(self, run) -> str | None:
        return run.key if self.multi else None

    @property
    def loss_names(self) -> list[str]:
        """Every logged loss, in the order one all-reduce packs them: per student, its distiller's names."""
        return [n for run in self.students for n in prefixed(self.prefix(run), run.distiller.loss_names)]

    # ---- one step, in three parts (the benchmark times them separately) --------------------------------
    def autocast(self):
        p = self.cfg["precision"]
        if p == "fp32":
            return nullcontext()
        return torch.autocast(self.dist_info.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def raw_teacher_outputs(self, images: torch.Tensor) -> dict:
        """{key: dict(cls (B, Dt), patch (B, Nt, Dt))} per teacher: frozen, inference mode, own dtype on GPU."""
        with torch.inference_mode(), self.autocast():
            return {key: teacher(images) for key, teacher in self.teachers.items()}

    def teacher_targets(self, images: torch.Tensor) -> dict:
        """Targets per teacher on the distiller's grid (resampled where a teacher's grid differs), normalised."""
        raw = self.raw_teacher_outputs(images)
        with torch.inference_mode():
            return prepare_targets(raw, self.grids, self.distiller.grid, self.normaliser)

    def student_losses(self, run, images, masks, rows, targets, micro: int = 0) -> dict:
        """One student's forward (its own stochastic-depth stream): its distiller's loss dict."""
        with run.rng(self.cfg["seed"], self.dist_info.rank, self.progress.global_step, images.device), \
                self.autocast():
            return run.model(images, masks, rows, targets)

    def backward(self, run, loss: torch.Tensor) -> None:
        run.scaler.scale(loss).backward()

    def update(self, run, want_norm: bool):
        """Optional clipping, (scaled) AdamW step, EMA of one student. Returns (grad norm or None, skipped)."""
        norm = None
        if self.cfg["clip_grad"] > 0 or want_norm:
            run.scaler.unscale_(run.optimizer)
            params = [p for p in run.distiller.parameters() if p.grad is not None]
            if self.cfg["clip_grad"] > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, self.cfg["clip_grad"])
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        skipped = scale is not None and run.scaler.get_scale() < scale  # fp16 overflow: step was skipped
        if run.ema is not None and not skipped:
            run.ema.update(run.distiller.student)
        return norm, skipped

    # ---- the loop ---------------------------------------------------------------------------------------
    def to_device(self, batch_images) -> tuple[torch.Tensor, int]:
        """The batch's float (B', 3, H, W) images on the device, finished there when the loader sends uint8 or
        JPEG bytes (pretrain/pipeline.py), and how many images were dropped there (unreadable once decoded)."""
        return pipeline.to_device(self.loader, batch_images, self.dist_info.device)

    def batches(self):
        """An iterator over the loader whose workers start with the preemption signals held (see PreemptionFlag)."""
        with self.preempt.held() if self.preempt is not None else nullcontext():
            return iter(self.loader)

    def interruptible_batches(self):
        """self.batches(), except that a preemption signal received while waiting for a batch from the loader's
        workers stops the run at once (stop_waiting), however long the batch would take. Without workers the
        main process makes the batch itself (drawing from the RNG a checkpoint saves): it finishes it, and the
        step after it stops the run."""
        iterator = self.batches()
        try:
            if self.preempt is None or not getattr(self.loader, "num_workers", 0):
                yield from iterator
                return
            yield from self.preempt.wait_for(iterator, DATA_WAIT_GRACE_S if self.dist_info.distributed else 0.0)
        except DataWaitInterrupted:
            _kill_workers(iterator)
            self.stop_waiting()
        finally:  # an epoch left early (a stop after a step): no worker, stuck or not, outlives it
            _kill_workers(iterator)

    def train(self) -> None:
        cfg = self.cfg
        for epoch in range(self.progress.epoch, cfg["epochs"]):
            self.train_one_epoch(epoch)
            self.progress.epoch, self.progress.step_in_epoch = epoch + 1, 0
            self.save_checkpoint()
            monitor.run_knn_monitor(self, epoch)
            if cfg["pca_every_epochs"] and ((epoch + 1) % cfg["pca_every_epochs"] == 0 or epoch + 1 == cfg["epochs"]):
                self.log_pca()
        if self.progress.global_step <= 0:  # a "finished" run must have trained: never export a random init
            raise DataError(f"the run trained 0 steps ({self.steps_per_epoch} steps per epoch from the data at "
                            f"{cfg['data_path']}): nothing to export. Check the data (and its shard index)")

    def train_one_epoch(self, epoch: int) -> None:
        cfg, dev = self.cfg, self.dist_info.device
        skip = self.progress.step_in_epoch
        if skip == 0:
            self.progress.data_state = {}
        if hasattr(self.loader.dataset, "set_epoch"):  # tar shards: positions per loader role
            self.loader.dataset.set_epoch(epoch, skip, self.progress.data_state)
        else:
            self.loader.sampler.set_epoch(epoch, skip=skip * cfg["batch_size"] * cfg.get("accum_steps", 1))
        # worker seeds depend on (seed, epoch, rank) only, never on how the run was interrupted
        self.loader_generator.manual_seed(cfg["seed"] * 100_003 + epoch * 1_009 + self.dist_info.rank)
        for run in self.students:
            run.distiller.train()
        names = self.loss_names
        sums, n_seen = torch.zeros(len(names)), 0
        total = cfg["epochs"] * self.steps_per_epoch
        window = probe.Progress("step", total, start=self.progress.global_step)  # img/s and ETA since the last line
        window_sums, window_steps = torch.zeros(len(names), dtype=torch.float64), 0  # losses since the last line
        self.data_wait.take()
        for item in self.data_wait.wrap(self.interruptible_batches()):
            (batch, n_bad), position = item if len(item) == 2 and isinstance(item[1], tuple) else (item, None)
            if position is not None:
                self.progress.data_state[position[0]] = position[1]
            images, dropped = self.to_device(batch[0]) if batch is not None else (None, 0)  # (B, 3, H, W) float
            if images is None or images.shape[0] == 0:
                raise DataError(f"every image of a batch in epoch {epoch} was unreadable: the dataset at "
                                f"{cfg['data_path']} looks broken (see the warnings above); the last checkpoint "
                                f"is {self.last_good}")
            n_bad += dropped
            log_now = self._is_log_step()
            losses, extras, stop = self.train_step(images, n_bad, epoch, want_norm=log_now)
            sums += torch.tensor(losses)
            n_seen += 1
            window_sums, window_steps = window_sums + torch.tensor(losses, dtype=torch.float64), window_steps + 1
            if window.update(images.shape[0] * self.dist_info.world_size, due=log_now):
                self.log_progress(epoch, extras, window, (window_sums / window_steps).tolist())
                window_sums, window_steps = torch.zeros_like(window_sums), 0
            if stop:
                self.stop_preempted()  # checkpoints itself: no mid-epoch save of the same state first
            self._maybe_save_mid_epoch()
        if n_seen:
            avg = dict(zip(names, (sums / n_seen).tolist()))
            self.metrics.log(self.progress.global_step, prefix="epoch/", epoch=epoch,
                             bad_images=self.progress.bad_images, **avg)
            log.info("epoch %d done: %s, %d unreadable images skipped so far", epoch,
                     " ".join(f"{k}={v:.4f}" for k, v in avg.items()), self.progress.bad_images)

    def train_step(self, images: torch.Tensor, n_bad: int, epoch: int, want_norm: bool):
        """One optimisation step of every student on one teacher pass.

        Returns (losses in loss_names order, {lr / grad_norm per student}, stop requested). Each student's
        backward runs right after its forward, so only one student's activations are alive at a time; the
        finiteness check (one all-reduce, one host sync) then decides which students step.
        """
        step = self.progress.global_step
        for run in self.students:
            run.step_schedule(step)  # per-iteration schedule: lr of *this* step
        masks, rows = self.mask_gen(images.shape[0])  # (B, N) bool, (M,): drawn for the whole step batch
        masks, rows = masks.to(images.device, non_blocking=True), rows.to(images.device, non_blocking=True)
        losses = self.accumulate_gradients(images, masks, rows)
        stats = self._reduce_stats(losses, n_bad)  # one host sync per step
        n = len(self.loss_names)
        self.progress.bad_images += int(stats[n + 1])
        extras, offset = {}, 0
        for run in self.students:
            width = len(run.distiller.loss_names)
            extras.update(self._step_student(run, step, epoch, stats[offset:offset + width], want_norm))
            offset += width
        # a skipped step still counts: the batch is consumed and the schedule moves on (resume offsets)
        self.progress.global_step += 1
        self.progress.step_in_epoch += 1
        return stats[:n], extras, stats[n] > 0

    def accumulate_gradients(self, images, masks, rows) -> dict:
        """Forward + backward of every student over the step batch, in micro-batches of --batch-size
        (pretrain/accumulate.py: the gradients and losses of the one-batch step). Returns the step's losses."""
        micro = self.cfg["batch_size"] if self.cfg.get("accum_steps", 1) > 1 else images.shape[0]
        parts = accumulate.split_step(images, masks, rows, micro)
        losses = {}
        for mb in parts:
            targets = self.teacher_targets(mb.images)
            self._targets_finite = _finite_flags(targets)  # on the device, read only if a loss is non-finite
            for run in self.students:
                with accumulate.sync_gradients(run.model, mb):  # DDP: one all-reduce, on the last micro-batch
                    own = self.student_losses(run, mb.images, mb.masks, mb.rows, targets, micro=mb.index)
                    total = own["loss"] if len(parts) == 1 else accumulate.weighted_total(run.distiller, own, mb)
                    self.backward(run, total)
                logged = accumulate.logged_losses(run.distiller, own, total, mb)  # this micro-batch's share
                for k, v in zip(prefixed(self.prefix(run), logged), logged.values()):
                    losses[k] = losses[k] + v if k in losses else v
        return losses

    def _step_student(self, run, step: int, epoch: int, stats: list[float], want_norm: bool) -> dict:
        """AdamW step of one student if its losses are finite; its {lr, grad_norm} (prefixed when several)."""
        norm = None
        if all(math.isfinite(v) for v in stats):
            norm, skipped = self.update(run, want_norm)
            run.bad_streak = run.bad_streak + 1 if skipped else 0
            if run.bad_streak > self.cfg["max_bad_steps"]:
                self._stop_nonfinite(run, step, stats, f"the fp16 grad scaler skipped {run.bad_streak} steps in a row")
        else:
            self._on_nonfinite(run, step, epoch, stats)  # raises unless fp16 may skip it
        names = prefixed(self.prefix(run), ("lr", "grad_norm"))
        return {names[0]: run.optimizer.param_groups[-1]["lr"],
                names[1]: float(norm) if norm is not None else float("nan")}

    def _reduce_stats(self, losses: dict, n_bad: int) -> list[float]:
        """The named losses (loss_names order) averaged over ranks, then [stop flag, bad images] summed."""
        names = self.loss_names
        flag = float(self.preempt is not None and self.preempt.signum != 0)
        dev = next(iter(losses.values())).device
        vec = torch.stack([losses[k].detach().float() for k in names]
                          + [torch.tensor(flag, device=dev), torch.tensor(float(n_bad), device=dev)])
        if self.dist_info.distributed:
            dist.all_reduce(vec)
            vec[:len(names)] /= self.dist_info.world_size
        return vec.tolist()

    def _on_nonfinite(self, run, step: int, epoch: int, stats: list[float]) -> None:
        run.optimizer.zero_grad(set_to_none=True)
        run.bad_streak += 1
        if self.cfg["precision"] != "fp16" or run.bad_streak > self.cfg["max_bad_steps"]:
            self._stop_nonfinite(run, step, stats, f"epoch {epoch}")
        log.warning("non-finite loss at step %d skipped%s (%d in a row, at most %d allowed)", step,
                    f" for student {run.key}" if self.multi else "", run.bad_streak, self.cfg["max_bad_steps"])

    def _stop_nonfinite(self, run, step: int, stats: list[float], where: str):
        bad = [k for k, ok in zip(self.teachers, self._targets_finite.tolist()) if not ok] \
            if self._targets_finite is not None else []
        if bad:  # the targets, not the student: a lower lr would not help
            raise StopTraining(
                f"teacher {', '.join(bad)} gave non-finite outputs (NaN/inf targets) at step {step} ({where}); the "
                f"student was not updated with them. Check the teacher's weights (--teacher-checkpoint) and its "
                f"dtype (--teacher-dtype fp32, --precision bf16/fp32: fp16 overflows). Last good checkpoint: "
                f"{self.last_good}.", EXIT_NONFINITE)
        parts = " ".join(f"{k}={v}" for k, v in zip(run.distiller.loss_names, stats))
        who = f" of student {run.key}" if self.multi else ""
        raise StopTraining(
            f"non-finite loss{who} at step {step} ({where}): {parts}. The weights were not updated with it. "
            f"Last good checkpoint: {self.last_good}. "
            f"Try a lower --lr{' (or its --student-lr entry)' if self.multi else ''}, --clip-grad 1.0, or "
            f"--precision bf16/fp32; rerunning resumes from that checkpoint.",
            EXIT_NONFINITE)

    # ---- checkpoints, logging ---------------------------------------------------------------------------
    def save_checkpoint(self, final: bool = False) -> None:
        """Write checkpoint.pth; a failure is counted, and stops the run after max_save_failures in a row
        unless `final` (the preemption save, whose outcome goes into the stop message instead)."""
        ckpt = ckpt_state.build_checkpoint(self.students, self.progress, self.mask_gen, self.cfg, self.normaliser)
        path, error = ckpt_state.save_checkpoint(ckpt, self.cfg["output_dir"], self.cfg["keep_checkpoints"],
                                                 self.dist_info.is_main)
        if path:
            self.last_good = f"{path} (step {self.progress.global_step})"
            self._save_failures, self._save_error = 0, ""
            log.info("saved %s at step %d (epoch %d, %d/%d)", path, self.progress.global_step, self.progress.epoch,
                     self.progress.step_in_epoch, self.steps_per_epoch)
        elif error:
            self._save_failures, self._save_error = self._save_failures + 1, error
            limit = self.cfg["max_save_failures"]
            if self.last_good == NO_CHECKPOINT and not final:  # nothing to fall back on: training on risks it all
                raise StopTraining(f"the run's first checkpoint could not be written ({error}); nothing has been "
                                   f"saved, so the run stops here instead of training on without one. Free disk "
                                   f"space (or fix the output dir) and rerun the same command (it starts from "
                                   f"scratch).", ckpt_state.EXIT_SAVE_FAILED)
            if self._save_failures >= limit and not final:
                raise StopTraining(f"{self._save_failures} checkpoint writes in a row failed (last: {error}). "
                                   f"Last good checkpoint: {self.last_good}. Free disk space (or fix the "
                                   f"output dir) and rerun the same command to resume from it.",
                                   ckpt_state.EXIT_SAVE_FAILED)
            log.warning("training continues; the next save retries (%d of %d failures allowed in a row)",
                        self._save_failures, limit)

    def _maybe_save_mid_epoch(self) -> None:
        every = self.cfg["save_every_steps"]
        if every and self.progress.global_step % every == 0 and self.progress.step_in_epoch < self.steps_per_epoch:
            self.save_checkpoint()  # the epoch-end save covers the last step of an epoch

    def stop_preempted(self, waiting: bool = False) -> None:
        how = "while waiting for data " if waiting else ""
        self.save_checkpoint(final=True)
        barrier()
        if self._save_error and self.dist_info.is_main:
            raise StopTraining(f"stopped by a signal {how}after step {self.progress.global_step}, but the checkpoint "
                               f"could not be written ({self._save_error}); the last good one is "
                               f"{self.last_good}. Run the same command to continue from it.", EXIT_PREEMPTED)
        where = self.last_good if self.dist_info.is_main else "by rank 0"
        raise StopTraining(f"stopped by a signal {how}after step {self.progress.global_step}; checkpoint written "
                           f"({where}). Run the same command to continue.", EXIT_PREEMPTED)

    def stop_waiting(self) -> None:
        """A signal while waiting for a batch: the state is that of the last finished step. One process saves it
        (as after a step); with several, the others may be inside a step's collectives, so the run stops with
        the last checkpoint as it is, and the steps since it are redone on resume."""
        if not self.dist_info.distributed:
            self.stop_preempted(waiting=True)
        raise StopTraining(f"stopped by a signal while waiting for data after step {self.progress.global_step}; "
                           f"the last checkpoint is {self.last_good if self.dist_info.is_main else 'rank 0s'}. "
                           f"Run the same command to continue from it.", EXIT_PREEMPTED)

    def _is_log_step(self) -> bool:
        return (self.progress.global_step + 1) % self.cfg["log_every"] == 0

    def log_progress(self, epoch: int, extras: dict, window: probe.Progress, mean_losses: list[float]) -> None:
        # the losses printed and logged are the mean over the steps since the last line, not one step's value
        losses = dict(zip(self.loss_names, mean_losses))
        total, ips = window.total, window.img_per_s
        data_share, mem = self.data_wait.take(), monitor.peak_memory_gib(self.dist_info.device)
        head = (f"epoch {epoch} [{self.progress.step_in_epoch}/{self.steps_per_epoch}] step "
                f"{self.progress.global_step}/{total}")
        rows = []
        for run in self.students:
            pre = prefixed(self.prefix(run), ("loss", "lr", "grad_norm"))
            names = run.distiller.loss_names[1:]
            short = monitor.short_loss_names(names)
            rows.append(dict(key=run.key if self.multi else None, loss=losses[pre[0]], lr=extras[pre[1]],
                             grad_norm=extras.get(pre[2]), parts={short[n]: losses[k] for n, k in
                                                                  zip(names, prefixed(self.prefix(run), names))}))
        for line in monitor.progress_lines(head, rows, ips, data_share, probe.hms(window.eta_s), mem):
            log.info("%s", line)
        memory = {} if mem is None else {"peak_mem_gib": mem}
        self.metrics.log(self.progress.global_step, prefix="train/", **losses, **extras, img_per_s=ips,
                         data_wait=data_share, epoch=epoch, bad_images=self.progress.bad_images, **memory)

    @torch.no_grad()
    def log_pca(self) -> None:
        """Fig. 3 of the paper on a fixed batch: PCA of teacher vs student patch features (rank 0), per student."""
        if self.pca_batch is None or not self.dist_info.is_main:
            return
        x = self.pca_batch.to(self.dist_info.device)
        key = next(iter(self.teachers))  # the first teacher, on the distillers' grid
        with self.autocast():
            t_patch = prepare_targets(self.raw_teacher_outputs(x), self.grids, self.distiller.grid, None)[key]["patch"]
        for run in self.students:
            run.distiller.eval()
            with self.autocast():
                s_patch = run.distiller.student_features(x)["patch"]
            run.distiller.train()
            tag = f"pca/{run.key}" if self.multi else "pca/input_teacher_student"
            self.metrics.image(tag, pca_figure(x, t_patch, s_patch).numpy(), self.progress.global_step)
        self.metrics.flush()
