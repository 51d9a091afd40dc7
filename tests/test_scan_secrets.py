"""The secrets scanner on small hand-written examples (synthetic values, never real keys)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
        (
            "//registry.npmjs.org/:_authToken=npm_" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z7B9c",
            "secrets.npm-token",
            Severity.CRITICAL,
        ),
        (
            "password = pypi-AgEIcHlwaS5vcmc" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z7B9c0dE2fG4hI6jK8lM0",
            "secrets.pypi-token",
            Severity.CRITICAL,
        ),
        (
            "SG." + "Ab3dEf6hIj9kLm2nOp5qRs" + "." + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z7B9c0dE2fG4",
            "secrets.sendgrid-api-key",
            Severity.CRITICAL,
        ),
        (
            "api.telegram.org/bot1234567890:AA" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z7",
            "secrets.telegram-bot-token",
            Severity.HIGH,
        ),
        ("HF_TOKEN=hf_" + "AbcdEfghIjklMnopQrstUvwxYzabCdefGh", "secrets.huggingface-token", Severity.HIGH),
        ("twilio SK" + "0123456789abcdef0123456789abcdef", "secrets.twilio-api-key", Severity.HIGH),
        (
            "client_secret=bP88Q~" + "rcBcYjzzOhg1Hnn76Wm3jGgakZiZ.8vMgR",
            "secrets.azure-ad-client-secret",
            Severity.CRITICAL,
        ),
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
        (
            'var jfrogToken string = "8ip0epqt83v2b55ib1yls9ymzbp4vx2tfd7ukidx4pcca4"',
            b"8ip0epqt83v2b55ib1yls9ymzbp4vx2tfd7ukidx4pcca4",
        ),  # Go typed declaration
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
        "X-Request-ID: 9b2f61c4-77aa-4e0b-a1d3-5c8e2f4b6d10",
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
        ("storage account key 6f0c2a9e-3b71-4d8a-9c52-e1f47b3a8d06", "secrets.uuid"),
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
        "  users: [ { user: auth, password: admin } ]",  # documentation stand-ins
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


# --- generic assignments: values the length-aware tests used to miss --------------------------

RSA_DER = (  # a synthetic PKCS#1 header (30 82 04 a4 02 01 00 02 82 01 01 00) and random bytes
    "MIIEpAIBAAKCAQEA5u0oNW7k9sUH26Y+BCXsiwOGFi+cRNmcfiUC1XjBV3/sH3LbyU3+d55jslsr34dxq6/CCKZQOh13f++z1nkdOZnq"
    "gFX46yqNWqke0JfYFWw3VzkSbClTi5CRXWS3vp+iAwbs+KPefF8a028CokzqDpl0ace4iYq9PptNgQA8SdLyTM3NcAgA9FHyiRVNOsj9"
    "WQb0iGF3rUWfgKGo2aFsdjbo7JxBVxpWtaAwp4tzVAuboFqR3z0kyqQqAfmURlcz9PmhizTvPNB+vH85PFamvGRhvYl+0hBb5Jwl1rmU"
)
RSA_PUBLIC_DER = (  # SubjectPublicKeyInfo: meant to be shared
    "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEATCSs4UdaAtKVvbhLm/xU8YOMmvpEFcfwrN2jozcxYzr4og/vUjQ0/jkuLT+O"
    "SGF+QC7w/xSKAGd78KntfLQ8iEi/lCzppf1uGC4PnIw01fF976m+EuzPtWzE4wNQhl5yXrEpXu8FBBuuti8DWXMK1kSY/FOCtLjVNlqH"
)


def found_values(text: str) -> list[bytes]:
    data = text.encode()
    return [data[f.start : f.end] for f in SCANNER.scan(data) if f.severity >= Severity.MEDIUM]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        # Random letters between dashes are not "words joined by separators": the letter
        # pairs (jc, wg, gz, qn ...) are ones words do not contain.
        ("DNS_SECRET_KEY=jcoawgzu-cpuy-tjro-jtyc-kpeijujyqnkv \\", b"jcoawgzu-cpuy-tjro-jtyc-kpeijujyqnkv"),
        ("DESEC_TOKEN=k-wdtayckjyusoncnpojaqtofbs", b"k-wdtayckjyusoncnpojaqtofbs"),
        # Mixed-case random letters are not a camelCase identifier.
        ("APP_SECRET_KEY=UulakqEfCuawyiXb", b"UulakqEfCuawyiXb"),
        # A camelCase "Auth" word names an auth value (OAuth, Author, Authority do not).
        ('            const string expectedAuthCode = "4e9b07c1d3";', b"4e9b07c1d3"),
        ('\tkeyAuth := "eQSbfOdwPr=="', b"eQSbfOdwPr=="),
        # Short random hex under a secret's name (entropy alone rejects a quarter of them).
        ('            const string expectedClientSecret = "0C61707A2A04";', b"0C61707A2A04"),
        # Random digit tokens of 16+ digits (the old 3.0-bit bar failed most of them).
        ("PAYMENT_ACCESS_TOKEN=5260181590830166 \\", b"5260181590830166"),
        # A quoted password with punctuation the unquoted-value pattern stops at.
        ('const BCRYPT_AUTH_PASS = "Zr8(q!Lw@3vT;x^%"', b"Zr8(q!Lw@3vT;x^%"),
        # Unquoted base64 with '/' is a key or salt, not a path.
        (
            "      salt      : 2QJSNA3PLINwPBA8vAltmclw1IS/KnuVbezquFmfnfsw=",
            b"2QJSNA3PLINwPBA8vAltmclw1IS/KnuVbezquFmfnfsw=",
        ),
    ],
)
def test_random_values_under_secret_names(text: str, value: bytes) -> None:
    assert value in found_values(text), rules(text)


@pytest.mark.parametrize(
    "text",
    [
        "JSON Web Token : `Base64(Header).Base64(Data).Base64(Signature)`",  # an expression
        '{"secretKey": "ENC(2dfRFqV/cS6TzRd+JyO=)"}',  # jasypt ciphertext, meant to be stored
        'MAILU_AUTH_RATELIMIT="10/minute;1000/hour"',  # a rate limit
        '            const string clientSecret = "a1b2c3d4e5";',  # typed: a-e interleaved with 1-5
        '<meta name="csrf-token" content="x"> csrf-token=Mj2qykJO5rELyHgezQ69nzUX0i3OH67V7+V4eUrLfpuyOu==',
        "   secret: conf/Secret1/Key2",  # a path, each part a word
        "    TOKEN: AgBBiBMOJxOs213QLtsh0WervLN+kdqwhsihaev4RJNevdLb4j4CC7YM/oLRkWxL9rG91LUO0aHzWy2S56df6UaE7DOF9"
        "llDDv4RJNevdLb4j4CC7YM/oLRkWxL9rG91LUAGo2DVFx2zgmbEXo2bzrSiVEDAgBBiBMOJxOs213QLtsh0WervLN+kdqwhsihaev4R"
        "JNevdLb4j4CC7YM/oLRkWxL9rG91LUO0aHzWy2S56df6UaE7DOF9",  # a SealedSecret ciphertext
        "    RECAPTCHA_SITE_KEY=6LcPSWTekyzecegdyqnworyxalzimeibmomj",  # a site key is public by design
    ],
)
def test_expressions_ciphertexts_and_public_values_are_not_secrets(text: str) -> None:
    assert found_values(text) == [], rules(text)


def test_credentials_in_proxy_urls_are_found_for_registered_sample_domains() -> None:
    # contoso.com resolves; only the RFC 2606 reserved names are certainly not in use.
    for text in (
        "git config --global credential.httpsProxy http://john.doe:Wq7zvfuc@proxy.contoso.com",
        "export HTTPS_PROXY=http://john.doe:Wq7zvfuc@proxy.corp.contoso.com:8080",
    ):
        assert b"Wq7zvfuc" in found_values(text), text
    assert found_values("export HTTPS_PROXY=http://john.doe:Wq7zvfuc@proxy.example.com:8080") == []


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("CREATE USER app WITH PASSWORD 'k7Hq2mZp';", b"k7Hq2mZp"),
        ("ALTER ROLE app WITH ENCRYPTED PASSWORD 'k7Hq2mZp' LOGIN;", b"k7Hq2mZp"),
        ("CREATE USER 'app'@'%' IDENTIFIED BY 'k7Hq2mZp';", b"k7Hq2mZp"),
        ("ALTER USER 'root'@'localhost' IDENTIFIED WITH mysql_native_password BY 'k7Hq2mZp';", b"k7Hq2mZp"),
        ("create user scott identified by tiger42 default tablespace users;", b"tiger42"),  # Oracle
        ("CREATE LOGIN app WITH PASSWORD = N'k7Hq2mZp!';", b"k7Hq2mZp!"),  # SQL Server
        ("SET PASSWORD FOR 'app'@'localhost' = PASSWORD('k7Hq2mZp');", b"k7Hq2mZp"),
    ],
)
def test_sql_passwords(text: str, value: bytes) -> None:
    assert value in found_values(text), rules(text)
    assert any(f.rule == "secrets.sql-password" for f in SCANNER.scan(text.encode()))


@pytest.mark.parametrize(
    "text",
    [
        "Each user is identified by their email address.",
        "GRANT ALL ON db.* TO 'bob'@'%' IDENTIFIED BY PASSWORD '*6BB4837EB74329105EE4568DDA7DC67ED2CA2AD9';",
        "ALTER USER app WITH PASSWORD '${APP_PW}';",
        'cursor.execute("CREATE USER %s WITH PASSWORD %s", (user, pw))',
        "ALTER USER app WITH PASSWORD 'md5a3556571e93b0d20722ba62be61e8c2d';",  # a stored hash
    ],
)
def test_sql_parameters_hashes_and_prose_are_not_passwords(text: str) -> None:
    assert found_values(text) == [], rules(text)


def test_private_key_bodies_without_pem_lines() -> None:
    for text in (
        f"'rsaPrivateKey' => '{RSA_DER}',",
        f'options.ClientSecret = "{RSA_DER}";',
        f's:15:"rsa_private_key";s:1592:"{RSA_DER}";',
    ):
        found = [f for f in SCANNER.scan(text.encode()) if f.rule == "secrets.private-key"]
        assert found and found[0].severity == Severity.CRITICAL, text
        assert text.encode()[found[0].start : found[0].end] == RSA_DER.encode()
    assert [
        f for f in SCANNER.scan(f"'alipayPublicKey' => '{RSA_PUBLIC_DER}',".encode()) if f.rule == "secrets.private-key"
    ] == []
    assert found_values("rsa key: MIIEpAIBAAKCAQEA...") == []  # elided


@pytest.mark.parametrize(
    "text",
    [
        "-----BEGIN RSA PRIVATE KEY-----\nBIIEogIBAAk15x0ID[...]\n[...]\n-----END RSA PRIVATE KEY-----",  # elided
        '$res = "-----BEGIN RSA PRIVATE KEY-----\\n" .\n    wordwrap($priKey, 64, "\\n", true) .\n'
        '    "\\n-----END RSA PRIVATE KEY-----";',  # code that assembles a key at run time
    ],
)
def test_pem_frames_without_key_material_are_not_keys(text: str) -> None:
    assert [f for f in SCANNER.scan(text.encode()) if f.rule == "secrets.private-key"] == []


def test_mailgun_private_api_key() -> None:
    text = '"credentials":{"ops@mg.example.org":"0ab181d82e96de5c945d3f3126b48ba6-2ddf84e1-f4a177bc"}'
    one(text, "secrets.mailgun-api-key")
    assert found_values("0ab181d82e96de5c945d3f3126b48ba6-00000000-00000000") == []


@pytest.mark.parametrize(
    "text",
    [
        "* `-pwd-last-set`: Shows pwdLastSet attribute for each account.",  # a sentence after "pwd:"
        '--auth "user:pass" : Creds required to connect to the server',
        '2,5,T,Pw.qc=!0,Pw.Tb="cljs.core.async/t_cljs$core$async43126",Pw.Ec=function(){}',  # a member of Pw
        "                password: string.Empty);",  # C# named argument: a member, not a literal
        "      --password=NATS_PASSWORD  Password",  # a flag's documentation: the value names itself
        "./revsocks -connect 10.10.10.10:8443 -pass Password1234 -proxy proxy.local:3128",
        "./enumerate-iam.py --access-key AKIA... --secret-key StF0q...",  # elided
        "eyJ0eXAiOiJKV1QiLCJhbGciOiJub25lIn0.eyJsb2dpbiI6InRlc3QiLCJpYXQiOiIxNTA3NzU1NTcwIn0.",  # alg none, unsigned
        "f=function(e,t){e&&(s.executeDispatchesInOrder(e,t),e.isPersistent()",  # minified JS, not a Vault token
        '"uri": "https://api.example.org/show.json?access_token=secret-access-token&uid=34c4eae1-c0d3-4dd9-8738-3364a5177b0f"',
        '\tfakeAPIKey         = "asdf1234"',  # keyboard-run stand-in
    ],
)
def test_prose_members_stand_ins_and_unsigned_tokens_are_not_secrets(text: str) -> None:
    assert found_values(text) == [], rules(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("admin password: k7Hq2mZp for the admin account", b"k7Hq2mZp"),  # a random value, then prose
        ('config.password = "k7Hq2mZp!";', b"k7Hq2mZp!"),  # the dotted name's last part holds it
        ("spring.datasource.password: k7Hq2mZp", b"k7Hq2mZp"),
        ("vault login s.5CNGwTsLiI845NHdphC7FoGu", b"s.5CNGwTsLiI845NHdphC7FoGu"),
        ('$herokuToken .= "e4ef6884-3a7a-43d6-82c0-4cbc4276ffca"', b"e4ef6884-3a7a-43d6-82c0-4cbc4276ffca"),
        # HMAC keys that sign cookies / ViewState (forgeable when leaked).
        (
            "            'cookieValidationKey' => 'Q5i127brjr4c-K71_3JxnZo-9JFaqMCg#@#@',",
            b"Q5i127brjr4c-K71_3JxnZo-9JFaqMCg#@#@",
        ),
        (
            '<machineKey validationKey="9F1B7C2E4A6D8F0A1C3E5B7D9F1A3C5E7B9D1F3A" decryption="AES" />',
            b"9F1B7C2E4A6D8F0A1C3E5B7D9F1A3C5E7B9D1F3A",
        ),
    ],
)
def test_secrets_beside_prose_in_dotted_names_and_hmac_keys(text: str, value: bytes) -> None:
    assert value in found_values(text), rules(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        # A password compared against a literal is hard-coded.
        ('\tif updated.Password != "O3dL4uq7d" {', b"O3dL4uq7d"),
        ('if (password !== "PaS5w0rD2#"){', b"PaS5w0rD2#"),
        # PHP serialize() output, e.g. a config row in an SQL dump.
        ('a:2:{s:10:"paypal_env";s:6:"sandbox";s:15:"paypal_password";s:16:"OO7JAOEWCQ5FQJZX";}', b"OO7JAOEWCQ5FQJZX"),
    ],
)
def test_comparisons_and_php_serialized_values(text: str, value: bytes) -> None:
    assert value in found_values(text), rules(text)


def test_php_serialized_ordinary_values_are_not_secrets() -> None:
    text = 'a:3:{s:3:"key";s:4:"lang";s:8:"password";s:0:"";s:9:"token_ttl";s:4:"3600";}'
    assert found_values(text) == [], rules(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('$atlassianToken .= "p0jiqm09d86j0rr4tr5n5914";', b"p0jiqm09d86j0rr4tr5n5914"),  # PHP append
        ('DEPLOY_TOKEN ?= "q8Zr3Lm0Xv7Nb2Kc5Jd9Hf4Gs1"', b"q8Zr3Lm0Xv7Nb2Kc5Jd9Hf4Gs1"),  # Makefile
        ('DEPLOY_TOKEN ::= "q8Zr3Lm0Xv7Nb2Kc5Jd9Hf4Gs1"', b"q8Zr3Lm0Xv7Nb2Kc5Jd9Hf4Gs1"),
        ('DEPLOY_TOKEN :::= "q8Zr3Lm0Xv7Nb2Kc5Jd9Hf4Gs1"', b"q8Zr3Lm0Xv7Nb2Kc5Jd9Hf4Gs1"),
        # A name and a value passed together to a call.
        (
            'System.setProperty("CODECOV_TOKEN", "1vve0m6596424kr7tz8qqtac33wo62n4");',
            b"1vve0m6596424kr7tz8qqtac33wo62n4",
        ),
        ('os.Setenv("DB_PASSWORD", "Tr0ub4dor&3x")', b"Tr0ub4dor&3x"),
        ("headers.put('X-Api-Key', 'q8Zr3Lm0Xv7Nb2Kc5Jd9Hf4Gs1');", b"q8Zr3Lm0Xv7Nb2Kc5Jd9Hf4Gs1"),
    ],
)
def test_makefile_append_and_call_pair_assignments(text: str, value: bytes) -> None:
    assert value in found_values(text), rules(text)


@pytest.mark.parametrize(
    "text",
    [
        'token = os.getenv("API_TOKEN", "")',
        'key = os.environ.get("SECRET_KEY", "changeme")',
        'i18n.add("password", "Mot de passe")',  # a translation
        'parser.add_argument("--password", "-p")',
        "$password .= $chars[rand(0, 61)];",  # code building a random password
        "PASSWORD ?= $(shell cat /run/secrets/db)",
    ],
)
def test_call_pairs_and_appends_of_code_or_stand_ins_are_not_secrets(text: str) -> None:
    assert found_values(text) == [], rules(text)


def test_url_query_values_end_at_the_next_parameter() -> None:
    text = 'fetch("https://api.example.org/v1/js?key=dhd0lCQVFRZ0ViVnpmUGWxhQW9KQWwrLzZY&format=json")'
    assert found_values(text) == [b"dhd0lCQVFRZ0ViVnpmUGWxhQW9KQWwrLzZY"], rules(text)
    # The next parameter is not part of the value: "secret-access-token" names itself.
    assert found_values("/oauth?access_token=secret-access-token&uid=7f2c9e41b85d") == []


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("DOCKER_PAT=dckr_pat_" + "mcF-hLK_JoBxXUNJy1kU7-WSbk0", "secrets.docker-hub-token"),
        (
            "docker swarm join --token SWMTKN-1-" + "edmua5ub12inlget8wkvz35kckxkeyznuvc49brsy84wgfssrw"
            "-otjll8wdy3yikfrksskvqzqh1",
            "secrets.docker-swarm-token",
        ),
        ("unlock key: SWMKEY-1-" + "fySn8TY4w5lKcWcJPIpKufejh9hxx5KYwx6XZigx3Q4", "secrets.docker-swarm-token"),
        ("X-Figma-Token: figd_" + "h65Ugiu76WD3xf233a6KAmo9ZmbWNnNrny9Q6IHl", "secrets.figma-token"),
        ("glrtr-" + "KZX7Mizo7RYFKh2JScz6aeqZ3WG8nxujE21QpZVIr", "secrets.gitlab-token"),
        (
            "refresh_token: 1//0" + "T4eRe15N0tT4Et0kEHY0U4Rel0Ok1ng4-hPyg7SWC7tZ1WE5vZvtCwqrJF9rLsyiKFeD",
            "secrets.gcp-oauth-refresh-token",
        ),
        (
            "var dropbox = 'sl." + "BdmpmC82mhhySscKk2oQGyE5l--8LdAQftLTXVGQhP39Z8FtAK1BhePhyevurA-Elt7ToIr6Opwz"
            "KAYE7RBqpu6VVyQU5WlCTL_Q7N4gElXahaWou6aPpOIwgGCIOq9aeC3YFoc';",
            "secrets.dropbox-token",
        ),
    ],
)
def test_more_provider_tokens(text: str, rule: str) -> None:
    one(text, rule)


def test_a_sentence_written_in_a_token_shape_is_not_a_token() -> None:
    text = "SWMTKN-1-7here4ar3not7he7oken5you4re1ooking4or1samplingonly-nh7cr8ap4o4fl58ektr42c8ek"
    assert found_values(text) == [], rules(text)


@pytest.mark.parametrize(
    "text",
    [
        "xoxb-xoxb-my-bot-token",  # Slack tokens carry a workspace/user id or are long and random
        "xoxp-1234-1234-1234-4ddbc191",
        "xoxe.xoxp-1-SlackAppConfigurationAccessTokenHere",
        "https://indieweb.org/images/3/35/2018-250-xoxo-indieweb-1.jpg",
        "http://assets.example.org/media/video_box.ico-7a388b69018576d24b59331fd60aab0c.png",  # asset fingerprint
        '<input type="hidden" name="authenticity_token" value="7SWa-Fo1_hsC6oovfBsJFLGPUl2EhkSWPbJhWANwgaJWB" />',
        "pub const X509_pubkey_st = struct_X509_pubkey_st;",  # a public key's type name
        'pub const SN_id_Gost28147_89_None_KeyMeshing = "id-Gost28147-89-None-KeyMeshing"',  # spells its name
        '   API_KEY="glc_111111111111111111111111111111111111111111="',  # one character is most of it
        "            fn::secret: ops_eyJzaWduSW5B...",  # elided
        '"token1": "xoxp-1234567890"',
    ],
)
def test_fillers_elisions_and_misshapen_tokens_are_not_secrets(text: str) -> None:
    assert found_values(text) == [], rules(text)


@pytest.mark.parametrize(
    "text",
    [
        "SLACK_BOT_TOKEN=xoxb-" + "1234567890-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
        "xoxp-1-" + "Mi0yLTM5MTgwOTU0ODI3NC0xMDUzMjc0NTg2MzIxLTQyMzYyMTI3NjY3ODktMzQyNTQ1OTI1NzAzOC1mZjYzNzlj",
    ],
)
def test_slack_tokens_with_ids_or_random_bodies(text: str) -> None:
    one(text, "secrets.slack-token")


def test_html_escaped_quotes_are_quotes() -> None:
    text = '<a href="https://api.example.org?token=&quot;g1re0g1T0keN3zWx&quot;">TokenRequest</a>'
    assert any(v.endswith(b"g1re0g1T0keN3zWx") for v in found_values(text)), rules(text)
    text = "    nkey: &#39;UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4&#39;,"
    assert any(v.endswith(b"UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4") for v in found_values(text))
    # The escaped value names itself: a documentation stand-in.
    assert found_values("NATS.connect({url: server.nats, user: &#34;myname&#34;, pass: &#34;password&#34;});") == []


@pytest.mark.parametrize(
    "text",
    [
        '{"auth_user":"dGVzda==", "auth_pass":"[FUZZ]"}',  # the account's user name, and a fuzzer slot
        'var pw="__closure_events_fn_"+(1E9*Math.random()>>>0);',  # a property name
    ],
)
def test_user_names_and_symbol_names_are_not_secrets(text: str) -> None:
    assert found_values(text) == [], rules(text)


@pytest.mark.parametrize(
    "text",
    [
        'passes = "cackle!"',  # "pass" in passes
        "PWR_MGM: N0tThePSw45f!!!",  # "pw" in PWR (power)
        '"stopword": "FLUGGANKECHIOLEN"',  # "pw" in stopword
        'fp_tokenized_value="b035d48j9X2dfjF0hb9sd8Guf5hWu2ia"',  # "token" in tokenized
        '        "pass_mask64": "0x81103c1452dd61cd",',  # a bit mask
        'password = "0xAb19D82E7f546cC3"',  # an integer literal
        '<mxCell value="&lt;div&gt;- password: String&lt;/div&gt;&lt;div&gt;- salt: String&lt;/div&gt;" />',
    ],
)
def test_words_containing_keywords_numbers_and_escaped_markup_are_not_secrets(text: str) -> None:
    assert found_values(text) == [], rules(text)


def test_a_256_bit_hex_key_is_still_a_key() -> None:
    key = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
    assert key.encode() in found_values(f"PRIVATE_KEY={key}")
    assert b"k7Hq2mZp" in found_values("PWR_MGM_PASSWORD: k7Hq2mZp")  # another secret word remains


def test_a_query_value_in_quotes_is_judged_once() -> None:
    # Cutting at '&' and running to the closing quote undo each other; a reshaped value is
    # never reshaped again (this input used to recurse until RecursionError).
    for text in (
        'GET /x?token="abc&def"',
        'https://a.example/c?api_key="Xk9mQ2vL7pR4aBcD&x=1"',
        "?secret='q&#34;r&amp;s'&t=1",
    ):
        SCANNER.scan(text.encode())


# Pieces that steer the value validators into their reshaping paths.
_TRICKY = st.sampled_from(
    [
        "?",
        "&",
        "#",
        "=",
        ":",
        '"',
        "'",
        "`",
        ";",
        "&quot;",
        "&#34;",
        "&lt;",
        "&amp;",
        "token",
        "password",
        "api_key",
        "key",
        "Auth",
        "secret",
        " ",
        "\\",
        "(",
        ")",
        "Xk9mQ2vL7pR4aBcD",
        "0x",
        "...",
        "__",
        "s:8:",
        '";s:',
        "\n",
        "-----BEGIN RSA PRIVATE KEY-----",
        "MIIEpAIBAAK",
        "identified by ",
        "xoxb-",
        '?token="',
        "&api_key='",
        "password: &quot;",
        "abc",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_TRICKY, min_size=1, max_size=30))
def test_validators_terminate_on_any_arrangement_of_tricky_pieces(pieces: list[str]) -> None:
    data = "".join(pieces).encode()
    for f in SCANNER.scan(data):
        assert 0 <= f.start < f.end <= len(data)


@pytest.mark.parametrize("before", ["", "x" * 6000 + "\n", "a bot\n" + "y" * 6000 + "\n"])
def test_a_discord_bot_token_is_found_wherever_it_is_and_whatever_surrounds_it(before: str) -> None:
    # The prefilter once looked for "discord" or "bot" near the token (not part of it): the
    # same token was found or missed depending on unrelated text in its 4 KiB window.
    token = "MTA4NzY1NDMyMTA5ODc2NTQz.GhT3kX.aB9cD8eF7gH6iJ5kLm4N3oP2qR1sT0uVwXyZ"
    assert rules(before + "value " + token + "\n") == ["secrets.discord-bot-token"]
