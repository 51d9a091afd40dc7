"""kill -9 in the middle of concurrent appends from four processes loses no acknowledged entry."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kavach.audit import AuditLog, read_entries, verify

KEY = bytes(range(32))
WORKERS = 4
PER_WORKER = 250  # 1,000 appends in all
KILL_AFTER_ACKS = 300

CHILD = """
import sys
from kavach.audit import AuditLog
worker = int(sys.argv[2])
log = AuditLog(sys.argv[1], bytes(range(32)), checkpoint_every=50)
sys.stdout.write("ready\\n")
sys.stdout.flush()
sys.stdin.read(1)  # start together: the test writes one byte once every child is ready
for i in range(int(sys.argv[3])):
    log.append("test.append", agent_id=f"w{worker}", payload={"worker": worker, "i": i})
    # The ack goes out only after append() returned, i.e. after the entry was fsync'd.
    sys.stdout.write(f"{worker} {i}\\n")
    sys.stdout.flush()
log.close()
"""


def _read_acks(procs: list[subprocess.Popen[bytes]], stop_after: int | None) -> set[tuple[int, int]]:
    acks: set[tuple[int, int]] = set()
    buffers = {p.stdout.fileno(): b"" for p in procs if p.stdout}
    sel = selectors.DefaultSelector()
    for fd in buffers:
        sel.register(fd, selectors.EVENT_READ)
    open_fds = set(buffers)
    while open_fds and (stop_after is None or len(acks) < stop_after):
        for key, _ in sel.select(timeout=30):
            fd = int(key.fd)
            chunk = os.read(fd, 65536)
            if not chunk:
                sel.unregister(fd)
                open_fds.discard(fd)
                continue
            data = buffers[fd] + chunk
            *lines, buffers[fd] = data.split(b"\n")
            for line in lines:
                worker, i = line.split()
                acks.add((int(worker), int(i)))
    sel.close()
    return acks


@pytest.mark.slow
def test_kill_9_during_concurrent_appends_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path, KEY, checkpoint_every=50).close()  # genesis before the race
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(w), str(PER_WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        for w in range(WORKERS)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"g")
            proc.stdin.close()
        acks = _read_acks(procs, KILL_AFTER_ACKS)
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
        # Acks already in the pipes when the children died were acknowledged too.
        acks |= _read_acks(procs, None)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    killed = sum(proc.returncode == -signal.SIGKILL for proc in procs)
    assert killed >= 1, "every child finished before the kill"
    assert KILL_AFTER_ACKS <= len(acks) < WORKERS * PER_WORKER

    log = AuditLog(path, KEY)  # repairs a torn tail, if the kill left one
    log.close()
    result = verify(path, KEY)
    assert result.ok, result
    logged = {(e["payload"]["worker"], e["payload"]["i"]) for e in read_entries(path) if e["event"] == "test.append"}
    assert acks <= logged, f"acknowledged but missing: {sorted(acks - logged)[:10]}"
    serials = [e["serial"] for e in read_entries(path)]
    assert serials == list(range(len(serials)))


BIG_WRITER = """
import sys
from kavach.audit import AuditLog
log = AuditLog(sys.argv[1], bytes(range(32)), fsync=False)
blob = "x" * (48 * 1024 * 1024)  # one entry big enough that write(2) takes milliseconds
sys.stdout.write("ready\\n")
sys.stdout.flush()
log.append("big", payload={"blob": blob})
"""


def test_kill_9_in_the_middle_of_a_write_leaves_a_torn_tail_that_is_reported_and_repaired(tmp_path: Path) -> None:
    """A real torn write: SIGKILL lands while the kernel is still copying one large entry."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    for attempt in range(3):
        path = tmp_path / f"torn{attempt}.jsonl"
        log = AuditLog(path, KEY)
        log.append("before", payload={"n": 1})
        log.close()
        complete = path.stat().st_size
        proc = subprocess.Popen([sys.executable, "-c", BIG_WRITER, str(path)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        while path.stat().st_size == complete and proc.poll() is None:
            pass  # kill as soon as the first bytes of the big entry land
        proc.kill()
        proc.wait()
        result = verify(path, KEY)
        if result.torn_tail_bytes == 0:
            continue  # the write finished before the signal arrived; try again
        assert not result.ok
        assert result.entries == 2
        assert result.first_bad_serial == 2
        assert result.torn_tail_bytes == path.stat().st_size - complete
        repaired = AuditLog(path, KEY)
        assert [r.torn_bytes for r in repaired.repairs] == [result.torn_tail_bytes]
        repaired.close()
        after = verify(path, KEY)
        assert after.ok, after
        events = [e["event"] for e in read_entries(path)]
        assert events == ["audit.genesis", "before", "audit.repaired"]
        return
    pytest.fail("three kills all arrived after the 48 MiB write had finished")
