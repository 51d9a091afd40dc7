"""The Process backend's engine, observed from inside its sandboxes (real namespaces, real kernel)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import resource
import signal
from pathlib import Path

import pytest

from kavach.backends.base import ExecRequest, InjectedFile, LaunchSpec
from kavach.backends.process import ProcessDriver, ProcessInstance
from kavach.backends.process.namespaces import ROOT_MAP_BASE
from kavach.errors import ExecError, SandboxCreateError
from kavach.policy import Bind, FilesystemPolicy, NetworkMode, NetworkPolicy, SandboxPolicy
from kavach.scoring import Control, score
from process_helpers import (
    ENV,
    cpu_ticks,
    host_pids_in_namespace,
    no_limits,
    pid_ns_of,
    py,
    sandbox,
    sh,
)

pytestmark = pytest.mark.skipif(not ProcessDriver().probe().available, reason="Process backend unavailable here")


def test_probe_reports_kernel_userns_landlock_and_cgroups() -> None:
    result = ProcessDriver().probe()
    assert result.available
    assert result.version == os.uname().release
    for fact in ("kernel", "user namespaces: yes", "Landlock ABI", "cgroup v"):
        assert fact in result.reason


async def test_strict_policy_scores_68_with_every_control_verified_inside() -> None:
    async with sandbox(SandboxPolicy.strict()) as box:
        enforcement = box.enforcement()
        assert enforcement.controls == frozenset(Control)
        assert enforcement.verified
        assert int(score(enforcement)) == 68
        details = enforcement.details
        assert details["seccomp_mode"] == "2"
        assert details["no_new_privs"] == "1"
        assert details["cap_eff"] == "0000000000000000"
        assert details["cap_bnd"] == "0000000000000000"
        assert details["landlock_abi"] >= 1
        assert details["interfaces"] == ["lo"]
        for name, inode in details["namespaces"].items():
            assert inode != details["host_namespaces"][name], name


async def test_basic_policy_scores_65() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        assert int(score(box.enforcement())) == 65


async def test_root_inside_maps_to_an_unprivileged_host_range() -> None:
    if os.geteuid() != 0:
        pytest.skip("the root mapping applies to a root caller")
    async with sandbox() as box:
        inside, host, count = box.enforcement().details["uid_map"].split()
        assert inside == "0" and int(host) >= ROOT_MAP_BASE and count == "65536"
        result = await sh(box, "id -u; cat /proc/self/uid_map")
        assert result.stdout.split()[0] == b"0"


async def test_echo_exit_codes_env_and_stdin() -> None:
    async with sandbox() as box:
        result = await sh(box, "echo out; echo err >&2; exit 3")
        assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
        result = await box.exec(ExecRequest(argv=("/usr/bin/env",), env={"ONLY": "this"}))
        assert result.stdout == b"ONLY=this\n"
        result = await box.exec(ExecRequest(argv=("/bin/cat",), env=ENV, stdin=b"hello stdin"))
        assert result.stdout == b"hello stdin"
        result = await box.exec(ExecRequest(argv=("/bin/cat",), env=ENV))
        assert result.stdout == b"" and result.exit_code == 0  # stdin is /dev/null


async def test_killed_by_signal_reports_128_plus_n() -> None:
    async with sandbox() as box:
        result = await sh(box, "kill -TERM $$")
        assert result.exit_code == 128 + signal.SIGTERM


async def test_missing_command_is_127_with_a_message() -> None:
    async with sandbox() as box:
        result = await box.exec(ExecRequest(argv=("/no/such/program",), env=ENV))
        assert result.exit_code == 127
        assert b"No such file" in result.stderr


async def test_state_in_tmp_and_workdir_persists_across_execs() -> None:
    async with sandbox() as box:
        assert (await sh(box, "echo a > /tmp/f; echo b > /work/g; pwd")).stdout == b"/work\n"
        assert (await sh(box, "cat /tmp/f /work/g")).stdout == b"a\nb\n"


async def test_shells_with_many_forks_and_python3_run() -> None:
    async with sandbox(SandboxPolicy.strict()) as box:
        result = await sh(box, "for i in $(seq 50); do /bin/true; done; echo done")
        assert (result.exit_code, result.stdout) == (0, b"done\n")
        result = await py(
            box, "import sys, json, hashlib; print(sys.version_info[0], hashlib.sha256(b'x').hexdigest()[:8])"
        )
        assert result.stdout == b"3 2d711642\n", result.stderr


async def test_timeout_kills_and_keeps_partial_output() -> None:
    async with sandbox() as box:
        result = await sh(box, "echo started; sleep 30", timeout_ms=1500)
        assert result.timed_out and result.reason == "wall-clock timeout"
        assert result.exit_code == 128 + signal.SIGKILL
        assert result.stdout == b"started\n"
        # The sandbox survives its command's timeout.
        assert (await sh(box, "echo again")).stdout == b"again\n"


async def test_output_cap_keeps_the_first_bytes_and_marks_truncation() -> None:
    async with sandbox() as box:
        result = await sh(box, "head -c 300000 /dev/zero | tr '\\0' a; echo tail >&2", stdout_cap=1000)
        assert result.stdout == b"a" * 1000 and result.stdout_truncated
        assert result.stderr == b"tail\n" and not result.stderr_truncated
        assert result.exit_code == 0


async def test_spawn_streams_output_and_can_be_killed() -> None:
    async with sandbox() as box:
        run = await box.spawn(ExecRequest(argv=("/bin/sh", "-c", "echo one; sleep 0.2; echo two"), env=ENV))
        seen = [chunk async for chunk in run.chunks()]
        assert b"".join(data for stream, data in seen if stream == "stdout") == b"one\ntwo\n"
        assert (await run.wait()).exit_code == 0
        run = await box.spawn(ExecRequest(argv=("/bin/sleep", "30"), env=ENV))
        await asyncio.sleep(0.05)
        await run.kill(signal.SIGKILL)
        result = await run.wait()
        assert result.exit_code == 128 + signal.SIGKILL and result.reason is None


async def test_read_file_returns_bytes_and_enforces_the_limit() -> None:
    async with sandbox() as box:
        await sh(box, "printf 12345 > /work/out")
        assert await box.read_file("/work/out", 10) == b"12345"
        with pytest.raises(ExecError, match="larger than"):
            await box.read_file("/work/out", 3)
        with pytest.raises(ExecError):
            await box.read_file("/work/missing", 10)


async def test_injected_files_live_on_tmpfs_inside() -> None:
    secret = InjectedFile("/run/secrets/token", b"s3cr3t-value", 0o400)
    async with sandbox(files=(secret,)) as box:
        result = await sh(
            box, "cat /run/secrets/token; echo; stat -c %a /run/secrets/token; stat -f -c %T /run/secrets"
        )
        assert result.stdout.split() == [b"s3cr3t-value", b"400", b"tmpfs"]


async def test_hostname_and_etc_are_generated() -> None:
    async with sandbox(hostname="box-one") as box:
        result = await sh(box, "hostname; cat /etc/hostname; grep -c . /etc/passwd; ls /etc/ssl/certs | head -1")
        lines = result.stdout.decode().split()
        assert lines[:3] == ["box-one", "box-one", "2"]
        assert len(lines) == 4  # TLS roots are there


async def test_rw_bind_is_writable_and_files_belong_to_the_host_owner(tmp_path: os.PathLike[str]) -> None:
    shared = os.path.join(tmp_path, "shared")
    os.mkdir(shared)
    policy = dataclasses.replace(SandboxPolicy.basic(), filesystem=FilesystemPolicy(rw_binds=(Bind(shared, "/data"),)))
    async with sandbox(policy) as box:
        result = await sh(box, "echo hi > /data/made && cat /data/made")
        assert result.stdout == b"hi\n", result.stderr
    made = os.path.join(shared, "made")
    assert os.stat(made).st_uid == os.geteuid()


async def test_ro_bind_is_visible_but_not_writable(tmp_path: os.PathLike[str]) -> None:
    source = os.path.join(tmp_path, "ro")
    os.mkdir(source)
    with open(os.path.join(source, "f"), "w") as f:
        f.write("data")
    policy = dataclasses.replace(SandboxPolicy.basic(), filesystem=FilesystemPolicy(ro_binds=(Bind(source, "/in"),)))
    async with sandbox(policy) as box:
        result = await sh(box, "cat /in/f; echo x > /in/g")
        assert result.stdout == b"data" and result.exit_code != 0


async def test_workdir_host_is_bound_at_the_workdir(tmp_path: os.PathLike[str]) -> None:
    async with sandbox(workdir_host=str(tmp_path)) as box:
        await sh(box, "echo persisted > /work/result")
    with open(os.path.join(tmp_path, "result")) as f:
        assert f.read() == "persisted\n"


async def test_missing_bind_source_fails_creation() -> None:
    policy = dataclasses.replace(
        SandboxPolicy.basic(), filesystem=FilesystemPolicy(ro_binds=(Bind("/no/such/dir", "/x"),))
    )
    with pytest.raises(SandboxCreateError, match="does not exist"):
        async with sandbox(policy):
            pass


async def test_open_files_above_what_the_sandbox_can_get_fails_creation_naming_the_field() -> None:
    # The sandbox is in its own user namespace: its hard RLIMIT_NOFILE cannot exceed the
    # caller's, whatever fs.nr_open says.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resources = SandboxPolicy.basic().resources
    above = dataclasses.replace(SandboxPolicy.basic(), resources=dataclasses.replace(resources, open_files=hard + 1))
    with pytest.raises(SandboxCreateError, match=rf"^resources\.open_files: {hard + 1} is above .*\({hard}\)$"):
        async with sandbox(above):
            pass
    at_limit = dataclasses.replace(SandboxPolicy.basic(), resources=dataclasses.replace(resources, open_files=hard))
    async with sandbox(at_limit) as box:
        assert (await sh(box, "ulimit -n")).stdout.strip() == str(hard).encode()


def test_the_callers_hard_limit_still_bounds_open_files_when_nr_open_is_unreadable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kavach.backends import base

    monkeypatch.setattr(base, "NR_OPEN_PATH", "/nonexistent/nr_open")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resources = SandboxPolicy.basic().resources
    above = dataclasses.replace(SandboxPolicy.basic(), resources=dataclasses.replace(resources, open_files=hard + 1))
    with pytest.raises(SandboxCreateError, match=rf"caller's hard limit .*\({hard}\)$"):
        base.check_open_files(above)
    base.check_open_files(dataclasses.replace(above, resources=dataclasses.replace(resources, open_files=hard)))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs the memory cgroup a root caller gets")
async def test_a_memory_limit_too_small_for_init_is_named_not_a_closed_channel() -> None:
    resources = dataclasses.replace(SandboxPolicy.basic().resources, memory=2 * 1024 * 1024)
    policy = dataclasses.replace(SandboxPolicy.basic(), resources=resources)
    expected = r"^resources\.memory: 2097152 B is too little .* killed during set-up"
    with pytest.raises(SandboxCreateError, match=expected):
        async with sandbox(policy):
            pass


async def test_bytes_execve_cannot_take_fail_that_exec_and_the_server_keeps_serving() -> None:
    async with sandbox() as box:
        before = (await sh(box, "echo $PPID")).stdout
        for field, value in (
            ("env", {**ENV, "A=B": "x"}),
            ("env", {**ENV, "X": "a\0b"}),
            ("argv", ("/bin/echo", "a\0b")),
            ("cwd", "/tm\0p"),
        ):
            request = ExecRequest(argv=("/bin/true",), env=ENV)
            # ExecRequest refuses these (below); a request that got past it anyway must
            # fail its own exec, not kill the sandbox's exec server.
            object.__setattr__(request, field, value)
            with pytest.raises(ExecError, match="exec setup failed"):
                await box.exec(request)
        # The same exec server (the command's parent) still serves.
        assert (await sh(box, "echo $PPID")).stdout == before


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"argv": ()}, "argv"),
        ({"argv": ("/bin/echo", "a\0b")}, "argv"),
        ({"env": {"A=B": "x"}}, "env"),
        ({"env": {"": "x"}}, "env"),
        ({"env": {"X": "a\0b"}}, "env"),
        ({"cwd": "relative"}, "cwd"),
        ({"timeout_ms": 0}, "timeout_ms"),
        ({"timeout_ms": 1.5}, "timeout_ms"),
        ({"timeout_ms": True}, "timeout_ms"),
        ({"stdout_cap": -1}, "stdout_cap"),
    ],
)
def test_exec_requests_execve_cannot_take_are_refused_naming_the_field(changes: dict[str, object], field: str) -> None:
    arguments: dict[str, object] = {"argv": ("/bin/true",), **changes}
    with pytest.raises(ExecError, match=f"^{field}: "):
        ExecRequest(**arguments)  # type: ignore[arg-type]


async def test_proxy_listener_is_created_inside_and_reachable_from_inside() -> None:
    policy = dataclasses.replace(SandboxPolicy.basic(), network=NetworkPolicy(mode=NetworkMode.PROXY))
    async with sandbox(policy, proxy_listen=("127.0.0.1", 3128)) as box:
        listener = box.take_proxy_listener()
        assert listener is not None and box.take_proxy_listener() is None
        assert listener.getsockname() == ("127.0.0.1", 3128)
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        client = asyncio.create_task(
            py(box, "import socket; s=socket.create_connection(('127.0.0.1', 3128)); print(s.recv(10).decode())")
        )
        conn, _addr = await loop.sock_accept(listener)
        await loop.sock_sendall(conn, b"hello")
        conn.close()
        listener.close()
        assert (await client).stdout == b"hello\n"


async def test_host_network_mode_shares_the_host_network() -> None:
    policy = dataclasses.replace(SandboxPolicy.minimal(), network=NetworkPolicy(mode=NetworkMode.HOST))
    async with sandbox(policy) as box:
        assert Control.NETWORK_ISOLATED not in box.enforcement().controls
        assert box.enforcement().details["namespaces"]["net"] == box.enforcement().details["host_namespaces"]["net"]


async def test_pause_really_stops_a_busy_loop() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        run = await box.spawn(ExecRequest(argv=("/bin/sh", "-c", "while :; do :; done"), env=ENV))
        await asyncio.sleep(0.3)
        busy = [p for p in host_pids_in_namespace(pid_ns_of(box)) if p == _host_pid_of_sh(box)]
        assert busy, "busy loop not found on the host"
        await box.pause()
        await asyncio.sleep(0.1)
        frozen_at = cpu_ticks(busy[0])
        await asyncio.sleep(0.5)
        assert cpu_ticks(busy[0]) == frozen_at
        await box.resume()
        await asyncio.sleep(0.5)
        assert cpu_ticks(busy[0]) > frozen_at
        await run.kill(signal.SIGKILL)
        await run.wait()


def _host_pid_of_sh(box: object) -> int:
    from process_helpers import comm_of

    assert hasattr(box, "enforcement")
    for pid in host_pids_in_namespace(pid_ns_of(box)):  # type: ignore[arg-type]
        if comm_of(pid) == "sh":
            return pid
    return -1


async def test_pause_without_cgroup_uses_sigstop() -> None:
    async with sandbox(no_limits(SandboxPolicy.minimal())) as box:
        assert box.cgroup is None
        run = await box.spawn(ExecRequest(argv=("/bin/sh", "-c", "while :; do :; done"), env=ENV))
        await asyncio.sleep(0.2)
        pid = _host_pid_of_sh(box)
        await box.pause()
        await asyncio.sleep(0.1)
        frozen_at = cpu_ticks(pid)
        await asyncio.sleep(0.4)
        assert cpu_ticks(pid) == frozen_at
        await box.resume()
        await run.kill(signal.SIGKILL)
        await run.wait()


async def test_destroy_kills_everything_and_is_idempotent() -> None:
    async with sandbox() as box:
        await sh(box, "sleep 1000 & (setsid sleep 1000 &) ; echo ok")
        ns = pid_ns_of(box)
        assert len(host_pids_in_namespace(ns)) >= 3
        await box.destroy()
        await box.destroy()
        assert host_pids_in_namespace(ns) == []
        with pytest.raises(ExecError):
            await sh(box, "true")


async def test_exec_after_init_died_raises() -> None:
    async with sandbox() as box:
        os.kill(box.init_pid, signal.SIGKILL)
        await asyncio.sleep(0.1)
        with pytest.raises(ExecError):
            await sh(box, "true")


async def test_live_pids_counts_the_sandbox_processes() -> None:
    async with sandbox() as box:
        before = box.live_pids()
        run = await box.spawn(ExecRequest(argv=("/bin/sleep", "5"), env=ENV))
        await asyncio.sleep(0.1)
        assert before is not None
        current = box.live_pids()
        assert current is not None and current > before - 1
        await run.kill()
        await run.wait()


async def test_large_stdin_and_too_large_commands() -> None:
    async with sandbox() as box:
        data = bytes(range(256)) * 4096  # 1 MiB, more than a pipe holds
        result = await box.exec(ExecRequest(argv=("/bin/sh", "-c", "wc -c"), env=ENV, stdin=data))
        assert result.stdout.strip() == str(len(data)).encode()
        with pytest.raises(ExecError, match="too large"):
            await box.exec(ExecRequest(argv=("/bin/echo", "x" * 400_000), env=ENV))
        assert (await sh(box, "echo fine")).stdout == b"fine\n"


async def test_concurrent_execs_in_one_sandbox() -> None:
    async with sandbox() as box:
        results = await asyncio.gather(*(sh(box, f"sleep 0.1; echo {i}") for i in range(8)))
        assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(8)]


async def test_tmpfs_mounts_are_capped_in_bytes_and_inodes() -> None:
    async with sandbox() as box:
        result = await sh(
            box, "df -k /tmp /work | tail -n 2 | awk '{print $2}'; df -i /tmp | tail -n 1 | awk '{print $2}'"
        )
        tmp_kib, work_kib, tmp_inodes = (int(x) for x in result.stdout.split())
        assert tmp_kib == 64 * 1024 and work_kib == 64 * 1024
        assert tmp_inodes == 64 * 1024
        result = await sh(box, "head -c 70000000 /dev/zero > /tmp/big; echo rc=$?")
        assert b"rc=1" in result.stdout and b"No space left" in result.stderr


async def test_every_command_starts_with_the_policys_rlimits_and_oom_score() -> None:
    # Commands are started by the sandbox's exec server, which applied these once: each
    # command (the first and later ones) must still start from exactly the policy's limits.
    limits = SandboxPolicy.basic().resources
    async with sandbox(SandboxPolicy.basic()) as box:
        for _ in range(2):
            result = await sh(box, "cat /proc/self/limits /proc/self/oom_score_adj")
            text = result.stdout.decode()
            rows = {line[:26].strip(): line[26:].split()[:2] for line in text.splitlines()[1:] if len(line) > 26}
            assert rows["Max cpu time"] == [str(limits.cpu_time_s)] * 2, text
            assert rows["Max file size"] == [str(limits.file_size)] * 2, text
            assert rows["Max open files"] == [str(limits.open_files)] * 2, text
            assert rows["Max core file size"] == ["0", "0"], text
            assert text.strip().splitlines()[-1] == "1000", text


async def test_a_sandbox_that_fails_verification_is_gone_and_not_tracked(monkeypatch: pytest.MonkeyPatch) -> None:
    from kavach.backends.base import LaunchSpec
    from kavach.backends.process import driver as driver_module

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise SandboxCreateError("simulated: a control the policy asks for was not observed inside")

    monkeypatch.setattr(driver_module, "verify_probe", refuse)
    live_before = set(driver_module._LIVE)
    with pytest.raises(SandboxCreateError, match="simulated"):
        await ProcessDriver().start(LaunchSpec("verify-fails", SandboxPolicy.basic()))
    # Nothing of it is tracked for the exit hook (which would use its closed pidfd), and
    # its init is dead.
    assert set(driver_module._LIVE) == live_before
    assert not any(i.sandbox_id == "verify-fails" for i in driver_module._LIVE)
    if os.geteuid() == 0:  # (its cgroup, with its processes, is gone too)
        assert not list(Path("/sys/fs/cgroup").glob("*/kavach/kavach-verify-fails"))


async def test_every_sandbox_process_is_in_the_cgroup_and_init_joined_it_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On cgroup v1 init moves itself in (the caller's pid write would wait for an RCU grace
    period); whoever moved it, init, the exec server and every command are inside."""
    from kavach.backends.process.cgroups import Cgroup

    if os.geteuid() != 0:
        pytest.skip("the sandbox cgroups of an unprivileged caller are covered in test_process_delegated")

    def caller_moves(self: Cgroup, pid: int) -> None:
        raise AssertionError(f"the caller moved {pid} into {self.name} itself")

    monkeypatch.setattr(Cgroup, "add", caller_moves)
    async with sandbox(SandboxPolicy.basic()) as box:
        assert box.cgroup is not None and box.cgroup.version == 1
        handle = await box.spawn(ExecRequest(argv=("/bin/sh", "-c", "sleep 30 & sleep 30"), env=ENV))
        try:
            # init, the exec server, the shell and its two sleeps (once the shell forked them)
            for _ in range(500):
                in_sandbox = host_pids_in_namespace(pid_ns_of(box))
                if len(in_sandbox) >= 5:
                    break
                await asyncio.sleep(0.01)
            assert len(in_sandbox) >= 5, in_sandbox
            for pid in in_sandbox:
                box.cgroup.check_member(pid)
            assert set(in_sandbox) <= set(box.cgroup.pids())
        finally:
            await handle.kill()


@pytest.mark.parametrize(
    ("breakage", "named"),
    [
        ("count", "cgroup_fds"),  # more cgroup fds announced than sent
        ("read-only fd", "join the sandbox's cgroup"),  # the write into tasks fails
    ],
)
async def test_init_that_cannot_join_its_cgroup_fails_creation(
    monkeypatch: pytest.MonkeyPatch, breakage: str, named: str
) -> None:
    from kavach.backends.process import driver as driver_module
    from kavach.backends.process.cgroups import Cgroup

    if os.geteuid() != 0:
        pytest.skip("needs the root caller's cgroups")
    if breakage == "count":
        original_send = driver_module.Channel.send

        def send(self: object, message: dict[str, object], fds: list[int] | tuple[int, ...] = ()) -> None:
            if message.get("op") == "mapped":
                message = {**message, "cgroup_fds": len(fds) + 1}
            original_send(self, message, fds)  # type: ignore[arg-type]

        monkeypatch.setattr(driver_module.Channel, "send", send)
    else:
        monkeypatch.setattr(Cgroup, "self_move_fds", lambda self: [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)])
    sandbox_id = f"cgjoin-{breakage.replace(' ', '-')}"
    with pytest.raises(SandboxCreateError, match=named):
        await ProcessDriver().start(LaunchSpec(sandbox_id, SandboxPolicy.basic()))
    assert not list(Path("/sys/fs/cgroup").glob(f"*/kavach/kavach-{sandbox_id}"))
    assert not any(i.sandbox_id == sandbox_id for i in driver_module._LIVE)


async def test_the_exec_server_cannot_import_from_files_and_a_probe_saying_otherwise_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The exec server drops file-based imports (paths of the caller's sys.path and of the
    # kavach packages may be writable inside the sandbox, and a lazy import would run what
    # a command planted there); its probe says so, and creation fails closed otherwise.
    from typing import Any

    from kavach.backends.base import LaunchSpec
    from kavach.backends.process import driver as driver_module

    seen: list[tuple[Any, ...]] = []
    real = driver_module.verify_probe

    def keep(*args: Any, **kwargs: Any) -> Any:
        seen.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(driver_module, "verify_probe", keep)
    box = await ProcessDriver().start(LaunchSpec("file-imports", SandboxPolicy.basic()))
    await box.destroy()
    ((plan, probe, cgroup, spec),) = seen
    assert probe["file_imports"] is False
    for bad in (True, None):
        with pytest.raises(SandboxCreateError, match="import modules from files"):
            real(plan, {**probe, "file_imports": bad}, cgroup, spec)


def test_forbid_file_imports_leaves_only_built_in_modules_importable(tmp_path: Path) -> None:
    # In a child interpreter: after the call, a module on sys.path and a not yet loaded
    # submodule of a loaded package both fail to import (both were findable before); a
    # built-in module still loads.
    import subprocess
    import sys
    import textwrap

    (tmp_path / "planted.py").write_text("PLANTED = 1\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub.py").write_text("SUB = 1\n")
    program = textwrap.dedent(
        """
        import importlib.util, sys
        sys.path.insert(0, sys.argv[1])
        import pkg  # a loaded package: pkg.sub is found through pkg.__path__, not sys.path
        names = ("planted", "pkg.sub")
        assert all(importlib.util.find_spec(name) is not None for name in names)
        from kavach.backends.process.init import file_imports_possible, forbid_file_imports
        assert file_imports_possible()
        forbid_file_imports()
        assert not file_imports_possible()
        for name in names:
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise SystemExit(f"imported {name}")
        builtin = next(n for n in sorted(sys.builtin_module_names) if n not in sys.modules)
        __import__(builtin)  # compiled into the interpreter: still importable
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program, str(tmp_path)], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# A command that, unless killed, writes a marker after 1.5 s and then sleeps.
_SURVIVOR = "sleep 1.5; touch /tmp/ran-on; sleep 1000"


async def _cancel(task: asyncio.Task[object]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _assert_nothing_ran_on(box: ProcessInstance) -> None:
    await asyncio.sleep(2.0)  # past the touch, had the command survived
    check = await sh(box, "test -e /tmp/ran-on && echo ran-on; ps -e -o comm= | grep -c sleep || true")
    assert check.stdout.split() == [b"0"]  # no marker, no sleep left


async def test_a_cancelled_exec_kills_its_command() -> None:
    async with sandbox() as box:
        request = ExecRequest(argv=("/bin/sh", "-c", _SURVIVOR), env=ENV, timeout_ms=60_000)
        task = asyncio.create_task(box.exec(request))
        await asyncio.sleep(0.2)
        await _cancel(task)
        await _assert_nothing_ran_on(box)
        assert (await sh(box, "echo usable")).stdout == b"usable\n"


async def test_a_spawn_cancelled_before_it_returns_kills_its_command() -> None:
    async with sandbox() as box:
        task = asyncio.create_task(box.spawn(ExecRequest(argv=("/bin/sh", "-c", _SURVIVOR), env=ENV)))
        await asyncio.sleep(0)  # the command is sent; spawn() now waits for its "started"
        assert not task.done()
        await _cancel(task)
        await _assert_nothing_ran_on(box)


async def test_an_inner_backend_is_refused_not_ignored() -> None:
    from kavach.backends.base import LaunchSpec
    from kavach.backends.names import Backend

    with pytest.raises(SandboxCreateError, match=r"cannot host an inner backend \(oci\)"):
        await ProcessDriver().start(LaunchSpec("inner-refused", SandboxPolicy.basic(), inner_backend=Backend.OCI))
