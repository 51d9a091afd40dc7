"""SQLite helpers shared by the quarantine store and the offender store.

Both keep one connection shared by threads (guarded by a lock) and several processes
writing the same file; write transactions take SQLite's write lock up front.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from typing import Any

from kavach.errors import KavachError

ErrorFactory = Callable[[sqlite3.Error], KavachError]


@contextlib.contextmanager
def immediate_transaction(
    db: sqlite3.Connection, lock: threading.Lock | threading.RLock, fail: ErrorFactory
) -> Iterator[sqlite3.Connection]:
    """A write transaction; SQLite errors become ``fail(exc)``, anything raised rolls back."""
    # IMMEDIATE takes the write lock up front: a status check and the update that follows
    # cannot interleave with another process's. The thread lock does the same for threads
    # sharing this connection.
    with lock:
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise fail(exc) from None
        try:
            yield db
        except sqlite3.Error as exc:
            db.execute("ROLLBACK")
            raise fail(exc) from None
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def locked_query(
    db: sqlite3.Connection,
    lock: threading.Lock | threading.RLock,
    fail: ErrorFactory,
    sql: str,
    params: tuple[Any, ...] = (),
) -> list[Any]:
    """Rows of one read query, under the thread lock."""
    with lock:
        try:
            return db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise fail(exc) from None


__all__ = ["ErrorFactory", "immediate_transaction", "locked_query"]
