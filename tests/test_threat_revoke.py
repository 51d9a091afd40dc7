"""The revoke flow: a tier-4 assessment revokes the agent, creation fails, an operator clears it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kavach.audit import read_entries
from kavach.cli import agents as agents_cli
from kavach.scanning.findings import Finding, Severity
from kavach.threat import ThreatAssessor, Tier, default_offender_store

KEY = bytes(range(32))
ATTACK = [
    Finding("code", "read-shadow", "sensitive_path", Severity.HIGH, 0, 1, 1, "…", confidence=0.9),
    Finding("code", "curl-pipe-sh", "download", Severity.HIGH, 0, 1, 1, "…", confidence=0.9),
    Finding("code", "bash-dev-tcp", "reverse_shell", Severity.CRITICAL, 0, 1, 1, "…", confidence=0.9),
]


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    app.command("noop")(lambda: None)
    agents_cli.register(app)
    return app


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAVACH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KAVACH_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.setenv("KAVACH_AUDIT_KEY", KEY.hex())


def revoke_by_assessment(agent_id: str) -> None:
    store = default_offender_store()
    assessment = ThreatAssessor(store).assess(agent_id, ATTACK)
    assert assessment.tier is Tier.REVOKE
    store.revoke(agent_id, f"threat tier 4: {assessment.classification}")  # what Sandbox does on tier 4
    store.close()


def test_cli_lists_and_clears_a_revoked_agent(app: typer.Typer, tmp_path: Path) -> None:
    revoke_by_assessment("agent-bad")
    listed = CliRunner().invoke(app, ["agents", "list", "--json"])
    assert listed.exit_code == 0
    [record] = json.loads(listed.stdout)
    assert (record["agent_id"], record["revoked"], record["offences"]) == ("agent-bad", True, 1)
    assert "REVOKED" in CliRunner().invoke(app, ["agents", "list"]).stdout

    cleared = CliRunner().invoke(app, ["agents", "clear", "agent-bad", "--by", "operator-1"])
    assert cleared.exit_code == 0, cleared.output
    assert not default_offender_store().is_revoked("agent-bad")
    again = CliRunner().invoke(app, ["agents", "clear", "agent-bad", "--by", "operator-1"])
    assert again.exit_code == 1
    assert "not revoked" in again.stdout
    [entry] = [e for e in read_entries(tmp_path / "audit.jsonl") if e["event"] == "agent.cleared"]
    assert entry["payload"] == {"agent_id": "agent-bad", "by": "operator-1"}


async def test_revoked_agent_cannot_create_a_sandbox_until_cleared(app: typer.Typer) -> None:
    lifecycle = pytest.importorskip("kavach.lifecycle")
    from kavach.backends.noop import NoopDriver
    from kavach.config import SandboxConfig
    from kavach.errors import AgentRevoked

    revoke_by_assessment("agent-7")
    config = SandboxConfig(agent_id="agent-7")
    with pytest.raises(AgentRevoked, match="agent-7"):
        await lifecycle.Sandbox.create(config, driver=NoopDriver())
    other = await lifecycle.Sandbox.create(SandboxConfig(agent_id="agent-8"), driver=NoopDriver())
    await other.destroy()

    assert CliRunner().invoke(app, ["agents", "clear", "agent-7", "--by", "op"]).exit_code == 0
    sandbox = await lifecycle.Sandbox.create(config, driver=NoopDriver())
    await sandbox.destroy()
