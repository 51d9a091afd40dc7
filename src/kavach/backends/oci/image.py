"""Where an OCI sandbox's root filesystem comes from, and how it is prepared in the bundle.

Three sources:

* :class:`HostRootfs` (default): an empty directory in the bundle plus read-only binds of the
  host's system directories, the generated /etc files and the /etc entries programs need,
  exactly the layout of :mod:`kavach.backends.rootfs` that the Process engine builds.
* :class:`DirectoryRootfs`: a root filesystem directory the user gives (used as is; the
  runtime creates missing mount points, so the directory must allow that).
* :class:`ImageRootfs`: an OCI image layout on disk (``umoci init``/``skopeo copy oci:...``),
  unpacked into the bundle with ``umoci unpack``. No registry is contacted: only the
  layout's own blobs are read.

With a user namespace, files must belong to ids that exist inside. The host layout's rootfs
directory is chowned to the sandbox's root, and ``umoci unpack --uid-map/--gid-map`` shifts
an image's owners into the sandbox's range, so a file owned by root in the image is owned by
root inside (and by an unprivileged uid on the host).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from dataclasses import dataclass

from kavach.backends import rootfs as layout
from kavach.backends.oci.bundle import IdMap, Mount, ro_bind
from kavach.errors import SandboxCreateError

UMOCI_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class HostRootfs:
    """Host system directories bound read-only into an empty root (the Process layout)."""


@dataclass(frozen=True)
class DirectoryRootfs:
    """A root filesystem directory on the host, used as the container's root."""

    path: str


@dataclass(frozen=True)
class ImageRootfs:
    """An OCI image layout directory and the tag to unpack (``umoci unpack``)."""

    layout: str
    tag: str = "latest"


RootfsSource = HostRootfs | DirectoryRootfs | ImageRootfs


@dataclass(frozen=True)
class PreparedRootfs:
    """The rootfs path for config.json, the mounts it needs, and whether python3 exists inside."""

    path: str
    mounts: tuple[Mount, ...]
    has_python3: bool
    has_sh: bool
    kind: str


def _owned_dir(path: str, owner: tuple[int, int] | None, mode: int = 0o755) -> None:
    os.makedirs(path, mode=mode, exist_ok=True)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, *owner)


def _write_file(path: str, data: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)


def _mountpoint(rootfs_dir: str, target: str, is_dir: bool, owner: tuple[int, int] | None) -> None:
    """Create ``target`` (and its parents) inside a rootfs kavach built itself (no symlinks)."""
    if not target.startswith("/") or any(part in ("..", ".") for part in target.split("/")) or "\0" in target:
        # Policies built in code skip Bind.parse's checks; never let a target leave the rootfs.
        raise SandboxCreateError(f"mount target {target!r} must be an absolute path without '.' or '..'")
    for parent in layout.parent_dirs(target):
        host = rootfs_dir + parent
        if not os.path.lexists(host):
            _owned_dir(host, owner)
    host = rootfs_dir + target
    if os.path.lexists(host):
        return
    if is_dir:
        _owned_dir(host, owner)
    else:
        _write_file(host, b"", 0o644, owner)


def prepare_host_rootfs(
    bundle_dir: str, hostname: str, owner: tuple[int, int] | None, resolv_conf: bytes | None
) -> PreparedRootfs:
    """Build ``bundle_dir/rootfs``: symlinks for merged-/usr, binds, generated /etc files."""
    rootfs_dir = os.path.join(bundle_dir, "rootfs")
    _owned_dir(rootfs_dir, owner)
    mounts: list[Mount] = []
    for path in layout.SYSTEM_RO_DIRS:
        if os.path.islink(path):
            # Merged /usr: /bin -> usr/bin is recreated as the same symlink, not bound twice.
            os.symlink(os.readlink(path), rootfs_dir + path)
            if owner is not None:
                os.lchown(rootfs_dir + path, *owner)
        elif os.path.isdir(path):
            _mountpoint(rootfs_dir, path, True, owner)
            mounts.append(ro_bind(path))
    _owned_dir(rootfs_dir + "/etc", owner)
    for generated in layout.generated_etc(hostname, resolv_conf):
        _write_file(rootfs_dir + generated.path, generated.content, generated.mode, owner)
    for path in layout.ETC_RO_PATHS:
        if not os.path.exists(path):
            continue
        _mountpoint(rootfs_dir, path, os.path.isdir(path), owner)
        mounts.append(ro_bind(path))
    for directory in ("/proc", "/dev", "/sys", "/tmp"):
        _mountpoint(rootfs_dir, directory, True, owner)
    has_python3 = os.path.exists("/usr/bin/python3")
    return PreparedRootfs(rootfs_dir, tuple(mounts), has_python3, os.path.exists("/bin/sh"), "host")


def create_mountpoints(rootfs_dir: str, targets: list[tuple[str, bool]], owner: tuple[int, int] | None) -> None:
    """Mount points for the policy's binds, workdir and injected files in the host rootfs."""
    for target, is_dir in targets:
        _mountpoint(rootfs_dir, target, is_dir, owner)


def _exists_inside(rootfs_dir: str, path: str) -> bool:
    # lexists: an image's /usr/bin/python3 is usually a relative symlink; following an absolute
    # one would look at the host, so only its presence is checked, never its target.
    return os.path.lexists(os.path.join(rootfs_dir, path.lstrip("/")))


def prepare_directory_rootfs(source: DirectoryRootfs, mount_points: list[str]) -> PreparedRootfs:
    """Use the user's directory as the root, unchanged.

    kavach does not write into a directory it does not own, and the runtime cannot create
    mount points in it either (the sandbox's root is an unprivileged host uid and the root
    is read-only), so every mount point must already exist: missing ones are named.
    """
    path = os.path.abspath(source.path)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise SandboxCreateError(f"rootfs directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(mode):
        raise SandboxCreateError(f"rootfs {path} is not a directory")
    if os.geteuid() == 0 and mode & 0o005 != 0o005:
        # The sandbox's root is an unprivileged host uid, i.e. "other" for a root-owned tree.
        raise SandboxCreateError(f"rootfs directory {path} must be readable and searchable by others (0755)")
    missing = [m for m in mount_points if not _exists_inside(path, m)]
    if missing:
        raise SandboxCreateError(f"rootfs directory {path} lacks the mount points {', '.join(missing)}; create them")
    return PreparedRootfs(
        path, (), _exists_inside(path, "/usr/bin/python3"), _exists_inside(path, "/bin/sh"), "directory"
    )


def _map_arg(maps: tuple[IdMap, ...]) -> list[str]:
    return [f"{m.container_id}:{m.host_id}:{m.size}" for m in maps]


async def unpack_image(
    source: ImageRootfs, target_dir: str, uid_map: tuple[IdMap, ...], gid_map: tuple[IdMap, ...]
) -> PreparedRootfs:
    """``umoci unpack`` the layout's tag into ``target_dir`` (a bundle of its own; we use its rootfs)."""
    umoci = shutil.which("umoci")
    if umoci is None:
        raise SandboxCreateError("umoci not found on PATH: needed to unpack an OCI image layout (make install)")
    if not os.path.isfile(os.path.join(source.layout, "oci-layout")):
        raise SandboxCreateError(f"{source.layout} is not an OCI image layout (no oci-layout file)")
    argv = [umoci, "unpack"]
    for value in _map_arg(uid_map):
        argv += ["--uid-map", value]
    for value in _map_arg(gid_map):
        argv += ["--gid-map", value]
    if os.geteuid() != 0:
        argv.append("--rootless")
    argv += ["--image", f"{source.layout}:{source.tag}", target_dir]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), UMOCI_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise SandboxCreateError(f"umoci unpack of {source.layout}:{source.tag} timed out") from None
    if proc.returncode != 0:
        detail = output.decode(errors="replace").strip().splitlines()
        raise SandboxCreateError(
            f"umoci unpack of {source.layout}:{source.tag} failed: {detail[-1] if detail else proc.returncode}"
        )
    rootfs_dir = os.path.join(target_dir, "rootfs")
    return PreparedRootfs(
        rootfs_dir,
        (),
        _exists_inside(rootfs_dir, "/usr/bin/python3"),
        _exists_inside(rootfs_dir, "/bin/sh"),
        "image",
    )


__all__ = [
    "DirectoryRootfs",
    "HostRootfs",
    "ImageRootfs",
    "PreparedRootfs",
    "RootfsSource",
    "create_mountpoints",
    "prepare_directory_rootfs",
    "prepare_host_rootfs",
    "unpack_image",
]
