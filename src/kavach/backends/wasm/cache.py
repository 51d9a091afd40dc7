"""Compiled-module cache of the WASM backend: memory first, then authenticated files on disk.

Compiling a module with Cranelift takes tens of milliseconds; deserializing a compiled
artifact takes a fraction of one. Artifacts are stored under
``$KAVACH_CACHE_DIR/wasm`` (else ``$XDG_CACHE_HOME/kavach/wasm``, else
``~/.cache/kavach/wasm``), one file per (module bytes, engine configuration, wasmtime
version).

``Module.deserialize`` trusts its input: a crafted artifact is native code. So every file
carries an HMAC-SHA256 over its name and payload, keyed by a random per-cache key
(``.hmac-key``, mode 0600), and is deserialized only after the MAC matches. A file that
fails the check is deleted and the module is recompiled. The directory itself must be
owned by this user and not writable by group or others; otherwise the disk cache is
switched off (memory only) and :attr:`ModuleCache.disabled_reason` says why.

Writers never expose a partial file: each writes a private temporary file in the same
directory, fsyncs it and renames it over the final name (atomic on POSIX), so concurrent
processes compiling the same module each leave one complete, valid artifact. The key
file is created the same way with ``link()``, which fails if another process won the race.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

MAGIC = b"KVWASM01"
_MAC_LEN = 32
_KEY_LEN = 32
_KEY_FILE = ".hmac-key"
_SUFFIX = ".cwasm"
MEMORY_ENTRIES = 64

ModuleT = TypeVar("ModuleT")


def default_cache_dir() -> Path:
    """Where compiled artifacts live by default (see the module docstring)."""
    root = os.environ.get("KAVACH_CACHE_DIR")
    if root:
        return Path(root) / "wasm"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "kavach" / "wasm"


@dataclass
class CacheStats:
    """Counters for tests and the benchmark."""

    memory_hits: int = 0
    disk_hits: int = 0
    compiles: int = 0
    rejected: int = 0  # files whose MAC or format was wrong (deleted, then recompiled)
    write_errors: int = 0


class ModuleCache(Generic[ModuleT]):
    """Compiled modules keyed by ``sha256(source)`` for one engine configuration.

    ``compile`` turns source bytes into a module, ``serialize``/``deserialize`` convert
    a module to and from bytes for this engine. ``fingerprint`` must change whenever the
    engine configuration or the wasmtime version changes (it is part of every file name
    and of every MAC, so an artifact of another configuration is never loaded).
    ``directory=None`` keeps the cache in memory only.
    """

    def __init__(
        self,
        fingerprint: str,
        compile: Callable[[bytes], ModuleT],
        serialize: Callable[[ModuleT], bytes],
        deserialize: Callable[[bytes], ModuleT],
        directory: Path | None = None,
    ) -> None:
        self.fingerprint = fingerprint
        self._fp_tag = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        self._compile = compile
        self._serialize = serialize
        self._deserialize = deserialize
        self._memory: OrderedDict[str, ModuleT] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()
        self.directory: Path | None = None
        self.disabled_reason: str | None = None
        self._key: bytes | None = None
        if directory is not None:
            try:
                self._key = self._open_directory(directory)
                self.directory = directory
            except OSError as exc:
                self.disabled_reason = f"cannot use {directory}: {exc.strerror or exc}"
            except _UnsafeCacheDirError as exc:
                self.disabled_reason = str(exc)

    # -- public ------------------------------------------------------------------------------

    def key_for(self, source: bytes) -> str:
        """The cache key (and file stem) of ``source`` under this engine configuration."""
        return f"{hashlib.sha256(source).hexdigest()}-{self._fp_tag}"

    def path_for(self, source: bytes) -> Path | None:
        """The artifact file of ``source``, or None without a disk cache."""
        if self.directory is None:
            return None
        return self.directory / (self.key_for(source) + _SUFFIX)

    def get(self, source: bytes) -> ModuleT:
        """The compiled module of ``source``: from memory, else a verified file, else compiled now.

        Compilation errors propagate unchanged (the caller maps them to its own error).
        """
        key = self.key_for(source)
        with self._lock:
            module = self._memory.get(key)
            if module is not None:
                self._memory.move_to_end(key)
                self.stats.memory_hits += 1
                return module
        module = self._load(key)
        if module is None:
            module = self._compile(source)
            self.stats.compiles += 1
            self._store(key, module)
        with self._lock:
            self._memory[key] = module
            while len(self._memory) > MEMORY_ENTRIES:
                self._memory.popitem(last=False)
        return module

    def clear_memory(self) -> None:
        """Forget the in-memory modules (the files stay); used by tests and the benchmark."""
        with self._lock:
            self._memory.clear()

    # -- files -------------------------------------------------------------------------------

    def _mac(self, name: str, payload: bytes) -> bytes:
        assert self._key is not None
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        # The file name (content hash + configuration tag) is authenticated too, so a valid
        # artifact of module A renamed to module B's name is rejected.
        mac.update(name.encode())
        mac.update(b"\0")
        mac.update(self.fingerprint.encode())
        mac.update(b"\0")
        mac.update(payload)
        return mac.digest()

    def _load(self, key: str) -> ModuleT | None:
        if self.directory is None:
            return None
        path = self.directory / (key + _SUFFIX)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        except OSError:
            self.stats.write_errors += 1
            return None
        header_len = len(MAGIC) + _MAC_LEN
        valid = len(data) > header_len and data.startswith(MAGIC)
        if valid:
            mac = data[len(MAGIC) : header_len]
            payload = data[header_len:]
            valid = hmac.compare_digest(mac, self._mac(path.name, payload))
        if not valid:
            # Never hand unauthenticated bytes to Module.deserialize (it maps them as code).
            self.stats.rejected += 1
            self._unlink_quietly(path)
            return None
        try:
            module = self._deserialize(payload)
        except Exception:  # noqa: BLE001 - an authenticated artifact that wasmtime refuses is recompiled
            self.stats.rejected += 1
            self._unlink_quietly(path)
            return None
        self.stats.disk_hits += 1
        return module

    def _store(self, key: str, module: ModuleT) -> None:
        if self.directory is None:
            return
        path = self.directory / (key + _SUFFIX)
        try:
            payload = self._serialize(module)
            blob = MAGIC + self._mac(path.name, payload) + payload
            _atomic_write(path, blob, mode=0o600)
        except OSError:
            # A full disk or a read-only cache costs a recompile next time, nothing more.
            self.stats.write_errors += 1

    @staticmethod
    def _unlink_quietly(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError:
            # Another writer may have replaced it already; the next load checks it again.
            return

    # -- directory and key -------------------------------------------------------------------

    def _open_directory(self, directory: Path) -> bytes:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_private(directory, is_dir=True)
        key_path = directory / _KEY_FILE
        try:
            return _read_key(key_path)
        except FileNotFoundError:
            pass
        candidate = secrets.token_bytes(_KEY_LEN)
        tmp = _write_temp(directory, candidate, mode=0o600)
        try:
            # link() refuses to overwrite: exactly one concurrent creator wins, the others
            # read the winner's key.
            os.link(tmp, key_path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        return _read_key(key_path)


class _UnsafeCacheDirError(Exception):
    """The cache directory or key file could be written by someone else: do not trust it."""


def _check_private(path: Path, *, is_dir: bool) -> os.stat_result:
    info = os.lstat(path)
    kind_ok = stat.S_ISDIR(info.st_mode) if is_dir else stat.S_ISREG(info.st_mode)
    if not kind_ok:
        raise _UnsafeCacheDirError(f"{path} is not a {'directory' if is_dir else 'regular file'}")
    if info.st_uid != os.geteuid():
        raise _UnsafeCacheDirError(f"{path} is owned by uid {info.st_uid}, not by this user")
    if info.st_mode & 0o022:
        raise _UnsafeCacheDirError(f"{path} is writable by group or others (mode {info.st_mode & 0o777:o})")
    return info


def _read_key(path: Path) -> bytes:
    _check_private(path, is_dir=False)
    key = path.read_bytes()
    if len(key) != _KEY_LEN:
        raise _UnsafeCacheDirError(f"{path} does not hold a {_KEY_LEN}-byte key")
    return key


def _write_temp(directory: Path, data: bytes, mode: int) -> str:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    tmp = _write_temp(path.parent, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


__all__ = ["MAGIC", "CacheStats", "ModuleCache", "default_cache_dir"]
