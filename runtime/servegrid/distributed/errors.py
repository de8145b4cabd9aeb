"""Errors of the distributed runtime, one class per thing a caller may want to handle."""

from __future__ import annotations


class RuntimeErrorBase(Exception):
    """Base of every error the distributed runtime raises."""


class NoInstancesError(RuntimeErrorBase):
    """No live instance of the endpoint is registered."""


class InstanceUnavailableError(RuntimeErrorBase):
    """Could not reach an instance (connection refused or reset before any response)."""

    def __init__(self, instance_id: int, reason: str) -> None:
        super().__init__(f"instance {instance_id:x} unavailable: {reason}")
        self.instance_id = instance_id


class ConnectionLostError(RuntimeErrorBase):
    """The connection to an instance broke after the stream had produced responses."""

    instance_id: int | None = None  # set by EndpointClient.call_with_retry


class RemoteError(RuntimeErrorBase):
    """The remote handler raised; ``code`` names the kind, ``message`` says what happened."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class EndpointNotFoundError(RemoteError):
    def __init__(self, message: str) -> None:
        super().__init__("endpoint_not_found", message)


class SetupError(RuntimeErrorBase):
    """Something the operator must fix before the runtime can start: a missing or unsafe
    cluster secret, a discovery directory others could write to. The message says what was
    wrong, where, and what to do; entry points print it as one line, without a traceback."""


class ClusterSecretError(SetupError):
    """The cluster secret is missing where it is required, or unreadable, or unsafe."""


class UnsafePathError(SetupError):
    """A file or directory the runtime trusts is owned by another user or writable by others."""


class AuthenticationError(InstanceUnavailableError):
    """The request-plane handshake failed: the two processes do not share the cluster secret.

    An ``InstanceUnavailableError``: a caller skips that instance and tries another, and the
    message (what to set) reaches the user if none is left.
    """
