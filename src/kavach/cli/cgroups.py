"""``kavach cgroups``: let a non-root user's sandboxes have cgroup limits on a cgroup v1 host.

cgroup v1 has no delegation of its own: only root may create cgroups, so an unprivileged
caller's Process and OCI (rootless runc) sandboxes could not have their memory, pids and CPU
limits (creation fails closed, or runs degraded with ``allow_degraded``). ``delegate`` gives one
user a subtree (``/sys/fs/cgroup/<hierarchy>/kavach-users/<uid>`` in every v1 hierarchy) for
its sandboxes; ``undelegate`` takes it back. On a cgroup v2 host, delegate with systemd (``Delegate=yes``) instead.
"""

from __future__ import annotations

import pwd
from typing import Annotated

import typer

from kavach.cli.audit import fail
from kavach.errors import KavachError

cgroups_app = typer.Typer(help="Delegate cgroup v1 subtrees to users (root only).", no_args_is_help=True)

UserArgument = Annotated[str, typer.Argument(metavar="USER", help="A user name or numeric uid.")]


def _user(spec: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(spec)) if spec.isascii() and spec.isdigit() else pwd.getpwnam(spec)
    except KeyError:
        raise fail(f"USER: no such user {spec!r}") from None


@cgroups_app.command("delegate")
def delegate_command(user: UserArgument) -> None:
    """Give USER a cgroup v1 subtree, so its Process and OCI sandboxes get their memory, pids and CPU limits."""
    from kavach.backends.process.cgroups import delegate_v1

    entry = _user(user)
    try:
        made = delegate_v1(entry.pw_uid, entry.pw_gid)
    except KavachError as exc:
        raise fail(str(exc)) from None
    for directory in made:
        typer.echo(f"delegated {directory} to {entry.pw_name} ({entry.pw_uid}:{entry.pw_gid})")


@cgroups_app.command("undelegate")
def undelegate_command(user: UserArgument) -> None:
    """Remove USER's cgroup v1 subtree (refused while one of its sandboxes exists)."""
    from kavach.backends.process.cgroups import undelegate_v1

    entry = _user(user)
    try:
        removed = undelegate_v1(entry.pw_uid)
    except KavachError as exc:
        raise fail(str(exc)) from None
    for directory in removed:
        typer.echo(f"removed {directory}")
    if not removed:
        typer.echo(f"nothing was delegated to {entry.pw_name}")


def register(app: typer.Typer) -> None:
    """Add ``kavach cgroups delegate|undelegate`` to the CLI."""
    app.add_typer(cgroups_app, name="cgroups")
