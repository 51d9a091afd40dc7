"""The quarantine store: artifacts the gate held back, waiting for an operator's decision.

Each held artifact is one file (mode 0600) in a private directory (mode 0700); its metadata
(findings, sandbox, agent, status, who decided and when) lives in a SQLite database next to
it. The workflow is a small state machine::

    quarantined --approve--> approved --release--> released
    quarantined --reject---> rejected

and nothing else: any other step raises :class:`~kavach.errors.QuarantineError` and changes
nothing. :meth:`QuarantineStore.release` is the only way to get the original bytes back and
works once, after approval. ``rejected`` and ``released`` are terminal, and the held bytes are
deleted when an item reaches either (the metadata and the SHA-256 stay for the record).

Every step is written to the audit log when the store has one. Several processes may use
one store: each transition is one SQLite ``UPDATE ... WHERE status = ?`` inside an immediate
transaction, so two operators approving at once cannot both win.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from kavach import paths
from kavach._sqlite import immediate_transaction, locked_query
from kavach.audit import AuditLog
from kavach.errors import QuarantineError
from kavach.scanning.findings import Finding


class QuarantineStatus(StrEnum):
    """Where an item is in the approval workflow."""

    QUARANTINED = "quarantined"
    APPROVED = "approved"
    REJECTED = "rejected"
    RELEASED = "released"


# The only allowed steps: action -> (from, to).
TRANSITIONS: dict[str, tuple[QuarantineStatus, QuarantineStatus]] = {
    "approve": (QuarantineStatus.QUARANTINED, QuarantineStatus.APPROVED),
    "reject": (QuarantineStatus.QUARANTINED, QuarantineStatus.REJECTED),
    "release": (QuarantineStatus.APPROVED, QuarantineStatus.RELEASED),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    sandbox_id TEXT NOT NULL,
    agent_id TEXT,
    source TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    findings TEXT NOT NULL,
    status TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS actions (
    item_id TEXT NOT NULL REFERENCES items(id),
    at REAL NOT NULL,
    action TEXT NOT NULL,
    actor TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS actions_item ON actions(item_id);
"""


@dataclass(frozen=True)
class QuarantineAction:
    """One recorded step of an item: ``put``, ``approve``, ``reject`` or ``release``."""

    action: str
    actor: str
    at: float


@dataclass(frozen=True)
class QuarantineItem:
    """Metadata of one held artifact (never its bytes)."""

    id: str
    status: QuarantineStatus
    sandbox_id: str
    agent_id: str | None
    source: str
    size: int
    sha256: str
    findings: tuple[dict[str, Any], ...]
    created_at: float
    updated_at: float
    history: tuple[QuarantineAction, ...] = ()

    def decided(self, action: str) -> QuarantineAction | None:
        """The recorded ``action`` step, if it happened."""
        return next((a for a in self.history if a.action == action), None)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {
            "id": self.id,
            "status": self.status.value,
            "sandbox_id": self.sandbox_id,
            "agent_id": self.agent_id,
            "source": self.source,
            "size": self.size,
            "sha256": self.sha256,
            "findings": list(self.findings),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "history": [{"action": a.action, "by": a.actor, "at": a.at} for a in self.history],
        }


def _valid_id(item_id: str) -> bool:
    # Ids become file names: only our own format is accepted, so "../x" can never be one.
    return len(item_id) == 18 and item_id.startswith("q-") and all(c in "0123456789abcdef" for c in item_id[2:])


class QuarantineStore:
    """A quarantine directory: held files plus a SQLite index (see the module docs)."""

    DB_NAME = "quarantine.sqlite3"

    def __init__(self, directory: str | Path | None = None, *, audit: AuditLog | None = None) -> None:
        self.directory = Path(directory) if directory is not None else paths.quarantine_dir()
        self.audit = audit
        self._lock = threading.RLock()
        try:
            paths.ensure_private_dir(self.directory)
            self._items_dir = paths.ensure_private_dir(self.directory / "items")
            db = self.directory / self.DB_NAME
            # Create the database file ourselves so it is 0600 from the first byte
            # (SQLite gives its -wal/-shm files the database file's mode).
            os.close(os.open(db, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, paths.PRIVATE_FILE_MODE))
            self._db = sqlite3.connect(db, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise QuarantineError(f"cannot open quarantine store {self.directory}: {exc}") from None
        self._sweep_orphans()

    ORPHAN_AGE_S = 3600.0

    def _sweep_orphans(self) -> None:
        """Delete held files that no item row names (a crash between writing and recording).

        Only files older than :attr:`ORPHAN_AGE_S`: a younger one may belong to a ``put`` that
        another process is still completing.
        """
        known = {row[0] for row in self._query("SELECT id FROM items")}
        cutoff = time.time() - self.ORPHAN_AGE_S
        for entry in os.scandir(self._items_dir):
            item_id = entry.name.removesuffix(".bin")
            if item_id in known or not entry.name.endswith(".bin"):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> QuarantineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, exc: sqlite3.Error) -> QuarantineError:
        return QuarantineError(f"quarantine store {self.directory}: {exc}")

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate_transaction(self._db, self._lock, self._fail)

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return locked_query(self._db, self._lock, self._fail, sql, params)

    def _data_path(self, item_id: str) -> Path:
        return self._items_dir / f"{item_id}.bin"

    def _audit(self, event: str, item: QuarantineItem, actor: str) -> None:
        if self.audit is not None:
            self.audit.append(
                event,
                sandbox_id=item.sandbox_id,
                agent_id=item.agent_id,
                payload={
                    "item_id": item.id,
                    "by": actor,
                    "status": item.status.value,
                    "source": item.source,
                    "size": item.size,
                    "sha256": item.sha256,
                    "findings": len(item.findings),
                },
            )

    # -- writing ---------------------------------------------------------------------------

    def put(
        self,
        data: bytes,
        *,
        findings: Sequence[Finding],
        sandbox_id: str,
        agent_id: str | None,
        source: str,
    ) -> str:
        """Hold ``data``; returns the new item's id (``q-`` and 16 hex digits)."""
        item_id = "q-" + secrets.token_hex(8)
        digest = hashlib.sha256(data).hexdigest()
        path = self._data_path(item_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise QuarantineError(f"cannot write quarantine item {item_id}: {exc.strerror}") from None
        now = time.time()
        findings_json = json.dumps([f.to_dict() for f in findings], sort_keys=True)
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (item_id, now, sandbox_id, agent_id, source, len(data), digest, findings_json,
                     QuarantineStatus.QUARANTINED.value, now),
                )  # fmt: skip
                db.execute("INSERT INTO actions VALUES (?, ?, ?, ?)", (item_id, now, "put", "kavach"))
        except sqlite3.Error as exc:
            path.unlink()
            raise QuarantineError(f"cannot record quarantine item {item_id}: {exc}") from None
        self._audit("quarantine.put", self.get(item_id), "kavach")
        return item_id

    def _transition(self, item_id: str, action: str, actor: str) -> QuarantineItem:
        if not actor or not actor.strip():
            raise QuarantineError(f"{action} needs the name of who does it (--by)")
        source, target = TRANSITIONS[action]
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT status FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                raise QuarantineError(f"no quarantine item {item_id}")
            if row[0] != source.value:
                raise QuarantineError(f"cannot {action} item {item_id}: it is {row[0]}, not {source.value}")
            db.execute(
                "UPDATE items SET status = ?, updated_at = ? WHERE id = ? AND status = ?",
                (target.value, now, item_id, source.value),
            )
            db.execute("INSERT INTO actions VALUES (?, ?, ?, ?)", (item_id, now, action, actor))
        return self.get(item_id)

    def approve(self, item_id: str, by: str) -> QuarantineItem:
        """quarantined -> approved. The bytes stay held until :meth:`release`."""
        item = self._transition(item_id, "approve", by)
        self._audit("quarantine.approved", item, by)
        return item

    def reject(self, item_id: str, by: str) -> QuarantineItem:
        """quarantined -> rejected (terminal); the held bytes are deleted."""
        item = self._transition(item_id, "reject", by)
        self._discard(item_id)
        self._audit("quarantine.rejected", item, by)
        return item

    def release(self, item_id: str, by: str) -> bytes:
        """approved -> released (terminal): the original bytes, once, after approval."""
        current = self.get(item_id)
        if current.status is not QuarantineStatus.APPROVED:
            raise QuarantineError(f"cannot release item {item_id}: it is {current.status.value}, not approved")
        # Read and check the bytes before the transition: a missing or altered file must
        # leave the item approved, not released with nothing to show for it.
        data = self._read_verified(current)
        item = self._transition(item_id, "release", by)
        self._discard(item_id)
        self._audit("quarantine.released", item, by)
        return data

    def _read_verified(self, item: QuarantineItem) -> bytes:
        try:
            data = self._data_path(item.id).read_bytes()
        except OSError as exc:
            raise QuarantineError(f"cannot read quarantine item {item.id}: {exc.strerror}") from None
        if hashlib.sha256(data).hexdigest() != item.sha256:
            raise QuarantineError(f"quarantine item {item.id} was altered on disk (SHA-256 mismatch)")
        return data

    def _discard(self, item_id: str) -> None:
        try:
            self._data_path(item_id).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise QuarantineError(f"cannot delete the held bytes of {item_id}: {exc.strerror}") from None

    # -- reading ---------------------------------------------------------------------------

    def _item(self, row: tuple[Any, ...]) -> QuarantineItem:
        history = tuple(
            QuarantineAction(action, actor, at)
            for at, action, actor in self._query(
                "SELECT at, action, actor FROM actions WHERE item_id = ? ORDER BY rowid", (row[0],)
            )
        )
        return QuarantineItem(
            id=row[0],
            created_at=row[1],
            sandbox_id=row[2],
            agent_id=row[3],
            source=row[4],
            size=row[5],
            sha256=row[6],
            findings=tuple(json.loads(row[7])),
            status=QuarantineStatus(row[8]),
            updated_at=row[9],
            history=history,
        )

    def get(self, item_id: str) -> QuarantineItem:
        """The item called ``item_id``; :class:`QuarantineError` when there is none."""
        if not _valid_id(item_id):
            raise QuarantineError(f"no quarantine item {item_id!r} (ids look like q-0123456789abcdef)")
        rows = self._query("SELECT * FROM items WHERE id = ?", (item_id,))
        if not rows:
            raise QuarantineError(f"no quarantine item {item_id}")
        return self._item(rows[0])

    def list(self, status: QuarantineStatus | None = None) -> list[QuarantineItem]:
        """Every item (oldest first), or those with ``status``."""
        if status is None:
            rows = self._query("SELECT * FROM items ORDER BY created_at, id")
        else:
            rows = self._query("SELECT * FROM items WHERE status = ? ORDER BY created_at, id", (status.value,))
        return [self._item(row) for row in rows]


__all__ = ["TRANSITIONS", "QuarantineAction", "QuarantineItem", "QuarantineStatus", "QuarantineStore"]
