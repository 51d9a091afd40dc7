"""``kavach agents``: repeat offenders and revoked agents; an operator clears revocations here."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer

from kavach.cli.audit import fail
from kavach.cli.quarantine import ByOption, NoAuditOption, audit_log, operator_name
from kavach.threat import OffenderError, OffenderStore, default_offender_store

agents_app = typer.Typer(help="Agents with offences or revocations.", no_args_is_help=True)


def _store() -> OffenderStore:
    try:
        return default_offender_store()
    except OffenderError as exc:
        raise fail(str(exc)) from None


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@agents_app.command("list")
def list_command(as_json: Annotated[bool, typer.Option("--json", help="A JSON array.")] = False) -> None:
    """Agents with a recorded offence or an active revocation (revoked first)."""
    store = _store()
    try:
        records = store.agents()
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in records], sort_keys=True))
        return
    for record in records:
        state = f"REVOKED ({record.revoked_reason})" if record.revoked else "active"
        typer.echo(
            f"{record.agent_id:<24} offences {record.offences:>3}  weight {record.decayed_weight:5.2f}  "
            f"last {_when(record.last_offence)}  {state}"
        )


@agents_app.command("clear")
def clear_command(
    agent_id: Annotated[str, typer.Argument(metavar="AGENT_ID")],
    by: ByOption = None,
    no_audit: NoAuditOption = False,
) -> None:
    """Lift AGENT_ID's revocation so it can create sandboxes again (exit 1 if it was not revoked)."""
    operator = operator_name(by)
    with audit_log(no_audit) as log:
        store = _store()
        try:
            cleared = store.clear(agent_id, operator)
        except OffenderError as exc:
            raise fail(str(exc)) from None
        finally:
            store.close()
        if cleared and log is not None:
            log.append("agent.cleared", agent_id=agent_id, payload={"agent_id": agent_id, "by": operator})
    if not cleared:
        typer.echo(f"agent {agent_id} is not revoked")
        raise typer.Exit(1)
    typer.echo(f"agent {agent_id}: revocation cleared by {operator}")


def register(app: typer.Typer) -> None:
    """Add ``kavach agents list|clear`` to the CLI."""
    app.add_typer(agents_app, name="agents")


__all__ = ["agents_app", "register"]
