"""The quarantine store: private files, SQLite metadata, the approval workflow and its audit trail."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kavach.audit import AuditLog, read_entries, verify
from kavach.errors import QuarantineError
from kavach.quarantine import QuarantineStatus, QuarantineStore
from kavach.scanning.findings import Finding, Severity

KEY = bytes(range(32))
SECRET = b"AKIAIOSFODNN7EXAMPLE and the rest of the output\n"
FINDING = Finding("secrets", "aws-access-key", "credential", Severity.HIGH, 0, 20, 1, "AKIA****MPLE")


@pytest.fixture
def store(tmp_path: Path) -> QuarantineStore:
    return QuarantineStore(tmp_path / "q")


def put(store: QuarantineStore, data: bytes = SECRET) -> str:
    return store.put(data, findings=[FINDING], sandbox_id="sb-1", agent_id="agent-7", source="stdout")


def test_put_holds_bytes_privately_with_metadata(store: QuarantineStore, tmp_path: Path) -> None:
    item_id = put(store)
    item = store.get(item_id)
    assert item.status is QuarantineStatus.QUARANTINED
    assert (item.sandbox_id, item.agent_id, item.source, item.size) == (
        "sb-1",
        "agent-7",
        "stdout",
        len(SECRET),
    )
    assert item.findings[0]["rule"] == "aws-access-key"
    assert item.findings[0]["evidence"] == "AKIA****MPLE"
    held = tmp_path / "q" / "items" / f"{item_id}.bin"
    assert held.read_bytes() == SECRET
    assert stat.S_IMODE(held.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "q").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "q" / "items").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "q" / "quarantine.sqlite3").stat().st_mode) == 0o600
    assert b"AKIAIOSFODNN7EXAMPLE" not in (tmp_path / "q" / "quarantine.sqlite3").read_bytes()
    assert [i.id for i in store.list()] == [item_id]


def test_approve_then_release_returns_the_original_bytes_once(store: QuarantineStore, tmp_path: Path) -> None:
    item_id = put(store)
    with pytest.raises(QuarantineError, match="it is quarantined, not approved"):
        store.release(item_id, by="alice")
    approved = store.approve(item_id, by="alice")
    assert approved.status is QuarantineStatus.APPROVED
    assert approved.decided("approve") is not None
    assert approved.decided("approve").actor == "alice"  # type: ignore[union-attr]
    assert store.release(item_id, by="bob") == SECRET
    item = store.get(item_id)
    assert item.status is QuarantineStatus.RELEASED
    assert [(a.action, a.actor) for a in item.history] == [
        ("put", "kavach"),
        ("approve", "alice"),
        ("release", "bob"),
    ]
    assert not (tmp_path / "q" / "items" / f"{item_id}.bin").exists()
    with pytest.raises(QuarantineError, match="it is released, not approved"):
        store.release(item_id, by="bob")


@pytest.mark.parametrize(
    ("steps", "bad_step"),
    [
        ((), "release"),
        (("reject",), "approve"),
        (("reject",), "release"),
        (("reject",), "reject"),
        (("approve",), "approve"),
        (("approve",), "reject"),
        (("approve", "release"), "approve"),
        (("approve", "release"), "reject"),
        (("approve", "release"), "release"),
    ],
)
def test_invalid_transitions_raise_and_change_nothing(
    store: QuarantineStore, steps: tuple[str, ...], bad_step: str
) -> None:
    item_id = put(store)
    for step in steps:
        getattr(store, step)(item_id, by="op")
    before = store.get(item_id)
    with pytest.raises(QuarantineError, match=f"cannot {bad_step} item {item_id}"):
        getattr(store, bad_step)(item_id, by="op")
    assert store.get(item_id) == before


def test_reject_is_terminal_and_deletes_the_bytes(store: QuarantineStore, tmp_path: Path) -> None:
    item_id = put(store)
    assert store.reject(item_id, by="carol").status is QuarantineStatus.REJECTED
    assert not (tmp_path / "q" / "items" / f"{item_id}.bin").exists()
    assert store.list(QuarantineStatus.REJECTED)[0].id == item_id


def test_unknown_and_malformed_ids(store: QuarantineStore) -> None:
    with pytest.raises(QuarantineError, match="no quarantine item"):
        store.get("q-0000000000000000")
    with pytest.raises(QuarantineError, match="ids look like"):
        store.get("../../etc/passwd")
    with pytest.raises(QuarantineError, match="no quarantine item"):
        store.approve("q-0000000000000000", by="op")


def test_actor_is_required(store: QuarantineStore) -> None:
    item_id = put(store)
    with pytest.raises(QuarantineError, match="--by"):
        store.approve(item_id, by=" ")
    assert store.get(item_id).status is QuarantineStatus.QUARANTINED


def test_altered_held_file_is_not_released(store: QuarantineStore, tmp_path: Path) -> None:
    item_id = put(store)
    store.approve(item_id, by="op")
    (tmp_path / "q" / "items" / f"{item_id}.bin").write_bytes(b"swapped")
    with pytest.raises(QuarantineError, match="SHA-256 mismatch"):
        store.release(item_id, by="op")
    assert store.get(item_id).status is QuarantineStatus.APPROVED


def test_two_stores_on_one_directory_cannot_both_decide(tmp_path: Path) -> None:
    first = QuarantineStore(tmp_path / "q")
    second = QuarantineStore(tmp_path / "q")
    item_id = put(first)
    second.approve(item_id, by="alice")
    with pytest.raises(QuarantineError, match="it is approved"):
        first.reject(item_id, by="mallory")
    assert first.release(item_id, by="alice") == SECRET


def test_every_action_is_audited(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", KEY)
    store = QuarantineStore(tmp_path / "q", audit=log)
    kept = put(store)
    dropped = put(store)
    store.approve(kept, by="alice")
    store.release(kept, by="alice")
    store.reject(dropped, by="bob")
    with pytest.raises(QuarantineError):
        store.approve(dropped, by="bob")
    log.close()
    entries = [e for e in read_entries(tmp_path / "audit.jsonl") if e["event"].startswith("quarantine.")]
    assert [(e["event"], e["payload"]["item_id"], e["payload"]["by"]) for e in entries] == [
        ("quarantine.put", kept, "kavach"),
        ("quarantine.put", dropped, "kavach"),
        ("quarantine.approved", kept, "alice"),
        ("quarantine.released", kept, "alice"),
        ("quarantine.rejected", dropped, "bob"),
    ]
    assert all(e["sandbox_id"] == "sb-1" and e["agent_id"] == "agent-7" for e in entries)
    assert "AKIAIOSFODNN7EXAMPLE" not in (tmp_path / "audit.jsonl").read_text()
    assert verify(tmp_path / "audit.jsonl", KEY).ok


def test_default_location_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAVACH_QUARANTINE_DIR", str(tmp_path / "elsewhere"))
    item_id = put(QuarantineStore())
    assert (tmp_path / "elsewhere" / "items" / f"{item_id}.bin").exists()
    monkeypatch.delenv("KAVACH_QUARANTINE_DIR")
    monkeypatch.setenv("KAVACH_DATA_DIR", str(tmp_path / "data"))
    item_id = put(QuarantineStore())
    assert (tmp_path / "data" / "quarantine" / "items" / f"{item_id}.bin").exists()


def test_store_is_usable_from_other_threads(store: QuarantineStore) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda _: put(store), range(8)))
        items = list(pool.map(store.get, ids))
    assert sorted(i.id for i in items) == sorted(ids)
    assert len(store.list()) == 8


def test_orphaned_held_files_are_swept_on_open(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path / "q")
    kept = put(store)
    store.close()
    items = tmp_path / "q" / "items"
    old_orphan = items / "q-00000000000000aa.bin"  # written, then the process died before recording it
    young_orphan = items / "q-00000000000000bb.bin"  # another process may be recording it right now
    for orphan in (old_orphan, young_orphan):
        orphan.write_bytes(b"secret")
    os.utime(old_orphan, (1_000_000_000, 1_000_000_000))
    QuarantineStore(tmp_path / "q").close()
    assert not old_orphan.exists()
    assert young_orphan.exists()
    assert (items / f"{kept}.bin").exists()
