"""``kavach quarantine``: list, inspect and decide on held artifacts.

The store is ``$KAVACH_QUARANTINE_DIR`` (default ``<data dir>/quarantine``). Decisions are
written to the audit log (``$KAVACH_AUDIT_LOG`` or the default); ``--no-audit`` turns that off
explicitly. ``release`` writes the original bytes to stdout or to a new file (``--output``).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated

import typer

from kavach.audit import AuditLog, open_audit_log
from kavach.cli.audit import fail
from kavach.errors import AuditError, QuarantineError
from kavach.quarantine import QuarantineItem, QuarantineStatus, QuarantineStore

quarantine_app = typer.Typer(help="Review artifacts the gate held back.", no_args_is_help=True)

ByOption = Annotated[str | None, typer.Option("--by", help="Who decides (default: the current user).")]
NoAuditOption = Annotated[bool, typer.Option("--no-audit", help="Do not record the decision in the audit log.")]


def operator_name(by: str | None) -> str:
    """``--by`` or the login name of the current user."""
    if by is not None:
        return by
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


@contextlib.contextmanager
def audit_log(disabled: bool) -> Iterator[AuditLog | None]:
    """The default audit log for an operator action, closed afterwards (None with --no-audit)."""
    if disabled:
        yield None
        return
    try:
        log = open_audit_log()
    except AuditError as exc:
        raise fail(f"{exc} (or pass --no-audit)") from None
    try:
        yield log
    finally:
        log.close()


@contextlib.contextmanager
def store(audit: AuditLog | None = None) -> Iterator[QuarantineStore]:
    """The quarantine store at its configured location."""
    try:
        opened = QuarantineStore(audit=audit)
    except QuarantineError as exc:
        raise fail(str(exc)) from None
    try:
        yield opened
    except QuarantineError as exc:
        raise fail(str(exc)) from None
    finally:
        opened.close()


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _line(item: QuarantineItem) -> str:
    return (
        f"{item.id}  {item.status.value:<11} {_when(item.created_at)}  {item.sandbox_id:<16} "
        f"{item.agent_id or '-':<12} {item.source:<10} {item.size:>9} B  {len(item.findings)} finding(s)"
    )


@quarantine_app.command("list")
def list_command(
    status: Annotated[str | None, typer.Option(help="quarantined, approved, rejected or released.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON array of items.")] = False,
) -> None:
    """List held items, oldest first."""
    try:
        wanted = QuarantineStatus(status) if status is not None else None
    except ValueError:
        raise fail(f"--status: unknown status {status!r}") from None
    with store() as opened:
        items = opened.list(wanted)
    if as_json:
        typer.echo(json.dumps([i.to_dict() for i in items], sort_keys=True))
        return
    for item in items:
        typer.echo(_line(item))


@quarantine_app.command("show")
def show_command(
    item_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Show one item: metadata, findings (redacted evidence) and its history."""
    with store() as opened:
        item = opened.get(item_id)
    if as_json:
        typer.echo(json.dumps(item.to_dict(), sort_keys=True))
        return
    typer.echo(_line(item))
    typer.echo(f"  sha256 {item.sha256}")
    for finding in item.findings:
        typer.echo(
            f"  finding {finding.get('scanner')}/{finding.get('rule')} {finding.get('severity')} "
            f"line {finding.get('line')}: {finding.get('evidence')}"
        )
    for action in item.history:
        typer.echo(f"  {_when(action.at)}  {action.action} by {action.actor}")


@quarantine_app.command("approve")
def approve_command(
    item_id: Annotated[str, typer.Argument(metavar="ID")], by: ByOption = None, no_audit: NoAuditOption = False
) -> None:
    """Approve a quarantined item (it can then be released)."""
    with audit_log(no_audit) as log, store(log) as opened:
        item = opened.approve(item_id, operator_name(by))
    typer.echo(f"{item.id}: approved by {operator_name(by)}")


@quarantine_app.command("reject")
def reject_command(
    item_id: Annotated[str, typer.Argument(metavar="ID")], by: ByOption = None, no_audit: NoAuditOption = False
) -> None:
    """Reject a quarantined item; its held bytes are deleted."""
    with audit_log(no_audit) as log, store(log) as opened:
        item = opened.reject(item_id, operator_name(by))
    typer.echo(f"{item.id}: rejected by {operator_name(by)}")


@quarantine_app.command("release")
def release_command(
    item_id: Annotated[str, typer.Argument(metavar="ID")],
    by: ByOption = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write to this new file (mode 0600).")] = None,
    no_audit: NoAuditOption = False,
) -> None:
    """Release an approved item: its original bytes go to stdout or --output."""
    fd = None
    if output is not None:
        # Create the destination first: a release whose bytes cannot be written must not happen.
        try:
            fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise fail(f"--output {output}: {exc.strerror}") from None
    released = False
    try:
        with audit_log(no_audit) as log, store(log) as opened:
            data = opened.release(item_id, operator_name(by))
        released = True
        if fd is None:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        else:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
    finally:
        if fd is not None and output is not None:
            os.close(fd)
            if not released:
                os.unlink(output)
    if output is not None:
        typer.echo(f"{item_id}: released by {operator_name(by)} to {output} ({len(data)} bytes)", err=True)


def register(app: typer.Typer) -> None:
    """Add ``kavach quarantine list|show|approve|reject|release`` to the CLI."""
    app.add_typer(quarantine_app, name="quarantine")


__all__ = ["quarantine_app", "register"]
