"""The compiled-module cache: reuse across processes, tamper rejection, safe concurrent writers.

Real wasmtime compiles and deserializes real modules here; the files are the real cache
files, tampered with the way an attacker or a torn write would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

wasmtime = pytest.importorskip("wasmtime", reason="wasmtime not installed (pip install kavach[wasm])")

from kavach.backends.wasm._hostcalls import supervised  # noqa: E402
from kavach.backends.wasm._runtime import Runtime  # noqa: E402
from kavach.backends.wasm.cache import MAGIC, ModuleCache, default_cache_dir  # noqa: E402

PROGRAMS = Path(__file__).parent / "wasm_programs"
HELLO = (PROGRAMS / "hello.wat").read_bytes()
LOOP = (PROGRAMS / "loop.wat").read_bytes()


class _Unlimited:
    """A run gate that never pauses or stops (these tests are about the cache)."""

    host_call: str | None = None

    def wait_until(self, when: float | None) -> str | None:
        return None


def _run_hello(runtime: Runtime) -> int:
    """Instantiate the cached hello module in a fresh store; return its exit code."""
    pre = runtime.instance_pre(HELLO)
    store = wasmtime.Store(runtime.engine)
    store.set_fuel(10_000_000)
    store.set_epoch_deadline(1_000_000)
    wasi = wasmtime.WasiConfig()
    out: list[bytes] = []
    wasi.stdout_custom = out.append
    store.set_wasi(wasi)
    instance = pre.instantiate(store)
    try:
        with supervised(_Unlimited()):  # WASI calls trap outside a supervised run
            instance.exports(store)["_start"](store)
    except wasmtime.ExitTrap as exc:
        assert b"".join(out) == b"hello from wat\n"
        return exc.code
    return 0


def test_default_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KAVACH_CACHE_DIR", str(tmp_path / "k"))
    assert default_cache_dir() == tmp_path / "k" / "wasm"
    monkeypatch.delenv("KAVACH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "kavach" / "wasm"


def test_second_runtime_loads_the_artifact_without_compiling(tmp_path: Path) -> None:
    first = Runtime(tmp_path)
    assert _run_hello(first) == 7
    assert first.cache.stats.compiles == 1
    path = first.cache.path_for(HELLO)
    assert path is not None and path.read_bytes().startswith(MAGIC)
    assert (path.stat().st_mode & 0o777) == 0o600

    second = Runtime(tmp_path)  # a new engine, as in a new process
    assert _run_hello(second) == 7
    assert second.cache.stats.disk_hits == 1
    assert second.cache.stats.compiles == 0


def test_components_are_cached_too(tmp_path: Path) -> None:
    component = (PROGRAMS / "hello_p2.wat").read_bytes()
    first = Runtime(tmp_path)
    assert first.program(component).component is not None
    second = Runtime(tmp_path)
    program = second.program(component)
    assert program.component is not None and program.run_export == "wasi:cli/run@0.2.0"
    assert second.cache.stats.disk_hits == 1 and second.cache.stats.compiles == 0


def test_tampered_artifact_is_rejected_and_recompiled(tmp_path: Path) -> None:
    Runtime(tmp_path).cache.get(HELLO)
    path = Runtime(tmp_path).cache.path_for(HELLO)
    assert path is not None
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0xFF  # one flipped bit in the native code section
    path.write_bytes(bytes(blob))

    runtime = Runtime(tmp_path)
    assert _run_hello(runtime) == 7
    assert runtime.cache.stats.rejected == 1
    assert runtime.cache.stats.compiles == 1
    # The rejected file was replaced by a good one.
    fresh = Runtime(tmp_path)
    fresh.cache.get(HELLO)
    assert fresh.cache.stats.disk_hits == 1
    assert fresh.cache.stats.rejected == 0


@pytest.mark.parametrize("damage", ["truncated", "no_magic", "empty"])
def test_damaged_artifacts_are_rejected(tmp_path: Path, damage: str) -> None:
    Runtime(tmp_path).cache.get(HELLO)
    path = Runtime(tmp_path).cache.path_for(HELLO)
    assert path is not None
    blob = path.read_bytes()
    damaged = {"truncated": blob[: len(blob) // 2], "no_magic": b"XXXXXXXX" + blob[8:], "empty": b""}[damage]
    path.write_bytes(damaged)
    runtime = Runtime(tmp_path)
    assert _run_hello(runtime) == 7
    assert runtime.cache.stats.rejected == 1


def test_artifact_of_another_module_under_this_name_is_rejected(tmp_path: Path) -> None:
    runtime = Runtime(tmp_path)
    runtime.cache.get(LOOP)
    loop_path, hello_path = runtime.cache.path_for(LOOP), runtime.cache.path_for(HELLO)
    assert loop_path is not None and hello_path is not None
    # A valid, authenticated artifact, but of the loop module, placed under hello's name.
    hello_path.write_bytes(loop_path.read_bytes())
    fresh = Runtime(tmp_path)
    assert _run_hello(fresh) == 7  # not the infinite loop
    assert fresh.cache.stats.rejected == 1


def test_artifact_signed_with_another_key_is_rejected(tmp_path: Path) -> None:
    other = tmp_path / "other"
    Runtime(other).cache.get(HELLO)
    mine = tmp_path / "mine"
    runtime = Runtime(mine)
    source_path, target_path = Runtime(other).cache.path_for(HELLO), runtime.cache.path_for(HELLO)
    assert source_path is not None and target_path is not None
    target_path.write_bytes(source_path.read_bytes())
    assert _run_hello(runtime) == 7
    assert runtime.cache.stats.rejected == 1


def test_other_engine_configuration_uses_another_file(tmp_path: Path) -> None:
    runtime = Runtime(tmp_path)
    other: ModuleCache[wasmtime.Module] = ModuleCache(
        runtime.fingerprint + ";other",
        compile=lambda source: wasmtime.Module(runtime.engine, bytes(wasmtime.wat2wasm(source.decode()))),
        serialize=lambda module: bytes(module.serialize()),
        deserialize=lambda data: wasmtime.Module.deserialize(runtime.engine, data),
        directory=tmp_path,
    )
    assert other.path_for(HELLO) != runtime.cache.path_for(HELLO)


def test_cache_dir_writable_by_others_is_not_trusted(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o777)
    runtime = Runtime(directory)
    assert runtime.cache.directory is None
    assert runtime.cache.disabled_reason is not None and "writable by group or others" in runtime.cache.disabled_reason
    assert _run_hello(runtime) == 7  # still works, from memory only
    assert not any(directory.iterdir())


_WORKER = """
import sys, time
from pathlib import Path
from kavach.backends.wasm._runtime import Runtime
directory, module, start_at = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, start_at - time.time()))
runtime = Runtime(directory)
runtime.cache.get(module.read_bytes())
stats = runtime.cache.stats
print(stats.compiles, stats.disk_hits, stats.rejected, stats.write_errors)
"""


def test_concurrent_processes_leave_one_valid_artifact(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"  # does not exist yet: the key file is raced for too
    start_at = time.time() + 1.0
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(cache_dir), str(PROGRAMS / "hello.wat"), str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
        )
        for _ in range(4)
    ]
    outputs = [worker.communicate(timeout=60) for worker in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
        compiles, disk_hits, rejected, write_errors = map(int, out.split())
        assert compiles + disk_hits == 1
        assert rejected == 0 and write_errors == 0
    names = sorted(p.name for p in cache_dir.iterdir())
    assert names[0] == ".hmac-key"
    assert len(names) == 2 and names[1].endswith(".cwasm")  # no temporary files left behind
    runtime = Runtime(cache_dir)
    assert _run_hello(runtime) == 7
    assert runtime.cache.stats.disk_hits == 1
    assert runtime.cache.stats.rejected == 0
