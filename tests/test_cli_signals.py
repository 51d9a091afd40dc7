"""``kavach run`` stopped by a signal: the sandbox is torn down, not left to run on.

A supervisor (CI cancelling a job, systemd stopping a unit, a closed terminal) sends SIGTERM
or SIGHUP. The command inside must die with the sandbox and the sandbox's cgroup must go,
as it does after Ctrl-C; the CLI exits with 128 + the signal number.

The host identifies what to check from the sandboxed command itself: a ``sleep`` with a
unique duration (visible in the host's /proc) and its cgroup, read from the host while it runs.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from kavach.backends.oci.runtime import probe_runc
from kavach.backends.oci.sweep import detach_mounts_under
from process_helpers import kavach_argv

if os.geteuid() != 0:
    pytest.skip("these runs use the cgroup limits of the basic policy (root on this host)", allow_module_level=True)

BACKENDS = [
    "process",
    pytest.param(
        "oci", marks=pytest.mark.skipif(not probe_runc().usable, reason=f"runc unusable: {probe_runc().reason}")
    ),
]


def _pids_of(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "-x", pattern], capture_output=True, text=True, check=False).stdout
    return [int(pid) for pid in out.split()]


def _memory_cgroup(pid: int) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text(encoding="ascii").splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    raise AssertionError(f"pid {pid} has no memory cgroup")


def _wait_for(pattern: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = _pids_of(pattern)
        if pids:
            return pids[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} never started")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_signal_destroys_the_sandbox_before_the_cli_exits(backend: str, signum: signal.Signals) -> None:
    sleeper = f"sleep 300.{uuid.uuid4().int % 10**9}"
    proc = subprocess.Popen(
        [*kavach_argv(), "run", "--backend", backend, "--policy", "basic", "--", *sleeper.split()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own session: default signal dispositions, no terminal
    )
    try:
        pid = _wait_for(sleeper, proc)
        cgroup = _memory_cgroup(pid)
        assert cgroup.name.startswith("kavach-") and cgroup.is_dir(), cgroup
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signum, stderr
    assert f"stopped by {signum.name}; the sandbox was destroyed" in stderr.decode()
    assert _pids_of(sleeper) == []
    assert not cgroup.exists()


def _same_cgroup_everywhere(memory_cgroup: Path) -> list[Path]:
    """The directory of that cgroup in every mounted v1 hierarchy (kavach uses one path in all)."""
    relative = memory_cgroup.relative_to("/sys/fs/cgroup/memory")
    return [Path(p) for p in glob.glob(f"/sys/fs/cgroup/*/{relative}")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sandbox_dies_with_its_sigkilled_owner(backend: str) -> None:
    # SIGKILL runs no clean-up in the owner: the sandbox must end anyway (the Process init
    # sees its control channel close; the OCI init its lifeline pipe), never run on with no
    # one to enforce its timeout. What it leaves on disk is removed here.
    sleeper = f"sleep 300.{uuid.uuid4().int % 10**9}"
    proc = subprocess.Popen(
        [*kavach_argv(), "run", "--backend", backend, "--policy", "basic", "--", *sleeper.split()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    cgroups: list[Path] = []
    container = ""
    try:
        pid = _wait_for(sleeper, proc)
        memory = _memory_cgroup(pid)
        cgroups = _same_cgroup_everywhere(memory)
        container = memory.name  # the OCI container id is its cgroup's name
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while _pids_of(sleeper) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _pids_of(sleeper) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if backend == "oci" and container:
            subprocess.run(["runc", "--root", "/run/kavach/runc", "delete", "--force", container], check=False)
            bundle = Path("/run/kavach/bundles", container)
            # Its rootfs and kavach directory are tmpfs mounts: detached first, or rmtree would
            # empty them and leave the mounts behind.
            assert detach_mounts_under(str(bundle)) == []
            shutil.rmtree(bundle, ignore_errors=True)
            assert not bundle.exists()
        for directory in cgroups:
            with contextlib.suppress(FileNotFoundError):
                directory.rmdir()
