"""Threat classification: intent scores, the kill-chain amplifier, confidence gates, repeat offenders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kavach.scanning.findings import Finding, Severity
from kavach.threat import (
    Classification,
    KillChainStage,
    OffenderStore,
    ThreatAssessor,
    Tier,
    default_offender_store,
    stage_for,
)


def finding(category: str, severity: Severity = Severity.HIGH, confidence: float = 1.0, rule: str = "r") -> Finding:
    return Finding("code", rule, category, severity, 0, 1, 1, "…", confidence=confidence)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> OffenderStore:
    return OffenderStore(tmp_path / "offenders.sqlite3", half_life_s=3600, clock=clock)


@pytest.fixture
def assessor(store: OffenderStore) -> ThreatAssessor:
    return ThreatAssessor(store)


def test_no_findings_is_benign_tier_1(assessor: ThreatAssessor) -> None:
    result = assessor.assess("a", [])
    assert result.intent_score == 0.0
    assert result.classification is Classification.BENIGN
    assert result.tier is Tier.LOG
    assert result.confidence == 0.0


def test_severity_weights_and_noisy_or(assessor: ThreatAssessor) -> None:
    one = assessor.assess(None, [finding("credential", Severity.MEDIUM)])
    assert one.intent_score == pytest.approx(0.30)
    two = assessor.assess(None, [finding("credential", Severity.MEDIUM)] * 2)
    assert two.intent_score == pytest.approx(1 - 0.7 * 0.7)
    info = assessor.assess(None, [finding("credential", Severity.INFO)] * 10)
    assert info.intent_score == 0.0
    half = assessor.assess(None, [finding("credential", Severity.HIGH, confidence=0.5)])
    assert half.intent_score == pytest.approx(0.55 * 0.5)


def test_kill_chain_amplifier(assessor: ThreatAssessor) -> None:
    low = Severity.LOW
    single = assessor.assess(None, [finding("sensitive_path", low), finding("sensitive_path", low)])
    base = 1 - 0.9 * 0.9
    assert single.stages == (KillChainStage.RECONNAISSANCE,)
    assert single.amplifier == 1.0
    assert single.intent_score == pytest.approx(base)
    pair = assessor.assess(None, [finding("sensitive_path", low), finding("reverse_shell", low)])
    assert pair.stages == (KillChainStage.RECONNAISSANCE, KillChainStage.COMMAND_AND_CONTROL)
    assert pair.amplifier == 1.3
    assert pair.intent_score == pytest.approx(base * 1.3)
    three = [finding("sensitive_path", low), finding("reverse_shell", low), finding("credential", low)]
    triple = assessor.assess(None, three)
    assert triple.amplifier == 1.5
    assert triple.intent_score == pytest.approx((1 - 0.9**3) * 1.5)
    four = assessor.assess(None, [*three, finding("persistence", low)])
    assert four.amplifier == 1.5


@pytest.mark.parametrize(
    ("category", "rule", "stage"),
    [
        ("sensitive_path", "", KillChainStage.RECONNAISSANCE),
        ("obfuscation", "base64-exec", KillChainStage.WEAPONIZATION),
        ("network", "curl-pipe-sh", KillChainStage.DELIVERY),
        ("shell_trick", "ifs", KillChainStage.EXPLOITATION),
        ("code", "eval-call", KillChainStage.EXPLOITATION),
        ("persistence", "crontab", KillChainStage.INSTALLATION),
        ("network", "reverse-shell", KillChainStage.COMMAND_AND_CONTROL),
        ("credential", "aws-access-key", KillChainStage.EXFILTRATION),
        ("pii", "email", KillChainStage.EXFILTRATION),
        ("style", "long-line", None),
    ],
)
def test_categories_map_to_stages(category: str, rule: str, stage: KillChainStage | None) -> None:
    assert stage_for(finding(category, rule=rule)) == stage


def test_classification_bands_and_tiers(assessor: ThreatAssessor) -> None:
    cases = [
        ([finding("x", Severity.LOW)], Classification.BENIGN, Tier.LOG),
        ([finding("x", Severity.MEDIUM)], Classification.SUSPICIOUS, Tier.ALERT),
        ([finding("x", Severity.HIGH)], Classification.LIKELY_MALICIOUS, Tier.SUSPEND),
        ([finding("x", Severity.CRITICAL)] * 2, Classification.MALICIOUS, Tier.REVOKE),
    ]
    for findings, classification, tier in cases:
        result = assessor.assess(None, findings)
        assert (result.classification, result.tier) == (classification, tier), result


def test_a_multi_stage_attack_is_malicious_and_revokes(assessor: ThreatAssessor) -> None:
    attack = [
        finding("sensitive_path", Severity.MEDIUM, 0.9),
        finding("download", Severity.HIGH, 0.9),
        finding("reverse_shell", Severity.HIGH, 0.9),
    ]
    result = assessor.assess("agent-x", attack)
    assert result.classification is Classification.MALICIOUS
    assert result.tier is Tier.REVOKE
    assert result.confidence >= 0.8


def test_one_low_confidence_critical_finding_is_capped(assessor: ThreatAssessor, store: OffenderStore) -> None:
    for _ in range(20):  # a long record of offences pushes the score to the top
        store.record("old-offender", 1.0, Tier.REVOKE)
    result = assessor.assess("old-offender", [finding("reverse_shell", Severity.CRITICAL, 0.45)])
    assert result.tier is Tier.ALERT
    assert any("caps the tier" in r for r in result.reasons)


@settings(max_examples=200, deadline=None)
@given(
    severity=st.sampled_from(list(Severity)),
    confidence=st.floats(min_value=0.0, max_value=0.79),
    category=st.sampled_from(["sensitive_path", "reverse_shell", "credential", "shell_trick", "persistence", "x"]),
    history=st.integers(min_value=0, max_value=50),
)
def test_one_finding_below_revoke_confidence_never_revokes(
    tmp_path_factory: pytest.TempPathFactory, severity: Severity, confidence: float, category: str, history: int
) -> None:
    store = OffenderStore(tmp_path_factory.mktemp("off") / "o.sqlite3")
    for _ in range(history):
        store.record("agent", 1.0, Tier.REVOKE)
    result = ThreatAssessor(store).assess("agent", [finding(category, severity, confidence)])
    assert result.tier <= Tier.SUSPEND
    if confidence < 0.5:
        assert result.tier <= Tier.ALERT
    store.close()


def test_repeat_offender_escalates_and_decays(assessor: ThreatAssessor, store: OffenderStore, clock: Clock) -> None:
    findings = [finding("credential", Severity.MEDIUM, 1.0)]
    first = assessor.assess("repeat", findings)
    assert first.tier is Tier.ALERT
    assert first.repeat_factor == 1.0
    scores = [first.intent_score]
    for _ in range(4):
        scores.append(assessor.assess("repeat", findings).intent_score)
    assert scores == sorted(scores)
    assert scores[-1] == pytest.approx(0.30 * 1.8)  # four offences: the x1.8 cap
    assert assessor.assess("repeat", findings).tier is Tier.SUSPEND  # same findings, worse agent
    assert assessor.assess("someone-else", findings).intent_score == pytest.approx(0.30)
    clock.now += 3600 * 30  # thirty half-lives later the record is as good as clean
    assert store.history("repeat") < 0.01
    assert assessor.assess("repeat", findings).intent_score == pytest.approx(0.30, abs=0.001)


def test_benign_assessments_are_not_offences(assessor: ThreatAssessor, store: OffenderStore) -> None:
    assessor.assess("quiet", [finding("x", Severity.LOW)])
    assert store.history("quiet") == 0.0
    assert store.agents() == []


def test_revoke_and_clear(store: OffenderStore) -> None:
    assert not store.is_revoked("a")
    store.revoke("a", "threat tier 4: malicious")
    store.revoke("a", "again")
    assert store.is_revoked("a")
    [record] = store.agents()
    assert (record.agent_id, record.revoked, record.revoked_reason) == ("a", True, "threat tier 4: malicious")
    assert store.clear("a", by="operator") is True
    assert not store.is_revoked("a")
    assert store.clear("a", by="operator") is False


def test_records_persist_across_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAVACH_DATA_DIR", str(tmp_path / "data"))
    store = default_offender_store()
    ThreatAssessor(store).assess("agent-p", [finding("credential", Severity.HIGH)])
    store.revoke("agent-p", "test")
    child = (
        "from kavach.threat import default_offender_store as d; s = d(); "
        "print(s.is_revoked('agent-p'), round(s.history('agent-p'), 2)); s.clear('agent-p', by='child')"
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "1.0"]
    assert not store.is_revoked("agent-p")
    assert (tmp_path / "data" / "offenders.sqlite3").stat().st_mode & 0o777 == 0o600


def test_a_lone_critical_finding_suspends_and_a_repeat_offence_revokes(assessor: ThreatAssessor) -> None:
    key_leak = [finding("credential", Severity.CRITICAL, 1.0, rule="private-key")]
    first = assessor.assess("leaky", key_leak)
    assert (first.classification, first.tier) == (Classification.LIKELY_MALICIOUS, Tier.SUSPEND)
    second = assessor.assess("leaky", key_leak)
    assert second.intent_score == pytest.approx(0.70 * 1.2)
    assert (second.classification, second.tier) == (Classification.MALICIOUS, Tier.REVOKE)


def test_default_store_is_shared_per_location_and_reopened_after_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAVACH_DATA_DIR", str(tmp_path / "one"))
    first = default_offender_store()
    assert default_offender_store() is first
    first.revoke("x", "test")
    first.close()
    reopened = default_offender_store()
    assert reopened is not first
    assert reopened.is_revoked("x")
    monkeypatch.setenv("KAVACH_DATA_DIR", str(tmp_path / "two"))
    assert not default_offender_store().is_revoked("x")
