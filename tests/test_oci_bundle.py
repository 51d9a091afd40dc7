"""The OCI bundle, seccomp translation and runtime probe as pure functions (no container runs).

config.json is checked field by field against the runtime specification (config.md and
config-linux.md of opencontainers/runtime-spec): names, types and the values kavach promises.
"""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kavach.backends.oci.bundle import (
    MASKED_PATHS,
    READONLY_PATHS,
    BundleInputs,
    IdMap,
    build_config,
    build_process,
    ro_bind,
)
from kavach.backends.oci.runtime import (
    CgroupMode,
    RuntimeName,
    cgroup_mode,
    crun_refusal,
    parse_version,
    probe_crun,
    probe_runsc,
)
from kavach.backends.oci.seccomp_oci import native_architecture, policy_to_oci, to_oci
from kavach.backends.seccomp_profiles import TIOCLINUX, TIOCSTI, build_spec
from kavach.policy import (
    NetworkMode,
    NetworkPolicy,
    ResourceLimits,
    SandboxPolicy,
    SeccompPolicy,
    SeccompProfile,
)

MAP = (IdMap(0, 1_000_000_000, 65536),)


def _config(policy: SandboxPolicy, **overrides: object) -> dict:
    inputs = BundleInputs(rootfs="rootfs", init_args=("/init",), uid_map=MAP, gid_map=MAP, cgroups_path="/kavach/x")
    return build_config(policy, replace(inputs, **overrides))


def _mount(config: dict, destination: str) -> dict:
    found = [m for m in config["mounts"] if m["destination"] == destination]
    assert found, f"no mount at {destination}"
    return found[-1]


# -- config.json ---------------------------------------------------------------------------------


def test_config_has_the_runtime_spec_top_level_fields() -> None:
    config = _config(SandboxPolicy.basic())
    assert config["ociVersion"].startswith("1.0")
    assert set(config) >= {"ociVersion", "process", "root", "hostname", "mounts", "linux"}
    for mount in config["mounts"]:
        assert set(mount) == {"destination", "type", "source", "options"}
        assert mount["destination"].startswith("/")
        assert all(isinstance(o, str) for o in mount["options"])


def test_process_has_no_capabilities_and_no_new_privileges() -> None:
    process = _config(SandboxPolicy.basic())["process"]
    assert process["noNewPrivileges"] is True
    assert process["capabilities"] == {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
    assert process["user"]["uid"] == 0 and process["terminal"] is False


def test_rlimits_follow_the_policy_and_core_is_always_zero() -> None:
    policy = replace(
        SandboxPolicy.basic(),
        resources=ResourceLimits(cpu_time_s=7, file_size=1024, open_files=64, address_space=1 << 30),
    )
    limits = {r["type"]: (r["soft"], r["hard"]) for r in _config(policy)["process"]["rlimits"]}
    assert limits == {
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_CPU": (7, 7),
        "RLIMIT_FSIZE": (1024, 1024),
        "RLIMIT_NOFILE": (64, 64),
        "RLIMIT_AS": (1 << 30, 1 << 30),
    }


def test_exec_process_env_is_exactly_the_requested_one() -> None:
    process = build_process(SandboxPolicy.basic(), ["/bin/echo", "x"], {"A": "1"}, "/work")
    assert process["env"] == ["A=1"] and process["args"] == ["/bin/echo", "x"] and process["cwd"] == "/work"


def test_commands_are_the_oom_killers_first_choice_and_the_init_is_not() -> None:
    # runc gives execs the container-level value: an init at 1000 made every process 1000,
    # and the init (the largest) the one killed when tmpfs pages filled the memory cgroup.
    assert "oomScoreAdj" not in _config(SandboxPolicy.basic())["process"]
    assert build_process(SandboxPolicy.basic(), ["/bin/true"], {}, "/")["oomScoreAdj"] == 1000


def test_namespaces_user_mapping_and_network() -> None:
    config = _config(SandboxPolicy.basic())
    kinds = {n["type"] for n in config["linux"]["namespaces"]}
    assert kinds == {"pid", "ipc", "uts", "mount", "cgroup", "network", "user"}
    assert config["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 1_000_000_000, "size": 65536}]
    assert config["linux"]["gidMappings"] == config["linux"]["uidMappings"]
    host_net = replace(SandboxPolicy.basic(), network=NetworkPolicy(mode=NetworkMode.HOST))
    host_config = _config(host_net)
    assert "network" not in {n["type"] for n in host_config["linux"]["namespaces"]}
    # sysfs can only be mounted with our own network namespace; without it there is no /sys.
    assert all(m["destination"] != "/sys" for m in host_config["mounts"])


def test_without_id_maps_there_is_no_user_namespace() -> None:
    config = _config(SandboxPolicy.basic(), uid_map=(), gid_map=())
    assert "user" not in {n["type"] for n in config["linux"]["namespaces"]}
    assert "uidMappings" not in config["linux"]


def test_read_only_root_masked_and_readonly_paths() -> None:
    config = _config(SandboxPolicy.basic())
    assert config["root"] == {"path": "rootfs", "readonly": True}
    assert _config(SandboxPolicy.minimal())["root"]["readonly"] is False
    masked = set(config["linux"]["maskedPaths"])
    assert {"/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"} <= masked
    assert {"/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"} <= set(config["linux"]["readonlyPaths"])
    assert tuple(config["linux"]["maskedPaths"]) == MASKED_PATHS
    # The shared /proc paths, then /dev: no new files in /dev once runc has made the nodes.
    assert tuple(config["linux"]["readonlyPaths"]) == (*READONLY_PATHS, "/dev")


def test_dev_is_a_fresh_tmpfs_and_tmp_workdir_are_capped() -> None:
    policy = SandboxPolicy.basic()
    config = _config(policy)
    dev = _mount(config, "/dev")
    assert dev["type"] == "tmpfs" and "nosuid" in dev["options"]
    assert _mount(config, "/tmp")["type"] == "tmpfs"
    assert f"size={policy.filesystem.tmp_size}" in _mount(config, "/tmp")["options"]
    assert f"size={policy.filesystem.workdir_size}" in _mount(config, policy.filesystem.workdir)["options"]
    workdir_bound = _config(policy, workdir_host="/srv/data", source_overrides={"/srv/data": "/run/idm/0"})
    work = _mount(workdir_bound, policy.filesystem.workdir)
    assert work["source"] == "/run/idm/0" and "rw" in work["options"]


def test_late_mounts_come_after_tmp_so_nothing_hides_them() -> None:
    config = _config(SandboxPolicy.basic(), late_mounts=(ro_bind("/run/f/0", "/tmp/secret", noexec=True),))
    destinations = [m["destination"] for m in config["mounts"]]
    assert destinations.index("/tmp/secret") > destinations.index("/tmp")
    assert _mount(config, "/tmp/secret")["options"] == ["rbind", "ro", "nosuid", "nodev", "noexec"]


def test_resources_memory_pids_cpu_and_device_deny() -> None:
    policy = replace(SandboxPolicy.basic(), resources=ResourceLimits(memory=64 << 20, pids=32, cpus=0.5))
    resources = _config(policy)["linux"]["resources"]
    assert resources["memory"] == {"limit": 64 << 20, "swap": 64 << 20}
    assert resources["pids"] == {"limit": 32}
    assert resources["cpu"] == {"quota": 50_000, "period": 100_000}
    assert resources["devices"] == [{"allow": False, "access": "rwm"}]
    assert _config(policy)["linux"]["cgroupsPath"] == "/kavach/x"
    unlimited = _config(SandboxPolicy.minimal())["linux"]["resources"]
    assert set(unlimited) == {"devices"}


# -- seccomp translation -------------------------------------------------------------------------


def test_basic_profile_translates_rule_for_rule() -> None:
    spec = build_spec(SeccompPolicy(profile=SeccompProfile.BASIC))
    assert spec is not None
    seccomp = to_oci(spec, "x86_64")
    assert seccomp["defaultAction"] == "SCMP_ACT_ALLOW"
    assert seccomp["architectures"] == ["SCMP_ARCH_X86_64"]
    assert len(seccomp["syscalls"]) == len(spec.rules)
    denied = {n for s in seccomp["syscalls"] if s["action"] == "SCMP_ACT_ERRNO" and "args" not in s for n in s["names"]}
    assert {"mount", "unshare", "keyctl", "bpf", "ptrace", "io_uring_setup", "perf_event_open"} <= denied
    clone3 = next(s for s in seccomp["syscalls"] if "clone3" in s["names"])
    assert clone3["errnoRet"] == errno.ENOSYS


def test_basic_goes_to_the_runtime_as_an_allow_list_that_never_admits_tiocsti() -> None:
    # runc skips names its libseccomp does not know: in a deny list they would reach the
    # kernel, so basic is sent as an allow list with a refusing default.
    seccomp = policy_to_oci(SeccompPolicy(profile=SeccompProfile.BASIC), "x86_64")
    assert seccomp is not None
    assert seccomp["defaultAction"] == "SCMP_ACT_ERRNO" and seccomp["defaultErrnoRet"] == errno.EPERM
    allowed = {n for s in seccomp["syscalls"] if s["action"] == "SCMP_ACT_ALLOW" for n in s["names"]}
    assert {"read", "execve", "ioprio_get", "ioctl"} <= allowed
    assert not allowed & {"mount", "statmount", "listmount", "open_tree_attr", "keyctl", "ptrace", "clone3"}
    ioctl_rules = [s for s in seccomp["syscalls"] if s["names"] == ["ioctl"]]
    assert ioctl_rules and all(rule["action"] == "SCMP_ACT_ALLOW" for rule in ioctl_rules)
    for request in (TIOCSTI, TIOCLINUX, 0xFFFF_FFFF_0000_0000 | TIOCSTI):
        admitting = [rule for rule in ioctl_rules if all(request & a["value"] == a["valueTwo"] for a in rule["args"])]
        assert not admitting, hex(request)
    assert any(all(0x541B & a["value"] == a["valueTwo"] for a in rule["args"]) for rule in ioctl_rules)  # FIONREAD


def test_strict_profile_is_an_allow_list_with_errno_default() -> None:
    seccomp = policy_to_oci(SeccompPolicy(profile=SeccompProfile.STRICT), "x86_64")
    assert seccomp is not None
    assert seccomp["defaultAction"] == "SCMP_ACT_ERRNO" and seccomp["defaultErrnoRet"] == errno.EPERM
    allowed = {n for s in seccomp["syscalls"] if s["action"] == "SCMP_ACT_ALLOW" for n in s["names"]}
    assert {"read", "execve", "wait4"} <= allowed
    assert "mount" not in allowed and "ptrace" not in allowed
    clone = [s for s in seccomp["syscalls"] if s["names"] == ["clone"]]
    assert clone and all(s["args"][0]["op"] == "SCMP_CMP_MASKED_EQ" for s in clone)


def test_profile_none_has_no_filter_and_extra_deny_makes_one() -> None:
    assert policy_to_oci(SeccompPolicy(profile=SeccompProfile.NONE)) is None
    seccomp = policy_to_oci(SeccompPolicy(profile=SeccompProfile.NONE, deny=("chmod",)), "x86_64")
    assert seccomp is not None
    assert any(s["names"] == ["chmod"] and s["action"] == "SCMP_ACT_ERRNO" for s in seccomp["syscalls"])


def test_native_architecture_names() -> None:
    assert native_architecture("x86_64") == "SCMP_ARCH_X86_64"
    assert native_architecture("aarch64") == "SCMP_ARCH_AARCH64"


# -- runtime probe -------------------------------------------------------------------------------

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
"""
UNIFIED = "31 23 0:28 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n"
LEGACY = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"


def test_cgroup_mode_parsing() -> None:
    assert cgroup_mode(HYBRID) is CgroupMode.HYBRID
    assert cgroup_mode(UNIFIED) is CgroupMode.UNIFIED
    assert cgroup_mode(LEGACY) is CgroupMode.LEGACY
    assert cgroup_mode("") is CgroupMode.NONE


def test_crun_refuses_hybrid_only() -> None:
    reason = crun_refusal((1, 8, 1), CgroupMode.HYBRID)
    assert reason is not None and "hybrid" in reason and "1.8.1" in reason
    assert crun_refusal((1, 8, 1), CgroupMode.UNIFIED) is None
    assert crun_refusal((1, 8, 1), CgroupMode.LEGACY) is None
    assert parse_version("crun version 1.8.1\ncommit: f8a0") == (1, 8, 1)
    assert parse_version("runc version 1.1.5+ds1") == (1, 1, 5)


@pytest.mark.skipif(shutil.which("crun") is None, reason="crun is not installed")
def test_installed_crun_probe_says_why_on_this_host() -> None:
    info = probe_crun()
    if cgroup_mode() is CgroupMode.HYBRID:
        assert not info.usable and "hybrid" in info.reason
    else:
        assert info.usable


def test_runsc_probe_names_the_missing_binary() -> None:
    info = probe_runsc()
    assert info.name is RuntimeName.RUNSC
    if shutil.which("runsc") is None:
        assert not info.usable and "runsc not found" in info.reason


# -- the proxy hand-over accepts only the sandbox's own processes ----------------------------------


def test_proxy_hand_over_from_a_host_process_is_refused() -> None:
    import socket

    from kavach.backends.base import LaunchSpec
    from kavach.backends.oci import OciDriver, OciInstance
    from kavach.backends.oci.runtime import RuntimeInfo
    from kavach.errors import SandboxCreateError

    info = RuntimeInfo(RuntimeName.RUNC, "/usr/sbin/runc", "runc version test", True, "unit test")
    instance = OciInstance(OciDriver(), LaunchSpec("t-peer", SandboxPolicy.basic()), info)
    instance._init_pidns = "pid:[4026599999]"  # the (never started) sandbox's pid namespace
    left, right = socket.socketpair()
    with left, right, pytest.raises(SandboxCreateError, match="not from this sandbox"):
        instance._check_peer_is_sandbox(left)  # the peer is this test process, on the host


# -- validation against the official runtime-spec JSON schema ------------------------------------

SCHEMA_DIR = Path("/usr/share/gocode/src/github.com/opencontainers/runtime-spec/schema")


@pytest.fixture(scope="module")
def spec_validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (dev dependency)")
    referencing = pytest.importorskip("referencing")
    from referencing.jsonschema import DRAFT4

    if not (SCHEMA_DIR / "config-schema.json").exists():
        pytest.skip("the runtime-spec schema is not installed (Debian: golang-github-opencontainers-specs-dev)")
    resources = [
        (
            f"file://{path}",
            referencing.Resource.from_contents(json.loads(path.read_text()), default_specification=DRAFT4),
        )
        for path in SCHEMA_DIR.glob("*.json")
    ]
    registry = referencing.Registry().with_resources(resources)
    schema = json.loads((SCHEMA_DIR / "config-schema.json").read_text())
    schema["id"] = f"file://{SCHEMA_DIR}/config-schema.json"  # base for the schema's relative $refs
    return jsonschema.Draft4Validator(schema, registry=registry)


@pytest.mark.parametrize("preset", ["minimal", "basic", "strict"])
def test_config_validates_against_the_runtime_spec_schema(spec_validator: Any, preset: str) -> None:
    policy = SandboxPolicy.preset(preset)
    config = _config(
        policy,
        seccomp=policy_to_oci(policy.seccomp, "x86_64"),
        late_mounts=(ro_bind("/run/f/0", "/run/secrets/x", noexec=True),),
        annotations={"org.kavach.sandbox-id": "x"},
    )
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in spec_validator.iter_errors(config)]
    assert errors == []


def test_schema_check_is_not_vacuous(spec_validator: Any) -> None:
    config = _config(SandboxPolicy.basic())
    config["process"]["cwd"] = 5
    config["linux"]["namespaces"].append({"type": "not-a-namespace"})
    assert len(list(spec_validator.iter_errors(config))) >= 2


def test_exec_process_object_validates_against_the_schema(spec_validator: Any) -> None:
    config = _config(SandboxPolicy.strict())
    config["process"] = build_process(SandboxPolicy.strict(), ["/bin/sh", "-c", "true"], {"A": "b"}, "/work")
    assert list(spec_validator.iter_errors(config)) == []


def test_mount_targets_cannot_leave_the_rootfs(tmp_path: Path) -> None:
    from kavach.backends.oci.image import create_mountpoints
    from kavach.errors import SandboxCreateError

    with pytest.raises(SandboxCreateError, match="absolute path"):
        create_mountpoints(str(tmp_path / "rootfs"), [("/data/../../escape", True)], None)
    assert not (tmp_path / "escape").exists()
