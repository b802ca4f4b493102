"""Faults for the pretraining tests, injected from outside the training code by wrapping Trainer methods:
a non-finite loss at a global step, or a SIGTERM / SIGKILL that rank 0 sends itself after a step.

In a test:        with fault_injection.injected(signal_at=4): pretrain.main.main(argv)
In a subprocess:  python tests/fault_injection.py --kill-at-step 8 -- <pretrain.main flags>
                  (under torchrun: torchrun ... tests/fault_injection.py --signal-at-step 4 -- <flags>)
"""
import argparse
import contextlib
import os
import signal
import sys


class _Direct:
    """monkeypatch's setattr for a process that runs one training command and ends."""

    @staticmethod
    def setattr(target, name, value):
        setattr(target, name, value)


def inject(patcher=_Direct, nan_at: int | None = None, signal_at: int | None = None,
           kill_at: int | None = None) -> None:
    """nan_at: the losses of global step k become NaN (before the finiteness check, as a diverging run's would).
    signal_at / kill_at: after step k (once its mid-epoch checkpoint, if any, is written), rank 0 sends itself
    SIGTERM (a preemption) / SIGKILL (a hard crash)."""
    from pretrain.engine import Trainer

    if nan_at is not None:
        losses = Trainer.student_losses

        def student_losses(self, *args, **kwargs):
            own = losses(self, *args, **kwargs)
            if self.progress.global_step == nan_at:
                own = {k: v * float("nan") for k, v in own.items()}
            return own

        patcher.setattr(Trainer, "student_losses", student_losses)
    for step, signum in ((signal_at, signal.SIGTERM), (kill_at, signal.SIGKILL)):
        if step is None:
            continue
        after = Trainer._maybe_save_mid_epoch

        def save_then_signal(self, after=after, step=step, signum=signum):
            after(self)
            if self.dist_info.is_main and self.progress.global_step - 1 == step:
                os.kill(os.getpid(), signum)

        patcher.setattr(Trainer, "_maybe_save_mid_epoch", save_then_signal)


@contextlib.contextmanager
def injected(**faults):
    """inject(**faults) for the duration of a `with` block."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        inject(mp, **faults)
        yield


def main(argv=None) -> int:
    p = argparse.ArgumentParser("tests/fault_injection.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--nan-at-step", type=int)
    p.add_argument("--signal-at-step", type=int)
    p.add_argument("--kill-at-step", type=int)
    p.add_argument("pretrain_args", nargs=argparse.REMAINDER, help="-- then pretrain.main's flags")
    a = p.parse_args(argv)
    inject(nan_at=a.nan_at_step, signal_at=a.signal_at_step, kill_at=a.kill_at_step)
    from pretrain import main as pretrain_main

    args = a.pretrain_args[1:] if a.pretrain_args[:1] == ["--"] else a.pretrain_args
    return pretrain_main.main(args)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo: pretrain, models
    sys.exit(main())
