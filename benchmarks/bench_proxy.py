"""Egress proxy benchmark: kavach vs mitmproxy vs tinyproxy vs direct, on loopback.

Measures requests per second and per-request latency (p50/p99) for

* plain HTTP keep-alive (absolute-form requests through the proxy), and
* HTTPS: CONNECT, then keep-alive requests inside the tunnel. kavach and mitmproxy
  *intercept* (TLS terminated with their own CA, re-encrypted upstream with verification);
  tinyproxy cannot intercept, so its HTTPS row is a plain CONNECT tunnel, labelled as such.

with 1 and 32 concurrent clients. "Added" latency is the proxy's p50/p99 minus the direct
connection's p50/p99 measured in the same run. Every process runs on this machine over
127.0.0.1 / ::1; loops are bounded.

Roles: the upstream server, the kavach proxy and the load client each run in their own
process (this file re-executes itself with ``--role``), so no two share an event loop.

Usage: .venv/bin/python benchmarks/bench_proxy.py [--requests N] [--mitmdump PATH]
mitmproxy is looked up as ``mitmdump`` on PATH, in this venv, or in /tmp/mitm-venv.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
UPSTREAM_NAME = "localhost"  # resolves via /etc/hosts for mitmproxy and tinyproxy


# -- helpers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def make_upstream_ca(directory: Path) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench upstream CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [
        x509.DNSName(UPSTREAM_NAME),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, UPSTREAM_NAME)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "up-ca.pem", directory / "up-cert.pem", directory / "up-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


# -- roles: upstream and kavach proxy -------------------------------------------------------------


class _Upstream(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            self.buffer = self.buffer[end + 4 :]  # GET only: no request bodies in this benchmark
            self.transport.write(RESPONSE)


async def role_upstream(http_port: int, https_port: int, cert: str, key: str) -> None:
    loop = asyncio.get_running_loop()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    hosts = ["127.0.0.1", "::1"]
    await loop.create_server(_Upstream, hosts, http_port, backlog=1024)
    await loop.create_server(_Upstream, hosts, https_port, ssl=context, backlog=1024)
    await asyncio.Event().wait()


async def role_kavach(port: int, upstream_ca: str, audit_path: str | None) -> None:
    from kavach.credentials import CredentialRule, CredentialStore, EgressProxy, ProxyConfig

    store = CredentialStore()
    store.set("TOKEN", "bench-secret-value")
    audit = None
    if audit_path:
        from kavach.audit import open_audit_log

        audit = open_audit_log(audit_path, b"b" * 32)
    config = ProxyConfig(
        allow=(UPSTREAM_NAME,),
        allow_private=("127.0.0.0/8", "::1/128"),
        # A credential rule makes the proxy intercept HTTPS to this host and inject a header;
        # plain_http lets the plain-HTTP rows inject it too, as they measure.
        credentials=(CredentialRule(UPSTREAM_NAME, "Authorization", "TOKEN", plain_http=True),),
        upstream_ca=upstream_ca,
        static_hosts=((UPSTREAM_NAME, "127.0.0.1"),),
    )
    proxy = EgressProxy(config, store, sandbox_id="bench", audit=audit)
    await proxy.start_tcp("127.0.0.1", port)
    Path(os.environ["BENCH_CA_OUT"]).write_bytes(proxy.ca_certificate_pem())
    await asyncio.Event().wait()


# -- load client -----------------------------------------------------------------------------------


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer


async def _open(mode: str, proxy_port: int | None, target_port: int, ca: str | None) -> _Conn:
    if proxy_port is None:
        context = ssl.create_default_context(cafile=ca) if mode == "https" else None
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", target_port, ssl=context, server_hostname=UPSTREAM_NAME if context else None
        )
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
        if mode == "https":
            writer.write(f"CONNECT {UPSTREAM_NAME}:{target_port} HTTP/1.1\r\nHost: {UPSTREAM_NAME}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if b" 200" not in head.split(b"\r\n")[0]:
                raise RuntimeError(f"CONNECT refused: {head[:100]!r}")
            await writer.start_tls(ssl.create_default_context(cafile=ca), server_hostname=UPSTREAM_NAME)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return _Conn(reader, writer)


async def _request(conn: _Conn, line: bytes) -> bool:
    """One request; returns whether the connection may be reused."""
    conn.writer.write(line)
    head = await conn.reader.readuntil(b"\r\n\r\n")
    status = head[9:12]
    if status != b"200":
        raise RuntimeError(f"status {status!r}: {head[:200]!r}")
    length = 0
    keep = True
    for header in head.split(b"\r\n")[1:]:
        name, _, value = header.partition(b":")
        lname = name.strip().lower()
        if lname == b"content-length":
            length = int(value)
        elif lname in (b"connection", b"proxy-connection") and b"close" in value.lower():
            keep = False
    if length:
        await conn.reader.readexactly(length)
    return keep


def _request_line(mode: str, proxy_port: int | None, target_port: int) -> bytes:
    host = f"{UPSTREAM_NAME}:{target_port}"
    if mode == "http" and proxy_port is not None:
        return f"GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    return f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


async def _warm_connection(mode: str, proxy_port: int | None, target_port: int, ca: str | None) -> _Conn | None:
    """Open a connection and send one untimed request (TCP + TLS setup is not steady state)."""
    conn = await _open(mode, proxy_port, target_port, ca)
    if await _request(conn, _request_line(mode, proxy_port, target_port)):
        return conn
    conn.writer.close()
    return None


async def _client(
    mode: str,
    proxy_port: int | None,
    target_port: int,
    ca: str | None,
    count: int,
    out: list[int],
    conn: _Conn | None,
) -> None:
    line = _request_line(mode, proxy_port, target_port)
    for _ in range(count):
        start = time.perf_counter_ns()
        reused = conn is not None
        if conn is None:
            conn = await _open(mode, proxy_port, target_port, ca)
        try:
            keep = await _request(conn, line)
        except (asyncio.IncompleteReadError, ConnectionError):
            if not reused:
                raise
            # The proxy closed a connection it did not announce as closing (tinyproxy does
            # this after every response): reconnect, and the reconnect counts in the latency.
            conn.writer.close()
            conn = await _open(mode, proxy_port, target_port, ca)
            keep = await _request(conn, line)
        out.append(time.perf_counter_ns() - start)
        if not keep:
            conn.writer.close()
            conn = None
    if conn is not None:
        conn.writer.close()


async def role_client(
    mode: str, proxy_port: int | None, target_port: int, ca: str | None, clients: int, per_client: int
) -> dict[str, float]:
    # Warm-up: leaf minting and caches are not what steady state measures.
    await _client(mode, proxy_port, target_port, ca, 20, [], None)
    # Every client's connection (and TLS session) is set up before the clock starts; a proxy
    # that closes connections anyway pays its reconnects inside the measurement.
    conns = await asyncio.gather(*(_warm_connection(mode, proxy_port, target_port, ca) for _ in range(clients)))
    samples: list[int] = []
    start = time.perf_counter()
    await asyncio.gather(*(_client(mode, proxy_port, target_port, ca, per_client, samples, c) for c in conns))
    elapsed = time.perf_counter() - start
    samples.sort()
    return {
        "requests": len(samples),
        "rps": len(samples) / elapsed,
        "p50_ms": statistics.median(samples) / 1e6,
        "p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))] / 1e6,
    }


# -- orchestration ---------------------------------------------------------------------------------


def _spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _find_mitmdump(explicit: str | None) -> str | None:
    candidates = [
        explicit,
        shutil.which("mitmdump"),
        str(Path(sys.executable).parent / "mitmdump"),
        "/tmp/mitm-venv/bin/mitmdump",
    ]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def run_client(
    mode: str, proxy_port: int | None, target_port: int, ca: str | None, clients: int, per: int
) -> dict[str, float]:
    args = [
        sys.executable,
        __file__,
        "--role",
        "client",
        "--mode",
        mode,
        "--target",
        str(target_port),
        "--clients",
        str(clients),
        "--per-client",
        str(per),
    ]
    if proxy_port is not None:
        args += ["--proxy", str(proxy_port)]
    if ca:
        args += ["--ca", ca]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "client failed")
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000, help="requests per scenario (split over clients)")
    parser.add_argument("--mitmdump", default=None)
    parser.add_argument("--role", default=None)
    parser.add_argument("--mode", default="http")
    parser.add_argument("--proxy", type=int, default=None)
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--ca", default=None)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--per-client", type=int, default=100)
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--https-port", type=int, default=0)
    parser.add_argument("--cert", default="")
    parser.add_argument("--key", default="")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--audit", default=None)
    args = parser.parse_args()

    if args.role == "upstream":
        asyncio.run(role_upstream(args.http_port, args.https_port, args.cert, args.key))
        return
    if args.role == "kavach":
        asyncio.run(role_kavach(args.port, args.ca, args.audit))
        return
    if args.role == "client":
        result = asyncio.run(role_client(args.mode, args.proxy, args.target, args.ca, args.clients, args.per_client))
        print(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="kavach-bench-proxy-"))
    up_ca, up_cert, up_key = make_upstream_ca(work)
    http_port, https_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            _spawn(
                [
                    sys.executable,
                    __file__,
                    "--role",
                    "upstream",
                    "--http-port",
                    str(http_port),
                    "--https-port",
                    str(https_port),
                    "--cert",
                    str(up_cert),
                    "--key",
                    str(up_key),
                ]
            )
        )
        wait_port(http_port)
        wait_port(https_port)

        proxies: dict[str, tuple[int, str | None]] = {}  # name -> (port, CA file clients trust for HTTPS)
        for name, audit in (("kavach", None), ("kavach+audit", str(work / "audit.jsonl"))):
            port = free_port()
            ca_out = work / f"{name}-ca.pem"
            cmd = [sys.executable, __file__, "--role", "kavach", "--port", str(port), "--ca", str(up_ca)]
            if audit:
                cmd += ["--audit", audit]
            procs.append(_spawn(cmd, {"BENCH_CA_OUT": str(ca_out)}))
            wait_port(port)
            proxies[name] = (port, str(ca_out))

        mitmdump = _find_mitmdump(args.mitmdump)
        if mitmdump:
            port = free_port()
            confdir = work / "mitm"
            procs.append(
                _spawn(
                    [
                        mitmdump,
                        "-q",
                        "--listen-host",
                        "127.0.0.1",
                        "--listen-port",
                        str(port),
                        "--set",
                        f"confdir={confdir}",
                        "--set",
                        f"ssl_verify_upstream_trusted_ca={up_ca}",
                        "--set",
                        "connection_strategy=lazy",
                    ]
                )
            )
            wait_port(port)
            proxies["mitmproxy"] = (port, str(confdir / "mitmproxy-ca-cert.pem"))
        else:
            print("mitmproxy: not found (install it into a separate venv: /tmp/mitm-venv)")

        if shutil.which("tinyproxy"):
            port = free_port()
            conf = work / "tinyproxy.conf"
            conf.write_text(
                f"Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 256\nAllow 127.0.0.1\n"
                f'ConnectPort {https_port}\nLogLevel Critical\nPidFile "{work / "tinyproxy.pid"}"\n'
            )
            procs.append(_spawn(["tinyproxy", "-d", "-c", str(conf)]))
            wait_port(port)
            proxies["tinyproxy"] = (port, None)
        else:
            print("tinyproxy: not installed")

        rows = []
        for mode in ("http", "https"):
            target = http_port if mode == "http" else https_port
            for clients in (1, 32):
                per = max(1, args.requests // clients)
                direct = run_client(mode, None, target, str(up_ca), clients, per)
                rows.append((mode, clients, "direct", direct, direct))
                for name, (port, ca) in proxies.items():
                    client_ca = str(up_ca) if name == "tinyproxy" else ca  # tinyproxy only tunnels
                    try:
                        result = run_client(mode, port, target, client_ca, clients, per)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        print(f"{name} {mode} c={clients}: failed: {exc}")
                        continue
                    label = f"{name} (tunnel, no interception)" if name == "tinyproxy" and mode == "https" else name
                    rows.append((mode, clients, label, result, direct))
        print()
        print(
            f"{'mode':6} {'clients':>7} {'proxy':34} {'rps':>9} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'+p50 ms':>8} {'+p99 ms':>8} {'rps vs mitm':>11}"
        )
        mitm = {(m, c): r for m, c, n, r, _d in rows if n == "mitmproxy"}
        for mode, clients, name, result, direct in rows:
            added50 = result["p50_ms"] - direct["p50_ms"]
            added99 = result["p99_ms"] - direct["p99_ms"]
            ref = mitm.get((mode, clients))
            ratio = f"{result['rps'] / ref['rps']:.2f}x" if ref and name != "direct" else ""
            print(
                f"{mode:6} {clients:>7} {name:34} {result['rps']:>9.0f} {result['p50_ms']:>8.3f} "
                f"{result['p99_ms']:>8.3f} {added50:>8.3f} {added99:>8.3f} {ratio:>11}"
            )
        print()
        print("added = proxy minus direct in the same run; kavach intercepts HTTPS and injects a header;")
        print("kavach+audit appends one fsync'd HMAC audit entry per request; mitmproxy intercepts HTTPS.")
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
