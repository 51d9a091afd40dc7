"""The shared, linear-time matching engine behind the pattern scanners.

Every pattern is compiled with RE2 (``google-re2``), whose automata run in time linear in
the input: untrusted output cannot stall the gate with a pathological string. Input is
scanned as **bytes**, so spans are byte offsets into the artifact, in windows of
``WINDOW`` bytes:

1. one ``re2.Set`` pass over the window answers "which rules can match here at all"
   (one DFA pass for all rules instead of one pass per rule). The Set holds each rule's
   *anchors* (the literals every match contains: ``AKIA``, ``-----BEGIN``, ``password``),
   which keeps its automaton small and fast; a rule without anchors is in the Set whole;
2. only those rules run ``finditer`` over the window, with the whole artifact as context
   so ``\\b`` at the window's first byte sees the byte before it;
3. a match is owned by the window its first byte falls in and may extend up to its
   rule's ``max_len`` (``OVERLAP`` unless the rule says more, e.g. PEM blocks) past the
   window, so a match straddling a window boundary is found exactly once.

A match longer than its rule's ``max_len`` is truncated there (only unbounded
repetitions can do that: base64 bodies of absurd length); the span still covers the
secret's start, so redaction still removes the identifying part.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import re._parser as _sre_parser  # type: ignore[import-not-found]
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import re2

from kavach.scanning.findings import Finding, Severity

# Small enough that a rule's RE2 pass runs over few bytes without one of its anchors,
# large enough that the per-window Set call and the OVERLAP rescanned are cheap
# (4 KiB: per-rule RE2 time 0.60 -> 0.40 s CPU on 31 MB of the benchmark corpus; 2 KiB no better).
WINDOW = 4 * 1024
# How far past its window a match may extend (its rule's ``max_len`` may say more) and
# how far past the window the prefilter looks for a rule's anchor.
OVERLAP = 1024
# The longest match any rule may need (a PEM block of a 8192-bit RSA key is ~6.5 KiB).
MAX_MATCH = 16 * 1024

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


Spans = list[tuple[int, int]]
"""Byte spans of a match: the whole match first, then each group ((-1, -1) if unset)."""

Validator = Callable[[bytes, int, int, Spans], "float | tuple[float, int] | None"]
"""``(artifact, value_start, value_end, spans) -> confidence, or (confidence, new_end), or None to reject``.

Returning a new end lets a validator trim a greedy candidate to the part that validates
(an IBAN followed by an upper-case word)."""

_UNANCHORED = re2._Anchor.UNANCHORED
_ANCHOR_START = re2._Anchor.ANCHOR_START


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
    # Longest match this rule must find whole (the search runs this far past its window).
    max_len: int = OVERLAP


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


def _longest_match(pattern: str, default: int) -> int:
    """The most bytes a match of ``pattern`` can span, or ``default`` when unbounded or unknown.

    Python's regex parser measures the width (``re._parser``; a Latin-1 character is one
    byte). RE2 syntax it does not read (``\\p{..}``, flags mid-pattern) gives ``default``.
    ``{,n}`` is a repetition to Python but a literal to RE2, so such patterns are not
    measured. A bound that is too large only costs time; none is ever too small.
    """
    if "{," in pattern:
        return default
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, longest = _sre_parser.parse(pattern).getwidth()
    except (re.error, ValueError, TypeError, OverflowError, RecursionError):
        return default
    return int(longest) if longest < default else default


# Zero-width assertions: a pattern with one depends on bytes outside what it matches.
_ASSERTION = re.compile(r"\\[bBAz]|\$|(?<!\[)\^")


class _FollowedBy:
    """A rule's ``not_followed_by`` test: does the pattern match right at ``pos``?

    These patterns are one or two characters long without assertions ("a word character",
    "a dot and a digit"), so the answer depends only on ``data[pos:pos + 2]``; it is kept
    per distinct pair of bytes (at most 65,792 of them) instead of asking RE2 again for
    every candidate. A longer or assertion-bearing pattern is always asked.
    """

    def __init__(self, pattern: str) -> None:
        self._match = compile_bytes(pattern)._regexp.Match
        width = _longest_match(pattern, 3)
        self._width = width if width <= 2 and _ASSERTION.search(pattern) is None else 0
        self._known: dict[bytes, bool] = {}

    def __call__(self, data: bytes, pos: int) -> bool:
        """Whether the pattern matches ``data`` at ``pos`` (anchored there)."""
        if not self._width:
            return bool(self._match(_ANCHOR_START, data, pos, len(data))[0][0] >= 0)
        key = data[pos : pos + self._width]
        known = self._known.get(key)
        if known is None:
            known = bool(self._match(_ANCHOR_START, key, 0, len(key))[0][0] >= 0)
            self._known[key] = known
        return known


class PatternBank:
    """A set of rules compiled once and matched together over windows of an artifact."""

    def __init__(self, rules: Sequence[Rule], owners: Sequence[str] | None = None) -> None:
        self.rules = tuple(rules)
        # Which scanner reports each rule's findings when one bank serves several scanners.
        self.owners = tuple(owners) if owners is not None else None
        self._compiled: list[re2._Regexp] = []
        self._followers = [_FollowedBy(rule.not_followed_by) if rule.not_followed_by else None for rule in self.rules]
        # How far past its window each rule's search runs: its ``max_len``, or less when no
        # match of its pattern can be that long (cards, IPs, most tokens: tens of bytes).
        self._max_lens = [min(rule.max_len, _longest_match(rule.pattern, rule.max_len)) for rule in self.rules]
        self._set = re2.Set.SearchSet(re2_options(_SET_MEM))
        for rule in self.rules:
            pattern = rule.pattern if not rule.case_insensitive else "(?i)" + rule.pattern
            self._compiled.append(compile_bytes(pattern))
            self._set.Add(prefilter_pattern(rule).encode("latin-1"))
        self._set.Compile()
        self._raw = [regexp._regexp.Match for regexp in self._compiled]
        self._set_match = self._set._set.Match
        owners_ = self.owners
        # Per rule, what the scan loop needs, unpacked once.
        self._plans = [
            (
                rule,
                rule.value_group,
                self._followers[i],
                rule.validate,
                rule.confidence,
                owners_[i] if owners_ is not None else None,
                rule.evidence == "redact",
                rule.redact,
            )
            for i, rule in enumerate(self.rules)
        ]

    def matches(self, data: bytes) -> Iterator[tuple[int, Spans]]:
        """Every (rule index, match) in ``data``, each match reported once, windows in order.

        Windows are small so that the prefilter is selective: a rule runs only over the
        few windows that contain one of its anchors. Invariant (checked by the property
        tests): every match contains an anchor within its first ``OVERLAP`` bytes.
        """
        yield from self._match_windows(data, 0, len(data))

    def _match_windows(self, data: bytes, first: int, stop: int) -> list[tuple[int, Spans]]:
        """The matches owned by the windows starting in ``[first, stop)`` (``first`` window-aligned)."""
        n = len(data)
        out: list[tuple[int, Spans]] = []
        append = out.append
        # The binding's C++ matchers directly: the Python wrappers' per-call objects cost
        # more than the matching itself on small windows.
        raw = self._raw
        max_lens = self._max_lens
        set_match = self._set_match
        for ws in range(first, stop, WINDOW):
            owned_end = ws + WINDOW
            # (Comparisons, not min(): this loop runs per window and per rule that passes
            # the Set, and a builtin call costs more than the comparison.)
            if owned_end > n:  # noqa: PLR1730
                owned_end = n
            # (A slice past the end stops at the end.)
            hits = set_match(data[ws : owned_end + OVERLAP])
            if not hits:
                continue
            hits.sort()  # rules in bank order, whatever order the Set reports them in
            for index in hits:
                match = raw[index]
                pos, endpos = ws, owned_end + max_lens[index]
                if endpos > n:  # noqa: PLR1730
                    endpos = n
                while True:
                    spans = match(_UNANCHORED, data, pos, endpos)
                    start, end = spans[0]
                    if start < 0 or start >= owned_end:
                        break
                    append((index, spans))
                    if pos == endpos:
                        break
                    pos = pos + 1 if end == pos else end
        return out

    def scan(self, data: bytes, scanner: str) -> list[Finding]:
        """Validated findings of every rule (lines not yet assigned: see :func:`finalize`)."""
        return self.findings(data, scanner, self.validated(data, 0, len(data)))

    def validated(self, data: bytes, first: int, stop: int) -> list[tuple[int, int, int, float]]:
        """``(rule index, start, end, confidence)`` of the validated matches owned by the
        windows starting in ``[first, stop)`` (``first`` a multiple of ``WINDOW``).

        Plain tuples, so that a helper process can compute them for part of an artifact
        (:mod:`kavach.scanning.helper`) and the caller turn them into findings.
        """
        found: list[tuple[int, int, int, float]] = []
        append = found.append
        plans = self._plans
        for index, spans in self._match_windows(data, first, stop):
            _rule, group, follower, validate, confidence, _owner, _redacts, _redact = plans[index]
            vstart, vend = spans[group]
            if vstart < 0 or vend <= vstart:
                continue
            if follower is not None and follower(data, vend):
                continue
            if validate is not None:
                verdict = validate(data, vstart, vend, spans)
                if verdict is None:
                    continue
                if isinstance(verdict, tuple):
                    confidence, vend = verdict
                else:
                    confidence = verdict
            append((index, vstart, vend, confidence))
        return found

    def findings(self, data: bytes, scanner: str, validated: Iterable[tuple[int, int, int, float]]) -> list[Finding]:
        """The findings of :meth:`validated`'s matches in ``data``."""
        found: list[Finding] = []
        append = found.append
        plans = self._plans
        new = object.__new__
        for index, vstart, vend, confidence in validated:
            rule, _group, _follower, _validate, _confidence, owner, redacts, redact = plans[index]
            value = data[vstart:vend]
            # Finding's generated __init__ (frozen: one object.__setattr__ per field) is
            # the single largest per-match cost of the loop; the fields are the same.
            finding = new(Finding)
            finding.__dict__.update(
                scanner=owner if owner is not None else scanner,
                rule=rule.id,
                category=rule.category,
                severity=rule.severity,
                start=vstart,
                end=vend,
                line=0,
                evidence=redact_value(value) if redacts else snippet(value),
                confidence=confidence,
                source="",
                redact=redact,
            )
            append(finding)
        return found

    def digest(self) -> str:
        """What identifies this bank's rules (a helper process checks it built the same bank).

        Every field of every rule, and the compiled code of each rule's validator as this
        process loaded it (not the functions it calls), so a helper that imported other
        rules or other validators than the caller does not match.
        """
        h = hashlib.blake2b(digest_size=16)
        for r in self.rules:
            fields = (
                r.id,
                r.category,
                int(r.severity),
                r.pattern,
                r.value_group,
                r.case_insensitive,
                r.evidence,
                r.redact,
                r.confidence,
                r.not_followed_by,
                r.anchors,
                r.max_len,
                r.tags,
            )
            h.update(repr(fields).encode("utf-8", "surrogatepass"))
            code = getattr(r.validate, "__code__", None)
            h.update(_code_fingerprint(code) if code is not None else repr(type(r.validate)).encode())
            h.update(b"\0")
        return h.hexdigest()


def _code_fingerprint(code: types.CodeType) -> bytes:
    """Bytecode, names and constants of ``code`` (nested code too): the same in every process
    that compiled the same source (unlike ``marshal``, whose output depends on refcounts)."""
    return b"\1".join([code.co_code, repr(code.co_names).encode(), *map(_const_fingerprint, code.co_consts)])


def _const_fingerprint(const: object) -> bytes:
    if isinstance(const, types.CodeType):
        return _code_fingerprint(const)
    if isinstance(const, tuple):
        return b"(" + b"\2".join(map(_const_fingerprint, const)) + b")"
    if isinstance(const, frozenset):  # (its repr's order depends on the process's hash seed)
        return b"{" + b"\2".join(sorted(map(_const_fingerprint, const))) + b"}"
    return repr(const).encode()


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


class SpanIndex:
    """Sorted, merged byte spans answering "does [start, end) overlap any of them?" in log time."""

    def __init__(self, spans: Iterable[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for start, end in sorted(spans):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self._starts = [s for s, _ in merged]
        self._ends = [e for _, e in merged]

    def overlaps(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` overlaps a stored span."""
        i = bisect.bisect_right(self._starts, end - 1) - 1
        return i >= 0 and self._ends[i] > start

    def __bool__(self) -> bool:
        return bool(self._starts)


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
    append = out.append
    new = object.__new__
    line, pos = 1, 0
    for f in ordered:
        line += data.count(b"\n", pos, f.start)
        pos = f.start
        # A copy with line and source set (as dataclasses.replace would make, without the
        # frozen __init__'s per-field cost: this runs once per finding).
        copy = new(Finding)
        fields = copy.__dict__
        fields.update(f.__dict__)
        fields["line"] = line
        fields["source"] = source or f.source
        append(copy)
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
    "SpanIndex",
    "Spans",
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
