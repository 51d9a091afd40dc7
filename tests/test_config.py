"""SandboxConfig validation and the fluent builder."""

from __future__ import annotations

from pathlib import Path

import pytest

from kavach.backends.names import Backend
from kavach.config import SandboxConfig
from kavach.errors import PolicyError
from kavach.policy import NetworkMode, SandboxPolicy, SeccompProfile


def test_builder_has_the_specification_methods(tmp_path: Path) -> None:
    config = (
        SandboxConfig.builder()
        .backend("PROCESS")
        .inner_backend("oci")
        .policy("strict")
        .policy_seccomp("basic")
        .network("proxy", allow=["api.example.com"])
        .timeout_ms(1500)
        .agent_id("agent-7")
        .env(FOO="bar")
        .workdir(tmp_path)
        .min_score(60)
        .hostname("box")
        .build()
    )
    assert config.backend is Backend.PROCESS
    assert config.inner_backend is Backend.OCI
    assert config.policy.seccomp.profile is SeccompProfile.BASIC
    assert config.policy.landlock.enabled  # still strict apart from the seccomp override
    assert config.policy.network.mode is NetworkMode.PROXY
    assert config.policy.network.egress_allowlist == ("api.example.com",)
    assert config.policy.resources.wall_timeout_ms == 1500
    assert config.agent_id == "agent-7"
    assert dict(config.env) == {"FOO": "bar"}
    assert config.workdir == str(tmp_path)
    assert config.min_score == 60


def test_builder_auto_backend_and_policy_file(tmp_path: Path) -> None:
    policy_file = tmp_path / "p.json"
    policy_file.write_text('{"extends": "minimal"}')
    config = SandboxConfig.builder().backend("auto").policy(str(policy_file)).build()
    assert config.backend is None
    assert config.policy == SandboxPolicy.minimal()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_score": 101}, "min_score"),
        ({"min_score": -1}, "min_score"),
        ({"env": {"1BAD": "x"}}, "env.1BAD"),
        ({"workdir": "relative"}, "workdir"),
        ({"workdir": "/definitely/not/here"}, "workdir"),
        ({"agent_id": "has space"}, "agent_id"),
        ({"hostname": "bad_host!"}, "hostname"),
        ({"backend": Backend.OCI, "inner_backend": Backend.OCI}, "inner_backend"),
        ({"backend": "docker"}, "backend"),
        ({"backend": 3}, "backend"),
        ({"inner_backend": "bogus"}, "inner_backend"),
        ({"backend": "oci", "inner_backend": "OCI"}, "inner_backend"),
    ],
)
def test_invalid_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(PolicyError) as info:
        SandboxConfig(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_backends_may_be_given_by_name_as_the_builder_takes_them() -> None:
    # A plain string used to pass through untouched and fail deep inside creation (with an
    # AttributeError from the audit of that failure).
    config = SandboxConfig(backend="oci", inner_backend=" Process ")  # type: ignore[arg-type]
    assert config.backend is Backend.OCI and config.inner_backend is Backend.PROCESS
    assert SandboxConfig(backend="auto").backend is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "arg", "field"),
    [
        ("backend", "docker", "backend"),
        ("policy_seccomp", "paranoid", "seccomp.profile"),
        ("network", "wifi", "network.mode"),
        ("timeout_ms", 0, "timeout_ms"),
        ("policy", "paranoid", "policy"),
    ],
)
def test_builder_rejects_bad_values(method: str, arg: object, field: str) -> None:
    builder = SandboxConfig.builder()
    with pytest.raises(PolicyError) as info:
        getattr(builder, method)(arg)
    assert info.value.field == field
