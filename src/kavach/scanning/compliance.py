"""Compliance rule packs: findings that only mean something *together*.

A lone keyword is not a compliance event; a combination is:

* **PCI-DSS** — a payment card number with a CVV/CVC or an expiry date within
  ``_NEAR`` bytes is cardholder data plus sensitive authentication data (critical; the
  CVV span is reported so that redaction removes it too).
* **HIPAA** — a medical record number (or patient id) near a person's name or a date of
  birth is protected health information (high).
* **GDPR** — an identifier of a person (email, phone, IBAN, SSN) next to that person's
  name is personal data about an identified individual (medium).
* **SOC 2** — many personal-data findings in one artifact is a bulk export of customer
  data (high), the confidentiality criterion's concern, whatever each item's severity.

Patterns here run with RE2 on small windows around existing findings, so the pack adds
work proportional to the number of findings, not to the artifact size (medical record
numbers are found by the data scanner's own ``pii.medical-record-number`` rule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import re2

from kavach.scanning.engine import Rule, compile_bytes, line_bounds, make_finding
from kavach.scanning.findings import Finding, Severity

_NEAR = 160
_BULK_PII = 25

_CVV = compile_bytes(
    r"(?i)\b(?:cvv2?|cvc2?|cid|csc|card\s+security\s+code|security\s+code|cvn)\b[\"']?\s{0,3}[:=#]?"
    r"\s{0,3}[\"']?(\d{3,4})\b"
)
_EXPIRY = compile_bytes(
    r"(?i)\b(?:exp(?:iry|iration)?(?:\s+date)?|valid\s+thru|good\s+thru|expires)\b[\"']?\s{0,3}"
    r"[:=]?\s{0,3}[\"']?((?:0[1-9]|1[0-2])\s?/\s?(?:\d{2}|\d{4}))\b"
)
_NAME = compile_bytes(
    r"(?:(?i:patient|name|pt|full\s+name|customer|client|employee|member)\s{0,3}[:=]\s{0,3}[\"']?"
    r"\p{Lu}[\p{Ll}'\-]+(?:\s+\p{Lu}\.?)?\s+\p{Lu}[\p{Ll}'\-]+|(?:Mr|Mrs|Ms|Miss|Dr)\.?\s+\p{Lu}"
    r"[\p{Ll}'\-]+)",
    utf8=True,
)
_DOB = compile_bytes(r"(?i)\b(?:dob|d\.o\.b\.|date\s+of\s+birth|birth\s*date|born)\b")

_UNANCHORED = re2._Anchor.UNANCHORED
# The binding's C++ matchers: the Python wrappers build a match object per call, and these
# checks run once per card or personal-data finding (thousands per MiB of customer records).
_NAME_MATCH = _NAME._regexp.Match
_DOB_MATCH = _DOB._regexp.Match
_CVV_MATCH = _CVV._regexp.Match
_EXPIRY_MATCH = _EXPIRY._regexp.Match


def _found(
    match: Callable[[re2._Anchor, bytes, int, int], list[tuple[int, int]]], data: bytes, lo: int, hi: int
) -> bool:
    """Whether ``match`` finds anything in ``data[lo:hi]`` (the whole artifact as context)."""
    return match(_UNANCHORED, data, lo, hi)[0][0] >= 0


_PERSON_IDENTIFIERS = frozenset({"email", "phone", "iban", "ssn", "credit_card"})

PCI_RULE = Rule(
    id="compliance.pci-cardholder-data",
    category="pci_dss",
    severity=Severity.CRITICAL,
    pattern="",
    description="card number with CVV or expiry nearby (PCI-DSS 3.2/3.3)",
)
PCI_SAD_RULE = Rule(
    id="compliance.pci-sensitive-auth-data",
    category="pci_dss",
    severity=Severity.CRITICAL,
    pattern="",
    description="CVV/CVC value next to a card number (PCI-DSS 3.3.1)",
)
HIPAA_RULE = Rule(
    id="compliance.hipaa-phi",
    category="hipaa",
    severity=Severity.HIGH,
    pattern="",
    description="medical record number near a name or date of birth (HIPAA 164.514)",
)
GDPR_RULE = Rule(
    id="compliance.gdpr-personal-data",
    category="gdpr",
    severity=Severity.MEDIUM,
    pattern="",
    description="an identifier next to a person's name (GDPR Art. 4(1))",
    redact=False,
)
SOC2_RULE = Rule(
    id="compliance.soc2-bulk-pii",
    category="soc2",
    severity=Severity.HIGH,
    pattern="",
    description="bulk personal data in one artifact (SOC 2 C1.1)",
    redact=False,
)

COMPLIANCE_RULES: tuple[Rule, ...] = (PCI_RULE, PCI_SAD_RULE, HIPAA_RULE, GDPR_RULE, SOC2_RULE)


def _window(data: bytes, start: int, end: int) -> tuple[int, int]:
    return max(0, start - _NEAR), min(len(data), end + _NEAR)


def _pci(data: bytes, card: Finding) -> list[Finding]:
    lo, hi = _window(data, card.start, card.end)
    out: list[Finding] = []
    cvv = _CVV_MATCH(_UNANCHORED, data, lo, hi)
    if cvv[0][0] < 0 and not _found(_EXPIRY_MATCH, data, lo, hi):
        return out
    if cvv[0][0] >= 0:
        s, e = cvv[1]
        out.append(make_finding("data", PCI_SAD_RULE, data, s, e, 0.9))
    # The cardholder-data finding spans the card; redaction of that span is already due.
    out.append(make_finding("data", PCI_RULE, data, card.start, card.end, 0.9))
    return out


def _hipaa(data: bytes, mrn: Finding) -> list[Finding]:
    lo, hi = _window(data, mrn.start, mrn.end)
    if _found(_NAME_MATCH, data, lo, hi) or _found(_DOB_MATCH, data, lo, hi):
        return [make_finding("data", HIPAA_RULE, data, mrn.start, mrn.end, 0.85)]
    return []


def _gdpr(data: bytes, findings: Sequence[Finding]) -> list[Finding]:
    out: list[Finding] = []
    for f in findings:
        if f.category not in _PERSON_IDENTIFIERS:
            continue
        # The name must be on the identifier's own line: "Name: X, email: y" is about X,
        # while a name two records away is about someone else.
        lo, hi = line_bounds(data, f.start, f.end, _NEAR)
        if _found(_NAME_MATCH, data, lo, hi):
            out.append(make_finding("data", GDPR_RULE, data, f.start, f.end, 0.7))
    return out


def compliance_findings(data: bytes, findings: Sequence[Finding]) -> list[Finding]:
    """Context findings derived from ``findings`` (data-scanner findings over ``data``)."""
    out: list[Finding] = []
    for f in findings:
        if f.category == "credit_card":
            out.extend(_pci(data, f))
        elif f.category == "medical_record":
            out.extend(_hipaa(data, f))
    out.extend(_gdpr(data, findings))
    personal = [f for f in findings if f.category in _PERSON_IDENTIFIERS]
    if len(personal) >= _BULK_PII:
        first, last = personal[0], personal[-1]
        out.append(make_finding("data", SOC2_RULE, data, first.start, last.end, 0.8))
    return out


__all__ = ["COMPLIANCE_RULES", "compliance_findings"]
