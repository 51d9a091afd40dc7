"""The externalization gate: verdicts, redaction, policy parsing, injected secrets, streaming."""

from __future__ import annotations

import pytest

from kavach.errors import PolicyError
from kavach.scanning import ExternalizationPolicy, Gate, Severity, Verdict
from kavach.scanning.findings import Finding
from kavach.scanning.gate import INJECTED_SECRET_RULE, OVERSIZE_RULE, STREAM_HOLD

AWS_ID = "AKIA" + "QWERTYUIOPASDFGH"
PASSWORD_LINE = b'password = "Tr0ub4dor&3x"\n'


def test_clean_output_passes_unchanged() -> None:
    data = b"Total amount of memory: 16 GiB\nsync finished\nsee ../README.md\nRunning /bin/bash script\n"
    result = Gate(ExternalizationPolicy()).apply(data, "stdout")
    assert result.verdict is Verdict.PASS
    assert result.released == data and result.findings == ()


def test_email_warns_and_is_redacted() -> None:
    result = Gate(ExternalizationPolicy()).apply(b"contact alice@corp.example.com today", "stdout")
    assert result.verdict is Verdict.WARN
    assert result.released == b"contact [REDACTED:email] today"
    assert result.original == b"contact alice@corp.example.com today"
    assert all(f.source == "stdout" for f in result.findings)


def test_warn_without_redaction_when_policy_says_so() -> None:
    policy = ExternalizationPolicy(redact_on_warn=False)
    result = Gate(policy).apply(b"contact alice@corp.example.com today")
    assert result.verdict is Verdict.WARN and result.released == b"contact alice@corp.example.com today"


def test_password_quarantines_with_redacted_release() -> None:
    result = Gate(ExternalizationPolicy()).apply(b"ok\n" + PASSWORD_LINE)
    assert result.verdict is Verdict.QUARANTINE
    assert b"Tr0ub4dor" not in result.released and b"[REDACTED:password]" in result.released
    assert b"Tr0ub4dor" in result.original


def test_critical_blocks_and_releases_nothing() -> None:
    result = Gate(ExternalizationPolicy()).apply(f"AWS_ACCESS_KEY_ID={AWS_ID}\n".encode(), "file:/out/env")
    assert result.verdict is Verdict.BLOCK and result.released == b""
    assert result.findings[0].source == "file:/out/env"


def test_every_secret_span_is_redacted() -> None:
    policy = ExternalizationPolicy(block_at=Severity.CRITICAL, category_overrides={"cloud_key": "high"})
    data = f"one {AWS_ID} two {AWS_ID} three alice@corp.example.com\n".encode()
    result = Gate(policy).apply(data)
    assert result.verdict is Verdict.QUARANTINE
    assert AWS_ID.encode() not in result.released
    assert result.released.count(b"[REDACTED:") == 3


def test_category_override_by_rule_id_wins_over_category() -> None:
    policy = ExternalizationPolicy(category_overrides={"email": "high", "pii.email": "info"})
    result = Gate(policy).apply(b"alice@corp.example.com")
    assert result.verdict is Verdict.PASS
    assert result.findings[0].severity is Severity.INFO


def test_allowlists_drop_rules_and_values() -> None:
    data = b"alice@corp.example.com bob@corp.example.com"
    by_rule = Gate(ExternalizationPolicy(allowlist_rules=frozenset({"pii.email"}))).apply(data)
    assert by_rule.verdict is Verdict.PASS and by_rule.findings == ()
    by_value = Gate(ExternalizationPolicy(allowlist_values=frozenset({"alice@corp.example.com"}))).apply(data)
    assert [data[f.start : f.end] for f in by_value.findings] == [b"bob@corp.example.com"]


def test_injected_secrets_are_always_found_and_redacted() -> None:
    secret = "plain-words-not-random"
    gate = Gate(ExternalizationPolicy.disabled(), known_secrets=[secret])
    result = gate.apply(f"leaked {secret} here".encode())
    assert result.findings[0].rule == INJECTED_SECRET_RULE
    assert result.findings[0].severity is Severity.CRITICAL
    assert secret.encode() not in result.released


def test_injected_secret_in_base64_form_is_found() -> None:
    import base64

    secret = "plain-words-not-random"
    gate = Gate(ExternalizationPolicy(), known_secrets=[secret])
    found = gate.scan(b"x " + base64.b64encode(secret.encode()) + b" y")
    assert [f.rule for f in found] == [INJECTED_SECRET_RULE]


def test_disabled_policy_scans_nothing() -> None:
    result = Gate(ExternalizationPolicy.disabled()).apply(f"{AWS_ID}".encode())
    assert result.verdict is Verdict.PASS and result.released == AWS_ID.encode()


def test_oversize_artifacts_fail_closed() -> None:
    policy = ExternalizationPolicy(max_artifact_size=64)
    result = Gate(policy).apply(b"a" * 100)
    assert result.verdict is Verdict.BLOCK
    assert [f.rule for f in result.findings] == [OVERSIZE_RULE]
    lenient = ExternalizationPolicy(max_artifact_size=64, block_at="critical", category_overrides={"oversize": "high"})
    result = Gate(lenient).apply(b"a" * 100)
    assert result.verdict is Verdict.QUARANTINE and result.released == b"a" * 64


def test_scanner_selection() -> None:
    gate = Gate(ExternalizationPolicy(scanners=frozenset({"code"})))
    assert gate.scanners == ("code",)
    assert gate.scan(b"alice@corp.example.com") == []


@pytest.mark.parametrize("padding", [0, 300_000], ids=["small", "large-enough-for-the-scan-helper"])
def test_python_ast_findings_reach_the_gate_whatever_the_size(padding: int) -> None:
    # The code scanner's AST findings need the artifact only; the gate computes them while
    # its scan helper matches (for large artifacts) and must not lose them on either path.
    source = "import base64\npayload = base64.b64decode('cHJpbnQoMSk=')\nexec(payload)\n"
    data = (source + "# filler line of a long module\n" * (padding // 31)).encode()
    found = Gate(ExternalizationPolicy()).scan(data, "stdout")
    ast = [f for f in found if f.rule == "code.py.exec-decoded"]
    assert len(ast) == 1 and ast[0].line == 3 and ast[0].source == "stdout"


def test_policy_from_dict_parses_and_names_bad_fields() -> None:
    policy = ExternalizationPolicy.from_dict(
        {
            "block_at": "high",
            "quarantine_at": "medium",
            "warn_at": "low",
            "scanners": ["secrets"],
            "category_overrides": {"email": "info"},
            "allowlist_rules": ["pii.phone"],
            "max_artifact_size": 1024,
        }
    )
    assert policy.block_at is Severity.HIGH and policy.scanners == frozenset({"secrets"})
    assert policy.category_overrides["email"] is Severity.INFO
    bad = [
        ({"block_at": "fatal"}, "externalization.block_at"),
        ({"enabled": "yes"}, "externalization.enabled"),
        ({"scanners": ["virus"]}, "externalization.scanners"),
        ({"max_artifact_size": -1}, "externalization.max_artifact_size"),
        ({"category_overrides": {"email": "loud"}}, "externalization.category_overrides.email"),
        ({"colour": "red"}, "externalization.colour"),
        ({"block_at": "low", "quarantine_at": "high"}, "externalization.thresholds"),
    ]
    for data, field in bad:
        with pytest.raises(PolicyError) as info:
            ExternalizationPolicy.from_dict(data)
        assert info.value.field == field, (data, info.value.field)


def test_stream_finds_a_secret_split_across_chunks() -> None:
    gate = Gate(ExternalizationPolicy(block_at="critical", category_overrides={"cloud_key": "high"}))
    stream = gate.stream("stdout")
    prefix = b"x" * (3 * STREAM_HOLD) + b"\nkey="
    released = b""
    findings = []
    for chunk in (prefix + AWS_ID[:9].encode(), AWS_ID[9:].encode() + b"\nmore output\n"):
        out, new = stream.feed(chunk)
        released += out
        findings += new
    out, new = stream.close()
    released += out
    findings += new
    assert [f.rule for f in findings] == ["secrets.aws-access-key-id"]
    assert findings[0].start == len(prefix) and findings[0].line == 2
    assert AWS_ID.encode() not in released
    assert released.endswith(b"key=[REDACTED:cloud_key]\nmore output\n")
    assert stream.verdict is Verdict.QUARANTINE
    assert stream.original == prefix + AWS_ID.encode() + b"\nmore output\n"


def test_stream_block_stops_release() -> None:
    stream = Gate(ExternalizationPolicy()).stream("stdout")
    out1, _ = stream.feed(b"hello\n")
    out2, found = stream.feed(f"{AWS_ID}\n".encode() + b"y" * (3 * STREAM_HOLD))
    out3, _ = stream.close()
    assert stream.verdict is Verdict.BLOCK
    assert AWS_ID.encode() not in out1 + out2 + out3
    assert [f.rule for f in found] == ["secrets.aws-access-key-id"]


def test_stream_flush_releases_complete_lines_and_holds_a_partial_one() -> None:
    stream = Gate(ExternalizationPolicy()).stream("stdout")
    assert stream.feed(b"line 1\nline 2\npart") == (b"", [])  # small: held back
    assert stream.held == 18
    assert stream.flush() == (b"line 1\nline 2\n", [])
    assert stream.held == 4
    assert stream.flush() == (b"", [])  # no complete line: nothing
    stream.feed(b"ial\r")
    assert stream.flush() == (b"partial\r", [])  # a progress bar's carriage return ends a line too
    assert stream.close() == (b"", [])
    assert stream.verdict is Verdict.PASS


def test_stream_flush_keeps_context_so_a_key_whose_header_left_is_still_caught() -> None:
    # An OpenSSH key: its body alone matches no rule, its header line alone neither.
    header = b"-----BEGIN OPENSSH PRIVATE KEY-----\n"
    body = (
        b"b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
        b"QyNTUxOQAAACAMMB4vyOgI5UqpLNX+lCCTwj6zRZdScZn6zeFkE3azngAAAJArho0JK4aN\n"
    )
    gate = Gate(ExternalizationPolicy())
    assert gate.scan(body) == [] and gate.scan(header) == []
    stream = gate.stream("stdout")
    stream.feed(b"log line\n" + header)
    out1, found1 = stream.flush()
    assert out1 == b"log line\n" + header and found1 == []
    out2, found2 = stream.feed(body)
    out3, found3 = stream.close()
    assert [f.rule for f in found2 + found3] == ["secrets.private-key"]
    finding = (found2 + found3)[0]
    assert finding.start == len(b"log line\n") and finding.line == 2  # where the header was
    assert stream.verdict is Verdict.BLOCK
    assert out2 + out3 == b""  # the body never leaves


def test_stream_flush_reports_each_finding_once_with_stream_offsets() -> None:
    policy = ExternalizationPolicy(block_at="critical", category_overrides={"cloud_key": "high"})
    stream = Gate(policy).stream("stdout")
    stream.feed(b"a\nb\n")
    assert stream.flush() == (b"a\nb\n", [])
    stream.feed(f"c\nkey={AWS_ID}\n".encode())
    out, found = stream.flush()
    assert out == b"c\nkey=[REDACTED:cloud_key]\n"  # quarantine: redacted before release
    assert [(f.rule, f.start, f.line) for f in found] == [("secrets.aws-access-key-id", 10, 4)]
    stream.feed(b"d\n")
    assert stream.flush() == (b"d\n", [])  # the key is in the context now: not reported again
    assert stream.close() == (b"", [])
    assert [f.start for f in stream.findings] == [10]
    assert stream.verdict is Verdict.QUARANTINE


def test_stream_flush_context_after_a_line_longer_than_the_hold() -> None:
    # The released line is longer than the context kept (STREAM_HOLD): its end still is.
    stream = Gate(ExternalizationPolicy()).stream("stdout")
    stream.feed(b"x" * (STREAM_HOLD + 1000) + b" Bearer \n")
    assert stream.flush()[1] == []
    stream.feed(b"password536-22-8172\n")
    out, found = stream.flush()
    assert [f.rule for f in found] == ["secrets.bearer-token"]
    assert b"password536-22-8172" not in out


def test_stream_flush_never_splits_a_secret_cut_mid_line() -> None:
    stream = Gate(ExternalizationPolicy()).stream("stdout")
    stream.feed(b"ok\nkey=" + AWS_ID[:9].encode())
    assert stream.flush() == (b"ok\n", [])  # the line with half a key stays held
    stream.feed(AWS_ID[9:].encode() + b"\n")
    out, found = stream.flush()
    assert [f.rule for f in found] == ["secrets.aws-access-key-id"]
    assert out == b"" and stream.verdict is Verdict.BLOCK


def test_stream_cut_moved_back_by_a_long_finding_does_not_split_an_earlier_one() -> None:
    # A [100, 200) and B [150, 9000): the cut (len - hold) splits B only; moved back to B's
    # start it splits A, so it must move again, to A's start. (Checked in the other order
    # too, which is how the scanners may list them.)
    def make(rule: str, start: int, end: int) -> Finding:
        return Finding(
            scanner="secrets",
            rule=rule,
            category="password",
            severity=Severity.HIGH,
            start=start,
            end=end,
            line=1,
            evidence="x",
            confidence=1.0,
        )

    data = b"x" * 100 + b"#" + b"y" * 10_299  # the findings are placed from the "#"
    for order in (0, 1):
        gate = Gate(ExternalizationPolicy(block_at="critical"))

        def scan(d: bytes, source: str = "", order: int = order) -> list[Finding]:
            at = d.find(b"#")
            pair = [make("a", at, at + 100), make("b", at + 50, at + 8900)] if at >= 0 else []
            return pair if order == 0 else pair[::-1]

        gate.scan = scan  # type: ignore[method-assign]
        stream = gate.stream("stdout")
        out, found = stream.feed(data)
        assert (out, found) == (data[:100], [])
        out2, found2 = stream.close()
        assert {f.rule for f in found2} == {"a", "b"}
        assert out2.startswith(b"[REDACTED:password]")


def test_stream_flush_reports_a_match_from_the_context_once_it_is_complete() -> None:
    # A quarantined (not blocked) key whose header line was released: while its body line
    # is still partial the match runs past the cut, so nothing of it is reported or
    # released until the line is complete; then it is reported once.
    header = b"-----BEGIN OPENSSH PRIVATE KEY-----\n"
    line1 = b"b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    line2 = b"QyNTUxOQAAACAMMB4vyOgI5UqpLNX+lCCTwj6zRZdScZn6zeFkE3azngAAAJArho0JK4aN\n"
    stream = Gate(ExternalizationPolicy(category_overrides={"private_key": "high"})).stream("stdout")
    stream.feed(header)
    assert stream.flush() == (header, [])
    stream.feed(line1 + line2[:40])
    assert stream.flush() == (b"", [])  # the key runs into the partial line: all held
    stream.feed(line2[40:])
    out, found = stream.flush()
    assert [(f.rule, f.start) for f in found] == [("secrets.private-key", 0)]
    assert out == b"[REDACTED:private_key]\n" and stream.verdict is Verdict.QUARANTINE
    assert stream.close() == (b"", [])
    assert len(stream.findings) == 1


def test_engine_built_findings_are_ordinary_findings() -> None:
    # The engine builds Finding objects through __dict__ for speed; they must compare, hash,
    # replace and serialise exactly like ones made by the constructor.
    from dataclasses import replace

    data = b"key AKIAIOSFODNN7EXAMPLF and card 4111 1111 1111 1111, mail dev@corp.example.com\n"
    findings = Gate(ExternalizationPolicy()).scan(data, "stdout")
    assert findings
    for f in findings:
        twin = Finding(**vars(f))
        assert f == twin and hash(f) == hash(twin) and f.to_dict() == twin.to_dict()
        assert replace(f, line=7).line == 7 and replace(f, line=7) != f
        assert f.source == "stdout" and f.line == 1


def test_apply_with_a_limit_scans_past_it_and_releases_only_up_to_it() -> None:
    gate = Gate(ExternalizationPolicy())
    text = b"x" * 100 + b" alice.smith@corp-example.org tail " + b"bob@corp-example.org"
    cut = 110  # inside alice's address; bob's starts past the cut
    result = gate.apply(text, "stdout", limit=cut)
    assert [(f.rule, f.start, f.end) for f in result.findings] == [("pii.email", 101, cut)]
    assert b"alice" not in result.released and result.released.startswith(b"x" * 100)
    assert result.original == text[:cut]
    assert gate.apply(b"y" * 50, "stdout", limit=cut).released == b"y" * 50
