"""Leftovers of an OCI sandbox whose owner was SIGKILLed are removed by the next create.

Real runc, real idmapped mounts, real cgroups: a child process creates a sandbox with a
writable host workdir and is killed; the runtime state, the cgroups, the bundle and the
mount under it stay until another process starts an OCI sandbox. A live owner's sandbox,
and anything that cannot be judged, is never touched.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kavach.backends.base import ExecRequest, LaunchSpec
from kavach.backends.oci import OciDriver, OciInstance
from kavach.backends.oci.runtime import probe_runc
from kavach.backends.oci.sweep import OWNER_FILE, mounts_under, owner_is_dead, process_start_time, sweep
from kavach.policy import SandboxPolicy

_RUNC = probe_runc()
pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or not _RUNC.usable, reason=f"needs root and a usable runc (runc: {_RUNC.reason})"
    ),
]

PATH_ENV = {"PATH": "/usr/bin:/bin"}
_bases = itertools.count()

# Creates a sandbox, writes a file into the host workdir from inside, says the container id
# and waits to be killed.
OWNER = """
import asyncio, sys
from kavach.backends.base import ExecRequest, LaunchSpec
from kavach.backends.oci import OciDriver
from kavach.policy import SandboxPolicy

async def main():
    driver = OciDriver(state_base=sys.argv[1])
    instance = await driver.start(LaunchSpec(sys.argv[2], SandboxPolicy.basic(), workdir_host=sys.argv[3]))
    workdir = instance.policy.filesystem.workdir
    done = await instance.exec(ExecRequest(argv=("/bin/sh", "-c", f"echo kept > {workdir}/kept.txt"),
                                           env={"PATH": "/usr/bin:/bin"}))
    assert done.exit_code == 0, done
    print(instance.container_id, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _start_owner(state_base: Path, sandbox_id: str, workdir: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(state_base), sandbox_id, str(workdir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    container = proc.stdout.readline().strip()
    assert container.startswith("kavach-"), proc.poll()
    return proc, container


def _cgroups(container: str) -> list[str]:
    return glob.glob(f"/sys/fs/cgroup/*/kavach/{container}") + glob.glob(f"/sys/fs/cgroup/unified/kavach/{container}")


def _backdate(path: Path) -> None:
    old = time.time() - 3600
    os.utime(path, (old, old))


@pytest.fixture
def state_base() -> Iterator[Path]:
    # Not under tmp_path: pytest's 0700 directories would keep the sandbox's unprivileged
    # root from traversing to its rootfs. A private base per test, like /run/kavach.
    base = Path(f"/run/kavach-test-sweep-{os.getpid()}-{next(_bases)}")
    base.mkdir(mode=0o755)
    yield base
    assert not mounts_under(str(base)), "a mount is left below the test's state directory"
    shutil.rmtree(base)


async def test_a_killed_owners_leftovers_go_with_the_next_create_and_a_live_owners_stay(
    state_base: Path, tmp_path: Path
) -> None:
    dead_work, live_work = tmp_path / "dead-work", tmp_path / "live-work"
    dead_work.mkdir()
    live_work.mkdir()
    dead, dead_id = _start_owner(state_base, f"t-sweep-dead-{os.getpid()}", dead_work)
    live, live_id = _start_owner(state_base, f"t-sweep-live-{os.getpid()}", live_work)
    bundles, state_dir = state_base / "bundles", state_base / "runc"
    instance: OciInstance | None = None
    try:
        dead.kill()
        dead.wait()
        dead_bundle, live_bundle = bundles / dead_id, bundles / live_id
        # What a SIGKILLed owner leaves: the runtime's state, the cgroups, the bundle and
        # the idmapped workdir mount below it.
        assert (state_dir / dead_id).exists()
        assert _cgroups(dead_id)
        assert mounts_under(str(dead_bundle))
        owner = json.loads((dead_bundle / OWNER_FILE).read_text())
        assert owner["pid"] == dead.pid and owner["runtime"] == "runc"
        # Old enough for the sweep (the threshold keeps it off bundles being built).
        _backdate(dead_bundle)
        _backdate(live_bundle)

        driver = OciDriver(state_base=str(state_base))
        started = await driver.start(LaunchSpec(f"t-sweep-new-{os.getpid()}", SandboxPolicy.basic()))
        assert isinstance(started, OciInstance)
        instance = started

        assert not dead_bundle.exists()
        assert not (state_dir / dead_id).exists()
        assert not _cgroups(dead_id)
        assert not mounts_under(str(dead_bundle))
        # The bundle was removed only after its mount was detached: the host workdir and
        # the file the sandbox wrote through it are intact.
        assert (dead_work / "kept.txt").read_text() == "kept\n"
        # The live owner's sandbox is untouched.
        assert live_bundle.exists() and (state_dir / live_id).exists() and mounts_under(str(live_bundle))
        assert live.poll() is None
        result = await instance.exec(ExecRequest(argv=("/bin/echo", "ok"), env=PATH_ENV))
        assert result.stdout == b"ok\n"
    finally:
        if instance is not None:
            await instance.destroy()
        for proc in (dead, live):
            proc.kill()
            proc.wait()
        # the live owner is dead now too: sweep it right away
        await sweep(str(bundles), str(state_dir), "runc", ["runc", "--root", str(state_dir)], older_than=0)
    assert not (bundles / live_id).exists() and not (state_dir / live_id).exists()
    assert (live_work / "kept.txt").read_text() == "kept\n"


async def test_a_long_lived_process_sweeps_again_once_the_interval_has_passed(
    state_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = OciDriver(state_base=str(state_base))
    spec = LaunchSpec(f"t-sweep-again-{os.getpid()}", SandboxPolicy.basic())

    async def start_and_destroy() -> None:
        instance = await driver.start(spec)
        await instance.destroy()

    await start_and_destroy()  # this process's first start: its sweep found nothing
    work = tmp_path / "work"
    work.mkdir()
    owner, container = _start_owner(state_base, f"t-sweep-later-{os.getpid()}", work)
    bundle, state_dir = state_base / "bundles" / container, state_base / "runc"
    try:
        owner.kill()
        owner.wait()
        _backdate(bundle)
        # Killed after this process swept: within the interval the next start leaves it ...
        await start_and_destroy()
        assert bundle.exists() and (state_dir / container).exists() and _cgroups(container)
        # ... the first start after the interval removes it.
        monkeypatch.setattr("kavach.backends.oci.driver.SWEEP_EVERY_S", 0.0)
        await start_and_destroy()
        assert not bundle.exists() and not (state_dir / container).exists() and not _cgroups(container)
        assert not mounts_under(str(bundle))
        assert (work / "kept.txt").read_text() == "kept\n"
    finally:
        owner.kill()
        owner.wait()
        runtime = ["runc", "--root", str(state_dir)]
        await sweep(str(state_base / "bundles"), str(state_dir), "runc", runtime, older_than=0)


async def test_young_bundles_and_other_runtimes_are_left(state_base: Path, tmp_path: Path) -> None:
    bundles = state_base / "bundles"
    bundles.mkdir()
    dead_pid = _dead_pid()
    record = {"pid": dead_pid, "start": 1, "pidns": os.readlink("/proc/self/ns/pid"), "runtime": "runc"}
    names = ("kavach-young", "kavach-crun", "kavach-unowned", "kavach-garbled", "--not-kavach", "kavach-target")
    young, crun, unowned, garbled, foreign, target = (bundles / n for n in names)
    for bundle in (young, crun, unowned, garbled, foreign, target):
        bundle.mkdir()
    (young / OWNER_FILE).write_text(json.dumps(record))
    (crun / OWNER_FILE).write_text(json.dumps({**record, "runtime": "crun"}))
    (garbled / OWNER_FILE).write_text("{not json")
    (foreign / OWNER_FILE).write_text(json.dumps(record))
    (target / OWNER_FILE).write_text(json.dumps(record))
    link = bundles / "kavach-link"
    link.symlink_to(target)  # a dead owner's record reached through a symlink: not a bundle
    for bundle in (crun, unowned, garbled, foreign, target):
        _backdate(bundle)
    os.utime(link, (time.time() - 3600,) * 2, follow_symlinks=False)
    state_dir = state_base / "runc"
    runtime = ["runc", "--root", str(state_dir)]
    assert await sweep(str(bundles), str(state_dir), "runc", runtime) == ["kavach-target"]
    assert all(b.exists() for b in (young, crun, unowned, garbled, foreign)) and link.is_symlink()
    # and the young bundle goes once it is old enough
    _backdate(young)
    assert await sweep(str(bundles), str(state_dir), "runc", runtime) == ["kavach-young"]


def _dead_pid() -> int:
    proc = subprocess.Popen(["/bin/true"])
    proc.wait()
    return proc.pid


def test_only_a_provably_dead_owner_is_dead() -> None:
    pid = os.getpid()
    start = process_start_time(pid)
    assert isinstance(start, int)
    pidns = os.readlink("/proc/self/ns/pid")
    assert not owner_is_dead({"pid": pid, "start": start, "pidns": pidns, "runtime": "runc"})
    assert owner_is_dead({"pid": pid, "start": start + 1, "pidns": pidns})  # the pid was reused
    assert owner_is_dead({"pid": _dead_pid(), "start": start, "pidns": pidns})
    # another pid namespace, or a record that cannot be read: never judged dead
    assert not owner_is_dead({"pid": _dead_pid(), "start": start, "pidns": "pid:[1]"})
    assert not owner_is_dead({"pid": str(pid), "start": start, "pidns": pidns})
    assert not owner_is_dead({"start": start, "pidns": pidns})
