"""Secrets: where their values come from, and how they reach a sandboxed process.

A :class:`SecretRef` names a secret and how to inject it (:func:`env`, :func:`file`,
:func:`stdin`). A :class:`CredentialStore` holds the values in memory, loaded from the
operator's environment variables or files. :func:`resolve_secrets` turns refs into what a
backend injects (env vars, tmpfs files, stdin bytes).

With the egress proxy, secrets bound to credential rules are resolved to *placeholders*
instead: the sandbox never holds the value, and the proxy substitutes it on the way out.

Values never appear in ``repr()``, log lines or exception messages: errors name the secret.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kavach.backends.base import InjectedFile
from kavach.errors import CredentialError
from kavach.policy import ENV_NAME_RE

_SECRET_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
MAX_SECRET_BYTES = 64 * 1024


@dataclass(frozen=True)
class EnvInjection:
    """Set the secret as environment variable ``var`` of the sandboxed process."""

    var: str


@dataclass(frozen=True)
class FileInjection:
    """Write the secret to ``path`` on a tmpfs inside the sandbox with ``mode``."""

    path: str
    mode: int = 0o400


@dataclass(frozen=True)
class StdinInjection:
    """Feed the secret (followed by a newline) on the command's standard input."""


Injection = EnvInjection | FileInjection | StdinInjection


def env(var: str) -> EnvInjection:
    """Inject as the environment variable ``var``."""
    if not ENV_NAME_RE.fullmatch(var):
        raise CredentialError(f"invalid environment variable name {var!r}")
    return EnvInjection(var)


def file(path: str, mode: int = 0o400) -> FileInjection:
    """Inject as a file at ``path`` (absolute, inside the sandbox, on a tmpfs) with ``mode``."""
    if not path.startswith("/") or "\0" in path or any(p == ".." for p in path.split("/")):
        raise CredentialError(f"secret file path must be absolute without '..': {path!r}")
    if not 0 <= mode <= 0o777:
        raise CredentialError(f"secret file mode out of range: {oct(mode)}")
    return FileInjection(path, mode)


def stdin() -> StdinInjection:
    """Inject on the command's standard input."""
    return StdinInjection()


@dataclass(frozen=True)
class SecretRef:
    """A named secret and how it is injected. Holds no value, so its repr is safe."""

    name: str
    inject_via: Injection

    def __post_init__(self) -> None:
        if not _SECRET_NAME_RE.match(self.name):
            raise CredentialError(f"invalid secret name {self.name!r}")


def _check_value(name: str, value: str) -> None:
    if not isinstance(value, str):
        raise CredentialError(f"secret {name}: value must be a string")
    if not value:
        raise CredentialError(f"secret {name}: value is empty")
    if len(value.encode("utf-8")) > MAX_SECRET_BYTES:
        raise CredentialError(f"secret {name}: value longer than {MAX_SECRET_BYTES} bytes")
    if "\0" in value:
        raise CredentialError(f"secret {name}: value contains NUL")


class CredentialStore:
    """Secret values held in memory by name. Never prints them."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"CredentialStore(names={sorted(self._values)!r})"

    def set(self, name: str, value: str) -> None:
        """Store ``value`` under ``name`` (replacing any previous value)."""
        if not _SECRET_NAME_RE.match(name):
            raise CredentialError(f"invalid secret name {name!r}")
        _check_value(name, value)
        self._values[name] = value

    def get(self, name: str) -> str:
        """The value of ``name``; :class:`CredentialError` naming the secret when it is missing."""
        try:
            return self._values[name]
        except KeyError:
            raise CredentialError(f"secret {name} is not in the credential store") from None

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def names(self) -> tuple[str, ...]:
        """The stored secret names (never values)."""
        return tuple(sorted(self._values))

    def values(self) -> tuple[str, ...]:
        """Every stored value, for redaction only (the gate's known secrets)."""
        return tuple(self._values.values())

    @classmethod
    def from_env(cls, mapping: Mapping[str, str], environ: Mapping[str, str] | None = None) -> CredentialStore:
        """Load ``secret name -> operator environment variable`` (``environ`` defaults to os.environ)."""
        import os

        source = os.environ if environ is None else environ
        store = cls()
        for name, var in mapping.items():
            if var not in source:
                raise CredentialError(f"secret {name}: environment variable {var} is not set")
            store.set(name, source[var])
        return store

    @classmethod
    def from_files(cls, mapping: Mapping[str, str | Path]) -> CredentialStore:
        """Load ``secret name -> file path`` (one trailing newline is stripped)."""
        store = cls()
        for name, path in mapping.items():
            try:
                raw = Path(path).read_bytes()
            except OSError as exc:
                raise CredentialError(f"secret {name}: cannot read {path} ({exc.strerror})") from None
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CredentialError(f"secret {name}: {path} is not UTF-8 text") from None
            store.set(name, text.removesuffix("\n").removesuffix("\r"))
        return store


@dataclass(frozen=True)
class ResolvedSecrets:
    """What a backend injects. ``values`` lists the real values given to the sandbox, for the
    gate's redaction; placeholders are not secrets and are not listed."""

    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    files: tuple[InjectedFile, ...] = field(default=(), repr=False)
    stdin: bytes | None = field(default=None, repr=False)
    values: tuple[str, ...] = field(default=(), repr=False)

    def __repr__(self) -> str:
        return (
            f"ResolvedSecrets(env={sorted(self.env)!r}, files={[f.path for f in self.files]!r}, "
            f"stdin={'set' if self.stdin is not None else None}, values=<{len(self.values)} hidden>)"
        )


def resolve_secrets(
    refs: Sequence[SecretRef], store: CredentialStore, placeholders: Mapping[str, str] | None = None
) -> ResolvedSecrets:
    """Resolve ``refs`` from ``store``.

    A secret named in ``placeholders`` (from :meth:`EgressProxy.placeholders`) is injected as
    its placeholder, so the sandbox never sees the value; it need not be in ``store``.
    Two refs writing the same variable or path, or two on stdin, are an error.
    """
    placeholders = placeholders or {}
    env_vars: dict[str, str] = {}
    files: dict[str, InjectedFile] = {}
    stdin_parts: list[str] = []
    values: list[str] = []
    for ref in refs:
        if ref.name in placeholders:
            value = placeholders[ref.name]
        else:
            value = store.get(ref.name)
            values.append(value)
        via = ref.inject_via
        if isinstance(via, EnvInjection):
            if via.var in env_vars:
                raise CredentialError(f"secret {ref.name}: variable {via.var} is injected twice")
            env_vars[via.var] = value
        elif isinstance(via, FileInjection):
            if via.path in files:
                raise CredentialError(f"secret {ref.name}: file {via.path} is injected twice")
            files[via.path] = InjectedFile(via.path, value.encode("utf-8"), via.mode)
        else:
            if stdin_parts:
                raise CredentialError(f"secret {ref.name}: only one secret can be injected on stdin")
            stdin_parts.append(value)
    return ResolvedSecrets(
        env=env_vars,
        files=tuple(files.values()),
        stdin=(stdin_parts[0] + "\n").encode("utf-8") if stdin_parts else None,
        values=tuple(dict.fromkeys(values)),
    )


__all__ = [
    "CredentialStore",
    "EnvInjection",
    "FileInjection",
    "Injection",
    "ResolvedSecrets",
    "SecretRef",
    "StdinInjection",
    "env",
    "file",
    "resolve_secrets",
    "stdin",
]
