"""The egress proxy: the only way out of a sandbox with network mode ``proxy``.

One :class:`EgressProxy` serves one sandbox (its identity is ``sandbox_id`` in every audit
entry). It speaks HTTP/1.1 proxy protocol on a listening socket that the backend created
inside the sandbox's network namespace:

* **Plain HTTP** (absolute-form ``GET http://host:port/path``): every request on a keep-alive
  connection is checked against the rules, rewritten to origin-form, stripped of hop-by-hop
  headers, and relayed with its body (length or chunked). A request that would carry a
  credential (a rule's header or a substituted placeholder) is refused, unless the rule opts
  in with ``plain_http``: in cleartext, anyone on the path (or a forged DNS answer) gets it.
* **CONNECT host:port**: refused unless allowed. A host with a credential rule (or a method
  restriction) is *intercepted*: the proxy answers the TLS handshake with a leaf certificate
  from the per-sandbox CA, requires SNI and every ``Host`` to name the CONNECT target, and
  proxies the inner HTTP/1.1 requests exactly like plain ones over a verified TLS connection
  upstream. Any other allowed host is tunnelled byte for byte.

Before any connection the destination name is checked (:class:`EgressRules`), resolved, and
every address checked (:class:`AddressGuard`); the proxy dials the checked address itself.

Placeholders: each secret bound to a credential rule gets a random placeholder. The sandbox
only ever holds placeholders. A placeholder in a request to a host the secret is bound to is
replaced by the value; in a request to any other host it is refused (403 + reason header).

Clients: the in-sandbox proxy serves only the sandbox (its socket lives in the sandbox's
network namespace). A proxy on a shared host (``kavach proxy``) is given a ``client_token``
and then answers ``407`` to any request without ``Proxy-Authorization: Basic`` for
``kavach:<token>``. Connections are bounded per proxy (``max_connections``) and per process
(from ``RLIMIT_NOFILE``, see :func:`connection_budget`), and a client that stops reading is
dropped after ``idle_timeout``.

Every decision is audited with the method, host, port, path, reason and the *names* of the
credentials injected; values never reach the audit log, log lines or exceptions.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import inspect
import logging
import re
import resource
import secrets
import socket
import ssl
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kavach.credentials.http import (
    MAX_HEAD_BYTES,
    NO_BODY,
    Framing,
    Headers,
    HttpError,
    RequestHead,
    ResponseHead,
    parse_request_head,
    parse_response_head,
    read_head,
    relay_body,
    request_framing,
    response_framing,
    serialize_head,
    set_framing,
)
from kavach.credentials.rules import (
    AddressGuard,
    EgressDenied,
    EgressRules,
    HostRule,
    IPAddress,
    Resolver,
    normalize_host,
    parse_cidrs,
    parse_ip,
    resolve_pinned,
)
from kavach.credentials.secrets import CredentialStore
from kavach.credentials.tls import CertificateAuthority, load_ca_file, system_ca_pem, upstream_context
from kavach.errors import CredentialError, KavachError, PolicyError

log = logging.getLogger("kavach.proxy")

PLACEHOLDER_PREFIX = "KAVACH_PLACEHOLDER_"
_PLACEHOLDER_RE = re.compile(PLACEHOLDER_PREFIX + r"[0-9a-f]{32}")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEADER_VALUE_BAD_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET_SAFE_RE = re.compile(r"^[\x21-\x7e]*$")
_CLIENT_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~-]{16,256}$")
REASON_HEADER = "X-Kavach-Reason"
PROXY_USER = "kavach"  # the user name clients put before the token in the proxy URL
STREAM_LIMIT = MAX_HEAD_BYTES + 1024
TUNNEL_COPY = 64 * 1024
SMALL_BODY = 64 * 1024  # bodies up to this size are read whole and sent with their head
# Each connection holds its client's socket and at most one upstream socket at a time.
FDS_PER_CONNECTION = 2
FD_HEADROOM = 64  # descriptors always left to the rest of the process, at the least
REFUSAL_AUDIT_INTERVAL = 1.0  # seconds: a connection flood gives one audit entry per interval

_PHRASES = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(frozen=True)
class CredentialRule:
    """Inject header ``header`` with the value of secret ``secret`` into requests to ``host``.

    ``host`` is ``HOST[:PORT]`` or ``*.DOMAIN[:PORT]``; a client header of the same name is
    replaced, never duplicated. The secret is named, its value lives in the CredentialStore.

    Only intercepted HTTPS requests (upstream certificate verified) get the credential: a
    plain-HTTP request to ``host`` is refused rather than sent in cleartext. ``plain_http``
    allows plain HTTP as well, for a host reached over a network the operator trusts.
    """

    host: str
    header: str
    secret: str
    plain_http: bool = False


@dataclass(frozen=True)
class ProxyConfig:
    """What one egress proxy allows.

    ``allow``/``deny``: ``[METHODS ]HOST[:PORT]`` entries (see :class:`HostRule`); deny wins,
    empty ``allow`` refuses everything. ``allow_private``: CIDRs that may be dialled although
    not public (loopback, RFC 1918, link-local, metadata ...). ``upstream_ca``: a PEM file
    trusted for upstream certificates in addition to the system store. ``static_hosts``:
    ``(name, address)`` pairs answered before DNS (an /etc/hosts of the proxy's own).
    ``idle_timeout`` bounds every wait on a peer, sends included: a client that stops reading
    is dropped. ``max_connections`` caps this proxy's connections; the process-wide budget
    from ``RLIMIT_NOFILE`` (:func:`connection_budget`) may cap them lower.
    """

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    allow_private: tuple[str, ...] = ()
    credentials: tuple[CredentialRule, ...] = ()
    upstream_ca: str | None = None
    static_hosts: tuple[tuple[str, str], ...] = ()
    connect_timeout: float = 10.0
    idle_timeout: float = 120.0
    max_connections: int = 1024


def connection_budget(soft_limit: int) -> int:
    """How many connections all the proxies of one process may hold with ``soft_limit`` (the
    soft ``RLIMIT_NOFILE``) file descriptors.

    A quarter of the descriptors (at least :data:`FD_HEADROOM`) stay free for the rest of the
    process (audit log, listeners, DNS lookups, sandboxes' pipes); each connection is charged
    :data:`FDS_PER_CONNECTION` (its client socket and its upstream socket).
    """
    if soft_limit == resource.RLIM_INFINITY or soft_limit > 1 << 20:
        soft_limit = 1 << 20
    usable = soft_limit - max(FD_HEADROOM, soft_limit // 4)
    return max(0, usable // FDS_PER_CONNECTION)


class _ConnectionBudget:
    """Connections held by every proxy of this process. Shared because the descriptor limit
    is per process, and one process serves one proxy per sandbox."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # proxies may run on event loops in several threads
        self.active = 0

    def try_acquire(self) -> bool:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # read each time: it may be raised
        with self._lock:
            if self.active >= connection_budget(soft):
                return False
            self.active += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.active -= 1


_BUDGET = _ConnectionBudget()


@dataclass(frozen=True)
class _Binding:
    """A loaded credential rule."""

    rule: HostRule
    header: str
    secret: str
    plain_http: bool


@dataclass
class _Upstream:
    key: tuple[str, str, int]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    used: bool = False

    def close(self) -> None:
        _discard(self.writer)


@dataclass
class _Decision:
    """One request's audit record (never any value)."""

    method: str
    scheme: str
    host: str
    port: int
    path: str
    intercepted: bool = False
    credentials: list[dict[str, str]] = field(default_factory=list)
    placeholders: list[str] = field(default_factory=list)
    placeholder_refused: str | None = None
    withheld: list[dict[str, str]] = field(default_factory=list)

    def payload(self, decision: str, reason: str | None = None, status: int | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "decision": decision,
            "method": self.method,
            "scheme": self.scheme,
            "host": self.host,
            "port": self.port,
            "path": self.path,
        }
        if self.intercepted:
            data["intercepted"] = True
        if reason is not None:
            data["reason"] = reason
        if status is not None:
            data["status"] = status
        if self.credentials:
            # Key names avoid the audit log's secret-like keys ("secret", "credential", "token"),
            # which it would redact; these hold header and secret *names*, never values.
            data["injected"] = self.credentials
        if self.placeholders:
            data["placeholders"] = self.placeholders
        if self.placeholder_refused is not None:
            data["placeholder_of"] = self.placeholder_refused
        if self.withheld:
            data["withheld"] = self.withheld
        return data


class _ClientGone(Exception):
    """The client closed or broke its connection; nothing more can be sent to it."""


class EgressProxy:
    """Per-sandbox HTTP/HTTPS egress proxy with allowlist, address pinning and credential injection.

    ``client_token``: when given, every request on a client connection (each plain request,
    each CONNECT) must carry ``Proxy-Authorization: Basic`` for ``kavach:<client_token>``.
    None (the default) serves any client that can reach the listener, which suits the
    in-sandbox proxy, whose socket only the sandbox can reach.
    """

    def __init__(
        self,
        config: ProxyConfig,
        store: CredentialStore,
        *,
        sandbox_id: str,
        audit: Any | None = None,
        agent_id: str | None = None,
        client_token: str | None = None,
    ) -> None:
        self.config = config
        self.sandbox_id = sandbox_id
        self.agent_id = agent_id
        self._audit_log = audit
        self._rules = EgressRules(config.allow, config.deny)
        self._guard = AddressGuard(parse_cidrs(config.allow_private, "proxy.allow_private"))
        static: dict[str, list[str]] = {}
        for name, address in config.static_hosts:
            static.setdefault(name, []).append(address)
        self._resolver = Resolver(static)
        self._bindings = self._load_credential_rules(config.credentials, store)
        self._values = {b.secret: store.get(b.secret) for b in self._bindings}
        self._placeholders = {name: PLACEHOLDER_PREFIX + secrets.token_hex(16) for name in self._values}
        self._placeholder_secret = {p: name for name, p in self._placeholders.items()}
        self._upstream_ca_pem = load_ca_file(config.upstream_ca) if config.upstream_ca else None
        self._upstream_tls = upstream_context(self._upstream_ca_pem)
        self._ca = CertificateAuthority(f"kavach sandbox {sandbox_id}")
        self._sni: weakref.WeakKeyDictionary[ssl.SSLObject, str | None] = weakref.WeakKeyDictionary()
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        self._client_auth = _client_auth(client_token)
        self._refused_unaudited = 0
        self._last_refusal_audit = float("-inf")

    def __repr__(self) -> str:
        return f"<EgressProxy sandbox={self.sandbox_id} allow={list(self.config.allow)!r}>"

    @staticmethod
    def _load_credential_rules(rules: Sequence[CredentialRule], store: CredentialStore) -> tuple[_Binding, ...]:
        loaded = []
        for rule in rules:
            if "://" in rule.host:
                raise PolicyError(
                    "proxy.credentials", rule.host, "a host takes no scheme (plain_http=True allows http)"
                )
            host_rule = HostRule.parse(rule.host, "proxy.credentials")
            if host_rule.methods:
                raise PolicyError("proxy.credentials", rule.host, "a credential rule takes no methods")
            if not _HEADER_NAME_RE.match(rule.header):
                raise PolicyError("proxy.credentials", rule.header, "not a valid header name")
            if rule.header.lower() in ("host", "content-length", "transfer-encoding", "connection"):
                raise PolicyError("proxy.credentials", rule.header, "this header cannot carry a credential")
            value = store.get(rule.secret)
            if _HEADER_VALUE_BAD_RE.search(value) or value != value.strip(" \t"):
                raise CredentialError(
                    f"secret {rule.secret}: value cannot be sent in a header "
                    "(control characters or surrounding whitespace)"
                )
            if not _is_latin1(value):
                # Heads go out as latin-1: such a value would fail at send time, per request.
                raise CredentialError(f"secret {rule.secret}: value cannot be sent in a header (not latin-1 text)")
            loaded.append(_Binding(host_rule, rule.header, rule.secret, rule.plain_http))
        return tuple(loaded)

    # -- what the sandbox is given ---------------------------------------------------------------

    def placeholders(self) -> Mapping[str, str]:
        """Secret name -> the placeholder the sandbox holds instead of the value."""
        return dict(self._placeholders)

    def secret_values(self) -> tuple[str, ...]:
        """The values this proxy injects, for the gate's redaction only: an upstream that echoes
        a header back (or a misbehaving one) can hand the value to the sandbox in a response."""
        return tuple(self._values.values())

    def sandbox_env(self, proxy_url: str, ca_path: str) -> dict[str, str]:
        """Environment that points common clients at the proxy and at the CA bundle."""
        environment: dict[str, str] = {}
        # curl honours only lower-case http_proxy; other tools read upper case. Set both.
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            environment[name] = environment[name.lower()] = proxy_url
        environment["NO_PROXY"] = environment["no_proxy"] = "localhost,127.0.0.1,::1"
        for name in (
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "NODE_EXTRA_CA_CERTS",
            "CURL_CA_BUNDLE",
            "PIP_CERT",
            "GIT_SSL_CAINFO",
            "AWS_CA_BUNDLE",
        ):
            environment[name] = ca_path
        return environment

    def ca_certificate_pem(self) -> bytes:
        """Just the per-sandbox CA certificate (PEM)."""
        return self._ca.certificate_pem

    def ca_bundle_pem(self) -> bytes:
        """The per-sandbox CA, then the system roots (tunnelled hosts are verified by the client
        itself), then the operator's ``upstream_ca`` if any."""
        parts = [self._ca.certificate_pem, system_ca_pem()]
        if self._upstream_ca_pem:
            parts.append(self._upstream_ca_pem)
        return b"\n".join(p.strip() + b"\n" for p in parts if p.strip())

    # -- serving -------------------------------------------------------------------------------

    async def serve(self, listener: socket.socket) -> None:
        """Serve on ``listener`` (already bound and listening) until :meth:`close`."""
        listener.setblocking(False)
        server = await asyncio.start_server(self._on_client, sock=listener, limit=STREAM_LIMIT)
        self._servers.append(server)
        await self._closed.wait()

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on ``host:port`` in the background (standalone mode); returns the bound address."""
        server = await asyncio.start_server(self._on_client, host, port, limit=STREAM_LIMIT, backlog=1024)
        self._servers.append(server)
        address = server.sockets[0].getsockname()
        return str(address[0]), int(address[1])

    async def close(self) -> None:
        """Stop listening and close every connection. Idempotent."""
        self._closed.set()
        for server in self._servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.config.max_connections:
            await self._refuse_connection(writer, "connection limit of this proxy")
            return
        if not _BUDGET.try_acquire():
            await self._refuse_connection(writer, "file descriptor budget of this process")
            return
        self._connections.add(task)
        try:
            await self._serve_client(reader, writer)
        except (_ClientGone, ConnectionError, TimeoutError, ssl.SSLError):
            pass  # the client went away or idled out; its decisions are already audited
        except asyncio.CancelledError:
            # close() ends connections by cancelling them; asyncio's stream machinery would
            # log each such task as failing. Any other cancellation goes on.
            if not self._closed.is_set():
                raise
        finally:
            self._connections.discard(task)
            try:
                await self._close_client(writer)
            finally:
                _BUDGET.release()

    async def _refuse_connection(self, writer: asyncio.StreamWriter, reason: str) -> None:
        """Answer 503 and close; audit at most one entry per interval, with the count, so a
        flood of connections cannot turn into a flood of audit appends."""
        # A fresh socket takes this short answer at once, so close() does not wait on it.
        writer.write(_error_response(503, "too many connections", ""))
        writer.close()
        self._refused_unaudited += 1
        now = asyncio.get_running_loop().time()
        if now - self._last_refusal_audit < REFUSAL_AUDIT_INTERVAL:
            return
        count, self._refused_unaudited = self._refused_unaudited, 0
        self._last_refusal_audit = now
        log.warning("proxy %s refused %d connection(s): %s", self.sandbox_id, count, reason)
        await self._audit("proxy.connection", {"decision": "refused", "reason": reason, "status": 503, "count": count})

    async def _close_client(self, writer: asyncio.StreamWriter) -> None:
        """Close a client connection, waiting at most ``idle_timeout`` for unsent data to go.

        A plain close() keeps the socket until its buffer is flushed, which a client that
        stopped reading would put off forever; after the wait, the rest is discarded.
        """
        writer.close()
        if self._closed.is_set():
            writer.transport.abort()  # the proxy is stopping: nothing more is owed to anyone
            return
        try:
            async with asyncio.timeout(self.config.idle_timeout):
                await writer.wait_closed()
        except (TimeoutError, ConnectionError, OSError, ssl.SSLError):
            writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
            raise

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Write ``data`` to the client. A client that does not take it within ``idle_timeout``
        is dropped: it would otherwise hold its two sockets for as long as it liked."""
        try:
            writer.write(data)
            async with asyncio.timeout(self.config.idle_timeout):
                await writer.drain()
        except TimeoutError:
            writer.transport.abort()
            raise _ClientGone() from None
        except (ConnectionError, OSError) as exc:
            raise _ClientGone() from exc

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: _Upstream | None = None
        try:
            while True:
                request = await self._read_request(reader, writer, "http")
                if request is None:
                    return
                if not await self._authenticate(request, writer):
                    return
                if request.method == "CONNECT":
                    await self._connect(request, reader, writer)
                    return
                try:
                    host, port, path = _absolute_http_target(request.target)
                except HttpError as exc:
                    await self._refuse_malformed(writer, exc, request)
                    return
                keep, upstream = await self._proxy_request(
                    request, reader, writer, "http", host, port, path, upstream, intercepted=False
                )
                if not keep:
                    return
        finally:
            if upstream is not None:
                upstream.close()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, scheme: str
    ) -> RequestHead | None:
        try:
            async with asyncio.timeout(self.config.idle_timeout):
                head = await read_head(reader, 400)
            if head is None:
                return None
            return parse_request_head(head)
        except HttpError as exc:
            await self._refuse_malformed(writer, exc, None, scheme)
            return None

    async def _authenticate(self, request: RequestHead, writer: asyncio.StreamWriter) -> bool:
        """True if the request may be served; otherwise a 407 was sent and audited."""
        reason = self._client_refusal(request)
        if reason is None:
            return True
        payload = {"decision": "denied", "reason": reason, "status": 407, "method": request.method}
        await self._audit("proxy.auth", payload)
        challenge = (("Proxy-Authenticate", f'Basic realm="{PROXY_USER}"'),)
        await self._send(writer, _error_response(407, "proxy authentication required", "", challenge))
        return False

    def _client_refusal(self, request: RequestHead) -> str | None:
        """None if no client token is required or ``request`` carries it; else why it is refused."""
        if self._client_auth is None:
            return None
        values = request.headers.get_all("proxy-authorization")
        if not values:
            return "proxy authentication missing"
        scheme, _, encoded = values[0].partition(" ")
        try:
            presented = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            presented = b""
        # compare_digest: the time taken must not tell a client how much of its guess was right.
        matches = hmac.compare_digest(presented, self._client_auth)
        if len(values) != 1 or scheme.lower() != "basic" or not matches:
            return "proxy authentication failed"
        return None

    async def _refuse_malformed(
        self, writer: asyncio.StreamWriter, exc: HttpError, request: RequestHead | None, scheme: str = "http"
    ) -> None:
        payload: dict[str, Any] = {"decision": "malformed", "reason": exc.reason, "status": exc.status}
        payload["scheme"] = scheme
        if request is not None:
            payload["method"] = request.method
        await self._audit("proxy.malformed", payload)
        await self._send(writer, _error_response(exc.status, "malformed request", exc.reason))

    # -- CONNECT ---------------------------------------------------------------------------------

    async def _connect(self, request: RequestHead, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            host, port = _authority(request.target, None)
        except HttpError as exc:
            await self._refuse_malformed(writer, exc, request)
            return
        decision = _Decision("CONNECT", "https", host, port, "")
        try:
            self._rules.check_destination(host, port)
            intercept = self._has_credentials(host, port) or self._rules.restricts_methods(host, port)
            address = await resolve_pinned(self._resolver, self._guard, host, port)
        except EgressDenied as exc:
            await self._audit("proxy.connect", decision.payload("denied", exc.reason, 403))
            await self._send(writer, _error_response(403, exc.reason, exc.detail))
            return
        if intercept:
            if not await self._audit("proxy.connect", {**decision.payload("allowed"), "mode": "intercept"}):
                await self._send(writer, _error_response(503, "audit unavailable", ""))
                return
            await self._intercept(reader, writer, host, port, address)
        else:
            await self._tunnel(writer, reader, decision, address)

    async def _tunnel(
        self,
        writer: asyncio.StreamWriter,
        reader: asyncio.StreamReader,
        decision: _Decision,
        address: IPAddress,
    ) -> None:
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                up_reader, up_writer = await asyncio.open_connection(str(address), decision.port)
        except (OSError, TimeoutError) as exc:
            reason = "upstream connect timeout" if isinstance(exc, TimeoutError) else "upstream connect failed"
            await self._audit("proxy.connect", decision.payload("error", reason, 502))
            await self._send(writer, _error_response(502, reason, f"{decision.host}:{decision.port}"))
            return
        try:
            if not await self._audit("proxy.connect", {**decision.payload("allowed"), "mode": "tunnel"}):
                await self._send(writer, _error_response(503, "audit unavailable", ""))
                return
            await self._send(writer, b"HTTP/1.1 200 Connection Established\r\n\r\n")
            await _splice((reader, writer), (up_reader, up_writer), self.config.idle_timeout)
        finally:
            _discard(up_writer)

    async def _intercept(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        host: str,
        port: int,
        address: IPAddress,
    ) -> None:
        try:
            context = self._ca.server_context(host, self._record_sni)
        except CredentialError as exc:
            await self._audit("proxy.tls", {"decision": "failed", "host": host, "port": port, "reason": str(exc)})
            await self._send(writer, _error_response(502, "proxy CA expired", "restart the proxy"))
            return
        await self._send(writer, b"HTTP/1.1 200 Connection Established\r\n\r\n")
        try:
            await writer.start_tls(context, ssl_handshake_timeout=self.config.connect_timeout)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            await self._audit(
                "proxy.tls",
                {"decision": "failed", "host": host, "port": port, "reason": f"client handshake: {_tls_reason(exc)}"},
            )
            return
        ssl_object = writer.get_extra_info("ssl_object")
        sni = self._sni.get(ssl_object) if ssl_object is not None else None
        if (sni is None and _is_name(host)) or (sni is not None and _safe_normalize(sni) != host):
            await self._audit(
                "proxy.tls",
                {"decision": "denied", "host": host, "port": port, "reason": "SNI does not match CONNECT target"},
            )
            await self._send(writer, _error_response(403, "sni mismatch", f"SNI {sni!r} for CONNECT {host}"))
            return
        upstream: _Upstream | None = None
        try:
            while True:
                request = await self._read_request(reader, writer, "https")
                if request is None:
                    return
                try:
                    path = _inner_target(request, host, port)
                except HttpError as exc:
                    await self._refuse_malformed(writer, exc, request, "https")
                    return
                except EgressDenied as exc:
                    decision = _Decision(request.method, "https", host, port, _audit_path(request.target), True)
                    await self._audit("proxy.request", decision.payload("denied", exc.reason, 403))
                    await self._send(writer, _error_response(403, exc.reason, exc.detail))
                    return
                keep, upstream = await self._proxy_request(
                    request, reader, writer, "https", host, port, path, upstream, intercepted=True, address=address
                )
                if not keep:
                    return
        finally:
            if upstream is not None:
                upstream.close()

    def _record_sni(self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        self._sni[ssl_object] = server_name

    # -- one request -----------------------------------------------------------------------------

    def _has_credentials(self, host: str, port: int) -> bool:
        return any(binding.rule.matches_host(host, port) for binding in self._bindings)

    def _apply_credentials(self, request: RequestHead, decision: _Decision) -> tuple[Headers, str]:
        """Outgoing headers and target: placeholders replaced where bound, refused elsewhere,
        credential headers set. Raises EgressDenied for a placeholder sent to a foreign host,
        and for a plain-HTTP request to a host whose credentials go over HTTPS only."""
        headers = request.headers.without_hop_by_hop()
        host, port = decision.host, decision.port
        bindings = [b for b in self._bindings if b.rule.matches_host(host, port)]
        if decision.scheme != "https":
            # Refused, not relayed without the credential: the client would likely resend it
            # itself, and a placeholder bound here would otherwise go out as the value.
            cleartext = [b for b in bindings if not b.plain_http]
            if cleartext:
                decision.withheld = [{"header": b.header, "name": b.secret} for b in cleartext]
                raise EgressDenied("credential over plain http", f"{host}:{port} gets its credentials over https only")
        target = request.target
        if PLACEHOLDER_PREFIX in target or any(PLACEHOLDER_PREFIX in v for _k, v in headers.items):
            target = self._substitute(target, bindings, decision, in_target=True)
            headers.items = [(k, self._substitute(v, bindings, decision)) for k, v in headers.items]
        for binding in bindings:
            headers.put(binding.header, self._values[binding.secret])
            decision.credentials.append({"header": binding.header, "name": binding.secret})
        return headers, target

    def _substitute(self, text: str, bindings: Sequence[_Binding], decision: _Decision, in_target: bool = False) -> str:
        bound = {binding.secret for binding in bindings}

        def replace(match: re.Match[str]) -> str:
            secret = self._placeholder_secret.get(match.group(0))
            if secret is None:
                return match.group(0)  # not ours (another sandbox's): it is no secret here
            if secret not in bound:
                decision.placeholder_refused = secret
                raise EgressDenied("placeholder sent to a host it is not bound to", f"secret {secret}")
            value = self._values[secret]
            if in_target and not _TARGET_SAFE_RE.match(value):
                # A space (or a non-ASCII character) in the request line would split it into
                # other fields than the ones the proxy checked and audited.
                raise EgressDenied("credential value cannot go in a request line", f"secret {secret}")
            decision.placeholders.append(secret)
            return value

        return _PLACEHOLDER_RE.sub(replace, text)

    async def _proxy_request(
        self,
        request: RequestHead,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        scheme: str,
        host: str,
        port: int,
        path: str,
        upstream: _Upstream | None,
        *,
        intercepted: bool,
        address: IPAddress | None = None,
    ) -> tuple[bool, _Upstream | None]:
        """Check, forward and answer one request. Returns (keep client connection, upstream)."""
        decision = _Decision(request.method, scheme, host, port, _audit_path(path), intercepted)
        try:
            framing = request_framing(request)
        except HttpError as exc:
            await self._refuse_malformed(writer, exc, request, scheme)
            return False, upstream
        try:
            self._rules.check_request(host, port, request.method)
            origin = RequestHead(request.method, path, request.version, request.headers)
            headers, path = self._apply_credentials(origin, decision)
            if address is None and not _reusable(upstream, (scheme, host, port)):
                address = await resolve_pinned(self._resolver, self._guard, host, port)
        except EgressDenied as exc:
            await self._audit("proxy.request", decision.payload("denied", exc.reason, 403))
            await self._send(writer, _error_response(403, exc.reason, exc.detail))
            return False, upstream
        if request.method in ("CONNECT", "TRACE") or request.headers.get("upgrade") is not None:
            # Upgrades (websockets, h2c) would turn the inspected stream into an opaque one.
            await self._audit("proxy.request", decision.payload("denied", "upgrade not supported", 501))
            await self._send(writer, _error_response(501, "upgrade not supported", request.method))
            return False, upstream
        headers.put("Host", _host_header(host, port, 443 if scheme == "https" else 80))
        set_framing(headers, framing, declared=request.headers.get("content-length") is not None)
        expect = headers.get("expect")
        headers.remove("expect")
        if not await self._audit("proxy.request", decision.payload("allowed")):
            await self._send(writer, _error_response(503, "audit unavailable", ""))
            return False, upstream
        if expect is not None and expect.lower() == "100-continue" and framing is not NO_BODY:
            # The proxy answers Expect itself: it must read the body before it sees upstream's answer.
            await self._send(writer, b"HTTP/1.1 100 Continue\r\n\r\n")
        head = serialize_head(f"{request.method} {path} HTTP/1.1", headers.items)
        for attempt in (1, 2):
            try:
                if attempt == 2 and address is None:
                    address = await resolve_pinned(self._resolver, self._guard, host, port)
                upstream = await self._upstream_for(upstream, scheme, host, port, address)
            except (_UpstreamFailed, EgressDenied) as exc:
                status = exc.status if isinstance(exc, _UpstreamFailed) else 403
                await self._audit("proxy.request", decision.payload("error", exc.reason, status))
                await self._send(writer, _error_response(status, exc.reason, f"{host}:{port}"))
                return False, None
            try:
                return await self._exchange(request, framing, head, reader, writer, upstream, decision)
            except _StaleUpstream:
                # A kept-alive upstream closed before answering a body-less request: that
                # request never reached it, so one retry on a fresh connection is safe.
                upstream = None
            except BaseException:
                # The client went away (or the proxy is stopping) mid-exchange: nobody else
                # holds this upstream, so its socket would outlive the connection.
                upstream.close()
                raise
        raise AssertionError("unreachable")

    async def _exchange(
        self,
        request: RequestHead,
        framing: Framing,
        head: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: _Upstream,
        decision: _Decision,
    ) -> tuple[bool, _Upstream | None]:
        reused = upstream.used
        upstream.used = True
        try:
            try:
                if framing.kind == "length" and framing.length <= SMALL_BODY:
                    # One write for head and body: one segment on the wire instead of two.
                    upstream.writer.write(
                        head + await _read_exact(reader, framing.length, 400, self.config.idle_timeout)
                    )
                else:
                    upstream.writer.write(head)
                    await relay_body(reader, upstream.writer, framing, 400, self.config.idle_timeout)
            except HttpError as exc:
                upstream.close()
                await self._refuse_malformed(writer, exc, request, decision.scheme)
                return False, None
            response = await self._read_response(upstream, request.method, writer)
        except (ConnectionError, OSError, HttpError, TimeoutError) as exc:
            upstream.close()
            if reused and framing is NO_BODY and isinstance(exc, _UpstreamClosed | ConnectionError):
                raise _StaleUpstream() from None
            reason = exc.reason if isinstance(exc, HttpError) else "upstream connection failed"
            await self._audit("proxy.request", decision.payload("error", reason, 502))
            await self._send(writer, _error_response(502, reason, f"{decision.host}:{decision.port}"))
            return False, None
        try:
            framing_out = response_framing(response, request.method)
        except HttpError as exc:
            upstream.close()
            await self._audit("proxy.request", decision.payload("error", exc.reason, 502))
            await self._send(writer, _error_response(502, exc.reason, ""))
            return False, None
        headers = response.headers.without_hop_by_hop()
        if framing_out.kind in ("length", "chunked"):
            # Otherwise (HEAD, 204, 304, close-delimited) upstream's Content-Length, if
            # any, describes no body on this connection and goes through as it came.
            set_framing(headers, framing_out)
        keep_framing = framing_out.kind != "close"
        keep = request.keep_alive and keep_framing
        if not keep:
            headers.items.append(("Connection", "close"))
        out_head = serialize_head(f"HTTP/1.1 {response.status} {response.reason}", headers.items)
        if framing_out.kind == "length" and framing_out.length <= SMALL_BODY:
            try:
                body = await _read_exact(upstream.reader, framing_out.length, 502, self.config.idle_timeout)
            except HttpError as exc:
                upstream.close()
                await self._audit("proxy.request", decision.payload("error", exc.reason, 502))
                await self._send(writer, _error_response(502, exc.reason, ""))
                return False, None
            await self._send(writer, out_head + body)
            framing_out = NO_BODY
        else:
            writer.write(out_head)
        try:
            await relay_body(upstream.reader, writer, framing_out, 502, self.config.idle_timeout)
        except HttpError:
            # Part of the response was sent: the only honest signal left is closing both sides,
            # at once (the client may be the side that stopped reading).
            upstream.close()
            writer.transport.abort()
            return False, None
        upstream_reusable = response.keep_alive and keep_framing
        if not upstream_reusable:
            upstream.close()
            return keep, None
        return keep, upstream

    async def _read_response(self, upstream: _Upstream, method: str, writer: asyncio.StreamWriter) -> ResponseHead:
        while True:
            async with asyncio.timeout(self.config.idle_timeout):
                head = await read_head(upstream.reader, 502)
            if head is None:
                raise _UpstreamClosed(502, "upstream closed the connection")
            response = parse_response_head(head)
            if response.status == 101:
                raise HttpError(502, "upstream switched protocols")
            if response.status >= 200:
                return response
            # Interim 1xx responses are forwarded as they come.
            interim = response.headers.without_hop_by_hop()
            await self._send(writer, serialize_head(f"HTTP/1.1 {response.status} {response.reason}", interim.items))

    async def _upstream_for(
        self, current: _Upstream | None, scheme: str, host: str, port: int, address: IPAddress | None
    ) -> _Upstream:
        key = (scheme, host, port)
        if current is not None:
            if _reusable(current, key):
                return current
            current.close()
        assert address is not None  # resolved by the caller whenever the key changes
        tls = self._upstream_tls if scheme == "https" else None
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    str(address), port, ssl=tls, server_hostname=host if tls else None, limit=STREAM_LIMIT
                )
        except ssl.SSLCertVerificationError as exc:
            raise _UpstreamFailed(502, f"upstream certificate rejected: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise _UpstreamFailed(502, f"upstream TLS failed: {_tls_reason(exc)}") from None
        except TimeoutError:
            raise _UpstreamFailed(504, "upstream connect timeout") from None
        except OSError as exc:
            raise _UpstreamFailed(502, f"upstream connect failed ({exc.strerror or 'error'})") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Upstream(key, reader, writer)

    # -- audit -----------------------------------------------------------------------------------

    async def _audit(self, event: str, payload: Mapping[str, Any]) -> bool:
        """Append to the audit chain; False when that failed (the caller then refuses)."""
        if self._audit_log is None:
            return True
        append = self._audit_log.append
        try:
            if inspect.iscoroutinefunction(append):
                await append(event, sandbox_id=self.sandbox_id, agent_id=self.agent_id, payload=dict(payload))
            else:
                # A synchronous log fsyncs each entry: run it off the event loop so one disk
                # flush does not stall every other connection of the sandbox.
                await asyncio.to_thread(
                    append, event, sandbox_id=self.sandbox_id, agent_id=self.agent_id, payload=dict(payload)
                )
        except (KavachError, OSError, ValueError, RuntimeError) as exc:
            # Fail closed: the caller refuses the request it could not record.
            log.error("audit append failed for %s: %s", event, type(exc).__name__)
            return False
        return True


class _UpstreamClosed(HttpError):
    """Upstream closed before sending a response head."""


class _StaleUpstream(Exception):
    """A reused upstream connection turned out closed before the request was answered."""


def _reusable(upstream: _Upstream | None, key: tuple[str, str, int]) -> bool:
    return upstream is not None and upstream.key == key and not upstream.reader.at_eof()


class _UpstreamFailed(Exception):
    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)


# -- helpers ---------------------------------------------------------------------------------------


def _safe_normalize(host: str) -> str | None:
    try:
        return normalize_host(host)
    except ValueError:
        return None


def _is_name(host: str) -> bool:
    return parse_ip(host) is None


def _authority(text: str, default_port: int | None) -> tuple[str, int]:
    """``host[:port]`` or ``[v6][:port]`` -> (normalized host, port); HttpError(400) if bad."""
    if "@" in text or "/" in text:
        raise HttpError(400, "malformed authority")
    if text.startswith("["):
        close = text.find("]")
        host_text, rest = text[: close + 1], text[close + 1 :]
        port_text = rest[1:] if rest.startswith(":") else None
        if close < 0 or (rest and port_text is None):
            raise HttpError(400, "malformed authority")
    elif text.count(":") == 1:
        host_text, _, port_text = text.partition(":")
    elif ":" in text:
        raise HttpError(400, "IPv6 address must be in brackets")
    else:
        host_text, port_text = text, None
    if port_text is None:
        if default_port is None:
            raise HttpError(400, "port required")
        port = default_port
    elif port_text.isascii() and port_text.isdigit() and len(port_text) <= 5 and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise HttpError(400, "invalid port")
    host = _safe_normalize(host_text)
    if host is None:
        raise HttpError(400, "invalid host name")
    return host, port


def _absolute_http_target(target: str) -> tuple[str, int, str]:
    """Split ``http://authority/path?query`` into (host, port, origin-form path)."""
    scheme, sep, rest = target.partition("://")
    if not sep:
        raise HttpError(400, "a proxy request needs an absolute http:// URL")
    if scheme.lower() != "http":
        raise HttpError(400, "only http:// URLs are proxied directly; use CONNECT for https")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    host, port = _authority(rest[:cut], 80)
    path = rest[cut:] or "/"
    if path.startswith("?"):
        path = "/" + path
    return host, port, path.split("#", 1)[0]


def _inner_target(request: RequestHead, host: str, port: int) -> str:
    """Origin-form path of a request inside an intercepted tunnel; Host must name the target."""
    target = request.target
    if target.startswith("/"):
        path = target
    elif target.lower().startswith("https://"):
        rest = target[8:]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        if _authority(rest[:cut], 443) != (host, port):
            raise EgressDenied("host mismatch", "request URL does not name the CONNECT target")
        path = rest[cut:] or "/"
    else:
        raise HttpError(400, "malformed request target")
    hosts = request.headers.get_all("host")
    if len(hosts) != 1:
        raise HttpError(400, "exactly one Host header required")
    if _authority(hosts[0], 443) != (host, port):
        raise EgressDenied("host mismatch", "Host header does not name the CONNECT target")
    return path


def _host_header(host: str, port: int, default_port: int) -> str:
    text = f"[{host}]" if ":" in host else host
    return text if port == default_port else f"{text}:{port}"


def _audit_path(target: str) -> str:
    # The query string can carry anything the sandbox chose to send; the path is enough to audit.
    path = target.split("?", 1)[0]
    if "://" in path:
        _scheme, _, rest = path.partition("://")
        slash = rest.find("/")
        path = rest[slash:] if slash >= 0 else "/"
    path = _PLACEHOLDER_RE.sub(PLACEHOLDER_PREFIX + "...", path)
    return path[:512]


def _sanitize(text: str) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", text)[:300]


def _error_response(status: int, reason: str, detail: str, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    phrase = _PHRASES.get(status, "Error")
    body = f"kavach egress proxy: {phrase}: {reason}" + (f" ({detail})" if detail else "") + "\n"
    body_bytes = _sanitize(body.rstrip("\n")).encode("ascii") + b"\n"
    head = serialize_head(
        f"HTTP/1.1 {status} {phrase}",
        [
            (REASON_HEADER, _sanitize(reason)),
            *extra,
            ("Content-Type", "text/plain; charset=us-ascii"),
            ("Content-Length", str(len(body_bytes))),
            ("Connection", "close"),
        ],
    )
    return head + body_bytes


def _client_auth(token: str | None) -> bytes | None:
    """What a client's Basic credentials must decode to, or None when no token is required."""
    if token is None:
        return None
    if not _CLIENT_TOKEN_RE.match(token):
        # Never echo the token: it is a secret of its own.
        raise PolicyError("client_token", "<hidden>", "16 to 256 characters among A-Z a-z 0-9 . _ ~ -")
    return f"{PROXY_USER}:{token}".encode("ascii")


def _is_latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _discard(writer: asyncio.StreamWriter) -> None:
    """Close an upstream connection; unsent data is dropped, not waited for (a server that
    stopped reading would keep the socket open, uncounted, for as long as it liked)."""
    if writer.transport.get_write_buffer_size():
        writer.transport.abort()
    else:
        writer.close()


async def _read_exact(reader: asyncio.StreamReader, size: int, status: int, idle_timeout: float) -> bytes:
    try:
        async with asyncio.timeout(idle_timeout):
            return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise HttpError(status, "body shorter than Content-Length") from None
    except TimeoutError:
        raise HttpError(status, "body stalled (idle timeout)") from None


async def _splice(
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    idle_timeout: float,
) -> None:
    """Copy bytes both ways until both directions end, or nothing moved for ``idle_timeout``.

    One idle clock for both directions: a long download with a silent client is not idle.
    """
    loop = asyncio.get_running_loop()
    last_activity = loop.time()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal last_activity
        try:
            while data := await reader.read(TUNNEL_COPY):
                last_activity = loop.time()
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            # Either side failing ends the tunnel for both.
            client[1].close()
            upstream[1].close()

    pipes = asyncio.gather(pipe(client[0], upstream[1]), pipe(upstream[0], client[1]))
    try:
        while True:
            remaining = last_activity + idle_timeout - loop.time()
            if remaining <= 0:
                break
            done, _pending = await asyncio.wait([pipes], timeout=remaining)
            if done:
                return
    finally:
        if not pipes.done():
            client[1].close()
            upstream[1].close()
            pipes.cancel()
            await asyncio.gather(pipes, return_exceptions=True)


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.__class__.__name__)
    return exc.__class__.__name__


__all__ = [
    "PLACEHOLDER_PREFIX",
    "PROXY_USER",
    "REASON_HEADER",
    "CredentialRule",
    "EgressProxy",
    "ProxyConfig",
    "connection_budget",
]
