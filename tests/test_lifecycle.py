"""The lifecycle FSM and Sandbox composition, on the Noop backend (runs nothing, scores 0)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from kavach.backends.base import ExecRequest, RawResult
from kavach.backends.names import Backend
from kavach.config import AuditSettings, SandboxConfig
from kavach.errors import ExecError, InvalidTransition, ScoreTooLow
from kavach.lifecycle import TRANSITIONS, ExecResult, Sandbox, SandboxState, StateMachine
from kavach.scanning.findings import Verdict

S = SandboxState
ALLOWED = {
    (S.CREATED, S.RUNNING),
    (S.RUNNING, S.PAUSED),
    (S.RUNNING, S.STOPPED),
    (S.RUNNING, S.DESTROYED),
    (S.PAUSED, S.RUNNING),
    (S.PAUSED, S.STOPPED),
    (S.PAUSED, S.DESTROYED),
    (S.STOPPED, S.DESTROYED),
}


def test_transition_table_is_exactly_the_specification() -> None:
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert table == ALLOWED


@pytest.mark.parametrize(("source", "target"), list(itertools.product(S, S)))
def test_every_pair_is_allowed_or_raises_without_change(source: SandboxState, target: SandboxState) -> None:
    fsm = StateMachine(source)
    if (source, target) in ALLOWED:
        assert fsm.transition(target) is source
        assert fsm.state is target
    else:
        with pytest.raises(InvalidTransition) as info:
            fsm.transition(target)
        assert fsm.state is source
        assert info.value.current == source.value and info.value.target == target.value


def noop_config(**kwargs: object) -> SandboxConfig:
    return SandboxConfig(backend=Backend.NOOP, **kwargs)  # type: ignore[arg-type]


async def test_noop_sandbox_runs_through_the_lifecycle() -> None:
    sandbox = await Sandbox.create(noop_config())
    assert sandbox.state is S.RUNNING
    assert sandbox.score == 0 and sandbox.score.label == "minimal"
    result = await sandbox.exec("echo hi")
    assert isinstance(result, ExecResult)
    assert result.exit_code == 0 and result.verdict is Verdict.PASS
    await sandbox.pause()
    assert sandbox.state is S.PAUSED
    with pytest.raises(ExecError, match="paused"):
        await sandbox.exec("echo hi")
    with pytest.raises(InvalidTransition):
        await sandbox.pause()
    await sandbox.resume()
    await sandbox.stop()
    with pytest.raises(InvalidTransition):
        await sandbox.resume()
    assert sandbox.state is S.STOPPED
    await sandbox.destroy()
    await sandbox.destroy()  # idempotent
    assert sandbox.state is S.DESTROYED


async def test_async_with_destroys_even_on_error() -> None:
    with pytest.raises(RuntimeError):
        async with await Sandbox.create(noop_config()) as sandbox:
            raise RuntimeError("boom")
    assert sandbox.state is S.DESTROYED


async def test_string_commands_run_through_sh_and_lists_are_argv() -> None:
    from kavach.backends import registry

    async with await Sandbox.create(noop_config()) as sandbox:
        await sandbox.exec("echo $HOME | tr a-z A-Z")
        await sandbox.exec(["printf", "%s", "x y"], env={"EXTRA": "1"}, stdin="data")
        instance = sandbox._instance
        requests: list[ExecRequest] = instance.requests  # type: ignore[attr-defined]
        assert requests[0].argv == ("/bin/sh", "-c", "echo $HOME | tr a-z A-Z")
        assert requests[0].shell == "echo $HOME | tr a-z A-Z"
        assert requests[1].argv == ("printf", "%s", "x y") and requests[1].shell is None
        assert requests[1].stdin == b"data"
        assert requests[1].env["EXTRA"] == "1" and "PATH" in requests[1].env
        assert registry.get_driver(Backend.NOOP) is not None


async def test_environment_is_cleared_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLER_SECRET", "do-not-leak")
    async with await Sandbox.create(noop_config(env={"MINE": "1"})) as sandbox:
        await sandbox.exec("env")
        env = sandbox._instance.requests[0].env  # type: ignore[attr-defined]
        assert "CALLER_SECRET" not in env
        assert env["MINE"] == "1"


async def test_min_score_above_achieved_fails_and_names_missing_controls() -> None:
    with pytest.raises(ScoreTooLow) as info:
        await Sandbox.create(noop_config(min_score=10))
    assert info.value.achieved == 0 and info.value.required == 10


async def test_empty_commands_are_refused() -> None:
    async with await Sandbox.create(noop_config()) as sandbox:
        for bad in ("", "   ", []):
            with pytest.raises(ExecError):
                await sandbox.exec(bad)


async def test_exec_result_fields_and_text_helpers() -> None:
    from kavach.backends.noop import NoopDriver

    driver = NoopDriver(responder=lambda req: RawResult(137, b"out\xff", b"err", 12.5, reason="killed by signal 9"))
    async with await Sandbox.create(noop_config(), driver=driver) as sandbox:
        result = await sandbox.exec("true")
    assert result.exit_code == 137
    assert result.stdout_text == "out\ufffd" and result.stderr_text == "err"
    assert result.reason == "killed by signal 9"
    assert not result.ok
    assert result.to_dict()["exit_code"] == 137


async def test_audit_records_lifecycle_by_default() -> None:
    from kavach import audit, paths

    async with await Sandbox.create(noop_config(agent_id="agent-1")) as sandbox:
        await sandbox.exec("echo hi")
    text = paths.audit_log_path().read_text()
    for event in ("sandbox.created", "exec.started", "exec.finished", "sandbox.state"):
        assert f'"{event}"' in text
    assert sandbox.id in text and "agent-1" in text
    # The chain verifies with the key kavach provisioned for the default log.
    key = audit.read_key_file(paths.default_audit_key_file())
    assert audit.verify(paths.audit_log_path(), key).ok


async def test_audit_can_be_turned_off_explicitly() -> None:
    from kavach import paths

    async with await Sandbox.create(noop_config(audit=AuditSettings(enabled=False))) as sandbox:
        await sandbox.exec("echo hi")
    assert not paths.audit_log_path().exists()


def test_sync_facade_without_asyncio() -> None:
    import kavach

    result = kavach.run("echo hi", backend="noop")
    assert result.exit_code == 0
    with kavach.Sandbox.sync(noop_config()) as sandbox:
        assert sandbox.exec(["true"]).exit_code == 0
        assert sandbox.state is S.RUNNING
    assert sandbox.state is S.DESTROYED


async def test_injected_secret_is_redacted_even_with_the_gate_off() -> None:
    from kavach.backends.noop import NoopDriver
    from kavach.credentials import CredentialStore, SecretRef, env

    store = CredentialStore()
    store.set("TOKEN", "tok-3c9e1f7a2b5d8e0f")

    def echo_env(request: ExecRequest) -> RawResult:
        return RawResult(0, f"token is {request.env['API_TOKEN']}\n".encode())

    config = noop_config(secrets=(SecretRef("TOKEN", env("API_TOKEN")),), credential_store=store)
    async with await Sandbox.create(config, driver=NoopDriver(responder=echo_env)) as sandbox:
        result = await sandbox.exec("env")
    assert b"tok-3c9e1f7a2b5d8e0f" not in result.stdout
    assert result.stdout.startswith(b"token is ")


async def test_refused_creation_is_audited() -> None:
    from kavach import paths

    with pytest.raises(ScoreTooLow):
        await Sandbox.create(noop_config(min_score=10, agent_id="agent-low"))
    text = paths.audit_log_path().read_text()
    assert '"sandbox.create_failed"' in text and "ScoreTooLow" in text and "agent-low" in text


async def test_blocking_facade_refuses_a_running_loop_clearly() -> None:
    import kavach
    from kavach.errors import KavachError

    with pytest.raises(KavachError, match="blocking"):
        kavach.run("true", backend="noop")
    with pytest.raises(KavachError, match="blocking"):
        Sandbox.sync(noop_config())


async def test_backend_errors_reach_the_caller_only_through_the_gate() -> None:
    # Backends quote what the sandbox controls in errors (a failed cat's stderr in
    # read_file, a WASM module's import names), and callers print them.
    from kavach.backends.noop import NoopDriver
    from kavach.scanning.gate import ExternalizationPolicy

    key = "AKIA" + "QWERTYUIOPASDFGH"

    def fail(request: ExecRequest) -> RawResult:
        text = request.argv[-1]
        raise ExecError(f"unknown import: `{text}::x`")

    config = noop_config(externalization=ExternalizationPolicy())
    async with await Sandbox.create(config, driver=NoopDriver(responder=fail)) as sandbox:
        with pytest.raises(ExecError) as blocked:
            await sandbox.exec(["run", key])
        with pytest.raises(ExecError) as warned:
            await sandbox.exec(["run", "mail alice@corp-example.org"])
        with pytest.raises(ExecError) as plain:
            await sandbox.exec(["run", "nothing secret"])
        with pytest.raises(ExecError) as from_read:
            await sandbox.read_file(f"/tmp/{key}")
    assert key not in str(blocked.value) and "withheld by the externalization gate" in str(blocked.value)
    assert blocked.value.__suppress_context__  # a printed traceback would show the original
    assert "alice@corp-example.org" not in str(warned.value) and "unknown import" in str(warned.value)
    assert str(plain.value) == "unknown import: `nothing secret::x`"
    assert key not in str(from_read.value)


async def test_export_never_follows_a_link_or_opens_a_fifo_at_the_destination(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"host file\n")
    (tmp_path / "link").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo")
    config = noop_config(audit=AuditSettings(enabled=False))
    async with await Sandbox.create(config) as sandbox:
        sandbox._instance.files["/work/out"] = b"exported\n"  # type: ignore[attr-defined]
        with pytest.raises(ExecError, match="symbolic link"):
            await sandbox.export("/work/out", tmp_path / "link")
        with pytest.raises(ExecError, match=r"fifo: (not a regular file|No such device)"):
            await sandbox.export("/work/out", tmp_path / "fifo")  # refused, never waited on
        with pytest.raises(ExecError, match="null: not a regular file"):
            await sandbox.export("/work/out", "/dev/null")
        (tmp_path / "dir").mkdir()
        with pytest.raises(ExecError, match="dir: Is a directory"):
            await sandbox.export("/work/out", tmp_path / "dir")
        fresh = await sandbox.export("/work/out", tmp_path / "new")
    assert victim.read_bytes() == b"host file\n"
    assert fresh.read_bytes() == b"exported\n" and fresh.stat().st_mode & 0o777 == 0o600
