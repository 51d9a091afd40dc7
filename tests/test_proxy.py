"""Egress proxy, host side: real sockets, real TLS, real curl and urllib, loopback only.

A local HTTPS upstream with its own CA runs on 127.0.0.1. Because 127.0.0.1 is a private
address, configurations that should reach it list ``allow_private=("127.0.0.0/8",)``, and
``static_hosts`` maps ``api.test`` / ``other.test`` to it without touching /etc/hosts.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import gc
import json
import logging
import resource
import shutil
import socket
import ssl
import urllib.error
import urllib.request
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from kavach.credentials import CredentialRule, CredentialStore, EgressProxy, ProxyConfig
from kavach.credentials import proxy as proxy_module
from kavach.credentials.http import Headers
from kavach.credentials.proxy import connection_budget
from kavach.errors import PolicyError
from test_proxy_support import TestCA, Upstream, make_test_ca

SECRET = "s3cr3t-VALUE-9f8e7d"
OTHER_SECRET = "other-SECRET-1a2b3c"
STATIC = (("api.test", "127.0.0.1"), ("other.test", "127.0.0.1"), ("plain.test", "127.0.0.1"))

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


class MemoryAudit:
    """Collects audit appends the way kavach.audit.AuditLog receives them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def append(self, event: str, *, sandbox_id: str, agent_id: str | None, payload: dict[str, Any]) -> None:
        self.events.append((event, sandbox_id, payload))

    def decisions(self, decision: str) -> list[dict[str, Any]]:
        return [p for _e, _s, p in self.events if p.get("decision") == decision]


@dataclass
class World:
    tmp: Path
    ca: TestCA
    https: Upstream
    http: Upstream
    proxy: EgressProxy
    port: int
    audit: MemoryAudit
    bundle: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _config(ca: TestCA, **overrides: Any) -> ProxyConfig:
    base = ProxyConfig(
        allow=("api.test", "other.test", "plain.test"),
        allow_private=("127.0.0.0/8",),
        credentials=(
            CredentialRule("api.test", "Authorization", "API_TOKEN"),
            CredentialRule("other.test", "X-Api-Key", "OTHER_KEY"),
        ),
        upstream_ca=str(ca.ca_pem),
        static_hosts=STATIC,
    )
    return replace(base, **overrides)


# The same rules, opted in to plain HTTP (cleartext) as well.
PLAIN_HTTP_RULES = (
    CredentialRule("api.test", "Authorization", "API_TOKEN", plain_http=True),
    CredentialRule("other.test", "X-Api-Key", "OTHER_KEY", plain_http=True),
)


def _store() -> CredentialStore:
    store = CredentialStore()
    store.set("API_TOKEN", SECRET)
    store.set("OTHER_KEY", OTHER_SECRET)
    return store


async def _start(tmp: Path, ca: TestCA, https: Upstream, http: Upstream, **overrides: Any) -> World:
    audit = MemoryAudit()
    proxy = EgressProxy(_config(ca, **overrides), _store(), sandbox_id="kv-test", audit=audit)
    _host, port = await proxy.start_tcp()
    bundle = tmp / f"bundle-{port}.pem"
    bundle.write_bytes(proxy.ca_bundle_pem())
    return World(tmp, ca, https, http, proxy, port, audit, bundle)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    ca = make_test_ca(tmp_path / "upstream")
    https = await Upstream().start(ca.server_context())
    http = await Upstream().start()
    w = await _start(tmp_path, ca, https, http)
    try:
        yield w
    finally:
        await w.proxy.close()
        await https.close()
        await http.close()


async def curl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--max-time",
        "10",
        "--noproxy",
        "",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def probe(port: int, data: bytes) -> bytes:
    """Like raw_exchange, for a proxy that may refuse the connection: a refused client whose
    request was never read may see a reset instead of the 503 (reported as b"reset")."""
    try:
        return await raw_exchange(port, data)
    except ConnectionError:
        return b"reset"


async def raw_exchange(port: int, data: bytes, read_until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(1 << 20) if not read_until_close else reader.read(-1), 10)
    finally:
        writer.close()


# -- HTTPS interception ---------------------------------------------------------------------------


@needs_curl
async def test_curl_https_gets_credential_injected_and_client_header_replaced(world: World) -> None:
    code, out, err = await curl(
        "-x",
        world.url,
        "--cacert",
        str(world.bundle),
        "-H",
        "Authorization: Bearer sandbox-made-this-up",
        f"https://api.test:{world.https.port}/v1/models",
    )
    assert code == 0, err
    assert json.loads(out)["target"] == "/v1/models"
    seen = world.https.seen[-1]
    assert seen.headers.get_all("authorization") == [SECRET]  # replaced, not duplicated
    allowed = world.audit.decisions("allowed")
    request = [p for p in allowed if p["method"] == "GET"][-1]
    assert request["injected"] == [{"header": "Authorization", "name": "API_TOKEN"}]
    assert request["intercepted"] is True
    assert SECRET not in json.dumps(world.audit.events)


@needs_curl
async def test_intercepted_certificate_is_minted_by_the_sandbox_ca(world: World, tmp_path: Path) -> None:
    ca_only = tmp_path / "proxy-ca.pem"
    ca_only.write_bytes(world.proxy.ca_certificate_pem())
    code, _out, err = await curl(
        "-x",
        world.url,
        "--cacert",
        str(ca_only),
        f"https://api.test:{world.https.port}/",
    )
    assert code == 0, err
    # The upstream's own CA alone does not validate what the client sees: it was intercepted.
    code, _out, err = await curl(
        "-x",
        world.url,
        "--cacert",
        str(world.ca.ca_pem),
        f"https://api.test:{world.https.port}/",
    )
    assert code != 0 and "certificate" in err.lower()


async def test_python_urllib_through_proxy(world: World) -> None:
    def fetch() -> tuple[dict[str, Any], str]:
        context = ssl.create_default_context(cafile=str(world.bundle))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({"https": world.url, "http": world.url}),
            urllib.request.HTTPSHandler(context=context),
        )
        with opener.open(f"https://api.test:{world.https.port}/py", timeout=10) as resp:
            https_body = json.loads(resp.read())
        with opener.open(f"http://plain.test:{world.http.port}/plain", timeout=10) as resp:
            plain_body = resp.read().decode()
        return https_body, plain_body

    https_body, plain_body = await asyncio.to_thread(fetch)
    assert https_body["authorization"] == [SECRET]
    assert world.https.seen[-1].target == "/py"
    assert json.loads(plain_body)["target"] == "/plain"
    assert world.http.seen[-1].headers.get("authorization") is None  # no rule for plain.test


@needs_curl
async def test_host_without_credential_rule_is_tunnelled_untouched(world: World) -> None:
    await world.proxy.close()
    w = await _start(world.tmp, world.ca, world.https, world.http, credentials=())
    try:
        # Only the upstream's own CA: the client talks TLS end to end with the real server.
        code, out, err = await curl(
            "-x",
            w.url,
            "--cacert",
            str(w.ca.ca_pem),
            "-H",
            "Authorization: Bearer client-own",
            f"https://other.test:{w.https.port}/t",
        )
        assert code == 0, err
        assert json.loads(out)["authorization"] == ["Bearer client-own"]
        connect = [p for e, _s, p in w.audit.events if e == "proxy.connect"][-1]
        assert connect["mode"] == "tunnel" and connect["decision"] == "allowed"
    finally:
        await w.proxy.close()


@needs_curl
async def test_upstream_certificate_is_verified(world: World) -> None:
    await world.proxy.close()
    w = await _start(world.tmp, world.ca, world.https, world.http, upstream_ca=None)
    try:
        _code, out, _err = await curl(
            "-x",
            w.url,
            "--cacert",
            str(w.bundle),
            "-w",
            "%{http_code}",
            f"https://api.test:{w.https.port}/",
        )
        assert out.endswith("502")
        assert world.https.seen == []
        errors = w.audit.decisions("error")
        assert errors and "certificate" in errors[-1]["reason"]
    finally:
        await w.proxy.close()


async def _tls_through_proxy(world: World, connect_host: str, sni: str, host_header: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
    writer.write(f"CONNECT {connect_host}:{world.https.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we test the proxy's SNI check, not the client's
    await writer.start_tls(context, server_hostname=sni)
    writer.write(f"GET / HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    return data


async def test_sni_must_match_connect_target(world: World) -> None:
    data = await _tls_through_proxy(world, "api.test", "other.test", "api.test")
    assert b"403" in data.split(b"\r\n")[0]
    assert world.https.seen == []
    tls = [p for e, _s, p in world.audit.events if e == "proxy.tls"]
    assert tls and "SNI" in tls[-1]["reason"]


async def test_host_header_must_match_connect_target(world: World) -> None:
    data = await _tls_through_proxy(world, "api.test", "api.test", f"other.test:{world.https.port}")
    assert data.startswith(b"HTTP/1.1 403")
    assert b"X-Kavach-Reason: host mismatch" in data
    assert world.https.seen == []


# -- refusals --------------------------------------------------------------------------------------


@needs_curl
async def test_non_allowlisted_host_gets_403_with_reason(world: World) -> None:
    code, out, _ = await curl(
        "-x",
        world.url,
        "-i",
        f"http://nothere.test:{world.http.port}/",
    )
    assert out.startswith("HTTP/1.1 403")
    assert "X-Kavach-Reason: not allowlisted" in out
    code, _out, err = await curl("-x", world.url, "--cacert", str(world.bundle), "https://nothere.test/")
    assert code != 0 and "403" in err
    denied = world.audit.decisions("denied")
    assert {d["reason"] for d in denied} == {"not allowlisted"}
    assert world.http.seen == []


async def test_private_and_metadata_addresses_refused_without_allow_private(world: World) -> None:
    await world.proxy.close()
    w = await _start(
        world.tmp,
        world.ca,
        world.https,
        world.http,
        allow=(
            "api.test",
            "plain.test",
            "127.0.0.1",
            "169.254.169.254",
            "[fd00:ec2::254]",
            "metadata.google.internal",
        ),
        allow_private=(),
    )
    try:
        cases = {
            f"GET http://127.0.0.1:{w.http.port}/ HTTP/1.1\r\nHost: x\r\n\r\n": "private address",
            "GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n": "metadata address",
            "GET http://[fd00:ec2::254]/latest/ HTTP/1.1\r\nHost: x\r\n\r\n": "metadata address",
            "GET http://metadata.google.internal/ HTTP/1.1\r\nHost: x\r\n\r\n": "metadata host",
            # A permitted *name* that resolves to a loopback address is refused too.
            f"GET http://plain.test:{w.http.port}/ HTTP/1.1\r\nHost: x\r\n\r\n": "private address",
            f"CONNECT api.test:{w.https.port} HTTP/1.1\r\nHost: x\r\n\r\n": "private address",
            "CONNECT 169.254.169.254:443 HTTP/1.1\r\nHost: x\r\n\r\n": "metadata address",
        }
        for request, reason in cases.items():
            data = await raw_exchange(w.port, request.encode())
            assert data.startswith(b"HTTP/1.1 403"), request
            assert f"X-Kavach-Reason: {reason}".encode() in data, (request, data[:200])
        assert w.http.seen == [] and w.https.seen == []
    finally:
        await w.proxy.close()


async def test_ip_literal_needs_explicit_allow_entry(world: World) -> None:
    # 127.0.0.0/8 is allow_private here, but the literal itself is not on the allowlist.
    data = await raw_exchange(world.port, f"GET http://127.0.0.1:{world.http.port}/ HTTP/1.1\r\n\r\n".encode())
    assert b"X-Kavach-Reason: not allowlisted" in data


async def test_deny_wins_over_wildcard_allow(world: World) -> None:
    await world.proxy.close()
    w = await _start(world.tmp, world.ca, world.https, world.http, allow=("*.test",), deny=("other.test",))
    try:
        ok = await raw_exchange(
            w.port, f"GET http://plain.test:{w.http.port}/ HTTP/1.1\r\nConnection: close\r\n\r\n".encode()
        )
        assert ok.startswith(b"HTTP/1.1 200")
        denied = await raw_exchange(w.port, f"GET http://other.test:{w.http.port}/ HTTP/1.1\r\n\r\n".encode())
        assert b"X-Kavach-Reason: denylisted" in denied
    finally:
        await w.proxy.close()


async def test_empty_allowlist_denies_everything(world: World) -> None:
    await world.proxy.close()
    w = await _start(world.tmp, world.ca, world.https, world.http, allow=(), credentials=())
    try:
        data = await raw_exchange(w.port, f"GET http://plain.test:{w.http.port}/ HTTP/1.1\r\n\r\n".encode())
        assert b"X-Kavach-Reason: allowlist empty" in data
    finally:
        await w.proxy.close()


@needs_curl
async def test_method_restriction_applies_inside_https(world: World) -> None:
    await world.proxy.close()
    w = await _start(world.tmp, world.ca, world.https, world.http, allow=("GET,HEAD other.test",), credentials=())
    try:
        code, out, err = await curl("-x", w.url, "--cacert", str(w.bundle), f"https://other.test:{w.https.port}/r")
        assert code == 0, err
        _c, out, _e = await curl(
            "-x",
            w.url,
            "--cacert",
            str(w.bundle),
            "-X",
            "POST",
            "-d",
            "x=1",
            "-i",
            f"https://other.test:{w.https.port}/w",
        )
        assert "HTTP/1.1 403" in out and "X-Kavach-Reason: method not allowed" in out
        assert [s.method for s in w.https.seen] == ["GET"]
    finally:
        await w.proxy.close()


# -- placeholders ----------------------------------------------------------------------------------


@needs_curl
async def test_placeholder_replaced_for_bound_host_only(world: World) -> None:
    placeholder = world.proxy.placeholders()["API_TOKEN"]
    assert placeholder.startswith("KAVACH_PLACEHOLDER_") and SECRET not in placeholder
    # Bound host: the placeholder becomes the value.
    code, _out, err = await curl(
        "-x",
        world.url,
        "--cacert",
        str(world.bundle),
        "-H",
        f"X-Token: {placeholder}",
        f"https://api.test:{world.https.port}/bound",
    )
    assert code == 0, err
    assert world.https.seen[-1].headers.get("x-token") == SECRET
    # Another host (intercepted because it has its own rule): refused, audited, nothing sent.
    before = len(world.https.seen)
    _c, out, _e = await curl(
        "-x",
        world.url,
        "--cacert",
        str(world.bundle),
        "-i",
        "-H",
        f"X-Leak: {placeholder}",
        f"https://other.test:{world.https.port}/leak",
    )
    assert "X-Kavach-Reason: placeholder sent to a host it is not bound to" in out
    # Plain HTTP to a host without rules: refused the same way.
    _c, out, _e = await curl(
        "-x", world.url, "-i", "-H", f"Cookie: t={placeholder}", f"http://plain.test:{world.http.port}/"
    )
    assert out.startswith("HTTP/1.1 403")
    assert len(world.https.seen) == before and world.http.seen == []
    denied = [p for p in world.audit.decisions("denied") if "placeholder" in p["reason"]]
    assert len(denied) == 2
    assert {d["host"] for d in denied} == {"other.test", "plain.test"}
    assert {d["placeholder_of"] for d in denied} == {"API_TOKEN"}
    assert SECRET not in json.dumps(world.audit.events) and placeholder not in json.dumps(world.audit.events)


# -- plain HTTP ------------------------------------------------------------------------------------


async def test_keep_alive_every_request_inspected_with_chunked_body(world: World) -> None:
    await world.proxy.close()
    world = await _start(world.tmp, world.ca, world.https, world.http, credentials=PLAIN_HTTP_RULES)
    port = world.http.port
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
    try:
        writer.write(
            f"GET http://api.test:{port}/one HTTP/1.1\r\nHost: api.test\r\nAuthorization: mine\r\n\r\n".encode()
        )
        writer.write(
            f"POST http://api.test:{port}/two HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            "5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".encode()
        )
        writer.write(f"GET http://api.test:{port}/chunked HTTP/1.1\r\nHost: api.test\r\n\r\n".encode())
        writer.write(f"GET http://evil.test:{port}/three HTTP/1.1\r\nHost: evil.test\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
        await world.proxy.close()
    responses = data.split(b"HTTP/1.1 ")[1:]
    assert [r[:3] for r in responses] == [b"200", b"200", b"200", b"403"]
    assert b"hello chunked world" not in data  # chunked framing is preserved, not flattened
    assert b"6\r\nhello \r\n8\r\nchunked \r\n5\r\nworld\r\n0\r\n\r\n" in data
    seen = world.http.seen
    assert [s.target for s in seen] == ["/one", "/two", "/chunked"]
    assert {s.connection for s in seen} == {seen[0].connection}  # one upstream connection reused
    assert seen[1].body == b"hello world"
    assert all(s.headers.get_all("authorization") == [SECRET] for s in seen)
    assert all(s.headers.get("host") == f"api.test:{port}" for s in seen)


async def test_connection_header_cannot_drop_the_length_of_a_relayed_body(world: World) -> None:
    # A body that is itself a request: if the length were dropped on the way (the client
    # named Content-Length in Connection), upstream would read it as a second request to a
    # host of the sandbox's choosing, and the next request, credential included, as its body.
    port = world.http.port
    smuggled = b"POST /capture HTTP/1.1\r\nHost: attacker.test\r\nContent-Length: 60\r\n\r\n"
    data = await raw_exchange(
        world.port,
        f"POST http://plain.test:{port}/first HTTP/1.1\r\nConnection: content-length, host\r\n"
        f"Content-Length: {len(smuggled)}\r\n\r\n".encode()
        + smuggled
        + f"POST http://plain.test:{port}/second HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello".encode()
        + f"POST http://plain.test:{port}/third HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode(),
    )
    assert [r[:3] for r in data.split(b"HTTP/1.1 ")[1:]] == [b"200", b"200", b"200"]
    seen = world.http.seen
    assert [(s.method, s.target) for s in seen] == [("POST", "/first"), ("POST", "/second"), ("POST", "/third")]
    assert seen[0].body == smuggled
    # The proxy sends the framing it relayed, in its own spelling.
    assert [s.headers.get_all("content-length") for s in seen] == [[str(len(smuggled))], ["5"], ["0"]]
    assert all(s.headers.get("host") == f"plain.test:{port}" for s in seen)


def test_connection_cannot_make_length_or_host_hop_by_hop() -> None:
    headers = Headers(
        [("Connection", "content-length, Host, x-a"), ("Content-Length", "5"), ("Host", "h"), ("X-A", "1")]
    )
    assert headers.without_hop_by_hop().items == [("Content-Length", "5"), ("Host", "h")]


@needs_curl
async def test_curl_plain_http_any_port_with_post(world: World) -> None:
    # Injection over plain HTTP only with the rule's explicit opt-in.
    await world.proxy.close()
    w = await _start(world.tmp, world.ca, world.https, world.http, credentials=PLAIN_HTTP_RULES)
    try:
        code, out, err = await curl("-x", w.url, "-d", "a=1&b=2", f"http://other.test:{w.http.port}/form")
    finally:
        await w.proxy.close()
    assert code == 0, err
    assert json.loads(out)["body_len"] == 7
    assert w.http.seen[-1].headers.get_all("x-api-key") == [OTHER_SECRET]
    assert w.http.seen[-1].headers.get("proxy-connection") is None


# -- malformed input -------------------------------------------------------------------------------

MALFORMED = {
    "bad request line": b"GET http://api.test/ HTTP/1.1 extra\r\n\r\n",
    "bad version": b"GET http://api.test/ HTTP/2.0\r\n\r\n",
    "oversized head": b"GET http://api.test/ HTTP/1.1\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n",
    "bare LF in header": b"GET http://api.test/ HTTP/1.1\r\nX-A: 1\nInjected: yes\r\n\r\n",
    "bare CR in header": b"GET http://api.test/ HTTP/1.1\r\nX-A: 1\rInjected: yes\r\n\r\n",
    "obs-fold": b"GET http://api.test/ HTTP/1.1\r\nX-A: 1\r\n  folded\r\n\r\n",
    "space before colon": b"GET http://api.test/ HTTP/1.1\r\nX-A : 1\r\n\r\n",
    "bad chunk size": b"POST http://api.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk too long": b"POST http://api.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",
    "CL and TE": b"POST http://api.test/ HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "conflicting CL": b"POST http://api.test/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    "origin-form": b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n",
    "userinfo": b"GET http://user@api.test/ HTTP/1.1\r\n\r\n",
    # Served as DELETE by servers that upper-case the method, past a rule denying DELETE.
    "lower-case method": b"delete http://api.test/ HTTP/1.1\r\n\r\n",
    # str.isdigit() accepts superscripts that int() refuses: a 400, not a crashed connection.
    "non-ASCII digit in Content-Length": b"POST http://api.test/ HTTP/1.1\r\nContent-Length: \xb2\r\n\r\nhe",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
async def test_malformed_request_gets_400_and_proxy_keeps_serving(world: World, name: str) -> None:
    # plain.test has no credential rule: these requests are refused for their shape alone.
    request = (
        MALFORMED[name]
        .replace(b"api.test", b"plain.test")
        .replace(b"plain.test/", f"plain.test:{world.http.port}/".encode())
    )
    data = await raw_exchange(world.port, request)
    status = int(data.split(b" ", 2)[1])
    assert status in (400, 431), data[:200]
    assert b"Connection: close" in data
    # The proxy still serves a well-formed request on a new connection.
    ok = await raw_exchange(
        world.port, f"GET http://plain.test:{world.http.port}/ok HTTP/1.1\r\nConnection: close\r\n\r\n".encode()
    )
    assert ok.startswith(b"HTTP/1.1 200")
    assert [s.target for s in world.http.seen][-1] == "/ok"
    assert "/ok" in [s.target for s in world.http.seen] and len(world.http.seen) <= 2
    assert world.audit.decisions("malformed")


async def test_secret_never_in_repr(world: World) -> None:
    assert SECRET not in repr(world.proxy)
    assert SECRET not in repr(_store())
    assert SECRET not in repr(world.proxy.config)


@needs_curl
async def test_decisions_land_in_the_real_audit_chain_without_values(world: World, tmp_path: Path) -> None:
    from kavach.audit import open_audit_log, verify

    await world.proxy.close()
    key = b"k" * 32
    log_path = tmp_path / "audit.jsonl"
    audit = open_audit_log(log_path, key)
    proxy = EgressProxy(_config(world.ca), _store(), sandbox_id="kv-audit", audit=audit)
    _h, port = await proxy.start_tcp()
    bundle = tmp_path / "b.pem"
    bundle.write_bytes(proxy.ca_bundle_pem())
    placeholder = proxy.placeholders()["API_TOKEN"]
    try:
        url = f"http://127.0.0.1:{port}"
        code, _o, err = await curl("-x", url, "--cacert", str(bundle), f"https://api.test:{world.https.port}/a")
        assert code == 0, err
        await curl("-x", url, "-H", f"X-Leak: {placeholder}", f"http://plain.test:{world.http.port}/")
        await curl("-x", url, f"http://nothere.test:{world.http.port}/")
    finally:
        await proxy.close()
        audit.close()
    assert verify(log_path, key).ok
    text = log_path.read_text()
    assert SECRET not in text and placeholder not in text
    events = [json.loads(line) for line in text.splitlines()]
    reasons = [e["payload"].get("reason") for e in events if e["event"] == "proxy.request"]
    assert "placeholder sent to a host it is not bound to" in reasons and "not allowlisted" in reasons
    injected = [e["payload"]["injected"] for e in events if e["payload"].get("injected")]
    assert injected == [[{"header": "Authorization", "name": "API_TOKEN"}]]
    assert all(e["sandbox_id"] == "kv-audit" for e in events if e["event"].startswith("proxy."))


async def test_audit_failure_refuses_the_request(world: World) -> None:
    from kavach.errors import AuditError

    class BrokenAudit:
        def append(self, event: str, **_: object) -> None:
            raise AuditError("disk full")

    await world.proxy.close()
    proxy = EgressProxy(_config(world.ca), _store(), sandbox_id="kv", audit=BrokenAudit())
    _h, port = await proxy.start_tcp()
    try:
        data = await raw_exchange(port, f"GET http://plain.test:{world.http.port}/ HTTP/1.1\r\n\r\n".encode())
        assert data.startswith(b"HTTP/1.1 503") and b"audit unavailable" in data
        data = await raw_exchange(port, f"CONNECT other.test:{world.https.port} HTTP/1.1\r\n\r\n".encode())
        assert data.startswith(b"HTTP/1.1 503")
        assert world.http.seen == [] and world.https.seen == []
    finally:
        await proxy.close()


async def test_stalled_body_and_idle_tunnel_are_closed(world: World) -> None:
    await world.proxy.close()
    w = await _start(world.tmp, world.ca, world.https, world.http, credentials=(), idle_timeout=0.3)
    try:
        stalled = f"POST http://plain.test:{w.http.port}/ HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc".encode()
        data = await raw_exchange(w.port, stalled)
        assert data.startswith(b"HTTP/1.1 400") and b"idle timeout" in data
        reader, writer = await asyncio.open_connection("127.0.0.1", w.port)
        writer.write(f"CONNECT other.test:{w.https.port} HTTP/1.1\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.read(-1), 10) == b""  # closed by the proxy, not by us
        writer.close()
        assert w.http.seen == []
    finally:
        await w.proxy.close()


# -- credentials stay off plain HTTP ---------------------------------------------------------------


async def test_plain_http_request_that_would_carry_a_credential_is_refused(world: World) -> None:
    placeholder = world.proxy.placeholders()["API_TOKEN"]
    port = world.http.port
    requests = (
        # The rule's header would be added in cleartext.
        f"GET http://api.test:{port}/rule HTTP/1.1\r\n\r\n",
        # The client's own placeholder would become the value in cleartext.
        f"GET http://api.test:{port}/ph HTTP/1.1\r\nAuthorization: Bearer {placeholder}\r\n\r\n",
        f"GET http://other.test:{port}/ph?k={placeholder} HTTP/1.1\r\n\r\n",
    )
    for request in requests:
        data = await raw_exchange(world.port, request.encode())
        assert data.startswith(b"HTTP/1.1 403"), data[:200]
        assert b"X-Kavach-Reason: credential over plain http" in data
    assert world.http.seen == []  # refused, not relayed without the credential
    denied = world.audit.decisions("denied")
    assert [d["reason"] for d in denied] == ["credential over plain http"] * 3
    assert denied[0]["scheme"] == "http"
    assert denied[0]["withheld"] == [{"header": "Authorization", "name": "API_TOKEN"}]
    assert denied[2]["withheld"] == [{"header": "X-Api-Key", "name": "OTHER_KEY"}]
    assert SECRET not in json.dumps(world.audit.events) and placeholder not in json.dumps(world.audit.events)
    # A host without rules is still reachable over plain HTTP.
    ok = await raw_exchange(world.port, f"GET http://plain.test:{port}/ HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
    assert ok.startswith(b"HTTP/1.1 200")


async def test_plain_http_opt_in_is_per_rule(world: World) -> None:
    await world.proxy.close()
    rules = (
        CredentialRule("api.test", "Authorization", "API_TOKEN", plain_http=True),
        CredentialRule("other.test", "X-Api-Key", "OTHER_KEY"),
    )
    w = await _start(world.tmp, world.ca, world.https, world.http, credentials=rules)
    placeholder = w.proxy.placeholders()["API_TOKEN"]
    port = w.http.port
    try:
        ok = await raw_exchange(
            w.port,
            f"GET http://api.test:{port}/in HTTP/1.1\r\nX-Token: {placeholder}\r\nConnection: close\r\n\r\n".encode(),
        )
        refused = await raw_exchange(w.port, f"GET http://other.test:{port}/out HTTP/1.1\r\n\r\n".encode())
    finally:
        await w.proxy.close()
    assert ok.startswith(b"HTTP/1.1 200")
    assert w.http.seen[-1].headers.get_all("authorization") == [SECRET]
    assert w.http.seen[-1].headers.get("x-token") == SECRET
    assert b"X-Kavach-Reason: credential over plain http" in refused
    assert [s.target for s in w.http.seen] == ["/in"]


async def test_placeholder_value_that_would_break_the_request_line_is_refused(world: World) -> None:
    # A value with a space, substituted into the request target, would split the request
    # line into other fields than the ones the proxy checked.
    await world.proxy.close()
    store = _store()
    store.set("API_TOKEN", "two words")
    proxy = EgressProxy(_config(world.ca, credentials=PLAIN_HTTP_RULES), store, sandbox_id="kv", audit=MemoryAudit())
    _h, port = await proxy.start_tcp()
    placeholder = proxy.placeholders()["API_TOKEN"]
    try:
        target = f"http://api.test:{world.http.port}/q?key={placeholder}"
        data = await raw_exchange(port, f"GET {target} HTTP/1.1\r\n\r\n".encode())
        header = await raw_exchange(
            port,
            f"GET http://api.test:{world.http.port}/h HTTP/1.1\r\nX-K: {placeholder}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
    finally:
        await proxy.close()
    assert data.startswith(b"HTTP/1.1 403")
    assert b"X-Kavach-Reason: credential value cannot go in a request line" in data
    assert header.startswith(b"HTTP/1.1 200")  # in a header, the same value is fine
    assert [s.target for s in world.http.seen] == ["/h"]


# -- client authentication (kavach proxy) ----------------------------------------------------------

CLIENT_TOKEN = "0123456789abcdef0123456789abcdef"


def _basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"kavach:{token}".encode()).decode()


@pytest.fixture
async def authed(world: World) -> AsyncIterator[World]:
    await world.proxy.close()
    audit = MemoryAudit()
    proxy = EgressProxy(_config(world.ca), _store(), sandbox_id="kv-auth", audit=audit, client_token=CLIENT_TOKEN)
    _host, port = await proxy.start_tcp()
    bundle = world.tmp / f"bundle-{port}.pem"
    bundle.write_bytes(proxy.ca_bundle_pem())
    try:
        yield replace(world, proxy=proxy, port=port, audit=audit, bundle=bundle)
    finally:
        await proxy.close()


@pytest.mark.parametrize(
    "auth",
    [None, _basic("wrong-token-wrong-token-00"), _basic(CLIENT_TOKEN).replace("Basic", "Bearer"), "Basic !!!"],
)
async def test_client_token_missing_or_wrong_gets_407(authed: World, auth: str | None) -> None:
    line = f"Proxy-Authorization: {auth}\r\n" if auth else ""
    for request in (
        f"GET http://plain.test:{authed.http.port}/ HTTP/1.1\r\n{line}\r\n",
        f"CONNECT api.test:{authed.https.port} HTTP/1.1\r\n{line}\r\n",
    ):
        data = await raw_exchange(authed.port, request.encode())
        assert data.startswith(b"HTTP/1.1 407 Proxy Authentication Required"), data[:200]
        assert b'Proxy-Authenticate: Basic realm="kavach"' in data
    assert authed.http.seen == [] and authed.https.seen == []
    events = [(e, p) for e, _s, p in authed.audit.events]
    assert [e for e, _p in events] == ["proxy.auth", "proxy.auth"]
    expected = "proxy authentication missing" if auth is None else "proxy authentication failed"
    assert {p["reason"] for _e, p in events} == {expected} and {p["status"] for _e, p in events} == {407}
    assert CLIENT_TOKEN not in json.dumps(authed.audit.events)


async def test_client_token_accepted_and_never_forwarded(authed: World) -> None:
    auth = f"Proxy-Authorization: {_basic(CLIENT_TOKEN)}\r\n"
    ok = await raw_exchange(
        authed.port, f"GET http://plain.test:{authed.http.port}/p HTTP/1.1\r\n{auth}Connection: close\r\n\r\n".encode()
    )
    assert ok.startswith(b"HTTP/1.1 200")
    # CONNECT carries the token once; a Proxy-Authorization inside the tunnel is not forwarded either.
    reader, writer = await asyncio.open_connection("127.0.0.1", authed.port)
    writer.write(f"CONNECT api.test:{authed.https.port} HTTP/1.1\r\n{auth}\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    context = ssl.create_default_context(cafile=str(authed.bundle))
    await writer.start_tls(context, server_hostname="api.test")
    writer.write(f"GET /t HTTP/1.1\r\nHost: api.test:{authed.https.port}\r\n{auth}Connection: close\r\n\r\n".encode())
    inner = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    assert inner.startswith(b"HTTP/1.1 200")
    assert authed.http.seen[-1].headers.get("proxy-authorization") is None
    assert authed.https.seen[-1].headers.get("proxy-authorization") is None
    assert authed.https.seen[-1].headers.get_all("authorization") == [SECRET]


@needs_curl
async def test_curl_uses_the_token_from_the_proxy_url(authed: World) -> None:
    url = f"http://kavach:{CLIENT_TOKEN}@127.0.0.1:{authed.port}"
    code, out, err = await curl("-x", url, "--cacert", str(authed.bundle), f"https://api.test:{authed.https.port}/c")
    assert code == 0, err
    assert json.loads(out)["authorization"] == [SECRET]
    code, _out, err = await curl(
        "-x", authed.url, "--cacert", str(authed.bundle), f"https://api.test:{authed.https.port}/"
    )
    assert code != 0 and "407" in err


def test_client_token_must_be_long_and_url_safe() -> None:
    for bad in ("short", "x" * 15, "has:colon-and-more-chars", "space in the token here"):
        with pytest.raises(PolicyError) as info:
            EgressProxy(ProxyConfig(), CredentialStore(), sandbox_id="kv", client_token=bad)
        assert info.value.field == "client_token" and bad not in str(info.value)


# -- connection limits -----------------------------------------------------------------------------


def test_connection_budget_leaves_headroom_and_charges_two_descriptors() -> None:
    assert connection_budget(1024) == (1024 - 256) // 2
    assert connection_budget(256) == (256 - 64) // 2
    assert connection_budget(64) == 0
    assert 0 < connection_budget(resource.RLIM_INFINITY) <= (1 << 20) // 2
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Never more connections than the process has descriptors for, two each.
    assert connection_budget(soft) * 2 < soft


async def test_connections_over_the_descriptor_budget_get_503(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    base = proxy_module._BUDGET.active
    monkeypatch.setattr(proxy_module, "connection_budget", lambda soft: base + 1)
    _held_reader, held_writer = await asyncio.open_connection("127.0.0.1", world.port)
    try:
        await asyncio.sleep(0.1)  # the proxy has taken the held connection
        # Nothing sent: the proxy closes without anything unread, so the 503 always arrives.
        refused = await raw_exchange(world.port, b"")
        assert refused.startswith(b"HTTP/1.1 503") and b"X-Kavach-Reason: too many connections" in refused
    finally:
        held_writer.close()
    events = [p for e, _s, p in world.audit.events if e == "proxy.connection"]
    assert events == [
        {"decision": "refused", "reason": "file descriptor budget of this process", "status": 503, "count": 1}
    ]
    assert world.http.seen == []
    for _ in range(50):  # the held connection's charge is returned once it closes
        if proxy_module._BUDGET.active == base:
            break
        await asyncio.sleep(0.05)
    ok = await raw_exchange(
        world.port, f"GET http://plain.test:{world.http.port}/ HTTP/1.1\r\nConnection: close\r\n\r\n".encode()
    )
    assert ok.startswith(b"HTTP/1.1 200")


async def test_client_that_stops_reading_is_dropped_after_idle_timeout(world: World) -> None:
    # One connection allowed: while a client that reads nothing holds it, others get 503.
    await world.proxy.close()
    w = await _start(
        world.tmp, world.ca, world.https, world.http, idle_timeout=0.5, max_connections=1, credentials=PLAIN_HTTP_RULES
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        try:
            served = await _stall_then_probe(w)
        finally:
            await w.proxy.close()
        gc.collect()
    assert served.startswith(b"HTTP/1.1 200"), served[:200]
    assert 1 < len(w.http.seen) < 300  # the stuck client was being served, then dropped
    for _ in range(50):  # and the upstream connection it was using went with it
        if w.http.open == 0:
            break
        await asyncio.sleep(0.05)
    assert w.http.open == 0
    # Closed by the proxy, not left for the garbage collector to find.
    assert [str(c.message) for c in caught if "unclosed" in str(c.message)] == []


async def _stall_then_probe(w: World) -> bytes:
    """Have a client that never reads pipeline requests, then probe until another is served."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", w.port))
    _reader, writer = await asyncio.open_connection(sock=sock)
    try:
        # Responses the proxy sends whole, more of them than any buffer holds. The host
        # alternates, so each request has an upstream connection of its own.
        requests = [
            f"GET http://{host}:{w.http.port}/big/60000 HTTP/1.1\r\n\r\n".encode()
            for host in ("plain.test", "other.test") * 150
        ]
        writer.write(b"".join(requests))
        await writer.drain()
        served = b""
        for _ in range(60):
            await asyncio.sleep(0.25)
            served = await probe(
                w.port, f"GET http://plain.test:{w.http.port}/ok HTTP/1.1\r\nConnection: close\r\n\r\n".encode()
            )
            if served.startswith(b"HTTP/1.1 200"):
                break
        return served
    finally:
        writer.close()


# -- TLS -------------------------------------------------------------------------------------------


async def test_expired_proxy_ca_gives_502_not_a_broken_connection(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kavach.credentials import tls

    later = tls._now() + tls.CA_VALIDITY + datetime.timedelta(days=1)
    monkeypatch.setattr(tls, "_now", lambda: later)
    data = await raw_exchange(world.port, f"CONNECT api.test:{world.https.port} HTTP/1.1\r\n\r\n".encode())
    assert data.startswith(b"HTTP/1.1 502") and b"X-Kavach-Reason: proxy CA expired" in data
    failed = [p for e, _s, p in world.audit.events if e == "proxy.tls"]
    assert failed and "expired" in failed[-1]["reason"]


async def test_closing_the_proxy_with_open_connections_logs_no_error(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    # close() cancels connections; asyncio's stream machinery used to log each as failing.
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
    writer.write(b"GET http://plain.test/ HTTP/1.1\r\n")  # an unfinished head: the proxy waits
    await writer.drain()
    await asyncio.sleep(0.1)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        await world.proxy.close()
        assert await asyncio.wait_for(reader.read(-1), 10) == b""
        await asyncio.sleep(0.1)
    writer.close()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
