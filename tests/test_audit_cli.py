"""``kavach audit verify|show``: exit codes, the first bad serial, filters and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kavach.audit import AuditLog
from kavach.cli import audit as audit_cli

KEY = bytes(range(32))


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    app.command("noop")(lambda: None)  # a second command keeps "audit" a sub-command
    audit_cli.register(app)
    return app


@pytest.fixture
def log_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KAVACH_AUDIT_KEY", KEY.hex())
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, KEY)
    for i in range(4):
        log.append("exec.finished", sandbox_id=f"sb-{i % 2}", agent_id="agent-1", payload={"exit": i})
    log.close()
    return path


def test_verify_ok_exits_0(app: typer.Typer, log_file: Path) -> None:
    result = CliRunner().invoke(app, ["audit", "verify", str(log_file)])
    assert result.exit_code == 0, result.output
    assert "OK, 5 entries" in result.stdout


def test_verify_tampered_exits_1_with_serial_and_reason(app: typer.Typer, log_file: Path) -> None:
    log_file.write_bytes(log_file.read_bytes().replace(b'"exit":2', b'"exit":0'))
    result = CliRunner().invoke(app, ["audit", "verify", str(log_file)])
    assert result.exit_code == 1
    assert "FAILED at serial 3: hmac mismatch" in result.stdout
    as_json = CliRunner().invoke(app, ["audit", "verify", "--json", str(log_file)])
    assert as_json.exit_code == 1
    data = json.loads(as_json.stdout)
    assert (data["ok"], data["first_bad_serial"]) == (False, 3)


def test_verify_truncated_exits_1(app: typer.Typer, log_file: Path) -> None:
    lines = log_file.read_bytes().splitlines(keepends=True)
    log_file.write_bytes(b"".join(lines[:-1]))
    result = CliRunner().invoke(app, ["audit", "verify", str(log_file)])
    assert result.exit_code == 1
    assert "truncated or rolled back" in result.stdout


def test_verify_with_key_file_and_missing_key(
    app: typer.Typer, log_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY.hex())
    key_file.chmod(0o600)
    monkeypatch.delenv("KAVACH_AUDIT_KEY")
    ok = CliRunner().invoke(app, ["audit", "verify", "--key-file", str(key_file), str(log_file)])
    assert ok.exit_code == 0
    missing = CliRunner().invoke(app, ["audit", "verify", str(log_file)])
    assert missing.exit_code == 2
    assert missing.stderr.startswith("kavach: error: audit log")
    assert "key is missing" in missing.stderr
    nofile = CliRunner().invoke(app, ["audit", "verify", "--key-file", str(key_file), str(tmp_path / "nope")])
    assert nofile.exit_code == 2
    assert "does not exist" in nofile.stderr


def test_show_filters_by_sandbox_and_prints_json(app: typer.Typer, log_file: Path) -> None:
    result = CliRunner().invoke(app, ["audit", "show", str(log_file), "--sandbox", "sb-1", "--json"])
    assert result.exit_code == 0
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["serial"] for e in entries] == [2, 4]
    assert all(e["sandbox_id"] == "sb-1" for e in entries)
    table = CliRunner().invoke(app, ["audit", "show", str(log_file)])
    assert table.exit_code == 0
    assert len(table.stdout.splitlines()) == 5
    assert "audit.genesis" in table.stdout


def test_registered_in_the_kavach_command(log_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kavach.cli import main

    assert main(["audit", "verify", str(log_file)]) == 0
    assert "OK" in capsys.readouterr().out


def run_kavach(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child with a deadline: a reader blocked on a FIFO fails the test, not hangs it."""
    env = {**os.environ, "KAVACH_AUDIT_KEY": KEY.hex(), "KAVACH_DATA_DIR": str(tmp_path / "data")}
    env.pop("KAVACH_AUDIT_LOG", None)
    return subprocess.run(
        [sys.executable, "-m", "kavach", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("command", ["verify", "show"])
def test_a_fifo_as_the_log_is_refused_without_blocking_or_a_traceback(tmp_path: Path, command: str) -> None:
    fifo = tmp_path / "audit.jsonl"
    os.mkfifo(fifo)
    result = run_kavach("audit", command, str(fifo), tmp_path=tmp_path)
    assert result.returncode == 2, result
    assert result.stderr == f"kavach: error: refusing to read audit log {fifo}: it is a FIFO, not a regular file\n"


def test_a_fifo_as_the_anchor_fails_verification_without_blocking(tmp_path: Path, log_file: Path) -> None:
    fifo = tmp_path / "anchor"
    os.mkfifo(fifo)
    result = run_kavach("audit", "verify", "--anchor", str(fifo), str(log_file), tmp_path=tmp_path)
    assert result.returncode == 1, result
    assert f"refusing to read anchor file {fifo}: it is a FIFO" in result.stdout
    assert "Traceback" not in result.stderr


def test_show_refuses_a_device_behind_a_symlink(app: typer.Typer, tmp_path: Path) -> None:
    link = tmp_path / "audit.jsonl"
    link.symlink_to("/dev/null")
    result = CliRunner().invoke(app, ["audit", "show", str(link)])
    assert result.exit_code == 2
    assert (
        result.stderr
        == f"kavach: error: refusing to read audit log {link}: it is a character device, not a regular file\n"
    )
