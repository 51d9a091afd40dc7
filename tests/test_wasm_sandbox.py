"""The WASM backend end to end through ``kavach.Sandbox``: score, exec, gate, timeouts, lifecycle."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("wasmtime", reason="wasmtime not installed (pip install kavach[wasm])")

from kavach.backends.names import Backend
from kavach.backends.wasm import WasmDriver
from kavach.config import SandboxConfig
from kavach.errors import ExternalizationBlocked
from kavach.lifecycle import Sandbox, SandboxState
from kavach.policy import Bind, SandboxPolicy
from kavach.scanning.findings import Verdict

PROGRAMS = Path(__file__).parent / "wasm_programs"
AWS_ID = "AKIA" + "QWERTYUIOPASDFGH"


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("wasm-sandbox-programs")
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang not installed (needs clang, lld, wasi-libc, libclang-rt-14-dev-wasm32)")
    proc = subprocess.run(
        [clang, "--target=wasm32-wasi", "-O2", "-o", str(directory / "tool.wasm"), str(PROGRAMS / "tool.c")],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"clang --target=wasm32-wasi cannot build here: {proc.stderr.strip()[:300]}")
    for wat in PROGRAMS.glob("*.wat"):
        shutil.copy(wat, directory / wat.name)
    return directory


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> WasmDriver:
    return WasmDriver(cache_dir=tmp_path_factory.mktemp("wasm-sandbox-cache"))


def _config(programs: Path) -> SandboxConfig:
    policy = SandboxPolicy.basic()
    policy = replace(policy, filesystem=replace(policy.filesystem, ro_binds=(Bind(str(programs), "/prog"),)))
    return SandboxConfig(backend=Backend.WASM, policy=policy)


@pytest.fixture
async def sandbox(programs: Path, driver: WasmDriver) -> AsyncIterator[Sandbox]:
    async with await Sandbox.create(_config(programs), driver=driver) as box:
        yield box


async def test_registry_driver_runs_a_module_and_scores_75(
    programs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAVACH_CACHE_DIR", str(tmp_path / "cache"))
    async with await Sandbox.create(_config(programs)) as box:
        assert box.backend is Backend.WASM
        assert int(box.score) == 75 and box.score.label == "hardened"
        result = await box.exec("/prog/tool.wasm hello 'from sandbox'")
        assert result.ok
        assert "arg2=from sandbox" in result.stdout_text


async def test_list_command_and_exit_code(sandbox: Sandbox) -> None:
    result = await sandbox.exec(["/prog/tool.wasm", "exit", "9"])
    assert result.exit_code == 9
    assert result.verdict is Verdict.PASS


async def test_gate_redacts_a_secret_printed_by_the_module(sandbox: Sandbox) -> None:
    result = await sandbox.exec(["/prog/tool.wasm", "print", "contact alice@corp.example.com today"])
    assert result.verdict is Verdict.WARN
    assert result.stdout == b"contact [REDACTED:email] today\n"
    quarantined = await sandbox.exec(["/prog/tool.wasm", "print", 'password = "Tr0ub4dor&3x"'])
    assert quarantined.verdict is Verdict.QUARANTINE
    assert b"Tr0ub4dor" not in quarantined.stdout and b"[REDACTED:password]" in quarantined.stdout


async def test_gate_blocks_a_cloud_key_printed_by_the_module(sandbox: Sandbox) -> None:
    with pytest.raises(ExternalizationBlocked):
        await sandbox.exec(["/prog/tool.wasm", "print", f"AWS_ACCESS_KEY_ID={AWS_ID}"])


async def test_spawn_streams_gated_output(sandbox: Sandbox) -> None:
    handle = await sandbox.spawn(["/prog/tool.wasm", "print", "contact alice@corp.example.com today"])
    streamed = b""
    async for _stream, chunk in handle.stream():
        streamed += chunk
    result = await handle.wait()
    assert result.exit_code == 0
    assert b"alice@corp.example.com" not in streamed + result.stdout
    assert b"[REDACTED:email]" in streamed + result.stdout


async def test_timeout_is_a_result_not_an_exception(sandbox: Sandbox) -> None:
    result = await sandbox.exec("/prog/loop.wat", timeout_ms=200)
    assert result.timed_out is True
    assert result.reason == "wall-clock timeout"
    assert not result.ok


async def test_pause_resume_destroy_through_the_state_machine(programs: Path, driver: WasmDriver) -> None:
    box = await Sandbox.create(_config(programs), driver=driver)
    await box.pause()
    assert box.state is SandboxState.PAUSED
    await box.resume()
    result = await box.exec("/prog/hello.wat")
    assert result.exit_code == 7 and result.stdout == b"hello from wat\n"
    await box.destroy()
    assert box.state is SandboxState.DESTROYED
