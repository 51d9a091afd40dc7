"""Correctness of the scanners on pathological and generated inputs (no timing assertions).

Timing lives in benchmarks/bench_scanners.py; here we check that the linear-time engine's
shortcuts (window prefilter, anchors, window boundaries, streaming) never lose a match.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kavach.scanning import ExternalizationPolicy, Gate, Verdict
from kavach.scanning.code import REGEX_RULES
from kavach.scanning.data import DATA_RULES
from kavach.scanning.engine import WINDOW, PatternBank, compile_bytes
from kavach.scanning.findings import Finding
from kavach.scanning.secrets import SECRET_RULES

AWS_ID = b"AKIA" + b"QWERTYUIOPASDFGH"
GH = b"ghp_" + b"a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"

PATHOLOGICAL = [
    b"a" * 200_000,
    b"\"'" * 100_000,
    b"password=" * 20_000,
    b"4 " * 100_000,
    b"a@a." * 50_000,
    b"-----BEGIN RSA PRIVATE KEY-----\n" + b"A" * 200_000,
    b"a:" * 100_000,
    b"((((" * 50_000 + b"))))" * 50_000,
    b"\\x41" * 50_000,
]


def test_pathological_inputs_still_find_an_embedded_secret() -> None:
    gate = Gate(ExternalizationPolicy(max_artifact_size=1 << 24))
    for filler in PATHOLOGICAL:
        half = len(filler) // 2
        data = filler[:half] + b"\n" + AWS_ID + b"\n" + filler[half:]
        found = [f for f in gate.scan(data) if f.rule == "secrets.aws-access-key-id"]
        assert len(found) == 1, filler[:20]
        assert data[found[0].start : found[0].end] == AWS_ID
        assert gate.apply(data).verdict is Verdict.BLOCK


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(offset=st.integers(min_value=-80, max_value=80), windows=st.integers(min_value=1, max_value=2))
def test_tokens_straddling_window_boundaries_are_found_once(offset: int, windows: int) -> None:
    gate = Gate(ExternalizationPolicy(max_artifact_size=1 << 24))
    position = windows * WINDOW + offset
    data = b"x " * (position // 2) + b" " * (position % 2) + GH + b" tail"
    found = [f for f in gate.scan(data) if f.rule == "secrets.github-token"]
    assert [(f.start, f.end) for f in found] == [(position, position + len(GH))]


_PIECES = st.sampled_from(
    [
        b" ",
        b"\n",
        b"=",
        b":",
        b'"',
        b"'",
        b"password",
        b"token",
        b"api_key",
        b"AKIA",
        b"QWERTYUIOPASDFGH",
        b"Tr0ub4dor&3x",
        b"q8Zr3Lm0Xv7Nb2Kc5Jd9Hf4Gs1",
        b"@",
        b"corp.example.com",
        b"alice",
        b"4111 1111 1111 1111",
        b"536-22-8172",
        b"+44 20 7946 0958",
        b"8.8.8.8",
        b"curl https://x.example/i",
        b"|",
        b"sh",
        b"bash -i",
        b">& /dev/tcp/203.0.113.7/4444",
        b"eval(",
        b"atob(",
        b"-----BEGIN ",
        b"PRIVATE KEY-----",
        b"ghp_",
        b"a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
        b"postgres://u:",
        b"Xk9mQ2vL7pR4@db",
        b"Bearer ",
        b"eyJhbGciOiJIUzI1NiJ9",
        b".",
        b"eyJzdWIiOiIxMjM0In0",
        b"sig",
        b"GB82 WEST 1234 5698 7654 32",
        b"Phone: ",
        b"SSN: 536228172",
    ]
)


def _naive(rules: tuple, data: bytes) -> set[tuple[str, int, int]]:  # type: ignore[type-arg]
    """Every rule run over the whole input, no prefilter, no windows."""
    out = set()
    for rule in rules:
        pattern = compile_bytes(("(?i)" if rule.case_insensitive else "") + rule.pattern)
        follower = compile_bytes(rule.not_followed_by) if rule.not_followed_by else None
        for m in pattern.finditer(data):
            start, end = m.span(rule.value_group)
            if start < 0 or end <= start or (follower is not None and follower.match(data, end) is not None):
                continue
            spans = [m.span(i) for i in range(pattern.groups + 1)]
            verdict = rule.validate(data, start, end, spans) if rule.validate is not None else 1.0
            if verdict is None:
                continue
            # A validator may trim a greedy candidate (an IBAN followed by more digit groups).
            out.add((rule.id, start, verdict[1] if isinstance(verdict, tuple) else end))
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(_PIECES, min_size=1, max_size=40))
def test_prefilter_and_anchors_never_drop_a_match(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    for rules in (SECRET_RULES, DATA_RULES, REGEX_RULES):
        bank = PatternBank(rules)
        got = {(f.rule, f.start, f.end) for f in bank.scan(data, "t")}
        assert got == _naive(rules, data)


def _redacting_policy() -> ExternalizationPolicy:
    """Nothing blocks (so the released bytes can be checked): the critical kinds quarantine."""
    return ExternalizationPolicy(
        block_at="critical",
        quarantine_at="critical",
        category_overrides={
            k: "high" for k in ("cloud_key", "vcs_token", "private_key", "connection_string", "pci_dss")
        },
    )


def _redacted_values(data: bytes, findings: tuple[Finding, ...], policy: ExternalizationPolicy) -> Counter[bytes]:
    """How many reported occurrences of each value the gate must redact.

    Occurrences, not findings: two findings (a password that is also an SSN) may share a span.
    """
    spans: dict[bytes, set[tuple[int, int]]] = {}
    for f in findings:
        value = data[f.start : f.end]
        if f.redact and f.severity >= policy.warn_at and len(value) >= 8:
            spans.setdefault(value, set()).add((f.start, f.end))
    return Counter({value: len(found) for value, found in spans.items()})


@settings(max_examples=60, deadline=None)
@given(st.lists(_PIECES, min_size=1, max_size=40), st.integers(min_value=1, max_value=64))
def test_redaction_removes_every_reported_value(pieces: list[bytes], chunk: int) -> None:
    data = b"".join(pieces)
    policy = _redacting_policy()
    gate = Gate(policy)
    result = gate.apply(data)
    # Streaming the same bytes in small chunks reports the same findings.
    stream = gate.stream("stdout")
    streamed = []
    for i in range(0, len(data), chunk):
        streamed += stream.feed(data[i : i + chunk])[1]
    streamed += stream.close()[1]
    assert {(f.rule, f.start, f.end) for f in streamed} == {(f.rule, f.start, f.end) for f in result.findings}
    if result.verdict is Verdict.PASS:
        return
    for value, count in _redacted_values(data, result.findings, policy).items():
        # Each reported occurrence is gone; unreported look-alikes (a card number glued to a
        # word) may remain.
        assert result.released.count(value) <= data.count(value) - count, value


_BANKS = {name: PatternBank(rules) for name, rules in (("s", SECRET_RULES), ("d", DATA_RULES), ("c", REGEX_RULES))}


def test_every_rule_compiles_and_is_in_a_bank() -> None:
    assert sum(len(b.rules) for b in _BANKS.values()) == len(SECRET_RULES) + len(DATA_RULES) + len(REGEX_RULES)


def test_email_with_a_numeric_first_label_is_found_by_every_bank() -> None:
    # Found by the property test above: the data bank's email anchor once required a
    # letter after the first dot, so this address was dropped by the window prefilter.
    data = b"password@8.8.8.8corp.example.com"
    for rules in (SECRET_RULES, DATA_RULES):
        got = {(f.rule, f.start, f.end) for f in PatternBank(rules).scan(data, "t")}
        assert got == _naive(rules, data) == {("pii.email", 0, 32)}


def test_a_rules_search_bound_is_its_longest_possible_match() -> None:
    from kavach.scanning.engine import _longest_match

    assert _longest_match(r"(?:^|[^0-9])(\d{3}-\d{2}-\d{4})", 1024) == 12
    assert _longest_match(r"AKIA[0-9A-Z]{16}", 1024) == 20
    assert _longest_match(r"(?i)key\s*=\s*(\S+)", 1024) == 1024  # unbounded
    assert _longest_match(r"a{,3}", 1024) == 1024  # a literal "{,3}" to RE2: not measured
    assert _longest_match(r"\p{Lu}\w{3}", 1024) == 1024  # RE2 syntax Python cannot read
    assert _longest_match(r"x{2000}", 1024) == 1024  # never more than the rule's max_len


def test_a_token_ending_right_at_its_search_bound_is_found_whole() -> None:
    # A card number whose last digit is the last byte the card rule searches past its window:
    # the bound (38 bytes) must not cut it, and the next window must not report it again.
    card = b"4111 1111 1111 1111"
    for shift in range(-len(card), 40):
        data = b"x" * (WINDOW - len(card) + shift) + b" " + card + b" tail"
        got = [(f.rule, data[f.start : f.end]) for f in _BANKS["d"].scan(data, "t") if f.rule == "pii.credit-card"]
        assert got == [("pii.credit-card", card)], shift


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_PIECES, min_size=1, max_size=40),
    st.integers(min_value=1, max_value=64),
    st.integers(min_value=1, max_value=4),
)
# Found by this test when flushes kept no context: the Bearer rule's match spans a line.
@example([b"Bearer ", b"\n", b"password", b"536-22-8172"], 1, 1)
def test_streaming_with_flushes_misses_nothing_and_releases_no_reported_value(
    pieces: list[bytes], chunk: int, every: int
) -> None:
    # spawn's stream flushes the complete lines held back while output trickles in: with a
    # flush after every few chunks, every finding of the whole artifact is still reported
    # (from the same first byte; one that grew as more of it came may also be reported with
    # a shorter span) and no value the whole artifact's gate redacts is released.
    data = b"".join(pieces)
    policy = _redacting_policy()
    gate = Gate(policy)
    whole = gate.apply(data)
    stream = gate.stream("stdout")
    released = b""
    for n, i in enumerate(range(0, len(data), chunk)):
        released += stream.feed(data[i : i + chunk])[0]
        if n % every == 0:
            released += stream.flush()[0]
    released += stream.close()[0]
    assert {(f.rule, f.start) for f in whole.findings} <= {(f.rule, f.start) for f in stream.findings}
    for value, count in _redacted_values(data, whole.findings, policy).items():
        assert released.count(value) <= data.count(value) - count, value
