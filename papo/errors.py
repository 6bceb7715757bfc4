"""Errors that end a command with a message instead of a traceback (the CLI prints them as they are).

``UserError``: the input is wrong (a config value, a data file, a path, a flag); one line says which and why.
Anything else that goes wrong is papo's fault and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user: the message names the file, row, key or flag."""


class ConfigError(UserError):
    """A config value, preset or override that papo cannot use; the message names the key."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (out of memory, repeated non-finite values); the message says what to change."""


class CheckpointError(OSError):
    """A checkpoint could not be written; the previous ones are untouched."""


class DataError(UserError):
    """A bad row under ``strict=True``, or a source that cannot be read at all; the message names the file."""
