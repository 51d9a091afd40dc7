"""The WASM backend (``Backend.WASM``): WASI modules and components in wasmtime, scored 65 + modifiers.

``exec("prog.wasm arg1 arg2")`` runs a module found inside one of the sandbox's preopened
directories; ``exec("name args")`` runs a module registered with :func:`register_module`.
wasmtime itself is imported only when a sandbox starts, so this package imports without
it and :meth:`WasmDriver.probe` says how to install it. See ``docs/wasm.md``.
"""

from __future__ import annotations

from kavach.backends.wasm.driver import (
    FUEL_PER_CPU_SECOND,
    Preopen,
    WasmDriver,
    WasmInstance,
    WasmProcess,
    register_module,
    registered_modules,
    unregister_module,
)

__all__ = [
    "FUEL_PER_CPU_SECOND",
    "Preopen",
    "WasmDriver",
    "WasmInstance",
    "WasmProcess",
    "register_module",
    "registered_modules",
    "unregister_module",
]
