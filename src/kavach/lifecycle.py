"""The sandbox lifecycle: create, exec, spawn, pause, resume, stop, destroy.

:class:`Sandbox` composes a backend instance with the runtime guards, the
externalization gate, threat classification, the quarantine store, the credential
proxy and the audit chain. Nothing here fails open: if a piece the configuration asks
for cannot be set up, creation fails and whatever was started is destroyed.

States follow the specification exactly::

    Created -> Running; Running -> Paused | Stopped | Destroyed;
    Paused -> Running | Stopped | Destroyed; Stopped -> Destroyed.  Destroyed is terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import inspect
import os
import secrets as _secrets
import shlex
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from kavach import guards, threat
from kavach.audit import AuditLog, open_audit_log
from kavach.backends import registry
from kavach.backends.base import (
    Driver,
    ExecRequest,
    InjectedFile,
    Instance,
    LaunchSpec,
    RawProcess,
    RawResult,
)
from kavach.backends.names import Backend
from kavach.config import SandboxConfig
from kavach.errors import (
    AgentRevoked,
    ExecError,
    ExecTimeout,
    ExternalizationBlocked,
    GuardViolation,
    InvalidTransition,
    KavachError,
    SandboxCreateError,
    ScoreTooLow,
)
from kavach.policy import ENV_NAME_RE, NetworkMode, SandboxPolicy
from kavach.quarantine import QuarantineStore
from kavach.scanning.findings import Finding, Verdict, worst_verdict
from kavach.scanning.gate import (
    INJECTED_SECRET_RULE,
    STREAM_FLUSH_S,
    ExternalizationPolicy,
    Gate,
    GateResult,
    StreamGate,
    redact,
)
from kavach.scanning.secrets import SecretsScanner
from kavach.scoring import Enforcement, StrengthScore, missing_controls, score

if TYPE_CHECKING:
    from kavach.credentials import EgressProxy
    from kavach.guards import ForkBombWatch, IntegrityReport
    from kavach.threat import ThreatAssessment

PROXY_LISTEN = ("127.0.0.1", 3128)
CA_BUNDLE_PATH = "/run/kavach/ca-bundle.pem"
# Output bytes past each cap that exec captures and the gate scans but never releases: a
# secret the cap falls inside is then found whole (PEM blocks of large keys run ~6.5 KiB).
CAP_LOOKAHEAD = 16 * 1024
# How long a stream blocked by the gate waits for its killed command to exit before the
# threat assessment (which may pause the sandbox) goes ahead anyway.
_KILLED_EXIT_WAIT_S = 10.0
_SCRUB_CACHE_ENTRIES = 256  # scrubbed argv words remembered per cache (then forgotten at once)
_SCRUB_SHARED_POLICIES = 16  # gate policies with a shared scrub cache


class SandboxState(StrEnum):
    """Lifecycle states of a sandbox."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DESTROYED = "destroyed"


TRANSITIONS: Mapping[SandboxState, frozenset[SandboxState]] = {
    SandboxState.CREATED: frozenset({SandboxState.RUNNING}),
    SandboxState.RUNNING: frozenset({SandboxState.PAUSED, SandboxState.STOPPED, SandboxState.DESTROYED}),
    SandboxState.PAUSED: frozenset({SandboxState.RUNNING, SandboxState.STOPPED, SandboxState.DESTROYED}),
    SandboxState.STOPPED: frozenset({SandboxState.DESTROYED}),
    SandboxState.DESTROYED: frozenset(),
}


class StateMachine:
    """The specification's FSM. An invalid transition raises and changes nothing."""

    def __init__(self, state: SandboxState = SandboxState.CREATED) -> None:
        self._state = state

    @property
    def state(self) -> SandboxState:
        """The current state."""
        return self._state

    def can(self, target: SandboxState) -> bool:
        """True if ``target`` is reachable from the current state in one step."""
        return target in TRANSITIONS[self._state]

    def check(self, target: SandboxState) -> None:
        """Raise :class:`InvalidTransition` unless ``target`` is allowed now."""
        if not self.can(target):
            raise InvalidTransition(self._state.value, target.value)

    def transition(self, target: SandboxState) -> SandboxState:
        """Move to ``target``; return the previous state."""
        self.check(target)
        previous, self._state = self._state, target
        return previous


@dataclass(frozen=True)
class ExecResult:
    """The result of one command, after the gate.

    ``stdout``/``stderr`` are what the gate released (redacted on warn and quarantine).
    ``exit_code`` is 128+N when the command was killed by signal N; 124-style timeouts set
    ``timed_out`` with the backend's ``reason``.
    """

    exit_code: int
    stdout: bytes
    stderr: bytes
    duration_ms: float
    timed_out: bool
    stdout_truncated: bool
    stderr_truncated: bool
    verdict: Verdict
    findings: tuple[Finding, ...]
    score: StrengthScore
    reason: str | None = None
    quarantine_ids: tuple[str, ...] = ()
    threat: ThreatAssessment | None = None

    @property
    def stdout_text(self) -> str:
        """stdout decoded as UTF-8 (invalid bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        """stderr decoded as UTF-8 (invalid bytes replaced)."""
        return self.stderr.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        """Exit code 0, no timeout, and the gate did not quarantine."""
        return self.exit_code == 0 and not self.timed_out and self.verdict in (Verdict.PASS, Verdict.WARN)

    @property
    def quarantine_id(self) -> str | None:
        """The first quarantine item id, if the gate quarantined anything."""
        return self.quarantine_ids[0] if self.quarantine_ids else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output (findings carry redacted evidence only)."""
        return {
            "exit_code": self.exit_code,
            "stdout": self.stdout_text,
            "stderr": self.stderr_text,
            "duration_ms": round(self.duration_ms, 3),
            "timed_out": self.timed_out,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "reason": self.reason,
            "verdict": self.verdict.value,
            "findings": [f.to_dict() for f in self.findings],
            "score": int(self.score),
            "score_label": self.score.label,
            "quarantine_ids": list(self.quarantine_ids),
            "threat": self.threat.to_dict() if self.threat is not None else None,
        }


def _command_argv(command: str | Sequence[str], backend: Backend) -> tuple[tuple[str, ...], str | None]:
    if isinstance(command, str):
        if not command.strip():
            raise ExecError("empty command")
        if backend is Backend.WASM:
            # No shell in wasm: the string is split into the module's argv (the driver refuses
            # shell operators); audit and guards see the real argv.
            try:
                return tuple(shlex.split(command)), command
            except ValueError as exc:
                raise ExecError(f"cannot parse command: {exc}") from None
        return ("/bin/sh", "-c", command), command
    argv = tuple(command)
    if not argv or not all(isinstance(a, str) for a in argv) or not argv[0]:
        raise ExecError("command must be a non-empty string or a non-empty list of strings")
    return argv, None


@dataclass
class _Services:
    """What surrounds the backend instance; built before it starts, closed after it is gone."""

    audit: AuditLog | None
    gate: Gate | None
    quarantine: QuarantineStore | None
    assessor: threat.ThreatAssessor
    proxy: EgressProxy | None = None
    proxy_task: asyncio.Task[None] | None = None
    base_env: dict[str, str] = field(default_factory=dict)
    stdin_secret: bytes | None = None
    # What the argv scrub depends on besides the text, when sandboxes may share its results:
    # the gate policy's repr, or None when the gate knows injected secret values (then each
    # sandbox keeps its own cache).
    scrub_key: str | None = None
    quarantine_enabled: bool = False  # the gate can quarantine: the store must be open before any exec


class Sandbox:
    """One isolated environment. Create with ``await Sandbox.create(config)``; use as ``async with``.

    Leaving the ``async with`` block destroys the sandbox, on error and on cancellation too.
    For code without asyncio, see :meth:`Sandbox.sync` and :func:`kavach.run`.
    """

    def __init__(
        self,
        *,
        sandbox_id: str,
        config: SandboxConfig,
        backend: Backend,
        instance: Instance,
        enforcement: Enforcement,
        services: _Services,
    ) -> None:
        self.id = sandbox_id
        self.config = config
        self.backend = backend
        self._instance = instance
        self._enforcement = enforcement
        self._score = score(enforcement)
        self._services = services
        self._fsm = StateMachine()
        self._lock = asyncio.Lock()
        self._fork_watch: ForkBombWatch | None = None
        self._integrity: IntegrityReport | None = None
        self._empty_gate: tuple[Gate, GateResult] | None = None
        self._scrubbed: dict[bytes, str] = _scrub_cache(services.scrub_key)

    # -- creation -----------------------------------------------------------------------------

    @classmethod
    async def create(cls, config: SandboxConfig | None = None, *, driver: Driver | None = None) -> Sandbox:
        """Validate, resolve the backend, start it and check the score (fail closed).

        ``driver`` replaces the registry's driver for ``config.backend`` -- for tests, e.g.
        ``NoopDriver(responder=...)``, or for a custom backend.

        Raises :class:`AgentRevoked`, :class:`~kavach.errors.BackendUnavailable`,
        :class:`SandboxCreateError` (including :class:`ScoreTooLow`) or :class:`PolicyError`.
        """
        config = config or SandboxConfig()
        config.validate()
        policy = config.policy
        assessor = threat.ThreatAssessor()
        if config.agent_id is not None and assessor.store.is_revoked(config.agent_id):
            raise AgentRevoked(f"agent {config.agent_id} is revoked; an operator must clear it")
        if driver is not None:
            backend = driver.backend
        else:
            backend = config.backend or (
                registry.resolve_min_strength(policy, config.min_score)
                if config.min_score
                else registry.resolve_best(policy)
            )
            driver = registry.require(backend)
        sandbox_id = f"kv-{_secrets.token_hex(6)}"
        services = _open_services(config, backend, assessor)
        try:
            spec = await _launch_spec(config, sandbox_id, services)
            instance = await driver.start(spec)
        except BaseException as exc:
            _audit_create_failure(services, sandbox_id, config, backend, exc)
            await _close_services(services)
            raise
        try:
            sandbox = cls(
                sandbox_id=sandbox_id,
                config=config,
                backend=backend,
                instance=instance,
                enforcement=instance.enforcement(),
                services=services,
            )
            await sandbox._finish_create()
        except BaseException as exc:
            await instance.destroy()
            _audit_create_failure(services, sandbox_id, config, backend, exc)
            await _close_services(services)
            raise
        return sandbox

    async def _finish_create(self) -> None:
        services = self._services
        if services.proxy is not None:
            listener = self._instance.take_proxy_listener()
            if listener is None:
                raise SandboxCreateError(f"backend {self.backend} gave no proxy listener for network mode proxy")
            services.proxy_task = asyncio.create_task(services.proxy.serve(listener))
        if self.config.integrity_check and self.backend not in (Backend.NOOP, Backend.WASM):
            # The host-side setup runs while the probe runs inside the sandbox; a failure of
            # either fails creation.
            await self._check_integrity_at_create(meanwhile=self._prepare_host_side)
        else:
            self._prepare_host_side()
        if self._score < self.config.min_score:
            raise ScoreTooLow(int(self._score), self.config.min_score, missing_controls(self._enforcement))
        self._fsm.transition(SandboxState.RUNNING)
        self._audit(
            "sandbox.created",
            {
                "backend": self.backend.value,
                "inner_backend": self.config.inner_backend.value if self.config.inner_backend else None,
                "score": int(self._score),
                "label": self._score.label,
                "enforcement": self._enforcement.to_dict(),
            },
        )
        threshold = self.config.policy.guards.fork_bomb_threshold
        if threshold is not None:
            self._fork_watch = guards.ForkBombWatch(self._instance.live_pids, threshold, self._on_fork_bomb)
            self._fork_watch.start()

    def _prepare_host_side(self) -> None:
        """What the first command needs on the host: the quarantine store (opened, fail closed:
        an unusable store fails creation) and the gate's decision on empty output (computed
        now, for a pool in the background, rather than on the first exec)."""
        services = self._services
        if services.quarantine_enabled and services.quarantine is None:
            services.quarantine = QuarantineStore(self.config.quarantine_dir, audit=services.audit)
        if services.gate is not None:
            self._empty_output_result(services.gate, "stdout")

    async def _check_integrity_at_create(self, meanwhile: Callable[[], None] | None = None) -> None:
        """Probe from inside before the first command: a control the backend claims but the
        probe cannot see fails creation. The report joins the enforcement record."""
        report = await guards.check_integrity(self._instance, self._enforcement, meanwhile=meanwhile)
        self._integrity = report
        if not report.ok:
            raise SandboxCreateError("integrity check failed: " + "; ".join(report.problems))
        details = {**self._enforcement.details, "integrity": report.to_dict()}
        self._enforcement = replace(self._enforcement, details=details)

    # -- properties ---------------------------------------------------------------------------

    @property
    def state(self) -> SandboxState:
        """The current lifecycle state."""
        return self._fsm.state

    @property
    def score(self) -> StrengthScore:
        """The strength score computed from :attr:`enforcement`."""
        return self._score

    @property
    def enforcement(self) -> Enforcement:
        """What the backend actually enforced (verified from inside where it can)."""
        return self._enforcement

    @property
    def policy(self) -> SandboxPolicy:
        """The policy this sandbox runs."""
        return self.config.policy

    # -- exec ---------------------------------------------------------------------------------

    def _request(
        self,
        command: str | Sequence[str],
        *,
        stdin: bytes | str | None,
        env: Mapping[str, str] | None,
        timeout_ms: int | None,
        cwd: str | None,
        lookahead: int = 0,
    ) -> ExecRequest:
        """The backend's request; ``lookahead`` bytes past each output cap are captured too
        (the gate scans them so that a secret the cap cuts is found whole, never released)."""
        argv, shell = _command_argv(command, self.backend)
        guards.check_command(argv, self.policy.guards, shell=None if self.backend is Backend.WASM else shell)
        full_env = dict(self._services.base_env)
        full_env.update(env or {})
        if isinstance(stdin, str):
            stdin = stdin.encode()
        if stdin is None:
            stdin = self._services.stdin_secret
        resources = self.policy.resources
        return ExecRequest(
            argv=argv,
            env=full_env,
            stdin=stdin,
            cwd=cwd or self.policy.filesystem.workdir,
            timeout_ms=timeout_ms if timeout_ms is not None else resources.wall_timeout_ms,
            stdout_cap=resources.stdout_cap + lookahead,
            stderr_cap=resources.stderr_cap + lookahead,
            shell=shell,
        )

    def _require_running(self, what: str) -> None:
        if self._fsm.state is not SandboxState.RUNNING:
            raise ExecError(f"cannot {what}: sandbox {self.id} is {self._fsm.state.value}, not running")

    async def exec(
        self,
        command: str | Sequence[str],
        *,
        stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_ms: int | None = None,
        cwd: str | None = None,
    ) -> ExecResult:
        """Run ``command`` to completion: a string runs through ``/bin/sh -c``, a list is an argv.

        Raises :class:`GuardViolation` before running a refused command and
        :class:`ExternalizationBlocked` when the gate blocks the output. A timeout is
        not an exception: the result has ``timed_out`` and the partial output.
        """
        self._require_running("exec")
        try:
            request = self._request(
                command, stdin=stdin, env=env, timeout_ms=timeout_ms, cwd=cwd, lookahead=CAP_LOOKAHEAD
            )
        except GuardViolation as exc:
            await self._on_guard_violation(exc, command)
            raise
        argv = self._scrub_argv(request.argv)  # scanned once, used by both audit entries
        # Durability (docs/audit.md): exec.started is written (one write(2)) before the command
        # is dispatched; the fsync of exec.finished covers both entries, so exec() returns
        # only once both are on disk, with one fsync instead of two.
        self._audit("exec.started", {"argv": argv}, sync=False)
        raw: RawResult | None = None
        try:
            with self._errors_through_gate():
                raw = await self._instance.exec(request)
            return await self._finish_exec(request, raw, argv)
        except asyncio.CancelledError:
            if raw is None:
                # The caller stopped waiting for the command (the backend has killed it, or
                # stopped the WASM module): the log says so.
                self._audit("exec.cancelled", {"argv": argv}, sync=False)
            raise
        finally:
            # On every exit path, errors and cancellation included, nothing stays unsynced
            # (a no-op when exec.finished was written with its fsync).
            self._commit_audit()

    async def _finish_exec(
        self,
        request: ExecRequest,
        raw: RawResult,
        audited_argv: list[str],
        streamed: Mapping[str, StreamGate] | None = None,
        *,
        streamed_assessed: bool = False,
    ) -> ExecResult:
        """Gate the output, assess, quarantine and audit one finished command.

        ``streamed``: the stream gates of a spawned command (its output so far went through
        them; ``raw`` holds only what was not streamed). Their findings and verdict count
        here too (``streamed_assessed``: their findings were already assessed), and once
        one of them blocked, nothing more is released.
        """
        streams = streamed or {}
        caps = self.policy.resources
        streamed_findings = tuple(f for g in streams.values() for f in g.findings)
        streamed_block = any(g.verdict is Verdict.BLOCK for g in streams.values())
        if streamed_block:
            # The rest of a blocked stream is never released, not even as a new artifact:
            # a secret cut at the boundary would leave with its second half.
            blocked = GateResult(Verdict.BLOCK, (), b"", b"")
            outputs = {"stdout": blocked, "stderr": blocked}
        else:
            outputs = {
                "stdout": self._gate_apply(raw.stdout, "stdout", limit=caps.stdout_cap),
                "stderr": self._gate_apply(raw.stderr, "stderr", limit=caps.stderr_cap),
            }
        own = tuple(f for r in outputs.values() for f in r.findings)
        findings = streamed_findings + own
        verdict = worst_verdict(*(r.verdict for r in outputs.values()), *(g.verdict for g in streams.values()))
        assessment = await self._assess(own if streamed_assessed else findings)
        quarantine_ids = self._quarantine(outputs)
        quarantine_ids += self._quarantine(
            {
                f"{name} (streamed)": GateResult(g.verdict, g.findings, b"", g.original)
                for name, g in streams.items()
                if g.verdict is Verdict.QUARANTINE
            }
        )
        self._audit(
            "exec.finished",
            {
                "argv": audited_argv,
                "exit_code": raw.exit_code,
                "duration_ms": round(raw.duration_ms, 3),
                "timed_out": raw.timed_out,
                "reason": raw.reason,
                "verdict": verdict.value,
                "findings": _finding_counts(findings),
                "quarantine_ids": list(quarantine_ids),
            },
        )
        if verdict is Verdict.BLOCK and not streamed_block:  # (a streamed block was raised by stream())
            counted = f"{len(findings)} finding{'s' if len(findings) != 1 else ''}"
            raise ExternalizationBlocked(
                f"output of {request.argv[0]} blocked by the externalization gate "
                f"({counted}, worst {max(f.severity for f in findings)})",
                findings,
            )
        return ExecResult(
            exit_code=raw.exit_code,
            stdout=outputs["stdout"].released,
            stderr=outputs["stderr"].released,
            duration_ms=raw.duration_ms,
            timed_out=raw.timed_out,
            stdout_truncated=raw.stdout_truncated or len(raw.stdout) > caps.stdout_cap,
            stderr_truncated=raw.stderr_truncated or len(raw.stderr) > caps.stderr_cap,
            verdict=verdict,
            findings=findings,
            score=self._score,
            reason=raw.reason,
            quarantine_ids=quarantine_ids,
            threat=assessment,
        )

    @contextlib.contextmanager
    def _errors_through_gate(self) -> Iterator[None]:
        """Let an :class:`ExecError` out only with a message the gate released.

        Backends quote what the sandbox controls in their errors (a failed ``cat``'s stderr
        in ``read_file``, the import names of a WASM module), and callers print them.
        """
        try:
            yield
        except ExecError as exc:
            gated = self._gated_error(exc)
            if gated is exc:
                raise
            # "from None": a printed traceback would show the original with its message.
            raise gated from None

    def _gated_error(self, exc: ExecError) -> ExecError:
        gate = self._services.gate
        text = str(exc)
        if gate is None or not text:
            return exc
        result = gate.apply(text.encode("utf-8", "surrogateescape"), "error")
        if not result.findings:
            return exc
        if result.verdict is Verdict.BLOCK:
            worst = max(f.severity for f in result.findings)
            message = (
                f"error text withheld by the externalization gate ({len(result.findings)} findings, worst {worst})"
            )
        else:
            message = result.released.decode("utf-8", "replace")
        self._audit("exec.error_gated", {"verdict": result.verdict.value, "findings": _finding_counts(result.findings)})
        return ExecTimeout(message) if isinstance(exc, ExecTimeout) else ExecError(message)

    def _gate_apply(self, data: bytes, source: str, *, limit: int | None = None) -> GateResult:
        gate = self._services.gate
        if gate is None:
            kept = data if limit is None else data[:limit]
            return GateResult(Verdict.PASS, (), kept, kept)
        if not data:
            return self._empty_output_result(gate, source)
        return gate.apply(data, source, limit=limit)

    def _empty_output_result(self, gate: Gate, source: str) -> GateResult:
        """The gate's decision on empty output, computed by the gate once per sandbox.

        Most commands print nothing on at least one stream. The gate is a pure function of
        the bytes, so its result for ``b""`` is reused, as long as it has no finding (a
        finding would carry this call's ``source``, so then the gate runs every time).
        """
        cached = self._empty_gate
        if cached is not None and cached[0] is gate:
            return cached[1]
        result = gate.apply(b"", source)
        if not result.findings:
            self._empty_gate = (gate, result)
        return result

    def _quarantine(self, outputs: Mapping[str, GateResult]) -> tuple[str, ...]:
        store = self._services.quarantine
        ids = []
        for source, result in outputs.items():
            if result.verdict is Verdict.QUARANTINE and store is not None:
                ids.append(
                    store.put(
                        result.original,
                        findings=result.findings,
                        sandbox_id=self.id,
                        agent_id=self.config.agent_id,
                        source=source,
                    )
                )
        return tuple(ids)

    async def _assess(self, findings: Sequence[Finding]) -> ThreatAssessment | None:
        if not findings:
            return None
        assessment = self._services.assessor.assess(self.config.agent_id, findings)
        self._audit("threat.assessed", assessment.to_dict())
        await self._escalate(assessment)
        return assessment

    async def _escalate(self, assessment: ThreatAssessment) -> None:
        """Act on the tier: 2 alert (callback), 3 suspend (pause), 4 revoke the agent and pause."""
        if assessment.tier >= 2 and self.config.on_alert is not None:
            outcome = self.config.on_alert(assessment)
            if inspect.isawaitable(outcome):
                await outcome
        if assessment.tier >= 4 and self.config.agent_id is not None:
            self._services.assessor.store.revoke(self.config.agent_id, f"threat tier 4: {assessment.classification}")
            self._audit("agent.revoked", {"agent_id": self.config.agent_id})
        if assessment.tier >= 3 and self._fsm.state is SandboxState.RUNNING:
            await self.pause()

    async def spawn(
        self,
        command: str | Sequence[str],
        *,
        stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_ms: int | None = None,
        cwd: str | None = None,
    ) -> SpawnHandle:
        """Start ``command`` and return a handle whose output streams through the gate."""
        self._require_running("spawn")
        try:
            request = self._request(command, stdin=stdin, env=env, timeout_ms=timeout_ms, cwd=cwd)
        except GuardViolation as exc:
            await self._on_guard_violation(exc, command)
            raise
        argv = self._scrub_argv(request.argv)
        self._audit("exec.started", {"argv": argv, "spawn": True})
        try:
            with self._errors_through_gate():
                process = await self._instance.spawn(request)
        except asyncio.CancelledError:
            self._audit("exec.cancelled", {"argv": argv, "spawn": True})
            raise
        return SpawnHandle(self, request, process, argv)

    # -- files --------------------------------------------------------------------------------

    async def read_file(self, path: str) -> bytes:
        """Bytes of ``path`` inside the sandbox, after the gate (redacted on warn/quarantine)."""
        self._require_running("read_file")
        ext = self._services.gate
        limit = ext.policy.max_artifact_size if ext is not None else 64 * 1024 * 1024
        with self._errors_through_gate():
            data = await self._instance.read_file(path, limit)
        source = f"file:{path}"
        result = self._gate_apply(data, source)
        await self._assess(result.findings)
        ids = self._quarantine({source: result})
        self._audit(
            "file.exported",
            {
                "path": path,
                "bytes": len(data),
                "verdict": result.verdict.value,
                "findings": _finding_counts(result.findings),
                "quarantine_ids": list(ids),
            },
        )
        if result.verdict is Verdict.BLOCK:
            raise ExternalizationBlocked(f"{path} blocked by the externalization gate", result.findings)
        return result.released

    async def export(self, path: str, destination: str | os.PathLike[str]) -> Path:
        """Copy ``path`` out of the sandbox to the host file ``destination`` through the gate.

        ``destination`` is created with mode 0600 (an existing file is truncated, its mode
        kept). It is never reached through a symbolic link and must be a regular file: the
        destination may lie in a directory the sandbox writes (its workdir), where the
        sandbox could have planted a link to any host file, or a FIFO to hang the caller.
        """
        data = await self.read_file(path)
        dest = Path(destination)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            descriptor = os.open(dest, flags, 0o600)
        except OSError as exc:
            reason = "is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise ExecError(f"export to {dest}: {reason}") from None
        with os.fdopen(descriptor, "wb") as stream:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise ExecError(f"export to {dest}: not a regular file")
            # Ordering: truncated only once known to be a regular file of our choosing.
            stream.truncate(0)
            stream.write(data)
        return dest

    # -- integrity ----------------------------------------------------------------------------

    async def check_integrity(self) -> IntegrityReport:
        """Probe from inside: namespaces, mounts, seccomp, no_new_privs, capabilities."""
        self._require_running("check integrity")
        report = await guards.check_integrity(self._instance, self._enforcement)
        self._integrity = report
        self._audit("integrity.checked", report.to_dict())
        return report

    # -- state changes ------------------------------------------------------------------------

    async def pause(self) -> None:
        """Freeze every process of the sandbox."""
        await self._change_state(SandboxState.PAUSED, self._instance.pause)

    async def resume(self) -> None:
        """Thaw a paused sandbox."""
        await self._change_state(SandboxState.RUNNING, self._instance.resume)

    async def stop(self) -> None:
        """Kill every process; afterwards only :meth:`destroy` is allowed."""
        await self._change_state(SandboxState.STOPPED, self._instance.stop)

    async def _change_state(self, target: SandboxState, action: Callable[[], Awaitable[None]]) -> None:
        # Checked before acting: an invalid call must not touch the backend.
        async with self._lock:
            self._fsm.check(target)
            await action()
            self._transition(target)

    async def destroy(self) -> None:
        """Kill everything and remove all state. Calling it again on a destroyed sandbox is a no-op."""
        async with self._lock:
            if self._fsm.state is SandboxState.DESTROYED:
                return
            self._fsm.check(SandboxState.DESTROYED)
            try:
                try:
                    if self._fork_watch is not None:
                        await self._fork_watch.stop()
                finally:
                    # Even when cancelled while the watch stops: a sandbox reported destroyed
                    # must not keep running.
                    await self._instance.destroy()
            finally:
                # The log's close() checkpoints it, and a checkpoint fsyncs the log first: the
                # destroyed entry is durable before destroy() returns, without a second fsync.
                try:
                    self._transition(SandboxState.DESTROYED, sync=False)
                finally:
                    await _close_services(self._services)

    def _transition(self, target: SandboxState, *, sync: bool = True) -> None:
        previous = self._fsm.transition(target)
        self._audit("sandbox.state", {"from": previous.value, "to": target.value}, sync=sync)

    async def _on_fork_bomb(self, pids: int) -> None:
        self._audit("guard.fork_bomb", {"pids": pids, "threshold": self.policy.guards.fork_bomb_threshold})
        if self._fsm.state is SandboxState.RUNNING:
            await self.stop()

    def _scrub(self, text: str) -> str:
        """``text`` with every secret the scanners (or the injected values) find redacted.

        Command lines are audited, and a command line can carry a secret; the audit log must
        never hold one, whether or not the gate is enabled for output. Agents repeat the same
        argv words (``/bin/sh``, ``-c``, a script), so results are remembered (see
        :func:`_scrub_cache`), keyed by a digest of the word: no cache holds the unredacted text.
        """
        data = text.encode("utf-8", "surrogateescape")
        digest = hashlib.blake2b(data, digest_size=16).digest()
        cached = self._scrubbed.get(digest)
        if cached is not None:
            return cached
        scrubbed = self._scan_and_redact(data, text)
        if len(self._scrubbed) >= _SCRUB_CACHE_ENTRIES:
            self._scrubbed.clear()
        self._scrubbed[digest] = scrubbed
        return scrubbed

    def _scan_and_redact(self, data: bytes, text: str) -> str:
        gate = self._services.gate
        if gate is not None:
            # Secrets and personal data (scanner "data"), never code patterns.
            found = [f for f in gate.scan(data) if f.scanner != "code" or f.rule == INJECTED_SECRET_RULE]
        else:
            found = _fallback_secrets_scanner().scan(data)
        return redact(data, found).decode("utf-8", "replace") if found else text

    def _scrub_argv(self, argv: Sequence[str]) -> list[str]:
        return [self._scrub(arg) for arg in argv]

    async def _on_guard_violation(self, exc: GuardViolation, command: str | Sequence[str]) -> None:
        """Audit a refused command and count it in the agent's threat record."""
        argv = self._scrub_argv(_argv_for_audit(command))
        detail = self._scrub(exc.detail)
        self._audit("guard.violation", {"rule": exc.rule, "detail": detail, "argv": argv})
        finding = replace(guards.violation_finding(exc), evidence=detail[:200])
        await self._assess([finding])

    def _audit(self, event: str, payload: Mapping[str, Any], *, sync: bool = True) -> None:
        """Append an entry; ``sync=False`` only where the caller commits before it returns."""
        log = self._services.audit
        if log is not None:
            log.append(event, sandbox_id=self.id, agent_id=self.config.agent_id, payload=payload, sync=sync)

    def _commit_audit(self) -> None:
        log = self._services.audit
        if log is not None:
            log.commit()

    # -- context managers & sync facade ---------------------------------------------------------

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.destroy()

    @classmethod
    def sync(cls, config: SandboxConfig | None = None) -> SyncSandbox:
        """A blocking sandbox for code without asyncio: ``with Sandbox.sync(cfg) as sb: sb.exec("ls")``."""
        return SyncSandbox(config)

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} {self.backend.value} {self._fsm.state.value} score={self._score}>"


class SpawnHandle:
    """A running command whose output streams through the gate.

    Iterate :meth:`stream` for ``(stream_name, bytes)`` pairs already released by the gate;
    then :meth:`wait` for the :class:`ExecResult` (its stdout/stderr hold what was not
    streamed). A blocking verdict stops the stream with :class:`ExternalizationBlocked`
    and kills the command.
    """

    def __init__(self, sandbox: Sandbox, request: ExecRequest, process: RawProcess, audited_argv: list[str]) -> None:
        self._sandbox = sandbox
        self._request = request
        self._process = process
        self._audited_argv = audited_argv
        gate = sandbox._services.gate
        self._gates = {name: gate.stream(name) for name in ("stdout", "stderr")} if gate else {}
        self._findings: list[Finding] = []
        self._assessed = False  # the streamed findings went to the threat assessor (at a block)
        self._blocked = False
        self._assessment: ThreatAssessment | None = None  # of a streamed block

    @property
    def pid(self) -> int:
        """The command's pid (as the backend reports it)."""
        return self._process.pid

    async def stream(self) -> AsyncIterator[tuple[str, bytes]]:
        """Yield released output chunks as they arrive.

        The gate holds back the tail of each stream (see :class:`~kavach.scanning.StreamGate`);
        complete lines it holds are released at the latest ``STREAM_FLUSH_S`` (0.1 s) after
        they arrived, so that slow output is seen line by line rather than in 8 KiB batches
        or at the end.
        """
        loop = asyncio.get_running_loop()
        chunks = self._process.chunks()
        pending: asyncio.Future[tuple[str, bytes]] | None = None
        due: float | None = None  # when the complete lines held back are released
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(chunks))
                if due is None and any(g.held for g in self._gates.values()):
                    due = loop.time() + STREAM_FLUSH_S
                timeout = None if due is None else max(0.0, due - loop.time())
                done, _ = await asyncio.wait({pending}, timeout=timeout)
                if done:
                    arrived, pending = pending, None
                    try:
                        name, chunk = arrived.result()
                    except StopAsyncIteration:
                        break
                    released = await self._feed(name, chunk)
                    if released:
                        yield name, released
                if due is not None and loop.time() >= due:
                    due = None
                    for item in await self._flush():
                        yield item
        finally:
            # The consumer stopped early or the gate blocked: stop reading the output. (The
            # read in flight ends first: a generator cannot be closed while it runs.)
            if pending is not None:
                pending.cancel()
                await asyncio.wait({pending})
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
            if self._blocked:
                await self._assess_block()
        for name, stream_gate in self._gates.items():
            released, found = stream_gate.close()
            await self._record(found, stream_gate.verdict)
            if released:
                yield name, released

    async def _flush(self) -> list[tuple[str, bytes]]:
        """What each stream's gate releases of the complete lines it holds."""
        out = []
        for name, stream_gate in self._gates.items():
            released, found = stream_gate.flush()
            await self._record(found, stream_gate.verdict)
            if released:
                out.append((name, released))
        return out

    async def _feed(self, name: str, chunk: bytes) -> bytes:
        stream_gate = self._gates.get(name)
        if stream_gate is None:
            return chunk
        released, found = stream_gate.feed(chunk)
        await self._record(found, stream_gate.verdict)
        return released

    async def _record(self, found: Sequence[Finding], verdict: Verdict) -> None:
        self._findings.extend(found)
        if verdict is Verdict.BLOCK:
            await self._process.kill()
            self._sandbox._audit(
                "exec.blocked",
                {"argv": self._audited_argv, "findings": _finding_counts(self._findings)},
            )
            self._blocked = True
            raise ExternalizationBlocked("streamed output blocked by the externalization gate", self._findings)

    async def _assess_block(self) -> None:
        """Assess a streamed block now, not in wait(): a consumer that stops at the exception
        never calls it. Ordering: only once the killed command has exited, since the
        assessment may pause the sandbox, and a process frozen before it died would never
        exit (wait() would then hang)."""
        if self._assessed:
            return
        self._assessed = True
        with contextlib.suppress(TimeoutError, ExecError):
            await asyncio.wait_for(self._process.wait(), _KILLED_EXIT_WAIT_S)
        self._assessment = await self._sandbox._assess(self._findings)

    async def wait(self) -> ExecResult:
        """Wait for the exit; gate whatever was not streamed.

        The result's verdict and findings include the streamed output's; quarantined streamed
        output is stored like an exec's. After a block (which :meth:`stream` raised), the
        result releases nothing: empty ``stdout`` and ``stderr``, verdict ``block``.
        """
        with self._sandbox._errors_through_gate():
            raw = await self._process.wait()
        result = await self._sandbox._finish_exec(
            self._request, raw, self._audited_argv, self._gates, streamed_assessed=self._assessed
        )
        return result if result.threat is not None else replace(result, threat=self._assessment)

    async def kill(self, signum: int = 9) -> None:
        """Send ``signum`` to the command."""
        await self._process.kill(signum)


class SyncSandbox:
    """Blocking wrapper around :class:`Sandbox` with its own private event loop."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        _refuse_running_loop("Sandbox.sync()")
        self._loop = asyncio.new_event_loop()
        try:
            self._sandbox = self._loop.run_until_complete(Sandbox.create(config))
        except BaseException:
            self._loop.close()
            raise

    @property
    def sandbox(self) -> Sandbox:
        """The underlying asynchronous sandbox."""
        return self._sandbox

    @property
    def score(self) -> StrengthScore:
        """See :attr:`Sandbox.score`."""
        return self._sandbox.score

    @property
    def state(self) -> SandboxState:
        """See :attr:`Sandbox.state`."""
        return self._sandbox.state

    @property
    def enforcement(self) -> Enforcement:
        """See :attr:`Sandbox.enforcement`."""
        return self._sandbox.enforcement

    def exec(self, command: str | Sequence[str], **kwargs: Any) -> ExecResult:
        """See :meth:`Sandbox.exec`."""
        return self._loop.run_until_complete(self._sandbox.exec(command, **kwargs))

    def read_file(self, path: str) -> bytes:
        """See :meth:`Sandbox.read_file`."""
        return self._loop.run_until_complete(self._sandbox.read_file(path))

    def pause(self) -> None:
        """See :meth:`Sandbox.pause`."""
        self._loop.run_until_complete(self._sandbox.pause())

    def resume(self) -> None:
        """See :meth:`Sandbox.resume`."""
        self._loop.run_until_complete(self._sandbox.resume())

    def stop(self) -> None:
        """See :meth:`Sandbox.stop`."""
        self._loop.run_until_complete(self._sandbox.stop())

    def destroy(self) -> None:
        """Destroy the sandbox and close the private loop."""
        if self._loop.is_closed():
            return
        try:
            self._loop.run_until_complete(self._sandbox.destroy())
        finally:
            self._loop.close()

    def __enter__(self) -> SyncSandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()


# -- helpers ------------------------------------------------------------------------------------


def _refuse_running_loop(what: str) -> None:
    """The blocking facade cannot run inside an event loop: say so instead of a RuntimeError."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise KavachError(f"{what} is blocking; inside asyncio use 'await Sandbox.create(...)'")


def _audit_create_failure(
    services: _Services, sandbox_id: str, config: SandboxConfig, backend: Backend, exc: BaseException
) -> None:
    """Record a refused or failed creation (what was asked, and why it did not happen)."""
    if services.audit is None or not isinstance(exc, Exception):
        return
    payload = {"backend": backend.value, "error": type(exc).__name__, "reason": str(exc)[:500]}
    services.audit.append("sandbox.create_failed", sandbox_id=sandbox_id, agent_id=config.agent_id, payload=payload)


def _argv_for_audit(command: str | Sequence[str]) -> list[str]:
    return [command] if isinstance(command, str) else [str(a) for a in command]


_SHARED_SCRUB_CACHES: dict[str, dict[bytes, str]] = {}


def _scrub_cache(key: str | None) -> dict[bytes, str]:
    """The argv scrub cache for a new sandbox: shared by sandboxes whose scrub gives equal results.

    Pooled sandboxes serve one claimant each, so a per-sandbox cache would never be warm on
    the claim path; sandboxes of one gate policy without injected secrets share one instead.
    Entries are digests of argv words mapped to their redacted form: no cache holds a secret.
    """
    if key is None:
        return {}
    cache = _SHARED_SCRUB_CACHES.get(key)
    if cache is None:
        if len(_SHARED_SCRUB_CACHES) >= _SCRUB_SHARED_POLICIES:
            _SHARED_SCRUB_CACHES.clear()
        cache = _SHARED_SCRUB_CACHES[key] = {}
    return cache


@functools.cache
def _fallback_secrets_scanner() -> SecretsScanner:
    return SecretsScanner()


def _finding_counts(findings: Sequence[Finding]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in findings:
        counts[str(f.severity)] = counts.get(str(f.severity), 0) + 1
    return counts


def _open_services(config: SandboxConfig, backend: Backend, assessor: threat.ThreatAssessor) -> _Services:
    """Audit log and gate, opened before the backend starts (a missing key fails first).

    The quarantine store is opened while the sandbox is being checked
    (:meth:`Sandbox._prepare_host_side`); creation fails if it cannot be.
    """
    settings = config.audit
    audit = None
    if settings.enabled:
        key = settings.key
        if key is None and settings.key_file is not None:
            key = _read_key_file(settings.key_file)
        audit = open_audit_log(settings.path, key, fsync=settings.fsync)
    ext = config.externalization
    if ext is None:
        ext = ExternalizationPolicy.disabled() if backend is Backend.NOOP else ExternalizationPolicy()
    services = _Services(audit=audit, gate=None, quarantine=None, assessor=assessor)
    services.quarantine_enabled = ext.enabled
    # repr shows every field of the (frozen) policy: equal text means an equal policy, and an
    # equal policy gives equal scan results; unequal text for equal policies only misses.
    services.scrub_key = repr(ext) if ext.enabled else "fallback-secrets-scanner"
    services.gate = Gate(ext) if ext.enabled else None
    return services


def _read_key_file(path: str) -> bytes:
    from kavach.audit import read_key_file

    return read_key_file(path)


async def _launch_spec(config: SandboxConfig, sandbox_id: str, services: _Services) -> LaunchSpec:
    policy = config.policy
    env = dict(policy.env.vars)
    if not policy.env.clear:
        env = {**os.environ, **env}
    for name in policy.env.passthrough:
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(config.env)
    files: list[InjectedFile] = []
    known_secrets: list[str] = []
    placeholders: Mapping[str, str] = {}
    proxy_listen = None
    # The proxy comes first: secrets bound to its credential rules are injected as
    # placeholders, so their values never enter the sandbox.
    if policy.network.mode is NetworkMode.PROXY:
        proxy = _make_proxy(config, sandbox_id, services)
        services.proxy = proxy
        placeholders = proxy.placeholders()
        known_secrets.extend(proxy.secret_values())
        # Each proxy-bound secret is visible as a variable of its own name, holding only the
        # placeholder (as `kavach run --credential HOST=HEADER:VAR` promises for VAR).
        env.update({name: value for name, value in placeholders.items() if ENV_NAME_RE.fullmatch(name)})
        env.update(proxy.sandbox_env(f"http://{PROXY_LISTEN[0]}:{PROXY_LISTEN[1]}", CA_BUNDLE_PATH))
        files.append(InjectedFile(CA_BUNDLE_PATH, proxy.ca_bundle_pem(), 0o444))
        proxy_listen = PROXY_LISTEN
    if config.secrets:
        from kavach.credentials import CredentialStore, resolve_secrets

        store = config.credential_store or CredentialStore()
        resolved = resolve_secrets(config.secrets, store, placeholders)
        env.update(resolved.env)
        files.extend(resolved.files)
        services.stdin_secret = resolved.stdin
        known_secrets.extend(resolved.values)
    if known_secrets:
        # Injected values are redacted wherever they appear, even when the gate is otherwise
        # off (a disabled policy scans nothing but the known secrets).
        policy_for_gate = services.gate.policy if services.gate is not None else ExternalizationPolicy.disabled()
        services.gate = Gate(policy_for_gate, known_secrets=known_secrets)
        services.scrub_key = None  # results depend on this sandbox's secrets: never shared
    services.base_env = env
    return LaunchSpec(
        sandbox_id=sandbox_id,
        policy=policy,
        env=env,
        workdir_host=config.workdir,
        inner_backend=config.inner_backend,
        files=tuple(files),
        hostname=config.hostname,
        proxy_listen=proxy_listen,
    )


def _make_proxy(config: SandboxConfig, sandbox_id: str, services: _Services) -> EgressProxy:
    from kavach.credentials import CredentialStore, EgressProxy, ProxyConfig

    network = config.policy.network
    proxy_config = config.proxy or ProxyConfig(allow=network.egress_allowlist, deny=network.egress_denylist)
    store = config.credential_store or CredentialStore()
    return EgressProxy(proxy_config, store, sandbox_id=sandbox_id, audit=services.audit)


async def _close_services(services: _Services) -> None:
    try:
        if services.proxy is not None:
            await services.proxy.close()
            if services.proxy_task is not None:
                services.proxy_task.cancel()
                await asyncio.gather(services.proxy_task, return_exceptions=True)
            services.proxy = None
    finally:
        # Whatever the proxy did, the log is closed: its close() checkpoints and fsyncs what
        # the sandbox wrote last (the destroyed entry is appended without its own fsync).
        if services.audit is not None:
            audit, services.audit = services.audit, None
            audit.close()


__all__ = [
    "TRANSITIONS",
    "ExecResult",
    "Sandbox",
    "SandboxState",
    "SpawnHandle",
    "StateMachine",
    "SyncSandbox",
]
