"""Building the sandbox's root filesystem inside its new mount namespace.

One readable sequence (run by the sandbox's init before it serves commands), each step
named so that a failure reports which mount broke and why:

1. make every inherited mount private, so nothing propagates back to the host;
2. detach every source (``open_tree``) while host paths still resolve, and set the
   read-only / nosuid / nodev attributes on the detached copies (``mount_setattr``);
3. mount an empty tmpfs as the new root and attach the copies into it;
4. fresh /proc (with the runtime-style read-only and masked paths), a fresh tmpfs /dev
   with only the safe device nodes, a size-capped /tmp, the workdir, the policy's binds;
5. the generated /etc files and the injected files (secrets), on tmpfs only;
6. ``pivot_root`` and detach the old root, so no host path outside the binds remains;
7. optionally remount the root tmpfs read-only.
"""

from __future__ import annotations

import base64
import contextlib
import os
from typing import Any

from kavach.backends import rootfs
from kavach.backends.process import _libc
from kavach.backends.process._libc import (
    AT_EMPTY_PATH,
    AT_FDCWD,
    AT_RECURSIVE,
    MOUNT_ATTR_NODEV,
    MOUNT_ATTR_NOEXEC,
    MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_RDONLY,
    OPEN_TREE_CLOEXEC,
    OPEN_TREE_CLONE,
)

# Where the new root is attached before pivot_root. Every source has been detached by then,
# so covering this directory hides nothing the sandbox needs.
STAGING_DIR = "/tmp"
ROOT_TMPFS_BASE = 1024 * 1024


def _rel(path: str) -> str:
    return path.lstrip("/") or "."


def _detach(source: str, recursive: bool, attrs: int, step: str, *, no_symlinks: bool = False) -> int:
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    if no_symlinks:
        fd = _libc.open_tree_no_symlinks(source, flags, step)
    else:
        fd = _libc.open_tree(AT_FDCWD, source, flags, step)
    if attrs:
        try:
            _libc.mount_setattr(fd, "", AT_EMPTY_PATH | AT_RECURSIVE, attrs, f"{step}: set attributes")
        except BaseException:
            os.close(fd)
            raise
    return fd


def _step_into(dir_fd: int, name: str, step: str) -> int:
    """An O_PATH fd on ``name`` in ``dir_fd``, refusing a symbolic link (ELOOP) or ``..``."""
    return _libc.openat2(
        dir_fd, name, os.O_PATH | os.O_CLOEXEC, _libc.RESOLVE_NO_SYMLINKS | _libc.RESOLVE_BENEATH, step
    )


def _open_dirs(rel: str, step: str) -> int:
    """An O_PATH fd on directory ``rel`` below the new root (cwd), creating what is missing.

    No component is followed if it is a symbolic link. Targets may lie inside a writable
    bind attached earlier (the workdir, a rw_binds entry), where a sandbox could have planted
    links on a previous run; before pivot_root a link there would lead init into the host's
    tree (creating directories, mounting, writing an injected file where the link points).
    """
    fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in (part for part in rel.split("/") if part and part != "."):
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=fd)
            next_fd = _step_into(fd, name, step)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_mountpoint(path: str, is_dir: bool, step: str) -> int:
    """An O_PATH fd on ``path`` (relative to the new root), an empty directory or file to
    mount on, reached without following any link (see :func:`_open_dirs`)."""
    if is_dir:
        return _open_dirs(path, step)
    parent_fd = _open_dirs(os.path.dirname(path), step)
    try:
        name = os.path.basename(path)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o444, dir_fd=parent_fd))
        return _step_into(parent_fd, name, step)
    finally:
        os.close(parent_fd)


def _attach(fd: int, target: str, is_dir: bool, step: str) -> None:
    try:
        target_fd = _open_mountpoint(target, is_dir, step)
        try:
            _libc.move_mount(fd, target_fd, "", step)
        finally:
            os.close(target_fd)
    finally:
        os.close(fd)


def _tmpfs_options(mode: str, size: int) -> dict[str, str]:
    """tmpfs options with a byte cap and an inode cap (:func:`rootfs.tmpfs_inodes`)."""
    return {"mode": mode, "size": str(size), "nr_inodes": str(rootfs.tmpfs_inodes(size))}


def _tmpfs(target: str, options: dict[str, str], attrs: int, step: str) -> None:
    fd = _libc.new_fs_mount("tmpfs", options, attrs, step)
    _attach(fd, target, True, step)


class Sources:
    """Detached copies of every host path the sandbox will see, taken before the root is covered."""

    def __init__(self) -> None:
        self.ro: list[tuple[int, str, bool]] = []
        self.user: list[tuple[int, str, bool]] = []
        self.dev: list[tuple[int, str]] = []

    def close(self) -> None:
        """Close what was not attached (on a failed setup)."""
        for fd, _target, _is_dir in (*self.ro, *self.user):
            os.close(fd)
        for fd, _target in self.dev:
            os.close(fd)
        self.ro, self.user, self.dev = [], [], []


def detach_sources(plan: dict[str, Any], prepared: list[int]) -> Sources:
    """Step 2: detached, attribute-set copies of every bind source.

    ``prepared`` holds the root caller's idmapped copies of the user binds, in plan order.
    """
    sources = Sources()
    ro_attrs = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
    try:
        for source, target, is_dir in plan["system_binds"]:
            sources.ro.append((_detach(source, True, ro_attrs, f"bind {source} read-only"), target, is_dir))
        if prepared:
            for fd, (_source, target, is_dir, _writable) in zip(prepared, plan["user_binds"], strict=True):
                sources.user.append((fd, target, is_dir))
            prepared.clear()
        else:
            for source, target, is_dir, writable in plan["user_binds"]:
                attrs = (MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV) if writable else ro_attrs
                mode = "read-write" if writable else "read-only"
                # The caller's binds may lie where sandboxes write: no link is followed.
                fd = _detach(source, True, attrs, f"bind {source} {mode}", no_symlinks=True)
                sources.user.append((fd, target, is_dir))
        for node in plan["dev_nodes"]:
            sources.dev.append((_detach(node, False, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC, f"bind {node}"), node))
    except OSError as exc:
        for fd in prepared:
            os.close(fd)
        prepared.clear()
        sources.close()
        if isinstance(exc, _libc.KernelCallError):
            raise
        raise _libc.KernelCallError(f"inspect bind source {exc.filename}", exc.errno or 0) from None
    return sources


def _build_proc() -> None:
    proc_fd = _libc.new_fs_mount(
        "proc", {}, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC, "mount a fresh /proc"
    )
    _attach(proc_fd, "proc", True, "mount a fresh /proc")
    for path in rootfs.PROC_READONLY:
        rel = _rel(path)
        if not os.path.lexists(rel):
            continue
        fd = _detach(rel, True, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, f"read-only {path}")
        try:
            _libc.move_mount(fd, AT_FDCWD, rel, f"read-only {path}")
        finally:
            os.close(fd)
    for path in rootfs.PROC_MASKED_FILES:
        rel = _rel(path)
        if not os.path.lexists(rel):
            continue
        fd = _detach("dev/null", False, 0, f"mask {path}")
        try:
            _libc.move_mount(fd, AT_FDCWD, rel, f"mask {path}")
        finally:
            os.close(fd)
    for path in rootfs.PROC_MASKED_DIRS:
        rel = _rel(path)
        if not os.path.isdir(rel):
            continue
        fd = _libc.new_fs_mount(
            "tmpfs",
            {"size": "4096", "mode": "0555"},
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
            f"mask {path}",
        )
        try:
            _libc.move_mount(fd, AT_FDCWD, rel, f"mask {path}")
        finally:
            os.close(fd)


def _build_dev(sources: Sources) -> None:
    _tmpfs(
        "dev",
        _tmpfs_options("0755", rootfs.DEV_TMPFS_SIZE),
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
        "mount a tmpfs /dev",
    )
    while sources.dev:
        fd, node = sources.dev.pop(0)
        _attach(fd, _rel(node), False, f"bind {node}")
    for link, target in rootfs.DEV_SYMLINKS:
        os.symlink(target, _rel(link))
    # POSIX shared memory (Python's multiprocessing semaphores) needs a writable /dev/shm;
    # it gets its own small tmpfs, so that /dev itself can be read-only.
    _tmpfs(
        "dev/shm",
        _tmpfs_options("1777", rootfs.DEV_SHM_SIZE),
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        "mount a tmpfs /dev/shm",
    )
    _libc.mount_setattr(AT_FDCWD, "dev", 0, MOUNT_ATTR_RDONLY, "remount /dev read-only")


def _write_file(path: str, data: bytes, mode: int) -> None:
    rel = _rel(path)
    parent = os.path.dirname(rel)
    if parent:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    fd = os.open(rel, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _copy_secret(source_fd: int, path: str, mode: int) -> None:
    """Copy an injected file from its memfd with sendfile: the bytes never enter init's heap.

    Its directory may lie inside a writable bind: it is reached without following links."""
    rel = _rel(path)
    size = os.fstat(source_fd).st_size
    parent_fd = _open_dirs(os.path.dirname(rel), f"injected file {path}")
    try:
        flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(os.path.basename(rel), flags, mode, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)
    try:
        offset = 0
        while offset < size:
            sent = os.sendfile(fd, source_fd, offset, size - offset)
            if sent == 0:
                raise _libc.KernelCallError(f"copy injected file {path}", 5)
            offset += sent
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def build_root(plan: dict[str, Any], sources: Sources, file_fds: list[int]) -> None:
    """Steps 3-7. Runs in init, in its own mount, user and pid namespaces; leaves cwd at /."""
    _libc.mount(None, "/", None, _libc.MS_REC | _libc.MS_PRIVATE, None, "make all mounts private")
    files_size = sum(len(base64.b64decode(content)) for _path, content, _mode in plan["generated"])
    for fd in file_fds:
        files_size += os.fstat(fd).st_size
    root_size = ROOT_TMPFS_BASE + files_size
    root_fd = _libc.new_fs_mount(
        "tmpfs", _tmpfs_options("0755", root_size), MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, "mount the root tmpfs"
    )
    try:
        _libc.move_mount(root_fd, AT_FDCWD, STAGING_DIR, "attach the root tmpfs")
    finally:
        os.close(root_fd)
    os.chdir(STAGING_DIR)

    for target, link in plan["symlinks"]:
        os.symlink(target, _rel(link))
    while sources.ro:
        fd, target, is_dir = sources.ro.pop(0)
        _attach(fd, _rel(target), is_dir, f"attach {target}")
    os.makedirs("etc", mode=0o755, exist_ok=True)
    for path, content, mode in plan["generated"]:
        _write_file(path, base64.b64decode(content), mode)

    _build_dev(sources)
    _build_proc()
    _tmpfs(
        "tmp",
        _tmpfs_options("1777", plan["tmp_size"]),
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        "mount a tmpfs /tmp",
    )
    if plan["workdir_tmpfs"]:
        _tmpfs(
            _rel(plan["workdir"]),
            _tmpfs_options("0755", plan["workdir_size"]),
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            f"mount a tmpfs workdir at {plan['workdir']}",
        )
    # User binds come after the tmpfs mounts (they may lie below /tmp or the workdir),
    # shallowest first so that a nested bind lands on top of its parent bind.
    while sources.user:
        fd, target, is_dir = sources.user.pop(0)
        _attach(fd, _rel(target), is_dir, f"attach {target}")

    for (path, mode), fd in zip(plan["files"], file_fds, strict=True):
        _copy_secret(fd, path, mode)

    # pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves
    # only the new root (the runc way, no put_old directory needed).
    _libc.pivot_root(".", ".", "pivot_root into the new root")
    _libc.umount2(".", _libc.MNT_DETACH, "detach the old root")
    os.chdir("/")
    if plan["read_only_root"]:
        _libc.mount_setattr(AT_FDCWD, "/", 0, MOUNT_ATTR_RDONLY, "remount the root read-only")


__all__ = ["STAGING_DIR", "Sources", "build_root", "detach_sources"]
