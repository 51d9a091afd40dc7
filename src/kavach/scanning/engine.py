"""The shared, linear-time matching engine behind the pattern scanners.

Every pattern is compiled with RE2 (``google-re2``), whose automata run in time linear in
the input: untrusted output cannot stall the gate with a pathological string. Input is
scanned as **bytes**, so spans are byte offsets into the artifact, in windows of
``WINDOW`` bytes that overlap by ``OVERLAP``:

1. one ``re2.Set`` pass over the window answers "which rules can match here at all"
   (one DFA pass for all rules instead of one pass per rule). The Set holds each rule's
   *anchors* (the literals every match contains: ``AKIA``, ``-----BEGIN``, ``password``),
   which keeps its automaton small and fast; a rule without anchors is in the Set whole;
2. only those rules run ``finditer`` over the window, with the whole artifact as context
   so ``\\b`` at the window's first byte sees the byte before it;
3. a match is owned by the window its first byte falls in, so matches up to ``OVERLAP``
   bytes long that straddle a window boundary are found exactly once.

Quantifiers in rule patterns are bounded well below ``OVERLAP`` except for the PEM block
rule, whose match is truncated at the window's end on inputs with a key longer than that
(the rest of the block is still caught by the private-key header rule's span).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import re2

from kavach.scanning.findings import Finding, Severity

WINDOW = 256 * 1024
OVERLAP = 16 * 1024

# RE2's default 8 MiB DFA budget is enough for single rules; the Set of all rules of a
# scanner gets more so that it never has to fall back (a Set has no slower fallback).
_SET_MEM = 256 << 20
_RULE_MEM = 32 << 20


def re2_options(max_mem: int = _RULE_MEM, *, case_insensitive: bool = False, utf8: bool = False) -> re2.Options:
    """RE2 options for byte patterns.

    Latin-1 by default so that every byte is one character: an artifact may hold any
    bytes, and a negated class must be able to match an invalid UTF-8 byte.
    """
    options = re2.Options()
    options.max_mem = max_mem
    if not utf8:
        options.encoding = re2.Options.Encoding.LATIN1
    options.case_sensitive = not case_insensitive
    options.log_errors = False
    return options


def compile_bytes(pattern: str, *, case_insensitive: bool = False, utf8: bool = False) -> re2._Regexp:
    """Compile ``pattern`` with RE2 for matching bytes (``utf8`` for Unicode classes such as ``\\p{Lu}``)."""
    encoded = pattern.encode("utf-8" if utf8 else "latin-1")
    return re2.compile(encoded, re2_options(case_insensitive=case_insensitive, utf8=utf8))


Validator = Callable[[bytes, int, int, "re2._Match"], "float | None"]
"""``(artifact, value_start, value_end, match) -> confidence or None to reject``."""


@dataclass(frozen=True)
class Rule:
    """One detection rule: an RE2 pattern plus a validator that confirms the candidate.

    ``value_group`` names the group whose span is the finding (the secret itself, not the
    ``password =`` around it); 0 means the whole match. ``evidence`` chooses how the
    finding's snippet is rendered: ``"redact"`` for secrets and PII, ``"snippet"`` for code.
    """

    id: str
    category: str
    severity: Severity
    pattern: str
    value_group: int = 0
    validate: Validator | None = None
    case_insensitive: bool = False
    evidence: str = "redact"
    redact: bool = True
    confidence: float = 0.9
    description: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)
    # RE2 has no lookahead: instead of consuming a trailing boundary character (which
    # would hide a second match one separator later), the engine rejects a value that
    # is immediately followed by a match of this pattern.
    not_followed_by: str = ""
    # Regex fragments (usually literals) one of which every match contains; the window
    # prefilter looks for these instead of the full pattern. Derived from the pattern's
    # literal prefix when empty; the full pattern is used when neither exists.
    anchors: tuple[str, ...] = ()


def redact_value(value: bytes) -> str:
    """A snippet that identifies a secret without disclosing it: a short prefix, ``…``, the length.

    At most a quarter of the value (and never more than 4 characters) is shown, so short
    passwords do not leak half of themselves.
    """
    shown = min(4, len(value) // 4)
    prefix = value[:shown].decode("utf-8", "replace")
    return f"{prefix}…({len(value)} chars)"


def snippet(value: bytes, limit: int = 80) -> str:
    """A printable, single-line excerpt of non-secret text (code findings)."""
    text = value[:limit].decode("utf-8", "replace").replace("\n", "\\n").replace("\r", "\\r")
    return text + ("…" if len(value) > limit else "")


_META = frozenset("[](){}.*+?|^$\\")


def _split_top(pattern: str) -> list[str]:
    """``pattern`` split at its top-level ``|`` (respecting groups, classes and escapes)."""
    parts: list[str] = []
    depth, cur, i = 0, "", 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            cur += pattern[i : i + 2]
            i += 2
            continue
        if ch == "[":
            j = i + 1
            if j < len(pattern) and pattern[j] == "^":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1
            while j < len(pattern) and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            cur += pattern[i : j + 1]
            i = j + 1
            continue
        depth += (ch == "(") - (ch == ")")
        if ch == "|" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    parts.append(cur)
    return parts


def _group_end(text: str) -> int:
    depth = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return i
        i += 1
    return -1


def literal_prefixes(pattern: str) -> list[str] | None:
    """Literals (>= 3 bytes) one of which every match of ``pattern`` starts with, or None."""
    out: list[str] = []
    for alt in _split_top(pattern):
        a = alt
        while a.startswith(("\\b", "(?:^|")):
            a = a[2:] if a.startswith("\\b") else a[_group_end(a) + 1 :]
        if a.startswith("("):
            end = _group_end(a)
            if end < 0 or a[end + 1 : end + 2] in ("?", "*", "{"):
                return None
            sub = literal_prefixes(a[3 if a.startswith("(?:") else 1 : end])
            if sub is None:
                return None
            out.extend(sub)
            continue
        literal = ""
        i = 0
        while i < len(a):
            ch = a[i]
            if ch == "\\" and i + 1 < len(a) and a[i + 1] in "./-_:~=@+":
                literal += a[i + 1]
                i += 2
                continue
            if ch in _META:
                break
            literal += ch
            i += 1
        if i < len(a) and a[i] in "?*{":
            literal = literal[:-1]
        if len(literal) < 3:
            return None
        out.append(literal)
    return out


def _escape(literal: str) -> str:
    return "".join("\\" + ch if ch in _META or ch in "-/" else ch for ch in literal)


def prefilter_pattern(rule: Rule) -> str:
    """What the window prefilter searches for to decide whether ``rule`` must run."""
    flags = "(?i)" if rule.case_insensitive or rule.pattern.startswith("(?i)") else ""
    if rule.anchors:
        return flags + "(?:" + "|".join(rule.anchors) + ")"
    body = rule.pattern.removeprefix("(?i)")
    literals = literal_prefixes(body)
    if literals:
        return flags + "(?:" + "|".join(_escape(lit) for lit in literals) + ")"
    return flags + body


class PatternBank:
    """A set of rules compiled once and matched together over windows of an artifact."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self._compiled: list[re2._Regexp] = []
        self._followers: list[re2._Regexp | None] = [
            compile_bytes(rule.not_followed_by) if rule.not_followed_by else None for rule in self.rules
        ]
        self._set = re2.Set.SearchSet(re2_options(_SET_MEM))
        for rule in self.rules:
            pattern = rule.pattern if not rule.case_insensitive else "(?i)" + rule.pattern
            self._compiled.append(compile_bytes(pattern))
            self._set.Add(prefilter_pattern(rule).encode("latin-1"))
        self._set.Compile()

    def matches(self, data: bytes) -> Iterator[tuple[int, re2._Match]]:
        """Every (rule index, match) in ``data``, each match reported once, windows in order."""
        n = len(data)
        for ws in range(0, n, WINDOW):
            owned_end = min(n, ws + WINDOW)
            we = min(n, owned_end + OVERLAP)
            hits = self._set.Match(data[ws:we])
            if not hits:
                continue
            for index in sorted(hits):
                for m in self._compiled[index].finditer(data, ws, we):
                    if m.start() >= owned_end:
                        break
                    yield index, m

    def scan(self, data: bytes, scanner: str) -> list[Finding]:
        """Validated findings of every rule (lines not yet assigned: see :func:`finalize`)."""
        found: list[Finding] = []
        for index, m in self.matches(data):
            rule = self.rules[index]
            vstart, vend = m.span(rule.value_group)
            if vstart < 0 or vend <= vstart:
                continue
            follower = self._followers[index]
            if follower is not None and follower.match(data, vend) is not None:
                continue
            confidence = rule.confidence
            if rule.validate is not None:
                verdict = rule.validate(data, vstart, vend, m)
                if verdict is None:
                    continue
                confidence = verdict
            found.append(make_finding(scanner, rule, data, vstart, vend, confidence))
        return found


def make_finding(
    scanner: str,
    rule: Rule,
    data: bytes,
    start: int,
    end: int,
    confidence: float,
    *,
    severity: Severity | None = None,
    category: str | None = None,
) -> Finding:
    """A finding for ``data[start:end]`` with evidence rendered as the rule asks."""
    value = data[start:end]
    evidence = redact_value(value) if rule.evidence == "redact" else snippet(value)
    return Finding(
        scanner=scanner,
        rule=rule.id,
        category=category or rule.category,
        severity=rule.severity if severity is None else severity,
        start=start,
        end=end,
        line=0,
        evidence=evidence,
        confidence=confidence,
        redact=rule.redact,
    )


def dedupe(findings: Iterable[Finding]) -> list[Finding]:
    """Drop exact duplicates and findings of a rule nested inside another finding of the same rule."""
    by_rule: dict[str, list[Finding]] = {}
    for f in findings:
        by_rule.setdefault(f.rule, []).append(f)
    kept: list[Finding] = []
    for group in by_rule.values():
        # Longest first, so a nested (partial) match always meets its container first.
        group.sort(key=lambda f: (f.start, -(f.end - f.start)))
        last_end = -1
        for f in group:
            if f.end <= last_end:
                continue
            kept.append(f)
            last_end = max(last_end, f.end)
    kept.sort(key=lambda f: (f.start, f.end, f.rule))
    return kept


def finalize(data: bytes, findings: Iterable[Finding], source: str = "") -> list[Finding]:
    """Sorted findings with their 1-based line numbers and ``source`` filled in.

    Lines are counted incrementally over the sorted findings, so the cost is one pass
    over the artifact however many findings there are.
    """
    ordered = sorted(findings, key=lambda f: (f.start, f.end, f.rule))
    out: list[Finding] = []
    line, pos = 1, 0
    for f in ordered:
        line += data.count(b"\n", pos, f.start)
        pos = f.start
        out.append(
            Finding(
                scanner=f.scanner,
                rule=f.rule,
                category=f.category,
                severity=f.severity,
                start=f.start,
                end=f.end,
                line=line,
                evidence=f.evidence,
                confidence=f.confidence,
                source=source or f.source,
                redact=f.redact,
            )
        )
    return out


def line_bounds(data: bytes, start: int, end: int, limit: int = 4096) -> tuple[int, int]:
    """The byte range of the line(s) holding ``data[start:end]``, at most ``limit`` bytes each way."""
    lo = data.rfind(b"\n", max(0, start - limit), start) + 1
    if lo == 0:
        lo = max(0, start - limit)
    hi = data.find(b"\n", end, end + limit)
    if hi < 0:
        hi = min(len(data), end + limit)
    return lo, hi


__all__ = [
    "OVERLAP",
    "WINDOW",
    "PatternBank",
    "Rule",
    "Validator",
    "compile_bytes",
    "dedupe",
    "finalize",
    "line_bounds",
    "make_finding",
    "re2_options",
    "redact_value",
    "snippet",
]
