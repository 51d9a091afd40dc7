"""The audit chain: signing, tamper detection, checkpoints, torn tails and the key rules."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from kavach import audit
from kavach.audit import AuditLog, open_audit_log, read_entries, resolve_key, verify
from kavach.errors import AuditError

KEY = bytes(range(32))


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAVACH_DATA_DIR", str(tmp_path / "data"))
    for name in ("KAVACH_AUDIT_LOG", "KAVACH_AUDIT_KEY", "KAVACH_AUDIT_KEY_FILE", "KAVACH_QUARANTINE_DIR"):
        monkeypatch.delenv(name, raising=False)


def write_log(path: Path, n: int, *, checkpoint_every: int = 100, close: bool = True) -> AuditLog:
    log = AuditLog(path, KEY, checkpoint_every=checkpoint_every)
    for i in range(n):
        log.append("exec.finished", sandbox_id=f"sb-{i % 3}", agent_id="agent-1", payload={"i": i, "exit": 0})
    if close:
        log.close()
    return log


def test_entries_are_chained_signed_and_canonical(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, 5)
    lines = path.read_bytes().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["serial"] for e in entries] == list(range(6))
    assert entries[0]["event"] == audit.GENESIS_EVENT
    assert entries[0]["prev_hmac"] == "0" * 64
    for prev, cur in itertools.pairwise(entries):
        assert cur["prev_hmac"] == prev["hmac"]
    for line, entry in zip(lines, entries, strict=True):
        assert audit.canonical_bytes(entry) == line
    result = verify(path, KEY)
    assert result.ok, result
    assert result.entries == 6
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_flipping_any_byte_of_any_entry_fails_at_that_serial(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, 4)
    original = path.read_bytes()
    line_starts = [0]
    for i, byte in enumerate(original):
        if byte == ord("\n") and i + 1 < len(original):
            line_starts.append(i + 1)

    def serial_of(offset: int) -> int:
        return max(i for i, start in enumerate(line_starts) if start <= offset)

    for offset in range(len(original)):
        for replacement in {original[offset] ^ 0x01, ord("x") if original[offset] != ord("x") else ord("y")}:
            tampered = bytearray(original)
            tampered[offset] = replacement
            path.write_bytes(bytes(tampered))
            result = verify(path, KEY)
            assert not result.ok, f"byte {offset} changed to {replacement!r} went unnoticed"
            assert result.first_bad_serial == serial_of(offset), (offset, result)
    path.write_bytes(original)
    assert verify(path, KEY).ok


def test_wrong_key_is_reported_at_genesis(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, 2)
    result = verify(path, b"k" * 32)
    assert not result.ok
    assert result.first_bad_serial == 0
    assert "not the one this log was written with" in (result.reason or "")


def test_deleting_the_last_entries_fails_against_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, 25, checkpoint_every=10)  # checkpoints at 0, 10, 20 and 25 (close)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-3]))
    result = verify(path, KEY)
    assert not result.ok
    assert result.entries == 23
    assert result.first_bad_serial == 23
    assert "checkpoint at serial 25" in (result.reason or "")
    assert "truncated or rolled back" in (result.reason or "")


def test_truncation_behind_a_periodic_checkpoint_is_detected_without_close(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = write_log(path, 25, checkpoint_every=10, close=False)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:15]))  # serials 0..14; checkpoint at 20 survives
    result = verify(path, KEY)
    assert not result.ok
    assert result.last_checkpoint == 20
    assert result.first_bad_serial == 15
    log._close_fds()  # simulate a crash: no closing checkpoint


def test_rewritten_chain_with_valid_hmacs_fails_against_the_checkpoint(tmp_path: Path) -> None:
    """Someone with the key rebuilds a different history; the anchor still pins the old one."""
    path = tmp_path / "a.jsonl"
    write_log(path, 12, checkpoint_every=5)
    anchor = audit.anchor_path_for(path).read_bytes()
    path.unlink()
    audit.anchor_path_for(path).unlink()
    write_log(path, 12, checkpoint_every=5)  # same key, same shape, different timestamps
    audit.anchor_path_for(path).write_bytes(anchor)
    result = verify(path, KEY)
    assert not result.ok
    assert result.first_bad_serial == 0
    assert "differs from its checkpoint" in (result.reason or "")


def test_missing_or_forged_anchor_fails(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, 3)
    anchor = audit.anchor_path_for(path)
    good = anchor.read_bytes()
    anchor.write_bytes(good.replace(b'"serial":3', b'"serial":2'))
    assert "bad signature" in (verify(path, KEY).reason or "")
    anchor.unlink()
    result = verify(path, KEY)
    assert not result.ok
    assert "missing" in (result.reason or "")


def test_torn_tail_is_reported_then_repaired_and_audited_on_open(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, 3)
    with path.open("ab") as fh:
        fh.write(b'{"agent_id":null,"event":"exec.fin')  # a writer killed mid-line
    result = verify(path, KEY)
    assert not result.ok
    assert result.entries == 4
    assert result.first_bad_serial == 4
    assert result.torn_tail_bytes == 34
    assert "torn tail" in (result.reason or "")

    log = AuditLog(path, KEY)
    assert log.repairs == [audit.TailRepair(34, 3)]
    log.append("after.repair")
    log.close()
    assert verify(path, KEY).ok
    events = [e["event"] for e in read_entries(path)]
    assert events[-2:] == [audit.REPAIRED_EVENT, "after.repair"]
    repaired = list(read_entries(path))[-2]
    assert repaired["payload"] == {"torn_bytes": 34, "after_serial": 3}


def test_opening_a_log_whose_last_entry_is_altered_refuses(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, 2)
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"i":1', b'"i":7'))
    with pytest.raises(AuditError, match="does not verify with this key"):
        AuditLog(path, KEY)


def test_opening_a_rolled_back_log_refuses(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, 8, checkpoint_every=4)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3]))
    with pytest.raises(AuditError, match="truncated or rolled back"):
        AuditLog(path, KEY)


def test_batched_mode_verifies_and_checkpoints_on_close(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, KEY, fsync=False, checkpoint_every=1000)
    for i in range(50):
        log.append("e", payload={"i": i})
    log.close()
    result = verify(path, KEY)
    assert result.ok
    assert result.last_checkpoint == 50


def test_two_handles_interleave_into_one_linear_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    first = AuditLog(path, KEY)
    second = AuditLog(path, KEY)
    for i in range(10):
        (first if i % 2 else second).append("e", payload={"i": i})
    first.close()
    second.close()
    result = verify(path, KEY)
    assert result.ok
    assert [e["payload"].get("i") for e in read_entries(path)][1:] == list(range(10))


def test_secret_like_payload_keys_are_redacted_and_bytes_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, KEY)
    entry = log.append(
        "exec.finished",
        payload={"api_key": "sk-live-1234", "findings": {"secrets": 2}, "nested": {"password": "hunter2"}},
    )
    assert entry.payload == {
        "api_key": "[redacted]",
        "findings": {"secrets": 2},
        "nested": {"password": "[redacted]"},
    }
    with pytest.raises(AuditError, match="raw bytes"):
        log.append("exec.finished", payload={"stdout": b"output"})
    with pytest.raises(AuditError, match="NaN"):
        log.append("exec.finished", payload={"x": float("nan")})
    log.close()
    text = path.read_text()
    assert "sk-live-1234" not in text
    assert "hunter2" not in text
    assert verify(path, KEY).ok


# -- key rules ----------------------------------------------------------------------------------


def test_default_key_is_created_0600_once_and_reused(tmp_path: Path) -> None:
    log = open_audit_log()
    log.append("first")
    log.close()
    key_file = tmp_path / "data" / "audit.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    key = bytes.fromhex(key_file.read_text().strip())
    assert len(key) == 32
    assert key.hex() not in (tmp_path / "data" / "audit.jsonl").read_text()
    log = open_audit_log()
    log.append("second")
    log.close()
    assert verify(tmp_path / "data" / "audit.jsonl", key).ok
    assert key_file.read_text().strip() == key.hex()


def test_existing_log_without_its_key_is_an_error_naming_the_path(tmp_path: Path) -> None:
    open_audit_log().close()
    (tmp_path / "data" / "audit.key").unlink()
    with pytest.raises(AuditError) as info:
        open_audit_log()
    assert str(tmp_path / "data" / "audit.key") in str(info.value)
    assert "exists but its key is missing" in str(info.value)
    assert not (tmp_path / "data" / "audit.key").exists()


def test_named_key_file_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.key"
    monkeypatch.setenv("KAVACH_AUDIT_KEY_FILE", str(missing))
    with pytest.raises(AuditError, match=r"nope\.key"):
        open_audit_log(tmp_path / "x.jsonl")
    assert not missing.exists()


def test_named_key_file_is_used_and_must_be_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "k"
    key_file.write_text(KEY.hex())
    key_file.chmod(0o644)
    monkeypatch.setenv("KAVACH_AUDIT_KEY_FILE", str(key_file))
    with pytest.raises(AuditError, match="chmod 600"):
        open_audit_log(tmp_path / "x.jsonl")
    key_file.chmod(0o600)
    open_audit_log(tmp_path / "x.jsonl").close()
    assert verify(tmp_path / "x.jsonl", KEY).ok


def test_hex_key_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAVACH_AUDIT_KEY", KEY.hex())
    monkeypatch.setenv("KAVACH_AUDIT_LOG", str(tmp_path / "env.jsonl"))
    log = open_audit_log()
    assert KEY.hex() not in repr(log)
    log.close()
    assert verify(tmp_path / "env.jsonl", KEY).ok
    assert not (tmp_path / "data" / "audit.key").exists()
    monkeypatch.setenv("KAVACH_AUDIT_KEY", "not-hex")
    with pytest.raises(AuditError, match="not valid hex") as info:
        resolve_key(tmp_path / "env.jsonl")
    assert "not-hex" not in str(info.value)
    monkeypatch.setenv("KAVACH_AUDIT_KEY", "abcd")
    with pytest.raises(AuditError, match="at least 16 bytes"):
        resolve_key(tmp_path / "env.jsonl")


def test_resolve_without_create_never_makes_a_key(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="no audit key"):
        resolve_key(tmp_path / "new.jsonl")
    assert not (tmp_path / "data").exists()


def test_short_explicit_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="at least 16 bytes"):
        AuditLog(tmp_path / "a.jsonl", b"short")
    assert not os.path.exists(tmp_path / "a.jsonl")


def test_opening_a_log_whose_anchor_was_deleted_refuses(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, 3)
    audit.anchor_path_for(path).unlink()
    with pytest.raises(AuditError, match="missing or empty"):
        AuditLog(path, KEY)


def test_a_crash_between_genesis_and_its_checkpoint_is_completed_on_open(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    AuditLog(path, KEY).close()
    audit.anchor_path_for(path).write_bytes(b"")  # as if killed right after the genesis entry
    AuditLog(path, KEY).close()
    assert verify(path, KEY).ok


def test_secrets_inside_strings_and_argv_are_redacted(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", KEY)
    argv = [
        "curl",
        "-H",
        "Authorization: Bearer sk-abc.def",
        "https://bob:hunter2@example.com/p",
        "--password",
        "pw-value-1",
        "--token=tok-value-2",
        "API_KEY=key-value-3",
        "-la",
    ]
    entry = log.append("exec.started", payload={"argv": argv, "detail": "export GITHUB_TOKEN=ghp_value4; make"})
    log.close()
    assert entry.payload["argv"] == [
        "curl",
        "-H",
        "Authorization: [redacted]",
        "https://bob:[redacted]@example.com/p",
        "--password",
        "[redacted]",
        "--token=[redacted]",
        "API_KEY=[redacted]",
        "-la",
    ]
    assert entry.payload["detail"] == "export GITHUB_TOKEN=[redacted]; make"
    text = (tmp_path / "a.jsonl").read_text()
    for secret in ("sk-abc", "hunter2", "pw-value-1", "tok-value-2", "key-value-3", "ghp_value4"):
        assert secret not in text
    assert verify(tmp_path / "a.jsonl", KEY).ok


def test_redaction_handles_large_hostile_strings() -> None:
    """Argv comes from the workload: every redaction pattern must stay linear on it."""
    hostile = ["token" * 40_000, "-" + "password" * 20_000, "://a:" + "b" * 200_000, "a=" * 100_000]
    clean = audit.sanitize_payload({"argv": hostile})["argv"]
    assert clean[0] == hostile[0]
    assert clean[1] == hostile[1]
    assert clean[2] == "[redacted]"  # the word after a --password... flag
    assert len(clean[3]) == len(hostile[3])


def test_timestamps_are_utc_with_microseconds(tmp_path: Path) -> None:
    import re
    from datetime import UTC, datetime, timedelta

    before = datetime.now(UTC)
    stamp = audit._now()
    after = datetime.now(UTC)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z", stamp)
    parsed = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    slack = timedelta(milliseconds=1)  # datetime.now rounds to the microsecond, _now truncates
    assert before - slack <= parsed <= after + slack


# -- file safety: what a writer opens, appends to and cuts ----------------------------------------

OTHER_UID = 65534  # nobody
VICTIM = b"an unrelated private file\nwhose last line has no newline"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Turn a call that blocks (a FIFO opened for reading) into a TimeoutError, not a hung test."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still blocked after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A world-writable sticky directory, like /tmp."""
    path = tmp_path / "shared"
    path.mkdir()
    path.chmod(0o1777)
    return path


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A private file of ours that an attacker wants kavach to append to or truncate."""
    path = tmp_path / "victim"
    path.write_bytes(VICTIM)
    path.chmod(0o600)
    return path


@needs_root
def test_symlinked_anchor_planted_in_a_sticky_directory_is_refused(
    shared: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reviewer's reproduction: another user plants <log>.anchor -> our file; we open the log.
    anchor = shared / "audit.jsonl.anchor"
    anchor.symlink_to(victim)
    os.lchown(anchor, OTHER_UID, OTHER_UID)
    monkeypatch.setenv("KAVACH_AUDIT_LOG", str(shared / "audit.jsonl"))
    monkeypatch.setenv("KAVACH_AUDIT_KEY", KEY.hex())
    with pytest.raises(AuditError, match=r"refusing audit anchor .*audit\.jsonl\.anchor: it is a symbolic link"):
        open_audit_log()
    assert victim.read_bytes() == VICTIM
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600


@pytest.mark.parametrize("dangling", [False, True])
def test_symlinked_log_is_refused_and_its_target_untouched(shared: Path, victim: Path, dangling: bool) -> None:
    target = victim.with_name("not-yet") if dangling else victim
    (shared / "audit.jsonl").symlink_to(target)
    with pytest.raises(AuditError, match=r"refusing audit log .*audit\.jsonl: it is a symbolic link"):
        AuditLog(shared / "audit.jsonl", KEY)
    assert victim.read_bytes() == VICTIM
    assert not victim.with_name("not-yet").exists()  # nothing created through a dangling link


@pytest.mark.parametrize("name", ["audit.jsonl", "audit.jsonl.anchor"])
def test_hard_linked_log_or_anchor_is_refused_and_its_other_name_untouched(
    shared: Path, victim: Path, name: str
) -> None:
    os.link(victim, shared / name)
    with pytest.raises(AuditError, match=rf"refusing audit (log|anchor) .*{name}: it has 2 hard links"):
        AuditLog(shared / "audit.jsonl", KEY)
    assert victim.read_bytes() == VICTIM


def test_fifo_as_log_or_anchor_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "a.jsonl")
    with deadline(10), pytest.raises(AuditError, match=r"refusing audit log .*a\.jsonl: it is a FIFO"):
        AuditLog(tmp_path / "a.jsonl", KEY)
    os.mkfifo(tmp_path / "b.jsonl.anchor")
    with deadline(10), pytest.raises(AuditError, match=r"refusing audit anchor .*b\.jsonl\.anchor: it is a FIFO"):
        AuditLog(tmp_path / "b.jsonl", KEY)


@needs_root
def test_log_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, 2)
    before = path.read_bytes()
    os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.raises(AuditError, match=rf"refusing audit log {path}: it is owned by uid {OTHER_UID}, not by us"):
        AuditLog(path, KEY)
    os.chown(path, 0, 0)
    os.chown(audit.anchor_path_for(path), OTHER_UID, OTHER_UID)
    with pytest.raises(AuditError, match=rf"refusing audit anchor .*: it is owned by uid {OTHER_UID}"):
        AuditLog(path, KEY)
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666], ids=oct)
def test_log_writable_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, 1)
    path.chmod(mode)
    with pytest.raises(AuditError, match=rf"writable by group or others \(mode {mode:04o}\); chmod go-w"):
        AuditLog(path, KEY)
    path.chmod(0o640)  # readable by a group is allowed: only writing is refused
    AuditLog(path, KEY).close()
    assert verify(path, KEY).ok


@needs_root
def test_log_in_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    with pytest.raises(AuditError, match=rf"its directory {theirs} is owned by uid {OTHER_UID}"):
        AuditLog(theirs / "a.jsonl", KEY)
    assert list(theirs.iterdir()) == []


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757], ids=oct)
def test_log_in_a_directory_others_can_write_without_the_sticky_bit_is_refused(tmp_path: Path, mode: int) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(mode)
    with pytest.raises(AuditError, match=r"writable by group or others without the sticky bit"):
        AuditLog(open_dir / "a.jsonl", KEY)
    assert list(open_dir.iterdir()) == []


def test_log_in_a_sticky_shared_directory_is_created_private_and_works(shared: Path) -> None:
    path = shared / "a.jsonl"
    write_log(path, 3)
    write_log(path, 2)  # reopened
    assert verify(path, KEY).entries == 6
    for name in ("a.jsonl", "a.jsonl.anchor"):
        info = (shared / name).stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_nlink) == (0o600, os.geteuid(), 1)


def test_relative_log_path_still_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_log(Path("rel.jsonl"), 2)
    assert verify(tmp_path / "rel.jsonl", KEY).ok


def test_default_data_dir_is_made_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    open_audit_log(key=KEY).close()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert verify(data / "audit.jsonl", KEY).ok


@needs_root
def test_default_data_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.chown(data, OTHER_UID, OTHER_UID)
    with pytest.raises(AuditError, match=rf"{data} is owned by uid {OTHER_UID}"):
        open_audit_log(key=KEY)
    assert list(data.iterdir()) == []


# -- file safety: readers --------------------------------------------------------------------------


def test_readers_refuse_a_fifo_instead_of_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with deadline(10), pytest.raises(AuditError, match=rf"refusing to read audit log {fifo}: it is a FIFO"):
        verify(fifo, KEY)
    with deadline(10), pytest.raises(AuditError, match=rf"refusing to read audit log {fifo}: it is a FIFO"):
        list(read_entries(fifo))
    with deadline(10), pytest.raises(AuditError, match=rf"refusing to read audit key file {fifo}: it is a FIFO"):
        audit.read_key_file(fifo)
    log = tmp_path / "a.jsonl"
    write_log(log, 1)
    with deadline(10):
        result = verify(log, KEY, anchor_path=fifo)
    assert not result.ok
    assert result.reason == f"refusing to read anchor file {fifo}: it is a FIFO, not a regular file"


def test_readers_refuse_devices_and_directories(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match=r"refusing to read audit log /dev/null: it is a character device"):
        list(read_entries(Path("/dev/null")))
    with pytest.raises(AuditError, match=rf"refusing to read audit log {tmp_path}: it is a directory"):
        verify(tmp_path, KEY)


def test_readers_follow_a_symlink_to_a_regular_log(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    write_log(log, 2)
    link = tmp_path / "current.jsonl"
    link.symlink_to(log)
    result = verify(link, KEY, anchor_path=audit.anchor_path_for(log))
    assert result.ok and result.entries == 3
    assert len(list(read_entries(link))) == 3
