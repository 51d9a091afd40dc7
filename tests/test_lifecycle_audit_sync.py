"""What the Sandbox layer's fast path keeps: every exec audited and durable, the chain intact,
the gate deciding on every output, argv secrets never logged.

Durability is observed by wrapping ``os.fsync`` of :mod:`kavach.audit` (the real fsync still
runs): each call records how many complete entries the log file held at that moment, so a test
can say which entries a given fsync made durable.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from kavach import audit
from kavach.audit import AuditLog, verify
from kavach.backends.base import ExecRequest, Instance, LaunchSpec, RawResult
from kavach.backends.names import Backend
from kavach.backends.noop import NoopDriver
from kavach.config import AuditSettings, SandboxConfig
from kavach.errors import AuditError, ExecError, ExternalizationBlocked, QuarantineError
from kavach.lifecycle import Sandbox
from kavach.scanning.findings import Verdict
from kavach.scanning.gate import ExternalizationPolicy

KEY = bytes(range(32))
SECRET = "ghp_" + "Zr8kq2LmvX91pTa7Qw3EyU6iOp0AsDf5GhJk"


class FsyncRecorder:
    """Wraps ``os.fsync`` as :mod:`kavach.audit` sees it; remembers the log's entry count per call."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.log_entries_at_fsync: list[int] = []
        self._real: Callable[[int], None] = os.fsync

    def __call__(self, fd: int) -> None:
        self._real(fd)
        if os.path.samestat(os.fstat(fd), os.stat(self.log_path)):
            self.log_entries_at_fsync.append(self.entries())

    def entries(self) -> int:
        return self.log_path.read_bytes().count(b"\n")


@pytest.fixture
def fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FsyncRecorder:
    recorder = FsyncRecorder(tmp_path / "audit.jsonl")
    monkeypatch.setattr(audit.os, "fsync", recorder)
    return recorder


def config(tmp_path: Path, *, fsync: bool = True, gate: bool = True) -> SandboxConfig:
    return SandboxConfig(
        backend=Backend.NOOP,
        audit=AuditSettings(path=str(tmp_path / "audit.jsonl"), key=KEY, fsync=fsync),
        externalization=ExternalizationPolicy() if gate else None,
    )


def events(tmp_path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


# -- AuditLog.append(sync=False) and commit() ------------------------------------------------------


def test_deferred_entry_is_written_at_once_and_fsynced_by_commit(tmp_path: Path, fsyncs: FsyncRecorder) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", KEY)
    before = len(fsyncs.log_entries_at_fsync)
    log.append("exec.started", payload={"argv": ["/bin/true"]}, sync=False)
    # In the file (and the page cache) already: a crash of this process cannot lose it.
    assert fsyncs.entries() == 2
    assert len(fsyncs.log_entries_at_fsync) == before
    log.commit()
    assert fsyncs.log_entries_at_fsync[before:] == [2]
    log.commit()  # nothing pending: no second fsync
    assert fsyncs.log_entries_at_fsync[before:] == [2]
    log.close()
    assert verify(tmp_path / "audit.jsonl", KEY).ok


def test_a_synced_append_also_covers_the_deferred_ones_before_it(tmp_path: Path, fsyncs: FsyncRecorder) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", KEY)
    before = len(fsyncs.log_entries_at_fsync)
    log.append("a", sync=False)
    log.append("b", sync=False)
    log.append("c")
    assert fsyncs.log_entries_at_fsync[before:] == [4]  # one fsync, after all three were written
    log.commit()
    assert fsyncs.log_entries_at_fsync[before:] == [4]
    log.close()


def test_commit_leaves_batched_mode_alone(tmp_path: Path, fsyncs: FsyncRecorder) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", KEY, fsync=False, checkpoint_every=1000)
    before = len(fsyncs.log_entries_at_fsync)
    log.append("a", sync=False)
    log.append("b")
    log.commit()
    assert fsyncs.log_entries_at_fsync[before:] == []  # batched: durable at checkpoints/flush/close
    log.close()
    assert fsyncs.log_entries_at_fsync[before:] == [3]


def test_close_makes_a_deferred_entry_durable(tmp_path: Path, fsyncs: FsyncRecorder) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", KEY)
    before = len(fsyncs.log_entries_at_fsync)
    log.append("sandbox.state", payload={"to": "destroyed"}, sync=False)
    log.close()
    assert fsyncs.log_entries_at_fsync[before:] == [2]
    assert verify(tmp_path / "audit.jsonl", KEY).ok


# -- Sandbox.exec: two entries, one fsync, on every path --------------------------------------------


async def test_exec_returns_with_both_entries_durable_after_one_fsync(tmp_path: Path, fsyncs: FsyncRecorder) -> None:
    sandbox = await Sandbox.create(config(tmp_path))
    before_entries = fsyncs.entries()
    before = len(fsyncs.log_entries_at_fsync)
    await sandbox.exec(["/bin/true"])
    assert [e["event"] for e in events(tmp_path)[before_entries:]] == ["exec.started", "exec.finished"]
    assert fsyncs.log_entries_at_fsync[before:] == [before_entries + 2]
    await sandbox.destroy()


async def test_exec_that_fails_in_the_backend_still_syncs_its_started_entry(
    tmp_path: Path, fsyncs: FsyncRecorder
) -> None:
    def refuse(request: ExecRequest) -> RawResult:
        raise ExecError("backend refused")

    sandbox = await Sandbox.create(config(tmp_path), driver=NoopDriver(responder=refuse))
    before_entries = fsyncs.entries()
    before = len(fsyncs.log_entries_at_fsync)
    with pytest.raises(ExecError, match="backend refused"):
        await sandbox.exec(["/bin/true"])
    assert [e["event"] for e in events(tmp_path)[before_entries:]] == ["exec.started"]
    assert fsyncs.log_entries_at_fsync[before:] == [before_entries + 1]
    await sandbox.destroy()


async def test_blocked_output_is_audited_and_durable_before_the_exception(
    tmp_path: Path, fsyncs: FsyncRecorder
) -> None:
    leak = RawResult(0, stdout=f"-----BEGIN OPENSSH PRIVATE KEY-----\n{SECRET}\n".encode())
    sandbox = await Sandbox.create(config(tmp_path), driver=NoopDriver(responder=lambda r: leak))
    before = len(fsyncs.log_entries_at_fsync)
    with pytest.raises(ExternalizationBlocked):
        await sandbox.exec(["cat", "key"])
    finished = [e for e in events(tmp_path) if e["event"] == "exec.finished"]
    assert finished and finished[-1]["payload"]["verdict"] == "block"  # type: ignore[index]
    assert fsyncs.log_entries_at_fsync[before:] and fsyncs.log_entries_at_fsync[-1] == fsyncs.entries()
    await sandbox.destroy()


async def test_destroy_returns_with_its_entry_durable(tmp_path: Path, fsyncs: FsyncRecorder) -> None:
    sandbox = await Sandbox.create(config(tmp_path))
    before = len(fsyncs.log_entries_at_fsync)
    await sandbox.destroy()
    assert events(tmp_path)[-1]["event"] == "sandbox.state"
    assert events(tmp_path)[-1]["payload"] == {"from": "running", "to": "destroyed"}
    # One fsync of the log (by the closing checkpoint), after the destroyed entry was written.
    assert fsyncs.log_entries_at_fsync[before:] == [fsyncs.entries()]


async def test_burst_of_concurrent_execs_is_fully_audited_and_the_chain_verifies(tmp_path: Path) -> None:
    sandboxes = [await Sandbox.create(config(tmp_path)) for _ in range(4)]
    commands = [["/bin/echo", str(i)] for i in range(60)]
    results = await asyncio.gather(*(sandboxes[i % 4].exec(cmd) for i, cmd in enumerate(commands)))
    assert all(r.ok for r in results)
    await asyncio.gather(*(s.destroy() for s in sandboxes))
    check = verify(tmp_path / "audit.jsonl", KEY)
    assert check.ok, check
    entries = events(tmp_path)
    for event in ("exec.started", "exec.finished"):
        argvs = sorted(e["payload"]["argv"][1] for e in entries if e["event"] == event)  # type: ignore[index]
        assert argvs == sorted(str(i) for i in range(60))
    per_sandbox = {s.id: sum(1 for e in entries if e["sandbox_id"] == s.id) for s in sandboxes}
    assert all(count == 1 + 2 * 15 + 1 for count in per_sandbox.values())  # created, 15 execs, destroyed


# -- the gate on empty output and the argv scrub cache ------------------------------------------------


async def test_gate_still_decides_on_output_after_many_empty_ones(tmp_path: Path) -> None:
    outputs = iter([b"", b"", b"", f"token {SECRET}\n".encode()])
    sandbox = await Sandbox.create(
        config(tmp_path), driver=NoopDriver(responder=lambda r: RawResult(0, stdout=next(outputs)))
    )
    for _ in range(3):
        result = await sandbox.exec(["/bin/run"])
        assert result.verdict is Verdict.PASS and result.stdout == b""
    try:
        result = await sandbox.exec(["/bin/run"])
        assert result.verdict is not Verdict.PASS and result.findings
        assert SECRET.encode() not in result.stdout
    except ExternalizationBlocked as exc:
        assert exc.findings
    await sandbox.destroy()


async def test_argv_secrets_are_redacted_on_every_exec_with_the_scrub_cache(tmp_path: Path) -> None:
    sandbox = await Sandbox.create(config(tmp_path))
    for _ in range(3):
        await sandbox.exec(["curl", "-H", f"Authorization: token {SECRET}", "https://example.com"])
    await sandbox.exec(["/bin/echo", "plain"])
    await sandbox.destroy()
    text = (tmp_path / "audit.jsonl").read_text()
    assert SECRET not in text
    argvs = [e["payload"]["argv"] for e in events(tmp_path) if e["event"].startswith("exec.")]  # type: ignore[index, union-attr]
    assert len(argvs) == 8
    assert all(a[0] == "curl" and SECRET not in a[2] for a in argvs[:6])
    assert argvs[6:] == [["/bin/echo", "plain"]] * 2
    # The cache is keyed by a digest, never by the unredacted word.
    assert all(isinstance(k, bytes) and len(k) == 16 for k in sandbox._scrubbed)
    assert all(SECRET not in v for v in sandbox._scrubbed.values())


async def test_sandboxes_of_one_gate_policy_share_scrub_results(tmp_path: Path) -> None:
    first = await Sandbox.create(config(tmp_path))
    second = await Sandbox.create(config(tmp_path))
    assert first._scrubbed is second._scrubbed  # a pooled sandbox's first exec finds it warm
    other = await Sandbox.create(
        SandboxConfig(
            backend=Backend.NOOP,
            audit=AuditSettings(path=str(tmp_path / "audit.jsonl"), key=KEY),
            externalization=ExternalizationPolicy(allowlist_rules=frozenset({"pii.email"})),
        )
    )
    assert other._scrubbed is not first._scrubbed  # another policy may scrub differently
    for sandbox in (first, second, other):
        await sandbox.destroy()


async def test_a_sandbox_with_injected_secrets_keeps_its_scrub_cache_to_itself(tmp_path: Path) -> None:
    from kavach.credentials import CredentialStore, SecretRef, env

    value = "tok-3c9e1f7a2b5d8e0f"
    store = CredentialStore()
    store.set("TOKEN", value)
    with_secret = SandboxConfig(
        backend=Backend.NOOP,
        audit=AuditSettings(path=str(tmp_path / "audit.jsonl"), key=KEY),
        externalization=ExternalizationPolicy(),
        secrets=(SecretRef("TOKEN", env("API_TOKEN")),),
        credential_store=store,
    )
    plain = await Sandbox.create(config(tmp_path))
    secretive = await Sandbox.create(with_secret)
    assert secretive._scrubbed is not plain._scrubbed
    # The same word, scrubbed first where the value means nothing (and is logged as it is),
    # is still redacted where it is a known secret.
    await plain.exec(["/bin/echo", value])
    await secretive.exec(["/bin/echo", value])
    for sandbox in (plain, secretive):
        await sandbox.destroy()
    started = {e["sandbox_id"]: e for e in events(tmp_path) if e["event"] == "exec.started"}
    assert started[plain.id]["payload"]["argv"] == ["/bin/echo", value]  # type: ignore[index]
    assert value not in json.dumps(started[secretive.id])


async def test_empty_output_decision_is_computed_at_create(tmp_path: Path) -> None:
    sandbox = await Sandbox.create(config(tmp_path))
    assert sandbox._empty_gate is not None and sandbox._empty_gate[0] is sandbox._services.gate
    assert sandbox._empty_gate[1].verdict is Verdict.PASS and not sandbox._empty_gate[1].findings
    await sandbox.destroy()


class RecordingNoopDriver(NoopDriver):
    """The Noop backend, remembering whether each instance it started was destroyed."""

    def __init__(self) -> None:
        super().__init__()
        self.destroyed: list[bool] = []

    async def start(self, spec: LaunchSpec) -> Instance:
        instance = await super().start(spec)
        index = len(self.destroyed)
        self.destroyed.append(False)
        real_destroy = instance.destroy

        async def destroy() -> None:
            self.destroyed[index] = True
            await real_destroy()

        instance.destroy = destroy  # type: ignore[method-assign]
        return instance


async def test_an_unusable_quarantine_store_fails_creation_and_destroys_the_sandbox(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the quarantine directory should be")
    driver = RecordingNoopDriver()
    bad = SandboxConfig(
        backend=Backend.NOOP,
        audit=AuditSettings(path=str(tmp_path / "audit.jsonl"), key=KEY),
        externalization=ExternalizationPolicy(),
        quarantine_dir=str(blocker / "quarantine"),
    )
    with pytest.raises(QuarantineError):
        await Sandbox.create(bad, driver=driver)
    assert driver.destroyed == [True]
    failed = [e for e in events(tmp_path) if e["event"] == "sandbox.create_failed"]
    assert failed and failed[-1]["payload"]["error"] == "QuarantineError"  # type: ignore[index]
    assert verify(tmp_path / "audit.jsonl", KEY).ok


async def test_the_quarantine_store_is_open_before_create_returns(tmp_path: Path) -> None:
    sandbox = await Sandbox.create(config(tmp_path))
    assert sandbox._services.quarantine is not None
    await sandbox.destroy()
    no_gate = await Sandbox.create(config(tmp_path, gate=False))  # Noop default: gate disabled
    assert no_gate._services.quarantine is None  # nothing can be quarantined, nothing opened
    await no_gate.destroy()


async def test_a_planted_anchor_symlink_fails_creation_and_leaves_its_target_alone(tmp_path: Path) -> None:
    # A sticky shared directory in which another user linked <log>.anchor to a file of ours:
    # creating a sandbox must fail before the backend starts, without appending to or cutting it.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    victim = tmp_path / "victim"
    victim.write_bytes(b"first line\nlast line without a newline")
    (shared / "audit.jsonl.anchor").symlink_to(victim)
    driver = RecordingNoopDriver()
    cfg = SandboxConfig(backend=Backend.NOOP, audit=AuditSettings(path=str(shared / "audit.jsonl"), key=KEY))
    with pytest.raises(AuditError, match="it is a symbolic link"):
        await Sandbox.create(cfg, driver=driver)
    assert victim.read_bytes() == b"first line\nlast line without a newline"
    assert driver.destroyed == []  # nothing was launched
