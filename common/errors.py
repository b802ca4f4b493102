"""One error boundary for every entry point: user errors become one clear message and exit code 2.

    @cli("linear_eval.main")
    def main(argv=None) -> int: ...

`UserError` (and its subclasses in `models.errors`) raised anywhere below `main` is printed as
`prog: error: <message>` on stderr and `main` returns EXIT_USER_ERROR, with no traceback: the message
already says what was expected and how to fix it. Every other exception is a bug and propagates with
its traceback. Ctrl-C outside a training loop returns 130 without a traceback.
"""
import functools
import sys

from models.errors import CheckpointError, ConfigError, DataError, MissingFileError, UserError

__all__ = ["UserError", "ConfigError", "MissingFileError", "CheckpointError", "DataError", "cli",
           "EXIT_USER_ERROR", "EXIT_INTERRUPTED"]

EXIT_USER_ERROR = 2  # argparse's own code for a bad command line: one code for every user error
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention


def one_line(message: str) -> str:
    """A user error raised in a DataLoader worker reaches the trainer re-raised by torch with its wrapper text
    ("Caught X in DataLoader worker N. Original Traceback ...") around the original message: keep that one."""
    if message.startswith("Caught ") and "Original Traceback" in message:
        return message.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return message


def cli(prog: str):
    """Decorate an entry point's `main(argv=None) -> int` with the user-error boundary."""
    def wrap(main):
        @functools.wraps(main)
        def guarded(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except UserError as e:
                print(f"{prog}: error: {one_line(str(e))}", file=sys.stderr)
                return EXIT_USER_ERROR
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return EXIT_INTERRUPTED
            finally:
                from common.rundir import release_run_dirs  # the run-dir locks this entry point took

                release_run_dirs()
        return guarded
    return wrap
