"""The ten backend names. Kept import-free so that scoring and policy code can use them."""

from __future__ import annotations

from enum import StrEnum

from kavach.errors import PolicyError


class Backend(StrEnum):
    """An isolation backend. ``Backend.parse`` accepts any case."""

    NOOP = "noop"
    PROCESS = "process"
    OCI = "oci"
    WASM = "wasm"
    GVISOR = "gvisor"
    FIRECRACKER = "firecracker"
    SGX = "sgx"
    SEV = "sev"
    TDX = "tdx"
    SYAGNOS = "syagnos"

    @classmethod
    def parse(cls, name: str | Backend) -> Backend:
        """The backend called ``name``; an unknown name raises :class:`PolicyError` listing valid names."""
        if isinstance(name, Backend):
            return name
        try:
            return cls(name.strip().lower())
        except ValueError:
            valid = ", ".join(b.value for b in cls)
            raise PolicyError("backend", name, f"unknown backend; valid: {valid}") from None

    @property
    def base_score(self) -> int:
        """The specification's base score (before modifiers)."""
        from kavach.scoring import BASE_SCORES

        return BASE_SCORES[self]

    @classmethod
    def available(cls) -> list[Backend]:
        """Backends that are implemented and can run on this host now, strongest first."""
        from kavach.backends.registry import available_backends

        return available_backends()


# The composites kavach builds, as (outer, inner): kavach's process layer (Landlock and a
# second seccomp filter, verified from inside) run by the OCI launcher. Every driver refuses
# any other inner backend at create, so a score is predicted only for these.
COMPOSITES: frozenset[tuple[Backend, Backend]] = frozenset({(Backend.OCI, Backend.PROCESS)})
