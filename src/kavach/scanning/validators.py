"""Checksums and structural rules that turn regex candidates into confident findings.

Every validator takes the raw candidate (bytes or str, separators allowed) and returns a
bool or a small classification; none of them raises on malformed input.
"""

from __future__ import annotations

import ipaddress

_SEPARATORS = b" -."


def digits_only(value: bytes) -> bytes:
    """``value`` with spaces, dashes and dots removed."""
    return value.translate(None, _SEPARATORS)


def luhn_valid(number: bytes) -> bool:
    """The Luhn (mod 10) check used by payment card numbers."""
    digits = digits_only(number)
    if not digits.isdigit() or len(digits) < 2:
        return False
    # Odd positions from the right count once, even positions doubled (digit sums 0..9 -> table).
    odd = sum(digits[-1::-2]) - 48 * len(digits[-1::-2])
    even = sum(_DOUBLED[d - 48] for d in digits[-2::-2])
    return (odd + even) % 10 == 0


_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


# (prefix range low, high, prefix length, allowed lengths, brand)
_ISSUERS: tuple[tuple[int, int, int, frozenset[int], str], ...] = (
    (34, 34, 2, frozenset({15}), "amex"),
    (37, 37, 2, frozenset({15}), "amex"),
    (4, 4, 1, frozenset({13, 16, 19}), "visa"),
    (51, 55, 2, frozenset({16}), "mastercard"),
    (2221, 2720, 4, frozenset({16}), "mastercard"),
    (6011, 6011, 4, frozenset({16, 19}), "discover"),
    (644, 649, 3, frozenset({16, 19}), "discover"),
    (65, 65, 2, frozenset({16, 19}), "discover"),
    # JCB's registered range is 3528-3589; generators and some issuers use all of 35xx.
    (3500, 3599, 4, frozenset({16, 17, 18, 19}), "jcb"),
    (300, 305, 3, frozenset({14, 16, 19}), "diners"),
    (36, 36, 2, frozenset({14, 16, 19}), "diners"),
    (38, 39, 2, frozenset({14, 16, 19}), "diners"),
    (62, 62, 2, frozenset({16, 17, 18, 19}), "unionpay"),
    (2200, 2204, 4, frozenset({16, 17, 18, 19}), "mir"),
    (50, 50, 2, frozenset({12, 13, 14, 15, 16, 17, 18, 19}), "maestro"),
    (56, 58, 2, frozenset({12, 13, 14, 15, 16, 17, 18, 19}), "maestro"),
    (6759, 6759, 4, frozenset({12, 13, 14, 15, 16, 17, 18, 19}), "maestro"),
    (6761, 6763, 4, frozenset({12, 13, 14, 15, 16, 17, 18, 19}), "maestro"),
    (6304, 6304, 4, frozenset({12, 13, 14, 15, 16, 17, 18, 19}), "maestro"),
    (676770, 676774, 6, frozenset({12, 13, 14, 15, 16, 17, 18, 19}), "maestro"),
    (1800, 1800, 4, frozenset({15}), "jcb"),
    (2131, 2131, 4, frozenset({15}), "jcb"),
)


def card_brand(number: bytes) -> str | None:
    """The issuer network of a card number by IIN range and length, or None."""
    digits = digits_only(number)
    if not digits.isdigit():
        return None
    n = len(digits)
    # Each IIN prefix width is converted at most once, and only for rows of a fitting length
    # (a 16-digit Visa number is decided by its first row that fits: one conversion).
    prefixes: dict[int, int] = {}
    for low, high, width, lengths, brand in _ISSUERS:
        if n in lengths:
            prefix = prefixes.get(width)
            if prefix is None:
                prefix = prefixes[width] = int(digits[:width])
            if low <= prefix <= high:
                return brand
    return None


def card_valid(number: bytes) -> bool:
    """A payment card number: a known issuer range and length, and a valid Luhn check."""
    return card_brand(number) is not None and luhn_valid(number)


# ISO 13616 lengths by country (the common registry entries).
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24,
    "AE": 23,
    "AL": 28,
    "AT": 20,
    "AZ": 28,
    "BA": 20,
    "BE": 16,
    "BG": 22,
    "BH": 22,
    "BR": 29,
    "BY": 28,
    "CH": 21,
    "CR": 22,
    "CY": 28,
    "CZ": 24,
    "DE": 22,
    "DK": 18,
    "DO": 28,
    "EE": 20,
    "EG": 29,
    "ES": 24,
    "FI": 18,
    "FO": 18,
    "FR": 27,
    "GB": 22,
    "GE": 22,
    "GI": 23,
    "GL": 18,
    "GR": 27,
    "GT": 28,
    "HR": 21,
    "HU": 28,
    "IE": 22,
    "IL": 23,
    "IQ": 23,
    "IS": 26,
    "IT": 27,
    "JO": 30,
    "KW": 30,
    "KZ": 20,
    "LB": 28,
    "LC": 32,
    "LI": 21,
    "LT": 20,
    "LU": 20,
    "LV": 21,
    "MC": 27,
    "MD": 24,
    "ME": 22,
    "MK": 19,
    "MR": 27,
    "MT": 31,
    "MU": 30,
    "NL": 18,
    "NO": 15,
    "PK": 24,
    "PL": 28,
    "PS": 29,
    "PT": 25,
    "QA": 29,
    "RO": 24,
    "RS": 22,
    "SA": 24,
    "SC": 31,
    "SE": 24,
    "SI": 19,
    "SK": 24,
    "SM": 27,
    "ST": 25,
    "SV": 28,
    "TL": 23,
    "TN": 24,
    "TR": 26,
    "UA": 29,
    "VA": 22,
    "VG": 24,
    "XK": 20,
}


# ISO 7064 letter values: A = 10 ... Z = 35 (digits stand for themselves).
_BASE36 = {b: str(int(chr(b), 36)) for b in b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"}


def iban_valid(value: bytes) -> bool:
    """An IBAN with the registered length for its country and a valid ISO 7064 mod-97 check."""
    compact = value.translate(None, b" -").upper()
    if len(compact) < 15 or not compact.isalnum():
        return False
    country = compact[:2].decode("ascii", "replace")
    if IBAN_LENGTHS.get(country) != len(compact) or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    numeric = "".join(map(_BASE36.__getitem__, rearranged))
    return int(numeric) % 97 == 1


# Numbers the SSA never issued but that circulate in advertising and documentation.
_SAMPLE_SSNS = frozenset({"078051120", "219099999", "123456789", "111111111", "457555462"})


def ssn_valid(value: bytes) -> bool:
    """A US Social Security number by the SSA's rules.

    Area 000, 666 and 900-999 (ITINs) are never issued, group 00 and serial 0000 are
    invalid, and a few famous sample numbers are excluded.
    """
    digits = digits_only(value)
    if len(digits) != 9 or not digits.isdigit():
        return False
    text = digits.decode("ascii")
    area, group, serial = int(text[:3]), int(text[3:5]), int(text[5:])
    if area in {0, 666} or area >= 900:
        return False
    if group == 0 or serial == 0:
        return False
    return text not in _SAMPLE_SSNS


def ipv4_kind(value: bytes) -> str | None:
    """``"public"`` or ``"private"`` (RFC 1918, loopback, link-local, CGNAT ...) or None if invalid."""
    try:
        text = value.decode("ascii")
        if any(len(part) > 1 and part[0] == "0" for part in text.split(".")):
            return None  # leading zeros: octal ambiguity, and not how addresses are printed
        address = ipaddress.IPv4Address(text)
    except (UnicodeDecodeError, ValueError):
        return None
    return "public" if address.is_global else "private"


def ipv6_kind(value: bytes) -> str | None:
    """``"public"`` or ``"private"`` for a valid IPv6 address, else None."""
    try:
        address = ipaddress.IPv6Address(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return "public" if address.is_global else "private"


__all__ = [
    "IBAN_LENGTHS",
    "card_brand",
    "card_valid",
    "digits_only",
    "iban_valid",
    "ipv4_kind",
    "ipv6_kind",
    "luhn_valid",
    "ssn_valid",
]
