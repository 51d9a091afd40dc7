"""Namespaces: which ones a sandbox gets, its uid/gid mapping, loopback, namespace inodes.

uid mapping (a user namespace is always created, root caller too):

* unprivileged caller: root inside maps to the caller's own uid (the only mapping the
  kernel allows without privilege), ``setgroups`` denied;
* root caller: root inside maps to an unprivileged host range of 65536 ids starting at
  :data:`ROOT_MAP_BASE` plus a per-sandbox slot, so a process that escaped the namespaces
  is an unprivileged nobody on the host, and two sandboxes rarely share ids. Writable binds
  stay writable through idmapped mounts (:func:`idmapped_tree`).

The maps are written from the caller's process (it holds the needed credentials); it
writes files and makes syscalls, it never forks.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

from kavach.backends.process import _libc
from kavach.backends.process._libc import (
    AT_EMPTY_PATH,
    AT_RECURSIVE,
    MOUNT_ATTR_IDMAP,
    MOUNT_ATTR_NODEV,
    MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_RDONLY,
    OPEN_TREE_CLOEXEC,
    OPEN_TREE_CLONE,
)

# Created at clone time; the cgroup namespace comes later, once the process is in its cgroup.
SANDBOX_NAMESPACES = (
    _libc.CLONE_NEWUSER | _libc.CLONE_NEWNS | _libc.CLONE_NEWPID | _libc.CLONE_NEWIPC | _libc.CLONE_NEWUTS
)
NS_NAMES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")

ROOT_MAP_BASE = 1_000_000_000
ROOT_MAP_SIZE = 65536
ROOT_MAP_SLOTS = 16384  # BASE + SLOTS * SIZE stays below 2**31


def root_map_base(sandbox_id: str) -> int:
    """The first host uid/gid of a root caller's sandbox (a stable slot from the id)."""
    # Imported here: this runs in the caller only, and hashlib (libcrypto) would otherwise
    # be loaded into every sandbox's init.
    import hashlib

    slot = int.from_bytes(hashlib.sha256(sandbox_id.encode()).digest()[:4], "big") % ROOT_MAP_SLOTS
    return ROOT_MAP_BASE + slot * ROOT_MAP_SIZE


def id_maps(caller_uid: int, caller_gid: int, sandbox_id: str) -> tuple[str, str, bool]:
    """(uid_map, gid_map, deny_setgroups) for a sandbox started by ``caller_uid``."""
    if caller_uid == 0:
        base = root_map_base(sandbox_id)
        line = f"0 {base} {ROOT_MAP_SIZE}\n"
        return line, line, False
    return f"0 {caller_uid} 1\n", f"0 {caller_gid} 1\n", True


def _write_proc(pid: int, name: str, content: str) -> None:
    path = f"/proc/{pid}/{name}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _libc.KernelCallError(f"open {path}", exc.errno or 0) from None
    try:
        os.write(fd, content.encode())
    except OSError as exc:
        raise _libc.KernelCallError(f"write {path} ({content.strip()!r})", exc.errno or 0) from None
    finally:
        os.close(fd)


def write_id_maps(pid: int, sandbox_id: str) -> None:
    """Map root inside ``pid``'s new user namespace (see the module docstring)."""
    uid_map, gid_map, deny_setgroups = id_maps(os.geteuid(), os.getegid(), sandbox_id)
    if deny_setgroups:
        # Required by the kernel before an unprivileged gid_map write (CVE-2014-8989).
        _write_proc(pid, "setgroups", "deny")
    _write_proc(pid, "uid_map", uid_map)
    _write_proc(pid, "gid_map", gid_map)


def idmapped_tree(source: str, userns_fd: int, *, writable: bool) -> int:
    """A detached, idmapped copy of ``source`` for a root caller's bind (read-only unless ``writable``).

    With the sandbox's own user namespace as the idmap, a file the host sees as owned by
    uid N is seen inside as owned by N as well (root stays root), so the sandbox's root can
    write what host root could, and files it creates belong to the bind's host owner.
    """
    fd = _libc.open_tree_no_symlinks(source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE, f"open_tree {source}")
    try:
        _libc.mount_setattr(
            fd,
            "",
            AT_EMPTY_PATH | AT_RECURSIVE,
            MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (0 if writable else MOUNT_ATTR_RDONLY),
            f"idmapped mount of {source}",
            userns_fd=userns_fd,
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def bring_up_loopback() -> None:
    """Set ``lo`` up in the current network namespace (needs CAP_NET_ADMIN there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        try:
            flags = struct.unpack("16sH14x", fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request))[1]
            fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))
        except OSError as exc:
            raise _libc.KernelCallError("bring up the loopback interface", exc.errno or 0) from None


def namespace_inodes(pid: str | int = "self") -> dict[str, str]:
    """``{"net": "net:[4026531840]", ...}`` for the namespaces of ``pid``."""
    result = {}
    for name in NS_NAMES:
        try:
            result[name] = os.readlink(f"/proc/{pid}/ns/{name}")
        except OSError as exc:
            result[name] = f"error: {exc.strerror}"
    return result


__all__ = [
    "NS_NAMES",
    "ROOT_MAP_BASE",
    "ROOT_MAP_SIZE",
    "SANDBOX_NAMESPACES",
    "bring_up_loopback",
    "id_maps",
    "idmapped_tree",
    "namespace_inodes",
    "root_map_base",
    "write_id_maps",
]
