"""The ``kavach`` command.

Exit codes: the sandboxed command's own exit code; 124 when it timed out; 2 for bad input
(unknown backend, bad policy file, bad bind syntax, missing command); 125 when kavach could
not run the command (sandbox creation failed, min score not met, a guard refused it, the
gate blocked its output). Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kavach.backends.names import Backend
from kavach.cli.proxy import (
    AllowOption,
    AllowPrivateOption,
    CredentialOption,
    DenyOption,
    ResolveOption,
    UpstreamCaOption,
)
from kavach.errors import ExternalizationBlocked, KavachError, PolicyError
from kavach.policy import Bind, NetworkMode, SandboxPolicy

if TYPE_CHECKING:
    from kavach.lifecycle import Sandbox
    from kavach.scanning.findings import Finding

EXIT_BAD_INPUT = 2
EXIT_TIMEOUT = 124
EXIT_KAVACH_FAILED = 125

app = typer.Typer(
    name="kavach",
    help="Run untrusted commands in a scored sandbox; nothing leaves without passing policy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
policy_app = typer.Typer(help="Inspect and validate policy files.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")


class CliError(Exception):
    """A one-line error with an exit code."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


def load_policy(spec: str) -> SandboxPolicy:
    """A preset name (minimal, basic, strict) or a policy file path."""
    if spec.strip().lower() in ("minimal", "basic", "strict"):
        return SandboxPolicy.preset(spec)
    if not os.path.exists(spec):
        raise PolicyError("--policy", spec, "not a preset (minimal, basic, strict) and no such file")
    return SandboxPolicy.load(spec)


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PolicyError("--env", pair, "expected K=V")
        env[key] = value
    return env


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=None, sort_keys=True, default=str) + "\n")


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[list[str] | None, typer.Argument(help="The command and its arguments (after --).")] = None,
    backend: Annotated[str, typer.Option(help="auto or a backend name (see 'kavach backends').")] = "auto",
    inner: Annotated[str | None, typer.Option(help="Inner backend of a composite (e.g. process inside oci).")] = None,
    policy: Annotated[str, typer.Option(help="minimal, basic, strict or a policy file.")] = "basic",
    min_score: Annotated[int, typer.Option(help="Fail unless the enforced score reaches N.")] = 0,
    allow_degraded: Annotated[
        bool,
        typer.Option(
            "--allow-degraded",
            help="Run with fewer controls than the policy asks where the host lacks them (the policy's "
            "allow_degraded): listed in the JSON's enforcement.degraded and scored lower.",
        ),
    ] = False,
    timeout: Annotated[float | None, typer.Option(help="Wall-clock timeout in seconds.")] = None,
    ro_bind: Annotated[list[str] | None, typer.Option("--ro-bind", help="SRC[:DST] read-only bind.")] = None,
    bind: Annotated[list[str] | None, typer.Option("--bind", help="SRC[:DST] read-write bind.")] = None,
    workdir: Annotated[str | None, typer.Option(help="Host directory bound read-write as the workdir.")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", help="K=V set in the sandbox.")] = None,
    network: Annotated[str | None, typer.Option(help="off, proxy or host (default: the policy's).")] = None,
    allow: AllowOption = None,
    deny: DenyOption = None,
    allow_private: AllowPrivateOption = None,
    credential: CredentialOption = None,
    upstream_ca: UpstreamCaOption = None,
    resolve: ResolveOption = None,
    agent_id: Annotated[str | None, typer.Option(help="Agent on whose behalf the command runs.")] = None,
    stdin: Annotated[bool, typer.Option("--stdin", help="Pass this process's stdin to the command.")] = False,
    no_audit: Annotated[bool, typer.Option("--no-audit", help="Do not write the audit log.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the output.")] = False,
) -> None:
    """Run CMD in a sandbox and exit with its exit code (124 on timeout).

    With --network proxy the sandbox reaches only the hosts given with --allow, through kavach's
    egress proxy; --credential makes the proxy add a header whose value the sandbox never sees
    (its $ENVVAR holds a placeholder).
    """
    if not command:
        raise CliError("missing command: kavach run [OPTIONS] -- CMD [ARGS...]")
    from kavach.config import AuditSettings, SandboxConfig

    chosen = load_policy(policy)
    filesystem = replace(
        chosen.filesystem,
        ro_binds=chosen.filesystem.ro_binds + tuple(Bind.parse(b, "--ro-bind") for b in ro_bind or ()),
        rw_binds=chosen.filesystem.rw_binds + tuple(Bind.parse(b, "--bind") for b in bind or ()),
    )
    chosen = replace(chosen, filesystem=filesystem)
    if allow_degraded:
        chosen = replace(chosen, allow_degraded=True)
    proxy_flags = bool(allow or deny or allow_private or credential or upstream_ca or resolve)
    if network is None and proxy_flags:
        network = "proxy"
    if network is not None:
        try:
            mode = NetworkMode(network.lower())
        except ValueError:
            raise PolicyError("--network", network, "expected off, proxy or host") from None
        if proxy_flags and mode is not NetworkMode.PROXY:
            raise PolicyError("--network", network, "--allow/--deny/--credential need --network proxy")
        chosen = replace(chosen, network=replace(chosen.network, mode=mode))
    proxy_settings: dict[str, Any] = {}
    if chosen.network.mode is NetworkMode.PROXY:
        from kavach.credentials.options import parse_proxy_options

        options = parse_proxy_options(
            allow=allow or chosen.network.egress_allowlist,
            deny=deny or chosen.network.egress_denylist,
            allow_private=allow_private or (),
            credentials=credential or (),
            upstream_ca=upstream_ca,
            resolve=resolve or (),
        )
        proxy_settings = {"proxy": options.config, "credential_store": options.store, "secrets": options.secret_refs}
    if timeout is not None:
        if not (math.isfinite(timeout) and timeout > 0):
            raise PolicyError("--timeout", timeout, "must be a positive number of seconds")
        # Rounded up to whole milliseconds: a timeout is never shortened to nothing.
        wall_ms = math.ceil(timeout * 1000)
        chosen = replace(chosen, resources=replace(chosen.resources, wall_timeout_ms=wall_ms))
    chosen.validate()
    config = SandboxConfig(
        backend=None if backend.lower() == "auto" else Backend.parse(backend),
        inner_backend=Backend.parse(inner) if inner else None,
        policy=chosen,
        env=_parse_env(env or ()),
        workdir=os.path.abspath(workdir) if workdir else None,
        min_score=min_score,
        agent_id=agent_id,
        audit=AuditSettings(enabled=not no_audit),
        **proxy_settings,
    )
    data = sys.stdin.buffer.read() if stdin else None
    code = asyncio.run(_stoppable(_run_and_report(config, list(command), data, as_json)))
    raise typer.Exit(code)


#: Signals that end ``kavach run`` the way Ctrl-C does: the sandbox is destroyed first.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


async def _stoppable(work: Coroutine[Any, Any, int]) -> int:
    """Run ``work``; SIGTERM or SIGHUP cancel it (as asyncio does on SIGINT), so the
    sandbox's ``async with`` destroys it before the process exits with 128 + the signal.

    A supervisor's SIGTERM would otherwise kill this process on the spot, leaving the
    sandbox to whatever the backend does when its owner vanishes.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    received: list[int] = []

    def stop(signum: int) -> None:
        if not received:  # a second signal must not interrupt the teardown the first began
            received.append(signum)
            task.cancel()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop, signum)
    try:
        return await task
    except asyncio.CancelledError:
        if not received:
            raise  # SIGINT (asyncio turns it into KeyboardInterrupt) or the caller's cancel
        sys.stderr.write(f"kavach: stopped by {signal.Signals(received[0]).name}; the sandbox was destroyed\n")
        return 128 + received[0]
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


async def _run_and_report(config: Any, command: list[str], stdin: bytes | None, as_json: bool) -> int:
    from kavach.lifecycle import Sandbox

    async with await Sandbox.create(config) as sandbox:
        try:
            result = await sandbox.exec(command, stdin=stdin)
        except ExternalizationBlocked as exc:
            # The findings (rule, line, redacted evidence) say what to look at; the output
            # itself never leaves. --json gets every finding, plain mode the worst few.
            if as_json:
                findings = [f.to_dict() for f in exc.findings]
                _emit_json({**_about(sandbox), "verdict": "block", "error": str(exc), "findings": findings})
                return EXIT_KAVACH_FAILED
            raise CliError(f"{exc}: {_worst(exc.findings)}", EXIT_KAVACH_FAILED) from None
        if as_json:
            _emit_json({**_about(sandbox), "verdict": result.verdict.value, "result": result.to_dict()})
        else:
            sys.stdout.buffer.write(result.stdout)
            sys.stdout.flush()
            sys.stderr.buffer.write(result.stderr)
            limits = config.policy.resources
            for stream, truncated, cap in (
                ("stdout", result.stdout_truncated, limits.stdout_cap),
                ("stderr", result.stderr_truncated, limits.stderr_cap),
            ):
                if truncated:
                    # The first bytes were kept and the rest dropped: say so, or a cut-off
                    # output would pass for the whole of it.
                    sys.stderr.write(
                        f"kavach: {stream} truncated: only its first {cap} bytes were kept ({stream}_cap)\n"
                    )
            for item in result.quarantine_ids:
                sys.stderr.write(f"kavach: output quarantined as {item} (see 'kavach quarantine show {item}')\n")
            if result.timed_out:
                sys.stderr.write(f"kavach: timed out ({result.reason or 'wall-clock timeout'})\n")
            elif result.reason:
                sys.stderr.write(f"kavach: command ended abnormally: {result.reason} (exit {result.exit_code})\n")
            sys.stderr.flush()
    return EXIT_TIMEOUT if result.timed_out else result.exit_code


def _about(sandbox: Sandbox) -> dict[str, Any]:
    """The sandbox fields of ``kavach run --json``'s object."""
    return {
        "sandbox_id": sandbox.id,
        "backend": sandbox.backend.value,
        "score": int(sandbox.score),
        "score_label": sandbox.score.label,
        "enforcement": sandbox.enforcement.to_dict(),
    }


def _worst(findings: Sequence[Finding], shown: int = 3) -> str:
    """``rule (severity, line N)`` of the most severe findings, for a one-line error."""
    ordered = sorted(findings, key=lambda f: (-int(f.severity), f.start))
    parts = [f"{f.rule} ({f.severity}, line {f.line})" for f in ordered[:shown]]
    more = len(ordered) - shown
    if more > 0:
        parts.append(f"{more} more (--json lists every finding)")
    return ", ".join(parts)


@app.command()
def backends(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List every backend: available here or not, why, version and base score."""
    from kavach.backends.registry import probe_all

    rows = [
        {
            "backend": r.backend.value,
            "available": r.usable,
            "implemented": r.implemented,
            "reason": r.reason,
            "version": r.version,
            "base_score": r.backend.base_score,
        }
        for r in probe_all()
    ]
    if as_json:
        _emit_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("backend", "available", "base", "version", "reason")
    for row in rows:
        table.add_row(
            str(row["backend"]),
            "yes" if row["available"] else "no",
            str(row["base_score"]),
            str(row["version"] or "-"),
            str(row["reason"]),
        )
    Console(width=160).print(table)


@app.command()
def score(
    backend: Annotated[str, typer.Option(help="Backend name.")],
    policy: Annotated[str, typer.Option(help="minimal, basic, strict or a policy file.")] = "basic",
    inner: Annotated[str | None, typer.Option(help="Inner backend of a composite.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the predicted score of a backend and policy, e.g. '68 (standard)'."""
    from kavach.scoring import score_backend

    outer = Backend.parse(backend)
    inner_backend = Backend.parse(inner) if inner else None
    try:
        value = score_backend(outer, load_policy(policy), inner_backend)
    except PolicyError as exc:
        if exc.field != "inner":
            raise
        raise PolicyError("--inner", exc.value, exc.reason) from None
    if as_json:
        _emit_json(
            {
                "backend": outer.value,
                "inner": inner,
                "policy": policy,
                "score": int(value),
                "label": value.label,
            }
        )
    else:
        typer.echo(str(value))


@policy_app.command("show")
def policy_show(
    spec: Annotated[str, typer.Argument(help="A preset name or a policy file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of TOML-like text.")] = False,
) -> None:
    """Print the complete policy (every field, defaults filled in)."""
    data = load_policy(spec).to_dict()
    if as_json:
        _emit_json(data)
        return
    import yaml

    typer.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


@policy_app.command("validate")
def policy_validate(
    path: Annotated[str, typer.Argument(help="A policy file (.toml, .yaml, .json).")],
) -> None:
    """Exit 0 if the policy file is valid; else print the field and the problem and exit 2."""
    SandboxPolicy.load(path)
    typer.echo(f"{path}: valid")


_SUBCOMMAND_MODULES = ("scan", "audit", "quarantine", "agents", "proxy", "cgroups")


def _register_subcommands() -> None:
    for name in _SUBCOMMAND_MODULES:
        module_name = f"kavach.cli.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(app)


_register_subcommands()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kavach`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app(args=args, prog_name="kavach", standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        sys.stderr.write("kavach: aborted\n")
        return 130
    except typer.TyperException as exc:  # usage errors: unknown option, missing argument ...
        sys.stderr.write(f"kavach: error: {exc.format_message()}\n")
        return EXIT_BAD_INPUT
    except CliError as exc:
        sys.stderr.write(f"kavach: error: {exc}\n")
        return exc.code
    except PolicyError as exc:
        sys.stderr.write(f"kavach: error: {exc}\n")
        return EXIT_BAD_INPUT
    except KavachError as exc:
        sys.stderr.write(f"kavach: error: {exc}\n")
        return EXIT_KAVACH_FAILED
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug, not bad input: one line, the traceback only on request
        if os.environ.get("KAVACH_DEBUG"):
            raise
        sys.stderr.write(f"kavach: internal error: {type(exc).__name__}: {exc} (KAVACH_DEBUG=1 shows the traceback)\n")
        return 1
    return result if isinstance(result, int) else 0


__all__ = ["EXIT_BAD_INPUT", "EXIT_KAVACH_FAILED", "EXIT_TIMEOUT", "app", "load_policy", "main"]
