"""Egress rules: which destinations the proxy may reach, and which addresses it never dials.

Two independent checks guard every connection, and both must pass:

1. **Names** (:class:`EgressRules`): the requested host (and port, and method) must match an
   allowlist entry and no denylist entry. Deny wins; an empty allowlist denies everything.
   IP literals match only an allowlist entry that spells the same address (wildcards never
   match an address).
2. **Addresses** (:class:`AddressGuard`): every address the name resolves to must be a public
   (globally routable) address, unless it falls inside a CIDR the operator listed in
   ``allow_private``. Loopback, link-local, private, CGNAT, multicast, reserved and cloud
   metadata addresses are refused otherwise, and so are IPv6 addresses that carry or reach an
   IPv4 address (6to4, Teredo, IPv4-compatible, IPv4-translated, local-use NAT64) or have
   no global scope (site-local); a NAT64 well-known-prefix address passes only if the IPv4
   address it carries is public. The proxy then connects to the exact address it
   checked (the connection is *pinned*), so a second DNS answer cannot redirect it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kavach.errors import PolicyError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Names that reach a cloud provider's instance metadata service. They are refused by name
# (before DNS) because a resolver may map them anywhere; their addresses below are refused too.
METADATA_HOSTNAMES = frozenset(
    {"metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal"}
)
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, DigitalOcean
        ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
        ipaddress.ip_address("fd00:ec2::254"),  # AWS IMDS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    }
)

_HOST_LABELS_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")
# Methods a rule may name. CONNECT and TRACE are never proxied as requests; other verbs
# (WebDAV ...) are rare enough that a typo ("exa mple.com") should fail rather than match.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class EgressDenied(Exception):
    """A request or connection is refused; ``reason`` is a short machine-readable phrase."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def parse_ip(host: str) -> IPAddress | None:
    """The address if ``host`` is an IP literal (``[v6]`` brackets allowed), else None."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return _unmap(address)


def _unmap(address: IPAddress) -> IPAddress:
    # ::ffff:127.0.0.1 is 127.0.0.1 on the wire; judge the IPv4 address it carries.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normalize_host(host: str) -> str:
    """Lower-case, strip one trailing dot and IPv6 brackets; raises ValueError on a bad name."""
    text = host.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.removesuffix(".")
    if not text:
        raise ValueError("empty host")
    if parse_ip(text) is not None:
        return str(parse_ip(text))
    if len(text) > 253 or not _HOST_LABELS_RE.match(text):
        raise ValueError("not a valid host name")
    return text


@dataclass(frozen=True)
class HostRule:
    """One allow/deny entry: ``[METHOD[,METHOD...] ]HOST[:PORT]``.

    ``HOST`` is a name, ``*.domain`` (any name *below* ``domain``, not ``domain`` itself) or an
    IP literal (IPv6 in brackets when a port follows). ``port`` None means any port;
    ``methods`` empty means any method.
    """

    host: str
    port: int | None = None
    methods: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, entry: str, field_name: str) -> HostRule:
        """Parse one entry, raising :class:`PolicyError` naming ``field_name`` on bad input."""
        text = entry.strip()
        methods: frozenset[str] = frozenset()
        if " " in text:
            method_text, _, text = text.partition(" ")
            names = [m.strip().upper() for m in method_text.split(",") if m.strip()]
            if not names or not all(m in KNOWN_METHODS for m in names):
                raise PolicyError(field_name, entry, f"methods must be among {','.join(sorted(KNOWN_METHODS))}")
            methods = frozenset(names)
            text = text.strip()
        host, port = _split_host_port(text, entry, field_name)
        wildcard = host.startswith("*.")
        try:
            name = normalize_host(host[2:] if wildcard else host)
        except ValueError as exc:
            raise PolicyError(field_name, entry, f"expected [METHODS ]HOST[:PORT]: {exc}") from None
        if wildcard and parse_ip(name) is not None:
            raise PolicyError(field_name, entry, "a wildcard cannot cover IP addresses")
        return cls(host=f"*.{name}" if wildcard else name, port=port, methods=methods)

    def matches_host(self, host: str, port: int) -> bool:
        """True if ``host`` (normalized) and ``port`` fall under this rule (methods not checked)."""
        if self.port is not None and self.port != port:
            return False
        if self.host.startswith("*."):
            suffix = self.host[1:]
            return parse_ip(host) is None and host.endswith(suffix) and len(host) > len(suffix)
        return host == self.host

    def allows_method(self, method: str) -> bool:
        """True if this rule places no method restriction or lists ``method``."""
        return not self.methods or method in self.methods

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        text = f"{host}:{self.port}" if self.port is not None else host
        return f"{','.join(sorted(self.methods))} {text}" if self.methods else text


def _split_host_port(text: str, entry: str, field_name: str) -> tuple[str, int | None]:
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise PolicyError(field_name, entry, "unclosed '[' in IPv6 address")
        host, rest = text[: close + 1], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise PolicyError(field_name, entry, "expected [V6]:PORT")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        # Zero colons: a name; two or more: a bare IPv6 address without a port.
        host, port_text = text, None
    if port_text is None:
        return host, None
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise PolicyError(field_name, entry, "port must be 1-65535")
    return host, int(port_text)


def parse_cidrs(entries: Iterable[str], field_name: str) -> tuple[IPNetwork, ...]:
    """Parse CIDRs (a bare address means a single host), raising PolicyError naming ``field_name``."""
    networks: list[IPNetwork] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise PolicyError(field_name, entry, "expected a CIDR such as 10.0.0.0/8 or fd00::/8") from None
    return tuple(networks)


class EgressRules:
    """The name check: allowlist with wildcards, ports and methods; deny wins."""

    def __init__(self, allow: Sequence[str], deny: Sequence[str]) -> None:
        self.allow = tuple(HostRule.parse(e, "proxy.allow") for e in allow)
        self.deny = tuple(HostRule.parse(e, "proxy.deny") for e in deny)

    def check_destination(self, host: str, port: int) -> None:
        """Refuse ``host:port`` unless some allow rule covers it and no deny rule does."""
        if host in METADATA_HOSTNAMES:
            raise EgressDenied("metadata host", host)
        for rule in self.deny:
            if rule.matches_host(host, port) and not rule.methods:
                raise EgressDenied("denylisted", f"{host}:{port} matches {rule}")
        if not self.allow:
            raise EgressDenied("allowlist empty", f"{host}:{port}")
        if not any(rule.matches_host(host, port) for rule in self.allow):
            raise EgressDenied("not allowlisted", f"{host}:{port}")

    def check_request(self, host: str, port: int, method: str) -> None:
        """Refuse one request: the destination check plus method restrictions on both lists."""
        self.check_destination(host, port)
        for rule in self.deny:
            if rule.methods and rule.matches_host(host, port) and method in rule.methods:
                raise EgressDenied("denylisted", f"{method} {host}:{port} matches {rule}")
        if not any(r.matches_host(host, port) and r.allows_method(method) for r in self.allow):
            raise EgressDenied("method not allowed", f"{method} {host}:{port}")

    def restricts_methods(self, host: str, port: int) -> bool:
        """True when a method restriction applies to ``host:port`` (so its HTTPS must be inspected)."""
        if any(r.methods and r.matches_host(host, port) for r in self.deny):
            return True
        matching = [r for r in self.allow if r.matches_host(host, port)]
        return bool(matching) and all(r.methods for r in matching)


# The NAT64 well-known prefix (RFC 6052): 64:ff9b::a.b.c.d is a.b.c.d, reached through the
# network's translator. DNS64 hands these out for every IPv4-only name on an IPv6-only host,
# so they are judged by the IPv4 address they carry instead of being refused outright.
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")

# IPv6 ranges that carry or reach an IPv4 address (or a network of unknown scope) by other
# means. Python 3.11's is_global accepts most of them, so a name resolving to 2002:7f00:1::
# or ::127.0.0.1 would otherwise pass as public. They are refused unless an allow_private
# CIDR covers the IPv6 address itself. Order matters: the last entry catches the rest of ::/8.
EMBEDDED_IPV4_NETWORKS: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (ipaddress.IPv6Network("64:ff9b:1::/48"), "local-use NAT64"),  # RFC 8215: a local translator
    (ipaddress.IPv6Network("2002::/16"), "6to4"),  # RFC 3056, deprecated by RFC 7526
    (ipaddress.IPv6Network("2001::/32"), "Teredo"),  # RFC 4380
    (ipaddress.IPv6Network("::/96"), "IPv4-compatible"),  # RFC 4291, deprecated
    (ipaddress.IPv6Network("::ffff:0:0:0/96"), "IPv4-translated"),  # RFC 2765 (SIIT)
    (ipaddress.IPv6Network("fec0::/10"), "site-local"),  # RFC 3879, deprecated, scope unknown
    (ipaddress.IPv6Network("::/8"), "reserved"),  # anything else in the IETF-reserved block
)


class AddressGuard:
    """The address check: only public addresses, plus the operator's ``allow_private`` CIDRs.

    IPv4-mapped IPv6 (``::ffff:a.b.c.d``) is judged as the IPv4 address, and the operator's
    IPv4 CIDRs apply to it (the kernel dials that very address). A NAT64 address
    (``64:ff9b::a.b.c.d``) passes only if ``a.b.c.d`` is public: an IPv4 ``allow_private``
    CIDR does not admit it, since the translator, not this host, would dial it. The other
    ranges in :data:`EMBEDDED_IPV4_NETWORKS` are refused unless an IPv6 CIDR covers them.
    """

    def __init__(self, allow_private: Sequence[IPNetwork]) -> None:
        self.allow_private = tuple(allow_private)

    def check(self, address: IPAddress) -> None:
        """Raise :class:`EgressDenied` unless ``address`` may be dialled."""
        address = _unmap(address)
        if any(address in net for net in self.allow_private if net.version == address.version):
            return
        if address in METADATA_ADDRESSES:
            raise EgressDenied("metadata address", str(address))
        if isinstance(address, ipaddress.IPv6Address):
            if address in NAT64_WELL_KNOWN:
                _check_public_ipv4(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), f"{address}, NAT64 of ")
                return
            for network, kind in EMBEDDED_IPV4_NETWORKS:
                if address in network:
                    raise EgressDenied("private address", f"{address} ({kind})")
        if not address.is_global or address.is_multicast:
            raise EgressDenied("private address", f"{address} ({_address_kind(address)})")


def _check_public_ipv4(address: ipaddress.IPv4Address, context: str) -> None:
    """Refuse an IPv4 address carried inside an IPv6 one unless it is public."""
    if address in METADATA_ADDRESSES:
        raise EgressDenied("metadata address", f"{context}{address}")
    if not address.is_global or address.is_multicast:
        raise EgressDenied("private address", f"{context}{address} ({_address_kind(address)})")


def _address_kind(address: IPAddress) -> str:
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return "not globally routable"


class Resolver:
    """Resolves names for the proxy. ``static_hosts`` (an /etc/hosts of the proxy's own)
    answers first, so tests and operators can map names without touching system files."""

    def __init__(self, static_hosts: Mapping[str, Sequence[str]] | None = None) -> None:
        self.static_hosts: dict[str, tuple[IPAddress, ...]] = {}
        for name, addresses in (static_hosts or {}).items():
            parsed = []
            for text in addresses:
                ip = parse_ip(text)
                if ip is None:
                    raise PolicyError("proxy.static_hosts", f"{name}={text}", "expected an IP address")
                parsed.append(ip)
            if not parsed:
                raise PolicyError("proxy.static_hosts", name, "needs at least one address")
            self.static_hosts[normalize_host(name)] = tuple(parsed)

    async def resolve(self, host: str, port: int) -> tuple[IPAddress, ...]:
        """Every address ``host`` resolves to (an IP literal resolves to itself)."""
        literal = parse_ip(host)
        if literal is not None:
            return (literal,)
        if host in self.static_hosts:
            return self.static_hosts[host]
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except socket.gaierror as exc:
            raise EgressDenied("dns failure", f"{host}: {exc.strerror}") from None
        result: dict[IPAddress, None] = {}
        for _family, _type, _proto, _canon, sockaddr in infos:
            result[_unmap(ipaddress.ip_address(sockaddr[0]))] = None
        if not result:
            raise EgressDenied("dns failure", f"{host}: no addresses")
        return tuple(result)


async def resolve_pinned(resolver: Resolver, guard: AddressGuard, host: str, port: int) -> IPAddress:
    """Resolve ``host`` and check *every* answer; return the address to connect to.

    All answers must pass, not just the first: a name that resolves to one public and one
    private address is refused, so that no retry or happy-eyeballs fallback can land on the
    private one.
    """
    addresses = await resolver.resolve(host, port)
    for address in addresses:
        guard.check(address)
    return addresses[0]


__all__ = [
    "EMBEDDED_IPV4_NETWORKS",
    "METADATA_ADDRESSES",
    "METADATA_HOSTNAMES",
    "NAT64_WELL_KNOWN",
    "AddressGuard",
    "EgressDenied",
    "EgressRules",
    "HostRule",
    "Resolver",
    "normalize_host",
    "parse_cidrs",
    "parse_ip",
    "resolve_pinned",
]
