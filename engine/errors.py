"""Exceptions raised by the engine.

Every error a user can cause has its own class and a message that names the file or
value at fault and says what to do about it. Callers (the CLI, the dashboard) catch
``ExplaindError`` and show the message; nothing else should reach a user as a traceback.
"""


class ExplaindError(Exception):
    """Base class of every error the engine raises on purpose."""


class RunNotFoundError(ExplaindError):
    """A run directory or run database does not exist."""


class CorruptRunError(ExplaindError):
    """A run directory exists but a file in it is unreadable, foreign or inconsistent."""


class IncompleteRunError(ExplaindError):
    """A recording stopped before ``Recorder.close()``; only some steps are available."""


class SchemaVersionError(ExplaindError):
    """A file was written by a newer or unknown version of the format."""


class UnsupportedOptimizerError(ExplaindError):
    """The recorded optimizer cannot be split into per-example terms (the data view)."""


class BadInputError(ExplaindError):
    """An argument, option or recorded value is invalid."""


class UntrustedRunError(ExplaindError):
    """A run names code to import (its model, data or loss) and the user did not say to trust it."""


class StoreError(ExplaindError):
    """A run database cannot be opened, read or written."""


class StoreCorruptError(StoreError):
    """A run database file is truncated, damaged or not a DuckDB file."""


class StoreSchemaError(StoreError):
    """A run database has missing tables or a schema version this release cannot read."""


class StoreNameError(StoreError):
    """A run name is not a plain file name."""


def unreadable_reason(exc: BaseException) -> str:
    """The first line of a parser's complaint about a file, for a message that says the file is
    truncated or foreign. ``torch.load`` failures that suggest ``weights_only=False`` are reduced to
    the exception's type: that advice would run code from the file."""
    lines = str(exc).splitlines()
    reason = lines[0] if lines else type(exc).__name__
    return type(exc).__name__ if "weights_only" in reason else reason
