"""Strict HTTP/1.1 message parsing for the egress proxy.

The proxy sits between an untrusted client and real servers, so the parser is deliberately
narrower than RFC 9112's "be lenient" advice: anything that two HTTP implementations could
read differently (request smuggling, header injection) is rejected with a 400 instead of
being normalized. In particular: bare CR or LF, obsolete line folding, control characters in
values, both ``Content-Length`` and ``Transfer-Encoding``, conflicting lengths, any transfer
coding other than ``chunked``, and chunk sizes that are not plain hexadecimal.

Bodies are streamed, never buffered whole; chunked bodies are re-framed on the way out
(extensions dropped) so the next hop sees exactly the framing the proxy validated.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType

MAX_HEAD_BYTES = 64 * 1024  # request line + headers; larger heads get a 400
MAX_HEADERS = 256
MAX_CHUNK_LINE = 4096
COPY_SIZE = 64 * 1024

_TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Visible ASCII and horizontal tab/space only: no CR, LF, NUL or other control characters.
_VALUE_BAD_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET_RE = re.compile(rb"^[\x21-\x7e]+$")
_VERSION_RE = re.compile(rb"^HTTP/1\.[01]$")
_STATUS_RE = re.compile(rb"^(HTTP/1\.[01]) ([0-9]{3})(?: ([\x09\x20-\x7e\x80-\xff]*))?$")
_CHUNK_SIZE_RE = re.compile(rb"^([0-9A-Fa-f]{1,15})(;[\x09\x20-\x7e]*)?$")

# End-to-end headers that a ``Connection`` header cannot make hop-by-hop: dropping the
# length of a body the proxy still relays would let the next hop read that body as the
# next request (smuggling), and the proxy sets Host itself.
NEVER_HOP_BY_HOP = frozenset({"content-length", "host"})

# Connection-scoped headers a proxy must not forward (RFC 9110 section 7.6.1), lower-case.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


class HttpError(Exception):
    """A message violates the proxy's HTTP rules; ``status`` is what the client receives."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status}: {reason}")


@dataclass
class Headers:
    """An ordered header list with case-insensitive lookup; names and values are latin-1 text."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        """The first value of ``name`` or None."""
        lname = name.lower()
        for key, value in self.items:
            if key.lower() == lname:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in order."""
        lname = name.lower()
        return [value for key, value in self.items if key.lower() == lname]

    def remove(self, name: str) -> None:
        """Drop every header called ``name``."""
        lname = name.lower()
        self.items = [(k, v) for k, v in self.items if k.lower() != lname]

    def put(self, name: str, value: str) -> None:
        """Replace every ``name`` header by one with ``value`` (never a duplicate)."""
        self.remove(name)
        self.items.append((name, value))

    def connection_tokens(self) -> set[str]:
        """Lower-case tokens of every ``Connection`` header."""
        tokens: set[str] = set()
        for value in self.get_all("connection"):
            tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
        return tokens

    def without_hop_by_hop(self) -> Headers:
        """A copy without hop-by-hop headers, including those ``Connection`` names."""
        drop = HOP_BY_HOP | (self.connection_tokens() - NEVER_HOP_BY_HOP)
        return Headers([(k, v) for k, v in self.items if k.lower() not in drop])


@dataclass
class RequestHead:
    """A parsed request line and header block."""

    method: str
    target: str
    version: str
    headers: Headers

    @property
    def keep_alive(self) -> bool:
        """Whether the client wants the connection kept after this exchange."""
        tokens = self.headers.connection_tokens() | {
            t.strip().lower() for v in self.headers.get_all("proxy-connection") for t in v.split(",")
        }
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


@dataclass
class ResponseHead:
    """A parsed status line and header block."""

    version: str
    status: int
    reason: str
    headers: Headers

    @property
    def keep_alive(self) -> bool:
        """Whether the server keeps the connection after this response."""
        tokens = self.headers.connection_tokens()
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


async def read_head(reader: asyncio.StreamReader, status_on_error: int) -> bytes | None:
    """Bytes of one message head including the final CRLFCRLF; None on EOF before any byte.

    The reader's ``limit`` must be at least :data:`MAX_HEAD_BYTES`; a longer head is refused.
    """
    try:
        data = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip(b"\r\n"):
            return None
        raise HttpError(status_on_error, "connection closed inside the message head") from None
    except asyncio.LimitOverrunError:
        raise HttpError(431 if status_on_error == 400 else status_on_error, "message head too large") from None
    if len(data) > MAX_HEAD_BYTES:
        raise HttpError(431 if status_on_error == 400 else status_on_error, "message head too large")
    # RFC 9112 2.2: a server SHOULD ignore at least one empty line before the request line.
    return data.lstrip(b"\r\n") if data.startswith(b"\r\n") else data


def _parse_header_lines(lines: list[bytes], status: int) -> Headers:
    if len(lines) > MAX_HEADERS:
        raise HttpError(status, "too many header fields")
    items: list[tuple[str, str]] = []
    for line in lines:
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            raise HttpError(status, "obsolete line folding")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_RE.match(name):
            raise HttpError(status, "malformed header field")
        value = value.strip(b" \t")
        if _VALUE_BAD_RE.search(value):
            raise HttpError(status, "control character in header value")
        items.append((name.decode("ascii"), value.decode("latin-1")))
    return Headers(items)


def _split_lines(head: bytes, status: int) -> list[bytes]:
    body = head[:-4] if head.endswith(b"\r\n\r\n") else head
    lines = body.split(b"\r\n")
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise HttpError(status, "bare CR or LF in message head")
    return lines


def parse_request_head(head: bytes) -> RequestHead:
    """Parse a request head (as returned by :func:`read_head`), raising HttpError(400)."""
    lines = _split_lines(head, 400)
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN_RE.match(method) or not _TARGET_RE.match(target) or not _VERSION_RE.match(version):
        raise HttpError(400, "malformed request line")
    if method != method.upper():
        # Methods are case-sensitive, but many servers upper-case them: "delete" would slip
        # past a rule that denies DELETE and then be served as one.
        raise HttpError(400, "method not in upper case")
    headers = _parse_header_lines(lines[1:], 400)
    return RequestHead(method.decode("ascii"), target.decode("ascii"), version.decode("ascii"), headers)


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse a response head from an upstream server, raising HttpError(502)."""
    lines = _split_lines(head, 502)
    match = _STATUS_RE.match(lines[0])
    if not match:
        raise HttpError(502, "malformed status line from upstream")
    headers = _parse_header_lines(lines[1:], 502)
    reason = (match.group(3) or b"").decode("latin-1")
    return ResponseHead(match.group(1).decode("ascii"), int(match.group(2)), reason, headers)


@dataclass(frozen=True)
class Framing:
    """How a message body is delimited: ``none``, ``length`` (with ``length``), ``chunked`` or ``close``."""

    kind: str
    length: int = 0


NO_BODY = Framing("none")


def _content_length(headers: Headers, status: int) -> int | None:
    values = headers.get_all("content-length")
    if not values:
        return None
    parsed = set()
    for value in values:
        for raw in value.split(","):
            item = raw.strip()
            if not (item.isascii() and item.isdigit()) or len(item) > 18:
                raise HttpError(status, "invalid Content-Length")
            parsed.add(int(item))
    if len(parsed) != 1:
        raise HttpError(status, "conflicting Content-Length values")
    return parsed.pop()


def _is_chunked(headers: Headers, status: int) -> bool:
    values = headers.get_all("transfer-encoding")
    if not values:
        return False
    codings = [c.strip().lower() for v in values for c in v.split(",") if c.strip()]
    if codings != ["chunked"]:
        raise HttpError(501 if status == 400 else status, "unsupported Transfer-Encoding")
    return True


def request_framing(request: RequestHead) -> Framing:
    """Body framing of a request (RFC 9112 6.3), refusing ambiguous combinations."""
    chunked = _is_chunked(request.headers, 400)
    length = _content_length(request.headers, 400)
    if chunked and length is not None:
        raise HttpError(400, "both Content-Length and Transfer-Encoding")
    if chunked:
        return Framing("chunked")
    if length:
        return Framing("length", length)
    return NO_BODY


def response_framing(response: ResponseHead, request_method: str) -> Framing:
    """Body framing of a response to ``request_method`` (RFC 9112 6.3)."""
    if request_method == "HEAD" or response.status < 200 or response.status in (204, 304):
        return NO_BODY
    chunked = _is_chunked(response.headers, 502)
    length = _content_length(response.headers, 502)
    if chunked and length is not None:
        raise HttpError(502, "both Content-Length and Transfer-Encoding from upstream")
    if chunked:
        return Framing("chunked")
    if length is not None:
        return Framing("length", length) if length else NO_BODY
    return Framing("close")


def set_framing(headers: Headers, framing: Framing, *, declared: bool = False) -> None:
    """Replace the framing headers by exactly those of ``framing``, the framing the proxy relays.

    The peer's own spelling is never forwarded (``Content-Length: 5, 5``, a length dropped
    by a ``Connection`` header): the next hop must delimit the body where the proxy did.
    ``declared`` keeps ``Content-Length: 0`` on an empty body that declared it (a POST).
    """
    headers.remove("content-length")
    headers.remove("transfer-encoding")
    if framing.kind == "length":
        headers.items.append(("Content-Length", str(framing.length)))
    elif framing.kind == "chunked":
        headers.items.append(("Transfer-Encoding", "chunked"))
    elif framing.kind == "none" and declared:
        headers.items.append(("Content-Length", "0"))


def serialize_head(first_line: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """A message head ready to send (values were validated when parsed or set by the proxy)."""
    parts = [first_line, "\r\n"]
    for name, value in headers:
        parts += [name, ": ", value, "\r\n"]
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


async def relay_body(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    framing: Framing,
    status_on_error: int,
    idle_timeout: float | None = None,
) -> None:
    """Copy one body from ``reader`` to ``writer`` in the given framing.

    Chunked bodies are re-framed (size lines rewritten, extensions dropped, trailers checked).
    A malformed or truncated body, or ``idle_timeout`` seconds without a byte, raises
    :class:`HttpError` with ``status_on_error``.
    """
    try:
        async with _Idle(idle_timeout) as idle:
            await _relay(reader, writer, framing, status_on_error, idle)
    except TimeoutError:
        raise HttpError(status_on_error, "body stalled (idle timeout)") from None


class _Idle:
    """An idle timer: each :meth:`reset` pushes the deadline ``seconds`` into the future."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._timeout: asyncio.Timeout | None = None

    async def __aenter__(self) -> _Idle:
        if self.seconds is not None:
            self._timeout = asyncio.timeout(self.seconds)
            await self._timeout.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._timeout is not None:
            await self._timeout.__aexit__(exc_type, exc, tb)

    def reset(self) -> None:
        if self._timeout is not None and self.seconds is not None:
            self._timeout.reschedule(asyncio.get_running_loop().time() + self.seconds)


async def _relay(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, framing: Framing, status_on_error: int, idle: _Idle
) -> None:
    if framing.kind == "length":
        remaining = framing.length
        while remaining:
            data = await reader.read(min(remaining, COPY_SIZE))
            if not data:
                raise HttpError(status_on_error, "body shorter than Content-Length")
            idle.reset()
            writer.write(data)
            remaining -= len(data)
            await writer.drain()
    elif framing.kind == "chunked":
        await _relay_chunked(reader, writer, status_on_error, idle)
    elif framing.kind == "close":
        while data := await reader.read(COPY_SIZE):
            idle.reset()
            writer.write(data)
            await writer.drain()


async def _read_line(reader: asyncio.StreamReader, limit: int, status: int) -> bytes:
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.IncompleteReadError:
        raise HttpError(status, "connection closed inside a chunked body") from None
    except asyncio.LimitOverrunError:
        raise HttpError(status, "chunk line too long") from None
    if len(line) > limit:
        raise HttpError(status, "chunk line too long")
    line = line[:-2]
    if b"\r" in line or b"\n" in line:
        raise HttpError(status, "bare CR or LF in chunked body")
    return line


async def _relay_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, idle: _Idle) -> None:
    while True:
        match = _CHUNK_SIZE_RE.match(await _read_line(reader, MAX_CHUNK_LINE, status))
        idle.reset()
        if not match:
            raise HttpError(status, "invalid chunk size")
        size = int(match.group(1), 16)
        if size == 0:
            break
        writer.write(b"%x\r\n" % size)
        remaining = size
        while remaining:
            data = await reader.read(min(remaining, COPY_SIZE))
            if not data:
                raise HttpError(status, "connection closed inside a chunk")
            idle.reset()
            writer.write(data)
            remaining -= len(data)
            await writer.drain()
        try:
            crlf = await reader.readexactly(2)
        except asyncio.IncompleteReadError:
            raise HttpError(status, "connection closed inside a chunked body") from None
        if crlf != b"\r\n":
            raise HttpError(status, "chunk data longer than its size")
        writer.write(b"\r\n")
    trailer_lines: list[bytes] = []
    total = 0
    while line := await _read_line(reader, MAX_CHUNK_LINE, status):
        total += len(line)
        if total > MAX_HEAD_BYTES:
            raise HttpError(status, "trailer section too large")
        trailer_lines.append(line)
    trailers = _parse_header_lines(trailer_lines, status)
    writer.write(b"0\r\n" + serialize_head("", trailers.items)[2:])
    await writer.drain()


__all__ = [
    "HOP_BY_HOP",
    "MAX_HEAD_BYTES",
    "NO_BODY",
    "Framing",
    "Headers",
    "HttpError",
    "RequestHead",
    "ResponseHead",
    "parse_request_head",
    "parse_response_head",
    "read_head",
    "relay_body",
    "request_framing",
    "response_framing",
    "serialize_head",
]
