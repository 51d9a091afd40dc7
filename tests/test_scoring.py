"""Every scoring fact of the specification (DESIGN.md section 3)."""

from __future__ import annotations

import pytest

from kavach.backends.names import COMPOSITES, Backend
from kavach.errors import PolicyError
from kavach.policy import SandboxPolicy
from kavach.scoring import (
    BASE_SCORES,
    MODIFIERS,
    Control,
    Enforcement,
    StrengthScore,
    label_for,
    missing_controls,
    score,
    score_backend,
)

SPEC_BASES = {
    "noop": 0,
    "process": 50,
    "oci": 55,
    "wasm": 65,
    "gvisor": 70,
    "sgx": 80,
    "sev": 82,
    "tdx": 85,
    "syagnos": 80,
    "firecracker": 90,
}


@pytest.mark.parametrize(("name", "base"), sorted(SPEC_BASES.items()))
def test_base_scores_match_the_specification(name: str, base: int) -> None:
    backend = Backend.parse(name)
    assert BASE_SCORES[backend] == base
    assert backend.base_score == base
    assert score(Enforcement(backend)) == base


def test_there_are_exactly_ten_backends() -> None:
    assert {b.value for b in Backend} == set(SPEC_BASES)


@pytest.mark.parametrize(
    ("control", "points"),
    [
        (Control.SECCOMP, 5),
        (Control.LANDLOCK, 3),
        (Control.NETWORK_ISOLATED, 5),
        (Control.READ_ONLY_ROOT, 3),
        (Control.RESOURCE_LIMITS, 2),
    ],
)
def test_each_modifier_counts_only_when_enforced(control: Control, points: int) -> None:
    assert MODIFIERS[control] == points
    without = score(Enforcement(Backend.PROCESS))
    with_control = score(Enforcement(Backend.PROCESS, frozenset({control})))
    assert with_control - without == points


def test_all_modifiers_on_process_is_68() -> None:
    assert score(Enforcement(Backend.PROCESS, frozenset(Control))) == 68


@pytest.mark.parametrize(
    ("value", "label"),
    [
        (0, "minimal"),
        (29, "minimal"),
        (30, "basic"),
        (49, "basic"),
        (50, "standard"),
        (69, "standard"),
        (70, "hardened"),
        (84, "hardened"),
        (85, "fortress"),
        (100, "fortress"),
    ],
)
def test_label_boundaries(value: int, label: str) -> None:
    assert label_for(value) == label
    assert StrengthScore(value).label == label


def test_scores_clamp_to_0_100_and_print_with_label() -> None:
    assert StrengthScore(140) == 100
    assert StrengthScore(-3) == 0
    assert str(StrengthScore(68)) == "68 (standard)"
    assert score(Enforcement(Backend.FIRECRACKER, frozenset(Control))) == 100


def test_strict_policy_predictions_match_the_specification() -> None:
    strict = SandboxPolicy.strict()
    assert str(score_backend(Backend.PROCESS, strict)) == "68 (standard)"
    assert str(score_backend(Backend.FIRECRACKER, strict)) == "100 (fortress)"
    assert score_backend(Backend.NOOP, strict) == 0


def test_policy_presets_predict_from_requested_controls() -> None:
    assert score_backend(Backend.PROCESS, SandboxPolicy.minimal()) == 50
    assert score_backend(Backend.PROCESS, SandboxPolicy.basic()) == 65  # no Landlock in basic
    # WASM has no seccomp or Landlock to enforce: strict cannot earn those points there.
    assert score_backend(Backend.WASM, SandboxPolicy.strict()) == 65 + 5 + 3 + 2


def test_composite_is_max_plus_5_only_when_both_layers_verified() -> None:
    inner = Enforcement(Backend.PROCESS, frozenset(Control), verified=True)  # 68
    outer = Enforcement(Backend.OCI, frozenset({Control.SECCOMP}), verified=True, inner=inner)  # 60
    assert score(outer) == 68 + 5
    unverified_inner = Enforcement(Backend.PROCESS, frozenset(Control), verified=False)
    outer_with_unverified = Enforcement(
        Backend.OCI, frozenset({Control.SECCOMP}), verified=True, inner=unverified_inner
    )
    assert score(outer_with_unverified) == 60
    fortress = Enforcement(Backend.FIRECRACKER, frozenset(Control), verified=True, inner=inner)
    assert score(fortress) == 100
    assert score_backend(Backend.OCI, SandboxPolicy.strict(), Backend.PROCESS) == 73 + 5


def test_a_composite_kavach_does_not_build_has_no_predicted_score() -> None:
    assert {(Backend.OCI, Backend.PROCESS)} == COMPOSITES
    for outer in Backend:
        for inner in Backend:
            if (outer, inner) in COMPOSITES:
                continue
            with pytest.raises(PolicyError) as caught:
                score_backend(outer, SandboxPolicy.strict(), inner)
            assert caught.value.field == "inner" and caught.value.value == inner.value


def test_noop_scores_zero_whatever_it_claims() -> None:
    assert score(Enforcement(Backend.NOOP, frozenset(Control), verified=True)) == 0


def test_missing_controls_name_what_was_not_enforced() -> None:
    missing = missing_controls(Enforcement(Backend.PROCESS, frozenset({Control.SECCOMP})))
    assert len(missing) == 4
    assert any("Landlock" in m for m in missing)
    assert not any("seccomp" in m for m in missing)


def test_backend_parse_is_case_insensitive_and_lists_valid_names() -> None:
    assert Backend.parse("FireCracker") is Backend.FIRECRACKER
    with pytest.raises(PolicyError) as info:
        Backend.parse("docker")
    assert "firecracker" in str(info.value) and "docker" in str(info.value)
