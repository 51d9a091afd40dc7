"""The WASM backend: WebAssembly modules (WASI preview 1) and components (WASI 0.2) in wasmtime.

A sandbox is a set of WASI preopened directories plus limits; each ``exec`` runs one
module in a fresh wasmtime store on its own thread. See ``docs/wasm.md`` for the
semantics (module resolution, limits, scoring, pause, what is not supported).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import posixpath
import shlex
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kavach.backends.base import Driver, ExecRequest, Instance, LaunchSpec, ProbeResult, RawProcess, RawResult
from kavach.backends.capture import CappedBuffer
from kavach.backends.names import Backend
from kavach.errors import BackendError, ExecError, SandboxCreateError
from kavach.policy import SandboxPolicy
from kavach.scoring import Control, Enforcement, requested_controls, supported_controls

if TYPE_CHECKING:
    from kavach.backends.wasm._runtime import Program, Runtime

# Fuel is wasmtime's instruction budget: about one unit per executed wasm operator. Measured
# on this project's 2-core VM (docs/wasm.md): a branch-only loop burns 0.85e9 units per CPU
# second, a C loop incrementing a volatile counter 4.6e9. One CPU second = 1e9 units keeps
# cpu_time_s close to an upper bound (~1.2x for the branch-only worst case) at the price of
# stopping operator-dense code earlier (~0.2x).
FUEL_PER_CPU_SECOND = 1_000_000_000
UNLIMITED_FUEL = 2**63 - 1

# Exit codes of abnormal ends, as a shell would report them for a process.
TRAP_EXIT_CODE = 134  # 128 + SIGABRT, what the wasmtime CLI returns for a trap
TIMEOUT_EXIT_CODE = 137  # 128 + SIGKILL, what the Process backend reports for a timeout

# StoreLimits beyond linear memory: a WASI command is one module instance with one memory,
# plus kavach's WASI shim instance (no memory of its own; see _hostcalls).
MAX_INSTANCES = 2
MAX_MEMORIES = 1
MAX_TABLES = 4
MAX_TABLE_ELEMENTS = 1_000_000

# Module size caps. Compilation runs before the store exists, outside fuel, memory limits and
# the wall clock, and cannot be interrupted (84 MB of WAT took ~10 s and ~1 GB RSS): the caps
# bound it. Text is far larger than the code it describes, hence the lower cap.
MAX_MODULE_BYTES = 64 * 1024 * 1024
MAX_WAT_BYTES = 4 * 1024 * 1024
# How long exec() waits beyond the wall clock for a module blocked inside a host call
# (a FIFO read, a component's sleep: see _abandon) before it returns the timeout and abandons the thread.
HOST_CALL_GRACE_S = 1.0
# The longest single condition wait of a run's gate (waits loop and re-check).
_MAX_WAIT_S = 3600.0
# Pipe size for exec output capture: up to this many bytes per epoch tick without a stall.
PIPE_BYTES = 1 << 20

# StoreLimits for components: their core instances, tables and memories (an adapter's too).
MAX_COMPONENT_INSTANCES = 32
MAX_COMPONENT_TABLES = 16
MAX_COMPONENT_MEMORIES = 2

CORE_VERSION = b"\x01\x00\x00\x00"
COMPONENT_VERSION = b"\x0d\x00\x01\x00"

_SHELL_OPERATORS = frozenset("();<>|&")
_MODULE_SUFFIXES = (".wasm", ".wat")


# -- registered modules ----------------------------------------------------------------------

_registry: dict[str, Path] = {}
_registry_lock = threading.Lock()


def register_module(name: str, path: str | os.PathLike[str]) -> None:
    """Make ``exec("name args...")`` run the module at host ``path`` in every WASM sandbox.

    The registry is process-wide (independent of any LaunchSpec). ``path`` is a host path
    chosen by the caller, not by sandboxed code; it is read at each exec (then cached by
    content). Names contain no ``/`` or whitespace; registering a name again replaces it.
    """
    if not name or "/" in name or any(ch.isspace() for ch in name) or "\0" in name:
        raise ValueError(f"invalid module name {name!r}: no '/', whitespace or NUL, not empty")
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise ValueError(f"{path}: not a file")
    with _registry_lock:
        _registry[name] = resolved


def unregister_module(name: str) -> None:
    """Forget a registered name (no error if it was not registered)."""
    with _registry_lock:
        _registry.pop(name, None)


def registered_modules() -> dict[str, Path]:
    """A copy of the registry: name -> host path."""
    with _registry_lock:
        return dict(_registry)


# -- preopens ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preopen:
    """A host directory the module sees at ``guest`` (WASI preopen); ``host`` is a real path
    (symlinks resolved at start: escape checks compare against it)."""

    host: str
    guest: str
    writable: bool


def _longest_prefix(preopens: tuple[Preopen, ...], guest_path: str) -> tuple[Preopen, str] | None:
    best: tuple[Preopen, str] | None = None
    for preopen in preopens:
        root = preopen.guest.rstrip("/") or "/"
        if guest_path == root:
            rest = ""
        elif guest_path.startswith(root if root == "/" else root + "/"):
            rest = guest_path[len(root) :].lstrip("/")
        else:
            continue
        if best is None or len(preopen.guest) > len(best[0].guest):
            best = (preopen, rest)
    return best


def _tmpfs_shm() -> str | None:
    """/dev/shm when it is a tmpfs (so injected secrets never touch the host disk)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) >= 3 and parts[1] == "/dev/shm" and parts[2] == "tmpfs":
                    return "/dev/shm"
    except OSError:
        return None
    return None


def _read_contained(host_path: str, root: str | None, limit: int, display: str) -> bytes:
    """At most ``limit`` bytes of the regular file ``host_path``, which must lie under ``root``.

    The path was checked with realpath before, but a module running concurrently in a
    writable preopen could swap a component for a symlink since: the check is repeated on
    the opened descriptor itself (/proc/self/fd), which no later rename can change.
    O_NONBLOCK keeps a FIFO from blocking the open; only regular files are read.
    """
    try:
        fd = os.open(host_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ExecError(f"{display}: cannot read: {exc.strerror}") from None
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}")
        if root is not None and opened != root and not opened.startswith(root.rstrip("/") + "/"):
            raise ExecError(f"{display}: resolves outside its preopened directory")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ExecError(f"{display}: not a regular file")
        chunks: list[bytes] = []
        remaining = limit + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise ExecError(f"{display}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise ExecError(f"{display}: larger than {limit} bytes")
    return data


# -- one run ----------------------------------------------------------------------------------


class _RunControl:
    """Shared between a run's wasm thread (epoch callback, host calls) and the event loop.

    It is the run's gate (:class:`kavach.backends.wasm._hostcalls.RunGate`): the epoch
    callback asks it at every tick, and every WASI host call asks it before and after it
    runs, so a stopped run can make no further host call.
    """

    def __init__(self, deadline: float | None, paused: bool) -> None:
        self.deadline = deadline
        self.paused = paused
        self.stop_reason: str | None = None
        self.stop_exit_code = TIMEOUT_EXIT_CODE
        self.stop_timed_out = False
        self.cond = threading.Condition()
        self.host_call: str | None = None  # the WASI call wasmtime is running for the module
        # A component's WASI 0.2 host calls are wasmtime's own, not gated (docs/wasm.md).
        self.component = False

    def stop(self, reason: str, exit_code: int, timed_out: bool) -> None:
        with self.cond:
            if self.stop_reason is None:
                self.stop_reason = reason
                self.stop_exit_code = exit_code
                self.stop_timed_out = timed_out
            self.cond.notify_all()

    def set_paused(self, paused: bool) -> None:
        with self.cond:
            self.paused = paused
            self.cond.notify_all()

    def decide(self) -> str | None:
        """Runs on the wasm thread at each epoch tick: None = go on, else trap message."""
        return self.wait_until(None)

    def wait_until(self, when: float | None) -> str | None:
        """Block while paused, and until ``when`` (time.monotonic) if given; None = go on,
        else the trap message (stopped, killed, or past the wall clock).

        The wall clock keeps running while paused. ``stop``, ``set_paused`` and the deadline
        wake the wait at once: this is how a sleeping module (poll_oneoff) is interrupted.
        """
        with self.cond:
            while True:
                now = time.monotonic()
                if self.stop_reason is None and self.deadline is not None and now >= self.deadline:
                    self.stop_reason = "wall-clock timeout"
                    self.stop_timed_out = True
                if self.stop_reason is not None:
                    return f"kavach: {self.stop_reason}"
                if not self.paused and (when is None or now >= when):
                    return None
                limits = [t for t in (self.deadline, None if self.paused else when) if t is not None]
                # Capped: a guest may sleep for 2**64 ns, more than a lock wait accepts.
                self.cond.wait(min(min(limits) - now, _MAX_WAIT_S) if limits else None)


class _PipeSink:
    """One output stream of an ``exec`` captured through a pipe into a :class:`CappedBuffer`.

    wasmtime writes to the pipe's write end (opened by path, as a WASI stdout/stderr file);
    kavach reads the non-blocking read end at every epoch tick (the ticker's drain) and
    once more when the run ends. This is about 0.2 ms per exec cheaper than
    ``stdout_custom``, whose callback wasmtime runs through a hand-off to another thread.
    The caps hold as before: everything read is fed to the stream's CappedBuffer, which
    counts and drops bytes past the cap. The module's writes always succeed; a module
    writing faster than the ticks drain (PIPE_BYTES per tick) blocks in its write
    until the next tick.
    """

    def __init__(self, feed: Callable[[bytes], None], on_error: Callable[[str], None]) -> None:
        self._feed = feed
        self._on_error = on_error
        self._lock = threading.Lock()
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # A bigger pipe means fewer stalls for chatty modules. The kernel refuses when this
        # user is over its pipe-buffer quota (EPERM); the default 64 KiB is then still correct.
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)

    @property
    def path(self) -> str:
        """A path wasmtime can open to reach the write end (a new blocking description)."""
        return f"/proc/self/fd/{self.write_fd}"

    def close_write(self) -> None:
        """Drop kavach's write end once wasmtime holds its own (so EOF follows the store)."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def drain(self) -> None:
        """Move everything the pipe holds into the buffer; never blocks, never raises."""
        with self._lock:
            while self.read_fd >= 0:
                try:
                    chunk = os.read(self.read_fd, 1 << 16)
                except BlockingIOError:
                    return
                except OSError as exc:
                    # Fail closed: output that cannot be captured ends the run (the module
                    # would otherwise block on a full pipe or lose output silently).
                    os.close(self.read_fd)
                    self.read_fd = -1
                    self._on_error(f"output capture failed: {exc.strerror}")
                    return
                if not chunk:
                    return  # EOF: the store closed its write end
                self._feed(chunk)

    def close(self) -> None:
        """Close both ends (idempotent); call after the last drain."""
        self.close_write()
        with self._lock:
            if self.read_fd >= 0:
                os.close(self.read_fd)
                self.read_fd = -1


class _Output:
    """stdout/stderr sinks fed by wasmtime on the wasm thread; optionally streamed to a queue."""

    def __init__(self, stdout_cap: int, stderr_cap: int) -> None:
        self.buffers = {"stdout": CappedBuffer(stdout_cap), "stderr": CappedBuffer(stderr_cap)}
        self.lock = threading.Lock()
        self.listener: Callable[[str, bytes], None] | None = None
        self.pipes: tuple[_PipeSink, ...] = ()

    def drain(self) -> None:
        """Read what the pipes hold (exec); a no-op for callback sinks (spawn)."""
        for pipe in self.pipes:
            pipe.drain()

    def sink(self, stream: str) -> Callable[[bytes], None]:
        buffer = self.buffers[stream]

        def write(data: bytes) -> None:
            # Always report the whole write as done: past the cap the bytes are counted and
            # dropped, as with a process whose pipe is drained.
            with self.lock:
                kept = buffer.feed(bytes(data))
            if kept and self.listener is not None:
                self.listener(stream, kept)

        return write

    def snapshot(self) -> tuple[bytes, bytes, bool, bool]:
        # Everything the module wrote before this point is in the pipes: take it first.
        self.drain()
        with self.lock:
            out, err = self.buffers["stdout"], self.buffers["stderr"]
            return out.getvalue(), err.getvalue(), out.truncated, err.truncated


@dataclass
class _Prepared:
    """An exec request resolved on the event-loop side, ready to run on a thread."""

    module_path: str  # host path, already checked to lie inside a preopen or registered
    module_root: str | None  # the preopen's real directory the file must stay in (None: registered)
    display: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    stdin: bytes | None
    control: _RunControl
    output: _Output
    timeout_ms: int | None = None
    started: float = field(default_factory=time.monotonic)


def _out_of_fuel(exc: BaseException) -> bool:
    """True when wasmtime stopped the code because the store's fuel ran out."""
    import wasmtime

    if isinstance(exc, wasmtime.Trap) and exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
        return True
    # A component's call reports the same trap as an error whose cause is this message.
    return "all fuel consumed" in str(exc)


def _first_line(message: str) -> str:
    """The informative line of a wasmtime error: the root cause, without the backtrace."""
    text = message.split("Caused by:", 1)[1] if "Caused by:" in message else message
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if line and not line.startswith(("error while executing", "note:")) and not line[:1].isdigit():
            return line[:500]
    return message.strip().splitlines()[0][:500] if message.strip() else "unknown error"


def _stuck_in(control: _RunControl) -> str:
    """Where a run that did not stop is stuck, and what that means for the host."""
    if control.host_call is not None:
        return (
            f"host call {control.host_call}; its gate is closed, so it can make no further host call, "
            "but this call itself may still complete"
        )
    if control.component:
        return "a component's host call; WASI 0.2 calls are not gated, it may still act on the host"
    return "wasmtime, compiling or instantiating; no host call was made"


# -- instance ---------------------------------------------------------------------------------


class WasmInstance(Instance):
    """One WASM sandbox: preopens and limits shared by its execs."""

    def __init__(
        self,
        runtime: Runtime,
        spec: LaunchSpec,
        preopens: tuple[Preopen, ...],
        owned_dirs: tuple[str, ...],
        enforcement: Enforcement,
    ) -> None:
        self._runtime = runtime
        self.spec = spec
        self.preopens = preopens
        self._owned_dirs = owned_dirs
        self._enforcement = enforcement
        resources = spec.policy.resources
        limits = [v for v in (resources.memory, resources.address_space) if v is not None]
        self.memory_limit: int | None = min(limits) if limits else None
        self.fuel = UNLIMITED_FUEL if resources.cpu_time_s is None else resources.cpu_time_s * FUEL_PER_CPU_SECOND
        self._runs: set[_RunControl] = set()
        self._runs_lock = threading.Lock()
        self._paused = False
        self._closed = False
        self.abandoned_runs = 0

    # -- reporting ---------------------------------------------------------------------------

    def enforcement(self) -> Enforcement:
        return self._enforcement

    def live_pids(self) -> int | None:
        # A WASI module is no process; there is nothing to count.
        return None

    # -- exec --------------------------------------------------------------------------------

    async def exec(self, request: ExecRequest) -> RawResult:
        prepared = self._prepare(request)
        future = self._start_thread(prepared)
        return await future

    async def spawn(self, request: ExecRequest) -> RawProcess:
        prepared = self._prepare(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()

        def listener(stream: str, data: bytes) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody streams any more
                loop.call_soon_threadsafe(queue.put_nowait, (stream, data))

        prepared.output.listener = listener
        future = self._start_thread(prepared, queue)
        return WasmProcess(prepared, future, queue)

    def _abandon(self, prepared: _Prepared) -> RawResult:
        """The module did not end by the wall clock plus grace: report the timeout now.

        A core module's sleeps (poll_oneoff) end at the wall clock, so this is a thread stuck
        inside one of wasmtime's own calls: a delegated WASI call blocking on the host (a
        FIFO), compilation, or any host call of a component (not gated). It cannot be
        interrupted there. For a core module the stop flag closes its gate: when that call
        returns, the module traps without another host call. The reason says where it is
        stuck, and :meth:`WasmInstance.destroy` raises while it can still act.
        """
        control = prepared.control
        control.stop("wall-clock timeout", TIMEOUT_EXIT_CODE, timed_out=True)
        self.abandoned_runs += 1
        stuck = _stuck_in(control)
        out, err, out_trunc, err_trunc = prepared.output.snapshot()
        return RawResult(
            TIMEOUT_EXIT_CODE,
            out,
            err,
            duration_ms=(time.monotonic() - prepared.started) * 1000,
            timed_out=True,
            stdout_truncated=out_trunc,
            stderr_truncated=err_trunc,
            reason=f"wall-clock timeout (module blocked in {stuck})",
        )

    def _start_thread(
        self, prepared: _Prepared, queue: asyncio.Queue[tuple[str, bytes] | None] | None = None
    ) -> asyncio.Future[RawResult]:
        """Run the module on a worker; the future settles with its result, or with the
        timeout result once the wall clock plus grace has passed.

        Normally the epoch callback ends the module at the wall clock and its own result
        arrives first; the timer only wins for a module stuck inside a host call. Both
        settle the future on the loop thread, so exactly one of them does.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RawResult] = loop.create_future()

        def deliver(result: RawResult | BaseException) -> None:
            if future.done():
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        def body() -> None:
            outcome: RawResult | BaseException
            try:
                outcome = self._run(prepared)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                outcome = exc
            with contextlib.suppress(RuntimeError):  # loop closed: the caller went away
                loop.call_soon_threadsafe(deliver, outcome)

        timer: asyncio.TimerHandle | None = None
        if prepared.timeout_ms is not None:
            budget = prepared.timeout_ms / 1000 + HOST_CALL_GRACE_S

            def expire() -> None:
                if not future.done():
                    future.set_result(self._abandon(prepared))

            timer = loop.call_later(budget, expire)

        def settled(done: asyncio.Future[RawResult]) -> None:
            if timer is not None:
                timer.cancel()
            if done.cancelled():
                # The awaiting task was cancelled: nobody wants the result, end the module.
                prepared.control.stop("cancelled", TIMEOUT_EXIT_CODE, timed_out=False)
            if queue is not None:
                queue.put_nowait(None)  # after every chunk: they were queued before deliver

        future.add_done_callback(settled)
        with self._runs_lock:
            if self._closed:
                future.cancel()
                raise ExecError("sandbox is stopped")
            self._runs.add(prepared.control)
        self._runtime.workers.submit(body)
        return future

    def _run(self, prepared: _Prepared) -> RawResult:
        """Runs on the wasm thread: one fresh store, one instance, ``_start``."""
        import wasmtime

        from kavach.backends.wasm._hostcalls import supervised
        from kavach.backends.wasm._runtime import DeadlineHook, UngatedImportError

        runtime = self._runtime
        control = prepared.control
        try:
            try:
                program = runtime.program_for_file(
                    prepared.module_path, lambda path: self._read_module(path, prepared.module_root, prepared.display)
                )
            except (wasmtime.WasmtimeError, UnicodeDecodeError) as exc:
                raise ExecError(f"{prepared.display}: invalid WebAssembly module: {_first_line(str(exc))}") from None
            except UngatedImportError as exc:
                raise ExecError(f"{prepared.display}: {exc}") from None
            control.component = program.component is not None
            output = prepared.output
            if output.listener is None:
                # exec: capture through pipes (spawn streams through callbacks instead).
                def stop(reason: str) -> None:
                    control.stop(reason, TRAP_EXIT_CODE, timed_out=False)

                output.pipes = tuple(_PipeSink(output.sink(name), stop) for name in ("stdout", "stderr"))
            store = wasmtime.Store(runtime.engine)
            store.set_fuel(self.fuel)
            self._apply_limits(store, component=program.component is not None)
            hook = DeadlineHook(store, control.decide)
            store.set_epoch_deadline(1)
            store.set_wasi(self._wasi_config(prepared))
            runtime.ticker.watch(id(output), output.drain)
            runtime.ticker.acquire()
            try:
                # The WASI host calls of this thread answer to this run's control.
                with supervised(control):
                    return self._call_start(store, program, prepared)
            finally:
                runtime.ticker.release()
                runtime.ticker.unwatch(id(output))
                # Delete the native store here, on its own thread, before the callback
                # thunk it points to can be collected (an exception traceback would
                # otherwise keep the store alive until some later GC on another thread).
                store.close()
                del hook
        finally:
            for pipe in prepared.output.pipes:
                pipe.close()
            with self._runs_lock:
                self._runs.discard(control)

    def _wasi_config(self, prepared: _Prepared) -> Any:
        import wasmtime

        wasi = wasmtime.WasiConfig()
        wasi.argv = list(prepared.argv)
        wasi.env = [list(pair) for pair in prepared.env]
        pipes = prepared.output.pipes
        if pipes:
            wasi.stdout_file, wasi.stderr_file = pipes[0].path, pipes[1].path
            for pipe in pipes:
                pipe.close_write()  # wasmtime opened its own write end above
        else:
            wasi.stdout_custom = prepared.output.sink("stdout")
            wasi.stderr_custom = prepared.output.sink("stderr")
        if prepared.stdin is not None:
            # A memfd: the bytes stay in memory, and wasmtime opens it by path like a file.
            fd = os.memfd_create("kavach-wasm-stdin", os.MFD_CLOEXEC)
            try:
                view = memoryview(prepared.stdin)
                while view:
                    view = view[os.write(fd, view) :]
                wasi.stdin_file = f"/proc/self/fd/{fd}"
            finally:
                os.close(fd)
        self._apply_preopens(wasi)
        return wasi

    def _apply_limits(self, store: Any, component: bool = False) -> None:
        # StoreLimits bound each linear memory. A core module has one, so the limit is the
        # total; a component may have several (its own and an adapter's), so each gets
        # an equal share and the total still stays within the limit.
        memories = MAX_COMPONENT_MEMORIES if component else MAX_MEMORIES
        store.set_limits(
            memory_size=-1 if self.memory_limit is None else self.memory_limit // memories,
            table_elements=MAX_TABLE_ELEMENTS,
            instances=MAX_COMPONENT_INSTANCES if component else MAX_INSTANCES,
            tables=MAX_COMPONENT_TABLES if component else MAX_TABLES,
            memories=memories,
        )

    def _apply_preopens(self, wasi: Any) -> None:
        for preopen in self.preopens:
            wasi.preopen_dir(preopen.host, preopen.guest, preopen.writable)

    def verify(self) -> None:
        """Check the claimed limits from inside a store configured like an exec's (blocking).

        Marks the enforcement verified and lists the checks; raises
        :class:`SandboxCreateError` when one does not hold.
        """
        from kavach.backends.wasm._runtime import VerificationError, verify_from_inside

        def configure(store: Any, wasi: Any) -> None:
            self._apply_limits(store)
            self._apply_preopens(wasi)

        try:
            checks = verify_from_inside(
                self._runtime,
                configure,
                [(p.host, p.writable) for p in self.preopens],
                self.memory_limit,
            )
        except VerificationError as exc:
            raise SandboxCreateError(f"WASM sandbox failed its self-check: {exc}") from None
        details = {**self._enforcement.details, "verified_checks": checks}
        self._enforcement = dataclasses.replace(self._enforcement, verified=True, details=details)

    def _call_start(self, store: Any, program: Program, prepared: _Prepared) -> RawResult:
        import wasmtime

        control = prepared.control
        exit_code = 0
        reason: str | None = None
        timed_out = False
        try:
            run = self._entry_point(store, program, prepared)
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            return self._result(prepared, TRAP_EXIT_CODE, f"instantiation failed: {_first_line(str(exc))}")
        try:
            exit_code = run()
        except wasmtime.ExitTrap as exc:
            exit_code = exc.code
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            # Trap is not a WasmtimeError subclass: wasm traps (fuel, unreachable, ...) of a
            # core module come as Trap; a component's traps and a trap raised by our epoch
            # callback come as WasmtimeError.
            if control.stop_reason is not None:
                exit_code, reason, timed_out = (
                    control.stop_exit_code,
                    control.stop_reason,
                    control.stop_timed_out,
                )
            elif _out_of_fuel(exc):
                cpu = self.spec.policy.resources.cpu_time_s
                exit_code, timed_out = TIMEOUT_EXIT_CODE, True
                reason = f"fuel exhausted (cpu_time_s={cpu}, {self.fuel} units)"
            else:
                exit_code, reason = TRAP_EXIT_CODE, f"trap: {_first_line(str(exc))}"
        return self._result(prepared, exit_code, reason, timed_out)

    def _entry_point(self, store: Any, program: Program, prepared: _Prepared) -> Callable[[], int]:
        """Instantiate ``program`` in ``store``; return a call that runs it and gives its exit code."""
        import wasmtime

        if program.pre is not None:
            start = program.pre.instantiate(store).exports(store).get("_start")
            if not isinstance(start, wasmtime.Func):
                raise ExecError(f"{prepared.display}: no _start export (not a WASI command module)")

            def run_core() -> int:
                start(store)
                return 0

            return run_core
        assert program.component is not None
        if program.run_export is None:
            raise ExecError(f"{prepared.display}: no wasi:cli/run@0.2 export (not a WASI command component)")
        instance = self._runtime.component_linker.instantiate(store, program.component)
        run_index = instance.get_export_index(store, program.run_export)
        func_index = instance.get_export_index(store, "run", run_index) if run_index is not None else None
        func = instance.get_func(store, func_index) if func_index is not None else None
        if func is None:
            raise ExecError(f"{prepared.display}: {program.run_export} exports no run function")

        def run_component() -> int:
            # wasi:cli/run returns result<_, _>: ok is exit code 0, err is 1 (as the
            # wasmtime CLI reports it); wasi:cli/exit raises ExitTrap with the code.
            outcome = func(store)
            return 0 if getattr(outcome, "tag", None) == "ok" else 1

        return run_component

    @staticmethod
    def _result(prepared: _Prepared, exit_code: int, reason: str | None, timed_out: bool = False) -> RawResult:
        out, err, out_trunc, err_trunc = prepared.output.snapshot()
        return RawResult(
            exit_code,
            out,
            err,
            duration_ms=(time.monotonic() - prepared.started) * 1000,
            timed_out=timed_out,
            stdout_truncated=out_trunc,
            stderr_truncated=err_trunc,
            reason=reason,
        )

    # -- request resolution ------------------------------------------------------------------

    def _prepare(self, request: ExecRequest) -> _Prepared:
        if self._closed:
            raise ExecError("sandbox is stopped")
        argv = self._argv(request)
        module_path, module_root, display = self._resolve_module(argv[0], request.cwd)
        env: list[tuple[str, str]] = []
        for name, value in request.env.items():
            if not name or "=" in name or "\0" in name or "\0" in value:
                raise ExecError(f"invalid environment variable name or value: {name!r}")
            env.append((name, value))
        for arg in argv:
            if "\0" in arg:
                raise ExecError("arguments must not contain NUL")
        deadline = None if request.timeout_ms is None else time.monotonic() + request.timeout_ms / 1000
        return _Prepared(
            module_path=module_path,
            module_root=module_root,
            display=display,
            argv=argv,
            env=tuple(env),
            stdin=request.stdin,
            control=_RunControl(deadline, self._paused),
            output=_Output(request.stdout_cap, request.stderr_cap),
            timeout_ms=request.timeout_ms,
        )

    @staticmethod
    def _argv(request: ExecRequest) -> tuple[str, ...]:
        if request.shell is None:
            if not request.argv or not request.argv[0]:
                raise ExecError("empty command")
            return tuple(request.argv)
        # There is no /bin/sh in WebAssembly: the string is split like a shell would split
        # words, and anything that needs a shell (pipes, redirection, lists) is refused.
        lexer = shlex.shlex(request.shell, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as exc:
            raise ExecError(f"cannot parse command: {exc}") from None
        for token in tokens:
            if token and all(ch in _SHELL_OPERATORS for ch in token):
                raise ExecError(
                    f"shell operator {token!r} is not supported by the WASM backend (no shell); run one module per exec"
                )
        if not tokens:
            raise ExecError("empty command")
        return tuple(tokens)

    def _resolve_module(self, name: str, cwd: str | None) -> tuple[str, str | None, str]:
        """(host file, preopen root or None, display name) of ``argv[0]``: a registered name,
        or a .wasm/.wat path inside a preopen."""
        registered = registered_modules().get(name) if "/" not in name else None
        if registered is not None:
            return str(registered), None, name
        if not name.endswith(_MODULE_SUFFIXES):
            raise ExecError(
                f"{name}: not a registered WASM module and not a .wasm/.wat path "
                "(register one with kavach.backends.wasm.register_module)"
            )
        base = cwd or self.spec.policy.filesystem.workdir
        host, root = self._host_path(posixpath.join(base, name))
        return host, root, name

    def _host_path(self, guest_path: str) -> tuple[str, str]:
        """The host file behind ``guest_path`` and its preopen's real root, refusing anything
        that escapes the preopen."""
        if "\0" in guest_path:
            raise ExecError("path must not contain NUL")
        normalized = posixpath.normpath(posixpath.join("/", guest_path))
        match = _longest_prefix(self.preopens, normalized)
        if match is None:
            raise ExecError(f"{guest_path}: not inside a preopened directory of this sandbox")
        preopen, rest = match
        # preopen.host was resolved with realpath at start. Not resolving it again per exec
        # is stricter, not weaker: if a component of it were swapped for a symlink since,
        # the file would resolve outside this root and be refused.
        root = preopen.host
        # realpath follows symlinks a module may have planted in a writable preopen; the
        # result must still lie under the preopen's real root.
        host = os.path.realpath(os.path.join(root, rest))
        if host != root and not host.startswith(root + os.sep):
            raise ExecError(f"{guest_path}: resolves outside its preopened directory")
        return host, root

    @staticmethod
    def _read_module(host_path: str, root: str | None, display: str) -> bytes:
        data = _read_contained(host_path, root, MAX_MODULE_BYTES, display)
        if not data.startswith(b"\0asm") and len(data) > MAX_WAT_BYTES:
            raise ExecError(
                f"{display}: WebAssembly text larger than {MAX_WAT_BYTES} bytes (MAX_WAT_BYTES); "
                "compile it to a .wasm binary"
            )
        if data.startswith(b"\0asm") and data[4:8] not in (CORE_VERSION, COMPONENT_VERSION):
            raise ExecError(f"{display}: unknown WebAssembly binary version {data[4:8].hex()}")
        return data

    # -- lifecycle ---------------------------------------------------------------------------

    def _controls(self) -> list[_RunControl]:
        with self._runs_lock:
            return list(self._runs)

    async def pause(self) -> None:
        """Block every running module at its next epoch check (within one tick, 10 ms) or
        host call, whichever comes first; a sleeping module (poll_oneoff) does not wake
        before resume. The wall clock keeps running while paused.
        """
        self._paused = True
        for control in self._controls():
            control.set_paused(True)

    async def resume(self) -> None:
        """Let paused modules continue."""
        self._paused = False
        for control in self._controls():
            control.set_paused(False)

    async def stop(self) -> None:
        """Stop every running module (trap at its next epoch check or WASI call) and refuse new execs."""
        with self._runs_lock:
            self._closed = True
            runs = list(self._runs)
        for control in runs:
            control.stop("sandbox stopped", TIMEOUT_EXIT_CODE, timed_out=False)
        # Give the modules a few ticks to reach their epoch check and end.
        for _ in range(50):
            if not self._controls():
                break
            await asyncio.sleep(0.01)

    async def destroy(self) -> None:
        """Stop everything and remove the per-sandbox directories. Idempotent.

        Raises :class:`BackendError` (after the cleanup) while a module's thread is still
        inside an uninterruptible call of wasmtime (see :meth:`_abandon`): destroy must not
        report the sandbox gone while that call can still complete on the host.
        """
        await self.stop()
        for directory in self._owned_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        # A core module between host calls traps at its next epoch check or gate, and one
        # still compiling has no host access yet; only these can still act on the host.
        stuck = [c for c in self._controls() if c.host_call is not None or c.component]
        if stuck:
            where = "; ".join(sorted({_stuck_in(c) for c in stuck}))
            raise BackendError(
                f"WASM sandbox {self.spec.sandbox_id}: {len(stuck)} module(s) still inside an "
                f"uninterruptible wasmtime call ({where})"
            )

    async def read_file(self, path: str, max_bytes: int) -> bytes:
        host, root = self._host_path(path)
        return _read_contained(host, root, max_bytes, path)


class WasmProcess(RawProcess):
    """A module started with :meth:`WasmInstance.spawn`; output streams as it is written.

    ``pid`` is 0: a module is no process. Use :meth:`kill`, never ``os.kill(pid)``.
    """

    def __init__(
        self,
        prepared: _Prepared,
        future: asyncio.Future[RawResult],
        queue: asyncio.Queue[tuple[str, bytes] | None],
    ) -> None:
        self.pid = 0
        self._prepared = prepared
        self._future = future
        self._queue = queue
        self._yielded = {"stdout": 0, "stderr": 0}

    async def chunks(self) -> AsyncIterator[tuple[str, bytes]]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            stream, data = item
            self._yielded[stream] += len(data)
            yield stream, data

    async def wait(self) -> RawResult:
        result = await self._future
        return dataclasses.replace(
            result,
            stdout=result.stdout[self._yielded["stdout"] :],
            stderr=result.stderr[self._yielded["stderr"] :],
        )

    async def kill(self, signum: int = 9) -> None:
        self._prepared.control.stop(f"killed (signal {signum})", 128 + signum, timed_out=False)


# -- driver -----------------------------------------------------------------------------------


class WasmDriver(Driver):
    """Runs WASI modules and components in wasmtime; one engine and module cache per driver.

    ``cache_dir`` defaults to :func:`kavach.backends.wasm.cache.default_cache_dir`;
    ``disk_cache=False`` keeps compiled modules in memory only.
    """

    backend = Backend.WASM

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None, disk_cache: bool = True) -> None:
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._disk_cache = disk_cache
        self._runtime: Runtime | None = None
        self._runtime_lock = threading.Lock()

    register_module = staticmethod(register_module)
    unregister_module = staticmethod(unregister_module)

    def probe(self) -> ProbeResult:
        try:
            from kavach.backends.wasm._runtime import missing_features, wasmtime_version
        except ImportError:
            return ProbeResult(
                Backend.WASM,
                False,
                "wasmtime not installed (pip install kavach[wasm])",
                runs_linux_commands=False,
            )
        version = wasmtime_version()
        missing = missing_features()
        if missing:
            return ProbeResult(
                Backend.WASM,
                False,
                f"wasmtime {version} lacks {', '.join(missing)} (pip install 'wasmtime>=50')",
                version=version,
                runs_linux_commands=False,
            )
        return ProbeResult(
            Backend.WASM,
            True,
            f"wasmtime {version}: WASI preview 1 modules and 0.2 components, fuel, epochs, store limits",
            version=version,
            runs_linux_commands=False,
        )

    @property
    def runtime(self) -> Runtime:
        """The engine, ticker and module cache (created on first use)."""
        with self._runtime_lock:
            if self._runtime is None:
                from kavach.backends.wasm._runtime import Runtime
                from kavach.backends.wasm.cache import default_cache_dir

                directory = None
                if self._disk_cache:
                    directory = self._cache_dir if self._cache_dir is not None else default_cache_dir()
                self._runtime = Runtime(directory)
            return self._runtime

    async def start(self, spec: LaunchSpec) -> Instance:
        probe = self.probe()
        if not probe.usable:
            raise SandboxCreateError(f"WASM backend unavailable: {probe.reason}")
        if spec.inner_backend is not None:
            raise SandboxCreateError(
                f"the WASM backend cannot host an inner backend ({spec.inner_backend}): "
                "a wasm module cannot start another sandbox"
            )
        if spec.proxy_listen is not None:
            raise SandboxCreateError(
                "network mode proxy needs a listening socket inside the sandbox; WASM sandboxes "
                "have no network (use network mode off with the WASM backend)"
            )
        runtime = self.runtime
        owned: list[str] = []
        try:
            preopens = _build_preopens(spec, owned)
            enforcement = _enforcement(spec.policy, preopens, runtime)
            instance = WasmInstance(runtime, spec, preopens, tuple(owned), enforcement)
            # The probe compiles (first time) and runs wasm: keep it off the event loop.
            await asyncio.to_thread(instance.verify)
        except BaseException:
            for directory in owned:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        return instance


def _build_preopens(spec: LaunchSpec, owned: list[str]) -> tuple[Preopen, ...]:
    """Binds, workdir and injected files as WASI preopens; ``owned`` collects dirs to remove."""
    fs = spec.policy.filesystem
    preopens: list[Preopen] = []

    def add(host: str, guest: str, writable: bool, what: str) -> None:
        if not os.path.isdir(host):
            raise SandboxCreateError(f"{what} {host}: WASI preopens are directories; not a directory")
        guest = posixpath.normpath(guest)
        if any(p.guest == guest for p in preopens):
            raise SandboxCreateError(f"{what} {host}: {guest} is already preopened")
        preopens.append(Preopen(os.path.realpath(host), guest, writable))

    for bind in fs.ro_binds:
        add(bind.source, bind.target, False, "ro_bind")
    for bind in fs.rw_binds:
        add(bind.source, bind.target, True, "rw_bind")
    if spec.workdir_host is not None:
        add(spec.workdir_host, fs.workdir, True, "workdir")
    else:
        scratch = tempfile.mkdtemp(prefix=f"kavach-wasm-{spec.sandbox_id}-")
        owned.append(scratch)
        # A per-sandbox workdir is writable only when the policy does not ask for a
        # read-only root: with no writable preopen the module sees a read-only filesystem.
        add(scratch, fs.workdir, not fs.read_only_root, "workdir")
    if spec.files:
        shm = _tmpfs_shm()
        if shm is None:
            raise SandboxCreateError("injected files need a tmpfs at /dev/shm (secrets never touch the disk)")
        root = tempfile.mkdtemp(prefix=f"kavach-wasm-{spec.sandbox_id}-files-", dir=shm)
        owned.append(root)
        by_dir: dict[str, str] = {}
        for injected in spec.files:
            guest_dir = posixpath.dirname(posixpath.normpath(injected.path))
            host_dir = by_dir.get(guest_dir)
            if host_dir is None:
                host_dir = os.path.join(root, str(len(by_dir)))
                os.mkdir(host_dir, 0o700)
                by_dir[guest_dir] = host_dir
            target = os.path.join(host_dir, posixpath.basename(injected.path))
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, injected.mode)
            try:
                view = memoryview(injected.data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        for guest_dir, host_dir in by_dir.items():
            add(host_dir, guest_dir, False, "injected files")
    return tuple(preopens)


_NOT_APPLICABLE = {
    Control.SECCOMP: "seccomp: not applicable (a wasm module makes no syscalls; the wasm VM is the boundary)",
    Control.LANDLOCK: "landlock: not applicable (files are reachable only through WASI preopens)",
}


def _enforcement(policy: SandboxPolicy, preopens: tuple[Preopen, ...], runtime: Runtime) -> Enforcement:
    """What this sandbox enforces; a supported control the policy asks for but cannot get fails."""
    resources = policy.resources
    writable = [p.guest for p in preopens if p.writable]
    memory_set = resources.memory is not None or resources.address_space is not None
    controls = {Control.NETWORK_ISOLATED}  # no socket preopens, no inherited network: no sockets
    if not writable:
        controls.add(Control.READ_ONLY_ROOT)
    if memory_set and resources.cpu_time_s is not None:
        controls.add(Control.RESOURCE_LIMITS)

    missing: list[str] = []
    requested = requested_controls(policy) & supported_controls(Backend.WASM)
    if Control.READ_ONLY_ROOT in requested and Control.READ_ONLY_ROOT not in controls:
        missing.append(f"read_only_root: writable preopens {', '.join(writable)} (rw_binds or a host workdir)")
    if Control.RESOURCE_LIMITS in requested and Control.RESOURCE_LIMITS not in controls:
        missing.append("resource_limits: the WASM backend needs resources.memory and resources.cpu_time_s (fuel)")
    if resources.cpus is not None and resources.cpus < 1:
        missing.append(f"resources.cpus={resources.cpus}: fractional CPU bandwidth cannot be enforced on wasm")
    if resources.file_size is not None and writable:
        missing.append("resources.file_size: WASI preopens have no file size limit")
    if missing and not policy.allow_degraded:
        raise SandboxCreateError(
            "the WASM backend cannot enforce what the policy asks: "
            + "; ".join(missing)
            + " (set allow_degraded to run with the lower score)"
        )
    details: dict[str, Any] = {
        "wasmtime": runtime.version,
        "wasi": ["preview1 (core modules)", "0.2 (command components)"],
        "network": "none: no socket descriptors (p1); every socket address refused, no name lookup (0.2)",
        "preopens": [{"guest": p.guest, "writable": p.writable} for p in preopens],
        "memory_limit": resources.memory if resources.memory is not None else resources.address_space,
        "fuel": None if resources.cpu_time_s is None else resources.cpu_time_s * FUEL_PER_CPU_SECOND,
        "fuel_per_cpu_second": FUEL_PER_CPU_SECOND,
        "store_limits": {
            "instances": MAX_INSTANCES,
            "memories": MAX_MEMORIES,
            "tables": MAX_TABLES,
            "table_elements": MAX_TABLE_ELEMENTS,
        },
        "not_applicable": [_NOT_APPLICABLE[c] for c in (Control.SECCOMP, Control.LANDLOCK)],
        "module_cache": str(runtime.cache.directory) if runtime.cache.directory else "memory only",
    }
    if runtime.cache.disabled_reason:
        details["module_cache_disabled"] = runtime.cache.disabled_reason
    return Enforcement(
        Backend.WASM,
        frozenset(controls),
        verified=False,  # set by WasmInstance.verify() once the probe store confirmed it
        details=details,
        degraded=tuple(missing),
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
