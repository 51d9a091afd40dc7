"""``kavach proxy``: the egress proxy standalone, for any program.

It enforces the same rules as a sandbox's proxy (``--allow``, ``--deny``, ``--allow-private``,
``--credential``, ``--upstream-ca``) and writes its CA bundle to a file clients can trust
(``--ca-out``, kept; by default a fresh temporary file, removed when the proxy stops, since
the CA exists only for this run).
Credential values are read from the caller's environment and never printed; the proxy
prints only placeholders, which a client may send in place of a value.

Any local user can connect to a TCP port, so the proxy makes up a token for each run and
serves only clients that present it (``Proxy-Authorization: Basic`` for ``kavach:<token>``).
It prints its URL with the token in it, ``http://kavach:<token>@127.0.0.1:PORT``, which
curl, requests, pip and most other clients take as their proxy as it is. It listens on
loopback only, unless ``--allow-remote-clients`` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from kavach.credentials.options import parse_proxy_options
from kavach.credentials.proxy import PROXY_USER, EgressProxy
from kavach.credentials.rules import parse_ip
from kavach.errors import KavachError, PolicyError

EXIT_BAD_INPUT = 2


def _parse_listen(spec: str, allow_remote: bool = False) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    address = parse_ip(host or "")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535 or address is None:
        raise PolicyError("--listen", spec, "expected ADDRESS:PORT, e.g. 127.0.0.1:8080")
    if not address.is_loopback and not allow_remote:
        # Other hosts' clients would send the token in cleartext over the network, and reach
        # the operator's credentials with it: an explicit decision, not a typo's consequence.
        raise PolicyError("--listen", spec, "not a loopback address; add --allow-remote-clients to serve other hosts")
    return host.strip("[]"), int(port)


def _proxy_url(token: str, host: str, port: int) -> str:
    """The URL clients use as their proxy: the token rides in its userinfo."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{PROXY_USER}:{token}@{shown}:{port}"


async def _serve(
    proxy: EgressProxy, token: str, host: str, port: int, ca_out: Path | None, placeholders: dict[str, str]
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Ordering: the handlers come before anything the clean-up below must undo, and long
    # before "listening" is printed: a supervisor may send SIGTERM as soon as it reads that
    # line, and the default disposition would kill the process with the bundle left behind.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, stop.set)
    target = ca_out or _temporary_ca_path()
    try:
        bound_host, bound_port = await proxy.start_tcp(host, port)
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(proxy.ca_bundle_pem())
        lines = [
            f"kavach proxy: listening on {_proxy_url(token, bound_host, bound_port)}",
            f"kavach proxy: CA bundle {target}",
        ]
        lines += [f"kavach proxy: placeholder {name}={value}" for name, value in sorted(placeholders.items())]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await proxy.close()
        if ca_out is None:
            # Its CA dies with this process: a bundle left behind would name a CA that no
            # longer exists.
            with contextlib.suppress(FileNotFoundError):
                target.unlink()


def _temporary_ca_path() -> Path:
    """A new file for the CA bundle in the temporary directory, created exclusively.

    mkstemp's random name and O_EXCL mean nothing planted in a shared /tmp (a symlink at a
    name derived from the pid, say) is ever opened or truncated in its place.
    """
    descriptor, name = tempfile.mkstemp(prefix="kavach-proxy-", suffix="-ca.pem")
    try:
        # Certificates only (never a key), and clients may run as other users.
        os.fchmod(descriptor, 0o644)
    finally:
        os.close(descriptor)
    return Path(name)


# The egress-rule options, shared with `kavach run` so both commands read the same flags.
AllowOption = Annotated[
    list[str] | None, typer.Option("--allow", help="[METHODS ]HOST[:PORT] that may be reached (repeatable).")
]
DenyOption = Annotated[list[str] | None, typer.Option("--deny", help="HOST[:PORT] refused even if allowed.")]
AllowPrivateOption = Annotated[
    list[str] | None, typer.Option("--allow-private", help="CIDR of private/loopback destinations to permit.")
]
CredentialOption = Annotated[
    list[str] | None,
    typer.Option(
        "--credential",
        help="HOST=HEADER:ENVVAR: inject HEADER with the value of $ENVVAR into HTTPS requests to HOST. "
        "Written http://HOST=HEADER:ENVVAR, plain-HTTP requests get it too, in cleartext.",
    ),
]
UpstreamCaOption = Annotated[
    str | None, typer.Option("--upstream-ca", help="Extra PEM CA trusted for upstream servers.")
]
ResolveOption = Annotated[
    list[str] | None, typer.Option("--resolve", help="NAME=ADDRESS answered before DNS (repeatable).")
]


def proxy_command(
    listen: Annotated[
        str,
        typer.Option(
            help="ADDRESS:PORT to listen on (port 0 picks one); a loopback address unless --allow-remote-clients."
        ),
    ] = "127.0.0.1:8080",
    allow: AllowOption = None,
    deny: DenyOption = None,
    allow_private: AllowPrivateOption = None,
    credential: CredentialOption = None,
    upstream_ca: UpstreamCaOption = None,
    resolve: ResolveOption = None,
    ca_out: Annotated[
        Path | None,
        typer.Option(
            "--ca-out", help="Write the CA bundle clients must trust here (default: a temporary file, removed on exit)."
        ),
    ] = None,
    audit_log: Annotated[
        Path | None, typer.Option("--audit-log", help="Audit chain file (default: kavach's audit log).")
    ] = None,
    no_audit: Annotated[bool, typer.Option("--no-audit", help="Do not write audit entries.")] = False,
    allow_remote_clients: Annotated[
        bool,
        typer.Option(
            "--allow-remote-clients",
            help="Allow --listen on a non-loopback address (clients still need the token, sent in cleartext).",
        ),
    ] = False,
) -> None:
    """Run the egress proxy standalone until interrupted.

    It prints the proxy URL, which carries a token made up for this run
    (http://kavach:TOKEN@127.0.0.1:PORT): requests without it get 407.
    """
    try:
        options = parse_proxy_options(
            allow=allow or (),
            deny=deny or (),
            allow_private=allow_private or (),
            credentials=credential or (),
            upstream_ca=upstream_ca,
            resolve=resolve or (),
        )
        host, port = _parse_listen(listen, allow_remote_clients)
        config = options.config
        audit: Any | None = None
        if not no_audit:
            from kavach.audit import open_audit_log

            audit = open_audit_log(audit_log)
        token = secrets.token_hex(16)
        proxy = EgressProxy(config, options.store, sandbox_id=f"proxy-{os.getpid()}", audit=audit, client_token=token)
        try:
            asyncio.run(_serve(proxy, token, host, port, ca_out, dict(proxy.placeholders())))
        finally:
            if audit is not None:
                audit.close()
    except (KavachError, OSError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        typer.echo(f"kavach: error: {message}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.flush()


def register(app: typer.Typer) -> None:
    """Add ``kavach proxy`` to the ``kavach`` command."""
    app.command("proxy")(proxy_command)


__all__ = ["proxy_command", "register"]
