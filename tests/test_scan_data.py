"""The data/compliance scanner and its validators on hand-written values."""

from __future__ import annotations

import pytest

from kavach.scanning.data import DataScanner
from kavach.scanning.findings import Severity
from kavach.scanning.validators import card_brand, iban_valid, ipv4_kind, luhn_valid, ssn_valid

SCANNER = DataScanner()


def cats(text: str) -> dict[str, list[bytes]]:
    data = text.encode()
    out: dict[str, list[bytes]] = {}
    for f in SCANNER.scan(data):
        out.setdefault(f.category, []).append(data[f.start : f.end])
    return out


def test_validators() -> None:
    assert luhn_valid(b"4111 1111 1111 1111") and not luhn_valid(b"4111 1111 1111 1112")
    assert card_brand(b"378282246310005") == "amex" and card_brand(b"9111111111111111") is None
    assert iban_valid(b"GB82 WEST 1234 5698 7654 32") and not iban_valid(b"GB82 WEST 1234 5698 7654 33")
    assert not iban_valid(b"GB82 WEST 1234 5698 7654")  # wrong length for GB
    assert ssn_valid(b"536-22-8172")
    for bad in (b"000-12-3456", b"666-12-3456", b"912-12-3456", b"536-00-8172", b"536-22-0000", b"078-05-1120"):
        assert not ssn_valid(bad), bad
    assert ipv4_kind(b"8.8.8.8") == "public" and ipv4_kind(b"10.1.2.3") == "private"
    assert ipv4_kind(b"256.1.1.1") is None and ipv4_kind(b"01.2.3.4") is None


@pytest.mark.parametrize(
    ("text", "category", "value"),
    [
        ("paid with 4111-1111-1111-1111 today", "credit_card", b"4111-1111-1111-1111"),
        ("amex 3782 822463 10005", "credit_card", b"3782 822463 10005"),
        ("IBAN: DE89 3704 0044 0532 0130 00", "iban", b"DE89 3704 0044 0532 0130 00"),
        ("ssn=536-22-8172", "ssn", b"536-22-8172"),
        ("SSN: 536228172", "ssn", b"536228172"),
        ("call me at +44 20 7946 0958", "phone", b"+44 20 7946 0958"),
        ("Phone: 555-0142", "phone", b"555-0142"),
        ("from 203.0.113.9 port 22", "ip_address_private", b"203.0.113.9"),  # TEST-NET-3 is not global
        ("from 8.8.4.4 port 22", "ip_address", b"8.8.4.4"),
        ("write to dev@corp.example.com", "email", b"dev@corp.example.com"),
    ],
)
def test_valid_values_are_found(text: str, category: str, value: bytes) -> None:
    assert value in cats(text).get(category, []), cats(text)


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("ts=1549816804470", "credit_card"),  # epoch millis
        ("card 4111 1111 1111 1112", "credit_card"),  # Luhn fails
        ("IBAN GB82 WEST 1234 5698 7654 33", "iban"),  # mod-97 fails
        ("ssn=666-23-3005", "ssn"),
        ("released 2018-03-03", "phone"),
        ("version 11.28.131", "phone"),
        ("ISBN 978-3-16-148410-0", "phone"),
        ("created_at=1282315875", "phone"),
        ("oid=1.3.6.1.4.1.960.78", "ip_address"),
        ('__version__ = "9.1.46.211"', "ip_address"),
        ("GET / from 255.36.92.257", "ip_address"),
        ("background: url(icon@2x.png)", "email"),
        ("@media (max-width: 768px)", "email"),
        ("npm install @aws-sdk/client-s3", "email"),
    ],
)
def test_near_misses_are_not_found(text: str, category: str) -> None:
    found = cats(text)
    assert category not in found and f"{category}_private" not in found, found


def test_private_ips_are_info_and_not_redacted() -> None:
    found = [f for f in SCANNER.scan(b"listening on 10.0.0.5:8080") if f.rule == "pii.ipv4"]
    assert found and found[0].severity == Severity.INFO and not found[0].redact


def test_pci_card_with_cvv_is_critical_and_cvv_is_redactable() -> None:
    data = b'{"pan": "4111 1111 1111 1111", "exp": "12/29", "cvv": "123"}'
    found = {f.rule: f for f in SCANNER.scan(data)}
    assert found["compliance.pci-cardholder-data"].severity == Severity.CRITICAL
    cvv = found["compliance.pci-sensitive-auth-data"]
    assert data[cvv.start : cvv.end] == b"123" and cvv.redact
    lone = {f.rule for f in SCANNER.scan(b"card 4111 1111 1111 1111")}
    assert "compliance.pci-cardholder-data" not in lone  # a card alone is high, not cardholder data


def test_hipaa_needs_context_not_a_lone_keyword() -> None:
    record = b"Patient: Maria Lopez\nMRN: 00481516\nDx: J45.909\n"
    assert "compliance.hipaa-phi" in {f.rule for f in SCANNER.scan(record)}
    assert "compliance.hipaa-phi" not in {f.rule for f in SCANNER.scan(b"MRN: 00481516 (test fixture)")}
    assert "compliance.hipaa-phi" not in {f.rule for f in SCANNER.scan(b"the mrn column is indexed")}


def test_gdpr_identifier_next_to_a_name() -> None:
    found = {f.rule for f in SCANNER.scan(b"Name: Ana Silva, email: ana.silva@corp.example.com")}
    assert "compliance.gdpr-personal-data" in found


def test_bulk_personal_data_is_soc2_high() -> None:
    rows = "\n".join(f"user{i}@corp.example.com" for i in range(30)).encode()
    found = [f for f in SCANNER.scan(rows) if f.rule == "compliance.soc2-bulk-pii"]
    assert found and found[0].severity == Severity.HIGH


# --- phonenumbers only where its verdict matters -------------------------------------------------

from dataclasses import replace as _replace  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kavach.scanning import data as data_module  # noqa: E402
from kavach.scanning.compliance import compliance_findings  # noqa: E402
from kavach.scanning.engine import PatternBank, Spans, dedupe  # noqa: E402


def _phone_fully_checked(data: bytes, start: int, end: int, spans: Spans) -> float | None:
    """The reference: every phone candidate confirmed by phonenumbers before post-processing."""
    confidence = data_module._phone_candidate(data, start, end, spans)
    if confidence in data_module._PHONE_UNCONFIRMED and not data_module._phone_confirmed(data[start:end]):
        return None
    return confidence


def _reference_findings(data: bytes) -> set[tuple[str, str, int, int, float]]:
    rules = [
        _replace(r, validate=_phone_fully_checked) if r.validate is data_module._phone_candidate else r
        for r in data_module.DATA_RULES
    ]
    raw = PatternBank(rules).scan(data, "data")
    # DataScanner.post without its phone confirmation step (every candidate is confirmed here).
    found = data_module._drop_shadowed(dedupe([data_module._refine(data, f) for f in raw]))
    found.extend(compliance_findings(data, found))
    return {(f.rule, f.category, f.start, f.end, f.confidence) for f in found}


_PHONE_PIECES = st.sampled_from(
    [
        b"054-28-6917",
        b"536-22-8172",
        b"172.61.42.192",
        b"8.8.4.4",
        b"+44 20 7946 0958",
        b"0044 20 7946 0958",
        b"(415) 555-2671",
        b"020 7946 0958",
        b"555-0142",
        b"2014.09.29",
        b"1.22.3",
        b"4111 1111 1111 1111",
        b"SSN ",
        b"phone: ",
        b" ",
        b"-",
        b".",
        b"\n",
        b"call ",
        b"x12",
        b"0",
        b"7",
        b"12",
        b"(",
        b")",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PHONE_PIECES, min_size=1, max_size=12))
def test_skipping_moot_phone_parses_changes_no_finding(pieces: list[bytes]) -> None:
    # Phone candidates inside an SSN, card or IP address are dropped without asking
    # phonenumbers unless another candidate lies inside them; the findings must be exactly
    # those of confirming every candidate first.
    data = b"".join(pieces)
    raw = SCANNER._bank.scan(data, "data")
    got = {(f.rule, f.category, f.start, f.end, f.confidence) for f in SCANNER.post(data, raw)}
    assert got == _reference_findings(data)


def test_a_shadowed_phone_candidate_is_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    real = data_module._phone_confirmed

    def spy(value: bytes) -> bool:
        parsed.append(value)
        return real(value)

    monkeypatch.setattr(data_module, "_phone_confirmed", spy)
    found = cats("from 172.61.42.192 port 22 and ssn 054-28-6917, ref (415) 555-2671")
    assert found["phone"] == [b"(415) 555-2671"] and found["ssn"] == [b"054-28-6917"]
    # The address and the SSN-shaped number were not sent to phonenumbers; the real number was.
    assert parsed == [b"(415) 555-2671"]


def test_a_shadowed_candidate_holding_another_is_still_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its verdict decides whether the candidate inside it survives dedupe, so it is asked.
    from kavach.scanning.findings import Finding

    def phone(start: int, end: int) -> Finding:
        return Finding(
            scanner="data",
            rule="pii.phone",
            category="phone",
            severity=Severity.LOW,
            start=start,
            end=end,
            line=0,
            evidence="",
            confidence=data_module._CONF_NATIONAL,
        )

    parsed: list[int] = []

    def confirmed(value: bytes) -> bool:
        parsed.append(len(value))
        return True

    text = b"0" * 40
    monkeypatch.setattr(data_module, "_phone_confirmed", confirmed)
    ssn = Finding(
        scanner="data",
        rule="pii.ssn",
        category="ssn",
        severity=Severity.HIGH,
        start=0,
        end=11,
        line=0,
        evidence="",
        confidence=0.75,
    )
    outer, inner = phone(0, 24), phone(12, 24)
    kept = data_module._confirm_phones(text, [ssn, outer, inner])
    assert outer in kept and inner in kept and sorted(parsed) == [12, 24]
    parsed.clear()
    kept = data_module._confirm_phones(text, [ssn, outer])
    assert outer not in kept and parsed == []  # moot: shadowed and holding nothing
