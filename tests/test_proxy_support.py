"""Test fixtures for the egress proxy: a test CA, and a real HTTP/HTTPS upstream on 127.0.0.1.

The upstream records every request it receives (method, target, headers, body) so tests can
assert what actually reached it, and answers with a small JSON echo (``/big/N``: N bytes;
``/chunked``: a chunked body). ``open`` counts the connections it has not seen closed. Imported by the other
proxy test modules; it contains one self-check test of its own.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kavach.credentials.http import (
    Headers,
    parse_request_head,
    read_head,
    relay_body,
    request_framing,
)


@dataclass
class TestCA:
    """A throwaway CA and one server certificate for the given names, written as PEM files."""

    __test__ = False

    ca_pem: Path
    cert_pem: Path
    key_pem: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_pem, self.key_pem)
        return context


def make_test_ca(directory: Path, names: tuple[str, ...] = ("api.test", "other.test")) -> TestCA:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kavach test upstream CA")])
    ca_cert = (
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
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
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
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return TestCA(ca_path, cert_path, key_path)


@dataclass
class SeenRequest:
    method: str
    target: str
    headers: Headers
    body: bytes
    connection: int


@dataclass
class Upstream:
    """A keep-alive HTTP/1.1 server on 127.0.0.1 that records what it receives."""

    port: int = 0
    echo_authorization: bool = True  # off for sandbox tests: the response must not hand the value back
    seen: list[SeenRequest] = field(default_factory=list)
    connections: int = 0
    open: int = 0
    server: asyncio.Server | None = None

    async def start(self, context: ssl.SSLContext | None = None) -> Upstream:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        number = self.connections
        try:
            while True:
                head = await read_head(reader, 400)
                if head is None:
                    return
                request = parse_request_head(head)

                class _Sink:
                    def __init__(self) -> None:
                        self.data = bytearray()

                    def write(self, chunk: bytes) -> None:
                        self.data += chunk

                    async def drain(self) -> None:
                        return None

                sink = _Sink()
                framing = request_framing(request)
                await relay_body(reader, sink, framing, 400)  # type: ignore[arg-type]
                body = _dechunk(bytes(sink.data)) if framing.kind == "chunked" else bytes(sink.data)
                self.seen.append(SeenRequest(request.method, request.target, request.headers, body, number))
                if request.target.startswith("/chunked"):
                    parts = [b"hello ", b"chunked ", b"world"]
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    for part in parts:
                        writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    continue
                if request.target.startswith("/big/"):
                    size = int(request.target.removeprefix("/big/"))
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (size, b"x" * size))
                    await writer.drain()
                    continue
                answer = json.dumps(
                    {
                        "method": request.method,
                        "target": request.target,
                        "authorization": request.headers.get_all("authorization") if self.echo_authorization else None,
                        "body_len": len(body),
                        "connection": number,
                    }
                ).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(answer), answer)
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            return
        finally:
            self.open -= 1
            writer.close()


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line, 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2 :]


async def test_upstream_fixture_answers_directly(tmp_path: Path) -> None:
    ca = make_test_ca(tmp_path)
    upstream = await Upstream().start(ca.server_context())
    try:
        client = ssl.create_default_context(cafile=str(ca.ca_pem))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", upstream.port, ssl=client, server_hostname="api.test"
        )
        writer.write(b"GET /x HTTP/1.1\r\nHost: api.test\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
        assert upstream.seen[0].target == "/x"
    finally:
        await upstream.close()
