"""Threat classification: how likely a set of findings shows malicious intent, and what to do.

The intent score (0.0-1.0) combines three things:

1. **Evidence.** Each finding contributes ``weight(severity) x confidence``; contributions
   combine as independent evidence (noisy-OR): ``base = 1 - prod(1 - w_i * c_i)``. Weights:
   info 0, low 0.10, medium 0.30, high 0.55, critical 0.70 (one finding alone, however
   severe, scores below *malicious*: revoking takes corroboration or a history).
2. **Kill chain.** Findings are mapped to the seven stages reconnaissance, weaponization,
   delivery, exploitation, installation, command and control, exfiltration (from their category
   and rule). Activity across stages is what an attack looks like: two distinct stages multiply
   the score by 1.3, three or more by 1.5.
3. **History.** Every assessment of tier 2 or higher is recorded per agent id in SQLite. Past
   offences decay with a half-life (24 h by default): each counts ``0.5^(age / half_life)``, and
   their sum ``h`` multiplies the score by ``1 + 0.2 x min(h, 4)`` (at most x1.8). History only
   amplifies current evidence: with no weighted finding the score stays 0.

The product is clamped to 1.0 and classified: below 0.25 *benign* (tier 1, log), below 0.50
*suspicious* (tier 2, alert), below 0.75 *likely malicious* (tier 3, suspend), else *malicious*
(tier 4, revoke).

**Confidence gates the tier.** The assessment's confidence is ``1 - prod(1 - c_i)`` over the
findings that carry weight: independent findings corroborate each other, one finding is only
as confident as itself. Confidence below 0.5 caps the tier at 2 (alert), below 0.8 at 3
(suspend). So one low-confidence finding can never revoke an agent, whatever its severity
and whatever the agent's history.

Acting on the tier (the callback, pausing, revoking) is :class:`kavach.Sandbox`'s job; this
module scores, classifies and keeps the offender records (:class:`OffenderStore`), including
revocations that block ``Sandbox.create`` until an operator clears them.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any

from kavach import paths
from kavach._sqlite import immediate_transaction, locked_query
from kavach.errors import KavachError
from kavach.scanning.findings import Finding, Severity


class KillChainStage(IntEnum):
    """The seven kill-chain stages, in attack order."""

    RECONNAISSANCE = 1
    WEAPONIZATION = 2
    DELIVERY = 3
    EXPLOITATION = 4
    INSTALLATION = 5
    COMMAND_AND_CONTROL = 6
    EXFILTRATION = 7

    def __str__(self) -> str:
        return self.name.lower()


class Classification(StrEnum):
    """How the findings read, from harmless to hostile."""

    BENIGN = "benign"
    SUSPICIOUS = "suspicious"
    LIKELY_MALICIOUS = "likely_malicious"
    MALICIOUS = "malicious"

    @property
    def label(self) -> str:
        """Human wording: ``likely malicious``."""
        return self.value.replace("_", " ")


class Tier(IntEnum):
    """Escalation tiers: what the sandbox does about an assessment."""

    LOG = 1
    ALERT = 2
    SUSPEND = 3
    REVOKE = 4

    def __str__(self) -> str:
        return self.name.lower()


SEVERITY_WEIGHTS: Mapping[Severity, float] = {
    Severity.INFO: 0.0,
    Severity.LOW: 0.10,
    Severity.MEDIUM: 0.30,
    Severity.HIGH: 0.55,
    Severity.CRITICAL: 0.70,
}

# Upper bounds (exclusive) of each classification's intent score.
CLASSIFICATION_BOUNDS: tuple[tuple[float, Classification, Tier], ...] = (
    (0.25, Classification.BENIGN, Tier.LOG),
    (0.50, Classification.SUSPICIOUS, Tier.ALERT),
    (0.75, Classification.LIKELY_MALICIOUS, Tier.SUSPEND),
    (math.inf, Classification.MALICIOUS, Tier.REVOKE),
)

TWO_STAGE_AMPLIFIER = 1.3
MULTI_STAGE_AMPLIFIER = 1.5
REPEAT_STEP = 0.2
REPEAT_CAP = 4.0
CONFIDENCE_FOR_SUSPEND = 0.5
CONFIDENCE_FOR_REVOKE = 0.8
DEFAULT_HALF_LIFE_S = 24 * 3600.0

# Exact category names the scanners and guards use (kept in step with kavach.scanning and
# kavach.guards); anything else falls back to the keyword table below.
STAGE_BY_CATEGORY: Mapping[str, KillChainStage] = {
    "sensitive_path": KillChainStage.RECONNAISSANCE,
    "reconnaissance": KillChainStage.RECONNAISSANCE,
    "obfuscation": KillChainStage.WEAPONIZATION,
    "download": KillChainStage.DELIVERY,
    "blocked_command": KillChainStage.EXPLOITATION,
    "shell_trick": KillChainStage.EXPLOITATION,
    "shell_injection": KillChainStage.EXPLOITATION,
    "code_execution": KillChainStage.EXPLOITATION,
    "privilege_escalation": KillChainStage.EXPLOITATION,
    "fork_bomb": KillChainStage.EXPLOITATION,
    "persistence": KillChainStage.INSTALLATION,
    "reverse_shell": KillChainStage.COMMAND_AND_CONTROL,
    "credential": KillChainStage.EXFILTRATION,
    "secret": KillChainStage.EXFILTRATION,
    "pii": KillChainStage.EXFILTRATION,
    "financial": KillChainStage.EXFILTRATION,
}

# Checked in this order: the more specific stage first ("reverse_shell" is C2, not exploitation).
STAGE_KEYWORDS: tuple[tuple[KillChainStage, tuple[str, ...]], ...] = (
    (
        KillChainStage.COMMAND_AND_CONTROL,
        ("reverse_shell", "bind_shell", "c2", "command_and_control", "beacon", "tunnel", "callback"),
    ),
    (
        KillChainStage.EXFILTRATION,
        (
            "exfil",
            "upload",
            "secret",
            "credential",
            "password",
            "token",
            "key",
            "pii",
            "personal",
            "card",
            "iban",
            "ssn",
            "email",
            "phone",
            "leak",
        ),
    ),
    (KillChainStage.INSTALLATION, ("persist", "install", "cron", "startup", "backdoor", "rootkit", "miner")),
    (KillChainStage.DELIVERY, ("download", "fetch", "dropper", "delivery", "wget", "curl")),
    (KillChainStage.WEAPONIZATION, ("obfusc", "encod", "packed", "payload", "weapon")),
    (
        KillChainStage.EXPLOITATION,
        ("exploit", "inject", "exec", "eval", "shell", "privilege", "escalat", "escape", "blocked", "fork"),
    ),
    (KillChainStage.RECONNAISSANCE, ("recon", "enumerat", "discover", "scan", "fingerprint", "sensitive")),
)


def stage_for(finding: Finding) -> KillChainStage | None:
    """The kill-chain stage a finding belongs to, or None when its category says nothing."""
    category = finding.category.strip().lower()
    if category in STAGE_BY_CATEGORY:
        return STAGE_BY_CATEGORY[category]
    text = f"{category} {finding.rule}".lower().replace("-", "_")
    for stage, keywords in STAGE_KEYWORDS:
        if any(word in text for word in keywords):
            return stage
    return None


def amplifier_for(stage_count: int) -> float:
    """x1.3 for two distinct kill-chain stages, x1.5 for three or more, else x1.0."""
    if stage_count >= 3:
        return MULTI_STAGE_AMPLIFIER
    if stage_count == 2:
        return TWO_STAGE_AMPLIFIER
    return 1.0


def classify(intent: float) -> tuple[Classification, Tier]:
    """The classification and the raw tier of an intent score (before the confidence gate)."""
    for bound, classification, tier in CLASSIFICATION_BOUNDS:
        if intent < bound:
            return classification, tier
    raise AssertionError("unreachable: the last bound is infinite")


def _clamp01(value: float) -> float:
    return 0.0 if math.isnan(value) else min(1.0, max(0.0, value))  # NaN confidence counts as 0


@dataclass(frozen=True)
class ThreatAssessment:
    """The outcome of :meth:`ThreatAssessor.assess`."""

    intent_score: float
    classification: Classification
    tier: Tier
    confidence: float
    stages: tuple[KillChainStage, ...]
    amplifier: float
    base_score: float
    repeat_factor: float
    prior_offences: float  # decayed weight of earlier offences of this agent
    findings: int
    agent_id: str | None
    reasons: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the audit log and JSON output (counts and scores, never evidence)."""
        return {
            "intent_score": round(self.intent_score, 4),
            "classification": self.classification.value,
            "tier": int(self.tier),
            "action": str(self.tier),
            "confidence": round(self.confidence, 4),
            "stages": [str(s) for s in self.stages],
            "amplifier": self.amplifier,
            "base_score": round(self.base_score, 4),
            "repeat_factor": round(self.repeat_factor, 4),
            "prior_offences": round(self.prior_offences, 4),
            "findings": self.findings,
            "agent_id": self.agent_id,
            "reasons": list(self.reasons),
        }


# -- offender records ---------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS offences (
    agent_id TEXT NOT NULL,
    at REAL NOT NULL,
    intent REAL NOT NULL,
    tier INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS offences_agent ON offences(agent_id, at);
CREATE TABLE IF NOT EXISTS revocations (
    agent_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    revoked_at REAL NOT NULL,
    cleared_by TEXT,
    cleared_at REAL
);
CREATE INDEX IF NOT EXISTS revocations_agent ON revocations(agent_id, cleared_at);
"""


class OffenderError(KavachError):
    """The offender database could not be opened or written."""


@dataclass(frozen=True)
class AgentRecord:
    """What the offender store knows about one agent (``kavach agents list``)."""

    agent_id: str
    offences: int
    decayed_weight: float
    last_offence: float | None
    revoked: bool
    revoked_reason: str | None = None
    revoked_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {
            "agent_id": self.agent_id,
            "offences": self.offences,
            "decayed_weight": round(self.decayed_weight, 4),
            "last_offence": self.last_offence,
            "revoked": self.revoked,
            "revoked_reason": self.revoked_reason,
            "revoked_at": self.revoked_at,
        }


class OffenderStore:
    """Per-agent offences (with time decay) and revocations, in SQLite, shared across processes.

    ``clock`` returns seconds since the epoch; tests pass their own to move time.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        half_life_s: float = DEFAULT_HALF_LIFE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if half_life_s <= 0:
            raise OffenderError(f"half_life_s must be positive (got {half_life_s})")
        self.path = Path(path)
        self.half_life_s = half_life_s
        self._clock = clock
        self._lock = threading.RLock()
        self.closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=paths.PRIVATE_DIR_MODE)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, paths.PRIVATE_FILE_MODE))
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise OffenderError(f"cannot open offender database {self.path}: {exc}") from None

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self.closed = True
            self._db.close()

    def _fail(self, exc: sqlite3.Error) -> OffenderError:
        return OffenderError(f"offender database {self.path}: {exc}")

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate_transaction(self._db, self._lock, self._fail)

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return locked_query(self._db, self._lock, self._fail, sql, params)

    def _decay(self, age_s: float) -> float:
        return float(0.5 ** (max(0.0, age_s) / self.half_life_s))

    def record(self, agent_id: str, intent: float, tier: Tier) -> None:
        """Remember one offence of ``agent_id``."""
        with self._transaction() as db:
            db.execute("INSERT INTO offences VALUES (?, ?, ?, ?)", (agent_id, self._clock(), intent, int(tier)))

    def history(self, agent_id: str) -> float:
        """The decayed count of the agent's past offences: sum of ``0.5^(age / half_life)``."""
        now = self._clock()
        rows = self._query("SELECT at FROM offences WHERE agent_id = ?", (agent_id,))
        return float(sum(self._decay(now - at) for (at,) in rows))

    def is_revoked(self, agent_id: str) -> bool:
        """True while the agent has a revocation no operator has cleared."""
        rows = self._query("SELECT 1 FROM revocations WHERE agent_id = ? AND cleared_at IS NULL LIMIT 1", (agent_id,))
        return bool(rows)

    def revoke(self, agent_id: str, reason: str) -> None:
        """Block the agent until :meth:`clear`. Revoking a revoked agent changes nothing."""
        with self._transaction() as db:
            active = db.execute(
                "SELECT 1 FROM revocations WHERE agent_id = ? AND cleared_at IS NULL", (agent_id,)
            ).fetchone()
            if active is None:
                db.execute("INSERT INTO revocations VALUES (?, ?, ?, NULL, NULL)", (agent_id, reason, self._clock()))

    def clear(self, agent_id: str, by: str) -> bool:
        """Lift the agent's revocation (an operator's decision); False when it was not revoked.

        The offence history stays: it decays on its own, so an agent that offends again soon
        after being cleared still counts as a repeat offender.
        """
        if not by or not by.strip():
            raise OffenderError("clearing an agent needs the name of who does it (--by)")
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE revocations SET cleared_by = ?, cleared_at = ? WHERE agent_id = ? AND cleared_at IS NULL",
                (by, self._clock(), agent_id),
            )
            return cursor.rowcount > 0

    def agents(self) -> list[AgentRecord]:
        """Every agent with an offence or a revocation, most recent offenders first."""
        now = self._clock()
        offences: dict[str, list[tuple[float, float]]] = {}
        for agent_id, at, intent in self._query("SELECT agent_id, at, intent FROM offences"):
            offences.setdefault(agent_id, []).append((at, intent))
        revoked = {
            agent_id: (reason, at)
            for agent_id, reason, at in self._query(
                "SELECT agent_id, reason, revoked_at FROM revocations WHERE cleared_at IS NULL"
            )
        }
        records = []
        for agent_id in sorted(set(offences) | set(revoked)):
            rows = offences.get(agent_id, [])
            reason, revoked_at = revoked.get(agent_id, (None, None))
            records.append(
                AgentRecord(
                    agent_id=agent_id,
                    offences=len(rows),
                    decayed_weight=sum(self._decay(now - at) for at, _ in rows),
                    last_offence=max((at for at, _ in rows), default=None),
                    revoked=agent_id in revoked,
                    revoked_reason=reason,
                    revoked_at=revoked_at,
                )
            )
        records.sort(key=lambda r: (not r.revoked, -(r.last_offence or 0.0), r.agent_id))
        return records


_DEFAULT_STORES: dict[Path, OffenderStore] = {}
_DEFAULT_STORES_LOCK = threading.Lock()


def default_offender_store() -> OffenderStore:
    """The offender store in the user's data directory (``<data dir>/offenders.sqlite3``).

    One open store per location and process, shared by every caller (every ``Sandbox.create``
    asks for it); a store someone closed is reopened.
    """
    path = paths.offenders_db()
    with _DEFAULT_STORES_LOCK:
        store = _DEFAULT_STORES.get(path)
        if store is None or store.closed:
            try:
                paths.ensure_private_dir(paths.data_dir())
            except OSError as exc:
                raise OffenderError(f"cannot create the kavach data directory {paths.data_dir()}: {exc}") from None
            store = _DEFAULT_STORES[path] = OffenderStore(path)
        return store


# -- assessment ---------------------------------------------------------------------------------


class ThreatAssessor:
    """Scores findings (see the module docs) and keeps the offender records up to date."""

    def __init__(self, store: OffenderStore | None = None) -> None:
        self.store = store if store is not None else default_offender_store()

    def assess(self, agent_id: str | None, findings: Sequence[Finding]) -> ThreatAssessment:
        """Assess ``findings``; with an ``agent_id``, use its history and record tier >= 2 as an offence."""
        weighted = [(f, SEVERITY_WEIGHTS[f.severity], _clamp01(f.confidence)) for f in findings]
        weighted = [(f, w, c) for f, w, c in weighted if w > 0]
        base = 1.0 - math.prod(1.0 - w * c for _, w, c in weighted)
        confidence = 1.0 - math.prod(1.0 - c for _, _, c in weighted) if weighted else 0.0
        stages = tuple(sorted({s for f, _, _ in weighted if (s := stage_for(f)) is not None}))
        amplifier = amplifier_for(len(stages))
        prior = self.store.history(agent_id) if agent_id is not None else 0.0
        repeat_factor = 1.0 + REPEAT_STEP * min(prior, REPEAT_CAP) if base > 0 else 1.0
        intent = min(1.0, base * amplifier * repeat_factor)
        classification, raw_tier = classify(intent)

        reasons = [f"{len(weighted)} weighted finding(s), evidence score {base:.2f}"]
        if amplifier > 1.0:
            reasons.append(f"{len(stages)} kill-chain stages ({', '.join(map(str, stages))}): x{amplifier}")
        if repeat_factor > 1.0:
            reasons.append(f"repeat offender (decayed history {prior:.2f}): x{repeat_factor:.2f}")
        tier = raw_tier
        if tier >= Tier.REVOKE and confidence < CONFIDENCE_FOR_REVOKE:
            tier = Tier.SUSPEND
        if tier >= Tier.SUSPEND and confidence < CONFIDENCE_FOR_SUSPEND:
            tier = Tier.ALERT
        if tier < raw_tier:
            reasons.append(f"confidence {confidence:.2f} caps the tier at {tier} (score alone: {raw_tier})")

        assessment = ThreatAssessment(
            intent_score=intent,
            classification=classification,
            tier=tier,
            confidence=confidence,
            stages=stages,
            amplifier=amplifier,
            base_score=base,
            repeat_factor=repeat_factor,
            prior_offences=prior,
            findings=len(findings),
            agent_id=agent_id,
            reasons=tuple(reasons),
        )
        if agent_id is not None and tier >= Tier.ALERT:
            self.store.record(agent_id, intent, tier)
        return assessment


__all__ = [
    "SEVERITY_WEIGHTS",
    "STAGE_BY_CATEGORY",
    "AgentRecord",
    "Classification",
    "KillChainStage",
    "OffenderError",
    "OffenderStore",
    "ThreatAssessment",
    "ThreatAssessor",
    "Tier",
    "amplifier_for",
    "classify",
    "default_offender_store",
    "stage_for",
]
