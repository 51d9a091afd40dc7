"""``kavach quarantine``: list/show/approve/reject/release through the CLI, audited."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kavach.audit import read_entries, verify
from kavach.cli import quarantine as quarantine_cli
from kavach.quarantine import QuarantineStore
from kavach.scanning.findings import Finding, Severity

KEY = bytes(range(32))
DATA = b"\x00binary\xffpayload with token=abc123\n"


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    app.command("noop")(lambda: None)
    quarantine_cli.register(app)
    return app


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KAVACH_QUARANTINE_DIR", str(tmp_path / "q"))
    monkeypatch.setenv("KAVACH_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.setenv("KAVACH_AUDIT_KEY", KEY.hex())
    return tmp_path


def put(env: Path) -> str:
    finding = Finding("secrets", "generic-token", "credential", Severity.MEDIUM, 18, 30, 1, "token=a****3")
    with QuarantineStore() as store:
        return store.put(DATA, findings=[finding], sandbox_id="sb-9", agent_id=None, source="stdout")


def test_list_and_show(app: typer.Typer, env: Path) -> None:
    item_id = put(env)
    listed = CliRunner().invoke(app, ["quarantine", "list"])
    assert listed.exit_code == 0
    assert item_id in listed.stdout and "quarantined" in listed.stdout
    as_json = json.loads(CliRunner().invoke(app, ["quarantine", "list", "--json"]).stdout)
    assert [i["id"] for i in as_json] == [item_id]
    shown = CliRunner().invoke(app, ["quarantine", "show", item_id])
    assert shown.exit_code == 0
    assert "secrets/generic-token" in shown.stdout
    assert "abc123" not in shown.stdout
    empty = CliRunner().invoke(app, ["quarantine", "list", "--status", "approved", "--json"])
    assert json.loads(empty.stdout) == []


def test_approve_then_release_to_stdout(app: typer.Typer, env: Path) -> None:
    item_id = put(env)
    early = CliRunner().invoke(app, ["quarantine", "release", item_id, "--by", "alice"])
    assert early.exit_code == 2
    assert "it is quarantined, not approved" in early.stderr
    assert early.stdout_bytes == b""
    approved = CliRunner().invoke(app, ["quarantine", "approve", item_id, "--by", "alice"])
    assert approved.exit_code == 0, approved.output
    released = CliRunner().invoke(app, ["quarantine", "release", item_id, "--by", "alice"])
    assert released.exit_code == 0
    assert released.stdout_bytes == DATA
    again = CliRunner().invoke(app, ["quarantine", "release", item_id, "--by", "alice"])
    assert again.exit_code == 2
    entries = [e for e in read_entries(env / "audit.jsonl") if e["event"].startswith("quarantine.")]
    assert [(e["event"], e["payload"]["by"]) for e in entries] == [
        ("quarantine.approved", "alice"),
        ("quarantine.released", "alice"),
    ]
    assert verify(env / "audit.jsonl", KEY).ok


def test_release_to_a_new_private_file(app: typer.Typer, env: Path) -> None:
    item_id = put(env)
    CliRunner().invoke(app, ["quarantine", "approve", item_id, "--by", "bob"])
    out = env / "released.bin"
    result = CliRunner().invoke(app, ["quarantine", "release", item_id, "--by", "bob", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == DATA
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_failed_release_leaves_no_output_file_and_existing_files_are_not_clobbered(app: typer.Typer, env: Path) -> None:
    item_id = put(env)
    out = env / "out.bin"
    result = CliRunner().invoke(app, ["quarantine", "release", item_id, "--output", str(out)])
    assert result.exit_code == 2
    assert not out.exists()
    out.write_bytes(b"keep me")
    CliRunner().invoke(app, ["quarantine", "approve", item_id])
    clobber = CliRunner().invoke(app, ["quarantine", "release", item_id, "--output", str(out)])
    assert clobber.exit_code == 2
    assert out.read_bytes() == b"keep me"
    assert "File exists" in clobber.stderr
    with QuarantineStore() as store:
        assert store.get(item_id).status.value == "approved"


def test_reject_and_invalid_steps(app: typer.Typer, env: Path) -> None:
    item_id = put(env)
    rejected = CliRunner().invoke(app, ["quarantine", "reject", item_id, "--by", "carol"])
    assert rejected.exit_code == 0
    approve = CliRunner().invoke(app, ["quarantine", "approve", item_id, "--by", "carol"])
    assert approve.exit_code == 2
    assert approve.stderr.strip() == f"kavach: error: cannot approve item {item_id}: it is rejected, not quarantined"
    unknown = CliRunner().invoke(app, ["quarantine", "show", "q-ffffffffffffffff"])
    assert unknown.exit_code == 2
    assert "no quarantine item" in unknown.stderr


def test_decisions_need_an_audit_key_unless_no_audit(
    app: typer.Typer, env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    item_id = put(env)
    monkeypatch.delenv("KAVACH_AUDIT_KEY")
    monkeypatch.setenv("KAVACH_AUDIT_KEY_FILE", str(env / "missing.key"))
    refused = CliRunner().invoke(app, ["quarantine", "approve", item_id])
    assert refused.exit_code == 2
    assert "missing.key" in refused.stderr and "--no-audit" in refused.stderr
    with QuarantineStore() as store:
        assert store.get(item_id).status.value == "quarantined"
    allowed = CliRunner().invoke(app, ["quarantine", "approve", item_id, "--no-audit"])
    assert allowed.exit_code == 0
