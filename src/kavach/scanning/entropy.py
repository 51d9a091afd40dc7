"""Shannon entropy and placeholder detection for extracted candidate values.

Entropy is only ever computed on a *candidate value* that a rule already extracted
(the right-hand side of ``password = ...``, a bearer token, a URL's password), never on
arbitrary windows of text: whole-text entropy scanning is what makes classic scanners
noisy. Thresholds are length-aware because a short string cannot reach the entropy
of its alphabet: an 8-character string has at most ``log2(8) = 3`` bits per character.
"""

from __future__ import annotations

import math
import re
from collections import Counter

_HEX = frozenset(b"0123456789abcdefABCDEF")
_B64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_-")


def shannon_entropy(value: bytes) -> float:
    """Bits per byte of ``value`` (0.0 for the empty string)."""
    if not value:
        return 0.0
    n = len(value)
    return -sum((c / n) * math.log2(c / n) for c in Counter(value).values())


def is_hex(value: bytes) -> bool:
    """Whether every byte of ``value`` is a hexadecimal digit."""
    return bool(value) and all(b in _HEX for b in value)


def is_base64ish(value: bytes) -> bool:
    """Whether ``value`` only uses the base64 / base64url alphabet."""
    return bool(value) and all(b in _B64 for b in value)


def entropy_threshold(length: int, *, hex_alphabet: bool) -> float:
    """The entropy a random string of ``length`` characters clears with high probability.

    The alphabet's ceiling (4 bits for hex, 6 for base64) is scaled down for short strings,
    whose maximum possible entropy is ``log2(length)``. The 0.8 / 0.75 factors come from
    measuring random tokens: a uniformly random 20-character base64 string averages about
    4.1 bits, i.e. 0.95 of log2(20); 0.75 leaves room for unlucky draws.
    """
    if length <= 1:
        return 1.0
    if hex_alphabet:
        return min(3.0, 0.8 * math.log2(length))
    return min(4.2, 0.75 * math.log2(length))


def char_classes(value: bytes) -> int:
    """How many of lower-case, upper-case, digit and symbol classes ``value`` uses."""
    lower = upper = digit = other = 0
    for b in value:
        if 97 <= b <= 122:
            lower = 1
        elif 65 <= b <= 90:
            upper = 1
        elif 48 <= b <= 57:
            digit = 1
        else:
            other = 1
    return lower + upper + digit + other


def looks_random(value: bytes) -> bool:
    """Whether ``value`` looks like a machine-generated secret rather than a word or identifier."""
    n = len(value)
    if n < 8:
        return False
    ent = shannon_entropy(value)
    if is_hex(value):
        return n >= 16 and ent >= entropy_threshold(n, hex_alphabet=True)
    if char_classes(value) < 2:
        return False
    return ent >= entropy_threshold(n, hex_alphabet=False)


# Letter pairs common in words and identifiers: for each first letter, the letters that
# often follow it. Derived once from the letter bigrams of CPython's standard library
# (identifiers split at camelCase, comments and docstrings; 4.7 million pairs): these 300
# of the 676 pairs cover 98.3% of all occurrences. Random letters land outside the table
# about half the time; words and identifiers in under a fifth of their pairs.
_COMMON_FOLLOWERS = {
    "a": "bcdfgiklmnprstuvwxy",
    "b": "aceijlorsuy",
    "c": "acehiklmorstuy",
    "d": "adeilorstuy",
    "e": "abcdefgiklmnopqrstvwxy",
    "f": "adefilorstu",
    "g": "aeghilnorsu",
    "h": "aeiortu",
    "i": "abcdefglmnoprstvxz",
    "j": "eo",
    "k": "aeisw",
    "l": "adefilopstuy",
    "m": "abdeilmopstu",
    "n": "acdefgiklnopstuvy",
    "o": "abcdefgiklmnoprstuvwx",
    "p": "aeiloprstuy",
    "q": "u",
    "r": "acdefgiklmnoprstuvy",
    "s": "aceghiklmoprstuwy",
    "t": "acdefhilmoprstuwy",
    "u": "abcdefgilmnoprst",
    "v": "aei",
    "w": "aehinors",
    "x": "aceipt",
    "y": "einprst",
    "z": "ei",
}
_COMMON_PAIR = bytearray(26 * 26)
for _first, _followers in _COMMON_FOLLOWERS.items():
    for _second in _followers:
        _COMMON_PAIR[(ord(_first) - 97) * 26 + ord(_second) - 97] = 1


def rare_letter_pairs(value: bytes) -> tuple[int, int]:
    """``(rare, total)``: adjacent letter pairs of ``value`` (case-folded, within letter runs)
    that words and identifiers seldom contain, out of all such pairs. One pass, O(len)."""
    rare = total = 0
    prev = -1
    for byte in value:
        b = byte + 32 if 65 <= byte <= 90 else byte
        if 97 <= b <= 122:
            cur = b - 97
            if prev >= 0:
                total += 1
                rare += 1 - _COMMON_PAIR[prev * 26 + cur]
            prev = cur
        else:
            prev = -1
    return rare, total


def reads_as_gibberish(value: bytes) -> bool:
    """Whether the letters of ``value`` are strung together the way random letters are, not
    words: at least 3 pairs in 10 (and at least 2) outside the common-pair table. Random
    lower-case strings of 8 to 16 letters clear this 19 times in 20; the identifiers and
    English, German, French, Spanish and pinyin words tried stay under 0.26."""
    rare, total = rare_letter_pairs(value)
    return rare >= 2 and rare * 10 >= total * 3


# Whole values (lower-cased) that are documentation or template stand-ins, not secrets.
_PLACEHOLDER_WORDS = frozenset(
    {
        "changeme",
        "change_me",
        "changeit",
        "example",
        "examples",
        "sample",
        "placeholder",
        "password",
        "passwd",
        "secret",
        "token",
        "apikey",
        "api_key",
        "your_api_key",
        "none",
        "null",
        "nil",
        "undefined",
        "true",
        "false",
        "empty",
        "redacted",
        "removed",
        "hidden",
        "dummy",
        "fake",
        "test",
        "testing",
        "todo",
        "fixme",
        "xxx",
        "foo",
        "bar",
        "foobar",
        "baz",
        "string",
        "str",
        "value",
        "default",
        "secret_key",
        "mysecret",
        "mypassword",
        "yourpassword",
        "your_password",
        "pass",
        "pwd",
        "key",
        "letmein",
        "required",
        "optional",
        "bytes",
        "int",
        "text",
        "env",
        "config",
        "settings",
        "environ",
        "getenv",
        "unknown",
        "n/a",
        "na",
        "tbd",
        "blank",
        "no",
        "yes",
        "self",
        "this",
        "secrets",
        "credentials",
        "public",
        "private",
    }
)

# Substrings that mark a template, an environment reference or a documentation stand-in.
_PLACEHOLDER_MARKERS: tuple[bytes, ...] = (
    b"${",
    b"{{",
    b"}}",
    b"<%",
    b"%>",
    b"%(",
    b"%s",
    b"{0}",
    b"$(",
    b"#{",
    b"[[",
    b"]]",
    b"xxxx",
    b"XXXX",
    b"****",
    b"....",
    b"____",
    b"----",
    b"####",
    b"0000000000",
    b"changeme",
    b"change_me",
    b"change-me",
    b"example",
    b"EXAMPLE",
    b"Example",
    b"placeholder",
    b"PLACEHOLDER",
    b"your_",
    b"your-",
    b"YOUR_",
    b"YOUR-",
    b"Your",
    b"_here",
    b"-here",
    b"_HERE",
    b"dummy",
    b"DUMMY",
    b"sample",
    b"SAMPLE",
    b"redacted",
    b"REDACTED",
    b"Redacted",
    b"insert",
    b"INSERT",
    b"process.env",
    b"os.environ",
    b"getenv",
    b"environ[",
    b"ENV[",
    b"System.getenv",
    b"lorem",
    b"ipsum",
    b"abcdefgh",
    b"qwerty",
    b"asdf",
)


# One alternation instead of ~70 substring tests. Python's re is safe here: a plain
# alternation of literals cannot backtrack, and the values are short (<= a few hundred bytes).
_MARKER_RE = re.compile(b"|".join(re.escape(m) for m in _PLACEHOLDER_MARKERS))


def is_placeholder(value: bytes) -> bool:
    """Whether ``value`` is a template, an environment reference or a documentation stand-in."""
    v = value.strip(b"\"'` \t")
    if not v:
        return True
    low = v.lower()
    if low.decode("latin-1") in _PLACEHOLDER_WORDS:
        return True
    if _MARKER_RE.search(v) is not None:
        return True
    # <your-key>, [token], %TOKEN%, $TOKEN, @TOKEN@ and :param style stand-ins.
    if (v[:1], v[-1:]) in {(b"<", b">"), (b"[", b"]"), (b"%", b"%"), (b"@", b"@"), (b"{", b"}")}:
        return True
    if v[:1] == b"$" and len(v) > 1 and (v[1:].replace(b"_", b"").isalnum() or v[1:2] == b"{"):
        return True
    # A single repeated character ("aaaaaaaa", "********").
    if len(set(v)) <= 2 and len(v) >= 3:
        return True
    # One character is most of it ("glc_1111111111111111111111111111="): filler, not random.
    return len(v) >= 12 and Counter(v).most_common(1)[0][1] * 2 > len(v)


__all__ = [
    "char_classes",
    "entropy_threshold",
    "is_base64ish",
    "is_hex",
    "is_placeholder",
    "looks_random",
    "rare_letter_pairs",
    "reads_as_gibberish",
    "shannon_entropy",
]
