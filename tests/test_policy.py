"""Policy presets, loading from TOML/YAML/JSON with field-naming errors, and merge."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kavach.errors import PolicyError
from kavach.policy import (
    Access,
    Bind,
    LandlockPolicy,
    LandlockRule,
    NetworkMode,
    NetworkPolicy,
    ResourceLimits,
    SandboxPolicy,
    SeccompPolicy,
    SeccompProfile,
    host_pattern_matches,
    intersect_host_patterns,
    merge,
    parse_size,
)


def test_default_is_basic_and_basic_isolates() -> None:
    policy = SandboxPolicy()
    assert policy == SandboxPolicy.basic()
    assert policy.network.mode is NetworkMode.OFF
    assert policy.seccomp.profile is SeccompProfile.BASIC
    assert policy.filesystem.read_only_root
    assert policy.env.clear
    assert not policy.allow_degraded


def test_strict_has_landlock_rules_and_the_seccomp_allow_list() -> None:
    strict = SandboxPolicy.strict()
    assert strict.landlock.enabled and strict.landlock.rules
    assert strict.seccomp.profile is SeccompProfile.STRICT
    assert strict.resources.memory is not None and strict.resources.pids is not None


TOML = """
extends = "strict"
[network]
mode = "proxy"
egress_allowlist = ["api.example.com:443", "*.pypi.org"]
[resources]
memory = "128M"
pids = 64
[filesystem]
ro_binds = ["/opt/data:/data"]
"""


def test_load_toml_yaml_json_give_equal_policies(tmp_path: Path) -> None:
    toml_file = tmp_path / "p.toml"
    toml_file.write_text(TOML)
    from_toml = SandboxPolicy.load(toml_file)
    assert from_toml.network.mode is NetworkMode.PROXY
    assert from_toml.resources.memory == 128 * 1024 * 1024
    assert from_toml.filesystem.ro_binds == (Bind("/opt/data", "/data"),)
    assert from_toml.landlock.enabled  # inherited from strict
    data = from_toml.to_dict()
    json_file = tmp_path / "p.json"
    json_file.write_text(json.dumps(data))
    yaml_file = tmp_path / "p.yaml"
    import yaml

    yaml_file.write_text(yaml.safe_dump(data))
    assert SandboxPolicy.load(json_file) == from_toml
    assert SandboxPolicy.load(yaml_file) == from_toml


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        ('[network]\nmode = "wifi"', "network.mode", "wifi"),
        ("[resources]\nmemory = -5", "resources.memory", "-5"),
        ('[resources]\nmemory = "lots"', "resources.memory", "lots"),
        ("[resources]\npids = 0", "resources.pids", "0"),
        ('[seccomp]\nprofile = "paranoid"', "seccomp.profile", "paranoid"),
        ('[filesystem]\nro_binds = ["relative/path"]', "filesystem.ro_binds", "relative/path"),
        ('[filesystem]\nrw_binds = ["/a:/b/../c"]', "filesystem.rw_binds", "/a:/b/../c"),
        ('[network]\negress_allowlist = ["http://x.com/"]', "network.egress_allowlist", "http://x.com/"),
        ('[landlock]\nrules = [{path = "/usr", access = ["fly"]}]', "landlock.rules[0].access", "fly"),
        ("[resources]\nbogus = 1", "resources.bogus", "1"),
        ("colour = 1", "colour", "1"),
        ('extends = "paranoid"', "policy", "paranoid"),
        ('[seccomp]\nprofile = "basic"\nallow = ["ptrace"]', "seccomp.allow", "ptrace"),
        # Non-finite or unenforceably small CPU shares (TOML has nan and inf): a quota below
        # the kernel's 1 ms would be rounded up to a weaker limit than the one asked for.
        ("[resources]\ncpus = nan", "resources.cpus", "nan"),
        ("[resources]\ncpus = inf", "resources.cpus", "inf"),
        ("[resources]\ncpus = 0.001", "resources.cpus", "0.001"),
        # Above what the kernel can set at all.
        ("[resources]\npids = 4194305", "resources.pids", "4194305"),
        ("[resources]\nopen_files = 9223372036854775807", "resources.open_files", "9223372036854775807"),
        # The sandbox's root, /proc and /dev are built by the sandbox: not a workdir or bind target.
        ('[filesystem]\nworkdir = "/"', "filesystem.workdir", "'/'"),
        ('[filesystem]\nworkdir = "/proc/x"', "filesystem.workdir", "/proc/x"),
        ('[filesystem]\nworkdir = "/dev"', "filesystem.workdir", "/dev"),
        ('[filesystem]\nro_binds = ["/:/"]', "filesystem.ro_binds", "'/'"),
        ('[filesystem]\nro_binds = ["/etc:/dev/x"]', "filesystem.ro_binds", "/dev/x"),
        ('[filesystem]\nrw_binds = ["/tmp:/proc/sys"]', "filesystem.rw_binds", "/proc/sys"),
        ('[filesystem]\nrw_binds = ["/tmp://proc"]', "filesystem.rw_binds", "//proc"),
        ('[filesystem]\nro_binds = ["/etc:/x/./y"]', "filesystem.ro_binds", "/x/./y"),
        ('[env]\npassthrough = ["*"]', "env.passthrough", "*"),
    ],
)
def test_validation_errors_name_the_field_and_the_value(tmp_path: Path, text: str, field: str, value: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        SandboxPolicy.load(path)
    assert info.value.field == field
    assert value in str(info.value)


def test_policies_built_in_code_are_checked_like_loaded_ones() -> None:
    # A Bind made directly (not through Bind.parse) gets the same checks at validation.
    fs = SandboxPolicy().filesystem
    for binds, field in (
        ({"ro_binds": (Bind("relative", "/x"),)}, "filesystem.ro_binds"),
        ({"rw_binds": (Bind("/tmp", "/dev/shm"),)}, "filesystem.rw_binds"),
        ({"workdir": "/proc"}, "filesystem.workdir"),
    ):
        policy = dataclasses.replace(SandboxPolicy(), filesystem=dataclasses.replace(fs, **binds))
        with pytest.raises(PolicyError) as info:
            policy.validate()
        assert info.value.field == field
    # The nearest allowed neighbours stay allowed.
    ok = dataclasses.replace(
        fs, workdir="/procedures", ro_binds=(Bind("/etc", "/devices"),), rw_binds=(Bind("/tmp", "/work/dev"),)
    )
    dataclasses.replace(SandboxPolicy(), filesystem=ok).validate()
    cpus = dataclasses.replace(SandboxPolicy().resources, cpus=0.01, pids=4194304)
    dataclasses.replace(SandboxPolicy(), resources=cpus).validate()


def test_syntax_errors_and_unknown_file_types_are_policy_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[network\nmode=")
    with pytest.raises(PolicyError, match="syntax error"):
        SandboxPolicy.load(broken)
    other = tmp_path / "policy.ini"
    other.write_text("x")
    with pytest.raises(PolicyError, match="unknown file type"):
        SandboxPolicy.load(other)
    with pytest.raises(PolicyError, match="cannot read"):
        SandboxPolicy.load(tmp_path / "missing.json")


def test_sizes_parse_units() -> None:
    assert parse_size("512k", "x") == 512 * 1024
    assert parse_size("1GiB", "x") == 1024**3
    assert parse_size(4096, "x") == 4096
    with pytest.raises(PolicyError):
        parse_size(True, "x")


def test_bind_parse() -> None:
    assert Bind.parse("/src") == Bind("/src", "/src")
    assert Bind.parse("/src:/dst") == Bind("/src", "/dst")
    for bad in ("", "src", "/src:", "/a/../b"):
        with pytest.raises(PolicyError):
            Bind.parse(bad)


# -- merge: stricter wins --------------------------------------------------------------------


def _proxy(*allow: str) -> SandboxPolicy:
    return SandboxPolicy(network=NetworkPolicy(NetworkMode.PROXY, egress_allowlist=allow))


def test_merge_disjoint_allowlists_allow_nothing() -> None:
    merged = merge(_proxy("a.example.com"), _proxy("b.example.com"))
    assert merged.network.mode is NetworkMode.PROXY
    assert merged.network.egress_allowlist == ()  # nothing allowed, never "allow all"


def test_merge_allowlists_intersect_with_wildcards_keeping_the_narrower() -> None:
    merged = merge(_proxy("*.example.com", "pypi.org"), _proxy("api.example.com:443", "npmjs.org"))
    assert merged.network.egress_allowlist == ("api.example.com:443",)


def test_merge_network_mode_takes_the_stricter() -> None:
    host = SandboxPolicy(network=NetworkPolicy(NetworkMode.HOST))
    assert merge(host, _proxy("a.com")).network == NetworkPolicy(NetworkMode.PROXY, ("a.com",))
    assert merge(host, SandboxPolicy()).network.mode is NetworkMode.OFF


def test_merge_limits_profiles_and_booleans() -> None:
    a = SandboxPolicy(
        resources=ResourceLimits(memory=100, pids=None, wall_timeout_ms=5000),
        seccomp=SeccompPolicy(SeccompProfile.BASIC, deny=("chmod",)),
    )
    b = SandboxPolicy(
        resources=ResourceLimits(memory=200, pids=10, wall_timeout_ms=None),
        seccomp=SeccompPolicy(SeccompProfile.STRICT, allow=("chmod",), deny=("chown",)),
        allow_degraded=True,
    )
    merged = merge(a, b)
    assert merged.resources.memory == 100
    assert merged.resources.pids == 10
    assert merged.resources.wall_timeout_ms == 5000
    assert merged.seccomp.profile is SeccompProfile.STRICT
    assert merged.seccomp.deny == ("chmod", "chown")
    assert merged.allow_degraded is False
    assert merge(SandboxPolicy.minimal(), SandboxPolicy()).filesystem.read_only_root


def test_merge_binds_survive_only_if_both_grant_and_rw_only_if_both_say_rw() -> None:
    from kavach.policy import FilesystemPolicy

    a = SandboxPolicy(filesystem=FilesystemPolicy(rw_binds=(Bind("/data"),), ro_binds=(Bind("/opt"),)))
    b = SandboxPolicy(filesystem=FilesystemPolicy(ro_binds=(Bind("/data"),)))
    merged = merge(a, b)
    assert merged.filesystem.rw_binds == ()
    assert merged.filesystem.ro_binds == (Bind("/data"),)


def test_merge_landlock_intersects_access() -> None:
    rw = frozenset({Access.READ, Access.WRITE})
    r = frozenset({Access.READ})
    a = SandboxPolicy(landlock=LandlockPolicy(True, (LandlockRule("/tmp", rw), LandlockRule("/usr", r))))
    b = SandboxPolicy(landlock=LandlockPolicy(True, (LandlockRule("/tmp", r),)))
    assert merge(a, b).landlock.rules == (LandlockRule("/tmp", r),)
    off = SandboxPolicy()
    assert merge(off, a).landlock == a.landlock  # Landlock off allows everything: the rules win


def test_merge_rejects_different_workdirs() -> None:
    from kavach.policy import FilesystemPolicy

    with pytest.raises(PolicyError, match=r"filesystem\.workdir"):
        merge(SandboxPolicy(), SandboxPolicy(filesystem=FilesystemPolicy(workdir="/other")))


def test_host_patterns() -> None:
    assert host_pattern_matches("*.example.com", "api.example.com")
    assert not host_pattern_matches("*.example.com", "example.com")
    assert not host_pattern_matches("*.example.com", "evilexample.com")
    assert host_pattern_matches("example.com", "EXAMPLE.com.")
    assert intersect_host_patterns(["*.a.com"], ["*.b.a.com"]) == ("*.b.a.com",)
    assert intersect_host_patterns(["x.com:80"], ["x.com:443"]) == ()


def test_landlock_rules_grant_the_binds() -> None:
    from dataclasses import replace

    from kavach.policy import FilesystemPolicy, landlock_rules

    strict = SandboxPolicy.strict()
    with_binds = replace(
        strict, filesystem=FilesystemPolicy(ro_binds=(Bind("/opt", "/ro"),), rw_binds=(Bind("/srv", "/data"),))
    )
    rules = {r.path: r.access for r in landlock_rules(with_binds)}
    assert rules["/ro"] == {Access.READ, Access.EXECUTE}
    assert rules["/data"] == {Access.READ, Access.WRITE}  # written files are not executable
    assert landlock_rules(SandboxPolicy.basic()) == ()  # Landlock off: no rules at all


def test_without_cgroup_limits_drops_only_what_a_cgroup_enforces() -> None:
    limits = SandboxPolicy.strict().resources
    assert limits.memory and limits.pids and limits.cpus  # (strict asks for all three)
    dropped = limits.without_cgroup_limits()
    assert (dropped.memory, dropped.cpus, dropped.pids) == (None, None, None)
    assert dropped == dataclasses.replace(limits, memory=None, cpus=None, pids=None)  # rlimits, timeout, caps kept
