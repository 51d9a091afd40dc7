"""Shared helpers for the Process backend's tests (engine, escapes, pool, unprivileged, CLI runs)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from kavach.backends.base import ExecRequest, LaunchSpec, RawResult
from kavach.backends.process import ProcessDriver, ProcessInstance
from kavach.policy import DEFAULT_PATH, ResourceLimits, SandboxPolicy

ENV = {"PATH": DEFAULT_PATH, "HOME": "/tmp", "LANG": "C.UTF-8"}


def kavach_argv() -> list[str]:
    """How to run the ``kavach`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("kavach")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from kavach.cli import main; sys.exit(main())"]


# A Python script for a sandbox: forks (each child sleeps 2 s) until the kernel refuses, then
# prints the children made, the refusals and the processes it sees in /proc.
FORKS = """
import os, sys, time
made, refused = 0, 0
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 30):
    try:
        pid = os.fork()
    except OSError:
        refused += 1
        continue
    if pid == 0:
        time.sleep(2)
        os._exit(0)
    made += 1
print(made, refused, sum(name.isdigit() for name in os.listdir("/proc")))
"""


def new_id(prefix: str = "t") -> str:
    """A unique sandbox id for a test."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def no_limits(policy: SandboxPolicy) -> SandboxPolicy:
    """``policy`` without cgroup limits (for runs where cgroups are not writable)."""
    return dataclasses.replace(policy, resources=ResourceLimits())


def with_resources(policy: SandboxPolicy, **changes: Any) -> SandboxPolicy:
    """``policy`` with some resource limits changed."""
    return dataclasses.replace(policy, resources=dataclasses.replace(policy.resources, **changes))


@contextlib.asynccontextmanager
async def sandbox(policy: SandboxPolicy | None = None, **spec: Any) -> AsyncIterator[ProcessInstance]:
    """A started Process sandbox, destroyed on exit."""
    launch = LaunchSpec(sandbox_id=spec.pop("sandbox_id", new_id()), policy=policy or SandboxPolicy.basic(), **spec)
    instance = await ProcessDriver().start(launch)
    try:
        yield instance
    finally:
        await instance.destroy()


async def sh(instance: ProcessInstance, script: str, **request: Any) -> RawResult:
    """Run ``sh -c script`` with the default environment."""
    request.setdefault("env", ENV)
    request.setdefault("timeout_ms", 20_000)
    return await instance.exec(ExecRequest(argv=("/bin/sh", "-c", script), **request))


async def py(instance: ProcessInstance, code: str, **request: Any) -> RawResult:
    """Run ``/usr/bin/python3 -c code`` inside the sandbox."""
    request.setdefault("env", ENV)
    request.setdefault("timeout_ms", 20_000)
    return await instance.exec(ExecRequest(argv=("/usr/bin/python3", "-c", code), **request))


def pid_ns_of(instance: ProcessInstance) -> str:
    """The sandbox's pid namespace link text, as the enforcement probe saw it."""
    return str(instance.enforcement().details["namespaces"]["pid"])


def host_pids_in_namespace(pid_ns: str) -> list[int]:
    """Host pids of every process whose pid namespace is ``pid_ns``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/ns/pid") == pid_ns:
                found.append(int(name))
        except OSError:
            continue
    return found


def comm_of(pid: int) -> str:
    """The command name of a host pid ('' if it is gone)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def cpu_ticks(pid: int) -> int:
    """utime + stime of a host pid, in clock ticks."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


REPO = Path(__file__).resolve().parents[1]


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a run as another user: Debian's python3 with the checkout and the
    venv's packages (the venv's interpreter lives under /root, which the user cannot read)."""
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO / 'src'}:{site}", **extra}


@contextlib.contextmanager
def user_dir(user: pwd.struct_passwd, prefix: str) -> Iterator[Path]:
    """A fresh directory under /tmp owned by ``user``, removed afterwards (not under pytest's
    basetemp, whose root is 0700)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        os.chown(base, user.pw_uid, user.pw_gid)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


# For a script run as another user: ``ticks`` sums the CPU ticks (user + system) of the
# processes ``pids`` from /proc/PID/stat; ``pause_ticks`` pauses a sandbox for 0.5 s and
# resumes it for 0.5 s, and returns the ticks ``pids`` gained in each (a frozen cgroup's
# processes gain none).
TICKS = """
import time

def ticks(pids):
    total = 0
    for pid in pids:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total

async def pause_ticks(box, pids):
    await box.pause()
    frozen = ticks(pids)
    time.sleep(0.5)
    paused = ticks(pids) - frozen
    await box.resume()
    thawed = ticks(pids)
    time.sleep(0.5)
    return paused, ticks(pids) - thawed
"""


def kavach_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m kavach ARGS`` with this interpreter, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "kavach", *args], capture_output=True, text=True, timeout=60, check=False
    )


@contextlib.contextmanager
def delegated_system_user(name: str) -> Iterator[pwd.struct_passwd]:
    """The system user ``name`` (created when missing; root only) with a cgroup v1 subtree
    delegated by ``kavach cgroups delegate``, undelegated afterwards."""
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
        user = pwd.getpwnam(name)
    done = kavach_cli("cgroups", "delegate", name)
    assert done.returncode == 0, done.stderr
    try:
        yield user
    finally:
        undone = kavach_cli("cgroups", "undelegate", name)
        assert undone.returncode == 0, undone.stderr


def run_script_as(user: str, script: str, *args: str, cwd: str, timeout: float, **env: str) -> dict[str, Any]:
    """Run ``script`` with Debian's python3 as ``user`` (:func:`user_env`, plus ``env``) and
    return the JSON object its last line of output holds; fails the test on a non-zero exit."""
    proc = subprocess.run(  # noqa: PLW1510 - the return code is asserted with the stderr shown
        [shutil.which("runuser") or "runuser", "-u", user, "--", "/usr/bin/python3", "-c", script, *args],
        capture_output=True,
        env=user_env(**env),
        cwd=cwd,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


def kavach_run_as(user: pwd.struct_passwd, *args: str) -> dict[str, Any]:
    """``kavach run --json ARGS`` as ``user`` with Debian's python3, in a fresh directory of
    that user's (its HOME and XDG_DATA_HOME, so the audit log lands there); the JSON report,
    after asserting exit 0."""
    with user_dir(user, f"kavach-{user.pw_name}-cli-") as base:
        ran = subprocess.run(  # noqa: PLW1510 - the return code is asserted with the stderr shown
            [
                shutil.which("runuser") or "runuser",
                "-u",
                user.pw_name,
                "--",
                "/usr/bin/python3",
                "-m",
                "kavach",
                "run",
                "--json",
                *args,
            ],
            capture_output=True,
            env=user_env(HOME=str(base), XDG_DATA_HOME=str(base)),
            cwd=str(base),
            timeout=120,
        )
    assert ran.returncode == 0, ran.stderr.decode()[-2000:]
    report: dict[str, Any] = json.loads(ran.stdout)
    return report
