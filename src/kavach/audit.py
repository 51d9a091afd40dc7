"""The audit chain: an append-only, HMAC-SHA256 chained JSON Lines log.

Each line is one entry::

    {"agent_id":…,"event":…,"hmac":…,"payload":{…},"prev_hmac":…,"sandbox_id":…,"serial":N,"timestamp":…}

written in canonical JSON (sorted keys, no whitespace, UTF-8). ``hmac`` is HMAC-SHA256 over a
domain tag plus the canonical encoding of every other field, and ``prev_hmac`` is the previous
entry's ``hmac``, so changing, removing, reordering or inserting any entry breaks the chain at
that serial. Serial 0 is the genesis entry; it records a fingerprint of the key (never the key).

Truncating the tail of a chain leaves a valid shorter chain, so the log also writes signed
*checkpoints* (serial + hmac of that entry) to a separate anchor file (``<log>.anchor``) every
``checkpoint_every`` entries and on close. :func:`verify` reports a chain that is shorter than,
or differs from, its last checkpoint.

Durability: by default every entry is written with one ``write(2)`` and ``fsync``'d before
:meth:`AuditLog.append` returns; ``append(..., sync=False)`` leaves the ``fsync`` to the end of
the caller's operation (:meth:`AuditLog.commit`, the next synced append, a checkpoint or close),
which the sandbox lifecycle uses to make the two entries of an exec durable with one ``fsync``.
With ``fsync=False`` (batched mode) entries reach the disk at
each checkpoint, :meth:`AuditLog.flush` and :meth:`AuditLog.close`; a machine crash can lose the
entries since then, a process crash cannot (the page cache survives it). A process killed in the
middle of a write leaves a *torn tail* (a partial last line): :func:`verify` reports it, and the
next :class:`AuditLog` to open or append to the file cuts it off and records an
``audit.repaired`` entry.

Several processes may append to one log: every append takes an exclusive ``flock`` on the log,
re-reads the tail under it and only then writes, so serials stay dense and the chain linear.

File safety: the log may sit in a directory other users can write to (a shared ``/tmp`` path),
and whoever runs kavach (often root) appends to and truncates it. So the log and its anchor are
opened relative to their directory, which must be ours or root's and not writable by group or
others unless it is sticky; with ``O_NOFOLLOW`` and ``O_NONBLOCK``; and are used only if the
descriptor is a regular file we own, not writable by group or others, with exactly one link.
Anything else (a planted symlink or hard link, a FIFO, another user's file) is an
:class:`AuditError` naming the path, before a byte is read, written or cut. Readers
(:func:`verify`, :func:`read_entries`, :func:`read_key_file`) refuse anything but a regular file,
so a FIFO or a device can neither hang them nor feed them endless data.

Key rules (:func:`resolve_key`): an explicit key, else ``KAVACH_AUDIT_KEY`` (hex), else the file
named by ``KAVACH_AUDIT_KEY_FILE`` (which must exist), else the default key file in the data
directory, created (32 random bytes, mode 0600) only when the log does not exist yet. A log that
exists without its key is an error; there is no built-in key. The key never appears in an entry,
a message or a repr.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePath
from typing import Any

from kavach import paths
from kavach.errors import AuditError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
GENESIS_EVENT = "audit.genesis"
REPAIRED_EVENT = "audit.repaired"
GENESIS_PREV_HMAC = "0" * 64
MIN_KEY_BYTES = 16
DEFAULT_KEY_BYTES = 32

# Domain separation: an entry MAC can never be replayed as a checkpoint signature or a key id.
_ENTRY_DOMAIN = b"kavach-audit-entry-v1\x00"
_ANCHOR_DOMAIN = b"kavach-audit-anchor-v1\x00"
_KEY_ID_DOMAIN = b"kavach-audit-key-id-v1\x00"

_ENTRY_FIELDS = frozenset({"serial", "timestamp", "event", "sandbox_id", "agent_id", "payload", "prev_hmac", "hmac"})
_ANCHOR_FIELDS = frozenset({"serial", "hmac", "timestamp", "sig"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_READ_CHUNK = 64 * 1024
_PAYLOAD_KEY = b',"payload":'

# Payload keys that name secret values. The lifecycle passes counts, never evidence; this is
# a second line of defence: string values under such keys are replaced before signing.
_SECRET_KEY = re.compile(
    r"(?i)(secret|passw(or)?d|passphrase|token|api[_-]?key|private[_-]?key|credential|"
    r"(^|_)auth(orization)?($|_)|cookie|session[_-]?id|bearer)"
)
REDACTED = "[redacted]"
# Every pattern here runs on strings that can come from a sandboxed workload (argv), so each
# one is linear: no pattern has two unbounded repeats that can both match the same text.
_SECRET_NAME = re.compile(r"(?i)passw(?:or)?d|passphrase|secret|token|api[_-]?key|private[_-]?key|credential")
_NAME = re.compile(r"-{0,2}[\w-]+")
_WORD = re.compile(r"[^\s;&|]+")
# Secrets embedded in strings (argv words, details): the value part is replaced, the name kept.
_SECRET_IN_TEXT = (
    re.compile(r"(?i)\b((?:proxy-)?authorization[ \t]*:[ \t]*|cookie[ \t]*:[ \t]*|x-api-key[ \t]*:[ \t]*)[^\r\n]+"),
    re.compile(r"(?i)\b(bearer[ \t]+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(://[^/\s:@]+:)[^@\s/]+(@)"),  # https://user:password@host
)


def _secret_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and _SECRET_NAME.search(name) is not None


def _redact_assignment(match: re.Match[str]) -> str:
    word = match.group()
    name, sep, _ = word.partition("=")
    return f"{name}={REDACTED}" if sep and _secret_name(name) else word


def redact_text(text: str) -> str:
    """``text`` with secret values in ``name=value``, auth headers, bearer tokens and URLs replaced."""
    if "=" in text:
        text = _WORD.sub(_redact_assignment, text)  # --password=x, GITHUB_TOKEN=x
    for pattern in _SECRET_IN_TEXT:
        text = pattern.sub(lambda m: m.group(1) + REDACTED + (m.group(2) if m.lastindex == 2 else ""), text)
    return text


# -- canonical encoding -------------------------------------------------------------------------


# One encoder for every entry: json.dumps with these options would build a new one per call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_bytes(obj: Mapping[str, Any]) -> bytes:
    """The one byte encoding of ``obj`` that is signed and written: sorted keys, no spaces, UTF-8."""
    try:
        return _CANONICAL.encode(obj).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise AuditError(f"audit entry cannot be encoded: {exc}") from None


def _mac(key: bytes, domain: bytes, body: Mapping[str, Any]) -> str:
    return hmac.new(key, domain + canonical_bytes(body), hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """A short public fingerprint of ``key`` (an HMAC of a constant; reveals nothing usable)."""
    return hmac.new(key, _KEY_ID_DOMAIN, hashlib.sha256).hexdigest()[:16]


def _now() -> str:
    """UTC now as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (formatted by hand: strftime costs more)."""
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    t = time.gmtime(seconds)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{nanos // 1000:06d}Z"
    )


def sanitize_payload(payload: Mapping[str, Any] | None) -> dict[str, Any]:
    """Plain JSON data for a payload, with secrets redacted (a defence in depth).

    String values under secret-like keys are replaced; inside other strings, ``name=value``
    pairs with secret-like names, auth headers, bearer tokens and URL passwords are replaced,
    and in lists the word after a flag such as ``--password`` is.

    Bytes are refused (they would be sandbox output, which never belongs in the log).
    Paths and enums become strings; other unknown objects are refused.
    """
    if payload is None:
        return {}
    return _sanitize_mapping(payload, "payload")


def _sanitize_mapping(value: Mapping[Any, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw_key, item in value.items():
        key = raw_key.value if isinstance(raw_key, Enum) else raw_key
        if not isinstance(key, str):
            raise AuditError(f"{where}: keys must be strings (got {type(raw_key).__name__})")
        if isinstance(item, str) and _SECRET_KEY.search(key):
            out[key] = REDACTED
        else:
            out[key] = _sanitize_value(item, f"{where}.{key}")
    return out


def _sanitize_value(value: Any, where: str) -> Any:
    if isinstance(value, str):
        return redact_text(value.value if isinstance(value, Enum) else value)
    if value is None or isinstance(value, bool | int):
        return value.value if isinstance(value, Enum) else value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditError(f"{where}: NaN and infinity cannot be audited")
        return value
    if isinstance(value, Mapping):
        return _sanitize_mapping(value, where)
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else list(value)
        clean = [_sanitize_value(v, f"{where}[]") for v in items]
        for i in range(1, len(items)):
            flag = items[i - 1]
            if isinstance(flag, str) and isinstance(items[i], str) and flag[:1] == "-" and _secret_name(flag):
                clean[i] = REDACTED
        return clean
    if isinstance(value, Enum):
        return _sanitize_value(value.value, where)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        raise AuditError(f"{where}: raw bytes are never written to the audit log")
    raise AuditError(f"{where}: cannot audit a {type(value).__name__}")


# -- entries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditEntry:
    """One signed entry of the chain."""

    serial: int
    timestamp: str
    event: str
    sandbox_id: str | None
    agent_id: str | None
    payload: Mapping[str, Any]
    prev_hmac: str
    hmac: str

    def body(self) -> dict[str, Any]:
        """Every field except ``hmac``: what the HMAC covers."""
        return {
            "serial": self.serial,
            "timestamp": self.timestamp,
            "event": self.event,
            "sandbox_id": self.sandbox_id,
            "agent_id": self.agent_id,
            "payload": dict(self.payload),
            "prev_hmac": self.prev_hmac,
        }

    def to_dict(self) -> dict[str, Any]:
        """The entry as written to the log."""
        return {**self.body(), "hmac": self.hmac}

    def line(self) -> bytes:
        """The exact bytes of this entry's log line, newline included."""
        return canonical_bytes(self.to_dict()) + b"\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditEntry:
        """Parse a decoded line; raises :class:`AuditError` naming what is malformed."""
        problem = _entry_shape_problem(data)
        if problem:
            raise AuditError(problem)
        return cls(
            serial=data["serial"],
            timestamp=data["timestamp"],
            event=data["event"],
            sandbox_id=data["sandbox_id"],
            agent_id=data["agent_id"],
            payload=data["payload"],
            prev_hmac=data["prev_hmac"],
            hmac=data["hmac"],
        )


def _entry_shape_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return "entry is not a JSON object"
    keys = set(data)
    if keys != _ENTRY_FIELDS:
        missing = sorted(_ENTRY_FIELDS - keys)
        extra = sorted(keys - _ENTRY_FIELDS)
        return f"malformed entry (missing {missing}, unexpected {extra})"
    serial = data["serial"]
    if not isinstance(serial, int) or isinstance(serial, bool) or serial < 0:
        return "malformed entry: serial is not a non-negative integer"
    for name in ("timestamp", "event"):
        if not isinstance(data[name], str):
            return f"malformed entry: {name} is not a string"
    for name in ("sandbox_id", "agent_id"):
        if data[name] is not None and not isinstance(data[name], str):
            return f"malformed entry: {name} is not a string or null"
    if not isinstance(data["payload"], dict):
        return "malformed entry: payload is not an object"
    for name in ("prev_hmac", "hmac"):
        if not isinstance(data[name], str) or not _HEX64.fullmatch(data[name]):
            return f"malformed entry: {name} is not 64 lowercase hex digits"
    return None


def _sign_entry(
    key: bytes,
    serial: int,
    prev_hmac: str,
    event: str,
    sandbox_id: str | None,
    agent_id: str | None,
    payload: dict[str, Any],
) -> tuple[AuditEntry, bytes]:
    """The signed entry and its exact log line (newline included), with one JSON encoding.

    The line is the canonical encoding of the body with ``"hmac"`` added. Keys are sorted, and
    ``hmac`` sorts between ``event`` and ``payload``, so the line is the body's bytes with
    ``,"hmac":"…"`` inserted before ``,"payload":``. That text occurs nowhere earlier: the
    only values before it are ``agent_id`` and ``event``, JSON strings (or null) in which a
    quote is always escaped. :func:`verify` checks every line is canonical.
    """
    timestamp = _now()
    body = {
        "serial": serial,
        "timestamp": timestamp,
        "event": event,
        "sandbox_id": sandbox_id,
        "agent_id": agent_id,
        "payload": payload,
        "prev_hmac": prev_hmac,
    }
    encoded = canonical_bytes(body)
    mac = hmac.new(key, _ENTRY_DOMAIN + encoded, hashlib.sha256).hexdigest()
    at = encoded.index(_PAYLOAD_KEY)
    line = b"".join((encoded[:at], b',"hmac":"', mac.encode("ascii"), b'"', encoded[at:], b"\n"))
    return AuditEntry(serial, timestamp, event, sandbox_id, agent_id, payload, prev_hmac, mac), line


def _sign_checkpoint(key: bytes, serial: int, entry_hmac: str) -> dict[str, Any]:
    body: dict[str, Any] = {"serial": serial, "hmac": entry_hmac, "timestamp": _now()}
    return {**body, "sig": _mac(key, _ANCHOR_DOMAIN, body)}


def anchor_path_for(log_path: str | Path) -> Path:
    """The default anchor (checkpoint) file of a log: ``<log>.anchor``."""
    log = Path(log_path)
    return log.with_name(log.name + ".anchor")


# -- low-level file helpers ---------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _last_newline(fd: int, size: int) -> int:
    """Offset of the last ``\\n`` in the first ``size`` bytes of ``fd``, or -1."""
    pos = size
    while pos > 0:
        start = max(0, pos - _READ_CHUNK)
        chunk = os.pread(fd, pos - start, start)
        idx = chunk.rfind(b"\n")
        if idx >= 0:
            return start + idx
        pos = start
    return -1


def _last_line(fd: int, end: int) -> bytes | None:
    """The complete line that ends at offset ``end`` (exclusive, includes the ``\\n``)."""
    if end <= 0:
        return None
    prev_nl = _last_newline(fd, end - 1)
    return os.pread(fd, end - (prev_nl + 1), prev_nl + 1)


def _cut_torn_tail(fd: int) -> tuple[int, int]:
    """Truncate a partial last line; returns ``(new size, bytes removed)``.

    Only called with the log's flock held: a partial line then can only come from a
    writer that died, never from one that is still writing. ``fd`` always comes from
    :func:`_open_audit_file`, so what is cut is our own audit file, never a file a symlink or a
    hard link planted at its name points to.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return 0, 0
    if os.pread(fd, 1, size - 1) == b"\n":
        return size, 0
    keep = _last_newline(fd, size) + 1
    os.ftruncate(fd, keep)
    os.fsync(fd)
    return keep, size - keep


# -- opening files safely -----------------------------------------------------------------------
#
# Writers never trust the name alone: another user who can create names in the log's directory
# (a sticky /tmp-like directory) could plant a symlink or a hard link to one of our files there,
# a FIFO, or a file of their own, and we would append to it and cut its "torn tail". So the
# directory is opened and checked first and the name is opened relative to that descriptor (the
# directory checked is the one the name is looked up in); O_NOFOLLOW fails on a symlink,
# O_NONBLOCK keeps a FIFO or a device from blocking the open; and the descriptor itself is
# checked with fstat before anything is read, written or truncated.

_GROUP_OTHER_WRITE = stat.S_IWGRP | stat.S_IWOTH
_APPEND_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _directory_problem(info: os.stat_result) -> str | None:
    """Why a writer must not create or open audit files in this directory, or None.

    Root's directories are trusted by everyone (root can write anywhere anyway). A directory
    other users can write to is acceptable only with the sticky bit: there they can add names
    but not rename or remove ours, and what they add is refused by :func:`_file_problem`
    (a hard link they planted to our file cannot be removed again behind our back, since the
    inode is ours). Without it they could swap the file between our open and our checks.
    """
    euid = os.geteuid()
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISDIR(info.st_mode):
        return f"is {_kind(info.st_mode)}, not a directory"
    if info.st_uid not in (euid, 0):
        return f"is owned by uid {info.st_uid} (not by us, uid {euid}, nor by root), who could replace files in it"
    if mode & _GROUP_OTHER_WRITE and not mode & stat.S_ISVTX:
        return (
            f"is writable by group or others without the sticky bit (mode {mode:04o}), so they could "
            "replace files in it; chmod go-w (or +t) it"
        )
    return None


def _file_problem(info: os.stat_result) -> str | None:
    """Why a writer must not append to (or truncate) this open audit file, or None."""
    euid = os.geteuid()
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISREG(info.st_mode):
        return f"it is {_kind(info.st_mode)}, not a regular file"
    if info.st_uid != euid:
        return f"it is owned by uid {info.st_uid}, not by us (uid {euid})"
    if mode & _GROUP_OTHER_WRITE:
        return f"it is writable by group or others (mode {mode:04o}); chmod go-w it"
    if info.st_nlink != 1:
        # A second name is a hard link someone planted (to a file of ours elsewhere) or made
        # later; 0 means it was removed while we opened it. Either way it is not just our log.
        return f"it has {info.st_nlink} hard links, not exactly one"
    return None


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_audit_file(path: Path, what: str) -> int:
    """A checked ``O_APPEND`` descriptor of ``path``, created 0600 if missing (see above)."""
    if path.name in ("", ".", ".."):
        raise AuditError(f"{what} {path} does not name a file")
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise AuditError(f"cannot open the directory of {what} {path}: {exc.strerror}") from None
    try:
        problem = _directory_problem(os.fstat(dir_fd))
        if problem is not None:
            raise AuditError(f"refusing {what} {path}: its directory {path.parent} {problem}")
        try:
            fd = os.open(path.name, _APPEND_FLAGS, paths.PRIVATE_FILE_MODE, dir_fd=dir_fd)
        except OSError as exc:
            # O_NOFOLLOW makes a symlink fail with ELOOP (or EACCES: O_CREAT on another user's
            # symlink in a sticky directory); say which, rather than "too many levels of links".
            if _is_symlink(path.name, dir_fd):
                raise AuditError(f"refusing {what} {path}: it is a symbolic link") from None
            raise AuditError(f"cannot open {what} {path}: {exc.strerror}") from None
    finally:
        os.close(dir_fd)
    try:
        problem = _file_problem(os.fstat(fd))
        if problem is not None:
            raise AuditError(f"refusing {what} {path}: {problem}")
        os.set_blocking(fd, True)  # a regular file: O_NONBLOCK only mattered for the open
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_for_reading(path: Path, what: str) -> int:
    """A read-only descriptor of the regular file ``path`` (symlinks followed: reading is harmless).

    Raises :class:`OSError` when it cannot be opened and :class:`AuditError` when it is not a
    regular file: a FIFO would block the reader, a device could feed it endless data.
    """
    fd = os.open(path, _READ_FLAGS)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AuditError(f"refusing to read {what} {path}: it is {_kind(info.st_mode)}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class TailRepair:
    """A torn tail that was cut off when the log was opened or appended to."""

    torn_bytes: int
    after_serial: int | None


@dataclass
class _Tail:
    end: int  # file size that this tail describes
    serial: int
    hmac: str


# -- the log ------------------------------------------------------------------------------------


class AuditLog:
    """An open audit chain. Thread-safe; safe across processes (flock). See the module docs."""

    def __init__(
        self,
        path: str | Path,
        key: bytes,
        *,
        fsync: bool = True,
        checkpoint_every: int = 100,
        anchor_path: str | Path | None = None,
    ) -> None:
        if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
            raise AuditError(f"audit key must be at least {MIN_KEY_BYTES} bytes")
        if checkpoint_every < 1:
            raise AuditError(f"checkpoint_every must be >= 1 (got {checkpoint_every})")
        self.path = Path(path)
        self.anchor_path = Path(anchor_path) if anchor_path is not None else anchor_path_for(self.path)
        self.fsync = fsync
        self.checkpoint_every = checkpoint_every
        self.repairs: list[TailRepair] = []
        self._key = key
        self._lock = threading.Lock()
        self._tail: _Tail | None = None
        self._dirty = False  # entries written since the last fsync (batched mode, or sync=False)
        self._checkpointed = -1  # highest serial this object wrote a checkpoint for
        self._fd = -1
        self._anchor_fd = -1
        self._make_directory()
        try:
            self._fd = _open_audit_file(self.path, "audit log")
            self._anchor_fd = _open_audit_file(self.anchor_path, "audit anchor")
            with self._locked():
                self._sync_tail()
                self._check_against_anchor()
        except BaseException:
            self._close_fds()
            raise

    def _make_directory(self) -> None:
        """Create the log's directory; kavach's own data directory is made private (0700, ours)."""
        parent = self.path.parent
        try:
            if os.path.abspath(parent) == os.path.abspath(paths.data_dir()):
                paths.ensure_private_dir(parent)
            else:
                # A directory the user chose is not chmod'ed: it may be shared on purpose.
                # _open_audit_file refuses it if others could swap files in it.
                parent.mkdir(parents=True, exist_ok=True, mode=paths.PRIVATE_DIR_MODE)
        except OSError as exc:
            raise AuditError(f"cannot create the directory of audit log {self.path}: {exc.strerror or exc}") from None

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r}, fsync={self.fsync})"

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._fd < 0

    # -- locking and the tail --------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # The thread lock orders threads of this process (flock is per open file description,
        # so our own threads would share it); flock orders processes.
        with self._lock:
            if self._fd < 0:
                raise AuditError(f"audit log {self.path} is closed")
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise AuditError(f"cannot lock audit log {self.path}: {exc.strerror}") from None
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _sync_tail(self) -> _Tail:
        """The current last entry, re-read when another process appended. Lock held."""
        size = os.fstat(self._fd).st_size
        if self._tail is not None and self._tail.end == size:
            return self._tail
        size, torn = _cut_torn_tail(self._fd)
        if size == 0:
            self._tail = None
            self._write_genesis()
            assert self._tail is not None
        else:
            self._tail = self._read_tail(size)
        if torn:
            repair = TailRepair(torn, self._tail.serial)
            self.repairs.append(repair)
            logger.warning(
                "audit log %s: cut a torn tail of %d bytes after serial %d (interrupted write)",
                self.path,
                torn,
                self._tail.serial,
            )
            self._write_entry(REPAIRED_EVENT, None, None, {"torn_bytes": torn, "after_serial": repair.after_serial})
        return self._tail

    def _read_tail(self, size: int) -> _Tail:
        line = _last_line(self._fd, size)
        assert line is not None
        try:
            data = json.loads(line)
            entry = AuditEntry.from_dict(data)
        except (ValueError, AuditError) as exc:
            raise AuditError(
                f"the last entry of audit log {self.path} is corrupt ({exc}); run `kavach audit verify {self.path}`"
            ) from None
        expected = _mac(self._key, _ENTRY_DOMAIN, entry.body())
        if not hmac.compare_digest(expected, entry.hmac):
            raise AuditError(
                f"the last entry of audit log {self.path} does not verify with this key "
                f"(wrong key or altered log); run `kavach audit verify {self.path}`"
            )
        return _Tail(size, entry.serial, entry.hmac)

    def _check_against_anchor(self) -> None:
        """Refuse to extend a log that is shorter than its last checkpoint (rolled back)."""
        assert self._tail is not None
        size = os.fstat(self._anchor_fd).st_size
        end = _last_newline(self._anchor_fd, size) + 1
        line = _last_line(self._anchor_fd, end)
        if line is None:
            # The genesis checkpoint is written right after the genesis entry, under the same
            # lock, so only a crash between the two leaves a log without one. Anything longer
            # with no checkpoint means the anchor was deleted: refuse rather than start a new
            # anchor that would vouch for a possibly truncated log.
            if self._tail.serial > 0:
                raise AuditError(
                    f"anchor file {self.anchor_path} is missing or empty but audit log {self.path} has "
                    f"{self._tail.serial + 1} entries; run `kavach audit verify {self.path}`"
                )
            self._write_checkpoint()
            return
        checkpoint = _parse_checkpoint(self._key, line)
        if isinstance(checkpoint, str):
            raise AuditError(f"anchor file {self.anchor_path}: {checkpoint}")
        serial, entry_hmac = checkpoint
        if serial > self._tail.serial:
            raise AuditError(
                f"audit log {self.path} ends at serial {self._tail.serial} but its anchor has a "
                f"checkpoint at serial {serial}: the log was truncated or rolled back"
            )
        if serial == self._tail.serial and not hmac.compare_digest(entry_hmac, self._tail.hmac):
            raise AuditError(
                f"the last entry of audit log {self.path} differs from its checkpoint: the log was rewritten"
            )

    # -- writing ---------------------------------------------------------------------------

    def _write_genesis(self) -> None:
        payload = {"format": FORMAT_VERSION, "key_id": key_id(self._key)}
        entry, line = _sign_entry(self._key, 0, GENESIS_PREV_HMAC, GENESIS_EVENT, None, None, payload)
        self._write_line(entry, line)
        self._write_checkpoint()

    def _write_entry(
        self,
        event: str,
        sandbox_id: str | None,
        agent_id: str | None,
        payload: dict[str, Any],
        *,
        sync: bool = True,
    ) -> AuditEntry:
        assert self._tail is not None
        serial = self._tail.serial + 1
        entry, line = _sign_entry(self._key, serial, self._tail.hmac, event, sandbox_id, agent_id, payload)
        self._write_line(entry, line, sync=sync)
        if serial % self.checkpoint_every == 0:
            self._write_checkpoint()
        return entry

    def _write_line(self, entry: AuditEntry, line: bytes, *, sync: bool = True) -> None:
        try:
            # One write(2) per entry with O_APPEND: a kill -9 can leave a prefix of this line
            # (a torn tail, repaired later) but never interleave it with another writer's.
            _write_all(self._fd, line)
            if self.fsync and sync:
                # fsync covers every byte written to the file so far, deferred entries included.
                os.fsync(self._fd)
                self._dirty = False
            else:
                self._dirty = True
        except OSError as exc:
            self._tail = None  # force a re-read (and repair) before the next append
            raise AuditError(f"cannot write audit log {self.path}: {exc.strerror}") from None
        end = self._tail.end + len(line) if self._tail is not None else len(line)
        self._tail = _Tail(end, entry.serial, entry.hmac)

    def _write_checkpoint(self) -> None:
        assert self._tail is not None
        # Ordering: the entries a checkpoint names must be on disk before the checkpoint is,
        # or a machine crash could leave an anchor pointing past the end of the log.
        self._fsync_log()
        record = _sign_checkpoint(self._key, self._tail.serial, self._tail.hmac)
        try:
            _cut_torn_tail(self._anchor_fd)
            _write_all(self._anchor_fd, canonical_bytes(record) + b"\n")
            os.fsync(self._anchor_fd)
        except OSError as exc:
            raise AuditError(f"cannot write audit anchor {self.anchor_path}: {exc.strerror}") from None
        self._checkpointed = self._tail.serial

    def _fsync_log(self) -> None:
        if self._dirty:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise AuditError(f"cannot fsync audit log {self.path}: {exc.strerror}") from None
            self._dirty = False

    def append(
        self,
        event: str,
        *,
        sandbox_id: str | None = None,
        agent_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        sync: bool = True,
    ) -> AuditEntry:
        """Sign and append one entry; durable on return unless the log is in batched mode.

        ``sync=False`` (an entry that is one step of a larger operation) writes the entry now,
        with the same single ``write(2)``, and leaves its ``fsync`` to whatever comes first:
        the next ``sync=True`` append, :meth:`flush`, a checkpoint or :meth:`close`. The caller
        must call one of them before it reports the operation done. It changes nothing in
        batched mode.

        Payload strings under secret-like keys (``token``, ``password`` ...) are replaced by
        ``[redacted]``; bytes and non-JSON values raise :class:`AuditError`.
        """
        if not event or not isinstance(event, str):
            raise AuditError("audit event must be a non-empty string")
        clean = sanitize_payload(payload)
        with self._locked():
            self._sync_tail()
            return self._write_entry(event, sandbox_id, agent_id, clean, sync=sync)

    def checkpoint(self) -> None:
        """Write a checkpoint for the current last entry now."""
        with self._locked():
            self._sync_tail()
            self._write_checkpoint()

    def commit(self) -> None:
        """End an operation whose entries were appended with ``sync=False``.

        With ``fsync=True`` this makes them durable now (one ``fsync`` for all of them); in
        batched mode it does nothing, since batched entries reach the disk on their own schedule
        (checkpoints, :meth:`flush`, :meth:`close`).
        """
        if self.fsync and self._dirty:
            self.flush()

    def flush(self) -> None:
        """Make every entry written so far durable (work only after batched or ``sync=False`` appends)."""
        with self._locked():
            self._fsync_log()

    def close(self) -> None:
        """Checkpoint the current tail, sync and close. Idempotent."""
        if self._fd < 0:
            return
        try:
            with self._locked():
                tail = self._sync_tail()
                if tail.serial > self._checkpointed:
                    self._write_checkpoint()
                self._fsync_log()
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        for name in ("_fd", "_anchor_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)


# -- key resolution -----------------------------------------------------------------------------


def _parse_key_material(raw: bytes, where: str) -> bytes:
    text = raw.strip()
    if re.fullmatch(rb"(?:[0-9a-fA-F]{2}){16,}", text):
        return bytes.fromhex(text.decode("ascii"))
    if len(raw) >= MIN_KEY_BYTES:
        return raw
    raise AuditError(f"{where}: the key is shorter than {MIN_KEY_BYTES} bytes")


def read_key_file(path: str | Path) -> bytes:
    """The key stored in ``path`` (hex text or raw bytes), refusing group/world-accessible files."""
    path = Path(path)
    try:
        # Symlinks are followed (mounted secrets are symlinks); a FIFO or a device is refused.
        fd = _open_for_reading(path, "audit key file")
    except FileNotFoundError:
        raise AuditError(f"audit key file {path} does not exist") from None
    except OSError as exc:
        raise AuditError(f"cannot open audit key file {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o077:
            raise AuditError(f"audit key file {path} is accessible by group or others (mode {mode:04o}); chmod 600 it")
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    return _parse_key_material(raw, f"audit key file {path}")


def _create_key_file(path: Path) -> None:
    """Create ``path`` with a fresh random key, atomically; a concurrent creator wins harmlessly."""
    paths.ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, paths.PRIVATE_FILE_MODE)
    try:
        try:
            _write_all(fd, secrets.token_bytes(DEFAULT_KEY_BYTES).hex().encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        # link(2) fails with EEXIST instead of replacing: the full key appears at once, and
        # a key another process created first is never overwritten.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def resolve_key(log_path: str | Path, *, key: bytes | None = None, create: bool = False) -> bytes:
    """The HMAC key for ``log_path`` by the key rules in the module docs.

    ``create`` allows creating the default key file, and only while ``log_path`` has no
    entries yet: a new key can never silently replace the one an existing log was written with.
    """
    if key is not None:
        if len(key) < MIN_KEY_BYTES:
            raise AuditError(f"audit key must be at least {MIN_KEY_BYTES} bytes")
        return key
    env_hex = os.environ.get(paths.ENV_AUDIT_KEY, "").strip()
    if env_hex:
        try:
            value = bytes.fromhex(env_hex)
        except ValueError:
            raise AuditError(f"{paths.ENV_AUDIT_KEY} is not valid hex") from None
        if len(value) < MIN_KEY_BYTES:
            raise AuditError(f"{paths.ENV_AUDIT_KEY} must hold at least {MIN_KEY_BYTES} bytes")
        return value
    named = paths.audit_key_file_from_env()
    if named is not None:
        if not named.exists():
            raise AuditError(f"audit key file {named} (from {paths.ENV_AUDIT_KEY_FILE}) does not exist")
        return read_key_file(named)
    default = paths.default_audit_key_file()
    if default.exists():
        return read_key_file(default)
    log = Path(log_path)
    log_has_entries = log.exists() and log.stat().st_size > 0
    if log_has_entries:
        raise AuditError(
            f"audit log {log} exists but its key is missing: no {paths.ENV_AUDIT_KEY}, no "
            f"{paths.ENV_AUDIT_KEY_FILE} and no key file at {default}"
        )
    if not create:
        raise AuditError(
            f"no audit key: set {paths.ENV_AUDIT_KEY} or {paths.ENV_AUDIT_KEY_FILE} "
            f"(the default key file {default} does not exist)"
        )
    try:
        _create_key_file(default)
    except OSError as exc:
        raise AuditError(f"cannot create audit key file {default}: {exc.strerror or exc}") from None
    return read_key_file(default)


def open_audit_log(
    path: str | Path | None = None,
    key: bytes | None = None,
    *,
    fsync: bool = True,
    checkpoint_every: int = 100,
) -> AuditLog:
    """Open (creating if needed) the log at ``path``, ``$KAVACH_AUDIT_LOG`` or the default location."""
    log = Path(path) if path is not None else paths.audit_log_path()
    return AuditLog(log, resolve_key(log, key=key, create=True), fsync=fsync, checkpoint_every=checkpoint_every)


# -- reading and verifying ----------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`.

    ``entries`` counts the entries that verified (serials ``0 .. entries-1``). When ``ok`` is
    False, ``first_bad_serial`` is the serial at which the chain stops being trustworthy and
    ``reason`` says why.
    """

    ok: bool
    entries: int
    first_bad_serial: int | None = None
    reason: str | None = None
    checkpoints: int = 0
    last_checkpoint: int | None = None
    torn_tail_bytes: int = 0

    @property
    def last_serial(self) -> int | None:
        """The serial of the last verified entry."""
        return self.entries - 1 if self.entries else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {
            "ok": self.ok,
            "entries": self.entries,
            "first_bad_serial": self.first_bad_serial,
            "reason": self.reason,
            "checkpoints": self.checkpoints,
            "last_checkpoint": self.last_checkpoint,
            "torn_tail_bytes": self.torn_tail_bytes,
        }


def _parse_checkpoint(key: bytes, line: bytes) -> tuple[int, str] | str:
    """``(serial, hmac)`` of a signed checkpoint line, or a description of what is wrong."""
    try:
        data = json.loads(line)
    except ValueError:
        return "checkpoint is not valid JSON"
    if not isinstance(data, dict) or set(data) != _ANCHOR_FIELDS:
        return "malformed checkpoint"
    serial, entry_hmac, sig = data["serial"], data["hmac"], data["sig"]
    if not isinstance(serial, int) or isinstance(serial, bool) or serial < 0:
        return "malformed checkpoint serial"
    if not (isinstance(entry_hmac, str) and isinstance(sig, str)):
        return "malformed checkpoint"
    body = {k: v for k, v in data.items() if k != "sig"}
    if not hmac.compare_digest(_mac(key, _ANCHOR_DOMAIN, body), sig):
        return f"checkpoint at serial {serial} has a bad signature (altered, or a different key)"
    return serial, entry_hmac


def _read_checkpoints(key: bytes, anchor: Path) -> dict[int, str] | str:
    try:
        with os.fdopen(_open_for_reading(anchor, "anchor file"), "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return f"anchor file {anchor} is missing (deleted, or the log was not written by kavach)"
    except OSError as exc:
        return f"cannot read anchor file {anchor}: {exc.strerror}"
    except AuditError as exc:
        return str(exc)
    checkpoints: dict[int, str] = {}
    lines = data.split(b"\n")
    # The last element is b"" for a clean file, or a torn checkpoint (a writer died): ignored,
    # because the log entries it would name are still covered by the chain itself.
    for number, line in enumerate(lines[:-1], start=1):
        parsed = _parse_checkpoint(key, line)
        if isinstance(parsed, str):
            return f"anchor line {number}: {parsed}"
        serial, entry_hmac = parsed
        if checkpoints.get(serial, entry_hmac) != entry_hmac:
            return f"anchor has two different checkpoints for serial {serial}"
        checkpoints[serial] = entry_hmac
    return checkpoints


def _iter_lines(path: Path) -> Iterator[bytes]:
    with os.fdopen(_open_for_reading(path, "audit log"), "rb") as fh:
        yield from fh


def verify(path: str | Path, key: bytes, *, anchor_path: str | Path | None = None) -> VerifyResult:
    """Check every entry of the log at ``path`` and its checkpoints; never raises for bad content.

    Raises :class:`AuditError` only when the log itself cannot be read.
    """
    log = Path(path)
    anchor = Path(anchor_path) if anchor_path is not None else anchor_path_for(log)
    checkpoints = _read_checkpoints(key, anchor)
    cp_count = len(checkpoints) if isinstance(checkpoints, dict) else 0
    last_cp = max(checkpoints) if isinstance(checkpoints, dict) and checkpoints else None

    def bad(serial: int, reason: str, entries: int, torn: int = 0) -> VerifyResult:
        return VerifyResult(False, entries, serial, reason, cp_count, last_cp, torn)

    expected, prev = 0, GENESIS_PREV_HMAC
    try:
        for line in _iter_lines(log):
            if not line.endswith(b"\n"):
                return bad(
                    expected,
                    f"torn tail: {len(line)} bytes after serial {expected - 1} without a newline "
                    "(an interrupted write; opening the log repairs it)",
                    expected,
                    len(line),
                )
            problem = _entry_problem(key, line[:-1], expected, prev)
            if problem is not None:
                return bad(expected, problem, expected)
            prev = json.loads(line)["hmac"]
            expected += 1
    except FileNotFoundError:
        raise AuditError(f"audit log {log} does not exist") from None
    except OSError as exc:
        raise AuditError(f"cannot read audit log {log}: {exc.strerror}") from None
    if expected == 0:
        return bad(0, "the log is empty (no genesis entry)", 0)
    if isinstance(checkpoints, str):
        return bad(expected, checkpoints, expected)
    try:
        return _check_checkpoints(log, key, checkpoints, expected, cp_count, last_cp)
    except OSError as exc:  # the second pass reopens the log
        raise AuditError(f"cannot read audit log {log}: {exc.strerror}") from None


def _entry_problem(key: bytes, raw: bytes, expected: int, prev: str) -> str | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return "entry is not valid JSON"
    problem = _entry_shape_problem(data)
    if problem is not None:
        return problem
    if canonical_bytes(data) != raw:
        return "entry bytes are not in canonical form (altered)"
    entry = AuditEntry.from_dict(data)
    if entry.serial != expected:
        return f"serial {entry.serial} where {expected} was expected (entries removed, reordered or inserted)"
    if not hmac.compare_digest(entry.prev_hmac, prev):
        return "prev_hmac does not match the previous entry (entries removed, reordered or inserted)"
    if not hmac.compare_digest(_mac(key, _ENTRY_DOMAIN, entry.body()), entry.hmac):
        if expected == 0 and entry.payload.get("key_id") != key_id(key):
            return "hmac mismatch: the key is not the one this log was written with"
        return "hmac mismatch (entry altered)"
    if expected == 0 and entry.event != GENESIS_EVENT:
        return f"serial 0 is not a genesis entry (event {entry.event!r})"
    return None


def _check_checkpoints(
    log: Path, key: bytes, checkpoints: dict[int, str], entries: int, cp_count: int, last_cp: int | None
) -> VerifyResult:
    if last_cp is not None and last_cp >= entries:
        return VerifyResult(
            False,
            entries,
            entries,
            f"the chain ends at serial {entries - 1} but the anchor has a checkpoint at serial "
            f"{last_cp}: entries were truncated or rolled back",
            cp_count,
            last_cp,
        )
    if checkpoints:
        # Second pass only over the checkpointed serials; the chain itself already verified.
        wanted = dict(checkpoints)
        for serial, line in enumerate(_iter_lines(log)):
            if serial in wanted:
                if not hmac.compare_digest(json.loads(line)["hmac"], wanted.pop(serial)):
                    return VerifyResult(
                        False,
                        serial,
                        serial,
                        f"entry {serial} differs from its checkpoint (the log was rewritten or rolled back)",
                        cp_count,
                        last_cp,
                    )
                if not wanted:
                    break
    return VerifyResult(True, entries, None, None, cp_count, last_cp)


def read_entries(path: str | Path) -> Iterator[dict[str, Any]]:
    """The decoded entries of a log, without verifying them (``kavach audit show``).

    Stops before a torn tail; raises :class:`AuditError` on a line that is not JSON.
    """
    log = Path(path)
    try:
        for number, line in enumerate(_iter_lines(log), start=1):
            if not line.endswith(b"\n"):
                return
            try:
                data = json.loads(line)
            except ValueError:
                raise AuditError(f"{log}: line {number} is not valid JSON") from None
            if not isinstance(data, dict):
                raise AuditError(f"{log}: line {number} is not a JSON object")
            yield data
    except FileNotFoundError:
        raise AuditError(f"audit log {log} does not exist") from None
    except OSError as exc:  # a directory, a FIFO or a device is refused by _open_for_reading
        raise AuditError(f"cannot read audit log {log}: {exc.strerror}") from None


__all__ = [
    "FORMAT_VERSION",
    "GENESIS_EVENT",
    "REPAIRED_EVENT",
    "AuditEntry",
    "AuditLog",
    "TailRepair",
    "VerifyResult",
    "anchor_path_for",
    "canonical_bytes",
    "key_id",
    "open_audit_log",
    "read_entries",
    "read_key_file",
    "redact_text",
    "resolve_key",
    "sanitize_payload",
    "verify",
]
