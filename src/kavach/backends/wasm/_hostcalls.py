"""kavach's own definitions of the WASI preview 1 imports: every host call passes the run's gate.

wasmtime checks the epoch (wall clock, pause, kill, stop) only in wasm code, at function
entries and loop headers. A module inside a host call, or running straight-line code between
host calls, is never checked: it could sleep past its timeout in ``poll_oneoff`` and then
``path_open`` + ``fd_write`` into a preopen after ``exec`` reported the timeout and
``destroy()`` returned. So every ``wasi_snapshot_preview1`` function of the runtime's
linker except ``proc_exit`` (it only ends the module) is shadowed by a kavach host function
that

* first asks the run's gate (:class:`RunGate`): it blocks while the sandbox is paused and
  traps once the run is stopped, killed or past its wall clock; only then
* delegates to wasmtime's WASI function of the same name, passing the raw argument buffer
  through unchanged, and asks the gate again afterwards.

Delegation goes through a *shim*: a small wasm module, instantiated in the run's store at
its first WASI call, that imports wasmtime's WASI functions and the module's exported memory,
re-exports that memory as ``memory`` and exports one function per WASI function that just
calls the import. wasmtime's WASI functions find the guest memory through their caller's
``memory`` export; called straight from the host they would have no caller instance.

``poll_oneoff`` with clock subscriptions only (every sleep) is implemented here instead: it
waits on the gate's condition, so pause, kill, stop and the wall clock reach a sleeping
module at once. Polls with fd subscriptions go to wasmtime (it reports files ready at once).

A module importing a WASI function that is not shadowed (one a later wasmtime adds) is
refused before it runs (:meth:`HostCalls.ungated`): nothing reaches the host unguarded.
Host functions run on the thread that runs the module; the
gate of that thread's run is found through a thread-local set by :func:`supervised`. A call
from a thread without one traps.
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import wasmtime

WASI_P1 = "wasi_snapshot_preview1"

# Every wasi_snapshot_preview1 function (witx). A name wasmtime does not define stays
# undefined (modules importing it fail to instantiate, as they would without kavach).
_FUNCTIONS = (
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "proc_raise",
    "sched_yield",
    "random_get",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
)

# WASI errno values and poll_oneoff layouts (wasi_snapshot_preview1.witx).
ERRNO_SUCCESS = 0
ERRNO_FAULT = 21
ERRNO_INVAL = 28
_CLOCK_REALTIME = 0
_CLOCK_MONOTONIC = 1
_EVENTTYPE_CLOCK = 0
_SUBCLOCKFLAGS_ABSTIME = 1
# subscription (48 bytes): userdata u64, tag u8, then at 16 the clock: id u32, timeout u64,
# precision u64, flags u16.
_SUBSCRIPTION = struct.Struct("<QB7xI4xQQH6x")
# event (32 bytes): userdata u64, error u16, type u8, then fd_readwrite (nbytes u64, flags u16).
_EVENT = struct.Struct("<QHB5xQH6x")


class RunGate(Protocol):
    """What a run exposes to its host calls (implemented by the driver's run control)."""

    # The delegated WASI call in flight (None between calls): a thread stuck in one is
    # reported by name rather than presumed gone.
    host_call: str | None

    def wait_until(self, when: float | None) -> str | None:
        """Block while paused, and until ``when`` (time.monotonic) if given.

        Returns None to go on, or a message: the host call then traps with it (the run was
        stopped, killed or reached its wall clock).
        """
        ...


class _Supervised:
    """The running module's gate, its store's shim instance and the shim's functions."""

    def __init__(self, gate: RunGate) -> None:
        self.gate = gate
        self.shim: Any = None  # wasmtime_instance_t, made at the first delegated call
        self.functions: dict[bytes, Any] = {}


_current = threading.local()


@contextlib.contextmanager
def supervised(gate: RunGate) -> Iterator[None]:
    """Host calls made on this thread inside the block answer to ``gate``."""
    previous = getattr(_current, "run", None)
    _current.run = _Supervised(gate)
    try:
        yield
    finally:
        _current.run = previous


def _running() -> _Supervised | None:
    run: _Supervised | None = getattr(_current, "run", None)
    return run


def _ffi() -> Any:
    from wasmtime import _ffi as ffi  # private: see _runtime's module docstring

    return ffi


def _bindings() -> Any:
    from wasmtime import _bindings as bindings  # private: see _runtime's module docstring

    return bindings


def _admit() -> tuple[_Supervised | None, int]:
    """The calling thread's run, if its gate lets a WASI call start now (it blocks while the
    sandbox is paused); else ``(None, trap)`` for the host function to return."""
    run = _running()
    if run is None:
        return None, _trap("kavach: WASI call outside a supervised run")
    verdict = run.gate.wait_until(None)
    if verdict is not None:
        return None, _trap(verdict)
    return run, 0


def _trap(message: str) -> int:
    """A new wasm_trap_t* with ``message``, as a host callback returns it (wasmtime owns it)."""
    data = message.encode()
    trap = _ffi().wasmtime_trap_new(data, len(data))
    return ctypes.cast(trap, ctypes.c_void_p).value or 0


class HostCalls:
    """Shadows the WASI preview 1 functions of ``public`` with gated ones.

    ``public`` has wasmtime's WASI defined; every function of :data:`_FUNCTIONS` except
    ``proc_exit`` (which only ends the module) is redefined here. :meth:`ungated` names the
    WASI imports of a module that would reach wasmtime's WASI unguarded (a function a later
    wasmtime adds): the runtime refuses such modules. The ctypes thunks live as long as this
    object, which the runtime keeps as long as the engine and its linkers.
    """

    def __init__(
        self, engine: wasmtime.Engine, public: wasmtime.Linker, load: Callable[[bytes], wasmtime.Module]
    ) -> None:
        ffi = _ffi()
        self._load = load
        self._wasi = wasmtime.Linker(engine)
        self._wasi.define_wasi()
        self._callback_type = ffi.wasmtime_func_unchecked_callback_t
        # A NULL finalizer of the exact prototype the binding declares (its 9th argument):
        # the thunks are kept alive by this object, nothing is left to free.
        self._no_finalizer = _bindings()._wasmtime_linker_define_func_unchecked.argtypes[8]()
        self._thunks: list[Any] = []
        self._module = WASI_P1.encode()
        self._types = self._wasi_types(engine)
        public.allow_shadowing = True
        for name, ty in self._types.items():
            if name != "proc_exit":
                self._define(public, name, ty)
        public.allow_shadowing = False
        self.gated = frozenset(self._types) - {"proc_exit"}
        self._shims_lock = threading.Lock()
        self._shims: tuple[wasmtime.Module, wasmtime.InstancePre] | None = None

    def _wasi_types(self, engine: wasmtime.Engine) -> dict[str, wasmtime.FuncType]:
        """The signature of each WASI function this wasmtime defines."""
        types: dict[str, wasmtime.FuncType] = {}
        store = wasmtime.Store(engine)
        try:
            store.set_wasi(wasmtime.WasiConfig())
            for name in _FUNCTIONS:
                try:
                    original = self._wasi.get(store, WASI_P1, name)
                except wasmtime.WasmtimeError:
                    continue  # not in this wasmtime release
                if isinstance(original, wasmtime.Func):
                    types[name] = original.type(store)
        finally:
            store.close()
        return types

    def ungated(self, module: wasmtime.Module) -> list[str]:
        """The WASI preview 1 functions ``module`` imports that no gate covers."""
        allowed = self.gated | {"proc_exit"}
        return sorted(str(item.name) for item in module.imports if item.module == WASI_P1 and item.name not in allowed)

    def _shim_modules(self) -> tuple[wasmtime.Module, wasmtime.InstancePre]:
        """The two shims, compiled (or loaded from the module cache) on first use.

        One for modules that export a 32-bit unshared memory "memory" (every WASI command in
        practice); one without memory for the rest: wasmtime's WASI then fails the calls
        that need memory, as it does without kavach.
        """
        with self._shims_lock:
            if self._shims is None:
                with_memory = self._load(_shim_wat(self._types, memory=True))
                without = self._wasi.instantiate_pre(self._load(_shim_wat(self._types, memory=False)))
                self._shims = (with_memory, without)
            return self._shims

    def _define(self, public: wasmtime.Linker, name: str, ty: wasmtime.FuncType) -> None:
        ffi = _ffi()
        body = self._poll_oneoff if name == "poll_oneoff" else self._delegating(name.encode())
        thunk = self._callback_type(_guarded(body))
        self._thunks.append(thunk)
        encoded = name.encode()
        error = ffi.wasmtime_linker_define_func_unchecked(
            public.ptr(),
            self._module,
            len(self._module),
            encoded,
            len(encoded),
            ty.ptr(),
            thunk,
            None,
            self._no_finalizer,
        )
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)

    # -- delegation --------------------------------------------------------------------------

    def _original(self, run: _Supervised, caller: Any, context: Any, name: bytes) -> Any:
        """The shim's function calling wasmtime's WASI function ``name``, in the calling store."""
        func = run.functions.get(name)
        if func is None:
            ffi = _ffi()
            if run.shim is None:
                run.shim = self._instantiate_shim(caller, context)
            item = ffi.wasmtime_extern_t()
            if not ffi.wasmtime_instance_export_get(
                context, ctypes.byref(run.shim), name, len(name), ctypes.byref(item)
            ):
                raise LookupError(name.decode())
            func = item.of.func
            run.functions[name] = func
        return func

    def _instantiate_shim(self, caller: Any, context: Any) -> Any:
        """A shim instance in the caller's store, sharing the caller's memory if it can."""
        ffi = _ffi()
        with_memory, without_memory = self._shim_modules()
        instance = ffi.wasmtime_instance_t()
        memory = ffi.wasmtime_extern_t()
        if ffi.wasmtime_caller_export_get(caller, b"memory", 6, ctypes.byref(memory)):
            # A per-call copy of the WASI linker: the memory is an item of this store only.
            linker = ffi.wasmtime_linker_clone(self._wasi.ptr())
            try:
                _check(ffi.wasmtime_linker_define(linker, context, b"kavach", 6, b"memory", 6, ctypes.byref(memory)))
                trap = ctypes.POINTER(ffi.wasm_trap_t)()
                error = ffi.wasmtime_linker_instantiate(
                    linker, context, with_memory.ptr(), ctypes.byref(instance), ctypes.byref(trap)
                )
            finally:
                ffi.wasmtime_linker_delete(linker)
            _release(memory, True)
            if not error and not trap:
                return instance
            # Not a memory the shim can import (shared, 64-bit): the memoryless shim below.
            _discard(error, trap)
        trap = ctypes.POINTER(ffi.wasm_trap_t)()
        error = ffi.wasmtime_instance_pre_instantiate(
            without_memory.ptr(), context, ctypes.byref(instance), ctypes.byref(trap)
        )
        _check(error)
        if trap:
            raise wasmtime.Trap._from_ptr(trap)
        return instance

    def _call_original(self, run: _Supervised, caller: Any, name: bytes, args: Any, nargs: int) -> int:
        """Run wasmtime's ``name`` on the raw argument buffer; 0 or a trap to return."""
        ffi = _ffi()
        context = ffi.wasmtime_caller_context(caller)
        func = self._original(run, caller, context, name)
        trap = ctypes.POINTER(ffi.wasm_trap_t)()
        run.gate.host_call = name.decode()
        try:
            error = ffi.wasmtime_func_call_unchecked(context, ctypes.byref(func), args, nargs, ctypes.byref(trap))
        finally:
            run.gate.host_call = None
        if error:
            # wasmtime's WASI reports a bad guest pointer as an error; it ends the module.
            return _trap(_root_cause(str(wasmtime.WasmtimeError._from_ptr(error))))
        if trap:
            return ctypes.cast(trap, ctypes.c_void_p).value or 0  # ownership passes on
        # Stopped (or paused) while the call ran: trap now, do not run on to the next call.
        verdict = run.gate.wait_until(None)
        return 0 if verdict is None else _trap(verdict)

    def _delegating(self, name: bytes) -> Callable[[Any, Any, int], int]:
        def call(caller: Any, args: Any, nargs: int) -> int:
            run, refusal = _admit()
            if run is None:
                return refusal
            return self._call_original(run, caller, name, args, nargs)

        return call

    # -- poll_oneoff -------------------------------------------------------------------------

    def _poll_oneoff(self, caller: Any, args: Any, nargs: int) -> int:
        run, refusal = _admit()
        if run is None:
            return refusal
        in_ptr, out_ptr, count, nevents_ptr = (args[i].i32 & 0xFFFFFFFF for i in range(4))
        memory = _Memory(caller)
        if memory.address is None:
            return _trap("kavach: poll_oneoff needs an exported memory")
        if in_ptr % 8 or out_ptr % 8 or nevents_ptr % 4:
            return _trap("poll_oneoff: pointer not aligned")  # wasmtime traps here too
        if count == 0:
            args[0].i32 = ERRNO_INVAL
            return 0
        raw = memory.read(in_ptr, count * _SUBSCRIPTION.size)
        if raw is None or not memory.fits(out_ptr, count * _EVENT.size) or not memory.fits(nevents_ptr, 4):
            args[0].i32 = ERRNO_FAULT
            return 0
        subscriptions = [_SUBSCRIPTION.unpack_from(raw, i * _SUBSCRIPTION.size) for i in range(count)]
        if any(
            tag != _EVENTTYPE_CLOCK or clock not in (_CLOCK_REALTIME, _CLOCK_MONOTONIC)
            for _, tag, clock, *_ in subscriptions
        ):
            # fd subscriptions (and clocks kavach does not time itself) go to wasmtime.
            return self._call_original(run, caller, b"poll_oneoff", args, nargs)
        due: list[tuple[int, float]] = []
        for userdata, _tag, clock, timeout, _precision, flags in subscriptions:
            due.append((userdata, self._deadline(run, caller, clock, timeout, flags, out_ptr)))
        verdict = run.gate.wait_until(min(when for _, when in due))
        if verdict is not None:
            return _trap(verdict)
        # Report every subscription that is due now (at least the earliest), as wasmtime does.
        now = time.monotonic()
        ready = [userdata for userdata, when in due if when <= now] or [min(due, key=lambda d: d[1])[0]]
        memory = _Memory(caller)  # the memory may have moved; write through a fresh pointer
        for index, userdata in enumerate(ready):
            memory.write(out_ptr + index * _EVENT.size, _EVENT.pack(userdata, ERRNO_SUCCESS, _EVENTTYPE_CLOCK, 0, 0))
        memory.write(nevents_ptr, struct.pack("<I", len(ready)))
        args[0].i32 = ERRNO_SUCCESS
        return 0

    def _deadline(self, run: _Supervised, caller: Any, clock: int, timeout: int, flags: int, scratch: int) -> float:
        """When (time.monotonic) a clock subscription is due."""
        now = time.monotonic()
        if not flags & _SUBCLOCKFLAGS_ABSTIME:
            return now + timeout / 1e9
        if clock == _CLOCK_REALTIME:
            return now + (timeout - time.time_ns()) / 1e9
        # The guest's monotonic clock has its own origin: ask wasmtime for its current value,
        # written into the event area (overwritten with the events afterwards).
        return now + (timeout - self._guest_monotonic_ns(run, caller, scratch)) / 1e9

    def _guest_monotonic_ns(self, run: _Supervised, caller: Any, scratch: int) -> int:
        ffi = _ffi()
        values = (ffi.wasmtime_val_raw_t * 3)()
        values[0].i32, values[1].i64, values[2].i32 = _CLOCK_MONOTONIC, 1, scratch
        trap = self._call_original(run, caller, b"clock_time_get", values, 3)
        if trap:
            raise _Trapped(trap)  # stopped meanwhile: poll_oneoff traps with it
        if values[0].i32 != ERRNO_SUCCESS:
            return 0  # unreadable: treat the deadline as relative to the clock's origin
        data = _Memory(caller).read(scratch, 8)
        return 0 if data is None else int.from_bytes(data, "little")


def _shim_wat(types: dict[str, wasmtime.FuncType], memory: bool) -> bytes:
    """The shim module: per WASI function, an export of the same name that calls it."""
    lines = ["(module"]
    for name, ty in types.items():
        params = " ".join(str(p) for p in ty.params)
        results = " ".join(str(r) for r in ty.results)
        signature = f"(param {params}) (result {results})"
        lines.append(f'  (import "{WASI_P1}" "{name}" (func ${name} {signature}))')
    if memory:
        lines.append('  (import "kavach" "memory" (memory 0))')
        lines.append('  (export "memory" (memory 0))')
    for name, ty in types.items():
        params = " ".join(str(p) for p in ty.params)
        results = " ".join(str(r) for r in ty.results)
        gets = " ".join(f"(local.get {i})" for i in range(len(ty.params)))
        lines.append(f'  (func (export "{name}") (param {params}) (result {results}) (call ${name} {gets}))')
    lines.append(")")
    return "\n".join(lines).encode()


def _root_cause(message: str) -> str:
    """The innermost cause of a wasmtime error message (its backtrace and chain dropped)."""
    tail = message.rsplit("Caused by:", 1)[-1]
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    if not lines:
        return message.strip() or "unknown error"
    last = lines[-1]
    number, _, rest = last.partition(": ")
    return rest if number.isdigit() and rest else last


def _check(error: Any) -> None:
    """Raise a wasmtime_error_t* (taking ownership); no-op for NULL."""
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)


def _release(item: Any, found: bool) -> None:
    """Free what an extern owns: only a shared memory holds an allocation."""
    ffi = _ffi()
    if found and item.kind == ffi.WASMTIME_EXTERN_SHAREDMEMORY.value:
        ffi.wasmtime_extern_delete(ctypes.byref(item))


def _discard(error: Any, trap: Any) -> None:
    """Free a wasmtime_error_t* and a wasm_trap_t* that are not reported."""
    if error:
        wasmtime.WasmtimeError._from_ptr(error)  # freed when collected
    if trap:
        wasmtime.Trap._from_ptr(trap)


class _Memory:
    """The calling instance's exported linear memory, bounds-checked."""

    def __init__(self, caller: Any) -> None:
        ffi = _ffi()
        item = ffi.wasmtime_extern_t()
        self.address: int | None = None
        self.size = 0
        found = ffi.wasmtime_caller_export_get(caller, b"memory", 6, ctypes.byref(item))
        _release(item, found)
        if found and item.kind == ffi.WASMTIME_EXTERN_MEMORY.value:
            context = ffi.wasmtime_caller_context(caller)
            memory = ctypes.byref(item.of.memory)
            self.address = ctypes.cast(ffi.wasmtime_memory_data(context, memory), ctypes.c_void_p).value
            self.size = ffi.wasmtime_memory_data_size(context, memory)

    def fits(self, offset: int, length: int) -> bool:
        return self.address is not None and offset + length <= self.size

    def read(self, offset: int, length: int) -> bytes | None:
        if not self.fits(offset, length):
            return None
        assert self.address is not None
        return ctypes.string_at(self.address + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        if not self.fits(offset, len(data)):
            raise IndexError("write outside linear memory")  # checked before: a bug
        assert self.address is not None
        ctypes.memmove(self.address + offset, data, len(data))


class _Trapped(Exception):
    """Unwinds a host function that must return ``trap`` (a wasm_trap_t* address)."""

    def __init__(self, trap: int) -> None:
        super().__init__("trapped")
        self.trap = trap


def _guarded(body: Callable[[Any, Any, int], int]) -> Callable[[Any, Any, Any, int], int]:
    """The ctypes callback around ``body``: a Python error traps (fail closed), never escapes."""

    def callback(_env: Any, caller: Any, args: Any, nargs: int) -> int:
        try:
            return body(caller, args, nargs)
        except _Trapped as trapped:
            return trapped.trap
        except BaseException as exc:  # noqa: BLE001 - fail closed: end the module
            return _trap(f"kavach: host call failed: {type(exc).__name__}: {exc}")

    return callback


__all__ = ["WASI_P1", "HostCalls", "RunGate", "supervised"]
