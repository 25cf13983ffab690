"""Errors that end a run, each carrying the documented exit code of its class."""


class TracerError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 3


class BadInputError(TracerError):
    """The user's input (paths, files, arrays, flags) cannot be used as given."""

    exit_code = 2


class ConversionError(TracerError):
    """The checkpoint cannot be mapped completely onto the target model."""

    exit_code = 3


class ParityError(TracerError):
    """The converted model does not compute what the original computes."""

    exit_code = 1
