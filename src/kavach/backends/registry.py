"""Which backends exist, which can run here, and which is strongest for a policy.

Drivers are imported lazily so that a backend's optional dependency (wasmtime, ...) is
needed only when that backend is used.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from functools import cache

from kavach.backends.base import Driver, ProbeResult
from kavach.backends.names import Backend
from kavach.errors import BackendUnavailable, SandboxCreateError
from kavach.policy import SandboxPolicy
from kavach.scoring import Control, StrengthScore, requested_controls, score_backend

# backend -> "module:DriverClass"
_DRIVERS: dict[Backend, str] = {
    Backend.NOOP: "kavach.backends.noop:NoopDriver",
    Backend.PROCESS: "kavach.backends.process:ProcessDriver",
    Backend.OCI: "kavach.backends.oci:OciDriver",
    Backend.GVISOR: "kavach.backends.oci:GVisorDriver",
    Backend.WASM: "kavach.backends.wasm:WasmDriver",
    Backend.FIRECRACKER: "kavach.backends.hardware:FirecrackerDriver",
    Backend.SGX: "kavach.backends.hardware:SgxDriver",
    Backend.SEV: "kavach.backends.hardware:SevDriver",
    Backend.TDX: "kavach.backends.hardware:TdxDriver",
    Backend.SYAGNOS: "kavach.backends.hardware:SyAgnosDriver",
}


@cache
def get_driver(backend: Backend) -> Driver | None:
    """The driver of ``backend``, or None when this release has no driver module for it."""
    module_name, _, class_name = _DRIVERS[backend].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing driver module means "not implemented"; a missing dependency
        # inside an existing driver is a real error that must surface.
        if exc.name == module_name:
            return None
        raise
    driver_class = getattr(module, class_name, None)
    if driver_class is None:
        return None
    driver: Driver = driver_class()
    return driver


def probe(backend: Backend) -> ProbeResult:
    """Probe one backend; never raises."""
    driver = get_driver(backend)
    if driver is None:
        return ProbeResult(backend, False, "no driver in this release", implemented=False)
    return driver.probe()


def probe_all() -> list[ProbeResult]:
    """Probe every backend, in enum order."""
    return [probe(b) for b in Backend]


def require(backend: Backend) -> Driver:
    """The driver of ``backend`` if it can run here; else :class:`BackendUnavailable` with the reason."""
    result = probe(backend)
    driver = get_driver(backend)
    if driver is None or not result.usable:
        raise BackendUnavailable(backend.value, result.reason)
    return driver


def _candidates(policy: SandboxPolicy) -> list[tuple[StrengthScore, Backend]]:
    ranked: list[tuple[StrengthScore, Backend]] = []
    limits = Control.RESOURCE_LIMITS in requested_controls(policy)
    for result in probe_all():
        if not (result.usable and result.runs_linux_commands and result.backend is not Backend.NOOP):
            continue
        if limits and not result.resource_limits:
            if not policy.allow_degraded:
                continue  # it would refuse the policy's limits
            # It would run without them: predicted as it will be scored.
            unlimited = replace(policy, resources=policy.resources.without_cgroup_limits())
            ranked.append((score_backend(result.backend, unlimited), result.backend))
            continue
        ranked.append((score_backend(result.backend, policy), result.backend))
    ranked.sort(key=lambda item: (-int(item[0]), item[1].value))
    return ranked


def available_backends() -> list[Backend]:
    """Usable backends (implemented and available), strongest base score first."""
    usable = [r.backend for r in probe_all() if r.usable]
    return sorted(usable, key=lambda b: -b.base_score)


def resolve_best(policy: SandboxPolicy) -> Backend:
    """The usable backend with the highest predicted score for ``policy`` that runs Linux commands.

    Falls back to Noop only when nothing else can run, so the answer can always be constructed.
    """
    ranked = _candidates(policy)
    return ranked[0][1] if ranked else Backend.NOOP


def resolve_min_strength(policy: SandboxPolicy, min_score: int) -> Backend:
    """The strongest usable backend predicted to reach ``min_score``; else :class:`SandboxCreateError`."""
    ranked = _candidates(policy)
    if ranked and ranked[0][0] >= min_score:
        return ranked[0][1]
    best = f"{ranked[0][1].value} would score {ranked[0][0]}" if ranked else "no backend is usable"
    raise SandboxCreateError(f"no usable backend reaches min_score {min_score} with this policy: {best}")


__all__ = [
    "available_backends",
    "get_driver",
    "probe",
    "probe_all",
    "require",
    "resolve_best",
    "resolve_min_strength",
]
