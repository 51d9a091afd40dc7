"""The externalization gate: every byte that leaves a sandbox passes through here.

:class:`Gate` runs the enabled scanners over an artifact (stdout, stderr, a file being
exported), applies the policy's allowlists and per-category overrides, and decides:

* **pass** — nothing at or above ``warn_at``; the original is released;
* **warn** — findings at or above ``warn_at``; released with secret/PII spans redacted
  (when ``redact_on_warn``);
* **quarantine** — findings at or above ``quarantine_at``; the caller gets the redacted
  copy and the lifecycle stores ``GateResult.original`` in the quarantine store;
* **block** — findings at or above ``block_at``; nothing is released and the lifecycle
  raises ``ExternalizationBlocked``.

Values injected by the credential store (``known_secrets``) are always found, whatever
the policy says (even when it is disabled), and always redacted — also in their base64,
hex and URL-encoded forms.

Fail-closed size bound: only the first ``max_artifact_size`` bytes are scanned; an
artifact longer than that gets an extra critical ``kavach.artifact-too-large`` finding,
so under the default policy it is **blocked** (the bytes past the bound were never
inspected, so they cannot be released). A policy with a higher ``block_at`` releases the
scanned prefix only (redacted as usual), never the unscanned rest.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Protocol

from kavach.errors import PolicyError
from kavach.scanning.engine import MAX_MATCH, PatternBank, Rule, dedupe, finalize, redact_value
from kavach.scanning.findings import Finding, Severity, Verdict
from kavach.scanning.helper import ScanHelper

SCANNER_NAMES = frozenset({"secrets", "code", "data"})
INJECTED_SECRET_RULE = "kavach.injected-secret"  # noqa: S105
OVERSIZE_RULE = "kavach.artifact-too-large"


class Scanner(Protocol):
    """What the gate needs from a scanner."""

    name: str
    pattern_rules: tuple[Rule, ...]

    def direct(self, data: bytes) -> list[Finding]:
        """Findings that need the artifact only, not the rule matches (the gate computes
        them while its scan helper matches)."""
        ...

    def post(self, data: bytes, raw: list[Finding], direct: list[Finding] | None = None) -> list[Finding]:
        """Turn this scanner's raw rule matches, and its ``direct`` findings (computed
        here when None), into its findings (no line numbers)."""
        ...

    def scan(self, data: bytes, source: str = "") -> list[Finding]:
        """Findings in ``data``, sorted, with 1-based line numbers."""
        ...


@dataclass(frozen=True)
class ExternalizationPolicy:
    """What the gate scans for and how findings turn into a verdict.

    ``category_overrides`` maps a finding's **category** (``"email"``, ``"password"``,
    ``"command_injection"`` ...) or its **rule id** (``"pii.phone"``) to the severity the
    gate should use instead of the scanner's; a rule-id entry wins over a category entry.
    Mapping to ``info`` keeps the finding in the results without affecting the verdict.
    ``allowlist_rules`` drops findings of those rule ids entirely; ``allowlist_values``
    drops findings whose matched text is exactly one of those values. Neither applies to
    injected secrets.
    """

    enabled: bool = True
    block_at: Severity = Severity.CRITICAL
    quarantine_at: Severity = Severity.HIGH
    warn_at: Severity = Severity.LOW
    redact_on_warn: bool = True
    max_artifact_size: int = 64 * 1024 * 1024
    scanners: frozenset[str] = SCANNER_NAMES
    category_overrides: Mapping[str, Severity] = field(default_factory=lambda: MappingProxyType({}))
    allowlist_rules: frozenset[str] = frozenset()
    allowlist_values: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # Accept severity names and any iterable of strings from Python callers too.
        for name in ("block_at", "quarantine_at", "warn_at"):
            object.__setattr__(self, name, _parse_field(f"externalization.{name}", name, getattr(self, name)))
        for name in ("scanners", "allowlist_rules", "allowlist_values"):
            object.__setattr__(self, name, _parse_str_set(f"externalization.{name}", getattr(self, name)))
        if not self.warn_at <= self.quarantine_at <= self.block_at:
            raise PolicyError(
                "externalization.thresholds",
                (self.warn_at, self.quarantine_at, self.block_at),
                "must satisfy warn_at <= quarantine_at <= block_at",
            )
        if self.max_artifact_size <= 0:
            raise PolicyError("externalization.max_artifact_size", self.max_artifact_size, "must be positive")
        unknown = set(self.scanners) - SCANNER_NAMES
        if unknown:
            raise PolicyError(
                "externalization.scanners", sorted(unknown), f"unknown scanner; expected any of {sorted(SCANNER_NAMES)}"
            )
        object.__setattr__(
            self,
            "category_overrides",
            _parse_field("externalization.category_overrides", "category_overrides", self.category_overrides),
        )

    @classmethod
    def disabled(cls) -> ExternalizationPolicy:
        """No scanning (the Noop backend's default); injected secrets are still redacted."""
        return cls(enabled=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExternalizationPolicy:
        """Build from plain data (YAML/JSON); :class:`PolicyError` names the bad field."""
        if not isinstance(data, Mapping):
            raise PolicyError("externalization", data, "expected a mapping")
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            name = f"externalization.{key}"
            if key not in known:
                raise PolicyError(name, value, f"unknown field; expected one of {sorted(known)}")
            kwargs[key] = _parse_field(name, key, value)
        return cls(**kwargs)

    def effective_severity(self, finding: Finding) -> Severity:
        """The severity after ``category_overrides`` (rule id first, then category)."""
        if finding.rule in self.category_overrides:
            return self.category_overrides[finding.rule]
        return self.category_overrides.get(finding.category, finding.severity)

    def verdict_for(self, findings: Iterable[Finding]) -> Verdict:
        """The verdict for findings whose severities are already effective.

        A disabled policy decides nothing (PASS): the only findings it produces are injected
        secrets, which are redacted on release whatever the verdict.
        """
        if not self.enabled:
            return Verdict.PASS
        worst = max((f.severity for f in findings), default=None)
        if worst is None:
            return Verdict.PASS
        if worst >= self.block_at:
            return Verdict.BLOCK
        if worst >= self.quarantine_at:
            return Verdict.QUARANTINE
        if worst >= self.warn_at:
            return Verdict.WARN
        return Verdict.PASS


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise PolicyError(name, value, "expected true or false")


def _parse_str_set(name: str, value: Any) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise PolicyError(name, value, "expected a list of strings")
    items = list(value)
    if not all(isinstance(v, str) for v in items):
        raise PolicyError(name, value, "expected a list of strings")
    return frozenset(items)


def _parse_field(name: str, key: str, value: Any) -> Any:
    if key in ("enabled", "redact_on_warn"):
        return _parse_bool(name, value)
    if key in ("block_at", "quarantine_at", "warn_at"):
        if not isinstance(value, (str, Severity)):
            raise PolicyError(name, value, "expected a severity name")
        try:
            return Severity.parse(value)
        except PolicyError as exc:
            raise PolicyError(name, value, exc.reason) from None
    if key == "max_artifact_size":
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise PolicyError(name, value, "expected a positive integer (bytes)")
        return value
    if key == "category_overrides":
        if not isinstance(value, Mapping):
            raise PolicyError(name, value, "expected a mapping of category or rule id to severity")
        out: dict[str, Severity] = {}
        for cat, sev in value.items():
            if not isinstance(cat, str) or not isinstance(sev, (str, Severity)):
                raise PolicyError(f"{name}.{cat}", sev, "expected a severity name")
            try:
                out[cat] = Severity.parse(sev)
            except PolicyError as exc:
                raise PolicyError(f"{name}.{cat}", sev, exc.reason) from None
        return MappingProxyType(out)
    # scanners, allowlist_rules, allowlist_values
    return _parse_str_set(name, value)


@dataclass(frozen=True)
class GateResult:
    """The gate's decision for one artifact.

    ``released`` is what the caller may see: the original on PASS, the redacted copy on
    WARN (when the policy redacts) and QUARANTINE, ``b""`` on BLOCK. ``original`` is the
    unmodified artifact, for the quarantine store only.
    """

    verdict: Verdict
    findings: tuple[Finding, ...]
    released: bytes
    original: bytes


def _encoded_forms(secret: str) -> set[bytes]:
    raw = secret.encode("utf-8")
    forms = {raw}
    if len(raw) >= 8:
        b64 = base64.b64encode(raw)
        forms.update(
            {
                b64,
                b64.rstrip(b"="),
                base64.urlsafe_b64encode(raw).rstrip(b"="),
                binascii.hexlify(raw),
                urllib.parse.quote(secret, safe="").encode("ascii"),
            }
        )
    return {f for f in forms if f}


def _overlaps(a: Finding, spans: list[tuple[int, int]]) -> bool:
    return any(s < a.end and a.start < e for s, e in spans)


def redact(data: bytes, findings: Iterable[Finding]) -> bytes:
    """``data`` with every redactable finding's span replaced by ``[REDACTED:<category>]``.

    Overlapping spans are merged; the replacement names the category of the first
    finding of each merged span.
    """
    spans = sorted((f.start, f.end, f.category) for f in findings if f.redact and f.end > f.start)
    if not spans:
        return data
    merged: list[list[Any]] = []
    for start, end, category in spans:
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end, category])
    out = bytearray()
    pos = 0
    for start, end, category in merged:
        out += data[pos:start]
        out += f"[REDACTED:{category}]".encode("ascii")
        pos = end
    out += data[pos:]
    return bytes(out)


class Gate:
    """Scans artifacts leaving a sandbox and decides what may be released."""

    def __init__(self, policy: ExternalizationPolicy, *, known_secrets: Iterable[str] = ()) -> None:
        self.policy = policy
        self._scanners = _build_scanners(policy)
        self._bank = _combined_bank(self._scanners)
        self._names = tuple(s.name for s in self._scanners)
        self._known: dict[bytes, str] = {}
        for secret in known_secrets:
            if secret:
                for form in _encoded_forms(secret):
                    self._known[form] = secret
        self._longest_known = max((len(k) for k in self._known), default=0)

    @property
    def scanners(self) -> tuple[str, ...]:
        """Names of the scanners this gate runs."""
        return tuple(s.name for s in self._scanners)

    def scan(self, data: bytes, source: str = "") -> list[Finding]:
        """Every finding in ``data`` with policy overrides and allowlists applied."""
        bounded = data[: self.policy.max_artifact_size]
        found: list[Finding] = []
        if self.policy.enabled and self._scanners:
            # One pass of the combined bank serves every scanner: each window is
            # prefiltered once, not once per scanner.
            raw: dict[str, list[Finding]] = {s.name: [] for s in self._scanners}
            direct: dict[str, list[Finding]] = {}

            def meanwhile() -> None:
                for scanner in self._scanners:
                    direct[scanner.name] = scanner.direct(bounded)

            validated = _HELPER.scan(self._bank, self._names, bounded, meanwhile)
            for f in self._bank.findings(bounded, "", validated):
                raw[f.scanner].append(f)
            for scanner in self._scanners:
                found.extend(scanner.post(bounded, raw[scanner.name], direct[scanner.name]))
            # (Thousands of findings per MiB of customer data: the per-finding policy steps
            # run only when the policy has something for them to do.)
            if self.policy.allowlist_rules or self.policy.allowlist_values:
                found = [f for f in found if self._allowed(bounded, f)]
            if self.policy.category_overrides:
                found = [self._apply_policy(bounded, f) for f in found]
        found = _dedupe_across_scanners(found)
        found.extend(dedupe(self._known_secret_findings(bounded)))
        if self.policy.enabled and len(data) > self.policy.max_artifact_size:
            oversize = _oversize_finding(len(data), self.policy.max_artifact_size)
            found.append(self._apply_policy(bounded, oversize))
        return finalize(bounded, found, source)

    def apply(self, data: bytes, source: str = "", *, limit: int | None = None) -> GateResult:
        """Scan ``data`` and decide; see :class:`GateResult` for what is released.

        ``limit``: only the first ``limit`` bytes may be released (output cut at its cap),
        while the bytes after them, if given, are scanned as context: a secret that the
        cut falls inside is then found whole, and its part before the cut redacted or
        blocked. Findings that start at or past ``limit`` are not reported.
        """
        findings = self.scan(data, source)
        if limit is not None and len(data) > limit:
            findings = [f if f.end <= limit else replace(f, end=limit) for f in findings if f.start < limit]
            data = data[:limit]
        verdict = self.policy.verdict_for(findings)
        released = self._release(data, findings, verdict)
        return GateResult(verdict=verdict, findings=tuple(findings), released=released, original=data)

    def stream(self, source: str) -> StreamGate:
        """A gate for an output stream delivered in chunks (``spawn``)."""
        return StreamGate(self, source)

    # -- internals ------------------------------------------------------------------------

    def _release(self, data: bytes, findings: list[Finding], verdict: Verdict) -> bytes:
        bounded = data[: self.policy.max_artifact_size]
        if verdict is Verdict.BLOCK:
            return b""
        must = [f for f in findings if f.rule == INJECTED_SECRET_RULE]
        if verdict is Verdict.QUARANTINE or (verdict is Verdict.WARN and self.policy.redact_on_warn):
            must = [f for f in findings if f.severity >= self.policy.warn_at or f.rule == INJECTED_SECRET_RULE]
        # Bytes past the scan bound were never inspected and are never released.
        return redact(bounded, must)

    def _allowed(self, data: bytes, finding: Finding) -> bool:
        if finding.rule in self.policy.allowlist_rules:
            return False
        if self.policy.allowlist_values:
            value = data[finding.start : finding.end].decode("utf-8", "replace")
            if value in self.policy.allowlist_values:
                return False
        return True

    def _apply_policy(self, data: bytes, finding: Finding) -> Finding:
        severity = self.policy.effective_severity(finding)
        return finding if severity == finding.severity else replace(finding, severity=severity)

    def _known_secret_findings(self, data: bytes) -> list[Finding]:
        out: list[Finding] = []
        for form in self._known:
            pos = data.find(form)
            while pos >= 0:
                out.append(
                    Finding(
                        scanner="secrets",
                        rule=INJECTED_SECRET_RULE,
                        category="injected_secret",
                        severity=Severity.CRITICAL,
                        start=pos,
                        end=pos + len(form),
                        line=0,
                        evidence=redact_value(form),
                        confidence=1.0,
                    )
                )
                pos = data.find(form, pos + 1)
        return out


def _oversize_finding(size: int, bound: int) -> Finding:
    return Finding(
        scanner="gate",
        rule=OVERSIZE_RULE,
        category="oversize",
        severity=Severity.CRITICAL,
        start=bound,
        end=bound,
        line=0,
        evidence=f"{size} bytes > max_artifact_size {bound}",
        confidence=1.0,
        redact=False,
    )


def _dedupe_across_scanners(findings: list[Finding]) -> list[Finding]:
    """One finding per (span, category): secrets and data both report emails and SSNs."""
    best: dict[tuple[int, int, str], Finding] = {}
    for f in findings:
        key = (f.start, f.end, f.category)
        if key not in best or f.severity > best[key].severity:
            best[key] = f
    return list(best.values())


def _build_scanners(policy: ExternalizationPolicy) -> tuple[Scanner, ...]:
    from kavach.scanning.code import CodeScanner
    from kavach.scanning.data import DataScanner
    from kavach.scanning.secrets import SecretsScanner

    built: list[Scanner] = []
    # data first: rules shared with secrets (email, SSN) are then reported by data.
    if "data" in policy.scanners:
        built.append(_shared("data", DataScanner))
    if "secrets" in policy.scanners:
        built.append(_shared("secrets", SecretsScanner))
    if "code" in policy.scanners:
        built.append(_shared("code", CodeScanner))
    return tuple(built)


_BANKS: dict[tuple[str, ...], PatternBank] = {}


def _combined_bank(scanners: tuple[Scanner, ...]) -> PatternBank:
    """One bank with every rule of ``scanners`` (a shared rule once, owned by the first scanner)."""
    key = tuple(s.name for s in scanners)
    bank = _BANKS.get(key)
    if bank is None:
        rules: list[Rule] = []
        owners: list[str] = []
        seen: set[int] = set()
        for scanner in scanners:
            for rule in scanner.pattern_rules:
                if id(rule) in seen or any(r.id == rule.id and r.pattern == rule.pattern for r in rules):
                    continue
                seen.add(id(rule))
                rules.append(rule)
                owners.append(scanner.name)
        bank = PatternBank(rules, owners)
        _BANKS[key] = bank
    return bank


def bank_named(names: tuple[str, ...]) -> PatternBank:
    """The combined bank of the scanners called ``names``, in that order (the scan helper's view)."""
    unknown = set(names) - SCANNER_NAMES
    if unknown:
        raise PolicyError("scanners", sorted(unknown), f"expected some of {sorted(SCANNER_NAMES)}")
    built = _build_scanners(ExternalizationPolicy(scanners=frozenset(names)))
    if tuple(s.name for s in built) != names:
        raise PolicyError("scanners", list(names), "not in the order the gate builds them")
    return _combined_bank(built)


_HELPER = ScanHelper(bank_named)

_SHARED: dict[str, Scanner] = {}


def _shared(name: str, factory: Any) -> Scanner:
    """Scanners are stateless once compiled; compile each once per process."""
    scanner = _SHARED.get(name)
    if scanner is None:
        scanner = factory()
        _SHARED[name] = scanner
    return scanner


# Bytes held back between chunks so that a secret split across two chunks is seen whole.
STREAM_HOLD = 4096
# A finding that would keep more than this held back is released (redacted) anyway.
_STREAM_MAX_HOLD = MAX_MATCH
# How long ``SpawnHandle.stream`` holds back complete lines at most before it releases them
# (``StreamGate.flush``): output that trickles in (progress lines, a prompt-paced tool) is
# seen line by line instead of in 8 KiB batches or only at the end.
STREAM_FLUSH_S = 0.1


class StreamGate:
    """The gate over a stream delivered in chunks.

    ``feed`` scans the bytes held back from the previous chunk plus the new chunk and
    returns what may be released now: everything except the last ``STREAM_HOLD`` bytes
    (and except a finding that straddles that cut, which is held until it is complete).
    ``flush`` (called when lines were held long enough) releases the complete lines held
    back; the last ``STREAM_HOLD`` bytes it released stay as context for the next scan, so
    a match whose first line was already released (a PEM header, ``Bearer`` at a line's
    end) is still found when the rest arrives.
    Offsets and line numbers of findings are relative to the whole stream. Once the
    verdict is BLOCK nothing more is released; bytes released before the block have
    already left (the price of streaming; use ``exec`` for all-or-nothing).
    """

    def __init__(self, gate: Gate, source: str) -> None:
        self._gate = gate
        self._source = source
        self._buffer = b""  # bytes not released yet
        self._offset = 0  # stream offset of self._buffer[0]
        self._line = 1  # line number at self._buffer[0]
        # Released bytes scanned again before the buffer (set by flush, whose cut leaves
        # no held tail to give the next scan its context).
        self._context = b""
        self._verdict = Verdict.PASS
        self._findings: list[Finding] = []
        self._total = 0
        self._original = bytearray()
        self._hold = max(STREAM_HOLD, 3 * gate._longest_known)

    @property
    def verdict(self) -> Verdict:
        """The worst verdict so far."""
        return self._verdict

    @property
    def findings(self) -> tuple[Finding, ...]:
        """Every finding reported so far."""
        return tuple(self._findings)

    @property
    def original(self) -> bytes:
        """The unredacted stream so far (bounded by ``max_artifact_size``), for quarantine."""
        return bytes(self._original)

    @property
    def held(self) -> int:
        """How many bytes are held back, not released yet."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> tuple[bytes, list[Finding]]:
        """Add ``chunk``; return (bytes safe to release now, new findings)."""
        limit = self._gate.policy.max_artifact_size
        room = max(0, limit - self._total)
        self._total += len(chunk)
        self._original += chunk[:room]
        self._buffer += chunk[:room]
        extra: list[Finding] = []
        if len(chunk) > room and self._gate.policy.enabled and not any(f.rule == OVERSIZE_RULE for f in self._findings):
            extra.append(_oversize_finding(self._total, limit))
        # Scanning a tiny chunk would rescan the held tail every time; wait for enough bytes.
        if len(self._buffer) < 2 * self._hold and not extra:
            return b"", []
        return self._process(cut=max(0, len(self._buffer) - self._hold), final=False, extra=extra)

    def flush(self) -> tuple[bytes, list[Finding]]:
        """Release the complete lines held back (up to the last ``\\n`` or ``\\r``); a partial
        last line stays held. Returns what :meth:`feed` does."""
        end = max(self._buffer.rfind(b"\n"), self._buffer.rfind(b"\r")) + 1
        if end == 0:
            return b"", []
        return self._process(cut=end, final=False, extra=[], flushed=True)

    def close(self) -> tuple[bytes, list[Finding]]:
        """Flush what is held back; return (bytes to release, new findings)."""
        return self._process(cut=len(self._buffer), final=True, extra=[])

    def _process(
        self, *, cut: int, final: bool, extra: list[Finding], flushed: bool = False
    ) -> tuple[bytes, list[Finding]]:
        """Scan context + buffer, release the buffer up to ``cut`` (moved back to the start
        of a finding it would split) and return (released bytes, new findings)."""
        context, buffer = self._context, self._buffer
        base = len(context)
        findings = self._gate.scan(context + buffer, self._source)
        if not final:
            # Latest start first: moving the cut back to one finding's start can make it
            # split an earlier finding, which then moves it further; one that starts later
            # lies wholly past the moved cut. (One pass, no fixed-point loop.)
            for f in sorted(findings, key=lambda f: f.start, reverse=True):
                start = f.start - base
                if start < cut < f.end - base and cut - start <= _STREAM_MAX_HOLD:
                    cut = max(0, start)
        emitted = self._new_findings(findings, base, cut, final)
        first_line = self._line - context.count(b"\n")  # line number at the context's start
        shifted = [self._shift(f, base, first_line) for f in emitted] + extra
        self._findings.extend(shifted)
        policy = self._gate.policy
        from kavach.scanning.findings import worst_verdict

        self._verdict = worst_verdict(self._verdict, policy.verdict_for(shifted))
        head = buffer[:cut]
        released = b""
        if self._verdict is not Verdict.BLOCK:
            # Spans relative to the head; one that began in the context (released already)
            # is redacted from the head's first byte. (Without a context they already are.)
            local = emitted
            if base:
                local = [replace(f, start=max(0, f.start - base), end=f.end - base) for f in emitted]
            released = self._gate._release(head, local, self._verdict)
        self._line += head.count(b"\n")
        self._offset += cut
        self._buffer = buffer[cut:]
        self._set_context(context, head, keep=flushed)
        return released, shifted

    def _new_findings(self, findings: list[Finding], base: int, cut: int, final: bool) -> list[Finding]:
        """The findings of this scan to report now: those that start before the cut and end
        past the context, except one that the cut was moved back for (it is reported once
        it is complete).

        One wholly inside the context was reported when its bytes were released (a release
        splits only a finding longer than ``_STREAM_MAX_HOLD``) or is an artefact of the
        context's cut-off start. One that starts in the context and reaches into the buffer
        is new: a key whose header was released before its body came.
        """
        out = []
        for f in findings:
            start, end = f.start - base, f.end - base
            if end <= 0 or not (start < cut or (final and start <= cut)):
                continue
            if not final and end > cut and cut - start <= _STREAM_MAX_HOLD:
                continue  # still running past the cut: held, like its bytes
            out.append(f)
        return out

    def _set_context(self, context: bytes, head: bytes, *, keep: bool) -> None:
        """After a release: keep the last released bytes as context after a flush (which
        holds back at most a partial line, too little context for the next scan); after
        the other releases the held tail is the context.

        The context may start inside a token; a match found there is dropped unless it
        reaches into the buffer, which would take a match spanning the whole context (a
        hold's worth of bytes) from a cut-off start: none of the rules' anchors is cut.
        """
        if not head:
            return  # nothing released: the buffer still follows the same context
        if not keep:
            self._context = b""
            return
        tail = (context + head)[-self._hold :]
        self._context = tail

    def _shift(self, f: Finding, base: int, first_line: int) -> Finding:
        """``f`` (found in context + buffer) with stream-relative offsets and line."""
        return replace(
            f,
            start=f.start - base + self._offset,
            end=f.end - base + self._offset,
            line=f.line + first_line - 1,
        )


__all__ = [
    "INJECTED_SECRET_RULE",
    "OVERSIZE_RULE",
    "SCANNER_NAMES",
    "STREAM_FLUSH_S",
    "STREAM_HOLD",
    "ExternalizationPolicy",
    "Gate",
    "GateResult",
    "Scanner",
    "StreamGate",
    "redact",
]
