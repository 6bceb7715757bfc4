"""Errors that end a command with a message instead of a traceback (the CLI prints them as they are)."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (out of memory, repeated non-finite values); the message says what to change."""


class CheckpointError(OSError):
    """A checkpoint could not be written; the previous ones are untouched."""


class DataError(ValueError):
    """A bad row under ``strict=True``, or a source that cannot be read at all; the message names the file."""
