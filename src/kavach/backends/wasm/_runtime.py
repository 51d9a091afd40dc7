"""The wasmtime side of the WASM backend: one engine, its epoch ticker, module loading.

wasmtime's private ctypes layer (``wasmtime._ffi``) is used here for the per-store
epoch-deadline callback (the public Python API has no binding for it), and in
:mod:`kavach.backends.wasm._hostcalls` for the gated WASI functions (raw host functions
that delegate to wasmtime's). :func:`missing_features` lets :meth:`WasmDriver.probe`
refuse a wasmtime release that lacks them instead of running without a wall clock.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
import platform
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import wasmtime
from wasmtime.component import Component
from wasmtime.component import Linker as ComponentLinker

from kavach.backends.wasm._hostcalls import HostCalls, supervised
from kavach.backends.wasm.cache import MEMORY_ENTRIES, ModuleCache
from kavach.backends.wasm.driver import COMPONENT_VERSION

# The engine's epoch advances every EPOCH_TICK_S while at least one module runs; each
# store's deadline callback runs once per tick, so the wall clock is exact to one tick.
EPOCH_TICK_S = 0.01

# wasmtime_update_deadline_kind_t: WASMTIME_UPDATE_DEADLINE_CONTINUE
_UPDATE_DEADLINE_CONTINUE = 0

_ENGINE_SETTINGS = (("consume_fuel", True), ("epoch_interruption", True))


def wasmtime_version() -> str:
    """The installed wasmtime (PyPI) version."""
    return importlib.metadata.version("wasmtime")


def _ffi() -> Any:
    from wasmtime import _ffi as ffi  # private: see the module docstring

    return ffi


def _bindings() -> Any:
    from wasmtime import _bindings as bindings  # private: see the module docstring

    return bindings


def missing_features() -> list[str]:
    """What kavach needs and this wasmtime release lacks (private C-API entry points and
    public APIs that arrived in later releases); empty when everything is there."""
    bindings = _bindings()
    private = (
        "_wasmtime_store_epoch_deadline_callback",
        "wasmtime_store_epoch_deadline_callback",
        "wasmtime_error_new",
        # the gated WASI functions (_hostcalls)
        "wasmtime_linker_define_func_unchecked",
        "wasmtime_func_call_unchecked",
        "wasmtime_func_unchecked_callback_t",
        "wasmtime_caller_context",
        "wasmtime_caller_export_get",
        "wasmtime_linker_clone",
        "wasmtime_linker_instantiate",
        "wasmtime_instance_export_get",
        "wasmtime_trap_new",
        "wasmtime_memory_data",
        "wasmtime_memory_data_size",
    )
    missing = [name for name in private if not hasattr(bindings, name)]
    public = {
        "WasiConfig.stdout_custom": hasattr(wasmtime.WasiConfig, "stdout_custom"),
        "Linker.instantiate_pre": hasattr(wasmtime.Linker, "instantiate_pre"),
        "Engine.is_pulley": hasattr(wasmtime.Engine, "is_pulley"),
        "component.Linker.add_wasip2": hasattr(ComponentLinker, "add_wasip2"),
    }
    return missing + [name for name, present in public.items() if not present]


class DeadlineHook:
    """Installs ``decide`` as the store's epoch-deadline callback.

    ``decide()`` runs on the thread executing wasm, once per epoch tick. It returns None
    to keep running (check again next tick) or a message: the store then traps with it.
    It may block (that is how pause works). If it raises, the module is stopped: a
    broken check must never let the module run on unsupervised.
    """

    def __init__(self, store: wasmtime.Store, decide: Callable[[], str | None]) -> None:
        ffi = _ffi()
        # The exact ctypes prototypes the generated binding declares for the callback and
        # the finalizer (arguments 1 and 3 of wasmtime_store_epoch_deadline_callback).
        argtypes = _bindings()._wasmtime_store_epoch_deadline_callback.argtypes
        callback_type, finalizer_type = argtypes[1], argtypes[3]

        def callback(_context: Any, _env: Any, delta: Any, kind: Any) -> int:
            try:
                verdict = decide()
            except BaseException as exc:  # noqa: BLE001 - fail closed: stop the module
                verdict = f"kavach: deadline check failed: {type(exc).__name__}"
            if verdict is None:
                delta[0] = 1
                kind[0] = _UPDATE_DEADLINE_CONTINUE
                return 0
            # A non-NULL wasmtime_error_t* makes the store trap with this message.
            error = ffi.wasmtime_error_new(verdict.encode())
            return ctypes.cast(error, ctypes.c_void_p).value or 0

        # The ctypes thunk must stay alive while the store can call it; the caller closes
        # the store before dropping this object. No finalizer: wasmtime would call it when
        # the store is deleted, possibly after a Python-side thunk was already freed.
        self._callback = callback_type(callback)
        null_finalizer = finalizer_type()  # a NULL function pointer
        ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), self._callback, None, null_finalizer)


class EpochTicker:
    """Advances an engine's epoch every :data:`EPOCH_TICK_S` while anything runs.

    One daemon thread per engine, idle (blocked on a condition) when no module runs, so
    an idle driver costs nothing. ``acquire``/``release`` bracket each run.

    At each tick it also calls the *drains* registered with :meth:`watch` (the runs'
    output pipes): a module writing more than a pipe holds blocks in its write until the
    next tick empties the pipe, so no extra thread or wake-up per exec is needed.
    """

    def __init__(self, engine: wasmtime.Engine, interval: float = EPOCH_TICK_S) -> None:
        self._engine = engine
        self._interval = interval
        self._active = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._drains: dict[int, Callable[[], None]] = {}

    def acquire(self) -> None:
        """A run starts: make sure the epoch advances."""
        with self._cond:
            self._active += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="kavach-wasm-epoch", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def release(self) -> None:
        """A run ended."""
        with self._cond:
            self._active -= 1

    def watch(self, key: int, drain: Callable[[], None]) -> None:
        """Call ``drain`` at every tick until :meth:`unwatch` (it must not raise)."""
        with self._cond:
            self._drains[key] = drain

    def unwatch(self, key: int) -> None:
        """Stop calling the drain registered under ``key``."""
        with self._cond:
            self._drains.pop(key, None)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._active == 0:
                    self._cond.wait()
            time.sleep(self._interval)
            self._engine.increment_epoch()
            with self._cond:
                drains = list(self._drains.items())
            # Outside the lock: a drain takes its pipe's lock, and runs register meanwhile.
            for key, drain in drains:
                try:
                    drain()
                except Exception:  # noqa: BLE001 - this thread is every run's wall clock
                    # A broken drain must not stop the epochs (no run could time out any
                    # more). Dropping it is safe: its run then blocks on a full pipe until
                    # its wall clock ends it, and its final drain reports the error.
                    self.unwatch(key)


_KIND_MODULE = b"M"
_KIND_COMPONENT = b"C"

Compiled = wasmtime.Module | Component


@dataclass(frozen=True)
class Program:
    """A compiled command ready to instantiate.

    A core module (WASI preview 1) comes pre-linked as ``pre``; a component (WASI 0.2)
    comes as ``component`` with the name of its ``wasi:cli/run`` export.
    """

    pre: wasmtime.InstancePre | None = None
    component: Component | None = None
    run_export: str | None = None


class UngatedImportError(ValueError):
    """A module imports a WASI function that kavach's gate does not cover."""


class Runtime:
    """One wasmtime engine with WASI linked, its ticker and its compiled-module cache."""

    def __init__(self, cache_dir: Path | None) -> None:
        config = wasmtime.Config()
        for name, value in _ENGINE_SETTINGS:
            setattr(config, name, value)
        self.engine = wasmtime.Engine(config)
        self.linker = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        self._component_linker: ComponentLinker | None = None
        self.ticker = EpochTicker(self.engine)
        self.version = wasmtime_version()
        self.fingerprint = ";".join(
            [
                f"wasmtime={self.version}",
                f"machine={platform.machine()}",
                f"pulley={self.engine.is_pulley()}",
                *(f"{name}={value}" for name, value in _ENGINE_SETTINGS),
            ]
        )
        self.cache: ModuleCache[Compiled] = ModuleCache(
            self.fingerprint,
            compile=self._compile,
            serialize=self._serialize,
            deserialize=self._deserialize,
            directory=cache_dir,
        )
        # kavach's own modules (the WASI shims) in a cache of their own (same directory and
        # key): its statistics stay those of the sandboxed modules.
        self._own_modules: ModuleCache[Compiled] = ModuleCache(
            self.fingerprint,
            compile=self._compile,
            serialize=self._serialize,
            deserialize=self._deserialize,
            directory=self.cache.directory,
        )
        # Shadows the linker's WASI functions with gated ones (see _hostcalls).
        self.host_calls = HostCalls(self.engine, self.linker, self._load_module)
        self._programs: OrderedDict[str, Program] = OrderedDict()
        self._by_file: OrderedDict[tuple[object, ...], Program] = OrderedDict()
        self.workers = WorkerPool()
        self._lock = threading.Lock()

    # -- compile / serialize (the cache's callbacks) -----------------------------------------

    def _load_module(self, source: bytes) -> wasmtime.Module:
        """A core module of kavach's own (the WASI shims), through the cache like any other."""
        compiled = self._own_modules.get(source)
        if not isinstance(compiled, wasmtime.Module):
            raise TypeError("expected a core module")
        return compiled

    def _compile(self, source: bytes) -> Compiled:
        wasm = source if source.startswith(b"\0asm") else bytes(wasmtime.wat2wasm(source.decode("utf-8")))
        if wasm[4:8] == COMPONENT_VERSION:
            return Component(self.engine, wasm)
        return wasmtime.Module(self.engine, wasm)

    @staticmethod
    def _serialize(compiled: Compiled) -> bytes:
        kind = _KIND_COMPONENT if isinstance(compiled, Component) else _KIND_MODULE
        return kind + bytes(compiled.serialize())

    def _deserialize(self, data: bytes) -> Compiled:
        kind, payload = data[:1], data[1:]
        if kind == _KIND_COMPONENT:
            return Component.deserialize(self.engine, payload)
        if kind == _KIND_MODULE:
            return wasmtime.Module.deserialize(self.engine, payload)
        raise ValueError("unknown artifact kind")

    # -- programs ----------------------------------------------------------------------------

    @property
    def component_linker(self) -> ComponentLinker:
        """The WASI 0.2 linker for components (built on first use)."""
        with self._lock:
            if self._component_linker is None:
                linker = ComponentLinker(self.engine)
                linker.add_wasip2()
                self._component_linker = linker
            return self._component_linker

    def program(self, source: bytes) -> Program:
        """The runnable form of ``source`` (compiled, or from the cache)."""
        key = self.cache.key_for(source)
        with self._lock:
            program = self._programs.get(key)
            if program is not None:
                self._programs.move_to_end(key)
                return program
        compiled = self.cache.get(source)
        if isinstance(compiled, Component):
            program = Program(component=compiled, run_export=self._run_export(compiled))
        else:
            ungated = self.host_calls.ungated(compiled)
            if ungated:
                # Fail closed: wasmtime's own function would run without kavach's gate.
                raise UngatedImportError(f"imports WASI functions kavach does not supervise: {', '.join(ungated)}")
            program = Program(pre=self.linker.instantiate_pre(compiled))
        with self._lock:
            self._programs[key] = program
            while len(self._programs) > MEMORY_ENTRIES:
                self._programs.popitem(last=False)
        return program

    def instance_pre(self, source: bytes) -> wasmtime.InstancePre:
        """A pre-linked instantiation template for the core module ``source``."""
        program = self.program(source)
        if program.pre is None:
            raise ValueError("not a core module")
        return program.pre

    def _run_export(self, component: Component) -> str | None:
        names = sorted(component.type.exports(self.engine))
        runs = [name for name in names if name.startswith("wasi:cli/run@0.2.")]
        return runs[-1] if runs else None

    def program_for_file(self, path: str, read: Callable[[str], bytes]) -> Program:
        """Like :meth:`program` for the file at ``path``, skipping read and hash when the
        file is unchanged since the last call.

        "Unchanged" is the file's identity and change stamps (device, inode, size, mtime and
        ctime in ns). ctime cannot be set from user space and moves on every write, so a
        rewritten or replaced file always misses. ``read`` returns the validated bytes.
        """
        try:
            info = os.stat(path)
        except OSError:
            return self.program(read(path))  # read() reports the error in its own words
        identity = (path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        with self._lock:
            program = self._by_file.get(identity)
            if program is not None:
                self._by_file.move_to_end(identity)
                return program
        program = self.program(read(path))
        with self._lock:
            self._by_file[identity] = program
            while len(self._by_file) > MEMORY_ENTRIES:
                self._by_file.popitem(last=False)
        return program


class WorkerPool:
    """Daemon threads that run modules; idle ones are reused, so an exec starts no thread.

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, and a module
    stuck in a host call (a blocking FIFO read) must not keep the process alive. Idle
    workers exit after ``idle_s``.
    """

    def __init__(self, idle_s: float = 30.0) -> None:
        self._idle_s = idle_s
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # workers waiting on the queue and not yet promised a job

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on an idle worker, or on a new one if none is idle."""
        with self._lock:
            self._queue.put(job)
            if self._idle > 0:
                self._idle -= 1  # that worker is now promised this job
                return
        threading.Thread(target=self._work, name="kavach-wasm-run", daemon=True).start()

    def _work(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    # Leave only if no job was promised to an idle worker meanwhile;
                    # otherwise take it on the next get().
                    if self._idle > 0:
                        self._idle -= 1
                        return
                continue
            job()
            with self._lock:
                self._idle += 1


# A tiny WASI module that checks the sandbox's limits from inside a store configured exactly
# like an exec's. Its functions are called directly from Python (no _start).
_PROBE_WAT = b"""
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get" (func $fd_prestat_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; 1 if memory.grow granted the pages, 0 if it refused.
  (func (export "grow") (param $pages i32) (result i32)
    (i32.ne (memory.grow (local.get $pages)) (i32.const -1)))
  ;; errno of creating (O_CREAT|O_EXCL, right fd_write) the file named at [ptr, ptr+len) in dir fd.
  (func (export "create_in") (param $fd i32) (param $ptr i32) (param $len i32) (result i32)
    (call $path_open (local.get $fd) (i32.const 0) (local.get $ptr) (local.get $len)
      (i32.const 5) (i64.const 64) (i64.const 64) (i32.const 0) (i32.const 0)))
  ;; errno of fd_prestat_get(fd): 0 for a preopened directory, 8 (EBADF) for no such fd.
  (func (export "prestat") (param $fd i32) (result i32)
    (call $fd_prestat_get (local.get $fd) (i32.const 8))))
"""

_WASI_EBADF = 8
_FIRST_PREOPEN_FD = 3  # after stdin, stdout, stderr
_PAGE = 65536


_E = TypeVar("_E")


def _export(exports: Any, name: str, kind: type[_E]) -> _E:
    item = exports[name]
    if not isinstance(item, kind):
        raise VerificationError(f"probe export {name} is not a {kind.__name__}")
    return item


class VerificationError(Exception):
    """A limit the sandbox claims did not hold inside a probe store."""


class _ProbeGate:
    """The probe's run gate: never paused or stopped (it runs a few host calls, no loop)."""

    def __init__(self) -> None:
        self.host_call: str | None = None

    def wait_until(self, when: float | None) -> str | None:
        return None  # the probe never sleeps: nothing to wait for


def verify_from_inside(
    runtime: Runtime,
    configure: Callable[[wasmtime.Store, wasmtime.WasiConfig], None],
    preopens: list[tuple[str, bool]],
    memory_limit: int | None,
) -> list[str]:
    """Check from inside a wasm store what the enforcement record claims; return the checks.

    ``configure`` applies the exec's store limits and WASI preopens; ``preopens`` lists
    (host path, writable) in preopen order. Raises :class:`VerificationError` naming the
    first check that failed.
    """
    store = wasmtime.Store(runtime.engine)
    # The probe runs a handful of instructions; without a deadline the epoch check traps at once.
    store.set_epoch_deadline(1_000_000)
    wasi = wasmtime.WasiConfig()
    configure(store, wasi)
    store.set_wasi(wasi)
    checks: list[str] = []
    try:
        with supervised(_ProbeGate()):
            _run_probe(runtime, store, preopens, memory_limit, checks)
    finally:
        store.close()
    return checks


def _run_probe(
    runtime: Runtime,
    store: wasmtime.Store,
    preopens: list[tuple[str, bool]],
    memory_limit: int | None,
    checks: list[str],
) -> None:
    """The checks of :func:`verify_from_inside`, appended to ``checks`` as they pass."""
    fuel = 1_000_000
    store.set_fuel(fuel)
    if store.get_fuel() != fuel:
        raise VerificationError("fuel metering is not active")
    checks.append("fuel metered")
    instance = runtime.instance_pre(_PROBE_WAT).instantiate(store)
    exports = instance.exports(store)
    grow, create_in, prestat = (_export(exports, name, wasmtime.Func) for name in ("grow", "create_in", "prestat"))
    memory = _export(exports, "memory", wasmtime.Memory)
    if memory_limit is not None:
        # One page exists; asking for limit/64KiB more pages must exceed the limit.
        if grow(store, memory_limit // _PAGE) != 0:
            raise VerificationError(f"memory.grow beyond {memory_limit} bytes succeeded")
        checks.append(f"memory.grow beyond {memory_limit} bytes refused")
    for index, (host, writable) in enumerate(preopens):
        fd = _FIRST_PREOPEN_FD + index
        if prestat(store, fd) != 0:
            raise VerificationError(f"preopen {index} is not at fd {fd}")
        if writable:
            continue
        name = f".kavach-probe-{os.urandom(8).hex()}".encode()
        memory.write(store, name, 1024)
        if create_in(store, fd, 1024, len(name)) == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(host, name.decode()))
            raise VerificationError(f"created a file in read-only preopen {host}")
    if preopens:
        checks.append("read-only preopens refuse file creation")
    beyond = _FIRST_PREOPEN_FD + len(preopens)
    if prestat(store, beyond) != _WASI_EBADF:
        raise VerificationError(f"an unexpected descriptor exists at fd {beyond}")
    checks.append("no descriptors beyond stdio and the preopens (no sockets)")


__all__ = [
    "EPOCH_TICK_S",
    "DeadlineHook",
    "EpochTicker",
    "Program",
    "Runtime",
    "UngatedImportError",
    "VerificationError",
    "WorkerPool",
    "missing_features",
    "verify_from_inside",
    "wasmtime_version",
]
