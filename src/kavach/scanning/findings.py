"""Findings, severities and verdicts shared by the scanners, the gate, threat and audit."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any


class Severity(IntEnum):
    """Ordered severities: ``Severity.HIGH > Severity.LOW``."""

    INFO = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    @classmethod
    def parse(cls, name: str | Severity) -> Severity:
        """The severity called ``name`` (any case)."""
        if isinstance(name, Severity):
            return name
        from kavach.errors import PolicyError

        try:
            return cls[name.strip().upper()]
        except KeyError:
            valid = ", ".join(s.name.lower() for s in cls)
            raise PolicyError("severity", name, f"expected one of {valid}") from None

    def __str__(self) -> str:
        return self.name.lower()


class Verdict(StrEnum):
    """What the gate decided for one artifact (output stream or file)."""

    PASS = "pass"  # noqa: S105 (a verdict, not a password)
    WARN = "warn"  # released, with secrets and PII redacted
    QUARANTINE = "quarantine"  # original held for approval; caller gets the redacted copy
    BLOCK = "block"  # nothing released; ExternalizationBlocked raised


VERDICT_ORDER = {Verdict.PASS: 0, Verdict.WARN: 1, Verdict.QUARANTINE: 2, Verdict.BLOCK: 3}


def worst_verdict(*verdicts: Verdict) -> Verdict:
    """The most severe of ``verdicts`` (PASS when none)."""
    return max(verdicts, key=VERDICT_ORDER.__getitem__, default=Verdict.PASS)


@dataclass(frozen=True)
class Finding:
    """One thing a scanner found.

    ``start``/``end`` are byte offsets in the scanned artifact; ``line`` is 1-based.
    ``evidence`` is a redacted snippet, never the full secret. ``source`` names the
    artifact (``stdout``, ``stderr``, ``file:/path``).
    """

    # The scanning engine builds findings through ``__dict__`` (thousands per MiB; the
    # frozen ``__init__`` costs one ``object.__setattr__`` per field), so this class keeps
    # a ``__dict__``: no ``slots=True`` without changing ``engine.scan``/``finalize`` too.

    scanner: str  # secrets | code | data
    rule: str
    category: str
    severity: Severity
    start: int
    end: int
    line: int
    evidence: str
    confidence: float = 1.0
    source: str = ""
    redact: bool = True  # whether warn/quarantine should replace this span

    def to_dict(self) -> dict[str, Any]:
        """Plain data (no secret values) for JSON, audit and the CLI."""
        return {
            "scanner": self.scanner,
            "rule": self.rule,
            "category": self.category,
            "severity": str(self.severity),
            "line": self.line,
            "start": self.start,
            "end": self.end,
            "evidence": self.evidence,
            "confidence": round(self.confidence, 3),
            "source": self.source,
        }


__all__ = ["VERDICT_ORDER", "Finding", "Severity", "Verdict", "worst_verdict"]
