"""The kavach command: exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kavach.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--backend", "docker", "--", "true"], "unknown backend"),
        (["run", "--policy", "/no/such/policy.toml", "--", "true"], "--policy"),
        (["run", "--ro-bind", "relative:/x", "--", "true"], "--ro-bind"),
        (["run", "--bind", "/a:", "--", "true"], "--bind"),
        (["run", "--env", "NOEQUALS", "--", "true"], "--env"),
        (["run", "--network", "wifi", "--", "true"], "--network"),
        (["run", "--timeout", "-1", "--", "true"], "--timeout"),
        (["run", "--timeout", "nan", "--", "true"], "--timeout"),
        (["run", "--timeout", "inf", "--", "true"], "--timeout"),
        (["run", "--ro-bind", "/etc:/dev/x", "--", "true"], "filesystem.ro_binds"),
        (["run", "--bind", "/tmp:/", "--", "true"], "filesystem.rw_binds"),
        (["run"], "missing command"),
        (["run", "--no-such-flag", "--", "true"], "--no-such-flag"),
        (["score", "--backend", "nope"], "unknown backend"),
        (["score"], "--backend"),
        (["policy", "validate", "/no/such/file.json"], "cannot read"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_input_is_one_line_exit_2_no_traceback(
    capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith("kavach: error: ")
    assert err.count("\n") == 1
    assert needle in err
    assert "Traceback" not in err + out


def test_score_prints_the_predicted_score(capsys: pytest.CaptureFixture[str]) -> None:
    def predicted(*args: str) -> str:
        return run_cli(capsys, "score", *args)[1].strip()

    assert predicted("--backend", "process", "--policy", "strict") == "68 (standard)"
    assert predicted("--backend", "firecracker", "--policy", "strict") == "100 (fortress)"
    composite = ("--backend", "oci", "--policy", "strict", "--inner", "process", "--json")
    code, out, _ = run_cli(capsys, "score", *composite)
    assert code == 0 and json.loads(out)["score"] == 78
    # A pair kavach does not build (every driver refuses it at create) has no prediction.
    for outer, inner in (("process", "oci"), ("wasm", "process"), ("oci", "wasm"), ("gvisor", "process")):
        code, out, err = run_cli(capsys, "score", "--backend", outer, "--inner", inner)
        assert code == 2 and out == ""
        assert f"--inner: no composite of {outer}" in err and "oci with inner process" in err
        assert "Traceback" not in err


def test_backends_lists_all_ten_with_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "backends", "--json")
    rows = json.loads(out)
    assert code == 0
    assert len(rows) == 10
    by_name = {r["backend"]: r for r in rows}
    assert by_name["noop"]["available"] is True
    assert by_name["firecracker"]["available"] is False and by_name["firecracker"]["reason"]
    assert by_name["process"]["base_score"] == 50
    code, table, _ = run_cli(capsys, "backends")
    assert code == 0 and "firecracker" in table


def test_policy_show_and_validate(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "policy", "show", "strict", "--json")
    assert code == 0 and json.loads(out)["seccomp"]["profile"] == "strict"
    good = tmp_path / "p.toml"
    good.write_text('extends = "basic"\n[network]\nmode = "host"\n')
    assert run_cli(capsys, "policy", "validate", str(good))[0] == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[network]\nmode = "wifi"\n')
    code, _, err = run_cli(capsys, "policy", "validate", str(bad))
    assert code == 2 and "network.mode" in err and "wifi" in err


def test_run_on_noop_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "run", "--backend", "noop", "--json", "--", "echo", "hi")
    data = json.loads(out)
    assert code == 0
    assert data["backend"] == "noop" and data["score"] == 0 and data["verdict"] == "pass"
    assert data["result"]["exit_code"] == 0


def test_run_min_score_unreachable_exits_125(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "run", "--backend", "noop", "--min-score", "50", "--", "true")
    assert code == 125
    assert "min_score" in err and err.count("\n") == 1


def test_help_works(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "run", "--help")
    assert code == 0 and "--min-score" in out


def test_proxy_flags_need_proxy_mode_and_valid_syntax(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "run", "--network", "off", "--allow", "example.com", "--", "true")
    assert code == 2 and "--network proxy" in err
    code, _, err = run_cli(capsys, "run", "--credential", "no-equals-sign", "--", "true")
    assert code == 2 and "--credential" in err
    code, _, err = run_cli(capsys, "run", "--credential", "api.example.com=Authorization:UNSET_VAR_XYZ", "--", "true")
    assert code == 2 and "UNSET_VAR_XYZ" in err


def test_credential_value_never_reaches_the_sandbox_or_the_output(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kavach.backends import registry
    from kavach.backends.names import Backend

    if not registry.probe(Backend.PROCESS).usable:
        pytest.skip(f"process backend unusable here: {registry.probe(Backend.PROCESS).reason}")
    monkeypatch.setenv("API_TOKEN", "tok-8f3a1c0d9e7b6a5f4e3d")
    code, out, err = run_cli(
        capsys,
        "run", "--backend", "process", "--json",
        "--allow", "api.example.com", "--credential", "api.example.com=Authorization:API_TOKEN",
        "--", "/bin/sh", "-c", "echo $API_TOKEN; cat /proc/self/environ",
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert data["result"]["stdout"].startswith("KAVACH_PLACEHOLDER_")
    assert "tok-8f3a1c0d9e7b6a5f4e3d" not in out + err


def test_run_inner_backend_gives_a_composite(capsys: pytest.CaptureFixture[str]) -> None:
    from kavach.backends import registry
    from kavach.backends.names import Backend

    for backend in (Backend.OCI, Backend.PROCESS):
        if not registry.probe(backend).usable:
            pytest.skip(f"{backend} unusable here: {registry.probe(backend).reason}")
    args = ("run", "--backend", "oci", "--inner", "process", "--policy", "strict", "--json")
    code, out, err = run_cli(capsys, *args, "--", "/bin/grep", "Seccomp_filters", "/proc/self/status")
    assert code == 0, err
    data = json.loads(out)
    assert data["score"] == 78  # max(OCI 73, inner) + 5, both layers verified
    assert data["result"]["stdout"].split() == ["Seccomp_filters:", "2"]
    code, _, err = run_cli(capsys, "run", "--inner", "nonsense", "--", "true")
    assert code == 2 and "unknown backend" in err


def test_abnormal_end_is_reported_in_plain_mode(capsys: pytest.CaptureFixture[str]) -> None:
    from kavach.backends import registry
    from kavach.backends.names import Backend

    if not registry.probe(Backend.PROCESS).usable:
        pytest.skip(f"process backend unusable here: {registry.probe(Backend.PROCESS).reason}")
    bomb = ["/usr/bin/python3", "-c", "b = bytearray(1 << 30)"]
    code, _, err = run_cli(capsys, "run", "--backend", "process", "--policy", "strict", "--", *bomb)
    assert code == 137
    assert "memory limit" in err
    code, _, err = run_cli(capsys, "run", "--backend", "process", "--timeout", "0.5", "--", "sleep", "5")
    assert code == 124 and "timed out" in err


def test_truncated_output_is_said_in_plain_mode(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from kavach.backends import registry
    from kavach.backends.names import Backend

    if not registry.probe(Backend.PROCESS).usable:
        pytest.skip(f"process backend unusable here: {registry.probe(Backend.PROCESS).reason}")
    policy = tmp_path / "cap.toml"
    policy.write_text("[resources]\nstdout_cap = 1000\n")
    flood = ["sh", "-c", "head -c 5000 /dev/zero | tr '\\0' a; echo done >&2"]
    code, out, err = run_cli(capsys, "run", "--backend", "process", "--policy", str(policy), "--", *flood)
    assert code == 0
    assert out == "a" * 1000
    assert err == "done\nkavach: stdout truncated: only its first 1000 bytes were kept (stdout_cap)\n"
    code, out, err = run_cli(capsys, "run", "--backend", "process", "--", "sh", "-c", "echo whole")
    assert (code, out) == (0, "whole\n") and "truncated" not in err


def test_blocked_output_exits_125_and_never_prints_the_secret(capsys: pytest.CaptureFixture[str]) -> None:
    from kavach.backends import registry
    from kavach.backends.names import Backend

    if not registry.probe(Backend.PROCESS).usable:
        pytest.skip(f"process backend unusable here: {registry.probe(Backend.PROCESS).reason}")
    key = "AKIAQYLPMN5HHHFPZAM2"
    code, out, err = run_cli(capsys, "run", "--backend", "process", "--", "/bin/echo", f"aws_access_key_id={key}")
    assert code == 125
    assert "blocked" in err and err.count("\n") == 1
    assert key not in out + err
    # The one line names what tripped the gate (rule, severity, line), never the value.
    assert "(1 finding, worst critical): secrets.aws-access-key-id (critical, line 1)" in err
    lines = "\n".join(f"line {i}" for i in range(1, 5)) + "\n"
    secrets = lines + "".join(f"aws_access_key_id=AKIAQYLPMN5HHHFPZAM{i}\n" for i in range(2, 7))
    code, out, err = run_cli(capsys, "run", "--backend", "process", "--", "/usr/bin/printf", "%s", secrets)
    assert code == 125 and err.count("\n") == 1
    assert "(5 findings, worst critical)" in err and "line 5), " in err and "2 more (--json lists every finding)" in err
    assert "AKIAQYLPMN5HHHFPZAM" not in out + err


def test_blocked_output_in_json_mode_is_one_object_with_every_finding(capsys: pytest.CaptureFixture[str]) -> None:
    from kavach.backends import registry
    from kavach.backends.names import Backend

    if not registry.probe(Backend.PROCESS).usable:
        pytest.skip(f"process backend unusable here: {registry.probe(Backend.PROCESS).reason}")
    text = "ok\naws_access_key_id=AKIAQYLPMN5HHHFPZAM2\nmail bob@example.org\n"
    code, out, err = run_cli(capsys, "run", "--json", "--backend", "process", "--", "/usr/bin/printf", "%s", text)
    assert code == 125 and err == ""
    data = json.loads(out)
    assert data["verdict"] == "block" and data["backend"] == "process" and data["score"] > 0
    assert "blocked by the externalization gate" in data["error"]
    assert [(f["rule"], f["severity"], f["line"]) for f in data["findings"]] == [
        ("secrets.aws-access-key-id", "critical", 2),
        ("pii.email", "low", 3),
    ]
    assert "result" not in data and "AKIAQYLPMN5HHHFPZAM2" not in out


def test_python_dash_m_kavach_is_the_command() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "kavach", "run", "--timeout", "-1", "--", "true"], capture_output=True, check=False
    )
    assert done.returncode == 2 and b"--timeout" in done.stderr and b"Traceback" not in done.stderr
