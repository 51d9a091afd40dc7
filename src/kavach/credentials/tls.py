"""The per-sandbox certificate authority used for TLS interception.

Each egress proxy generates its own CA (ECDSA P-256) when it starts. Only its certificate
leaves the proxy (into the sandbox's CA bundle); the private key lives in memory only. Leaf
certificates for intercepted hosts are minted on first use and cached, together with a ready
``ssl.SSLContext`` (least recently used first out, and renewed a day before they expire).
Python's ``ssl`` module loads keys only from paths, so key material is handed to OpenSSL
through an anonymous ``memfd`` (``/proc/self/fd/N``) and never written to a file system.

Upstream connections are verified against the system trust store plus, optionally, one
operator-supplied CA file (``upstream_ca``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kavach.credentials.rules import parse_ip
from kavach.errors import CredentialError

LEAF_VALIDITY = datetime.timedelta(days=7)
CA_VALIDITY = datetime.timedelta(days=30)
# Clock skew between host and sandbox is zero (same kernel), but clients of the standalone
# proxy may run elsewhere.
BACKDATE = datetime.timedelta(hours=1)
# At most this many hosts keep a ready context (least recently used goes first): a sandbox
# that CONNECTs to ever new names cannot grow the proxy's memory without bound.
LEAF_CACHE_SIZE = 256
# A cached leaf is replaced this long before it expires, so a client never receives a leaf
# that runs out during its connection.
LEAF_RENEW_BEFORE = datetime.timedelta(days=1)

SYSTEM_CA_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/cert.pem",  # Arch, macOS
)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _load_chain_from_memory(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    fd = os.memfd_create("kavach-leaf", os.MFD_CLOEXEC)
    try:
        os.write(fd, cert_pem + key_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class CertificateAuthority:
    """An in-memory CA that mints leaf certificates and server ``SSLContext`` objects per host."""

    def __init__(self, common_name: str) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kavach egress proxy"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
            ]
        )
        public = self._key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.certificate_pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        # One key for every leaf: minting stays cheap, and the key never leaves this process.
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # host -> (context, when to mint a new leaf for it)
        self._contexts: OrderedDict[str, tuple[ssl.SSLContext, datetime.datetime]] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CertificateAuthority(subject={self.certificate.subject.rfc4514_string()!r})"

    def mint_leaf(self, host: str) -> x509.Certificate:
        """A certificate for ``host`` (a DNS name or an IP literal) signed by this CA.

        Raises :class:`CredentialError` once the CA itself has expired: no client would accept
        what it signs, and the CA cannot be renewed without handing clients a new bundle.
        """
        now = _now()
        if now >= self.certificate.not_valid_after_utc:
            raise CredentialError("the proxy's CA has expired; restart the proxy for a new one")
        address = parse_ip(host)
        san: x509.GeneralName = (
            x509.IPAddress(ipaddress.ip_address(address)) if address is not None else x509.DNSName(host)
        )
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self.certificate.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + LEAF_VALIDITY, self.certificate.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def server_context(
        self, host: str, sni_callback: Callable[[ssl.SSLObject, str | None, ssl.SSLContext], None] | None
    ) -> ssl.SSLContext:
        """A cached server-side context presenting a leaf for ``host``.

        A leaf within :data:`LEAF_RENEW_BEFORE` of its end is replaced by a new one. Raises
        :class:`CredentialError` when the CA has expired.
        """
        with self._lock:
            cached = self._contexts.get(host)
            if cached is not None and _now() < cached[1]:
                self._contexts.move_to_end(host)
                return cached[0]
        leaf = self.mint_leaf(host)
        renew_at = leaf.not_valid_after_utc - LEAF_RENEW_BEFORE
        if renew_at <= _now():
            # The CA ends within the margin, so a new leaf would end no later: keep this one
            # to its end rather than minting one per handshake.
            renew_at = leaf.not_valid_after_utc
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # HTTP/1.1 only: the proxy inspects HTTP/1.1 messages, so it must not agree to h2.
        context.set_alpn_protocols(["http/1.1"])
        chain = leaf.public_bytes(serialization.Encoding.PEM) + self.certificate_pem
        _load_chain_from_memory(context, chain, self._leaf_key_pem)
        if sni_callback is not None:
            context.sni_callback = sni_callback
        with self._lock:
            self._contexts[host] = (context, renew_at)
            self._contexts.move_to_end(host)
            while len(self._contexts) > LEAF_CACHE_SIZE:
                self._contexts.popitem(last=False)
        return context


def system_ca_pem() -> bytes:
    """The system's trusted root certificates as one PEM bundle (empty if none is found)."""
    candidates = [ssl.get_default_verify_paths().cafile, *SYSTEM_CA_FILES]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_bytes()
    return b""


def load_ca_file(path: str) -> bytes:
    """PEM certificates from ``path``, checked to parse; raises CredentialError naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CredentialError(f"upstream CA {path}: cannot read ({exc.strerror})") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CredentialError(f"upstream CA {path}: not a PEM certificate file") from None
    if not certificates:
        raise CredentialError(f"upstream CA {path}: no certificates found")
    return data


def upstream_context(upstream_ca_pem: bytes | None) -> ssl.SSLContext:
    """Client context for upstream servers: system roots (+ the operator's CA), hostname checked."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if upstream_ca_pem:
        context.load_verify_locations(cadata=upstream_ca_pem.decode("ascii"))
    return context


__all__ = [
    "CertificateAuthority",
    "load_ca_file",
    "system_ca_pem",
    "upstream_context",
]
