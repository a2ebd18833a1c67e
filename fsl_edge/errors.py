"""The error taxonomy. Library code raises these; only the CLI maps them to messages and exit codes.

Every error's message names the problem and, where there is one, the fix. Errors caused by
another library are chained (`raise ... from e`) so the original traceback is kept for debugging.
"""

from __future__ import annotations


class FslError(Exception):
    """Base of every error fsl-edge raises on purpose."""

    exit_code = 1


class PermanentError(FslError):
    """Retrying the same call cannot succeed: the input or the configuration must change."""


class TemporaryError(FslError):
    """The call may succeed later (a broker down, a peer not yet there); callers may retry."""

    exit_code = 75  # EX_TEMPFAIL


class ConfigError(PermanentError):
    """A setting, option or argument is invalid."""

    exit_code = 2


class ModelError(PermanentError):
    """A model cannot be found, loaded or used."""

    exit_code = 3


class UnsupportedModelError(ModelError):
    """The model's architecture cannot be split; the message says why."""


class SplitError(ModelError):
    """The requested cut does not fit the model."""


class DataError(PermanentError):
    """A dataset file is missing, empty or malformed."""

    exit_code = 4


class CodecError(PermanentError):
    """Bytes could not be turned into tensors (or back); the message names the stage."""

    exit_code = 5


class ProtocolError(PermanentError):
    """A message on the wire is malformed, of an unknown version, or not what was expected."""

    exit_code = 6


class LimitError(ProtocolError):
    """A message, or what receiving it would hold in memory, exceeds a configured bound: the
    receiver drops it and counts it as `overflow`; an honest sender's resend gets through later."""


class TransportError(TemporaryError):
    """The broker could not be reached or dropped the connection."""
