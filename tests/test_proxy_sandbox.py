"""Egress proxy, sandbox side: sandboxed curl and /usr/bin/python3 reach a local HTTPS upstream
only through the proxy, and see only placeholders.

The sandbox is a real Process-backend sandbox (network namespace with only loopback). The
backend creates the proxy's listening socket inside that namespace and hands it to the host
(``Instance.take_proxy_listener``); the proxy runs on the host and dials the upstream on the
host's 127.0.0.1. These tests drive the driver directly with the same environment and CA file
the lifecycle gives a sandbox, so they exercise the proxy/backend contract on their own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from kavach.backends.base import ExecRequest, InjectedFile, Instance, LaunchSpec, RawResult
from kavach.credentials import CredentialRule, EgressProxy, ProxyConfig
from kavach.policy import NetworkMode, NetworkPolicy, SandboxPolicy
from test_proxy import OTHER_SECRET, SECRET, STATIC, MemoryAudit, _store
from test_proxy_support import Upstream, make_test_ca

PROXY_LISTEN = ("127.0.0.1", 3128)
CA_PATH = "/run/kavach/ca-bundle.pem"


def _driver() -> Any:
    try:
        from kavach.backends.process.driver import ProcessDriver
    except ImportError as exc:  # the Process backend is another issue's work
        pytest.skip(f"Process backend not importable: {exc}")
    driver = ProcessDriver()
    probe = driver.probe()
    if not probe.usable:
        pytest.skip(f"Process backend unusable here: {probe.reason}")
    return driver


def _policy(mode: NetworkMode) -> SandboxPolicy:
    return replace(SandboxPolicy.preset("basic"), network=NetworkPolicy(mode=mode, egress_allowlist=("api.test",)))


@dataclass
class SandboxWorld:
    instance: Instance
    proxy: EgressProxy
    audit: MemoryAudit
    upstream: Upstream
    env: dict[str, str]

    async def run(self, *argv: str) -> RawResult:
        return await self.instance.exec(ExecRequest(argv=argv, env=self.env, timeout_ms=20_000))


@pytest.fixture
async def sandboxed(tmp_path: Path) -> AsyncIterator[SandboxWorld]:
    driver = _driver()
    ca = make_test_ca(tmp_path / "upstream")
    upstream = await Upstream(echo_authorization=False).start(ca.server_context())
    audit = MemoryAudit()
    config = ProxyConfig(
        allow=("api.test", "other.test", "127.0.0.1", "169.254.169.254"),
        allow_private=("127.0.0.0/8",),
        credentials=(
            CredentialRule("api.test", "Authorization", "API_TOKEN"),
            CredentialRule("other.test", "X-Api-Key", "OTHER_KEY"),
        ),
        upstream_ca=str(ca.ca_pem),
        static_hosts=STATIC,
    )
    proxy = EgressProxy(config, _store(), sandbox_id="kv-sbx", audit=audit)
    env = {
        "PATH": "/usr/bin:/bin",
        **proxy.placeholders(),
        **proxy.sandbox_env(f"http://{PROXY_LISTEN[0]}:{PROXY_LISTEN[1]}", CA_PATH),
    }
    spec = LaunchSpec(
        sandbox_id="kv-sbx",
        policy=_policy(NetworkMode.PROXY),
        env=env,
        files=(InjectedFile(CA_PATH, proxy.ca_bundle_pem(), 0o444),),
        proxy_listen=PROXY_LISTEN,
    )
    instance = await driver.start(spec)
    listener = instance.take_proxy_listener()
    assert listener is not None
    serve = asyncio.create_task(proxy.serve(listener))
    try:
        yield SandboxWorld(instance, proxy, audit, upstream, env)
    finally:
        await proxy.close()
        serve.cancel()
        await asyncio.gather(serve, return_exceptions=True)
        await instance.destroy()
        await upstream.close()


async def test_sandboxed_curl_reaches_upstream_with_injected_authorization(sandboxed: SandboxWorld) -> None:
    result = await sandboxed.run("/usr/bin/curl", "-sS", f"https://api.test:{sandboxed.upstream.port}/v1")
    assert result.exit_code == 0, result.stderr
    assert sandboxed.upstream.seen[-1].headers.get_all("authorization") == [SECRET]
    assert json.loads(result.stdout)["target"] == "/v1"


async def test_sandboxed_python_urllib_reaches_upstream(sandboxed: SandboxWorld) -> None:
    script = (
        "import urllib.request, json, sys\n"
        f"r = urllib.request.urlopen('https://api.test:{sandboxed.upstream.port}/py', timeout=10)\n"
        "sys.stdout.write(json.dumps({'status': r.status}))\n"
    )
    result = await sandboxed.run("/usr/bin/python3", "-c", script)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"status": 200}
    assert sandboxed.upstream.seen[-1].target == "/py"
    assert sandboxed.upstream.seen[-1].headers.get_all("authorization") == [SECRET]


async def test_sandbox_sees_only_placeholders(sandboxed: SandboxWorld) -> None:
    placeholder = sandboxed.proxy.placeholders()["API_TOKEN"]
    # The pattern matches the secret without containing it, so passing it in leaks nothing.
    pattern = SECRET.replace("-", "[-]", 1)
    script = (
        "env; cat /proc/self/environ /proc/1/environ /proc/self/cmdline 2>/dev/null | tr '\\0' '\\n'; "
        "echo CONTROL:; grep -lE 'KAVACH_PLACEHOLDER_[0-9a-f]+' /proc/self/environ; "
        'echo FILES-WITH-SECRET:; grep -rlE "$PATTERN" /run /tmp /etc /root /home /var /proc/self/environ '
        "2>/dev/null; true"
    )
    env = {**sandboxed.env, "PATTERN": pattern}
    result = await sandboxed.instance.exec(ExecRequest(argv=("/bin/sh", "-c", script), env=env))
    output = result.stdout.decode(errors="replace")
    assert f"API_TOKEN={placeholder}" in output
    assert SECRET not in output and OTHER_SECRET not in output
    # Control: the same grep finds the placeholder, so an empty list below means "not there".
    assert "CONTROL:\n/proc/self/environ\n" in output
    assert output.rstrip().endswith("FILES-WITH-SECRET:")
    # The CA bundle holds the sandbox CA certificate, never a private key.
    bundle = await sandboxed.instance.read_file(CA_PATH, 1 << 20)
    assert b"BEGIN CERTIFICATE" in bundle and b"PRIVATE KEY" not in bundle
    assert SECRET.encode() not in bundle


async def test_sandbox_refusals_non_allowlisted_metadata_and_loopback(sandboxed: SandboxWorld) -> None:
    port = sandboxed.upstream.port
    cases = {
        f"http://nothere.test:{port}/": "not allowlisted",
        "http://169.254.169.254/latest/meta-data/": "metadata address",
        # api.test has a credential rule, which holds for HTTPS only.
        f"http://api.test:{port}/": "credential over plain http",
    }
    for url, reason in cases.items():
        result = await sandboxed.run("/usr/bin/curl", "-sS", "-i", url)
        assert f"X-Kavach-Reason: {reason}" in result.stdout.decode(), url
    # Without the proxy, the sandbox's own loopback has no upstream: the host's is not reachable.
    direct = await sandboxed.run("/usr/bin/curl", "-sS", "--noproxy", "*", f"http://127.0.0.1:{port}/")
    assert direct.exit_code != 0
    assert sandboxed.upstream.seen == []
    reasons = {p["reason"] for p in sandboxed.audit.decisions("denied")}
    assert reasons >= {"not allowlisted", "metadata address", "credential over plain http"}


async def test_sandbox_placeholder_to_other_host_refused_and_audited(sandboxed: SandboxWorld) -> None:
    placeholder = sandboxed.proxy.placeholders()["API_TOKEN"]
    result = await sandboxed.run(
        "/bin/sh", "-c", f'curl -sS -i -H "X-Api-Key: $API_TOKEN" https://other.test:{sandboxed.upstream.port}/'
    )
    assert "X-Kavach-Reason: placeholder sent to a host it is not bound to" in result.stdout.decode()
    assert sandboxed.upstream.seen == []
    denied = sandboxed.audit.decisions("denied")
    assert denied[-1]["placeholder_of"] == "API_TOKEN" and denied[-1]["host"] == "other.test"
    assert placeholder not in json.dumps(sandboxed.audit.events)


async def test_network_off_reaches_nothing_not_even_a_proxy(tmp_path: Path) -> None:
    driver = _driver()
    upstream = await Upstream().start()
    # A proxy listening on the host's loopback at the same port a proxy sandbox would use.
    proxy = EgressProxy(
        ProxyConfig(allow=("api.test",), allow_private=("127.0.0.0/8",), static_hosts=STATIC), _store(), sandbox_id="x"
    )
    host, port = await proxy.start_tcp("127.0.0.1", 0)
    spec = LaunchSpec(sandbox_id="kv-off", policy=_policy(NetworkMode.OFF), env={"PATH": "/usr/bin:/bin"})
    instance = await driver.start(spec)
    try:
        assert instance.take_proxy_listener() is None
        for url, via in (
            (f"http://api.test:{upstream.port}/", f"http://{host}:{port}"),
            (f"http://127.0.0.1:{upstream.port}/", ""),
            ("http://127.0.0.1:3128/", ""),
        ):
            args = ["/usr/bin/curl", "-sS", "--max-time", "5", url]
            if via:
                args[1:1] = ["-x", via]
            result = await instance.exec(ExecRequest(argv=tuple(args), env={"PATH": "/usr/bin:/bin"}))
            assert result.exit_code != 0, url
        assert upstream.seen == []
    finally:
        await instance.destroy()
        await proxy.close()
        await upstream.close()


# -- through kavach.Sandbox (the lifecycle wiring) -------------------------------------------------


def _lifecycle() -> Any:
    try:
        from kavach import lifecycle
    except ImportError as exc:
        pytest.skip(f"kavach.lifecycle not importable yet: {exc}")
    return lifecycle


def _sandbox_config(tmp_path: Path, mode: NetworkMode, proxy: ProxyConfig | None, **kwargs: Any) -> Any:
    from kavach.backends.names import Backend
    from kavach.config import AuditSettings, SandboxConfig

    return SandboxConfig(
        backend=Backend.PROCESS,
        policy=_policy(mode),
        proxy=proxy,
        credential_store=_store(),
        audit=AuditSettings(path=str(tmp_path / "audit.jsonl"), key=b"a" * 32),
        **kwargs,
    )


async def test_lifecycle_proxy_sandbox_end_to_end(tmp_path: Path) -> None:
    lifecycle = _lifecycle()
    _driver()
    ca = make_test_ca(tmp_path / "upstream")
    upstream = await Upstream(echo_authorization=False).start(ca.server_context())
    proxy_config = ProxyConfig(
        allow=("api.test",),
        allow_private=("127.0.0.0/8",),
        credentials=(CredentialRule("api.test", "Authorization", "API_TOKEN"),),
        upstream_ca=str(ca.ca_pem),
        static_hosts=STATIC,
    )
    sandbox = await lifecycle.Sandbox.create(_sandbox_config(tmp_path, NetworkMode.PROXY, proxy_config))
    try:
        ok = await sandbox.exec(["/usr/bin/curl", "-sS", f"https://api.test:{upstream.port}/life"])
        assert ok.exit_code == 0, ok.stderr
        denied = await sandbox.exec(["/usr/bin/curl", "-sS", "-i", f"https://nothere.test:{upstream.port}/"])
        assert denied.exit_code != 0
        shown = await sandbox.exec(["/bin/sh", "-c", "echo $API_TOKEN"])
        assert shown.stdout.decode().startswith("KAVACH_PLACEHOLDER_")
        sandbox_id = sandbox.id
    finally:
        await sandbox.destroy()
        await upstream.close()
    assert upstream.seen[-1].headers.get_all("authorization") == [SECRET]
    text = (tmp_path / "audit.jsonl").read_text()
    assert SECRET not in text
    events = [json.loads(line) for line in text.splitlines()]
    proxy_events = [e for e in events if e["event"].startswith("proxy.")]
    assert {e["sandbox_id"] for e in proxy_events} == {sandbox_id}
    decisions = {(e["payload"]["decision"], e["payload"].get("reason")) for e in proxy_events}
    assert ("allowed", None) in decisions and ("denied", "not allowlisted") in decisions


async def test_lifecycle_secret_refs_bound_to_the_proxy_get_placeholders(tmp_path: Path) -> None:
    from kavach.credentials import SecretRef, env, file

    lifecycle = _lifecycle()
    _driver()
    proxy_config = ProxyConfig(
        allow=("api.test",), credentials=(CredentialRule("api.test", "Authorization", "API_TOKEN"),)
    )
    config = _sandbox_config(
        tmp_path,
        NetworkMode.PROXY,
        proxy_config,
        secrets=(SecretRef("API_TOKEN", file("/run/secrets/token")), SecretRef("API_TOKEN", env("TOKEN_ENV"))),
    )
    sandbox = await lifecycle.Sandbox.create(config)
    try:
        token_file = await sandbox._instance.read_file("/run/secrets/token", 4096)
        shown = await sandbox.exec(["/bin/sh", "-c", 'case "$TOKEN_ENV" in KAVACH_PLACEHOLDER_*) echo ok;; esac'])
    finally:
        await sandbox.destroy()
    assert token_file.startswith(b"KAVACH_PLACEHOLDER_")
    assert shown.stdout.strip() == b"ok"


async def test_lifecycle_network_off_reaches_nothing(tmp_path: Path) -> None:
    lifecycle = _lifecycle()
    _driver()
    upstream = await Upstream().start()
    sandbox = await lifecycle.Sandbox.create(_sandbox_config(tmp_path, NetworkMode.OFF, None))
    try:
        for url in (f"http://127.0.0.1:{upstream.port}/", "http://127.0.0.1:3128/"):
            result = await sandbox.exec(["/usr/bin/curl", "-sS", "--max-time", "5", url])
            assert result.exit_code != 0, url
    finally:
        await sandbox.destroy()
        await upstream.close()
    assert upstream.seen == []


async def test_kavach_run_credential_flag_end_to_end(tmp_path: Path) -> None:
    """`kavach run --credential HOST=HEADER:VAR`: the upstream gets $VAR, the sandbox and the
    CLI output only ever show the placeholder. The upstream is addressed by IP literal (allowed
    explicitly), so no name resolution is involved."""
    import os
    import sys

    _lifecycle()
    _driver()
    ca = make_test_ca(tmp_path / "upstream")
    upstream = await Upstream(echo_authorization=False).start(ca.server_context())
    # NO_PROXY lists 127.0.0.1, so curl is told to use the proxy for it anyway.
    script = f'echo "token=$API_TOKEN"; curl -sS --noproxy "" https://127.0.0.1:{upstream.port}/run'
    argv = [
        sys.executable, "-c", "from kavach.cli import main; main()", "run", "--backend", "process",
        "--network", "proxy", "--allow", "127.0.0.1", "--allow-private", "127.0.0.0/8",
        "--credential", "127.0.0.1=Authorization:API_TOKEN", "--upstream-ca", str(ca.ca_pem),
        "--", "/bin/sh", "-c", script,
    ]  # fmt: skip
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "API_TOKEN": SECRET, "KAVACH_DATA_DIR": str(tmp_path / "data")},
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await upstream.close()
    text = out.decode() + err.decode()
    assert proc.returncode == 0, text
    assert "token=KAVACH_PLACEHOLDER_" in text and '"target": "/run"' in text
    assert SECRET not in text
    assert upstream.seen[-1].headers.get_all("authorization") == [SECRET]
