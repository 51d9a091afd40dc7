"""The WASM backend with real modules: C compiled to wasm32-wasi in the session setup, plus WAT.

Every test drives a real wasmtime store through ``WasmDriver`` (no mocks). The C tool
(``tests/wasm_programs/tool.c``) is compiled once per session with Debian's clang, lld and
wasi-libc; WAT modules are compiled by wasmtime itself.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

wasmtime = pytest.importorskip("wasmtime", reason="wasmtime not installed (pip install kavach[wasm])")

from kavach.backends.base import ExecRequest, InjectedFile, LaunchSpec  # noqa: E402
from kavach.backends.names import Backend  # noqa: E402
from kavach.backends.wasm import (  # noqa: E402
    WasmDriver,
    WasmInstance,
    register_module,
    registered_modules,
    unregister_module,
)
from kavach.backends.wasm import driver as wasm_driver  # noqa: E402
from kavach.errors import BackendError, ExecError, SandboxCreateError  # noqa: E402
from kavach.policy import Bind, NetworkMode, NetworkPolicy, ResourceLimits, SandboxPolicy  # noqa: E402
from kavach.scoring import Control, score  # noqa: E402

PROGRAMS = Path(__file__).parent / "wasm_programs"
MiB = 1024 * 1024


def _compile_c(source: Path, output: Path) -> None:
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang not installed (needs clang, lld, wasi-libc, libclang-rt-14-dev-wasm32)")
    proc = subprocess.run(
        [clang, "--target=wasm32-wasi", "-O2", "-o", str(output), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"clang --target=wasm32-wasi cannot build here: {proc.stderr.strip()[:300]}")


@pytest.fixture(scope="session")
def programs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with tool.wasm (compiled now) and the WAT modules."""
    directory = tmp_path_factory.mktemp("wasm-programs")
    _compile_c(PROGRAMS / "tool.c", directory / "tool.wasm")
    for wat in PROGRAMS.glob("*.wat"):
        shutil.copy(wat, directory / wat.name)
    (directory / "data.txt").write_text("preopened file content")
    return directory


@pytest.fixture(scope="session")
def driver(tmp_path_factory: pytest.TempPathFactory) -> WasmDriver:
    """One driver (engine + module cache) for the whole session, as in a real process."""
    return WasmDriver(cache_dir=tmp_path_factory.mktemp("wasm-cache"))


def _policy(
    base: SandboxPolicy | None = None,
    *,
    ro: tuple[Bind, ...] = (),
    rw: tuple[Bind, ...] = (),
    read_only_root: bool | None = None,
    resources: ResourceLimits | None = None,
    allow_degraded: bool | None = None,
) -> SandboxPolicy:
    policy = base or SandboxPolicy.basic()
    fs = replace(policy.filesystem, ro_binds=ro, rw_binds=rw)
    if read_only_root is not None:
        fs = replace(fs, read_only_root=read_only_root)
    policy = replace(policy, filesystem=fs)
    if resources is not None:
        policy = replace(policy, resources=resources)
    if rw or read_only_root is False:
        # WASI preopens have no file size limit: a policy that asks for one with writable
        # preopens is refused (see test_file_size_with_writable_preopen_fails_closed).
        policy = replace(policy, resources=replace(policy.resources, file_size=None))
    if allow_degraded is not None:
        policy = replace(policy, allow_degraded=allow_degraded)
    return policy


@pytest.fixture
async def sandbox(driver: WasmDriver, programs: Path) -> AsyncIterator[WasmInstance]:
    """A basic-policy sandbox with the programs directory preopened read-only at /prog."""
    instance = await driver.start(LaunchSpec("t-basic", _policy(ro=(Bind(str(programs), "/prog"),))))
    assert isinstance(instance, WasmInstance)
    yield instance
    await instance.destroy()


def _req(*argv: str, timeout_ms: int | None = 10_000, **kwargs: object) -> ExecRequest:
    return ExecRequest(argv=argv, timeout_ms=timeout_ms, **kwargs)  # type: ignore[arg-type]


async def _until(condition: Callable[[], bool], limit_s: float = 20.0) -> None:
    """Wait until ``condition()`` holds; fail (not hang) after ``limit_s``."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), limit_s)


# -- probe -------------------------------------------------------------------------------------


def test_probe_reports_wasmtime_version_and_no_linux_commands(driver: WasmDriver) -> None:
    result = driver.probe()
    assert result.usable
    assert result.version == wasmtime_version()
    assert result.runs_linux_commands is False
    assert result.backend is Backend.WASM


def test_without_wasmtime_the_package_imports_and_probe_says_how_to_install() -> None:
    # A child interpreter where "import wasmtime" fails, as on a host without the extra.
    code = (
        "import sys; sys.modules['wasmtime'] = None\n"
        "from kavach.backends import registry\n"
        "from kavach.backends.names import Backend\n"
        "result = registry.probe(Backend.WASM)\n"
        "print(result.available, result.runs_linux_commands, result.reason)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False False wasmtime not installed (pip install kavach[wasm])"


def wasmtime_version() -> str:
    from importlib.metadata import version

    return version("wasmtime")


# -- argv, env, stdin, exit codes ----------------------------------------------------------------


async def test_hello_with_args_and_env_only_from_request(sandbox: WasmInstance) -> None:
    os.environ["SECRET_HOST_VAR"] = "host-only"
    try:
        result = await sandbox.exec(_req("/prog/tool.wasm", "hello", "a b", "c", env={"GREETING": "hi there"}))
    finally:
        del os.environ["SECRET_HOST_VAR"]
    lines = result.stdout.decode().splitlines()
    assert result.exit_code == 0, result
    assert lines[:4] == ["arg0=/prog/tool.wasm", "arg1=hello", "arg2=a b", "arg3=c"]
    assert "env GREETING=hi there" in lines
    # Nothing leaks from the host environment: only what the request carried.
    assert "env SECRET_HOST_VAR=(unset)" in lines
    assert "env HOME=(unset)" in lines


async def test_shell_string_is_split_like_words(sandbox: WasmInstance) -> None:
    request = ExecRequest(argv=("/bin/sh", "-c", "x"), shell="/prog/tool.wasm hello 'two words'", timeout_ms=10_000)
    result = await sandbox.exec(request)
    assert b"arg2=two words\n" in result.stdout


async def test_shell_operators_are_refused(sandbox: WasmInstance) -> None:
    request = ExecRequest(argv=("/bin/sh", "-c", "x"), shell="/prog/tool.wasm hello | cat", timeout_ms=10_000)
    with pytest.raises(ExecError, match="shell operator"):
        await sandbox.exec(request)


async def test_stdin_bytes_reach_the_module(sandbox: WasmInstance) -> None:
    data = b"line one\nline two\x00\xff"
    result = await sandbox.exec(_req("/prog/tool.wasm", "stdin", stdin=data))
    assert result.stdout == b"stdin=" + data + b"\nstdin_bytes=" + str(len(data)).encode() + b"\n"


async def test_no_stdin_reads_empty(sandbox: WasmInstance) -> None:
    result = await sandbox.exec(_req("/prog/tool.wasm", "stdin"))
    assert result.stdout.endswith(b"stdin_bytes=0\n")


async def test_exit_code_from_main_and_from_proc_exit(sandbox: WasmInstance) -> None:
    from_main = await sandbox.exec(_req("/prog/tool.wasm", "exit", "42"))
    assert from_main.exit_code == 42
    assert from_main.reason is None
    wat = await sandbox.exec(_req("/prog/hello.wat"))
    assert wat.exit_code == 7
    assert wat.stdout == b"hello from wat\n"


async def test_trap_gives_nonzero_exit_and_message(sandbox: WasmInstance) -> None:
    result = await sandbox.exec(_req("/prog/trap.wat"))
    assert result.exit_code == wasm_driver.TRAP_EXIT_CODE
    assert result.reason is not None
    assert result.reason.startswith("trap: ")
    assert "unreachable" in result.reason
    assert result.timed_out is False


async def test_output_caps_and_truncation_flags(sandbox: WasmInstance) -> None:
    request = _req("/prog/tool.wasm", "flood", "100000", stdout_cap=1000, stderr_cap=5)
    result = await sandbox.exec(request)
    assert result.exit_code == 0
    assert result.stdout == b"x" * 1000
    assert result.stdout_truncated is True
    assert result.stderr == b"flood"
    assert result.stderr_truncated is True


async def test_output_larger_than_the_capture_pipe_is_drained_and_capped(sandbox: WasmInstance) -> None:
    # exec captures through a pipe of PIPE_BYTES drained at each epoch tick: a module
    # writing three pipes' worth must finish (not block) and the cap must still hold.
    pipe = wasm_driver.PIPE_BYTES
    cap = 2 * pipe + 7
    result = await sandbox.exec(_req("/prog/tool.wasm", "flood", str(3 * pipe), stdout_cap=cap))
    assert result.exit_code == 0, result
    assert result.stdout == b"x" * cap
    assert result.stdout_truncated is True
    assert result.stderr == b"flood done\n"
    assert result.stderr_truncated is False


async def test_exec_leaves_no_descriptors_open(sandbox: WasmInstance) -> None:
    await sandbox.exec(_req("/prog/tool.wasm", "print", "warm"))
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(5):
        result = await sandbox.exec(_req("/prog/tool.wasm", "stdin", stdin=b"in"))
        assert result.stdout == b"stdin=in\nstdin_bytes=2\n"
    assert set(os.listdir("/proc/self/fd")) == before


# -- filesystem -----------------------------------------------------------------------------------


async def test_reads_a_preopened_file(sandbox: WasmInstance) -> None:
    result = await sandbox.exec(_req("/prog/tool.wasm", "read", "/prog/data.txt"))
    assert result.stdout == b"content=preopened file content\n"


async def test_writing_to_read_only_preopen_fails(sandbox: WasmInstance, programs: Path) -> None:
    result = await sandbox.exec(_req("/prog/tool.wasm", "write", "/prog/new.txt", "nope"))
    assert result.exit_code == 1
    assert b"open failed" in result.stdout
    assert not (programs / "new.txt").exists()


async def test_paths_outside_preopens_do_not_exist(sandbox: WasmInstance) -> None:
    result = await sandbox.exec(_req("/prog/tool.wasm", "read", "/etc/passwd"))
    assert result.exit_code == 1
    assert b"open failed" in result.stdout
    escape = await sandbox.exec(_req("/prog/tool.wasm", "read", "/prog/../etc/passwd"))
    assert escape.exit_code == 1


async def test_read_write_bind_and_read_file(driver: WasmDriver, programs: Path, tmp_path: Path) -> None:
    policy = _policy(ro=(Bind(str(programs), "/prog"),), rw=(Bind(str(tmp_path), "/out"),), read_only_root=False)
    instance = await driver.start(LaunchSpec("t-rw", policy))
    try:
        result = await instance.exec(_req("/prog/tool.wasm", "write", "/out/result.txt", "made inside"))
        assert result.stdout == b"written\n"
        assert (tmp_path / "result.txt").read_text() == "made inside"
        assert await instance.read_file("/out/result.txt", 100) == b"made inside"
        with pytest.raises(ExecError, match="larger than"):
            await instance.read_file("/out/result.txt", 3)
        with pytest.raises(ExecError, match="not inside a preopened"):
            await instance.read_file("/etc/passwd", 100)
    finally:
        await instance.destroy()


async def test_rewritten_module_file_is_not_served_stale(driver: WasmDriver, programs: Path, tmp_path: Path) -> None:
    policy = _policy(rw=(Bind(str(tmp_path), "/m"),), read_only_root=False)
    instance = await driver.start(LaunchSpec("t-stale", policy))
    try:
        module = tmp_path / "mod.wat"
        shutil.copy(programs / "hello.wat", module)
        assert (await instance.exec(_req("/m/mod.wat"))).exit_code == 7
        # Same size, same directory entry: only the content (and ctime) changes.
        module.write_text((programs / "hello.wat").read_text().replace("(i32.const 7)", "(i32.const 8)"))
        assert (await instance.exec(_req("/m/mod.wat"))).exit_code == 8
    finally:
        await instance.destroy()


async def test_symlink_planted_in_writable_preopen_cannot_escape(
    driver: WasmDriver, programs: Path, tmp_path: Path
) -> None:
    (tmp_path / "evil.wasm").symlink_to("/etc/passwd")
    policy = _policy(ro=(Bind(str(programs), "/prog"),), rw=(Bind(str(tmp_path), "/out"),), read_only_root=False)
    instance = await driver.start(LaunchSpec("t-link", policy))
    try:
        with pytest.raises(ExecError, match="outside its preopened directory"):
            await instance.exec(_req("/out/evil.wasm"))
        with pytest.raises(ExecError, match="outside its preopened directory"):
            await instance.read_file("/out/evil.wasm", 100)
    finally:
        await instance.destroy()


async def test_read_file_refuses_fifos(driver: WasmDriver, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.wasm")
    instance = await driver.start(LaunchSpec("t-fifo", _policy(ro=(Bind(str(tmp_path), "/d"),))))
    try:
        with pytest.raises(ExecError, match="not a regular file"):
            await instance.read_file("/d/pipe.wasm", 100)
        with pytest.raises(ExecError, match="not a regular file"):
            await instance.exec(_req("/d/pipe.wasm"))
    finally:
        await instance.destroy()


async def test_per_sandbox_workdir_is_read_only_under_read_only_root_and_removed(
    driver: WasmDriver, programs: Path
) -> None:
    instance = await driver.start(LaunchSpec("t-wd", _policy(ro=(Bind(str(programs), "/prog"),))))
    assert isinstance(instance, WasmInstance)
    workdir = next(p for p in instance.preopens if p.guest == "/work")
    assert workdir.writable is False
    result = await instance.exec(_req("/prog/tool.wasm", "write", "/work/x", "y"))
    assert result.exit_code == 1
    await instance.destroy()
    assert not os.path.exists(workdir.host)


async def test_writable_workdir_when_root_is_not_read_only(driver: WasmDriver, programs: Path) -> None:
    policy = _policy(ro=(Bind(str(programs), "/prog"),), read_only_root=False)
    instance = await driver.start(LaunchSpec("t-wd-rw", policy))
    try:
        result = await instance.exec(_req("/prog/tool.wasm", "write", "/work/x", "scratch"))
        assert result.stdout == b"written\n"
        assert await instance.read_file("/work/x", 100) == b"scratch"
        assert Control.READ_ONLY_ROOT not in instance.enforcement().controls
    finally:
        await instance.destroy()


async def test_injected_files_are_readable_read_only_and_on_tmpfs(driver: WasmDriver, programs: Path) -> None:
    files = (InjectedFile("/run/secrets/token", b"s3cr3t-value", 0o400),)
    spec = LaunchSpec("t-files", _policy(ro=(Bind(str(programs), "/prog"),)), files=files)
    instance = await driver.start(spec)
    assert isinstance(instance, WasmInstance)
    try:
        result = await instance.exec(_req("/prog/tool.wasm", "read", "/run/secrets/token"))
        assert result.stdout == b"content=s3cr3t-value\n"
        denied = await instance.exec(_req("/prog/tool.wasm", "write", "/run/secrets/token", "x"))
        assert denied.exit_code == 1
        secrets_dir = next(p for p in instance.preopens if p.guest == "/run/secrets")
        assert secrets_dir.host.startswith("/dev/shm/")
    finally:
        await instance.destroy()
    assert not os.path.exists(secrets_dir.host)


# -- module resolution ---------------------------------------------------------------------------


async def test_registered_module_name(sandbox: WasmInstance, programs: Path) -> None:
    register_module("tool", programs / "tool.wasm")
    try:
        assert "tool" in registered_modules()
        result = await sandbox.exec(_req("tool", "exit", "3"))
        assert result.exit_code == 3
    finally:
        unregister_module("tool")
    with pytest.raises(ExecError, match="not a registered WASM module"):
        await sandbox.exec(_req("tool", "exit", "3"))


def test_register_module_rejects_bad_names(programs: Path) -> None:
    with pytest.raises(ValueError, match="invalid module name"):
        register_module("a/b", programs / "tool.wasm")
    with pytest.raises(ValueError, match="not a file"):
        register_module("missing", programs / "missing.wasm")


async def test_module_outside_preopens_is_refused(sandbox: WasmInstance, programs: Path) -> None:
    # The host path exists, but the sandbox has not preopened it.
    with pytest.raises(ExecError, match="not inside a preopened directory"):
        await sandbox.exec(_req(str(programs.parent / "elsewhere.wasm")))


async def test_unknown_binary_version_is_refused(driver: WasmDriver, tmp_path: Path) -> None:
    (tmp_path / "odd.wasm").write_bytes(b"\0asm\x02\x00\x00\x00")
    instance = await driver.start(LaunchSpec("t-odd", _policy(ro=(Bind(str(tmp_path), "/m"),))))
    try:
        with pytest.raises(ExecError, match="unknown WebAssembly binary version"):
            await instance.exec(_req("/m/odd.wasm"))
    finally:
        await instance.destroy()


# -- components (WASI 0.2) -------------------------------------------------------------------------


async def test_component_writes_stdout_and_returns_ok(sandbox: WasmInstance, programs: Path) -> None:
    result = await sandbox.exec(_req("/prog/hello_p2.wat"))
    assert result.exit_code == 0, result
    assert result.stdout == b"hello from a component\n"
    # The same component as a binary (wasmtime's own WAT encoder) runs the same.
    (programs / "hello_p2.wasm").write_bytes(bytes(wasmtime.wat2wasm((programs / "hello_p2.wat").read_text())))
    binary = await sandbox.exec(_req("/prog/hello_p2.wasm"))
    assert binary.stdout == b"hello from a component\n"


async def test_component_run_err_is_exit_code_1(sandbox: WasmInstance) -> None:
    result = await sandbox.exec(_req("/prog/fail_p2.wat"))
    assert result.exit_code == 1
    assert result.reason is None


async def test_component_stopped_by_fuel_and_by_wall_clock(
    driver: WasmDriver, programs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wasm_driver, "FUEL_PER_CPU_SECOND", 50_000_000)
    fuel = replace(SandboxPolicy.basic().resources, cpu_time_s=1)
    instance = await driver.start(LaunchSpec("t-cfuel", _policy(ro=(Bind(str(programs), "/prog"),), resources=fuel)))
    try:
        result = await instance.exec(_req("/prog/loop_p2.wat", timeout_ms=60_000))
        assert result.timed_out and result.reason is not None and result.reason.startswith("fuel exhausted"), result
    finally:
        await instance.destroy()
    wall = ResourceLimits(memory=64 * MiB, cpu_time_s=None)
    policy = _policy(ro=(Bind(str(programs), "/prog"),), resources=wall, allow_degraded=True)
    instance = await driver.start(LaunchSpec("t-cwall", policy))
    try:
        result = await instance.exec(_req("/prog/loop_p2.wat", timeout_ms=200))
        assert result.timed_out and result.reason == "wall-clock timeout", result
    finally:
        await instance.destroy()


@pytest.mark.parametrize(("memory", "exit_code"), [(2 * MiB, 0), (4 * MiB, 1)])
async def test_component_memory_share_of_the_limit(
    driver: WasmDriver, programs: Path, memory: int, exit_code: int
) -> None:
    # A component may have two memories, so each gets half the limit: with 2 MiB the
    # component's memory stops at exactly 1 MiB (exit 0); with 4 MiB it grows further (exit 1).
    resources = replace(SandboxPolicy.basic().resources, memory=memory)
    instance = await driver.start(
        LaunchSpec("t-cmem", _policy(ro=(Bind(str(programs), "/prog"),), resources=resources))
    )
    try:
        assert (await instance.exec(_req("/prog/grow_p2.wat"))).exit_code == exit_code
    finally:
        await instance.destroy()


async def test_invalid_module_is_an_exec_error(driver: WasmDriver, tmp_path: Path) -> None:
    (tmp_path / "bad.wat").write_text("(module (func $f (i32.add)))")
    instance = await driver.start(LaunchSpec("t-bad", _policy(ro=(Bind(str(tmp_path), "/m"),))))
    try:
        with pytest.raises(ExecError, match="invalid WebAssembly module"):
            await instance.exec(_req("/m/bad.wat"))
    finally:
        await instance.destroy()


async def test_oversized_modules_are_refused_before_compiling(driver: WasmDriver, tmp_path: Path) -> None:
    # Compilation is outside every run limit: the size caps are what bound it.
    (tmp_path / "big.wat").write_bytes(b"(module)" + b" " * wasm_driver.MAX_WAT_BYTES)
    with open(tmp_path / "big.wasm", "wb") as big:
        big.write(b"\0asm\x01\0\0\0")
        big.truncate(wasm_driver.MAX_MODULE_BYTES + 1)  # sparse: no disk used
    instance = await driver.start(LaunchSpec("t-big", _policy(ro=(Bind(str(tmp_path), "/m"),))))
    try:
        with pytest.raises(ExecError, match=rf"big.wat: WebAssembly text larger than {wasm_driver.MAX_WAT_BYTES}"):
            await instance.exec(_req("/m/big.wat"))
        with pytest.raises(ExecError, match=rf"big.wasm: larger than {wasm_driver.MAX_MODULE_BYTES} bytes"):
            await instance.exec(_req("/m/big.wasm"))
    finally:
        await instance.destroy()


# -- limits --------------------------------------------------------------------------------------


async def test_infinite_loop_stopped_by_fuel(
    driver: WasmDriver, programs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1 s of CPU is 1e9 units by default; a smaller unit keeps the test short while still
    # exercising the real fuel trap.
    monkeypatch.setattr(wasm_driver, "FUEL_PER_CPU_SECOND", 50_000_000)
    resources = replace(SandboxPolicy.basic().resources, cpu_time_s=1)
    instance = await driver.start(
        LaunchSpec("t-fuel", _policy(ro=(Bind(str(programs), "/prog"),), resources=resources))
    )
    try:
        for argv in (("/prog/loop.wat",), ("/prog/tool.wasm", "spin")):
            result = await instance.exec(_req(*argv, timeout_ms=60_000))
            assert result.timed_out is True, result
            assert result.reason is not None and result.reason.startswith("fuel exhausted"), result
            assert result.exit_code == wasm_driver.TIMEOUT_EXIT_CODE
    finally:
        await instance.destroy()


async def test_infinite_loop_stopped_by_wall_clock(driver: WasmDriver, programs: Path) -> None:
    resources = ResourceLimits(memory=64 * MiB, cpu_time_s=None)
    policy = _policy(ro=(Bind(str(programs), "/prog"),), resources=resources, allow_degraded=True)
    instance = await driver.start(LaunchSpec("t-wall", policy))
    try:
        for argv in (("/prog/loop.wat",), ("/prog/tool.wasm", "spin")):
            result = await instance.exec(_req(*argv, timeout_ms=200))
            assert result.timed_out is True, result
            assert result.reason == "wall-clock timeout"
            assert result.exit_code == wasm_driver.TIMEOUT_EXIT_CODE
    finally:
        await instance.destroy()


async def test_a_failing_output_drain_does_not_stop_the_wall_clock(driver: WasmDriver, programs: Path) -> None:
    resources = ResourceLimits(memory=64 * MiB, cpu_time_s=None)
    policy = _policy(ro=(Bind(str(programs), "/prog"),), resources=resources, allow_degraded=True)
    instance = await driver.start(LaunchSpec("t-drain", policy))
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("bug in a drain")

    ticker = driver.runtime.ticker
    ticker.watch(-1, broken)
    try:
        # The ticker thread also advances the epochs: if the broken drain killed it, the
        # loop would only end at the host-call grace timer, with another reason.
        result = await instance.exec(_req("/prog/loop.wat", timeout_ms=200))
        assert result.timed_out is True, result
        assert result.reason == "wall-clock timeout"
        assert calls == [1]  # called once, then dropped
    finally:
        ticker.unwatch(-1)
        await instance.destroy()


async def test_module_sleeping_in_a_host_call_is_stopped_by_the_wall_clock(sandbox: WasmInstance) -> None:
    # libc sleep() is one WASI poll_oneoff; kavach's own poll_oneoff waits in slices that the
    # wall clock ends, so the run stops with a plain timeout and no thread is abandoned.
    result = await sandbox.exec(_req("/prog/tool.wasm", "sleep", "30", timeout_ms=100))
    assert result.timed_out is True
    assert result.reason == "wall-clock timeout"
    assert result.stdout == b""
    assert sandbox.abandoned_runs == 0


async def test_spawned_module_sleeping_in_a_host_call_ends_its_stream(sandbox: WasmInstance) -> None:
    process = await sandbox.spawn(_req("/prog/tool.wasm", "sleep", "30", timeout_ms=100))
    async for _stream, _data in process.chunks():
        pass
    result = await process.wait()
    assert result.timed_out is True
    assert result.reason == "wall-clock timeout"


async def test_short_sleeps_sleep_and_the_program_continues(sandbox: WasmInstance) -> None:
    # Realtime clock (wasi-libc sleep) and monotonic clock (sleep_write.wat, which also checks
    # the event poll_oneoff writes back). Elapsed time is only checked loosely: at least the
    # sleep, which no correct implementation can undercut.
    result = await sandbox.exec(_req("/prog/tool.wasm", "sleep", "1", timeout_ms=30_000))
    assert (result.exit_code, result.stdout, result.timed_out) == (0, b"slept\n", False), result
    assert result.duration_ms >= 1000
    # /prog is read-only: the module's file creation fails, its output still comes.
    result = await sandbox.exec(_req("/prog/sleep_write.wat", "200", timeout_ms=30_000))
    assert (result.exit_code, result.stdout, result.timed_out) == (0, b"slept\n", False), result
    assert result.duration_ms >= 200


async def _host_workdir_sandbox(driver: WasmDriver, programs: Path, workdir: Path, name: str) -> WasmInstance:
    """A sandbox whose writable workdir (/work, preopen fd 3) is the host directory ``workdir``."""
    workdir.mkdir()
    shutil.copy(programs / "sleep_write.wat", workdir / "sleep_write.wat")
    instance = await driver.start(LaunchSpec(name, _policy(read_only_root=False), workdir_host=str(workdir)))
    assert isinstance(instance, WasmInstance)
    return instance


async def test_timed_out_module_cannot_touch_the_host_after_exec_and_destroy(
    driver: WasmDriver, programs: Path, tmp_path: Path
) -> None:
    # The reviewer's repro: sleep 2.5 s in poll_oneoff, then path_open + fd_write in
    # straight-line code. Once exec reported the timeout and destroy() returned, the file
    # must never appear, not even after the sleep would have ended.
    workdir = tmp_path / "work"
    instance = await _host_workdir_sandbox(driver, programs, workdir, "t-after")
    started = asyncio.get_running_loop().time()
    try:
        result = await instance.exec(_req("/work/sleep_write.wat", "2500", timeout_ms=300))
        assert result.timed_out is True, result
    finally:
        await instance.destroy()
    await asyncio.sleep(max(0.0, started + 3.5 - asyncio.get_running_loop().time()))
    assert not (workdir / "after-sleep.txt").exists(), "the module wrote to the host after destroy()"
    assert not instance._controls()


async def test_module_released_from_a_blocking_host_call_after_destroy_makes_no_further_call(
    driver: WasmDriver, programs: Path, tmp_path: Path
) -> None:
    # Opening and reading a FIFO blocks inside wasmtime itself, where no gate can reach. The
    # run is reported as abandoned in that call, destroy() says so loudly instead of
    # returning, and once the host releases the call the module traps before its next one.
    workdir = tmp_path / "work"
    instance = await _host_workdir_sandbox(driver, programs, workdir, "t-fifo")
    shutil.copy(programs / "fifo_write.wat", workdir / "fifo_write.wat")
    os.mkfifo(workdir / "fifo")
    result = await instance.exec(_req("/work/fifo_write.wat", timeout_ms=300))
    assert result.timed_out is True, result
    assert result.reason is not None and "host call path_open" in result.reason, result
    assert instance.abandoned_runs == 1
    with pytest.raises(BackendError, match="still inside an uninterruptible wasmtime call"):
        await instance.destroy()
    # Release the module: open the FIFO's write end (its open returns) and write a byte.
    writer = os.open(workdir / "fifo", os.O_WRONLY)
    try:
        os.write(writer, b"x")
    finally:
        os.close(writer)
    await _until(lambda: not instance._controls())
    assert not (workdir / "after-fifo.txt").exists(), "the module wrote to the host after its run was stopped"
    await instance.destroy()  # nothing is left running: now it succeeds


def test_wasi_calls_outside_a_supervised_run_trap(driver: WasmDriver, programs: Path) -> None:
    # Fail closed: a store run without a gate (not through exec) gets no host access.
    runtime = driver.runtime
    store = wasmtime.Store(runtime.engine)
    store.set_fuel(10**6)
    store.set_epoch_deadline(10**6)
    store.set_wasi(wasmtime.WasiConfig())
    try:
        instance = runtime.instance_pre((programs / "hello.wat").read_bytes()).instantiate(store)
        with pytest.raises((wasmtime.Trap, wasmtime.WasmtimeError), match="outside a supervised run"):
            instance.exports(store)["_start"](store)
    finally:
        store.close()


async def test_module_importing_a_wasi_function_kavach_does_not_gate_is_refused(
    driver: WasmDriver, tmp_path: Path
) -> None:
    (tmp_path / "odd.wat").write_text(
        '(module (import "wasi_snapshot_preview1" "fd_frobnicate" (func)) (func (export "_start")))'
    )
    instance = await driver.start(LaunchSpec("t-ungated", _policy(ro=(Bind(str(tmp_path), "/m"),))))
    try:
        with pytest.raises(
            ExecError, match=r"odd\.wat: imports WASI functions kavach does not supervise: fd_frobnicate"
        ):
            await instance.exec(_req("/m/odd.wat"))
    finally:
        await instance.destroy()


async def test_kill_reaches_a_module_sleeping_in_poll_oneoff(
    driver: WasmDriver, programs: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "work"
    instance = await _host_workdir_sandbox(driver, programs, workdir, "t-kill-sleep")
    try:
        process = await instance.spawn(_req("/work/sleep_write.wat", "30000", timeout_ms=60_000))
        await _until(lambda: bool(instance._controls()))
        await asyncio.sleep(0.1)
        await process.kill(9)
        result = await asyncio.wait_for(process.wait(), 10)  # not at the 60 s wall clock
        assert (result.exit_code, result.reason) == (137, "killed (signal 9)")
        assert not (workdir / "after-sleep.txt").exists()
        assert instance.abandoned_runs == 0
    finally:
        await instance.destroy()


async def test_pause_reaches_a_module_sleeping_in_poll_oneoff(
    driver: WasmDriver, programs: Path, tmp_path: Path
) -> None:
    # The sleep ends while the sandbox is paused: the straight-line host calls after it must
    # wait for resume instead of running while the sandbox claims to be paused.
    workdir = tmp_path / "work"
    instance = await _host_workdir_sandbox(driver, programs, workdir, "t-pause-sleep")
    try:
        process = await instance.spawn(_req("/work/sleep_write.wat", "200", timeout_ms=60_000))
        await instance.pause()
        await asyncio.sleep(1.0)
        assert not (workdir / "after-sleep.txt").exists(), "a paused module wrote to the host"
        await instance.resume()
        result = await asyncio.wait_for(process.wait(), 10)
        assert result.exit_code == 0, result
        assert (workdir / "after-sleep.txt").read_text() == "written after sleep\n"
    finally:
        await instance.destroy()


async def test_memory_grower_stopped_at_limit(driver: WasmDriver, programs: Path) -> None:
    resources = replace(SandboxPolicy.basic().resources, memory=16 * MiB)
    instance = await driver.start(LaunchSpec("t-mem", _policy(ro=(Bind(str(programs), "/prog"),), resources=resources)))
    try:
        result = await instance.exec(_req("/prog/tool.wasm", "grow"))
        assert result.exit_code == 0, result
        allocated = int(result.stdout.decode().strip().split("=")[1])
        assert 0 < allocated < 16
    finally:
        await instance.destroy()


async def test_memory_grow_instruction_fails_at_limit(driver: WasmDriver, programs: Path) -> None:
    resources = replace(SandboxPolicy.basic().resources, memory=2 * MiB)  # 32 pages of 64 KiB
    instance = await driver.start(
        LaunchSpec("t-grow", _policy(ro=(Bind(str(programs), "/prog"),), resources=resources))
    )
    try:
        result = await instance.exec(_req("/prog/grow.wat"))
        assert result.exit_code == 31  # 1 initial page + 31 grown = the 2 MiB limit
    finally:
        await instance.destroy()


async def test_module_larger_than_the_limit_fails_to_instantiate(driver: WasmDriver, programs: Path) -> None:
    resources = replace(SandboxPolicy.basic().resources, memory=64 * 1024)  # one page; tool needs more
    instance = await driver.start(
        LaunchSpec("t-tiny", _policy(ro=(Bind(str(programs), "/prog"),), resources=resources))
    )
    try:
        result = await instance.exec(_req("/prog/tool.wasm", "hello"))
        assert result.exit_code == wasm_driver.TRAP_EXIT_CODE
        assert result.reason is not None and result.reason.startswith("instantiation failed")
    finally:
        await instance.destroy()


# -- spawn, pause, kill, stop ----------------------------------------------------------------------


async def test_spawn_streams_output_and_wait_returns_the_rest(sandbox: WasmInstance) -> None:
    process = await sandbox.spawn(_req("/prog/tool.wasm", "hello", "streamed"))
    seen = b""
    async for stream, data in process.chunks():
        assert stream == "stdout"
        seen += data
    result = await process.wait()
    assert b"arg2=streamed\n" in seen
    assert result.exit_code == 0
    assert result.stdout == b""  # everything was already streamed


async def test_pause_blocks_the_module_and_resume_continues(sandbox: WasmInstance) -> None:
    process = await sandbox.spawn(_req("/prog/tool.wasm", "spin", "report", timeout_ms=60_000))
    ticks: list[bytes] = []

    async def collect() -> None:
        async for _stream, data in process.chunks():
            ticks.append(data)

    collector = asyncio.create_task(collect())
    await _until(lambda: bool(ticks))
    await sandbox.pause()
    await asyncio.sleep(0.1)  # the module reaches its next epoch check within one tick
    frozen = len(ticks)
    await asyncio.sleep(0.4)
    assert len(ticks) == frozen, "output kept coming while paused"
    await sandbox.resume()
    await _until(lambda: len(ticks) > frozen)
    await process.kill(9)
    result = await process.wait()
    await collector
    assert result.exit_code == 137
    assert result.reason == "killed (signal 9)"


async def test_cancelling_exec_stops_the_module(sandbox: WasmInstance) -> None:
    task = asyncio.create_task(sandbox.exec(_req("/prog/loop.wat", timeout_ms=60_000)))
    await _until(lambda: bool(sandbox._controls()))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _until(lambda: not sandbox._controls())  # the module ended without waiting for 60 s


def test_a_failing_deadline_check_stops_the_module(driver: WasmDriver, programs: Path) -> None:
    from kavach.backends.wasm._runtime import DeadlineHook

    runtime = driver.runtime

    def broken() -> str | None:
        raise RuntimeError("bug in the check")

    store = wasmtime.Store(runtime.engine)
    store.set_fuel(10**15)
    hook = DeadlineHook(store, broken)
    store.set_epoch_deadline(1)
    store.set_wasi(wasmtime.WasiConfig())
    instance = runtime.instance_pre((programs / "loop.wat").read_bytes()).instantiate(store)
    runtime.ticker.acquire()
    try:
        # Fail closed: the infinite loop ends at the first tick instead of running unsupervised.
        with pytest.raises(wasmtime.WasmtimeError, match="deadline check failed: RuntimeError"):
            instance.exports(store)["_start"](store)
    finally:
        runtime.ticker.release()
        store.close()
        del hook


async def test_stop_ends_running_modules_and_refuses_new_ones(driver: WasmDriver, programs: Path) -> None:
    instance = await driver.start(LaunchSpec("t-stop", _policy(ro=(Bind(str(programs), "/prog"),))))
    process = await instance.spawn(_req("/prog/loop.wat", timeout_ms=60_000))
    await asyncio.sleep(0.05)
    await instance.stop()
    result = await process.wait()
    assert result.reason == "sandbox stopped"
    with pytest.raises(ExecError, match="stopped"):
        await instance.exec(_req("/prog/hello.wat"))
    await instance.destroy()
    await instance.destroy()  # idempotent


# -- enforcement and score ------------------------------------------------------------------------


async def test_basic_policy_scores_75(driver: WasmDriver) -> None:
    instance = await driver.start(LaunchSpec("t-score", SandboxPolicy.basic()))
    try:
        enforcement = instance.enforcement()
        assert enforcement.controls == {Control.NETWORK_ISOLATED, Control.READ_ONLY_ROOT, Control.RESOURCE_LIMITS}
        assert not enforcement.has(Control.SECCOMP) and not enforcement.has(Control.LANDLOCK)
        assert int(score(enforcement)) == 65 + 5 + 3 + 2
    finally:
        await instance.destroy()


async def test_enforcement_is_verified_from_inside_a_store(driver: WasmDriver, programs: Path) -> None:
    instance = await driver.start(LaunchSpec("t-verify", _policy(ro=(Bind(str(programs), "/prog"),))))
    try:
        enforcement = instance.enforcement()
        assert enforcement.verified is True
        checks = enforcement.details["verified_checks"]
        assert any(check.startswith("memory.grow beyond") for check in checks)
        assert "read-only preopens refuse file creation" in checks
        assert "no descriptors beyond stdio and the preopens (no sockets)" in checks
    finally:
        await instance.destroy()


def test_self_check_detects_a_writable_preopen_claimed_read_only(driver: WasmDriver, tmp_path: Path) -> None:
    from kavach.backends.wasm._runtime import VerificationError, verify_from_inside

    def misconfigured(store: object, wasi: wasmtime.WasiConfig) -> None:
        wasi.preopen_dir(str(tmp_path), "/data", True)  # writable, while the claim says read-only

    with pytest.raises(VerificationError, match="created a file in read-only preopen"):
        verify_from_inside(driver.runtime, misconfigured, [(str(tmp_path), False)], None)
    assert list(tmp_path.iterdir()) == []  # the probe's file was removed


def test_self_check_detects_a_missing_memory_limit(driver: WasmDriver) -> None:
    from kavach.backends.wasm._runtime import VerificationError, verify_from_inside

    def no_limits(store: object, wasi: object) -> None:
        return None

    with pytest.raises(VerificationError, match=r"memory\.grow beyond"):
        verify_from_inside(driver.runtime, no_limits, [], 1024 * 1024)


async def test_minimal_policy_scores_network_only(driver: WasmDriver) -> None:
    instance = await driver.start(LaunchSpec("t-min", SandboxPolicy.minimal()))
    try:
        # Writable workdir (no read-only root asked), no memory/fuel limits: only "no network" counts.
        assert instance.enforcement().controls == {Control.NETWORK_ISOLATED}
        assert int(score(instance.enforcement())) == 70
    finally:
        await instance.destroy()


async def test_writable_preopen_with_read_only_root_fails_closed(driver: WasmDriver, tmp_path: Path) -> None:
    policy = _policy(rw=(Bind(str(tmp_path), "/out"),))
    with pytest.raises(SandboxCreateError, match="read_only_root"):
        await driver.start(LaunchSpec("t-closed", policy))
    degraded = await driver.start(LaunchSpec("t-degraded", replace(policy, allow_degraded=True)))
    try:
        enforcement = degraded.enforcement()
        assert Control.READ_ONLY_ROOT not in enforcement.controls
        assert any("read_only_root" in item for item in enforcement.degraded)
        assert int(score(enforcement)) == 65 + 5 + 2
    finally:
        await degraded.destroy()


async def test_file_size_with_writable_preopen_fails_closed(driver: WasmDriver, tmp_path: Path) -> None:
    policy = replace(SandboxPolicy.basic(), filesystem=replace(SandboxPolicy.basic().filesystem, read_only_root=False))
    assert policy.resources.file_size is not None
    with pytest.raises(SandboxCreateError, match="file_size"):
        await driver.start(LaunchSpec("t-fsize", policy, workdir_host=str(tmp_path)))


async def test_memory_without_fuel_is_not_claimed_as_resource_limits(driver: WasmDriver) -> None:
    policy = _policy(resources=ResourceLimits(memory=64 * MiB, cpu_time_s=None))
    with pytest.raises(SandboxCreateError, match="resource_limits"):
        await driver.start(LaunchSpec("t-nofuel", policy))


async def test_proxy_listener_cannot_be_provided(driver: WasmDriver) -> None:
    policy = replace(SandboxPolicy.basic(), network=NetworkPolicy(mode=NetworkMode.PROXY))
    with pytest.raises(SandboxCreateError, match="have no network"):
        await driver.start(LaunchSpec("t-proxy", policy, proxy_listen=("127.0.0.1", 3128)))


async def test_inner_backend_is_refused(driver: WasmDriver) -> None:
    with pytest.raises(SandboxCreateError, match="inner backend"):
        await driver.start(LaunchSpec("t-inner", SandboxPolicy.basic(), inner_backend=Backend.PROCESS))


async def test_file_bind_is_refused(driver: WasmDriver, programs: Path) -> None:
    policy = _policy(ro=(Bind(str(programs / "data.txt"), "/data.txt"),))
    with pytest.raises(SandboxCreateError, match="directories"):
        await driver.start(LaunchSpec("t-filebind", policy))
