"""The kavach exception tree.

Every failure on the create / exec / destroy path raises a subclass of
:class:`KavachError`, so callers can catch one base class. Each class's docstring
says *when* it is raised. Messages name the cause (the field, the backend, the
missing control); they never contain secret values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kavach.scanning.findings import Finding


class KavachError(Exception):
    """Base class of every error kavach raises on purpose."""


class PolicyError(KavachError, ValueError):
    """A policy or configuration value is invalid; the message names the field and the value."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}: {reason} (got {value!r})")


class BackendError(KavachError):
    """Base class of errors raised by an isolation backend."""


class BackendUnavailable(BackendError):
    """The backend cannot run on this host; the message says why (binary, device, kernel feature)."""

    def __init__(self, backend: str, reason: str) -> None:
        self.backend = backend
        self.reason = reason
        super().__init__(f"backend {backend} is unavailable: {reason}")


class SandboxCreateError(BackendError):
    """The sandbox could not be built as the policy asked (fail closed)."""


class ScoreTooLow(SandboxCreateError):
    """The achieved strength score is below ``min_score``; the message names the missing controls."""

    def __init__(self, achieved: int, required: int, missing: Sequence[str]) -> None:
        self.achieved = achieved
        self.required = required
        self.missing = tuple(missing)
        what = ", ".join(self.missing) if self.missing else "no control can raise it on this backend"
        super().__init__(f"score {achieved} is below min_score {required}; not enforced: {what}")


class AgentRevoked(SandboxCreateError):
    """The agent id was revoked by threat escalation; an operator must clear it first."""


class ExecError(KavachError):
    """A command could not be started or supervised inside the sandbox."""


class ExecTimeout(ExecError):
    """A command exceeded its wall-clock or CPU budget (raised only where a result cannot be returned)."""


class GuardViolation(ExecError):
    """A runtime guard refused the command before it ran."""

    def __init__(self, rule: str, detail: str) -> None:
        self.rule = rule
        self.detail = detail
        super().__init__(f"guard {rule}: {detail}")


class ExternalizationBlocked(KavachError):
    """The externalization gate blocked output or a file; ``findings`` says why."""

    def __init__(self, message: str, findings: Sequence[Finding]) -> None:
        self.findings = tuple(findings)
        super().__init__(message)


class InvalidTransition(KavachError):
    """A lifecycle call is not allowed in the sandbox's current state; nothing was changed."""

    def __init__(self, current: str, target: str) -> None:
        self.current = current
        self.target = target
        super().__init__(f"invalid transition {current} -> {target}")


class CredentialError(KavachError):
    """A secret could not be resolved or injected; the message names the secret, never its value."""


class AuditError(KavachError):
    """The audit log could not be written, read or verified, or its key is missing."""


class QuarantineError(KavachError):
    """A quarantine item is missing or the requested workflow step is not allowed."""


__all__ = [
    "AgentRevoked",
    "AuditError",
    "BackendError",
    "BackendUnavailable",
    "CredentialError",
    "ExecError",
    "ExecTimeout",
    "ExternalizationBlocked",
    "GuardViolation",
    "InvalidTransition",
    "KavachError",
    "PolicyError",
    "QuarantineError",
    "SandboxCreateError",
    "ScoreTooLow",
]
