"""Remove what an OCI sandbox leaves when its owner dies without destroying it.

A caller that is SIGKILLed (or crashes) never runs ``destroy``. Its containers stop (the
launcher init dies with the owner's lifeline, or is killed by ``runtime delete``), but the
runtime's state directory, the container's cgroups, the bundle directory and kavach's
host-side mounts under it (idmapped writable binds, a directory rootfs) stay.

Every bundle therefore carries an owner record (:data:`OWNER_FILE`), written right after
the bundle directory is made and before anything is mounted under it: the owner's pid, its
start time (``/proc/<pid>/stat`` field 22, so a reused pid is not mistaken for the owner),
its pid namespace and the runtime. :func:`sweep` removes a bundle only when all of these
hold, and leaves it (logging why) otherwise:

* the record is complete and names this runtime;
* the owner is provably dead: same pid namespace as the sweeper, and no process with that
  pid and start time (a sweeper in another pid namespace cannot tell, so it never sweeps);
* the bundle is older than ``older_than`` seconds.

The removal is: ``runtime delete --force`` (kills what is left, removes the cgroups and the
state), detach every mount at or below the bundle (deepest first), read the mount table
again and remove the directory only if no mount is left below it: ``rmtree`` would
otherwise delete files *through* a bind of a host directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Sequence

logger = logging.getLogger(__name__)

OWNER_FILE = "owner.json"  # in the bundle directory, next to config.json (not bound inside)
STALE_AFTER_S = 60.0
RUNTIME_DELETE_TIMEOUT_S = 30.0
# kavach.backends.oci.driver.container_id's names
_CONTAINER_ID = re.compile(r"kavach-[A-Za-z0-9_.-]{1,100}\Z")


def process_start_time(pid: int) -> int | None:
    """``/proc/<pid>/stat`` field 22 (start time in clock ticks since boot), None when no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


def _own_pid_namespace() -> str:
    return os.readlink("/proc/self/ns/pid")


def write_owner(bundle_dir: str, runtime: str) -> None:
    """Record this process as the owner of ``bundle_dir`` (created new, 0600)."""
    pid = os.getpid()
    start = process_start_time(pid)
    record = {"pid": pid, "start": start, "pidns": _own_pid_namespace(), "runtime": runtime}
    path = os.path.join(bundle_dir, OWNER_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(record, fh)


def _read_owner(bundle_dir: str) -> dict[str, object] | None:
    path = os.path.join(bundle_dir, OWNER_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, encoding="utf-8") as fh:
        try:
            record = json.load(fh)
        except ValueError:
            return None
    return record if isinstance(record, dict) else None


def owner_is_dead(record: dict[str, object]) -> bool:
    """True only when the record's owner provably no longer runs (see the module docstring)."""
    pid, start, pidns = record.get("pid"), record.get("start"), record.get("pidns")
    if not isinstance(pid, int) or not isinstance(start, int) or not isinstance(pidns, str):
        return False
    if pidns != _own_pid_namespace():
        return False  # pids of another namespace mean nothing here
    return process_start_time(pid) != start


def mounts_under(path: str) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace, deepest first."""
    from kavach.guards import parse_mountinfo

    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        mounts = parse_mountinfo(fh.read())
    prefix = path.rstrip("/") + "/"
    found = {m.mount_point for m in mounts if m.mount_point == path or m.mount_point.startswith(prefix)}
    return sorted(found, key=lambda p: (p.count("/"), p), reverse=True)


def detach_mounts_under(bundle_dir: str) -> list[str]:
    """Detach every mount at or below ``bundle_dir`` (root only); the ones still there
    afterwards. Anything that removes a bundle must call this first: ``rmtree`` would
    delete through a mount (a bound host directory's files, a tmpfs's contents)."""
    from kavach.backends.process import _libc

    for _ in range(8):  # mounts stacked on one point come off one per pass
        points = mounts_under(bundle_dir)
        if not points:
            return []
        for point in points:
            try:
                _libc.umount2(point, _libc.MNT_DETACH, f"unmount {point}")
            except OSError as exc:
                logger.warning("sweep: could not detach %s: %s", point, exc)
    return mounts_under(bundle_dir)


async def _runtime_delete(runtime_argv: Sequence[str], container: str) -> str | None:
    """``<runtime> delete --force <container>``; an error text, or None when it worked."""
    from kavach.backends.oci.runtime import call

    try:
        returncode, _, err = await call([*runtime_argv, "delete", "--force", container], RUNTIME_DELETE_TIMEOUT_S)
    except TimeoutError:
        return "timed out"
    if returncode != 0:
        return err.decode(errors="replace").strip() or f"exit {returncode}"
    return None


async def sweep(
    bundle_base: str,
    state_dir: str,
    runtime: str,
    runtime_argv: Sequence[str],
    *,
    older_than: float = STALE_AFTER_S,
) -> list[str]:
    """Remove the bundles (and containers) of dead owners under ``bundle_base``; their names.

    ``runtime_argv`` is the runtime's command with its ``--root`` (``state_dir``) options.
    A bundle that cannot be fully removed is logged and left as it is.
    """
    try:
        names = sorted(os.listdir(bundle_base))
    except FileNotFoundError:
        return []
    removed = []
    now = time.time()
    for name in names:
        bundle_dir = os.path.join(bundle_base, name)
        if await _sweep_one(bundle_dir, name, state_dir, runtime, runtime_argv, now - older_than):
            removed.append(name)
    return removed


async def _sweep_one(
    bundle_dir: str, container: str, state_dir: str, runtime: str, runtime_argv: Sequence[str], cutoff: float
) -> bool:
    if not _CONTAINER_ID.match(container):
        return False  # not a name kavach gives (and never an option-like argument for the runtime)
    try:
        info = os.lstat(bundle_dir)
        if not stat.S_ISDIR(info.st_mode) or info.st_mtime > cutoff:
            return False  # a symlink is not a bundle of ours; a young bundle may be being built
        record = _read_owner(bundle_dir)
    except FileNotFoundError:
        return False  # removed meanwhile
    if record is None or record.get("runtime") != runtime or not owner_is_dead(record):
        return False
    if os.path.exists(os.path.join(state_dir, container)):
        error = await _runtime_delete(runtime_argv, container)
        if error is not None or os.path.exists(os.path.join(state_dir, container)):
            logger.warning("sweep: %s delete %s failed, bundle left: %s", runtime, container, error)
            return False
    left = detach_mounts_under(bundle_dir)
    if left:
        # Never rmtree through a mount: it would delete the files of a host directory.
        logger.warning("sweep: mounts left below %s, bundle left: %s", bundle_dir, ", ".join(left))
        return False
    try:
        shutil.rmtree(bundle_dir)
    except OSError as exc:
        logger.warning("sweep: could not remove %s: %s", bundle_dir, exc)
        return False
    logger.info("sweep: removed the leftovers of dead owner %s: %s", record.get("pid"), container)
    return True


async def sweep_logged(bundle_base: str, state_dir: str, runtime: str, runtime_argv: Sequence[str]) -> list[str]:
    """:func:`sweep` for a create: an error while sweeping is logged, never raised."""
    try:
        return await sweep(bundle_base, state_dir, runtime, runtime_argv)
    except OSError as exc:
        logger.warning("sweep of %s stopped: %s", bundle_base, exc)
        return []


__all__ = [
    "OWNER_FILE",
    "STALE_AFTER_S",
    "detach_mounts_under",
    "mounts_under",
    "owner_is_dead",
    "process_start_time",
    "sweep",
    "sweep_logged",
    "write_owner",
]
