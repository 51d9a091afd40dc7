"""Strength scores: 0-100, computed from the controls a backend actually enforced.

The numbers are the specification's (DESIGN.md section 3). A modifier counts only when
the :class:`Enforcement` record says its control was applied; the policy alone never
raises a score. :func:`score_backend` is the *predicted* score of a backend and a policy,
for planning and for the CLI's ``kavach score``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kavach.backends.names import COMPOSITES, Backend
from kavach.errors import PolicyError
from kavach.policy import NetworkMode, SandboxPolicy, SeccompProfile

BASE_SCORES: Mapping[Backend, int] = {
    Backend.NOOP: 0,
    Backend.PROCESS: 50,
    Backend.OCI: 55,
    Backend.WASM: 65,
    Backend.GVISOR: 70,
    Backend.SGX: 80,
    Backend.SEV: 82,
    Backend.TDX: 85,
    Backend.SYAGNOS: 80,
    Backend.FIRECRACKER: 90,
}

# SyAgnos has three hardening tiers with their own base scores.
SYAGNOS_TIER_SCORES: Mapping[int, int] = {1: 80, 2: 85, 3: 88}

COMPOSITE_BONUS = 5


class Control(StrEnum):
    """A scored control; each adds its modifier only when enforced."""

    SECCOMP = "seccomp"
    LANDLOCK = "landlock"
    NETWORK_ISOLATED = "network_isolated"
    READ_ONLY_ROOT = "read_only_root"
    RESOURCE_LIMITS = "resource_limits"


MODIFIERS: Mapping[Control, int] = {
    Control.SECCOMP: 5,
    Control.LANDLOCK: 3,
    Control.NETWORK_ISOLATED: 5,
    Control.READ_ONLY_ROOT: 3,
    Control.RESOURCE_LIMITS: 2,
}

_CONTROL_DESCRIPTIONS: Mapping[Control, str] = {
    Control.SECCOMP: "seccomp filter (+5)",
    Control.LANDLOCK: "Landlock rules (+3)",
    Control.NETWORK_ISOLATED: "network disabled or restricted to the egress proxy (+5)",
    Control.READ_ONLY_ROOT: "read-only root filesystem (+3)",
    Control.RESOURCE_LIMITS: "resource limits (+2)",
}


def label_for(value: int) -> str:
    """The label of a score: minimal, basic, standard, hardened or fortress."""
    if value < 30:
        return "minimal"
    if value < 50:
        return "basic"
    if value < 70:
        return "standard"
    if value < 85:
        return "hardened"
    return "fortress"


class StrengthScore(int):
    """An int from 0 to 100 with a label; ``str()`` gives ``68 (standard)``."""

    def __new__(cls, value: int) -> StrengthScore:
        return super().__new__(cls, max(0, min(100, int(value))))

    @property
    def label(self) -> str:
        """minimal (0-29), basic (30-49), standard (50-69), hardened (70-84), fortress (85-100)."""
        return label_for(int(self))

    def __str__(self) -> str:
        return f"{int(self)} ({self.label})"

    def __repr__(self) -> str:
        return f"StrengthScore({int(self)})"


@dataclass(frozen=True)
class Enforcement:
    """What a backend actually applied to a sandbox.

    ``controls`` holds the scored controls that were enforced. ``verified`` is True when
    the backend confirmed them from inside the sandbox (``/proc/self/status`` and the like).
    ``details`` carries backend facts for the report (namespaces, CapEff, Landlock ABI,
    cgroup version, runtime version ...). ``degraded`` lists what the policy asked for
    but the backend could not apply, when the policy allowed degrading.
    ``inner`` is the inner layer of a composite backend.
    """

    backend: Backend
    controls: frozenset[Control] = frozenset()
    verified: bool = False
    details: Mapping[str, Any] = field(default_factory=dict)
    degraded: tuple[str, ...] = ()
    inner: Enforcement | None = None
    base_score: int | None = None  # overrides the backend's base (SyAgnos tiers)

    def has(self, control: Control) -> bool:
        """True if ``control`` was enforced."""
        return control in self.controls

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output and audit entries."""
        data: dict[str, Any] = {
            "backend": self.backend.value,
            "controls": sorted(c.value for c in self.controls),
            "verified": self.verified,
            "details": dict(self.details),
            "degraded": list(self.degraded),
        }
        if self.inner is not None:
            data["inner"] = self.inner.to_dict()
        return data


def _layer_score(enforcement: Enforcement) -> int:
    base = enforcement.base_score if enforcement.base_score is not None else BASE_SCORES[enforcement.backend]
    return base + sum(MODIFIERS[c] for c in enforcement.controls)


def score(enforcement: Enforcement) -> StrengthScore:
    """The score of what was enforced.

    A composite scores ``max(outer, inner) + 5`` only when both layers were verified from
    inside; otherwise the unverified inner layer is ignored. Noop always scores 0.
    """
    if enforcement.backend is Backend.NOOP:
        return StrengthScore(0)
    outer = _layer_score(enforcement)
    inner = enforcement.inner
    if inner is not None and enforcement.verified and inner.verified:
        return StrengthScore(max(outer, _layer_score(inner)) + COMPOSITE_BONUS)
    return StrengthScore(outer)


def missing_controls(enforcement: Enforcement) -> list[str]:
    """Human descriptions of the scored controls that were not enforced."""
    if enforcement.backend is Backend.NOOP:
        return []
    return [_CONTROL_DESCRIPTIONS[c] for c in Control if c not in enforcement.controls]


def requested_controls(policy: SandboxPolicy) -> frozenset[Control]:
    """The scored controls a policy asks for."""
    r = policy.resources
    asked = set()
    if policy.seccomp.profile is not SeccompProfile.NONE or policy.seccomp.deny:
        asked.add(Control.SECCOMP)
    if policy.landlock.enabled:
        asked.add(Control.LANDLOCK)
    if policy.network.mode is not NetworkMode.HOST:
        asked.add(Control.NETWORK_ISOLATED)
    if policy.filesystem.read_only_root:
        asked.add(Control.READ_ONLY_ROOT)
    if r.memory is not None or r.pids is not None or r.cpus is not None:
        asked.add(Control.RESOURCE_LIMITS)
    return frozenset(asked)


def supported_controls(backend: Backend) -> frozenset[Control]:
    """The scored controls a backend is able to enforce when the policy asks for them."""
    if backend is Backend.NOOP:
        return frozenset()
    if backend is Backend.WASM:
        # WASI has no syscalls to filter and no Landlock; its sandbox is the wasm VM itself.
        return frozenset({Control.NETWORK_ISOLATED, Control.READ_ONLY_ROOT, Control.RESOURCE_LIMITS})
    return frozenset(Control)


def score_backend(backend: Backend, policy: SandboxPolicy, inner: Backend | None = None) -> StrengthScore:
    """The predicted score of ``backend`` running ``policy`` (optionally with an inner layer).

    An inner layer must make one of the composites kavach builds (``COMPOSITES``); any other
    pair raises :class:`PolicyError` naming ``inner``, as creating it would.
    """
    if inner is not None and (backend, inner) not in COMPOSITES:
        built = ", ".join(f"{outer.value} with inner {layer.value}" for outer, layer in sorted(COMPOSITES))
        reason = f"no composite of {backend.value} with that inner layer; kavach builds {built}"
        raise PolicyError("inner", inner.value, reason)
    controls = requested_controls(policy) & supported_controls(backend)
    outer = Enforcement(backend, controls, verified=True)
    if inner is not None:
        inner_controls = requested_controls(policy) & supported_controls(inner)
        outer = Enforcement(backend, controls, verified=True, inner=Enforcement(inner, inner_controls, verified=True))
    return score(outer)


__all__ = [
    "BASE_SCORES",
    "COMPOSITE_BONUS",
    "MODIFIERS",
    "SYAGNOS_TIER_SCORES",
    "Control",
    "Enforcement",
    "StrengthScore",
    "label_for",
    "missing_controls",
    "requested_controls",
    "score",
    "score_backend",
    "supported_controls",
]
