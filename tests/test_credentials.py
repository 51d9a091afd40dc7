"""Secrets, egress rules, address checks, HTTP parsing limits and the proxy option parser."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kavach.credentials import (
    CredentialRule,
    CredentialStore,
    EgressProxy,
    ProxyConfig,
    SecretRef,
    env,
    file,
    parse_proxy_options,
    resolve_secrets,
    stdin,
    tls,
)
from kavach.credentials.http import HttpError, parse_request_head, request_framing
from kavach.credentials.options import parse_credential
from kavach.credentials.rules import (
    AddressGuard,
    EgressDenied,
    EgressRules,
    HostRule,
    Resolver,
    parse_cidrs,
    resolve_pinned,
)
from kavach.credentials.tls import LEAF_CACHE_SIZE, CertificateAuthority
from kavach.errors import CredentialError, PolicyError

VALUE = "tok-VALUE-0123456789"

# -- secrets ---------------------------------------------------------------------------------------


def test_store_never_shows_values_and_names_missing_secret() -> None:
    store = CredentialStore()
    store.set("API", VALUE)
    assert VALUE not in repr(store) and "API" in repr(store)
    with pytest.raises(CredentialError, match="secret MISSING") as info:
        store.get("MISSING")
    assert VALUE not in str(info.value)


def test_store_from_env_and_files(tmp_path: Path) -> None:
    store = CredentialStore.from_env({"api": "OP_TOKEN"}, environ={"OP_TOKEN": VALUE})
    assert store.get("api") == VALUE
    with pytest.raises(CredentialError, match="OP_MISSING is not set"):
        CredentialStore.from_env({"api": "OP_MISSING"}, environ={})
    path = tmp_path / "secret"
    path.write_text(VALUE + "\n")
    assert CredentialStore.from_files({"f": path}).get("f") == VALUE
    with pytest.raises(CredentialError, match="secret g: cannot read"):
        CredentialStore.from_files({"g": tmp_path / "nope"})


def test_resolve_secrets_env_file_stdin_and_repr_hides_values() -> None:
    store = CredentialStore()
    store.set("a", VALUE)
    store.set("b", "second-value")
    store.set("c", "third-value")
    resolved = resolve_secrets(
        [SecretRef("a", env("A_VAR")), SecretRef("b", file("/run/secrets/b", 0o400)), SecretRef("c", stdin())],
        store,
    )
    assert resolved.env == {"A_VAR": VALUE}
    assert resolved.files[0].path == "/run/secrets/b" and resolved.files[0].data == b"second-value"
    assert resolved.stdin == b"third-value\n"
    assert set(resolved.values) == {VALUE, "second-value", "third-value"}
    for text in (repr(resolved), repr(resolved.files[0]), repr(SecretRef("a", env("A_VAR")))):
        assert VALUE not in text and "second-value" not in text and "third-value" not in text


def test_resolve_secrets_uses_placeholders_for_proxy_bound_secrets() -> None:
    store = CredentialStore()
    store.set("API_TOKEN", VALUE)
    proxy = EgressProxy(
        ProxyConfig(
            allow=("api.example.com",), credentials=(CredentialRule("api.example.com", "Authorization", "API_TOKEN"),)
        ),
        store,
        sandbox_id="kv-unit",
    )
    resolved = resolve_secrets([SecretRef("API_TOKEN", env("API_TOKEN"))], store, proxy.placeholders())
    assert resolved.env["API_TOKEN"].startswith("KAVACH_PLACEHOLDER_")
    assert VALUE not in resolved.env.values() and resolved.values == ()


def test_secret_injection_rejects_bad_specs() -> None:
    with pytest.raises(CredentialError):
        env("1BAD")
    with pytest.raises(CredentialError):
        file("relative/path")
    with pytest.raises(CredentialError):
        file("/run/../etc/passwd")
    store = CredentialStore()
    store.set("a", VALUE)
    with pytest.raises(CredentialError, match="only one secret"):
        resolve_secrets([SecretRef("a", stdin()), SecretRef("a", stdin())], store)


def test_proxy_refuses_credential_value_unfit_for_a_header() -> None:
    store = CredentialStore()
    store.set("bad", "line1\r\nInjected: yes")
    with pytest.raises(CredentialError, match="secret bad") as info:
        EgressProxy(
            ProxyConfig(allow=("a.example",), credentials=(CredentialRule("a.example", "X-Key", "bad"),)),
            store,
            sandbox_id="kv",
        )
    assert "Injected" not in str(info.value)


def test_proxy_refuses_credential_value_that_is_not_latin1_naming_the_secret() -> None:
    # Heads go out as latin-1: such a value used to fail on every request at send time.
    store = CredentialStore()
    store.set("euro", "tok-\u20ac-uro")
    with pytest.raises(CredentialError, match=r"secret euro.*latin-1") as info:
        EgressProxy(
            ProxyConfig(allow=("a.example",), credentials=(CredentialRule("a.example", "X-Key", "euro"),)),
            store,
            sandbox_id="kv",
        )
    assert "\u20ac" not in str(info.value) and "tok-" not in str(info.value)
    store.set("latin", "caf\xe9-token")  # latin-1 (obs-text) is accepted
    EgressProxy(
        ProxyConfig(allow=("a.example",), credentials=(CredentialRule("a.example", "X-Key", "latin"),)),
        store,
        sandbox_id="kv",
    )


def test_credential_rule_host_takes_no_scheme() -> None:
    store = CredentialStore()
    store.set("k", VALUE)
    with pytest.raises(PolicyError) as info:
        EgressProxy(
            ProxyConfig(allow=("a.example",), credentials=(CredentialRule("http://a.example", "X-Key", "k"),)),
            store,
            sandbox_id="kv",
        )
    assert info.value.field == "proxy.credentials" and "plain_http" in str(info.value)


# -- rules -----------------------------------------------------------------------------------------


def test_host_rule_parsing() -> None:
    assert HostRule.parse("API.Example.com.", "f") == HostRule("api.example.com")
    assert HostRule.parse("*.example.com:443", "f") == HostRule("*.example.com", 443)
    assert HostRule.parse("GET,head api.example.com", "f").methods == frozenset({"GET", "HEAD"})
    assert HostRule.parse("[::1]:8080", "f") == HostRule("::1", 8080)
    for bad in ("", "exa mple.com", "host:99999", "*.1.2.3.4", "ex_ample..com", "a/b"):
        with pytest.raises(PolicyError) as info:
            HostRule.parse(bad, "--allow")
        assert info.value.field == "--allow"


def test_wildcards_ports_methods_and_deny_wins() -> None:
    rules = EgressRules(["*.example.com", "api.other.com:443", "GET other.org"], ["bad.example.com"])
    rules.check_destination("a.example.com", 443)
    rules.check_destination("x.y.example.com", 80)
    with pytest.raises(EgressDenied, match="not allowlisted"):
        rules.check_destination("example.com", 443)  # *.domain does not cover the domain itself
    with pytest.raises(EgressDenied, match="not allowlisted"):
        rules.check_destination("evilexample.com", 443)
    with pytest.raises(EgressDenied, match="denylisted"):
        rules.check_destination("bad.example.com", 443)
    with pytest.raises(EgressDenied, match="not allowlisted"):
        rules.check_destination("api.other.com", 80)
    rules.check_request("other.org", 80, "GET")
    with pytest.raises(EgressDenied, match="method not allowed"):
        rules.check_request("other.org", 80, "POST")
    assert rules.restricts_methods("other.org", 443) and not rules.restricts_methods("a.example.com", 443)
    with pytest.raises(EgressDenied, match="allowlist empty"):
        EgressRules([], []).check_destination("example.com", 443)


def test_ip_literals_match_only_exact_entries() -> None:
    rules = EgressRules(["*.example.com", "93.184.216.34"], [])
    rules.check_destination("93.184.216.34", 80)
    with pytest.raises(EgressDenied):
        rules.check_destination("93.184.216.35", 80)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fd00:ec2::254",
        "::ffff:127.0.0.1",
        # IPv6 that carries or reaches an IPv4 address, or has no global scope. Python 3.11's
        # is_global accepts all of these but Teredo.
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b::6440:1",  # NAT64 of 100.64.0.1 (CGNAT)
        "64:ff9b:1::808:808",  # local-use NAT64, whatever it carries
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:808:808::1",  # 6to4 of a public address: deprecated, refused all the same
        "2001::1",  # Teredo
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
        "::7f00:1",  # IPv4-compatible 127.0.0.1
        "::808:808",  # IPv4-compatible, public
        "::ffff:0:7f00:1",  # IPv4-translated (SIIT) 127.0.0.1
        "fec0::1",  # site-local
        "1:2::3",  # elsewhere in the reserved ::/8
    ],
)
def test_address_guard_refuses_non_public(address: str) -> None:
    guard = AddressGuard(())
    with pytest.raises(EgressDenied, match=r"(private|metadata) address"):
        guard.check(ipaddress.ip_address(address))


def test_address_guard_nat64_is_judged_by_the_ipv4_address_it_carries() -> None:
    # DNS64 answers IPv4-only names this way on IPv6-only hosts: a public one passes.
    AddressGuard(()).check(ipaddress.ip_address("64:ff9b::808:808"))
    with pytest.raises(EgressDenied, match="metadata address"):
        AddressGuard(()).check(ipaddress.ip_address("64:ff9b::a9fe:a9fe"))  # 169.254.169.254
    # An IPv4 CIDR does not admit it (the translator, not this host, would dial it) ...
    with pytest.raises(EgressDenied, match=r"NAT64 of 127\.0\.0\.1"):
        AddressGuard(parse_cidrs(["127.0.0.0/8"], "f")).check(ipaddress.ip_address("64:ff9b::7f00:1"))
    # ... an IPv6 CIDR that names the range does, as for the other embedding ranges.
    AddressGuard(parse_cidrs(["64:ff9b::/96"], "f")).check(ipaddress.ip_address("64:ff9b::7f00:1"))
    AddressGuard(parse_cidrs(["2002::/16"], "f")).check(ipaddress.ip_address("2002:7f00:1::1"))
    AddressGuard(parse_cidrs(["fec0::/10"], "f")).check(ipaddress.ip_address("fec0::1"))


async def test_name_resolving_to_embedded_loopback_is_refused() -> None:
    resolver = Resolver({"sneaky.test": ["64:ff9b::7f00:1"], "six.test": ["2002:7f00:1::1"]})
    for name in ("sneaky.test", "six.test"):
        with pytest.raises(EgressDenied, match="private address"):
            await resolve_pinned(resolver, AddressGuard(()), name, 443)


def test_address_guard_allows_public_and_listed_private() -> None:
    AddressGuard(()).check(ipaddress.ip_address("93.184.216.34"))
    AddressGuard(()).check(ipaddress.ip_address("2606:2800:220:1::1"))
    guard = AddressGuard(parse_cidrs(["127.0.0.0/8", "10.0.0.0/8"], "f"))
    guard.check(ipaddress.ip_address("127.0.0.1"))
    guard.check(ipaddress.ip_address("::ffff:10.2.3.4"))
    with pytest.raises(EgressDenied, match="metadata"):
        guard.check(ipaddress.ip_address("169.254.169.254"))
    with pytest.raises(PolicyError):
        parse_cidrs(["10.0.0.0/33"], "--allow-private")


async def test_resolver_static_hosts_and_numeric_forms() -> None:
    resolver = Resolver({"api.test": ["127.0.0.1"]})
    assert await resolver.resolve("api.test", 443) == (ipaddress.ip_address("127.0.0.1"),)
    # A decimal host is resolved by the system to 127.0.0.1; the address check still sees it.
    addresses = await resolver.resolve("2130706433", 80)
    with pytest.raises(EgressDenied):
        AddressGuard(()).check(addresses[0])


# -- HTTP parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n",
        b"GET /\x7f HTTP/1.1\r\n\r\n",
        b"G@T / HTTP/1.1\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
    ],
)
def test_request_head_rejects_control_characters(head: bytes) -> None:
    with pytest.raises(HttpError) as info:
        parse_request_head(head)
    assert info.value.status == 400


def test_request_framing_rejects_smuggling_shapes() -> None:
    for headers in (
        "Transfer-Encoding: gzip, chunked",
        "Content-Length: -1",
        "Content-Length: 1, 2",
        "Transfer-Encoding: chunked\r\nContent-Length: 3",
    ):
        request = parse_request_head(f"POST / HTTP/1.1\r\n{headers}\r\n\r\n".encode())
        with pytest.raises(HttpError):
            request_framing(request)
    request = parse_request_head(b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n")
    assert request_framing(request).length == 3


# -- TLS -------------------------------------------------------------------------------------------


def test_leaf_certificates_are_cached_and_signed_by_the_ca() -> None:
    ca = CertificateAuthority("kavach test")
    first = ca.server_context("api.example.com", None)
    assert ca.server_context("api.example.com", None) is first
    leaf = ca.mint_leaf("api.example.com")
    assert leaf.issuer == ca.certificate.subject
    leaf.verify_directly_issued_by(ca.certificate)


def test_leaf_cache_is_bounded_least_recently_used_first() -> None:
    assert LEAF_CACHE_SIZE == 256
    ca = CertificateAuthority("kavach test")
    kept = ca.server_context("h0.example", None)
    evicted = ca.server_context("h1.example", None)
    assert ca.server_context("h0.example", None) is kept  # used again: h1 is now the oldest
    for i in range(2, LEAF_CACHE_SIZE + 1):
        ca.server_context(f"h{i}.example", None)
    assert ca.server_context("h0.example", None) is kept
    assert ca.server_context("h1.example", None) is not evicted  # minted anew


def test_leaf_is_renewed_before_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    ca = CertificateAuthority("kavach test")
    start = tls._now()
    first = ca.server_context("api.example.com", None)
    monkeypatch.setattr(
        tls, "_now", lambda: start + tls.LEAF_VALIDITY - tls.LEAF_RENEW_BEFORE - datetime.timedelta(hours=1)
    )
    assert ca.server_context("api.example.com", None) is first
    later = start + tls.LEAF_VALIDITY - tls.LEAF_RENEW_BEFORE + datetime.timedelta(hours=1)
    monkeypatch.setattr(tls, "_now", lambda: later)
    assert ca.server_context("api.example.com", None) is not first
    assert ca.mint_leaf("api.example.com").not_valid_after_utc > start + tls.LEAF_VALIDITY
    # Past the CA's own end no leaf is minted: clients could not accept it.
    monkeypatch.setattr(tls, "_now", lambda: start + tls.CA_VALIDITY + datetime.timedelta(hours=1))
    with pytest.raises(CredentialError, match="CA has expired"):
        ca.server_context("api.example.com", None)


# -- option parsing --------------------------------------------------------------------------------


def test_parse_proxy_options_reads_credential_from_environment(tmp_path: Path) -> None:
    options = parse_proxy_options(
        allow=["api.example.com"],
        credentials=["api.example.com=Authorization:API_TOKEN"],
        allow_private=["10.0.0.0/8"],
        environ={"API_TOKEN": VALUE},
    )
    assert options.config.credentials == (CredentialRule("api.example.com", "Authorization", "API_TOKEN"),)
    assert options.store.get("API_TOKEN") == VALUE
    assert options.secret_refs == (SecretRef("API_TOKEN", env("API_TOKEN")),)
    assert VALUE not in repr(options)
    resolved = parse_proxy_options(allow=["api.test"], resolve=["api.test=127.0.0.1"], environ={})
    assert resolved.config.static_hosts == (("api.test", "127.0.0.1"),)


def test_parse_credential_http_prefix_opts_in_to_plain_http() -> None:
    assert parse_credential("api.example.com=Authorization:T") == CredentialRule(
        "api.example.com", "Authorization", "T", plain_http=False
    )
    assert parse_credential("http://api.internal:8080=Authorization:T") == CredentialRule(
        "api.internal:8080", "Authorization", "T", plain_http=True
    )
    for bad in ("https://api.example.com=Authorization:T", "ftp://a.example=X:T", "http://=X:T"):
        with pytest.raises(PolicyError) as info:
            parse_credential(bad)
        assert info.value.field == "--credential"


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"allow": ["bad host"]}, "--allow"),
        ({"deny": ["x:0"]}, "--deny"),
        ({"allow_private": ["nope"]}, "--allow-private"),
        ({"credentials": ["api.example.com"]}, "--credential"),
        ({"credentials": ["api.example.com=Bad Header:X"]}, "--credential"),
        ({"credentials": ["api.example.com=Authorization:UNSET_VAR_X"]}, "--credential"),
        ({"upstream_ca": "/nonexistent/ca.pem"}, "--upstream-ca"),
        ({"resolve": ["api.test"]}, "--resolve"),
        ({"resolve": ["api.test=not-an-ip"]}, "--resolve"),
    ],
)
def test_parse_proxy_options_names_the_flag(kwargs: dict[str, object], flag: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_proxy_options(environ={}, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == flag


# -- CLI -------------------------------------------------------------------------------------------


def _app() -> typer.Typer:
    from kavach.cli.proxy import register

    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test app."""

    register(app)
    return app


def test_cli_bad_input_is_one_line_exit_2() -> None:
    runner = CliRunner()
    result = runner.invoke(_app(), ["proxy", "--allow", "bad host"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("kavach: error: --allow")
    assert "Traceback" not in result.output
    result = runner.invoke(
        _app(), ["proxy", "--allow", "a.example", "--credential", "a.example=X-Key:KV_TEST_UNSET"], env={}
    )
    assert result.exit_code == 2 and "KV_TEST_UNSET is not set" in result.output


_CLI_PROXY = (
    "import typer\nfrom kavach.cli.proxy import register\napp = typer.Typer()\n"
    "@app.callback()\ndef main() -> None: pass\nregister(app)\napp()\n"
)


def _start_cli_proxy(*args: str, lines: int) -> tuple[subprocess.Popen[str], str]:
    """``kavach proxy ARGS`` in a subprocess, and the first ``lines`` lines it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLI_PROXY, "proxy", "--listen", "127.0.0.1:0", *args, "--no-audit"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "KV_CLI_TOKEN": VALUE},
        text=True,
    )
    assert proc.stdout is not None
    # Read them before communicate(), which would bypass the buffer.
    return proc, "".join(proc.stdout.readline() for _ in range(lines))


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    return stdout, stderr


def test_cli_listen_must_be_loopback_unless_remote_clients_allowed() -> None:
    from kavach.cli.proxy import _parse_listen, _proxy_url

    runner = CliRunner()
    for listen in ("0.0.0.0:0", "[::]:0", "192.0.2.1:8080"):
        result = runner.invoke(_app(), ["proxy", "--listen", listen, "--no-audit"])
        assert result.exit_code == 2, result.output
        assert result.output.strip().startswith("kavach: error: --listen") and "--allow-remote-clients" in result.output
    assert _parse_listen("0.0.0.0:8080", allow_remote=True) == ("0.0.0.0", 8080)
    assert _parse_listen("[::1]:8080") == ("::1", 8080)
    # The printed URL must be usable as it is: an IPv6 host needs its brackets.
    assert _proxy_url("t" * 32, "::1", 8080) == f"http://kavach:{'t' * 32}@[::1]:8080"


def test_cli_runs_standalone_proxy_and_never_prints_the_value(tmp_path: Path) -> None:
    ca_out = tmp_path / "ca.pem"
    proc, first = _start_cli_proxy(
        "--allow",
        "api.example.com",
        "--credential",
        "api.example.com=Authorization:KV_CLI_TOKEN",
        "--ca-out",
        str(ca_out),
        lines=3,  # listening, CA bundle, one placeholder
    )
    try:
        match = re.search(r"listening on (http://kavach:([0-9a-f]{32})@127\.0\.0\.1:(\d+))$", first, re.M)
        assert match, first
        url, token, port = match.group(1), match.group(2), int(match.group(3))

        def fetch(proxy: str) -> str:
            argv = ["curl", "-sS", "-i", "--max-time", "5", "-x", proxy, "http://denied.example/"]
            return subprocess.run(argv, capture_output=True, text=True, check=False).stdout

        # The printed URL carries the token; without it, nothing is served.
        assert "X-Kavach-Reason: not allowlisted" in fetch(url)
        refused = fetch(f"http://127.0.0.1:{port}")
        assert refused.startswith("HTTP/1.1 407") and 'Proxy-Authenticate: Basic realm="kavach"' in refused
        assert "HTTP/1.1 407" in fetch(f"http://kavach:{'0' * 32}@127.0.0.1:{port}")
        assert base64.b64encode(f"kavach:{token}".encode()).decode() not in refused
        assert ca_out.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    finally:
        stdout, stderr = _stop(proc)
    assert "placeholder KV_CLI_TOKEN=KAVACH_PLACEHOLDER_" in first + stdout
    assert VALUE not in first + stdout + stderr
    assert ca_out.exists(), "a bundle the caller asked for (--ca-out) is kept"


def test_cli_proxy_default_bundle_is_a_fresh_temporary_file_removed_on_exit() -> None:
    # Without --ca-out the bundle goes to a new file in the temporary directory: a
    # name derived from the pid alone could be planted there (a symlink) before the proxy
    # starts, and the bundle would outlive the CA it names.
    proc, first = _start_cli_proxy(lines=2)
    try:
        match = re.search(r"CA bundle (\S+)", first)
        assert match, first
        bundle = Path(match.group(1))
        assert bundle.parent == Path(tempfile.gettempdir())
        assert bundle.name != f"kavach-proxy-{proc.pid}-ca.pem"
        assert stat.S_IMODE(bundle.stat().st_mode) == 0o644
        assert bundle.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    finally:
        _stop(proc)
    assert not bundle.exists()


def test_cli_proxy_sigterm_right_after_listening_still_cleans_up() -> None:
    # A supervisor may stop the proxy the moment it reads "listening": the handlers must be
    # in place by then, or the default disposition kills it with the bundle left behind.
    for _ in range(3):
        proc, first = _start_cli_proxy(lines=2)
        proc.send_signal(signal.SIGTERM)
        _stop(proc)
        match = re.search(r"CA bundle (\S+)", first)
        assert match, first
        assert not Path(match.group(1)).exists()


def test_async_audit_sink_is_supported() -> None:
    class AsyncAudit:
        def __init__(self) -> None:
            self.events: list[str] = []

        async def append(self, event: str, **_: object) -> None:
            self.events.append(event)

    async def go() -> list[str]:
        sink = AsyncAudit()
        proxy = EgressProxy(ProxyConfig(), CredentialStore(), sandbox_id="kv", audit=sink)
        _h, port = await proxy.start_tcp()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET http://x.example/ HTTP/1.1\r\n\r\n")
        await reader.read(-1)
        writer.close()
        await proxy.close()
        return sink.events

    assert asyncio.run(go()) == ["proxy.request"]


# -- fuzz: untrusted input only ever yields the parser's own errors -----------------------------


_HEAD_ALPHABET = st.sampled_from(
    [
        b"GET",
        b"POST",
        b" ",
        b"\r",
        b"\n",
        b"\r\n",
        b":",
        b"HTTP/1.1",
        b"/",
        b"a",
        b"\x00",
        b"\t",
        b"\x7f",
        b"\xff",
        b"Content-Length",
        b"Transfer-Encoding",
        b"chunked",
        b"0",
        b"5",
        b",",
        b"-",
    ]
)


@settings(max_examples=250, deadline=None)
@given(st.lists(_HEAD_ALPHABET, max_size=40).map(b"".join))
def test_fuzz_request_head_raises_only_http_error(data: bytes) -> None:
    try:
        request = parse_request_head(data + b"\r\n\r\n")
    except HttpError:
        return
    # Whatever parsed holds no CR, LF or NUL anywhere: nothing can be injected downstream.
    for text in (request.method, request.target, *(x for kv in request.headers.items for x in kv)):
        assert not set(text) & {"\r", "\n", "\0"}
    with contextlib.suppress(HttpError):
        request_framing(request)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_fuzz_host_rules_raise_only_policy_error(entry: str) -> None:
    try:
        rule = HostRule.parse(entry, "--allow")
    except PolicyError:
        return
    assert rule.host == rule.host.lower() and " " not in rule.host
