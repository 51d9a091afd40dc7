"""``kavach scan``: run the externalization gate's scanners over a file or stdin."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from kavach.scanning.findings import Verdict
from kavach.scanning.gate import SCANNER_NAMES, ExternalizationPolicy, Gate


def _fail(message: str) -> typer.Exit:
    typer.echo(f"kavach: error: {message}", err=True)
    return typer.Exit(2)


def _read(target: str, limit: int) -> bytes:
    # One byte more than the bound, so that an oversize input is seen as oversize.
    if target == "-":
        return sys.stdin.buffer.read(limit + 1)
    path = Path(target)
    try:
        with path.open("rb") as fh:
            return fh.read(limit + 1)
    except FileNotFoundError:
        raise _fail(f"{target}: no such file") from None
    except IsADirectoryError:
        raise _fail(f"{target}: is a directory") from None
    except PermissionError:
        raise _fail(f"{target}: permission denied") from None
    except OSError as exc:
        raise _fail(f"{target}: {exc.strerror or exc}") from None


def scan_command(
    target: Annotated[str, typer.Argument(metavar="FILE|-", help="File to scan, or - for stdin.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per finding.")] = False,
    scanner: Annotated[
        list[str] | None,
        typer.Option("--scanner", help="secrets, code or data (repeatable; default: all)."),
    ] = None,
) -> None:
    """Scan FILE (or stdin) for secrets, dangerous code and personal data.

    Exit status: 0 when nothing reaches the block threshold, 1 when something does,
    2 on bad input.
    """
    chosen = frozenset(scanner or SCANNER_NAMES)
    unknown = sorted(chosen - SCANNER_NAMES)
    if unknown:
        raise _fail(f"--scanner: unknown scanner {', '.join(unknown)} (expected secrets, code or data)")
    policy = ExternalizationPolicy(scanners=chosen)
    data = _read(target, policy.max_artifact_size)
    source = "stdin" if target == "-" else f"file:{target}"
    result = Gate(policy).apply(data, source)
    for finding in result.findings:
        if as_json:
            record = {k: v for k, v in finding.to_dict().items() if k not in ("source",)}
            typer.echo(json.dumps(record, sort_keys=False))
        else:
            typer.echo(
                f"{target}:{finding.line}: {finding.severity!s:<8} {finding.rule} ({finding.category}) "
                f"{finding.evidence}"
            )
    if not as_json:
        typer.echo(f"verdict: {result.verdict} ({len(result.findings)} findings)", err=True)
    if result.verdict is Verdict.BLOCK:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``kavach scan`` to the CLI."""
    app.command("scan")(scan_command)


__all__ = ["register", "scan_command"]
