"""Escape and leak attempts against the Process backend, written as the attacker would try them.

Every test runs real code inside a real sandbox (strict or basic policy) and asserts what
the attacker can NOT see or do. None of them is mocked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import signal
import socket
import stat
import uuid
from pathlib import Path

import pytest

from kavach.backends.base import ExecRequest
from kavach.backends.process import ProcessDriver, _libc
from kavach.backends.process._libc import KernelCallError
from kavach.backends.process.client import Spawner
from kavach.errors import SandboxCreateError
from kavach.policy import Bind, FilesystemPolicy, MiB, NetworkMode, NetworkPolicy, SandboxPolicy
from process_helpers import ENV, comm_of, host_pids_in_namespace, pid_ns_of, py, sandbox, sh

pytestmark = pytest.mark.skipif(not ProcessDriver().probe().available, reason="Process backend unavailable here")

SIGSYS_EXIT = 128 + signal.SIGSYS

# Each entry: a Python expression (inside the sandbox) that performs one dangerous syscall
# through ctypes and returns its raw result. x86_64 numbers.
SYSCALL_ATTEMPTS = {
    "mount": "s(165, b'none', b'/tmp', b'tmpfs', 0, 0)",
    "umount2": "s(166, b'/proc', 2)",
    "unshare_user": "s(272, 0x10000000)",
    "unshare_net": "s(272, 0x40000000)",
    "setns": "s(308, os.open('/proc/self/ns/net', os.O_RDONLY), 0)",
    "keyctl": "s(250, 0, -3, 0, 0, 0)",
    "add_key": "s(248, b'user', b'k', b'v', 1, -3)",
    "io_uring_setup": "s(425, 8, ctypes.create_string_buffer(120))",
    "ptrace_traceme": "s(101, 0, 0, 0, 0)",
    "ptrace_attach_init": "s(101, 16, 1, 0, 0)",
    "bpf": "s(321, 0, ctypes.create_string_buffer(64), 64)",
    "perf_event_open": "s(298, ctypes.create_string_buffer(128), 0, -1, -1, 0)",
    "userfaultfd": "s(323, 0)",
    "init_module": "s(175, 0, 0, b'')",
    "kexec_load": "s(246, 0, 0, 0, 0)",
    "open_tree": "s(428, -100, b'/usr', 1)",
    "fsopen": "s(430, b'tmpfs', 0)",
    "chroot": "s(161, b'/tmp')",
    "sethostname": "s(170, b'evil', 4)",
    "process_vm_readv": "s(310, 1, 0, 0, 0, 0, 0)",
    "clone_newuser": "s(56, 0x10000000 | 17, 0, 0, 0, 0)",
    "tiocsti": "s(16, 0, 0x5412, ctypes.c_char_p(b'x'))",
    "tiocsti_high_bits": "s(16, 0, 0x100005412, ctypes.c_char_p(b'x'))",
    "reboot": "s(169, 0xfee1dead, 672274793, 0x4321fedc, 0)",
    "settimeofday": "s(164, ctypes.create_string_buffer(16), 0)",
    "swapon": "s(167, b'/tmp/x', 0)",
}

_ATTEMPT = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "libc.syscall.restype = ctypes.c_long\n"
    "def s(n, *a):\n"
    "    return libc.syscall(n, *[ctypes.c_long(x) if isinstance(x, int) else x for x in a])\n"
    "r = {expr}\n"
    "print(r, ctypes.get_errno())\n"
)


async def _attempt(box: object, expression: str) -> tuple[int, str]:
    result = await py(box, _ATTEMPT.format(expr=expression))  # type: ignore[arg-type]
    return result.exit_code, result.stdout.decode().strip()


@pytest.mark.parametrize("profile", ["basic", "strict"])
async def test_dangerous_syscalls_are_refused(profile: str) -> None:
    async with sandbox(SandboxPolicy.preset(profile)) as box:
        outcomes = await asyncio.gather(*(_attempt(box, expr) for expr in SYSCALL_ATTEMPTS.values()))
    succeeded = {}
    for name, (code, out) in zip(SYSCALL_ATTEMPTS, outcomes, strict=True):
        refused = code == SIGSYS_EXIT or (code == 0 and out.split()[0] == "-1" and out.split()[1] != "0")
        if not refused:
            succeeded[name] = (code, out)
    assert succeeded == {}


async def test_tiocsti_is_refused_by_seccomp_not_only_by_the_missing_tty() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        for expr in (SYSCALL_ATTEMPTS["tiocsti"], SYSCALL_ATTEMPTS["tiocsti_high_bits"]):
            code, out = await _attempt(box, expr)
            # EPERM (1) from the filter; without it the answer would be ENOTTY (25).
            assert code == SIGSYS_EXIT or out.split() == ["-1", "1"], out


async def test_mount_unshare_and_chroot_commands_fail() -> None:
    async with sandbox(SandboxPolicy.strict()) as box:
        for command in ("mount -t tmpfs none /tmp", "unshare -U true", "unshare -n true", "chroot /tmp /bin/true"):
            result = await sh(box, command)
            assert result.exit_code != 0, command


async def test_pid_1_is_kavach_init_and_host_processes_are_invisible() -> None:
    async with sandbox(SandboxPolicy.strict()) as box:
        result = await sh(box, "tr '\\0' ' ' < /proc/1/cmdline; echo; ls /proc | grep -E '^[0-9]+$' | wc -l")
        cmdline, count = result.stdout.decode().splitlines()
        assert cmdline.startswith("kavach-spawner ")
        assert "/" not in cmdline.split(" -c ")[0]  # no host path, not even the interpreter's
        # init, the warm exec child, sh, ls/grep/wc: nothing of the host's hundreds.
        assert int(count) <= 8
        result = await sh(box, "cat /proc/[0-9]*/comm | sort -u")
        for host_daemon in (b"systemd", b"sshd", b"pytest", b"cron"):
            assert host_daemon not in result.stdout
        # ps shows kavach's processes by name, not as the interpreter.
        names = await sh(box, "cat /proc/1/comm; cat /proc/[0-9]*/comm")
        assert names.stdout.split(b"\n")[0] == b"kavach-init"
        assert b"kavach-execd" in names.stdout.split()
        assert b"python3" not in names.stdout.split()
    # and so is the spawner that forks every sandbox, on the host
    assert Path(f"/proc/{Spawner.get().pid}/comm").read_text() == "kavach-spawner\n"


async def test_no_process_environment_holds_the_callers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    marker = f"KAVACH_CALLER_SECRET_{uuid.uuid4().hex}"
    monkeypatch.setenv("KAVACH_LEAK_MARKER", marker)
    async with sandbox(SandboxPolicy.strict()) as box:
        result = await sh(box, "for f in /proc/[0-9]*/environ; do cat $f; done 2>/dev/null | tr '\\0' '\\n'")
        assert marker.encode() not in result.stdout
        assert b"KAVACH_LEAK_MARKER" not in result.stdout
        init_env = await sh(box, "cat /proc/1/environ")
        assert init_env.stdout == b""


async def test_only_loopback_and_host_loopback_listeners_are_unreachable() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        async with sandbox(SandboxPolicy.strict()) as box:
            result = await sh(box, "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '")
            assert result.stdout == b"lo\n"
            code = (
                "import socket\ntry:\n"
                f"    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')\n"
                "except OSError as e:\n    print('refused', e.errno)\n"
            )
            result = await py(box, code)
            assert result.stdout.startswith(b"refused"), result


async def test_host_abstract_unix_sockets_are_unreachable() -> None:
    name = f"\0kavach-escape-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(name)
        server.listen(1)
        async with sandbox(SandboxPolicy.strict()) as box:
            code = (
                "import socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n"
                f"    s.connect({name!r}); print('connected')\n"
                "except OSError as e:\n    print('refused', e.errno)\n"
            )
            result = await py(box, code)
            assert result.stdout.startswith(b"refused"), result


async def test_host_paths_do_not_exist_inside() -> None:
    async with sandbox(SandboxPolicy.strict()) as box:
        for path in ("/root", "/home", "/var", "/sys", "/boot", "/etc/shadow", "/work/main", "/run/docker.sock"):
            result = await sh(box, f"test -e {path}")
            assert result.exit_code == 1, path
        result = await sh(box, "ls /dev | sort | tr '\\n' ' '")
        assert result.stdout.split() == sorted(
            [b"fd", b"full", b"null", b"random", b"shm", b"stderr", b"stdin", b"stdout", b"urandom", b"zero"]
        )


async def test_proc_is_masked_and_read_only_where_runtimes_mask_it() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        # Masked: empty (a /dev/null bind) or absent, never the kernel's data.
        for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/kallsyms", "/proc/sched_debug"):
            result = await sh(box, f"cat {path} 2>/dev/null | wc -c")
            assert result.stdout == b"0\n", path
        for path in ("/proc/sysrq-trigger", "/proc/sys/kernel/hostname", "/proc/sys/vm/drop_caches"):
            result = await sh(box, f"echo 1 > {path}")
            assert result.exit_code != 0, path


async def test_writes_outside_the_writable_paths_fail() -> None:
    async with sandbox(SandboxPolicy.strict()) as box:
        for path in ("/usr/bin/evil", "/etc/passwd", "/evil", "/bin/sh", "/lib/evil", "/dev/evil"):
            result = await sh(box, f"echo x > {path}")
            assert result.exit_code != 0, path
        assert (await sh(box, "echo ok > /tmp/ok && echo ok > /work/ok")).exit_code == 0


async def test_capabilities_are_empty_in_commands_and_setuid_grants_nothing() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        result = await sh(box, "grep -E '^(CapEff|CapPrm|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status")
        fields = dict(line.split(":\t") for line in result.stdout.decode().splitlines())
        assert fields == {
            "CapPrm": "0000000000000000",
            "CapEff": "0000000000000000",
            "CapBnd": "0000000000000000",
            "CapAmb": "0000000000000000",
            "NoNewPrivs": "1",
        }


async def test_init_cannot_be_killed_ptraced_or_read_from_inside() -> None:
    async with sandbox(SandboxPolicy.strict()) as box:
        await sh(box, "kill -9 1; kill -TERM 1")
        assert (await sh(box, "echo alive")).stdout == b"alive\n"
        result = await sh(box, "head -c 16 /proc/1/mem; echo rc=$?")
        assert b"rc=0" not in result.stdout
        result = await sh(box, "ls /proc/1/fd 2>&1; echo rc=$?")
        assert b"rc=0" not in result.stdout


async def test_memory_bomb_is_killed_and_reported() -> None:
    policy = SandboxPolicy.strict()  # memory limit 256 MiB
    async with sandbox(policy) as box:
        result = await py(box, f"b = bytearray({512 * MiB}); print('survived')", timeout_ms=30_000)
        assert result.exit_code == 128 + signal.SIGKILL
        assert result.reason == "memory limit"
        assert b"survived" not in result.stdout
        assert (await sh(box, "echo still-usable")).stdout == b"still-usable\n"


async def test_fork_bomb_is_contained_by_the_pids_limit() -> None:
    async with sandbox(SandboxPolicy.strict()) as box:  # pids limit 128
        result = await sh(box, "bomb() { bomb | bomb & }; bomb; sleep 2; echo done", timeout_ms=4_000)
        assert b"Cannot fork" in result.stderr  # the pids limit refused the bomb's forks
        live = box.live_pids()
        assert live is not None and live <= 128
        await box.stop()
    # The host is unaffected and can still fork.
    assert os.system("true") == 0


async def test_output_flood_of_100_mib_is_truncated_at_the_cap() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        result = await sh(box, "head -c 104857600 /dev/zero", timeout_ms=60_000)
        assert result.stdout_truncated
        assert len(result.stdout) == 16 * MiB
        assert result.exit_code == 0


async def test_background_children_and_daemons_die_at_timeout() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        result = await sh(box, "sleep 1000 & (setsid sleep 1000 &); sleep 1000", timeout_ms=500)
        assert result.timed_out
        await asyncio.sleep(0.1)
        sleepers = [p for p in host_pids_in_namespace(pid_ns_of(box)) if comm_of(p) == "sleep"]
        assert sleepers == []


async def test_background_children_and_daemons_die_at_destroy() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        result = await sh(box, "sleep 1000 & (setsid sleep 1000 &); (setsid sh -c 'sleep 1000 &' &); echo started")
        assert result.stdout == b"started\n" and not result.timed_out
        ns = pid_ns_of(box)
        await asyncio.sleep(0.1)
        assert len([p for p in host_pids_in_namespace(ns) if comm_of(p) == "sleep"]) == 3
    assert host_pids_in_namespace(ns) == []


async def test_landlock_blocks_signals_out_of_the_domain_and_reads_outside_rules() -> None:
    async with sandbox(SandboxPolicy.strict()) as box:
        # Landlock scopes signals (ABI >= 6): PID 1 is outside the command's domain.
        result = await py(
            box, "import os\ntry:\n    os.kill(1, 0); print('reached')\nexcept OSError as e:\n    print(e.errno)"
        )
        assert result.stdout == b"1\n"


async def test_hostname_cannot_be_changed_and_clock_cannot_be_set() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        assert (await sh(box, "hostname evil")).exit_code != 0
        assert (await sh(box, "date -s '2000-01-01'")).exit_code != 0


async def test_stdin_is_closed_unless_given_and_no_tty_is_reachable() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        result = await box.exec(ExecRequest(argv=("/bin/sh", "-c", "test -t 0 || echo notty; cat /dev/tty"), env=ENV))
        assert result.stdout == b"notty\n" and result.exit_code != 0


async def test_enforcement_probe_reports_json_serialisable_details() -> None:
    async with sandbox(SandboxPolicy.strict()) as box:
        json.dumps(box.enforcement().to_dict())


async def test_init_and_the_exec_server_expose_no_fds_to_commands() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        # init and the exec server are kavach's Python processes: their fds (pipes and
        # sockets to init and the caller) must not be reachable through /proc by a command.
        script = (
            "sleep 0.5; "
            "for p in /proc/[0-9]*; do c=$(cat $p/comm 2>/dev/null); "
            "case $c in kavach-*|python*) ls $p/fd >/dev/null 2>&1 && echo open:${p#/proc/}:$c || echo closed:$c;; "
            "esac; done"
        )
        result = await sh(box, script)
        lines = result.stdout.decode().split()
        assert sorted(line for line in lines if line.startswith("closed:")) == [
            "closed:kavach-execd",
            "closed:kavach-init",
        ], lines
        assert [line for line in lines if line.startswith("open:")] == []


async def test_no_setuid_file_can_be_planted_through_a_writable_bind(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    policy = dataclasses.replace(
        SandboxPolicy.basic(), filesystem=FilesystemPolicy(rw_binds=(Bind(str(shared), "/data"),))
    )
    async with sandbox(policy) as box:
        script = (
            "cp /bin/sh /data/planted && chmod 755 /data/planted && echo normal-chmod-ok; "
            "chmod u+s /data/planted; chmod g+s /data/planted; chmod 6755 /data/planted; "
            "python3 -c \"import os; os.close(os.open('/data/made', os.O_CREAT | os.O_WRONLY, 0o4755))\"; true"
        )
        result = await sh(box, script)
        assert b"normal-chmod-ok" in result.stdout, result.stderr
    for path in shared.iterdir():
        mode = path.stat().st_mode
        assert not mode & (stat.S_ISUID | stat.S_ISGID), (path, oct(mode))


async def test_no_process_of_the_sandbox_keeps_a_host_directory() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        await asyncio.sleep(0.2)
        # At rest the sandbox is init and its exec server (forked before the mounts):
        # neither may keep a cwd or root in the host's tree. The server's warm-up has
        # moved it to the workdir, where every command starts.
        pids = host_pids_in_namespace(pid_ns_of(box))
        assert len(pids) == 2
        for pid in pids:
            assert os.readlink(f"/proc/{pid}/root") == "/", pid
            assert os.readlink(f"/proc/{pid}/cwd") in ("/", SandboxPolicy.basic().filesystem.workdir), pid
            # Every fd on the sandbox's own mounts: a file of the detached host tree would
            # show from here as a path relative to its mount (/null, not /dev/null).
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                assert target == "/dev/null" or target.startswith(("socket:", "pipe:", "anon_inode:")), (pid, target)


async def test_proxy_mode_with_landlock_connects_only_to_the_proxy_port() -> None:
    policy = dataclasses.replace(SandboxPolicy.strict(), network=NetworkPolicy(mode=NetworkMode.PROXY))
    async with sandbox(policy, proxy_listen=("127.0.0.1", 3128)) as box:
        listener = box.take_proxy_listener()
        assert listener is not None
        code = (
            "import socket\n"
            "def connect(port):\n"
            "    try:\n"
            "        socket.create_connection(('127.0.0.1', port), timeout=2).close(); return 'ok'\n"
            "    except OSError as e:\n"
            "        return str(e.errno)\n"
            "s = socket.socket()\n"
            "try:\n"
            "    s.bind(('127.0.0.1', 8080)); s.listen(); bound = 'bound'\n"
            "except OSError as e:\n"
            "    bound = str(e.errno)\n"
            "print(connect(3128), connect(3129), bound)\n"
        )
        result = await py(box, code)
        listener.close()
        # 13 = EACCES from Landlock: neither another port nor a listening socket is allowed.
        assert result.stdout.split() == [b"ok", b"13", b"13"], result


async def test_a_bind_source_a_sandbox_turned_into_a_link_fails_the_next_creation(tmp_path: Path) -> None:
    # The first sandbox writes where a bind source lies and replaces that source by a link to
    # a host directory; the next sandbox of the same configuration would have bound the
    # link's target (writable, as the caller: host root for a root caller).
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    secret = tmp_path / "hostsecret"
    secret.mkdir(mode=0o700)
    (secret / "keyfile").write_text("HOST-ONLY\n")
    policy = dataclasses.replace(
        SandboxPolicy.basic(),
        filesystem=FilesystemPolicy(rw_binds=(Bind(str(work), "/w"), Bind(str(work / "out"), "/out"))),
    )
    async with sandbox(policy) as box:
        result = await sh(box, f"rmdir /w/out && ln -s {secret} /w/out && echo planted")
        assert result.stdout == b"planted\n", result.stderr
    assert (work / "out").is_symlink()
    with pytest.raises(SandboxCreateError, match="symbolic link"):
        async with sandbox(policy) as box:
            await sh(box, "cat /out/keyfile; echo pwned > /out/written")
    assert sorted(p.name for p in secret.iterdir()) == ["keyfile"]


def test_bind_sources_are_resolved_without_following_any_link(tmp_path: Path) -> None:
    # What init and the root caller's idmapped copy open, after the plan's check: a link
    # swapped in between fails (ELOOP) instead of redirecting the bind.
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "sub").mkdir()
    for path in (tmp_path / "link", tmp_path / "link" / "sub"):
        with pytest.raises(KernelCallError) as caught:
            _libc.open_tree_no_symlinks(str(path), _libc.OPEN_TREE_CLONE | _libc.OPEN_TREE_CLOEXEC, "bind")
        assert caught.value.errno == errno.ELOOP


# Kills the exec server (possible without Landlock's signal scoping), then races to open
# the replacement's /proc/PID/mem while it is dumpable for its oom_score_adj write.
_SERVER_MEM_RACE = """
import os, signal, time
def server():
    for n in os.listdir('/proc'):
        if n.isdigit():
            try:
                if open(f'/proc/{n}/comm').read().strip() == 'kavach-execd':
                    return int(n)
            except OSError:
                pass
for attempt in range(40):
    last = int(open('/proc/sys/kernel/ns_last_pid').read())
    pid = server()
    if pid:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 0.05
    while time.monotonic() < deadline:
        for candidate in range(last + 1, last + 4):
            try:
                os.close(os.open(f'/proc/{candidate}/mem', os.O_RDWR))
            except OSError:
                continue
            print('opened', candidate, 'attempt', attempt)
            raise SystemExit(3)
print('refused')
"""


@pytest.mark.parametrize("profile", ["minimal", "basic"])
async def test_a_replacement_exec_server_never_opens_its_memory_to_commands(profile: str) -> None:
    policy = SandboxPolicy.minimal() if profile == "minimal" else SandboxPolicy.basic()
    async with sandbox(policy) as box:
        result = await py(box, _SERVER_MEM_RACE, timeout_ms=60_000)
        assert result.stdout.endswith(b"refused\n"), (result.stdout, result.stderr)
        assert (await sh(box, "echo served")).stdout == b"served\n"


@pytest.mark.parametrize("link_to", ["host directory", "staging root"])
async def test_a_link_planted_in_a_writable_bind_never_redirects_a_later_mount_target(
    tmp_path: Path, link_to: str
) -> None:
    # A read-only bind is stacked inside a writable one. A sandbox replaces the directory
    # above the inner target by a link; before pivot_root, init followed it: into the host's
    # tree, or into the new root under construction (/tmp/etc: the bind then landed on
    # /etc/b and creation succeeded, the real target left writable).
    work = tmp_path / "work"
    (work / "a" / "b").mkdir(parents=True)
    inner = tmp_path / "inner"
    inner.mkdir()
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    policy = dataclasses.replace(
        SandboxPolicy.basic(),
        filesystem=FilesystemPolicy(rw_binds=(Bind(str(work), "/w"),), ro_binds=(Bind(str(inner), "/w/a/b"),)),
    )
    async with sandbox(policy) as box:
        target = host_dir if link_to == "host directory" else "/tmp/etc"
        result = await sh(box, f"mv /w/a /w/a_old && ln -s {target} /w/a && echo planted")
        assert result.stdout == b"planted\n", result.stderr
    with pytest.raises(SandboxCreateError, match="ELOOP"):
        async with sandbox(policy) as box:
            await sh(box, "true")
    assert list(host_dir.iterdir()) == []
