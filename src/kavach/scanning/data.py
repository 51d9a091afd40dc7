"""The data / compliance scanner: personal and payment data, validated, with context.

Candidates come from RE2 patterns; each is then confirmed by a validator so that a long
number is not a card unless it passes Luhn *and* an issuer range, an IBAN must pass
mod-97 with its country's length, an SSN must follow the SSA's rules, a phone number must
parse with ``phonenumbers`` (or sit right after a word like "phone" or "fax"), and an IP
address must be a real address (private ranges are reported as info, public as low).

:mod:`kavach.scanning.compliance` then reads these findings together: a card number with a
CVV or expiry near it is PCI cardholder data, a medical record number near a name is
HIPAA PHI, and so on.
"""

from __future__ import annotations

import bisect
import functools
import re
from dataclasses import replace

import phonenumbers

from kavach.scanning.engine import PatternBank, Rule, SpanIndex, Spans, dedupe, finalize
from kavach.scanning.findings import Finding, Severity
from kavach.scanning.validators import (
    IBAN_LENGTHS,
    card_brand,
    iban_valid,
    ipv4_kind,
    ipv6_kind,
    luhn_valid,
    ssn_valid,
)

_CONTEXT_WINDOW = 48


def _before(data: bytes, start: int, width: int = _CONTEXT_WINDOW) -> bytes:
    return data[max(0, start - width) : start].lower()


# --- email ---------------------------------------------------------------------------------

# File extensions that follow ``name@2x.`` in asset names, not top-level domains.
_NOT_TLDS = frozenset(
    {
        b"png",
        b"jpg",
        b"jpeg",
        b"gif",
        b"svg",
        b"webp",
        b"ico",
        b"css",
        b"js",
        b"ts",
        b"py",
        b"rb",
        b"go",
        b"java",
        b"json",
        b"yaml",
        b"yml",
        b"xml",
        b"html",
        b"htm",
        b"txt",
        b"md",
        b"lock",
        b"map",
        b"scss",
        b"less",
        b"woff",
        b"woff2",
        b"ttf",
        b"eot",
        b"mp4",
        b"mp3",
        b"pdf",
        b"zip",
        b"gz",
        b"tgz",
        b"exe",
        b"dll",
        b"so",
        b"class",
        b"jar",
        b"tsx",
        b"jsx",
        b"vue",
        b"c",
        b"h",
        b"cpp",
        b"hpp",
        b"cs",
        b"php",
        b"sh",
        b"bat",
        b"ps1",
        b"service",
        b"socket",
        b"target",
        b"mount",
        b"timer",
        b"local",
    }
)


def _email_ok(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    value = data[start:end]
    local, _, domain = value.rpartition(b"@")
    tld = domain.rsplit(b".", 1)[-1].lower()
    if tld in _NOT_TLDS or not local or local[:1] == b"." or local[-1:] == b".":
        return None
    if local.isdigit() and len(local) <= 2:
        return None  # retina assets: icon@2x.png is already excluded; "1@3.5x" style scales
    if b"@" in data[max(0, start - 1) : start]:
        return None
    # user:password@host inside a URL is a credential (the secrets scanner's), not an address.
    token_start = max(data.rfind(b" ", max(0, start - 200), start), data.rfind(b"\n", max(0, start - 200), start))
    if b"://" in data[token_start + 1 : start + 1] or b":" in local:
        return None
    return 0.9


EMAIL_RULE = Rule(
    id="pii.email",
    category="email",
    severity=Severity.LOW,
    pattern=r"(?:^|[^A-Za-z0-9._%+\-])([A-Za-z0-9._%+\-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)"
    r"{1,8}[A-Za-z]{2,24})",
    value_group=1,
    not_followed_by=r"[A-Za-z0-9\-]",
    validate=_email_ok,
    tags=("gdpr",),
)


# --- SSN -----------------------------------------------------------------------------------

_SSN_CONTEXT = (b"ssn", b"social security", b"social-security", b"soc sec", b"ss#", b"ss #", b"taxpayer", b"tin")


def _ssn_ok(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    value = data[start:end]
    if not ssn_valid(value):
        return None
    context = any(word in _before(data, start) for word in _SSN_CONTEXT)
    separated = b"-" in value or b" " in value
    if not separated and not context:
        return None  # a bare 9-digit number is an id, a count, a timestamp ... without "SSN" near it
    if separated and value.count(b"-") + value.count(b" ") != 2:
        return None
    return 0.95 if context else 0.75


SSN_RULE = Rule(
    id="pii.ssn",
    category="ssn",
    severity=Severity.HIGH,
    pattern=r"(?:^|[^0-9A-Za-z\-./:])(\d{3}-\d{2}-\d{4}|\d{3} \d{2} \d{4})",
    value_group=1,
    not_followed_by=r"[0-9A-Za-z\-/]|[.:][0-9]",
    validate=_ssn_ok,
    tags=("gdpr", "soc2"),
)


# A bare 9-digit SSN only right after the words that name it.
SSN_CONTEXT_RULE = Rule(
    id="pii.ssn",
    category="ssn",
    severity=Severity.HIGH,
    pattern=r"(?i)(?:ssn|social\s+security(?:\s+(?:number|no\.?|#))?|ss#|soc\.?\s*sec\.?)[^0-9A-Za-z\n]{0,6}(\d{9})",
    value_group=1,
    validate=_ssn_ok,
    not_followed_by=r"[0-9A-Za-z]",
    # The word right before the nine digits, not the word alone ("social", "socket" are
    # everywhere) nor before any digit ("SSN: 123-45-6789" is the other rule's).
    anchors=(r"(?i)(?:ssn|social\s+security(?:\s+(?:number|no\.?|#))?|ss#|soc\.?\s*sec\.?)[^0-9A-Za-z\n]{0,6}\d{9}",),
    tags=("gdpr", "soc2"),
)


# --- cards ---------------------------------------------------------------------------------


def _card_ok(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    value = data[start:end]
    if b" " in value and b"-" in value:
        return None  # "1234-5678 9012" mixes separators: not how a card is printed
    if card_brand(value) is None or not luhn_valid(value):
        return None
    return 0.9


CARD_RULE = Rule(
    id="pii.credit-card",
    category="credit_card",
    severity=Severity.HIGH,
    pattern=r"(?:^|[^0-9A-Za-z_\-.])((?:\d[ \-]?){11,18}\d)",
    value_group=1,
    not_followed_by=r"[0-9A-Za-z_\-]|\.[0-9]",
    validate=_card_ok,
    tags=("pci-dss",),
)


# --- IBAN ----------------------------------------------------------------------------------


_IBAN_COUNTRIES = "|".join(sorted(IBAN_LENGTHS))


def _iban_ok(data: bytes, start: int, end: int, _spans: Spans) -> tuple[float, int] | None:
    """Valid as matched, or after dropping trailing space-separated groups (``... 00 EUR``)."""
    value = data[start:end]
    while value:
        if iban_valid(value):
            return 0.95, start + len(value)
        cut = value.rfind(b" ")
        if cut < 15:
            return None
        value = value[:cut]
    return None


IBAN_RULE = Rule(
    id="pii.iban",
    category="iban",
    severity=Severity.MEDIUM,
    # Only registered country codes: "ab12..." in a hex request id is not an IBAN candidate.
    pattern=r"(?:^|[^A-Za-z0-9])((?:" + _IBAN_COUNTRIES + r")\d{2}(?: ?[A-Z0-9]){11,30}|"
    r"(?i:" + _IBAN_COUNTRIES + r")\d{2}[a-z0-9]{11,30})",
    value_group=1,
    not_followed_by=r"[A-Za-z0-9]",
    validate=_iban_ok,
    tags=("gdpr", "pci-dss"),
)


# --- IP addresses --------------------------------------------------------------------------

# A dotted quad right after one of these words is a version or an OID, not an address.
# (Python re on a bounded 32-byte slice: linear in practice and never on untrusted length.)
_VERSION_CONTEXT = re.compile(
    rb"(?i)(?:\b(?:version|ver|v|release|rel|build|oid|mib|__version__)\b|_version)"
    rb"[\s:=\"']{0,4}$"
)


def _ipv4_ok(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    # The context first: a 32-byte regex search is cheaper than parsing the address.
    if _VERSION_CONTEXT.search(data[max(0, start - 32) : start]) is not None:
        return None
    if ipv4_kind(data[start:end]) is None:
        return None
    return 0.9


IPV4_RULE = Rule(
    id="pii.ipv4",
    category="ip_address",
    severity=Severity.LOW,
    pattern=r"(?:^|[^0-9A-Za-z.])((?:\d{1,3}\.){3}\d{1,3})",
    value_group=1,
    not_followed_by=r"[0-9A-Za-z]|\.[0-9A-Za-z]",
    validate=_ipv4_ok,
    tags=("gdpr",),
)


def _ipv6_ok(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    value = data[start:end]
    if value.count(b":") < 2 or ipv6_kind(value) is None:
        return None
    groups = [g for g in value.split(b":") if g]
    if len(groups) < 3 and b"::" not in value:
        return None
    if b"::" in value and len(groups) < 2:
        return None  # "::", "a::b" are C++ scopes and Python slices far more often than addresses
    return 0.85


IPV6_RULE = Rule(
    id="pii.ipv6",
    category="ip_address",
    severity=Severity.LOW,
    pattern=r"(?:^|[^0-9A-Za-z:_])((?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|"
    r"(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,5})?)",
    # A "::" form holds its last group before "::" right after a boundary or a ':' (so "std::"
    # and "Vec::new" in source code are not candidates); the full form holds four groups.
    anchors=(
        r"(?:^|[^0-9A-Za-z_])[0-9A-Fa-f]{1,4}::|[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:"
        r"[0-9A-Fa-f]{1,4}:",
    ),
    value_group=1,
    not_followed_by=r"[0-9A-Za-z:_]",
    validate=_ipv6_ok,
    tags=("gdpr",),
)


# --- phone numbers -------------------------------------------------------------------------

_PHONE_CONTEXT = (
    b"phone",
    b"tel",
    b"mobile",
    b"cell",
    b"fax",
    b"call",
    b"desk",
    b"office",
    b"sms",
    b"whatsapp",
    b"text me",
    b"contact",
    b"number",
    b"messages to",
    b"answering at",
    b"reach me",
    b"dial",
    b"telefon",
    b"handy",
    b"registered",
)
# Directory-style listings put the label after the number ("416 60 039 office").
_PHONE_AFTER_CONTEXT = (b"office", b"fax", b"mobile", b"cell", b"home", b"work", b"(m)", b"(o)", b"(h)")


# Substring tests of the context words as one C-level search each (a literal alternation on
# a slice of at most 40 bytes).
_PHONE_CONTEXT_RE = re.compile(b"|".join(re.escape(word) for word in _PHONE_CONTEXT))
_PHONE_AFTER_CONTEXT_RE = re.compile(b"|".join(re.escape(word) for word in _PHONE_AFTER_CONTEXT))
_DIGITS = b"0123456789"


def _phone_structure_ok(value: bytes) -> bool:
    digits = len(value) - len(value.translate(None, _DIGITS))
    if not 7 <= digits <= 15:
        return False
    text = value.decode("ascii", "replace")
    parts = [p for p in text.replace("(", " ").replace(")", " ").replace("-", " ").replace(".", " ").split() if p]
    # ISO dates (1999-01-31) and dotted versions (1.22.3) are the classic look-alikes.
    if len(parts) == 3 and len(parts[0]) == 4 and all(p.isdigit() for p in parts) and text.count("-") == 2:
        return False
    if "." in text and text.count(".") in (2, 3) and len(parts[0]) <= 2 and " " not in text:
        head = parts[0]
        if head.isdigit() and any(len(p) == 3 for p in parts[1:]) and text.count(".") == 2:
            return False
    return not (text.startswith(("978", "979")) and digits == 13)


def _candidate_regions(digits: str) -> tuple[str, ...]:
    """Regions whose national format fits ``digits`` (no country code), most likely first.

    Each try is a full phonenumbers parse, so only plausible regions are tried: numbers
    with a trunk prefix 0 are European/Australian national numbers, 10 digits without
    it are North American or Indian, 11 digits starting with 1 are North American.
    """
    if digits.startswith("0"):
        return ("GB", "DE", "FR", "AU", "IT", "NL", "BE")
    if len(digits) == 10:
        return ("US", "IN")
    if len(digits) == 11 and digits.startswith("1"):
        return ("US",)
    return ()


def _parse_any_region(text: str) -> bool:
    digits = "".join(ch for ch in text if ch.isdigit())
    for region in _candidate_regions(digits):
        try:
            number = phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return True
    return False


# Confidences of phone findings by the evidence behind them. The last two are given by
# ``_phone_candidate`` before phonenumbers has confirmed the number (see ``_confirm_phones``).
_CONF_CONTEXT_INTL = 0.8
_CONF_CONTEXT = 0.75
_CONF_INTL = 0.9
_CONF_NATIONAL = 0.6
_PHONE_UNCONFIRMED = frozenset({_CONF_INTL, _CONF_NATIONAL})


def _phone_candidate(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    """Every check but phonenumbers' parse: None to reject, else the confidence the number gets.

    ``_CONF_INTL`` and ``_CONF_NATIONAL`` still need :func:`_phone_confirmed` (done by the
    scanner's ``post``, which skips it for candidates it drops anyway).
    """
    value = data[start:end]
    if not _phone_structure_ok(value):
        return None
    before = _before(data, start, 40)
    if b"isbn" in before or b"version" in before or b"released" in before:
        return None
    after = data[end : end + 12].lower()
    context = _PHONE_CONTEXT_RE.search(before) is not None or _PHONE_AFTER_CONTEXT_RE.search(after) is not None
    if context:
        # A phone word plus a 7-15 digit phone shape is enough; phonenumbers' full parse is
        # the most expensive step of the data scanner, so it is kept for numbers without one.
        return _CONF_CONTEXT_INTL if value.startswith(b"+") else _CONF_CONTEXT
    if value.startswith((b"+", b"00")):
        return _CONF_INTL
    if not any(b in value for b in b" -.()"):
        return None  # a bare run of digits is an id or a timestamp unless a word says "phone"
    return _CONF_NATIONAL


def _phone_confirmed(value: bytes) -> bool:
    """phonenumbers' verdict on a candidate ``_phone_candidate`` left unconfirmed."""
    text = value.decode("ascii", "replace")
    if text.startswith(("+", "00")):
        try:
            number = phonenumbers.parse("+" + text.lstrip("+0") if text.startswith("00") else text, None)
        except phonenumbers.NumberParseException:
            return False
        return bool(phonenumbers.is_valid_number(number))
    return _parse_any_region(text)


# Candidates: an international number (+cc ...), or at least three digit groups joined by
# separators, or a parenthesised area code; bare digit runs only right after a phone word.
# Anything looser turns every id and timestamp in a log into a phonenumbers call.
PHONE_RULE = Rule(
    id="pii.phone",
    category="phone",
    severity=Severity.LOW,
    pattern=r"(?:^|[^0-9A-Za-z_+\-./:])("
    r"\+\d{1,3}[ .\-]?\(?\d{1,5}\)?(?:[ .\-]?\(?\d{1,5}\)?){1,5}"
    # (a 4-digit first group only with space/dot separators: 2026-11-22 is a date)
    r"|(?:00|\(\d{2,5}\)[ .\-]?|(?:\d{2,3}|\d{5})[ .\-]|\d{4}[ .])\d{2,5}[ .\-]\d{2,5}(?:[ .\-]\d{2,5}){0,3}"
    r"|\(\d{2,5}\)[ .\-]?\d{3,5}[ .\-]?\d{0,5}"
    r")(?:[ ]{0,2}(?:x|ext\.?)[ ]{0,2}\d{1,5})?",
    value_group=1,
    not_followed_by=r"[0-9A-Za-z_/:]|[.\-][0-9]",
    validate=_phone_candidate,
    tags=("gdpr",),
)

# After a phone word ("Phone:", "call me on", "fax"), any 7-15 digit shape is a number.
PHONE_CONTEXT_RULE = Rule(
    id="pii.phone",
    category="phone",
    severity=Severity.LOW,
    pattern=r"(?i)(?:phone|tel|mobile|cell|fax|call(?:\s+me)?(?:\s+(?:at|on))?|desk|sms|whatsapp|contact|number|"
    r"messages\s+to|answering\s+at)[^0-9A-Za-z\n]{0,6}(?:\n[^0-9A-Za-z\n]{0,3})?"
    r"(\+?\(?\d{1,5}\)?(?:[ .\-]{0,2}\(?\d{1,5}\)?){0,6}(?:[ ]{0,2}(?:x|ext\.?)[ ]{0,2}\d{1,5})?)",
    value_group=1,
    not_followed_by=r"[0-9A-Za-z_/:]|[.\-][0-9]",
    validate=_phone_candidate,
    # The word right before the number's first digit, not the word alone ("number", "call"
    # and "contact" are in most source files).
    anchors=(
        r"(?i)(?:phone|tel|mobile|cell|fax|call(?:\s+me)?(?:\s+(?:at|on))?|desk|sms|whatsapp|contact|number|"
        r"messages\s+to|answering\s+at)[^0-9A-Za-z\n]{0,6}(?:\n[^0-9A-Za-z\n]{0,3})?\+?\(?\d",
    ),
    tags=("gdpr",),
)

MRN_RULE = Rule(
    id="pii.medical-record-number",
    category="medical_record",
    severity=Severity.MEDIUM,
    pattern=r"(?i)\b(?:mrn|medical\s+record(?:\s+(?:number|no\.?|num|#))?|patient\s+(?:id|number|no\.?|#)|"
    r"chart\s+(?:number|no\.?|#))[ \t]{0,3}[:#=]?[ \t]{0,3}([A-Z]{0,4}-?\d{5,12})",
    value_group=1,
    not_followed_by=r"[0-9A-Za-z]",
    anchors=(r"(?i)mrn|medical\s+record|patient\s+(?:id|number|no)|chart\s+(?:number|no)",),
    confidence=0.8,
    tags=("hipaa",),
)

DATA_RULES: tuple[Rule, ...] = (
    # Every match holds "@" right after a local-part character, then a first domain label and
    # its dot (later labels may start with a digit: "@8.8.8.8corp.example.com"), so the anchor
    # stops there. "@app.route" (a decorator: no local part) is not in it.
    replace(EMAIL_RULE, anchors=(r"[A-Za-z0-9._%+\-]@[A-Za-z0-9][A-Za-z0-9\-]*\.",)),
    SSN_RULE,
    SSN_CONTEXT_RULE,
    CARD_RULE,
    IBAN_RULE,
    IPV4_RULE,
    IPV6_RULE,
    PHONE_RULE,
    PHONE_CONTEXT_RULE,
    MRN_RULE,
)

# Severity of an IP finding by address kind: private ranges are not personal data on their own.
_PRIVATE_IP_SEVERITY = Severity.INFO


def _refine(data: bytes, finding: Finding) -> Finding:
    if finding.category == "ip_address":
        value = data[finding.start : finding.end]
        kind = ipv4_kind(value) if finding.rule == "pii.ipv4" else ipv6_kind(value)
        if kind == "private":
            return Finding(
                **{
                    **finding.__dict__,
                    "severity": _PRIVATE_IP_SEVERITY,
                    "redact": False,
                    "category": "ip_address_private",
                }
            )
    return finding


_STRONG = frozenset({"credit_card", "iban", "ssn", "ip_address", "ip_address_private"})


def _drop_shadowed(findings: list[Finding]) -> list[Finding]:
    """A span already explained as a card, IBAN or SSN is not also a phone number."""
    strong = SpanIndex((f.start, f.end) for f in findings if f.category in _STRONG)
    return [f for f in findings if not (f.category == "phone" and strong.overlaps(f.start, f.end))]


def _confirm_phones(data: bytes, findings: list[Finding]) -> list[Finding]:
    """Run phonenumbers on the phone candidates that still need it, except where it cannot matter.

    A candidate overlapping a card, IBAN, SSN or IP address is dropped by
    :func:`_drop_shadowed` whatever phonenumbers says; its verdict matters only if another
    phone candidate lies inside it (a valid container hides it from :func:`dedupe`). Those
    IP- and SSN-shaped candidates are most of the parses, so they are dropped unparsed,
    which gives exactly the findings of confirming every candidate first.
    """
    pending = [f for f in findings if f.category == "phone" and f.confidence in _PHONE_UNCONFIRMED]
    if not pending:
        return findings
    strong = SpanIndex((f.start, f.end) for f in findings if f.category in _STRONG)
    phones = sorted((f.start, f.end, id(f)) for f in findings if f.category == "phone")
    starts = [start for start, _, _ in phones]
    rejected: set[int] = set()
    for f in pending:
        # Shadowed and hiding nothing: dropped either way, so phonenumbers is not asked.
        moot = strong.overlaps(f.start, f.end) and not _holds_another(phones, starts, f)
        if moot or not _phone_confirmed(data[f.start : f.end]):
            rejected.add(id(f))
    return [f for f in findings if id(f) not in rejected]


def _holds_another(phones: list[tuple[int, int, int]], starts: list[int], outer: Finding) -> bool:
    """Whether a phone candidate other than ``outer`` lies within ``outer``'s span."""
    i = bisect.bisect_left(starts, outer.start)
    while i < len(phones) and phones[i][0] < outer.end:
        _, end, ident = phones[i]
        if ident != id(outer) and end <= outer.end:
            return True
        i += 1
    return False


class DataScanner:
    """Finds personal and payment data and the compliance context around it."""

    name = "data"

    pattern_rules: tuple[Rule, ...] = DATA_RULES

    def __init__(self, *, compliance: bool = True) -> None:
        self._compliance = compliance

    @functools.cached_property
    def _bank(self) -> PatternBank:
        # Built on first use: the gate matches the scanners' rules with one combined
        # bank and never needs this one (only a scanner used on its own does).
        return PatternBank(DATA_RULES)

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules this scanner runs."""
        return DATA_RULES

    def direct(self, data: bytes) -> list[Finding]:
        """No findings of its own: every finding of this scanner comes from a rule match."""
        return []

    def post(self, data: bytes, raw: list[Finding], direct: list[Finding] | None = None) -> list[Finding]:
        """Validate context, drop shadowed spans and add the compliance findings."""
        found = _drop_shadowed(dedupe(_confirm_phones(data, [_refine(data, f) for f in raw])))
        if self._compliance:
            from kavach.scanning.compliance import compliance_findings

            found.extend(compliance_findings(data, found))
        return found

    def scan(self, data: bytes, source: str = "") -> list[Finding]:
        """Findings in ``data`` (bytes), sorted by position, with line numbers."""
        return finalize(data, self.post(data, self._bank.scan(data, self.name)), source)


__all__ = [
    "CARD_RULE",
    "DATA_RULES",
    "EMAIL_RULE",
    "IBAN_RULE",
    "IPV4_RULE",
    "IPV6_RULE",
    "MRN_RULE",
    "PHONE_CONTEXT_RULE",
    "PHONE_RULE",
    "SSN_CONTEXT_RULE",
    "SSN_RULE",
    "DataScanner",
]
