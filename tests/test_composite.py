"""Composite sandboxes: an OCI container whose processes also get kavach's inner layer.

The inner layer (the policy's own seccomp program, compiled by the Process backend's
compiler, plus a Landlock domain) is applied by kavach's launcher inside the container.
It must really run: the tests look from inside for two stacked seccomp filters and for
Landlock denying what the rules do not grant, and they check the launcher on its own too.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

import kavach
from kavach.backends.base import ExecRequest, LaunchSpec
from kavach.backends.names import Backend
from kavach.backends.oci import OciDriver, OciInstance
from kavach.backends.oci.driver import landlock_plan
from kavach.backends.oci.launcher import Layer, render_plan
from kavach.backends.oci.runtime import probe_runc
from kavach.backends.process.seccomp import compile_filter
from kavach.errors import SandboxCreateError
from kavach.policy import (
    Access,
    LandlockPolicy,
    LandlockRule,
    SandboxPolicy,
    SeccompPolicy,
    SeccompProfile,
)
from kavach.scoring import Control, score, score_backend

LAUNCHER = Path(kavach.__file__).parent / "backends" / "oci" / "launcher.py"
PATH_ENV = {"PATH": "/usr/bin:/bin"}

requires_runc = pytest.mark.skipif(
    os.geteuid() != 0 or not probe_runc().usable, reason=f"needs root and a usable runc ({probe_runc().reason})"
)


async def _composite(policy: SandboxPolicy, name: str) -> OciInstance:
    spec = LaunchSpec(f"t-comp-{name}-{os.getpid()}", policy, inner_backend=Backend.PROCESS)
    instance = await OciDriver().start(spec)
    assert isinstance(instance, OciInstance)
    return instance


@requires_runc
async def test_strict_composite_stacks_two_filters_and_landlock() -> None:
    policy = SandboxPolicy.strict()
    instance = await _composite(policy, "strict")
    try:
        enforcement = instance.enforcement()
        inner = enforcement.inner
        assert inner is not None and inner.backend is Backend.PROCESS and inner.verified
        assert inner.controls == {Control.SECCOMP, Control.LANDLOCK}
        assert enforcement.details["launcher"]["layers"] == ["oci", "inner-process"]
        # max(outer 55+18, inner 50+8) + 5, as the predicted score says
        assert int(score(enforcement)) == 78 == int(score_backend(Backend.OCI, policy, inner=Backend.PROCESS))
        result = await instance.exec(
            ExecRequest(argv=("/bin/sh", "-c", "grep -E '^Seccomp' /proc/self/status; ls / 2>&1"), env=PATH_ENV)
        )
        assert b"Seccomp:\t2\nSeccomp_filters:\t2\n" in result.stdout
        assert b"Permission denied" in result.stdout  # Landlock: "/" is not in the rules
    finally:
        await instance.destroy()


@requires_runc
async def test_composite_without_landlock_still_stacks_seccomp() -> None:
    instance = await _composite(SandboxPolicy.basic(), "basic")
    try:
        enforcement = instance.enforcement()
        assert enforcement.inner is not None and enforcement.inner.controls == {Control.SECCOMP}
        assert int(score(enforcement)) == 70 + 5
        result = await instance.exec(ExecRequest(argv=("grep", "Seccomp_filters", "/proc/self/status"), env=PATH_ENV))
        assert result.stdout == b"Seccomp_filters:\t2\n"
    finally:
        await instance.destroy()


@requires_runc
async def test_inner_layer_with_nothing_to_apply_is_refused() -> None:
    policy = replace(SandboxPolicy.basic(), seccomp=SeccompPolicy(profile=SeccompProfile.NONE))
    with pytest.raises(SandboxCreateError, match="nothing to apply"):
        await _composite(policy, "empty")
    assert not [p for p in os.listdir("/run/kavach/bundles") if p.startswith("kavach-t-comp-empty")]


async def test_only_the_process_layer_can_run_inside_oci() -> None:
    spec = LaunchSpec("t-comp-wasm", SandboxPolicy.basic(), inner_backend=Backend.WASM)
    with pytest.raises(SandboxCreateError, match="only kavach's process layer"):
        await OciDriver().start(spec)


@requires_runc
async def test_composite_through_the_public_api() -> None:
    config = kavach.SandboxConfig(backend=Backend.OCI, inner_backend=Backend.PROCESS, policy=SandboxPolicy.strict())
    async with await kavach.Sandbox.create(config) as sandbox:
        assert int(sandbox.score) == 78
        result = await sandbox.exec("grep Seccomp_filters /proc/self/status")
        assert result.stdout == b"Seccomp_filters:\t2\n"


# -- the launcher on its own (host side, no container): does each layer really restrict? ------------


def _launch(tmp_path: Path, layers: list[Layer], *argv: str) -> subprocess.CompletedProcess[str]:
    plan_file = tmp_path / "plan"
    plan_file.write_text(render_plan(layers))
    return subprocess.run(
        ["/usr/bin/python3", "-I", "-S", str(LAUNCHER), "exec", str(plan_file), "--announce", "--", *argv],
        capture_output=True,
        text=True,
        check=False,
        env=PATH_ENV,
    )


def test_launcher_seccomp_program_refuses_what_the_policy_denies(tmp_path: Path) -> None:
    program = compile_filter(SeccompPolicy(profile=SeccompProfile.BASIC, deny=("chmod", "fchmodat")))
    (tmp_path / "inner.bpf").write_bytes(program)
    (tmp_path / "file").write_text("x")
    plan = [Layer("inner", seccomp_bpf=str(tmp_path / "inner.bpf"))]
    done = _launch(tmp_path, plan, "/bin/sh", "-c", f"grep Seccomp: /proc/self/status; chmod 600 {tmp_path}/file")
    assert "Seccomp:\t2" in done.stdout
    assert done.returncode != 0 and "Operation not permitted" in done.stderr
    assert "seccomp_loaded=1" in done.stderr


def test_launcher_landlock_denies_outside_the_rules(tmp_path: Path) -> None:
    (tmp_path / "allowed").write_text("visible")
    rx = frozenset({Access.READ, Access.EXECUTE})
    rules = (
        *(LandlockRule(p, rx) for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if os.path.exists(p)),
        LandlockRule(str(tmp_path / "allowed"), frozenset({Access.READ})),
    )
    plan = [Layer("oci", landlock_plan(SandboxPolicy(landlock=LandlockPolicy(True, rules))))]
    done = _launch(tmp_path, plan, "/bin/sh", "-c", f"cat {tmp_path}/allowed; echo; ls {tmp_path} || echo denied")
    assert done.stdout.startswith("visible\n") and "denied" in done.stdout, done.stderr
    assert "landlock_domains=1" in done.stderr


def test_launcher_fails_closed_on_a_missing_rule_path(tmp_path: Path) -> None:
    rules = (LandlockRule("/nonexistent-kavach-path", frozenset({Access.READ})),)
    plan = [Layer("oci", landlock_plan(SandboxPolicy(landlock=LandlockPolicy(True, rules))))]
    done = _launch(tmp_path, plan, "/bin/echo", "ran")
    assert done.returncode == 126 and "ran" not in done.stdout
    assert "nonexistent-kavach-path" in done.stderr


def test_launcher_imports_only_the_standard_library() -> None:
    done = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c", f"import runpy; runpy.run_path({str(LAUNCHER)!r}, run_name='__main__')"],
        capture_output=True,
        text=True,
        check=False,
    )
    # Without a mode it prints its usage and exits 2: it loaded with Debian's bare python3.
    assert done.returncode == 2 and "usage" in done.stderr and "ModuleNotFoundError" not in done.stderr


def test_plan_round_trips_and_rejects_garbage() -> None:
    from kavach.backends.oci.launcher import LandlockLayer, parse_plan

    layers = [
        Layer("oci", LandlockLayer(7, 0xFFFF, 0, 3, 0xC007, [("/usr", 13), ("/path with spaces", 4)])),
        Layer("inner-process", None, "/dev/.kavach/inner.bpf"),
    ]
    parsed = parse_plan(render_plan(layers))
    assert [layer.name for layer in parsed] == ["oci", "inner-process"]
    assert parsed[0].landlock is not None and parsed[0].landlock.rules == [("/usr", 13), ("/path with spaces", 4)]
    assert (parsed[0].landlock.min_abi, parsed[0].landlock.scoped, parsed[0].landlock.file_access_mask) == (
        7,
        3,
        0xC007,
    )
    assert parsed[1].seccomp_bpf == "/dev/.kavach/inner.bpf" and parsed[1].landlock is None
    with pytest.raises(ValueError, match="plan line 1"):
        parse_plan("rule 4 /etc\n")  # a rule outside a Landlock layer
    with pytest.raises(ValueError, match="line break"):
        render_plan([Layer("x", LandlockLayer(1, 1, 0, 0, 1, [("/a\nlayer evil", 1)]))])
