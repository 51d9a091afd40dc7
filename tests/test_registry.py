"""Backend registry: probes, availability and resolution."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kavach.backends import registry
from kavach.backends.base import ProbeResult
from kavach.backends.names import Backend
from kavach.errors import BackendUnavailable, SandboxCreateError
from kavach.policy import SandboxPolicy
from kavach.scoring import score_backend


def test_every_backend_has_a_probe_with_a_reason() -> None:
    results = registry.probe_all()
    assert [r.backend for r in results] == list(Backend)
    for result in results:
        assert result.reason, result.backend
        if not result.implemented:
            assert not result.usable


def test_hardware_backends_report_unavailable_here_without_pretending() -> None:
    for backend in (Backend.FIRECRACKER, Backend.SGX, Backend.SEV, Backend.TDX, Backend.SYAGNOS):
        result = registry.probe(backend)
        assert not result.usable
        with pytest.raises(BackendUnavailable) as info:
            registry.require(backend)
        assert backend.value in str(info.value)


def test_resolve_best_picks_the_highest_predicted_usable_linux_backend() -> None:
    policy = SandboxPolicy.strict()
    best = registry.resolve_best(policy)
    usable = [r for r in registry.probe_all() if r.usable and r.runs_linux_commands and r.backend is not Backend.NOOP]
    if not usable:
        assert best is Backend.NOOP
        return
    assert registry.probe(best).usable
    assert score_backend(best, policy) == max(score_backend(r.backend, policy) for r in usable)
    assert Backend.WASM is not best  # WASM runs modules, not Linux commands


def test_resolve_min_strength_fails_closed_when_unreachable() -> None:
    with pytest.raises(SandboxCreateError, match="min_score 101"):
        registry.resolve_min_strength(SandboxPolicy.strict(), 101)


def test_available_lists_only_usable_backends_strongest_first() -> None:
    available = Backend.available()
    assert Backend.NOOP in available
    assert all(registry.probe(b).usable for b in available)
    assert [b.base_score for b in available] == sorted((b.base_score for b in available), reverse=True)


def test_a_backend_without_resource_limits_is_picked_only_when_degrading_is_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As rootless OCI probes on a cgroup v1 host: usable, but no cgroup for the limits.
    results = [
        ProbeResult(Backend.NOOP, True, "always"),
        ProbeResult(Backend.PROCESS, True, "ok"),
        ProbeResult(Backend.OCI, True, "rootless", resource_limits=False),
    ]
    monkeypatch.setattr(registry, "probe_all", lambda: results)
    strict = SandboxPolicy.strict()
    assert registry.resolve_best(strict) is Backend.PROCESS  # OCI would refuse strict's limits
    degrading = replace(strict, allow_degraded=True)
    assert registry.resolve_best(degrading) is Backend.OCI  # 71 (73 without resource limits) > Process 68
    unlimited = replace(degrading, resources=strict.resources.without_cgroup_limits())
    assert registry.resolve_min_strength(degrading, 71) is Backend.OCI
    assert score_backend(Backend.OCI, unlimited) == 71
    with pytest.raises(SandboxCreateError, match="oci would score 71"):
        registry.resolve_min_strength(degrading, 72)
    # A policy without limits is unaffected.
    assert registry.resolve_best(replace(unlimited, allow_degraded=False)) is Backend.OCI
