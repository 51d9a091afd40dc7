"""Sandbox configuration: which backend, which policy, and what surrounds it.

:class:`SandboxConfig` is a frozen value; :meth:`SandboxConfig.builder` gives a fluent
builder with the specification's methods (``backend``, ``inner_backend``, ``policy``,
``policy_seccomp``, ``network``, ``timeout_ms``, ``agent_id``, ``externalization``, ``env``,
``workdir``, ``secrets``, ``min_score`` ...).
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kavach.backends.names import Backend
from kavach.errors import PolicyError
from kavach.policy import ENV_NAME_RE, NetworkMode, NetworkPolicy, SandboxPolicy, SeccompProfile

if TYPE_CHECKING:
    from kavach.credentials import CredentialStore, ProxyConfig, SecretRef
    from kavach.scanning.gate import ExternalizationPolicy
    from kavach.threat import ThreatAssessment

_AGENT_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")


@dataclass(frozen=True)
class AuditSettings:
    """Where and how lifecycle events are recorded. On by default; off only with ``enabled=False``.

    ``path``/``key_file``/``key`` default to ``KAVACH_AUDIT_LOG``, ``KAVACH_AUDIT_KEY_FILE``,
    ``KAVACH_AUDIT_KEY`` and then the user's data directory (see :mod:`kavach.audit`).
    """

    enabled: bool = True
    path: str | None = None
    key_file: str | None = None
    key: bytes | None = field(default=None, repr=False)
    fsync: bool = True


AlertCallback = Callable[["ThreatAssessment"], Awaitable[None] | None]


@dataclass(frozen=True)
class SandboxConfig:
    """Everything :meth:`kavach.Sandbox.create` needs.

    ``backend=None`` (or ``"auto"``) picks the strongest usable backend for the policy (or
    the strongest that reaches ``min_score``); ``backend`` and ``inner_backend`` take a
    :class:`Backend` or its name. ``workdir`` is a host directory bound read-write at
    ``policy.filesystem.workdir``; without it the workdir is a tmpfs that lives as long
    as the sandbox. ``externalization=None`` means the default gate (on for every backend
    but Noop).
    """

    backend: Backend | None = None
    inner_backend: Backend | None = None
    policy: SandboxPolicy = field(default_factory=SandboxPolicy)
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    workdir: str | None = None
    secrets: tuple[SecretRef, ...] = ()
    credential_store: CredentialStore | None = field(default=None, repr=False)
    proxy: ProxyConfig | None = None
    min_score: int = 0
    agent_id: str | None = None
    externalization: ExternalizationPolicy | None = None
    audit: AuditSettings = field(default_factory=AuditSettings)
    quarantine_dir: str | None = None
    hostname: str = "kavach"
    on_alert: AlertCallback | None = None
    # Probe the sandbox from inside at creation (namespaces, mounts, seccomp, no_new_privs,
    # capabilities) and fail if a claimed control is not seen. Costs one exec per create.
    integrity_check: bool = True

    def __post_init__(self) -> None:
        # A backend may be given by name, as the builder and the CLI take it ("auto": None).
        for name in ("backend", "inner_backend"):
            object.__setattr__(self, name, _backend_field(name, getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Check every field; raise :class:`PolicyError` naming the first bad one."""
        if not isinstance(self.min_score, int) or isinstance(self.min_score, bool) or not 0 <= self.min_score <= 100:
            raise PolicyError("min_score", self.min_score, "must be an integer from 0 to 100")
        for key in self.env:
            if not ENV_NAME_RE.fullmatch(key):
                raise PolicyError(f"env.{key}", key, "not a valid environment variable name")
        if self.workdir is not None:
            path = Path(self.workdir)
            if not path.is_absolute():
                raise PolicyError("workdir", self.workdir, "must be an absolute path")
            if not path.is_dir():
                raise PolicyError("workdir", self.workdir, "is not an existing directory")
        if self.agent_id is not None and not _AGENT_ID.match(self.agent_id):
            raise PolicyError("agent_id", self.agent_id, "use 1-128 of A-Z a-z 0-9 _ . : @ -")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}", self.hostname):
            raise PolicyError("hostname", self.hostname, "not a valid hostname label")
        if self.inner_backend is not None and self.inner_backend is self.backend:
            raise PolicyError("inner_backend", self.inner_backend.value, "must differ from the outer backend")
        if self.inner_backend is Backend.NOOP:
            raise PolicyError("inner_backend", "noop", "noop cannot be an inner layer")
        self.policy.validate()

    @classmethod
    def builder(cls) -> SandboxConfigBuilder:
        """A fluent builder starting from the defaults."""
        return SandboxConfigBuilder()


def _backend_field(name: str, value: object) -> Backend | None:
    """``value`` of field ``name`` as a Backend; ``"auto"`` (outer backend only) is None."""
    if value is None or isinstance(value, Backend):
        return value
    if not isinstance(value, str):
        raise PolicyError(name, value, "must be a Backend or a backend name")
    if name == "backend" and value.strip().lower() == "auto":
        return None
    try:
        return Backend.parse(value)
    except PolicyError as exc:
        raise PolicyError(name, value, exc.reason) from None


class SandboxConfigBuilder:
    """Fluent construction of a :class:`SandboxConfig`; every method returns the builder."""

    def __init__(self) -> None:
        self._fields: dict[str, Any] = {}
        self._policy = SandboxPolicy()

    def backend(self, backend: Backend | str | None) -> SandboxConfigBuilder:
        """Use ``backend`` (a name or ``Backend``); ``None`` or ``"auto"`` picks the strongest usable one."""
        self._fields["backend"] = None if backend in (None, "auto") else Backend.parse(backend)
        return self

    def inner_backend(self, backend: Backend | str | None) -> SandboxConfigBuilder:
        """Run an inner kavach layer of ``backend`` inside the outer backend (composite)."""
        self._fields["inner_backend"] = None if backend is None else Backend.parse(backend)
        return self

    def policy(self, policy: SandboxPolicy | str) -> SandboxConfigBuilder:
        """Use a policy object, a preset name (minimal, basic, strict) or a policy file path."""
        if isinstance(policy, SandboxPolicy):
            self._policy = policy
        elif policy.strip().lower() in ("minimal", "basic", "strict"):
            self._policy = SandboxPolicy.preset(policy)
        else:
            self._policy = SandboxPolicy.load(policy)
        return self

    def policy_seccomp(self, profile: SeccompProfile | str) -> SandboxConfigBuilder:
        """Set the seccomp profile (none, basic, strict)."""
        try:
            parsed = SeccompProfile(str(profile).lower())
        except ValueError:
            raise PolicyError("seccomp.profile", profile, "expected one of none, basic, strict") from None
        self._policy = replace(self._policy, seccomp=replace(self._policy.seccomp, profile=parsed))
        return self

    def network(
        self,
        mode: NetworkMode | str,
        *,
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
    ) -> SandboxConfigBuilder:
        """Set the network mode (off, proxy, host) and, for proxy, the egress allow/deny lists."""
        try:
            parsed = NetworkMode(str(mode).lower())
        except ValueError:
            raise PolicyError("network.mode", mode, "expected one of off, proxy, host") from None
        network = NetworkPolicy(mode=parsed, egress_allowlist=tuple(allow), egress_denylist=tuple(deny))
        self._policy = replace(self._policy, network=network)
        return self

    def timeout_ms(self, timeout_ms: int) -> SandboxConfigBuilder:
        """Default wall-clock timeout of each exec, in milliseconds."""
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms <= 0:
            raise PolicyError("timeout_ms", timeout_ms, "must be a positive integer")
        resources = replace(self._policy.resources, wall_timeout_ms=timeout_ms)
        self._policy = replace(self._policy, resources=resources)
        return self

    def agent_id(self, agent_id: str) -> SandboxConfigBuilder:
        """The agent on whose behalf commands run (threat tracking, audit, revocation)."""
        self._fields["agent_id"] = agent_id
        return self

    def externalization(self, policy: ExternalizationPolicy) -> SandboxConfigBuilder:
        """Gate thresholds for what leaves the sandbox."""
        self._fields["externalization"] = policy
        return self

    def env(self, values: Mapping[str, str] | None = None, /, **kwargs: str) -> SandboxConfigBuilder:
        """Add environment variables set in every exec."""
        merged = dict(self._fields.get("env", {}))
        merged.update(values or {})
        merged.update(kwargs)
        self._fields["env"] = merged
        return self

    def workdir(self, path: str | os.PathLike[str]) -> SandboxConfigBuilder:
        """Bind the host directory ``path`` read-write as the sandbox's working directory."""
        self._fields["workdir"] = os.fspath(path)
        return self

    def secrets(self, *refs: SecretRef, store: CredentialStore | None = None) -> SandboxConfigBuilder:
        """Secrets to inject (see :mod:`kavach.credentials`), resolved from ``store``."""
        self._fields["secrets"] = tuple(self._fields.get("secrets", ())) + refs
        if store is not None:
            self._fields["credential_store"] = store
        return self

    def proxy(self, config: ProxyConfig) -> SandboxConfigBuilder:
        """Egress proxy rules (allowlist, credential headers) for network mode ``proxy``."""
        self._fields["proxy"] = config
        return self

    def min_score(self, value: int) -> SandboxConfigBuilder:
        """Fail creation unless the enforced score reaches ``value``."""
        self._fields["min_score"] = value
        return self

    def audit(self, settings: AuditSettings) -> SandboxConfigBuilder:
        """Audit log settings (``AuditSettings(enabled=False)`` turns it off)."""
        self._fields["audit"] = settings
        return self

    def hostname(self, name: str) -> SandboxConfigBuilder:
        """Hostname inside the sandbox."""
        self._fields["hostname"] = name
        return self

    def on_alert(self, callback: AlertCallback) -> SandboxConfigBuilder:
        """Called with the threat assessment when escalation reaches the alert tier or above."""
        self._fields["on_alert"] = callback
        return self

    def build(self) -> SandboxConfig:
        """The validated configuration."""
        return SandboxConfig(policy=self._policy, **self._fields)


__all__ = ["AlertCallback", "AuditSettings", "SandboxConfig", "SandboxConfigBuilder"]
