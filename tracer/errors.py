"""Errors that end a run, each carrying the documented exit code of its class (see README, "Exit codes and errors").

Every message names the cause and what to do about it.
"""


class TracerError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 3


class BadInputError(TracerError):
    """The user's input (paths, files, arrays, flags, output locations) cannot be used as given."""

    exit_code = 2


class ConversionError(TracerError):
    """The checkpoint cannot be mapped completely onto the target model."""

    exit_code = 3


class ParityError(TracerError):
    """The converted model does not compute what the original computes. `result` holds the run's findings
    (rows, hints, report path) when they were gathered before the failure."""

    exit_code = 1

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class PushError(TracerError):
    """The conversion succeeded and the model is saved locally, but pushing it to the hub failed."""

    exit_code = 4
