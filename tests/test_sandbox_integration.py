"""The lifecycle wired to a real backend: integrity at create, audit, quarantine, threat."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from kavach import paths
from kavach.backends import registry
from kavach.backends.names import Backend
from kavach.config import SandboxConfig
from kavach.errors import ExternalizationBlocked, PolicyError
from kavach.lifecycle import Sandbox, SandboxState
from kavach.policy import GuardPolicy, SandboxPolicy
from kavach.scanning.findings import Verdict

pytestmark = pytest.mark.skipif(
    not registry.probe(Backend.PROCESS).usable, reason=f"process backend: {registry.probe(Backend.PROCESS).reason}"
)


def process_config(**kwargs: object) -> SandboxConfig:
    return SandboxConfig(backend=Backend.PROCESS, policy=SandboxPolicy.strict(), **kwargs)  # type: ignore[arg-type]


def audit_events() -> list[dict[str, object]]:
    return [json.loads(line) for line in paths.audit_log_path().read_text().splitlines()]


async def test_integrity_is_probed_at_create_and_recorded() -> None:
    async with await Sandbox.create(process_config()) as sandbox:
        integrity = sandbox.enforcement.details["integrity"]
        assert integrity["ok"] is True and integrity["checked"]
        assert str(sandbox.score) == "68 (standard)"
        report = await sandbox.check_integrity()
        assert report.ok
    created = [e for e in audit_events() if e["event"] == "sandbox.created"]
    assert created and created[0]["payload"]["enforcement"]["details"]["integrity"]["ok"] is True  # type: ignore[index]


async def test_integrity_check_can_be_turned_off_explicitly() -> None:
    async with await Sandbox.create(process_config(integrity_check=False)) as sandbox:
        assert "integrity" not in sandbox.enforcement.details


async def test_quarantined_output_is_redacted_held_and_released_after_approval() -> None:
    from kavach.quarantine import QuarantineStore

    password_line = "db_password = 'Zr8#kq2LmvX91pT'"
    async with await Sandbox.create(process_config(agent_id="agent-q")) as sandbox:
        result = await sandbox.exec(["/bin/echo", password_line])
    # A password assignment is high: quarantined (the default threshold), released redacted.
    assert result.verdict is Verdict.QUARANTINE
    assert b"Zr8#kq2LmvX91pT" not in result.stdout and b"[REDACTED" in result.stdout
    store = QuarantineStore()
    item_id = result.quarantine_id
    assert item_id is not None
    store.approve(item_id, by="operator")
    assert b"Zr8#kq2LmvX91pT" in store.release(item_id, by="operator")


async def test_critical_secret_blocks_and_is_audited_without_the_value() -> None:
    key = "AKIAQYLPMN5HHHFPZAM2"
    async with await Sandbox.create(process_config()) as sandbox:
        with pytest.raises(ExternalizationBlocked) as info:
            await sandbox.exec(["/bin/echo", f"aws_access_key_id={key}"])
    assert info.value.findings
    text = paths.audit_log_path().read_text()
    assert key not in text
    assert '"verdict":"block"' in text.replace(" ", "")


def test_fork_bomb_threshold_below_two_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="fork_bomb_threshold"):
        SandboxPolicy(guards=GuardPolicy(fork_bomb_threshold=1)).validate()


async def test_binds_are_usable_under_strict_landlock(tmp_path: object) -> None:
    from dataclasses import replace
    from pathlib import Path

    from kavach.policy import Bind

    base = Path(str(tmp_path))
    (base / "rw").mkdir()
    (base / "ro").mkdir()
    (base / "ro" / "input.txt").write_text("data\n")
    strict = SandboxPolicy.strict()
    fs = replace(
        strict.filesystem, ro_binds=(Bind(str(base / "ro"), "/in"),), rw_binds=(Bind(str(base / "rw"), "/out"),)
    )
    config = SandboxConfig(backend=Backend.PROCESS, policy=replace(strict, filesystem=fs))
    async with await Sandbox.create(config) as sandbox:
        result = await sandbox.exec("cat /in/input.txt > /out/copy.txt && ls / >/dev/null 2>&1 || echo listing-denied")
    assert (base / "rw" / "copy.txt").read_text() == "data\n"
    assert result.stdout_text.strip() == "listing-denied"  # Landlock still hides everything else


async def test_spawn_streams_output_through_the_gate() -> None:
    script = "for i in 1 2 3; do echo line $i; done; echo 'password = \"Zr8#kq2LmvX91pT\"'"
    async with await Sandbox.create(process_config()) as sandbox:
        handle = await sandbox.spawn(script)
        assert handle.pid > 0
        chunks = [chunk async for name, chunk in handle.stream() if name == "stdout"]
        result = await handle.wait()
    streamed = b"".join(chunks)
    assert b"line 1\nline 2\nline 3\n" in streamed
    assert b"Zr8#kq2LmvX91pT" not in streamed + result.stdout  # redacted before release
    assert result.exit_code == 0
    assert any(f.category == "password" for f in result.findings)


async def test_spawn_streams_slow_output_line_by_line_while_the_command_runs() -> None:
    # The command prints a line, then waits for a file that the test creates only once it
    # has received that line: a stream that held output back until the end would time out.
    script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.02; done; echo second"
    async with await Sandbox.create(process_config()) as sandbox:
        handle = await sandbox.spawn(script, timeout_ms=20_000)
        chunks = []
        async for name, chunk in handle.stream():
            chunks.append((name, chunk))
            if len(chunks) == 1:
                await sandbox.exec("touch /tmp/go")
        result = await handle.wait()
    assert chunks == [("stdout", b"first\n"), ("stdout", b"second\n")]
    assert result.exit_code == 0 and not result.timed_out


async def test_a_streamed_secret_blocks_and_kills_the_command_once_its_line_is_complete() -> None:
    # The key's line is complete but the command keeps running (until /tmp/go, which never
    # comes): the gate must judge the line when output goes quiet, not at the end.
    key = "AKIA" + "QWERTYUIOPASDFGH"
    script = f"echo 'aws_access_key_id = {key}'; while [ ! -e /tmp/go ]; do sleep 0.02; done"
    async with await Sandbox.create(process_config()) as sandbox:
        handle = await sandbox.spawn(script, timeout_ms=20_000)
        streamed = b""
        with pytest.raises(ExternalizationBlocked) as info:
            async for _name, chunk in handle.stream():
                streamed += chunk
        result = await handle.wait()
        # Assessed as an exec's block is: a critical leak suspends the sandbox (tier 3+).
        assert sandbox.state is SandboxState.PAUSED
        await sandbox.resume()
        assert (await sandbox.exec("echo still serving")).stdout == b"still serving\n"
    assert key.encode() not in streamed
    assert any(f.rule == "secrets.aws-access-key-id" for f in info.value.findings)
    assert not result.timed_out and result.exit_code != 0  # killed by the gate


async def test_streamed_quarantined_output_is_stored_assessed_and_audited_like_an_execs() -> None:
    from kavach.quarantine import QuarantineStore

    password_line = "db_password = 'Zr8#kq2LmvX91pT'"
    async with await Sandbox.create(process_config(agent_id="agent-sq")) as sandbox:
        handle = await sandbox.spawn(["/bin/echo", password_line])
        streamed = b"".join([chunk async for _name, chunk in handle.stream()])
        result = await handle.wait()
    assert b"Zr8#kq2LmvX91pT" not in streamed and b"[REDACTED" in streamed
    # Streamed findings used to reach the result only: no quarantine item, no threat
    # assessment, and an audit entry saying "pass".
    assert result.verdict is Verdict.QUARANTINE and result.threat is not None
    item_id = result.quarantine_id
    assert item_id is not None
    store = QuarantineStore()
    store.approve(item_id, by="operator")
    assert b"Zr8#kq2LmvX91pT" in store.release(item_id, by="operator")
    events = audit_events()
    finished = [e for e in events if e["event"] == "exec.finished"][-1]
    assert finished["payload"]["verdict"] == "quarantine"  # type: ignore[index]
    assert finished["payload"]["quarantine_ids"] == [item_id]  # type: ignore[index]
    assert any(e["event"] == "threat.assessed" for e in events)


async def test_after_a_streamed_block_nothing_more_is_released_and_the_block_is_assessed() -> None:
    key = "AKIA" + "QWERTYUIOPASDFGH"
    # The key, then a burst that is still in the pipes when the gate blocks.
    script = f"echo 'aws_access_key_id = {key}'; head -c 300000 /dev/zero | tr '\\0' A; echo AFTER-BLOCK-MARKER"
    async with await Sandbox.create(process_config()) as sandbox:
        handle = await sandbox.spawn(script, timeout_ms=20_000)
        streamed = b""
        with pytest.raises(ExternalizationBlocked):
            async for _name, chunk in handle.stream():
                streamed += chunk
        result = await handle.wait()
    assert key.encode() not in streamed
    # wait() used to gate the rest as a fresh artifact and return it.
    assert result.stdout == b"" and result.stderr == b"" and result.verdict is Verdict.BLOCK
    assert any(f.rule == "secrets.aws-access-key-id" for f in result.findings) and result.threat is not None
    events = audit_events()
    assert [e for e in events if e["event"] == "exec.finished"][-1]["payload"]["verdict"] == "block"  # type: ignore[index]
    assert any(e["event"] == "threat.assessed" for e in events)


async def test_output_cut_at_its_cap_never_releases_the_first_part_of_a_secret() -> None:
    from dataclasses import replace

    token = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
    strict = SandboxPolicy.strict()
    policy = replace(strict, resources=replace(strict.resources, stdout_cap=4096))
    config = SandboxConfig(backend=Backend.PROCESS, policy=policy)
    # The cap falls inside each value: the part before it matches no rule on its own.
    async with await Sandbox.create(config) as sandbox:
        with pytest.raises(ExternalizationBlocked) as blocked:
            await sandbox.exec(f"printf 'start\\n%04060d {token} and more\\n' 0")
        await sandbox.resume()  # a critical leak suspends the sandbox
        mail = await sandbox.exec("printf 'start\\n%04070d alice.smith@corp-example.org and more\\n' 0")
        whole = await sandbox.exec("printf 'start\\n%05000d tail\\n' 0")
    assert any(f.rule.startswith("secrets.github") and f.end == 4096 for f in blocked.value.findings)
    assert mail.stdout_truncated and mail.verdict is Verdict.WARN
    assert mail.stdout.startswith(b"start\n0000") and b"alice.smith@corp" not in mail.stdout
    assert b"[REDACTED" in mail.stdout
    # Without a secret, exactly the cap is released (the bytes past it only serve the scan).
    assert whole.stdout_truncated and len(whole.stdout) == 4096 and whole.verdict is Verdict.PASS


async def test_streaming_lines_that_come_faster_than_the_flush_interval_arrive_before_the_end() -> None:
    # A line every 10 ms never leaves the stream quiet for long: the held lines must still
    # be released while the command runs (it waits for /tmp/go after them).
    script = "for i in $(seq 1 30); do echo line $i; sleep 0.01; done; while [ ! -e /tmp/go ]; do sleep 0.02; done"
    async with await Sandbox.create(process_config()) as sandbox:
        handle = await sandbox.spawn(script, timeout_ms=20_000)
        chunks: list[bytes] = []
        async for _name, chunk in handle.stream():
            chunks.append(chunk)
            if b"line 30\n" in chunk:
                await sandbox.exec("touch /tmp/go")
        result = await handle.wait()
    assert b"".join(chunks) == b"".join(b"line %d\n" % i for i in range(1, 31))
    # The 30 lines take at least 0.3 s: flushes at most 0.1 s apart release them in
    # several chunks (waiting for a quiet moment would release them all at once).
    assert len(chunks) >= 2
    assert result.exit_code == 0 and not result.timed_out


async def test_a_consumer_that_stops_streaming_early_leaves_the_sandbox_usable() -> None:
    # The first line is released by a flush while a read of more output is in flight.
    script = "echo line 1; while [ ! -e /tmp/go ]; do sleep 0.02; done; echo line 2"
    async with await Sandbox.create(process_config()) as sandbox:
        handle = await sandbox.spawn(script, timeout_ms=20_000)
        stream = handle.stream()
        async for _name, chunk in stream:
            assert chunk == b"line 1\n"
            break
        await stream.aclose()  # type: ignore[attr-defined]
        await sandbox.exec("touch /tmp/go")
        result = await handle.wait()
        assert result.exit_code == 0 and not result.timed_out
        assert (await sandbox.exec("echo again")).stdout == b"again\n"


async def test_unusable_quarantine_store_fails_creation_during_the_integrity_probe(tmp_path: Path) -> None:
    """The store is opened while the probe runs in the sandbox; its failure still fails creation."""
    from kavach.errors import QuarantineError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(QuarantineError):
        await Sandbox.create(process_config(quarantine_dir=str(blocker / "q")))
    failed = [e for e in audit_events() if e["event"] == "sandbox.create_failed"]
    assert failed and failed[-1]["payload"]["error"] == "QuarantineError"  # type: ignore[index]
    # Nothing is left pending: the probe was settled before the error propagated.
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_destroy_cancelled_while_the_fork_watch_stops_still_destroys_the_backend() -> None:
    policy = SandboxPolicy.strict()
    policy = dataclasses.replace(policy, guards=dataclasses.replace(policy.guards, fork_bomb_threshold=50))
    sandbox = await Sandbox.create(SandboxConfig(backend=Backend.PROCESS, policy=policy))
    watch = sandbox._fork_watch
    assert watch is not None
    stopping = asyncio.Event()
    real_stop = watch.stop

    async def slow_stop() -> None:
        stopping.set()
        await asyncio.Event().wait()  # a watch slow to stop when destroy() is cancelled
        await real_stop()

    watch.stop = slow_stop  # type: ignore[method-assign]
    destroy = asyncio.create_task(sandbox.destroy())
    await asyncio.wait_for(stopping.wait(), 10)
    destroy.cancel()
    with pytest.raises(asyncio.CancelledError):
        await destroy
    assert sandbox.state.value == "destroyed"
    instance = sandbox._instance
    assert instance._destroyed  # type: ignore[attr-defined]
    init_pid = instance.init_pid  # type: ignore[attr-defined]
    assert not Path(f"/proc/{init_pid}").exists() or _state(init_pid) in ("Z", "X")
    await real_stop()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


async def test_a_cancelled_exec_is_audited_and_its_command_killed() -> None:
    async with await Sandbox.create(process_config()) as sandbox:
        task = asyncio.create_task(sandbox.exec("sleep 1.5; touch /tmp/ran-on; sleep 1000", timeout_ms=60_000))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(2.0)  # past the touch, had the command survived
        check = await sandbox.exec("test -e /tmp/ran-on && echo ran-on; echo checked")
        assert check.stdout == b"checked\n"
        sandbox_id = sandbox.id
    events = [e for e in audit_events() if e.get("sandbox_id") == sandbox_id]
    names = [e["event"] for e in events]
    started = names.index("exec.started")
    assert names[started + 1] == "exec.cancelled"
    payload = events[started + 1]["payload"]
    assert isinstance(payload, dict) and payload["argv"][:2] == ["/bin/sh", "-c"]


async def test_a_spawn_cancelled_before_it_returns_is_audited() -> None:
    async with await Sandbox.create(process_config()) as sandbox:
        task = asyncio.create_task(sandbox.spawn("sleep 1000"))
        await asyncio.sleep(0)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        sandbox_id = sandbox.id
    names = [e["event"] for e in audit_events() if e.get("sandbox_id") == sandbox_id]
    started = names.index("exec.started")
    assert names[started + 1] == "exec.cancelled"
