"""Scanners and the externalization gate.

Public names: the gate (:class:`Gate`, :class:`ExternalizationPolicy`, :class:`GateResult`,
:class:`StreamGate`), the three scanners, and the finding types they produce.
"""

from kavach.scanning.code import CodeScanner
from kavach.scanning.data import DataScanner
from kavach.scanning.findings import VERDICT_ORDER, Finding, Severity, Verdict, worst_verdict
from kavach.scanning.gate import (
    INJECTED_SECRET_RULE,
    OVERSIZE_RULE,
    ExternalizationPolicy,
    Gate,
    GateResult,
    StreamGate,
    redact,
)
from kavach.scanning.secrets import SecretsScanner

__all__ = [
    "INJECTED_SECRET_RULE",
    "OVERSIZE_RULE",
    "VERDICT_ORDER",
    "CodeScanner",
    "DataScanner",
    "ExternalizationPolicy",
    "Finding",
    "Gate",
    "GateResult",
    "SecretsScanner",
    "Severity",
    "StreamGate",
    "Verdict",
    "redact",
    "worst_verdict",
]
