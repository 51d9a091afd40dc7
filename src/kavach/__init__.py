"""kavach: run untrusted commands in a scored sandbox, and let nothing leave unchecked.

The public API is re-exported here; import from ``kavach``, not from submodules::

    import kavach

    result = kavach.run("echo hi", policy=kavach.SandboxPolicy.strict())
    print(result.stdout_text, result.score, result.verdict)

    async with await kavach.Sandbox.create(kavach.SandboxConfig()) as sandbox:
        result = await sandbox.exec(["python3", "-c", "print(6 * 7)"])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kavach.backends.names import Backend
from kavach.errors import (
    AgentRevoked,
    AuditError,
    BackendError,
    BackendUnavailable,
    CredentialError,
    ExecError,
    ExecTimeout,
    ExternalizationBlocked,
    GuardViolation,
    InvalidTransition,
    KavachError,
    PolicyError,
    QuarantineError,
    SandboxCreateError,
    ScoreTooLow,
)

if TYPE_CHECKING:
    from kavach.config import AuditSettings, SandboxConfig, SandboxConfigBuilder
    from kavach.lifecycle import ExecResult, Sandbox, SandboxState, SpawnHandle, SyncSandbox
    from kavach.policy import NetworkMode, SandboxPolicy, SeccompProfile, merge
    from kavach.pool import SandboxPool
    from kavach.scanning.findings import Finding, Severity, Verdict
    from kavach.scoring import Control, Enforcement, StrengthScore, score, score_backend

# Imported on first use: the Process backend's spawner imports kavach.* and must start fast,
# without the scanners, the audit chain and their dependencies.
_LAZY = {
    "AuditSettings": "kavach.config",
    "SandboxConfig": "kavach.config",
    "SandboxConfigBuilder": "kavach.config",
    "ExecResult": "kavach.lifecycle",
    "Sandbox": "kavach.lifecycle",
    "SandboxState": "kavach.lifecycle",
    "SpawnHandle": "kavach.lifecycle",
    "SyncSandbox": "kavach.lifecycle",
    "NetworkMode": "kavach.policy",
    "SandboxPolicy": "kavach.policy",
    "SeccompProfile": "kavach.policy",
    "merge": "kavach.policy",
    "SandboxPool": "kavach.pool",
    "Finding": "kavach.scanning.findings",
    "Severity": "kavach.scanning.findings",
    "Verdict": "kavach.scanning.findings",
    "Control": "kavach.scoring",
    "Enforcement": "kavach.scoring",
    "StrengthScore": "kavach.scoring",
    "score": "kavach.scoring",
    "score_backend": "kavach.scoring",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'kavach' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"


def run(
    command: str | Sequence[str],
    *,
    policy: SandboxPolicy | None = None,
    backend: Backend | str | None = None,
    config: SandboxConfig | None = None,
    stdin: bytes | str | None = None,
    env: Mapping[str, str] | None = None,
    timeout_ms: int | None = None,
) -> ExecResult:
    """Create a sandbox, run one command, destroy the sandbox; blocking.

    ``config`` wins over ``policy``/``backend`` when given. Must not be called from a
    running event loop (use :class:`Sandbox` there).
    """
    import asyncio

    from kavach.config import SandboxConfig
    from kavach.lifecycle import Sandbox, _refuse_running_loop

    _refuse_running_loop("kavach.run()")

    if config is None:
        builder = SandboxConfig.builder().backend(backend)
        if policy is not None:
            builder.policy(policy)
        config = builder.build()

    async def _run() -> ExecResult:
        async with await Sandbox.create(config) as sandbox:
            return await sandbox.exec(command, stdin=stdin, env=env, timeout_ms=timeout_ms)

    return asyncio.run(_run())


__all__ = [
    "AgentRevoked",
    "AuditError",
    "AuditSettings",
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "Control",
    "CredentialError",
    "Enforcement",
    "ExecError",
    "ExecResult",
    "ExecTimeout",
    "ExternalizationBlocked",
    "Finding",
    "GuardViolation",
    "InvalidTransition",
    "KavachError",
    "NetworkMode",
    "PolicyError",
    "QuarantineError",
    "Sandbox",
    "SandboxConfig",
    "SandboxConfigBuilder",
    "SandboxCreateError",
    "SandboxPolicy",
    "SandboxPool",
    "SandboxState",
    "ScoreTooLow",
    "SeccompProfile",
    "Severity",
    "SpawnHandle",
    "StrengthScore",
    "SyncSandbox",
    "Verdict",
    "__version__",
    "merge",
    "run",
    "score",
    "score_backend",
]
