"""Stem's one exception tree.

Every error Stem raises on purpose derives from :class:`StemError`. Driver errors
(sqlite3, redis, psycopg, OSError) are translated at the adapter boundary, so callers
catch Stem's types and never a driver's. A class docstring is its default message.
"""

from __future__ import annotations


class StemError(Exception):
    """Stem failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or type(self).__name__).strip())


class ConfigError(StemError):
    """The configuration is invalid."""


class DecodeError(StemError):
    """A message could not be decoded."""


class EncodeError(StemError):
    """A message could not be encoded as JSON."""


class EnvelopeTooLarge(EncodeError, DecodeError):
    """The encoded message is larger than the configured limit."""


class SignatureError(StemError):
    """A message failed signature verification.

    ``reason`` is one of the dead-letter reasons (``signature-missing``,
    ``signature-invalid``, ``signature-unknown-key``, ``signature-replayed``,
    ``signature-expired``).
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason


class BrokerError(StemError):
    """The broker failed."""


class BrokerConnectionError(BrokerError):
    """The broker could not be reached."""


class BrokerTimeoutError(BrokerConnectionError):
    """The broker took the call and did not answer in time: it may or may not have been
    applied, so a publish is not sent again (a second copy would run)."""


class BackendError(StemError):
    """The result backend failed."""


class BackendConnectionError(BackendError):
    """The result backend could not be reached."""


class UnsupportedURL(ConfigError):
    """This broker or backend URL scheme is not supported."""


class TaskNotRegistered(StemError):
    """No task is registered under this name."""


class TaskError(StemError):
    """A task failed; ``type_name``, ``message`` and ``traceback`` describe the failure."""

    def __init__(
        self, type_name: str, message: str, traceback: str | None = None, task_id: str = ""
    ) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.error_message = message
        self.traceback = traceback
        self.task_id = task_id


class ResultTimeout(StemError, TimeoutError):
    """The result was not ready within the timeout."""


class TaskRevoked(StemError):
    """The task was revoked."""


class TaskExpired(StemError):
    """The task expired before it could run."""


class SoftTimeLimitExceeded(StemError):
    """The task ran past its soft time limit."""


class HardTimeLimitExceeded(StemError):
    """The task ran past its hard time limit and was killed."""


class WorkerLost(StemError):
    """The process running the task died."""
