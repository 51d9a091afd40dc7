"""gVisor (runsc) backend: probe, refusals and the exact runsc command lines.

runsc is not installable on this machine, so nothing here starts a gVisor sandbox: the probe
must say it is unavailable, the runsc argv and the bundle are checked as data, and the test
that would really run gVisor is skipped with that reason. No fake runsc is ever used.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import replace

import pytest

from kavach.backends.base import ExecRequest, LaunchSpec
from kavach.backends.names import Backend
from kavach.backends.oci import GVisorDriver, OciDriver, OciInstance
from kavach.backends.oci.driver import runsc_flags
from kavach.backends.oci.runtime import RuntimeInfo, RuntimeName
from kavach.errors import SandboxCreateError
from kavach.policy import NetworkMode, NetworkPolicy, SandboxPolicy
from kavach.scoring import score_backend

RUNSC = shutil.which("runsc")
no_runsc = pytest.mark.skipif(RUNSC is not None, reason="runsc is installed here; the absence checks do not apply")


@no_runsc
def test_probe_says_runsc_is_missing() -> None:
    result = GVisorDriver().probe()
    assert result.backend is Backend.GVISOR and not result.available
    assert "runsc not found" in result.reason


@no_runsc
def test_start_fails_closed_with_the_probe_reason() -> None:
    with pytest.raises(SandboxCreateError, match="runsc not found"):
        asyncio.run(GVisorDriver().start(LaunchSpec("t-gv-missing", SandboxPolicy.basic())))


def test_runsc_flags_follow_the_policy() -> None:
    assert runsc_flags("systrap", rootless=False, network=NetworkMode.OFF) == (
        "--platform=systrap",
        "--oci-seccomp",
        "--network=none",
    )
    assert runsc_flags("kvm", rootless=True, network=NetworkMode.HOST) == (
        "--platform=kvm",
        "--oci-seccomp",
        "--rootless",
        "--network=host",
    )


def test_unknown_platform_is_refused() -> None:
    with pytest.raises(SandboxCreateError, match="platform"):
        GVisorDriver(platform="hyperdrive")


def _instance(driver: OciDriver, policy: SandboxPolicy) -> OciInstance:
    # Built, never started: only its command lines are inspected.
    info = RuntimeInfo(RuntimeName.RUNSC, "/opt/gvisor/runsc", "runsc version release-test", True, "argv test")
    return OciInstance(driver, LaunchSpec("t-gv-argv", policy), info)


def test_runsc_argv_puts_global_flags_before_the_subcommand() -> None:
    instance = _instance(GVisorDriver(), SandboxPolicy.basic())
    argv = instance._runtime_argv("exec", "--process", "/b/exec-1.json", instance.container_id)
    root_flag = ["--root", os.path.join("/run/kavach", "runsc")]
    assert argv[:3] == ["/opt/gvisor/runsc", *root_flag]
    expected_flags = list(runsc_flags("systrap", rootless=os.geteuid() != 0, network=NetworkMode.OFF))
    assert argv[3 : 3 + len(expected_flags)] == expected_flags
    assert argv[3 + len(expected_flags) :] == ["exec", "--process", "/b/exec-1.json", "kavach-t-gv-argv"]


def test_runc_gets_no_gvisor_flags() -> None:
    instance = _instance(OciDriver(), SandboxPolicy.basic())
    assert instance._runtime_argv("state", "x")[3:] == ["state", "x"]


def test_gvisor_refuses_what_the_sentry_cannot_enforce() -> None:
    driver = GVisorDriver()
    with pytest.raises(SandboxCreateError, match="Landlock"):
        driver._check_policy(LaunchSpec("t", SandboxPolicy.strict()))
    proxy = replace(SandboxPolicy.basic(), network=NetworkPolicy(mode=NetworkMode.PROXY))
    with pytest.raises(SandboxCreateError, match="egress proxy"):
        driver._check_policy(LaunchSpec("t", proxy))
    with pytest.raises(SandboxCreateError, match="composite"):
        driver._check_policy(LaunchSpec("t", SandboxPolicy.basic(), inner_backend=Backend.PROCESS))
    driver._check_policy(LaunchSpec("t", replace(SandboxPolicy.strict(), allow_degraded=True)))


def test_predicted_gvisor_score() -> None:
    assert int(score_backend(Backend.GVISOR, SandboxPolicy.basic())) == 70 + 5 + 5 + 3 + 2


@pytest.mark.skipif(RUNSC is None, reason="runsc (gVisor) is not installed on this machine; not packaged by Debian 12")
async def test_real_gvisor_sandbox_runs_a_command() -> None:
    instance = await GVisorDriver().start(LaunchSpec(f"t-gv-real-{os.getpid()}", SandboxPolicy.basic()))
    try:
        result = await instance.exec(ExecRequest(argv=("/bin/sh", "-c", "echo hi; uname -r"), env={"PATH": "/bin"}))
        assert result.stdout.startswith(b"hi\n")
    finally:
        await instance.destroy()
