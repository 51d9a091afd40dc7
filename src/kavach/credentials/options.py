"""Command-line proxy options (``--allow``, ``--deny``, ``--allow-private``, ``--credential``,
``--upstream-ca``) turned into a :class:`ProxyConfig`, a :class:`CredentialStore` and the
secret refs that give the sandbox placeholders. Shared by ``kavach run`` and ``kavach proxy``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kavach.credentials.proxy import CredentialRule, ProxyConfig
from kavach.credentials.rules import HostRule, normalize_host, parse_cidrs, parse_ip
from kavach.credentials.secrets import CredentialStore, SecretRef, env
from kavach.credentials.tls import load_ca_file
from kavach.errors import CredentialError, PolicyError

_HEADER_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class ProxyOptions:
    """Parsed proxy flags.

    ``secret_refs`` holds one ``SecretRef(ENVVAR, env(ENVVAR))`` per distinct ``--credential``
    variable: resolved with the proxy's placeholders, the sandbox's ``ENVVAR`` holds a
    placeholder, never the value.
    """

    config: ProxyConfig
    store: CredentialStore = field(repr=False)
    secret_refs: tuple[SecretRef, ...] = ()


def parse_credential(spec: str) -> CredentialRule:
    """Parse ``[http://]HOST[:PORT]=HEADER:ENVVAR``; PolicyError naming ``--credential`` on bad input.

    Without a scheme the credential goes only into HTTPS requests; ``http://`` lets plain
    HTTP requests to HOST carry it as well (in cleartext), and is the only scheme accepted.
    """
    host, sep, rest = spec.partition("=")
    header, sep2, var = rest.partition(":")
    if not sep or not sep2 or not host or not header or not var:
        raise PolicyError("--credential", spec, "expected [http://]HOST=HEADER:ENVVAR")
    scheme, has_scheme, bare_host = host.strip().rpartition("://")
    if has_scheme and scheme.lower() != "http":
        raise PolicyError("--credential", spec, "the only scheme a host takes is http:// (HTTPS is the default)")
    host = bare_host
    HostRule.parse(host, "--credential")
    if not _HEADER_RE.match(header):
        raise PolicyError("--credential", spec, f"{header!r} is not a valid header name")
    if not _ENV_RE.match(var):
        raise PolicyError("--credential", spec, f"{var!r} is not a valid environment variable name")
    return CredentialRule(host=host.strip(), header=header, secret=var, plain_http=bool(has_scheme))


def parse_resolve(specs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Parse ``NAME=ADDRESS`` entries; PolicyError naming ``--resolve`` on bad input."""
    pairs = []
    for spec in specs:
        name, sep, address = spec.partition("=")
        try:
            normalize_host(name)
        except ValueError:
            raise PolicyError("--resolve", spec, "expected NAME=ADDRESS") from None
        if not sep or parse_ip(address) is None:
            raise PolicyError("--resolve", spec, "expected NAME=ADDRESS")
        pairs.append((name, address))
    return tuple(pairs)


def parse_proxy_options(
    *,
    allow: Sequence[str] = (),
    deny: Sequence[str] = (),
    allow_private: Sequence[str] = (),
    credentials: Sequence[str] = (),
    upstream_ca: str | None = None,
    resolve: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> ProxyOptions:
    """Turn the proxy flags into config objects, raising :class:`PolicyError` naming the flag.

    ``--credential api.example.com=Authorization:API_TOKEN`` reads ``API_TOKEN`` from
    ``environ`` (default ``os.environ``) into the store as secret ``API_TOKEN``; the value is
    never part of any message. It is injected into HTTPS requests only, unless the host is
    written ``http://api.example.com`` (plain HTTP allowed too). Hosts named by
    ``--credential`` must still be allowed by ``--allow`` to be reachable.
    ``--resolve NAME=ADDRESS`` answers NAME before DNS (the address still has to pass the
    private-address check).
    """
    source = os.environ if environ is None else environ
    for entry in allow:
        HostRule.parse(entry, "--allow")
    for entry in deny:
        HostRule.parse(entry, "--deny")
    parse_cidrs(allow_private, "--allow-private")
    rules = tuple(parse_credential(spec) for spec in credentials)
    store = CredentialStore()
    refs: dict[str, SecretRef] = {}
    for spec, rule in zip(credentials, rules, strict=True):
        if rule.secret not in source:
            raise PolicyError("--credential", spec, f"environment variable {rule.secret} is not set")
        try:
            store.set(rule.secret, source[rule.secret])
        except CredentialError as exc:
            raise PolicyError("--credential", spec, str(exc)) from None
        refs.setdefault(rule.secret, SecretRef(rule.secret, env(rule.secret)))
    if upstream_ca is not None:
        try:
            load_ca_file(upstream_ca)
        except CredentialError as exc:
            raise PolicyError("--upstream-ca", upstream_ca, str(exc)) from None
    config = ProxyConfig(
        allow=tuple(allow),
        deny=tuple(deny),
        allow_private=tuple(allow_private),
        credentials=rules,
        upstream_ca=upstream_ca,
        static_hosts=parse_resolve(resolve),
    )
    return ProxyOptions(config=config, store=store, secret_refs=tuple(refs.values()))


__all__ = ["ProxyOptions", "parse_credential", "parse_proxy_options", "parse_resolve"]
