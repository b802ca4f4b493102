"""The project's user-error types. They live in models/ (which imports nothing from the repo) so that
every layer, models/ included, can raise them; `common.errors` turns them into one line and exit 2.

A `UserError` means "what was asked for cannot be done as asked": a missing or unreadable file, a bad
flag, a dataset that does not fit. Its message says what was expected and how to fix it. Anything else
that escapes an entry point is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the input (flags, files, data); printed as one message, exit code 2, no traceback."""


class ConfigError(UserError, ValueError):
    """A flag or configuration value that is invalid or inconsistent."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that exists but cannot be used: unreadable, unsafe, or the wrong architecture."""


class DataError(UserError, ValueError):
    """A dataset that cannot be used as given: empty, a single class, classes that do not match."""
