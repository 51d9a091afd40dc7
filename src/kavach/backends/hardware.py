"""Probes for the backends this machine cannot run: Firecracker, SGX, SEV, TDX, SyAgnos.

Each probe reports what it looked for and what it found, so ``kavach backends`` tells an
operator why a backend is unavailable. None of them has a driver in this release:
``start()`` raises :class:`BackendUnavailable` and the probe says ``implemented=False``,
so auto-selection never picks them and no test pretends they ran.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kavach.backends.base import Driver, Instance, LaunchSpec, ProbeResult
from kavach.backends.names import Backend
from kavach.errors import BackendUnavailable

_NOT_IMPLEMENTED = "no driver in this release"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _kvm_usable() -> tuple[bool, str]:
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm is missing"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable by this user"
    return True, "/dev/kvm present"


class _HardwareDriver(Driver):
    """Shared shape: a probe that explains itself and a start() that refuses."""

    def _facts(self) -> tuple[bool, str, str | None]:
        raise NotImplementedError

    def probe(self) -> ProbeResult:
        present, reason, version = self._facts()
        what = f"{reason}; {_NOT_IMPLEMENTED}" if present else reason
        return ProbeResult(self.backend, False, what, version=version, implemented=False)

    async def start(self, spec: LaunchSpec) -> Instance:
        raise BackendUnavailable(self.backend.value, self.probe().reason)


class FirecrackerDriver(_HardwareDriver):
    """Firecracker microVMs: needs the ``firecracker`` binary and a usable /dev/kvm."""

    backend = Backend.FIRECRACKER

    def _facts(self) -> tuple[bool, str, str | None]:
        binary = shutil.which("firecracker")
        kvm_ok, kvm_reason = _kvm_usable()
        if binary is None:
            return False, f"firecracker binary not found on PATH ({kvm_reason})", None
        if not kvm_ok:
            return False, kvm_reason, None
        return True, f"{binary} and {kvm_reason}", None


class SgxDriver(_HardwareDriver):
    """Intel SGX enclaves: needs /dev/sgx_enclave."""

    backend = Backend.SGX

    def _facts(self) -> tuple[bool, str, str | None]:
        if os.path.exists("/dev/sgx_enclave"):
            return True, "/dev/sgx_enclave present", None
        flag = "sgx" in _cpu_flags()
        return False, f"/dev/sgx_enclave missing (cpu flag sgx {'present' if flag else 'absent'})", None


class SevDriver(_HardwareDriver):
    """AMD SEV(-SNP) confidential VMs: needs /dev/sev and kvm_amd with sev enabled."""

    backend = Backend.SEV

    def _facts(self) -> tuple[bool, str, str | None]:
        param = Path("/sys/module/kvm_amd/parameters/sev")
        enabled = param.exists() and param.read_text().strip() in ("1", "Y")
        if os.path.exists("/dev/sev") and enabled:
            return True, "/dev/sev present and kvm_amd sev enabled", None
        return False, "/dev/sev missing or kvm_amd sev disabled", None


class TdxDriver(_HardwareDriver):
    """Intel TDX trust domains: needs a TDX-enabled kvm_intel."""

    backend = Backend.TDX

    def _facts(self) -> tuple[bool, str, str | None]:
        param = Path("/sys/module/kvm_intel/parameters/tdx")
        if param.exists() and param.read_text().strip() in ("1", "Y"):
            return True, "kvm_intel tdx enabled", None
        return False, "kvm_intel tdx not enabled (no TDX host support)", None


class SyAgnosDriver(_HardwareDriver):
    """SyAgnos hardened microVMs: needs the ``syagnos`` runtime and /dev/kvm."""

    backend = Backend.SYAGNOS

    def _facts(self) -> tuple[bool, str, str | None]:
        binary = shutil.which("syagnos")
        kvm_ok, kvm_reason = _kvm_usable()
        if binary is None:
            return False, f"syagnos runtime not found on PATH ({kvm_reason})", None
        return kvm_ok, kvm_reason, None


__all__ = ["FirecrackerDriver", "SevDriver", "SgxDriver", "SyAgnosDriver", "TdxDriver"]
