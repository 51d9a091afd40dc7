"""OCI runtime discovery: which of runc, crun and runsc can run a kavach bundle here, and why not.

A probe must be cheap and must never raise, so it checks the binary, its version and the host's
cgroup layout instead of starting a container. The one refusal that is known in advance is
encoded with its evidence: crun refuses a cgroup v1 *hybrid* host (v1 controllers plus an empty
v2 mount at ``/sys/fs/cgroup/unified``) when it creates a container, which is what Debian 12's
crun 1.8 does on this machine. :func:`try_runtime` really runs a
container, for tests and for ``kavach backends --verbose``-style diagnostics that may be slow.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

#: The state directory kavach gives every runtime (``--root``), so destroy can check that it
#: left nothing behind and kavach never shares state with other users of the runtime.
DEFAULT_STATE_ROOT = "/run/kavach"

_VERSION_TIMEOUT_S = 5.0
_VERSION_RE = re.compile(r"version\s+v?(\d+)\.(\d+)(?:\.(\d+))?")


class CgroupMode(StrEnum):
    """How the host mounts cgroups."""

    UNIFIED = "unified"  # cgroup v2 only
    HYBRID = "hybrid"  # v1 controllers plus a v2 hierarchy at /sys/fs/cgroup/unified
    LEGACY = "legacy"  # cgroup v1 only
    NONE = "none"  # no cgroup filesystem (resource limits impossible)


class RuntimeName(StrEnum):
    """The OCI runtimes kavach knows, in order of preference for the OCI backend."""

    RUNC = "runc"
    CRUN = "crun"
    RUNSC = "runsc"


@dataclass(frozen=True)
class RuntimeInfo:
    """One runtime's probe result."""

    name: RuntimeName
    path: str | None
    version: str | None
    usable: bool
    reason: str

    def version_tuple(self) -> tuple[int, int, int] | None:
        """``(major, minor, patch)`` parsed from :attr:`version`."""
        return parse_version(self.version or "")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """The first ``version X.Y[.Z]`` in a runtime's ``--version`` output."""
    match = _VERSION_RE.search(text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def cgroup_mode(mountinfo: str | None = None) -> CgroupMode:
    """The host's cgroup layout, from ``/proc/self/mountinfo`` (or the given text)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text(encoding="utf-8")
        except OSError:
            return CgroupMode.NONE
    v1 = v2_root = v2_unified = False
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        if not sep:
            continue
        fields = head.split()
        fstype = tail.split()[0] if tail else ""
        mount_point = fields[4] if len(fields) > 4 else ""
        if fstype == "cgroup2":
            if mount_point == "/sys/fs/cgroup":
                v2_root = True
            elif mount_point == "/sys/fs/cgroup/unified":
                v2_unified = True
        elif fstype == "cgroup" and mount_point.startswith("/sys/fs/cgroup/"):
            v1 = True
    if v2_root:
        return CgroupMode.UNIFIED
    if v1 and v2_unified:
        return CgroupMode.HYBRID
    if v1:
        return CgroupMode.LEGACY
    return CgroupMode.NONE


def _version_output(path: str) -> str | None:
    try:
        done = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=_VERSION_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def probe_runc(path: str | None = None) -> RuntimeInfo:
    """runc: usable when the binary answers ``--version`` (it handles v1, hybrid and v2 cgroups)."""
    path = path or shutil.which("runc")
    if path is None:
        return RuntimeInfo(RuntimeName.RUNC, None, None, False, "runc not found on PATH (make install adds it)")
    out = _version_output(path)
    if out is None:
        return RuntimeInfo(RuntimeName.RUNC, path, None, False, f"{path} --version failed")
    version = _first_line(out)
    return RuntimeInfo(RuntimeName.RUNC, path, version, True, f"{version} at {path}")


def crun_refusal(version: tuple[int, int, int] | None, mode: CgroupMode) -> str | None:
    """Why crun ``version`` cannot create containers on a host in cgroup ``mode`` (None = it can).

    crun handles pure cgroup v1 and unified v2 but not the hybrid layout: it sees the v2 mount at
    ``/sys/fs/cgroup/unified``, finds the controllers bound to v1 and stops with "cgroups in
    hybrid mode not supported, drop all controllers from cgroupv2" (observed with Debian 12's
    crun 1.8.1 on this host, with and without resource limits and even with
    ``--cgroup-manager=disabled``; upstream reports show later releases behave the same).
    """
    if version is None:
        return "crun --version printed no version"
    if mode is CgroupMode.HYBRID:
        return (
            f"crun {'.'.join(map(str, version))} refuses this cgroup v1 hybrid host "
            "(v1 controllers plus an empty v2 mount at /sys/fs/cgroup/unified): "
            "'cgroups in hybrid mode not supported'; use runc"
        )
    return None


def probe_crun(path: str | None = None, mode: CgroupMode | None = None) -> RuntimeInfo:
    """crun: usable unless absent or known to refuse this host's cgroup layout."""
    path = path or shutil.which("crun")
    if path is None:
        return RuntimeInfo(RuntimeName.CRUN, None, None, False, "crun not found on PATH")
    out = _version_output(path)
    if out is None:
        return RuntimeInfo(RuntimeName.CRUN, path, None, False, f"{path} --version failed")
    version = _first_line(out)
    refusal = crun_refusal(parse_version(out), cgroup_mode() if mode is None else mode)
    if refusal is not None:
        return RuntimeInfo(RuntimeName.CRUN, path, version, False, refusal)
    return RuntimeInfo(RuntimeName.CRUN, path, version, True, f"{version} at {path}")


def probe_runsc(path: str | None = None) -> RuntimeInfo:
    """runsc (gVisor): usable when installed; it also needs ptrace/systrap support or /dev/kvm."""
    path = path or shutil.which("runsc")
    if path is None:
        return RuntimeInfo(
            RuntimeName.RUNSC,
            None,
            None,
            False,
            "runsc not found on PATH (gVisor is not installed; it is not packaged by Debian 12)",
        )
    out = _version_output(path)
    if out is None:
        return RuntimeInfo(RuntimeName.RUNSC, path, None, False, f"{path} --version failed")
    version = _first_line(out)
    return RuntimeInfo(RuntimeName.RUNSC, path, version, True, f"{version} at {path}")


def probe_runtime(name: RuntimeName) -> RuntimeInfo:
    """Probe one runtime by name."""
    if name is RuntimeName.RUNC:
        return probe_runc()
    if name is RuntimeName.CRUN:
        return probe_crun()
    return probe_runsc()


def choose_runtime(
    preferred: tuple[RuntimeName, ...] = (RuntimeName.RUNC, RuntimeName.CRUN),
) -> tuple[RuntimeInfo | None, list[RuntimeInfo]]:
    """The first usable runtime of ``preferred`` and every probe result (for the reason text)."""
    results: list[RuntimeInfo] = []
    for name in preferred:
        info = probe_runtime(name)
        results.append(info)
        if info.usable:
            return info, results
    return None, results


def explain(results: list[RuntimeInfo]) -> str:
    """One line naming why each runtime was rejected."""
    return "; ".join(f"{r.name.value}: {r.reason}" for r in results)


def state_root(runtime: RuntimeName, base: str = DEFAULT_STATE_ROOT) -> str:
    """kavach's own ``--root`` state directory for ``runtime``."""
    return os.path.join(base, runtime.value)


async def call(argv: Sequence[str], timeout: float) -> tuple[int, bytes, bytes]:
    """Run ``argv`` with stdin closed: ``(returncode, stdout, stderr)``.

    Raises :class:`TimeoutError` after ``timeout`` seconds, once the process is killed and reaped.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None  # communicate() returned: the process was reaped
    return proc.returncode, out, err


def try_runtime(path: str, bundle_dir: str, state_dir: str, container_id: str) -> tuple[bool, str]:
    """Really run ``bundle_dir`` once with the runtime at ``path``; ``(ok, combined output)``.

    Slow (a container start); used by tests and diagnostics to confirm a probe's claim, never
    by :func:`probe_runtime`. The container is deleted afterwards in every case.
    """
    try:
        done = subprocess.run(
            [path, "--root", state_dir, "run", "--bundle", bundle_dir, container_id],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        output = (done.stdout + done.stderr).strip()
        ok = done.returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, output = False, f"{type(exc).__name__}: {exc}"
    subprocess.run(
        [path, "--root", state_dir, "delete", "--force", container_id],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return ok, output


__all__ = [
    "DEFAULT_STATE_ROOT",
    "CgroupMode",
    "RuntimeInfo",
    "RuntimeName",
    "call",
    "cgroup_mode",
    "choose_runtime",
    "crun_refusal",
    "explain",
    "parse_version",
    "probe_crun",
    "probe_runc",
    "probe_runsc",
    "probe_runtime",
    "state_root",
    "try_runtime",
]
