"""``kavach audit``: verify and show audit logs.

``verify`` exits 0 when the chain and its checkpoints verify, 1 with the first bad serial and
the reason when they do not, and 2 on bad input (no such file, no key).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kavach import paths
from kavach.audit import read_entries, read_key_file, resolve_key, verify
from kavach.errors import AuditError

audit_app = typer.Typer(help="Verify and read the HMAC-chained audit log.", no_args_is_help=True)


def fail(message: str) -> typer.Exit:
    """Print the CLI's one-line error and return the exit to raise (code 2: bad input)."""
    typer.echo(f"kavach: error: {message}", err=True)
    return typer.Exit(2)


def _log_path(file: str | None) -> Path:
    return Path(file) if file else paths.audit_log_path()


@audit_app.command("verify")
def verify_command(
    file: Annotated[str | None, typer.Argument(help="The log (default: $KAVACH_AUDIT_LOG or the data dir's).")] = None,
    key_file: Annotated[
        str | None, typer.Option("--key-file", help="Key file (default: $KAVACH_AUDIT_KEY, $KAVACH_AUDIT_KEY_FILE).")
    ] = None,
    anchor: Annotated[str | None, typer.Option("--anchor", help="Anchor file (default: FILE.anchor).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Check every entry's HMAC, the chain links and the signed checkpoints of FILE."""
    log = _log_path(file)
    if not log.exists():
        raise fail(f"audit log {log} does not exist")
    try:
        key = read_key_file(key_file) if key_file else resolve_key(log)
        result = verify(log, key, anchor_path=anchor)
    except AuditError as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps({"file": str(log), **result.to_dict()}, sort_keys=True))
    elif result.ok:
        checkpoint = "" if result.last_checkpoint is None else f", last checkpoint at serial {result.last_checkpoint}"
        typer.echo(f"{log}: OK, {result.entries} entries (serials 0-{result.entries - 1}){checkpoint}")
    else:
        typer.echo(
            f"{log}: FAILED at serial {result.first_bad_serial}: {result.reason} "
            f"({result.entries} entries verified before it)"
        )
    if not result.ok:
        raise typer.Exit(1)


def _summary(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= 160 else text[:157] + "..."


@audit_app.command("show")
def show_command(
    file: Annotated[str | None, typer.Argument(help="The log (default: $KAVACH_AUDIT_LOG or the data dir's).")] = None,
    sandbox: Annotated[str | None, typer.Option("--sandbox", help="Only entries of this sandbox id.")] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="Only entries of this agent id.")] = None,
    event: Annotated[str | None, typer.Option("--event", help="Only events starting with this prefix.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per entry (JSON Lines).")] = False,
) -> None:
    """Print the entries of FILE (without verifying them: use `kavach audit verify`)."""
    log = _log_path(file)
    try:
        for entry in read_entries(log):
            if sandbox is not None and entry.get("sandbox_id") != sandbox:
                continue
            if agent is not None and entry.get("agent_id") != agent:
                continue
            if event is not None and not str(entry.get("event", "")).startswith(event):
                continue
            if as_json:
                sys.stdout.write(json.dumps(entry, sort_keys=True) + "\n")
            else:
                typer.echo(
                    f"{entry.get('serial'):>6}  {entry.get('timestamp')}  {entry.get('event'):<22} "
                    f"{entry.get('sandbox_id') or '-':<16} {entry.get('agent_id') or '-':<12} "
                    f"{_summary(entry.get('payload'))}"
                )
    except AuditError as exc:
        raise fail(str(exc)) from None


def register(app: typer.Typer) -> None:
    """Add ``kavach audit verify|show`` to the CLI."""
    app.add_typer(audit_app, name="audit")


__all__ = ["audit_app", "fail", "register"]
