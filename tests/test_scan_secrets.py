"""The secrets scanner on small hand-written examples (synthetic values, never real keys)."""

from __future__ import annotations

import pytest

from kavach.scanning.findings import Severity
from kavach.scanning.secrets import SecretsScanner

SCANNER = SecretsScanner()

# Synthetic tokens built from their documented shapes.
AWS_ID = "AKIA" + "QWERTYUIOPASDFGH"
AWS_STS = "ASIA" + "Z7X3C5V8B2N4M6L1"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzz9KEYa7cQ"
GH = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"


def rules(text: str) -> list[str]:
    return [f.rule for f in SCANNER.scan(text.encode())]


def one(text: str, rule: str) -> None:
    found = [f for f in SCANNER.scan(text.encode()) if f.rule == rule]
    assert found, f"{rule} not found in {text!r}: {rules(text)}"


@pytest.mark.parametrize(
    ("text", "rule", "severity"),
    [
        (f"export AWS_ACCESS_KEY_ID={AWS_ID}", "secrets.aws-access-key-id", Severity.CRITICAL),
        (f"key: {AWS_STS}", "secrets.aws-access-key-id", Severity.CRITICAL),
        (f"aws_secret_access_key = {AWS_SECRET}", "secrets.aws-secret-access-key", Severity.CRITICAL),
        ("gcp = 'AIza" + "SyD3xQk9Lm2Pq8Rt5Vw7Yz1Ab4Cd6Ef8Gh0'", "secrets.gcp-api-key", Severity.HIGH),
        (f"GITHUB_TOKEN={GH}", "secrets.github-token", Severity.CRITICAL),
        ("gho_" + "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe9Dc8Ba", "secrets.github-token", Severity.CRITICAL),
        ("ghu_" + "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe9Dc8Ba", "secrets.github-token", Severity.CRITICAL),
        ("ghr_" + "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe9Dc8Ba", "secrets.github-token", Severity.CRITICAL),
        ("github_pat_" + "11ABCDEFG0" + "x7" * 36 + "Qz", "secrets.github-fine-grained-pat", Severity.CRITICAL),
        ("stripe.api_key = 'sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc'", "secrets.stripe-secret-key", Severity.CRITICAL),
        ("SLACK=xoxb-" + "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "secrets.slack-token", Severity.HIGH),
        ("OPENAI_API_KEY=sk-proj-" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z", "secrets.openai-api-key", Severity.CRITICAL),
        ("sk-ant-api03-" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z" * 3, "secrets.anthropic-api-key", Severity.CRITICAL),
        ("glpat-" + "Ab3dEf6hIj9kLm2nOp5q", "secrets.gitlab-token", Severity.CRITICAL),
        ("//registry.npmjs.org/:_authToken=npm_" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z7B9c", "secrets.npm-token",
         Severity.CRITICAL),
        ("password = pypi-AgEIcHlwaS5vcmc" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z7B9c0dE2fG4hI6jK8lM0",
         "secrets.pypi-token", Severity.CRITICAL),
        ("SG." + "Ab3dEf6hIj9kLm2nOp5qRs" + "." + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z7B9c0dE2fG4",
         "secrets.sendgrid-api-key", Severity.CRITICAL),
        ("api.telegram.org/bot1234567890:AA" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z7", "secrets.telegram-bot-token", Severity.HIGH),  # noqa: E501
        ("HF_TOKEN=hf_" + "AbcdEfghIjklMnopQrstUvwxYzabCdefGh", "secrets.huggingface-token", Severity.HIGH),
        ("twilio SK" + "0123456789abcdef0123456789abcdef", "secrets.twilio-api-key", Severity.HIGH),
        ("client_secret=bP88Q~" + "rcBcYjzzOhg1Hnn76Wm3jGgakZiZ.8vMgR", "secrets.azure-ad-client-secret",
         Severity.CRITICAL),
    ],
)
def test_provider_tokens_are_found_with_their_severity(text: str, rule: str, severity: Severity) -> None:
    found = [f for f in SCANNER.scan(text.encode()) if f.rule == rule]
    assert found, rules(text)
    assert found[0].severity == severity
    assert found[0].scanner == "secrets"


def test_private_keys_are_critical_whole_blocks() -> None:
    body = "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\nVTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n"  # noqa: E501
    for kind in ("RSA ", "EC ", "OPENSSH ", "ENCRYPTED ", ""):
        text = f"-----BEGIN {kind}PRIVATE KEY-----\n{body}-----END {kind}PRIVATE KEY-----\n"
        found = [f for f in SCANNER.scan(text.encode()) if f.rule == "secrets.private-key"]
        assert found and found[0].severity == Severity.CRITICAL, kind
        assert found[0].start == 0 and text.encode()[found[0].end - 5 : found[0].end] == b"-----"


def test_truncated_private_key_is_still_found() -> None:
    text = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
    one(text, "secrets.private-key")


def test_jwt_and_bearer_tokens_are_high() -> None:
    jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
    found = [f for f in SCANNER.scan(f"token={jwt}".encode()) if f.rule == "secrets.jwt"]
    assert found and found[0].severity == Severity.HIGH
    bearer = "Authorization: Bearer 8f3kd92jf0s9dk3m4n5b6v7c8x9z0a1s"
    found = [f for f in SCANNER.scan(bearer.encode()) if f.category == "auth_header"]
    assert found and found[0].severity == Severity.HIGH


@pytest.mark.parametrize(
    "text",
    [
        'password = "Tr0ub4dor&3x"',  # Python
        "const apiKey = 'q8Zr3Lm0Xv7Nb2Kc5Jd9Hf4Gs1'",  # JS
        "db_password: Tr0ub4dor3x",  # YAML
        '{"client_secret": "q8Zr3Lm0Xv7Nb2Kc5Jd9Hf4Gs1"}',  # JSON
        "secret_key = q8Zr3Lm0Xv7Nb2Kc5Jd9Hf4Gs1",  # INI
        "API_TOKEN=q8Zr3Lm0Xv7Nb2Kc5Jd9Hf4Gs1",  # .env
        "export DB_PASS='Tr0ub4dor&3x'",  # shell
        "<password>Tr0ub4dor3x</password>",  # XML element
        '<add key="ApiSecret" value="q8Zr3Lm0Xv7Nb2Kc5Jd9Hf4Gs1" />',  # XML attribute pair
        "mysql -u root -pTr0ub4dor3x db",  # CLI
        "$password = 'Tr0ub4dor&3x';",  # PHP
    ],
)
def test_keyword_assignments_across_syntaxes(text: str) -> None:
    found = [f for f in SCANNER.scan(text.encode()) if f.category == "password"]
    assert found, text
    value = text.encode()[found[0].start : found[0].end]
    assert value in (b"Tr0ub4dor&3x", b"Tr0ub4dor3x", b"q8Zr3Lm0Xv7Nb2Kc5Jd9Hf4Gs1"), value


@pytest.mark.parametrize(
    "text",
    [
        "password = ${DB_PASSWORD}",
        "password: '{{ vault_password }}'",
        "api_key = '<your-api-key>'",
        "token = 'xxxxxxxxxxxxxxxx'",
        "password = changeme",
        "secret = 'example-secret'",
        "password = os.environ['DB_PASSWORD']",
        "password = self.password",
        "token: str",
        "Enter password: ",
        "api_key = None",
        "aws_access_key_id = AKIAXXXXXXXXXXXXXXXX",
        "AKIAIOSFODNN7EXAMPLE",
        "password_length = 12",
    ],
)
def test_placeholders_and_references_are_not_secrets(text: str) -> None:
    assert [f for f in SCANNER.scan(text.encode()) if f.severity >= Severity.MEDIUM] == [], text


def test_connection_strings_with_credentials_are_critical() -> None:
    found = SCANNER.scan(b"DATABASE_URL=postgres://app:Xk9mQ2vL7pR4@db.internal:5432/app")
    assert [f.rule for f in found] == ["secrets.db-connection-string"]
    assert found[0].severity == Severity.CRITICAL
    assert b"postgres://app:Xk9mQ2vL7pR4@db"[15:27] == b"Xk9mQ2vL7pR4"
    assert SCANNER.scan(b"postgres://app:${DB_PASSWORD}@db:5432/app") == []


def test_every_match_is_reported_with_lines_and_byte_spans() -> None:
    text = f"a={AWS_ID}\nb={AWS_STS}\n\nc={AWS_ID}\n".encode()
    found = [f for f in SCANNER.scan(text) if f.rule == "secrets.aws-access-key-id"]
    assert [f.line for f in found] == [1, 2, 4]
    for f in found:
        assert text[f.start : f.end] in (AWS_ID.encode(), AWS_STS.encode())


def test_evidence_never_contains_the_secret() -> None:
    for f in SCANNER.scan(f"{GH} {AWS_ID} password='Tr0ub4dor&3x'".encode()):
        assert GH not in f.evidence and AWS_ID not in f.evidence and "Tr0ub4dor" not in f.evidence
        assert "chars" in f.evidence


def test_email_is_low_and_ssn_is_found() -> None:
    found = {f.rule: f for f in SCANNER.scan(b"mail alice@example.org ssn 123-45-6789")}
    assert found["pii.email"].severity == Severity.LOW
    assert "pii.ssn" not in found  # 123-45-6789 is the famous sample number, never issued
    found = {f.rule: f for f in SCANNER.scan(b"ssn: 536-22-8172")}
    assert found["pii.ssn"].severity == Severity.HIGH


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("INWX_PASSWORD=iekkuzmsmu \\", b"iekkuzmsmu"),  # .env / shell: an unquoted word is a literal
        ("  password: mdmtsv", b"mdmtsv"),  # YAML
        ("var jfrogToken string = \"8ip0epqt83v2b55ib1yls9ymzbp4vx2tfd7ukidx4pcca4\"",
         b"8ip0epqt83v2b55ib1yls9ymzbp4vx2tfd7ukidx4pcca4"),  # Go typed declaration
        ("<etsyToken>\n    oyglweb05d3ho3w6fvcr7vik\n</etsyToken>", b"oyglweb05d3ho3w6fvcr7vik"),
        ("gpg --decrypt --passphrase N1DdkUD3E73 --output x", b"N1DdkUD3E73"),
        ("nats-route://ruser:vkb_nhwwmd@10.1.2.3:5244", b"vkb_nhwwmd"),
        ("LIQUID_WEB_PASSWORD=dcojuynu", b"dcojuynu"),  # "ID_" inside LIQUID_ is not an id
        ("export LASTFM_KEY=b2c9fb7a1a8f541d6089140692faf70a", b"b2c9fb7a1a8f541d6089140692faf70a"),
        ("define('DB_PASSWORD', '2Arh5dA1Sn0ywiVYdnpwr3a');", b"2Arh5dA1Sn0ywiVYdnpwr3a"),
        ("'access_key' => '8zBhTTWfBKWP9hJ8wunD7zMaEvWOGg',", b"8zBhTTWfBKWP9hJ8wunD7zMaEvWOGg"),
    ],
)
def test_config_and_cli_literals(text: str, value: bytes) -> None:
    data = text.encode()
    assert value in [data[f.start : f.end] for f in SCANNER.scan(data) if f.severity >= Severity.MEDIUM]


@pytest.mark.parametrize(
    "text",
    [
        "password = password_input",  # code: a variable
        "apiKey:   correctAPIKey,",  # an identifier that names itself
        'public const string AuthenticationModes = "GCM_GITHUB_AUTHMODES";',  # a constant's name
        'public const string OAuthClientId = "0120e057bd645470c1ed";',  # an id, not a secret
        "[azure-tokens]: azrepos-users-and-tokens.md",  # a markdown link
        "password: $2a$10$LoRPzN3GtF2pNX5QgCBBHeUr6/zVN./RVGOu5U8SpHyg2sfzvfXji",  # a bcrypt hash
        'new Uri("http://john.doe:letmein123@proxy.example.com")',  # documentation host
        'AUTODNS_API_PASSWORD = "User Password"',  # prose
        "SORT_KEY=name",  # a word, not a key
        "CLIENT_ID_TOKEN_URL=https://login.example.com/oauth",  # a URL setting
    ],
)
def test_names_hashes_and_examples_are_not_secrets(text: str) -> None:
    assert [f for f in SCANNER.scan(text.encode()) if f.severity >= Severity.MEDIUM] == [], text


@pytest.mark.parametrize(
    "text",
    [
        "request 6f0c2a9e-3b71-4d8a-9c52-e1f47b3a8d06 completed in 12 ms",
        'X-Request-ID: 9b2f61c4-77aa-4e0b-a1d3-5c8e2f4b6d10',
        "9b2f61c4-77aa-4e0b-a1d3-5c8e2f4b6d10   nginx:1.25   Up 3 minutes",
        '{"id": "3f2a9b1c-4d5e-4f60-8a7b-9c0d1e2f3a4b", "status": "ok"}',
    ],
)
def test_bare_uuids_in_ordinary_output_are_not_secrets(text: str) -> None:
    # Request, container and resource ids are everywhere in tool output; redacting them
    # would break the agent's next command.
    assert [f for f in SCANNER.scan(text.encode()) if f.severity >= Severity.MEDIUM] == [], text


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ('storage account key 6f0c2a9e-3b71-4d8a-9c52-e1f47b3a8d06', "secrets.uuid"),
        ('const string tenantId = "6f0c2a9e-3b71-4d8a-9c52-e1f47b3a8d06";', "secrets.uuid"),
        ('{"appid":"wx5c9e1f03a7b24d68","attach":"x"}', "secrets.wechat-app-id"),
        ("TWILIO_SID=AC" + "3f9a1c7e5b2d8046f1a9c3e7b5d20486", "secrets.twilio-account-sid"),
        # Named only "key": one machine-made token (base32, hex, base64) is reported.
        ('    nkey = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4"', "secrets.password-assignment"),
        ("\tconst KEY = '9f2c1b7e4a6d08e35c9b1f7a2d4e6c80';", "secrets.password-assignment"),
        # Lower-case letters no language strings together, under a key-named variable.
        ("EXOSCALE_API_KEY=hkrnkcjlaxjmwmtvjawnkjep", "secrets.password-assignment"),
        # An unquoted literal followed by more command-line flags is still a literal.
        ("msfvenom -p windows/adduser USER=backdoor PASS=ujyadfys759 -f msi", "secrets.password-assignment"),
        ('url.Parse("nats://deploy:Xk9mQ2vL7pR4@10.0.0.5:4222")', "secrets.url-credentials"),
    ],
)
def test_token_shaped_identifiers_and_key_named_tokens(text: str, rule: str) -> None:
    one(text, rule)


@pytest.mark.parametrize(
    "text",
    [
        '"id": "00000000-0000-0000-0000-000000000000",',  # nil UUID
        'gpo-id "12345677-ABCD-9876-ABCD-123456789012"',  # typed by a person
        "BAIT: bace4d59-fa7e-beef-cafe-9129474bcd81",  # hexspeak
        "wx123456dead1beef0",
        '"key": "windows-7",',  # a dictionary's key, not a secret
        "'key': '/test-path'",
        '"DetectKeyPhrases": "comprehend:DetectKeyPhrases",',
        'public_key = "UD466L6EBCM3YY5HEGHJANNTN4LSKTSUXTH7RILHCKEQMQHTBNLHJJXT"',  # meant to be shared
        "translation_key = 'developmentenvironments'",  # words, not a token
        "        $password = Yii::$app->request->post('password');",  # code: scope and member access
        "  mimikatz # token::elevate",
        "'passthroughBehavior': 'when_no_match',",  # "pass" inside another word
        "GRAYLOG_SHA256_PASSWORD=" + "b1cb6e31e172577918c9e7806c572b5e" * 2,  # a digest, not the password
        "MAILU_PASSWORD_SCHEME=SHA512-CRYPT",
        "'authorizerCredentials': 'arn:role',",  # words joined by separators: a label
        '  users: [ { user: auth, password: admin } ]',  # documentation stand-ins
        'private const string MOCK_ACCESS_TOKEN = "at-0987654321";',  # typed digit run
        'const testPassword = "basicPass";',  # names itself
        "JOKER_PASSWORD=<your password> \\",  # a template slot
        "        $API_Password   = $this->_password;",  # variable references
        '        $passwordElement = $doc.CreateElement("add")',
        "$SecPassword = ConvertTo-SecureString '<Wtver>' -AsPlainText -Force",  # a command, its argument a slot
        "userPassword:2.5.13.18:=\\xx",  # an OID
        'u, _ := url.Parse("nats://user1:pwd1@host2:5222")',  # URL passwords that name themselves
        "-u http://admin:admin@docker.registry.local",
        "http://google.com:80?@www.whitelisteddomain.tld/",  # '@' in a query, no userinfo
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMj...Fh7HgQ",  # an elided JWT
    ],
)
def test_made_up_ids_and_ordinary_keys_are_not_secrets(text: str) -> None:
    assert [f for f in SCANNER.scan(text.encode()) if f.severity >= Severity.MEDIUM] == [], rules(text)


def test_a_uuid_assigned_to_a_secret_name_is_one_finding() -> None:
    text = b'client_secret = "6f0c2a9e-3b71-4d8a-9c52-e1f47b3a8d06"'
    assert [f.rule for f in SCANNER.scan(text)] == ["secrets.password-assignment"]
