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
