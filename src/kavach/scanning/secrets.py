"""The secrets scanner: provider tokens, private keys, credentials in code and config.

Three kinds of rules, all RE2 (linear time) over bytes:

* **Provider rules** match a token by its documented shape (``AKIA...``, ``ghp_...``,
  ``sk-ant-...``, ``xoxb-...``) with word boundaries; the prefix alone makes them precise.
* **Structural rules** match PEM private keys, JWTs, ``Authorization`` headers and URLs
  with credentials (``postgres://user:pass@host``).
* **Keyword + assignment rules** extract the value assigned to a secret-looking name in
  Python, JS, YAML, JSON, INI, ``.env``, shell and XML syntaxes. Only that extracted value
  is judged: placeholders and templates are dropped, code references (``os.environ[...]``,
  ``self.password``) are dropped, and key/token values must look random by a
  length-aware Shannon-entropy test. Passwords need not look random, but must look like a
  literal rather than a label or an identifier.

A finding's span is the secret value itself, so redaction keeps ``password=`` readable.
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
import re
from dataclasses import replace

from kavach.scanning.data import EMAIL_RULE, SSN_RULE
from kavach.scanning.engine import MAX_MATCH, PatternBank, Rule, SpanIndex, Spans, dedupe, finalize
from kavach.scanning.entropy import (
    char_classes,
    is_hex,
    is_placeholder,
    looks_random,
    rare_letter_pairs,
    reads_as_gibberish,
    shannon_entropy,
)
from kavach.scanning.findings import Finding, Severity

C, H, M, L = Severity.CRITICAL, Severity.HIGH, Severity.MEDIUM, Severity.LOW

# Characters that end an unquoted token.
_TOK = r"A-Za-z0-9_\-"


# A file name with a fingerprint ("video_box.ico-7a38...0aab0c.png"): a build hash, not a token.
_ASSET_SUFFIXES = (
    b".png",
    b".jpg",
    b".jpeg",
    b".gif",
    b".svg",
    b".ico",
    b".css",
    b".js",
    b".map",
    b".woff",
    b".woff2",
    b".webp",
    b".html",
)


def _token_ok(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    """Provider tokens: reject obvious placeholders (``AKIAXXXXXXXXXXXXXXXX``, ``...EXAMPLE``)
    and fingerprinted asset file names. (Typed runs such as ``0123456789abcdef`` are kept:
    documentation-shaped tokens are still tokens to the gate.)"""
    value = data[start:end]
    if is_placeholder(value) or b"EXAMPLE" in value.upper():
        return None
    # A token whose random part is one repeated character is a documentation stand-in.
    tail = value[-16:]
    if len(set(tail)) <= 3:
        return None
    if data[end : end + 6].lower().startswith(_ASSET_SUFFIXES) and data[start - 1 : start] in (b".", b"-", b"_"):
        return None
    return 0.95


def _random_token_ok(data: bytes, start: int, end: int, spans: Spans) -> float | None:
    """Provider tokens with a short or generic prefix: the body must also look random."""
    if _token_ok(data, start, end, spans) is None:
        return None
    value = data[start:end]
    if shannon_entropy(value) < 3.0:
        return None
    # Random letters pair up outside the common-pair table about half the time (hex letters
    # a-f are the exception: most of their pairs are common, so hex is not judged this way).
    rare, pairs = rare_letter_pairs(value)
    if pairs >= 24 and rare * 5 < pairs and not is_hex(value.replace(b"-", b"")):
        return None  # "...7here4ar3not7he7oken5you4re1ooking4or...": a sentence in disguise
    return 0.9


# Hex "words" people type into made-up identifiers (``deadbeef``, ``cafebabe``).
_HEXSPEAK = (b"dead", b"beef", b"cafe", b"babe", b"face", b"feed", b"fade", b"deaf", b"c0de", b"f00d", b"d00d")


def _typed_by_person(hexdigits: bytes) -> bool:
    """Whether a hex string was made up rather than generated: a run like ``12345``/``abcde``/``98765``
    (also every other character: ``a1b2c3d4e5``) or two hexspeak words (each has odds of about
    1 in 10^4 per position in random hex)."""
    for stride in (1, 2):  # "12345", and interleaved "a1b2c3d4e5"
        for i in range(len(hexdigits) - 4 * stride):
            run = hexdigits[i : i + 4 * stride + 1 : stride]
            if all(run[k + 1] - run[k] == 1 for k in range(4)) or all(run[k] - run[k + 1] == 1 for k in range(4)):
                return True
    return sum(hexdigits.count(w) for w in _HEXSPEAK) >= 2


def _slack_ok(data: bytes, start: int, end: int, spans: Spans) -> float | None:
    """Slack tokens carry a workspace or user id (8+ digits: ``xoxb-1234567890-...``), or are
    long random tokens (``xoxe.xoxp-1-<...>``, ``xoxp-1-<base64>``); ``xoxb-my-bot-token``,
    ``xoxp-1234-1234-...`` and ``xoxo-indieweb`` are not."""
    if _token_ok(data, start, end, spans) is None:
        return None
    value = data[start:end]
    if end - start >= 60 and shannon_entropy(value) >= 4.0:
        return 0.9  # xoxe.xoxp-1-..., xoxp-1-<base64>: long random configuration/user tokens
    parts = value.split(b"-")
    if len(parts) < 3 and end - start < 30:
        return None  # "xoxp-1234567890": an id alone, no secret part
    return 0.95 if any(len(part) >= 8 and part.isdigit() for part in parts) else None


def _vault_token_ok(data: bytes, start: int, end: int, spans: Spans) -> float | None:
    """Vault tokens; a legacy ``s.`` token is random, not ``s.executeDispatchesInOrder`` in minified JS."""
    if data[start : start + 2] == b"s." and _identifier_like(data[start + 2 : end]):
        return None
    return _random_token_ok(data, start, end, spans)


def _random_hex_id_ok(data: bytes, start: int, end: int, spans: Spans) -> float | None:
    """A prefixed hex identifier (``wx...``, ``AC...``) whose hex body was generated, not typed."""
    if _random_token_ok(data, start, end, spans) is None or _typed_by_person(data[start + 2 : end].lower()):
        return None
    return 0.8


def _provider(
    rule_id: str,
    pattern: str,
    severity: Severity = H,
    *,
    category: str = "api_token",
    random_body: bool = False,
    case_insensitive: bool = False,
) -> Rule:
    return Rule(
        id=f"secrets.{rule_id}",
        category=category,
        severity=severity,
        pattern=pattern,
        value_group=1,
        validate=_random_token_ok if random_body else _token_ok,
        case_insensitive=case_insensitive,
        not_followed_by=_TOKEN_END,
    )


def _b(body: str) -> str:
    """``body`` as a token starting at a word boundary (the engine checks what follows).

    ``\\b`` is zero-width, so the pattern starts with the token's literal prefix and RE2
    can skip ahead to it instead of stepping the automaton over every byte.
    """
    return rf"\b({body})"


_TOKEN_END = rf"[{_TOK}]"


PROVIDER_RULES: tuple[Rule, ...] = (
    # --- cloud ---
    _provider(
        "aws-access-key-id",
        _b(r"(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[0-9A-Z]{16}"),
        C,
        category="cloud_key",
    ),
    _provider(
        "aws-bedrock-api-key", _b(r"ABSKQmVkcm9ja0FQSUtleS[A-Za-z0-9+/]{100,200}={0,2}"), C, category="cloud_key"
    ),
    _provider("gcp-api-key", _b(r"AIza[0-9A-Za-z_\-]{35}"), H, category="cloud_key"),
    _provider("gcp-oauth-client-secret", _b(r"GOCSPX-[0-9A-Za-z_\-]{28}"), C, category="cloud_key"),
    _provider("gcp-oauth-access-token", _b(r"ya29\.[0-9A-Za-z_\-]{30,500}"), H, category="cloud_key"),
    _provider(
        "gcp-oauth-refresh-token",
        r"(?:^|[^A-Za-z0-9_/])(1//0[0-9A-Za-z_\-]{40,500})",
        C,
        category="cloud_key",
        random_body=True,
    ),
    _provider(
        "azure-ad-client-secret",
        r"(?:^|[^A-Za-z0-9_~.])([A-Za-z0-9_~.]{3}\dQ~[A-Za-z0-9_~.\-]{31,34})",
        C,
        category="cloud_key",
    ),
    _provider("azure-storage-account-key", r"(?i)AccountKey\s*=\s*([A-Za-z0-9+/]{86}==)", C, category="cloud_key"),
    _provider("azure-sas-token", r"[?&]sig=([A-Za-z0-9%+/]{43,64}(?:%3D|=))", H, category="cloud_key"),
    _provider("alibaba-access-key-id", _b(r"LTAI[A-Za-z0-9]{17,21}"), H, category="cloud_key", random_body=True),
    _provider("digitalocean-token", _b(r"do[opr]_v1_[a-f0-9]{64}"), C, category="cloud_key"),
    _provider(
        "yandex-token",
        _b(
            r"(?:YC[A-Za-z0-9_\-]{38}|AQVN[A-Za-z0-9_\-]{35,38}|t1\.[A-Z0-9a-z_\-]+[=]{0,2}"
            r"\.[A-Z0-9a-z_\-]{86}[=]{0,2})"
        ),
        H,
        category="cloud_key",
    ),
    _provider("heroku-api-key-v2", _b(r"HRKU-AA[0-9A-Za-z_\-]{58}"), C, category="cloud_key"),
    _provider(
        "flyio-token",
        _b(r"(?:fo1_[\w\-=]{43}|fm1[ar]_[A-Za-z0-9+/]{100,1000}={0,3}|fm2_[A-Za-z0-9+/]{100,1000}={0,3})"),
        H,
        category="cloud_key",
    ),
    _provider("cloudflare-origin-ca-key", _b(r"v1\.0-[a-f0-9]{24}-[a-f0-9]{146}"), H, category="cloud_key"),
    _provider("hashicorp-tf-token", _b(r"[A-Za-z0-9]{14}\.atlasv1\.[A-Za-z0-9_=\-]{60,70}"), C, category="cloud_key"),
    replace(
        _provider(
            "vault-token",
            _b(
                r"(?:hvs\.[A-Za-z0-9_\-]{90,120}|hvb\.[A-Za-z0-9_\-]{138,300}|"
                r"s\.[A-Za-z0-9]{24})"
            ),
            C,
            category="cloud_key",
        ),
        validate=_vault_token_ok,
    ),
    _provider("databricks-token", _b(r"dapi[a-f0-9]{32}(?:-\d)?"), C, category="cloud_key"),
    _provider("doppler-token", _b(r"dp\.pt\.[A-Za-z0-9]{43}"), C, category="cloud_key"),
    _provider("pulumi-token", _b(r"pul-[a-f0-9]{40}"), C, category="cloud_key"),
    _provider("planetscale-token", _b(r"pscale_(?:tkn|pw|oauth)_[A-Za-z0-9=\-_.]{32,64}"), C, category="cloud_key"),
    _provider("scalingo-token", _b(r"tk-us-[A-Za-z0-9\-_]{48}"), H, category="cloud_key"),
    _provider("openshift-token", _b(r"sha256~[A-Za-z0-9_\-]{43}"), H, category="cloud_key"),
    _provider("nats-nkey-seed", _b(r"S[ACNOPUX][A-Z2-7]{56}"), C, category="private_key", random_body=True),
    _provider(
        "age-secret-key", _b(r"AGE-SECRET-KEY-1[QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L]{58}"), C, category="private_key"
    ),
    # --- source control and package registries ---
    _provider("github-token", _b(r"gh[pousr]_[A-Za-z0-9]{36,251}"), C, category="vcs_token"),
    _provider("github-fine-grained-pat", _b(r"github_pat_[A-Za-z0-9_]{80,90}"), C, category="vcs_token"),
    _provider(
        "gitlab-token",
        _b(
            r"(?:glpat|glptt|gldt|glrtr|glrt|glcbt|glft|glimt|glagent|gloas|glsoat|glffct|glwt)-"
            r"[0-9A-Za-z_\-]{20,64}(?:\.[0-9a-z]{2,12})?"
        ),
        C,
        category="vcs_token",
    ),
    _provider("gitlab-runner-registration-token", _b(r"GR1348941[0-9A-Za-z_\-]{20}"), C, category="vcs_token"),
    _provider("gitlab-session-cookie", r"_gitlab_session=([0-9a-z]{32})", H, category="vcs_token"),
    _provider("bitbucket-app-password", _b(r"ATBB[A-Za-z0-9_=.\-]{28,64}"), C, category="vcs_token"),
    _provider("atlassian-api-token", _b(r"ATATT3[A-Za-z0-9_\-=]{186}"), H, category="saas_token"),
    _provider("npm-token", _b(r"npm_[A-Za-z0-9]{36}"), C, category="vcs_token"),
    _provider(
        "docker-hub-token", _b(r"dckr_(?:pat|oat)_[A-Za-z0-9_\-]{27,40}"), C, category="vcs_token", random_body=True
    ),
    _provider(
        "docker-swarm-token",
        _b(r"SWMTKN-1-[a-z0-9]{50}-[a-z0-9]{25}|SWMKEY-1-[A-Za-z0-9+/]{43}"),
        C,
        category="cloud_key",
        random_body=True,
    ),
    _provider("pypi-token", _b(r"pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_\-]{50,300}"), C, category="vcs_token"),
    _provider("rubygems-token", _b(r"rubygems_[a-f0-9]{48}"), C, category="vcs_token"),
    _provider("clojars-token", _b(r"CLOJARS_[a-z0-9]{60}"), C, category="vcs_token", case_insensitive=True),
    _provider(
        "sourcegraph-token",
        _b(r"sgp_(?:[a-fA-F0-9]{16}|local)_[a-fA-F0-9]{40}|sgp_[a-fA-F0-9]{40}"),
        H,
        category="vcs_token",
    ),
    _provider(
        "jfrog-token", _b(r"(?:AKCp[A-Za-z0-9]{69}|cmVmd[A-Za-z0-9]{59})"), H, category="vcs_token", random_body=True
    ),
    _provider(
        "droneci-token", r"(?i)drone[\w.\-]{0,20}[\"']?\s*[:=]+\s*[\"']?([a-z0-9]{32})\b", H, category="vcs_token"
    ),
    # --- AI providers ---
    _provider(
        "openai-api-key",
        _b(
            r"sk-(?:proj|svcacct|admin|None)-[A-Za-z0-9_\-]{20,200}|sk-[A-Za-z0-9]{20}T3BlbkFJ"
            r"[A-Za-z0-9]{20}|sk-(?:proj-)?[A-Za-z0-9_\-]{20,80}T3BlbkFJ[A-Za-z0-9_\-]{20,80}"
        ),
        C,
        category="ai_token",
    ),
    _provider("anthropic-api-key", _b(r"sk-ant-(?:api|admin|sid)\d{2}-[A-Za-z0-9_\-]{80,120}"), C, category="ai_token"),
    _provider("huggingface-token", _b(r"(?:hf_[A-Za-z]{34}|api_org_[A-Za-z]{34})"), H, category="ai_token"),
    _provider("perplexity-api-key", _b(r"pplx-[A-Za-z0-9]{48}"), H, category="ai_token"),
    _provider("llamacloud-api-key", _b(r"llx-[A-Za-z0-9_\-]{40,64}"), H, category="ai_token"),
    _provider("groq-api-key", _b(r"gsk_[A-Za-z0-9]{52}"), H, category="ai_token"),
    _provider("replicate-api-token", _b(r"r8_[A-Za-z0-9]{37}"), H, category="ai_token"),
    # --- payments ---
    _provider("stripe-secret-key", _b(r"(?:sk|rk)_live_[A-Za-z0-9]{10,99}"), C, category="payment_token"),
    _provider("stripe-test-key", _b(r"(?:sk|rk)_test_[A-Za-z0-9]{10,99}"), M, category="payment_token"),
    _provider(
        "square-token",
        _b(r"(?:sq0atp-[0-9A-Za-z_\-]{22}|sq0csp-[0-9A-Za-z\\_\-^]{43}|EAAA[A-Za-z0-9_\-+=]{22,60})"),
        H,
        category="payment_token",
        random_body=True,
    ),
    _provider("shopify-token", _b(r"shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}"), C, category="payment_token"),
    _provider("flutterwave-key", _b(r"FLW(?:SECK|PUBK)_TEST-[a-hA-H0-9]{12,32}(?:-X)?"), M, category="payment_token"),
    _provider("gocardless-token", _b(r"live_[A-Za-z0-9\-_=]{40}"), H, category="payment_token", random_body=True),
    _provider("shippo-token", _b(r"shippo_(?:live|test)_[a-fA-F0-9]{40}"), H, category="payment_token"),
    _provider("easypost-token", _b(r"EZ[AT]K[A-Za-z0-9]{54}"), H, category="payment_token"),
    _provider("duffel-token", _b(r"duffel_(?:test|live)_[A-Za-z0-9_\-=]{43}"), H, category="payment_token"),
    _provider(
        "plaid-token",
        _b(
            r"access-(?:sandbox|development|production)-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-"
            r"[0-9a-f]{4}-[0-9a-f]{12}"
        ),
        H,
        category="payment_token",
    ),
    # --- messaging and SaaS ---
    replace(
        _provider("slack-token", _b(r"xox(?:[abposr]|e\.xox[bp]|e)-[0-9A-Za-z\-]{10,300}"), H, category="saas_token"),
        validate=_slack_ok,
    ),
    _provider(
        "slack-app-token", _b(r"xapp-\d-[A-Z0-9]+-\d+-[a-z0-9]+"), H, category="saas_token", case_insensitive=True
    ),
    _provider(
        "slack-webhook",
        r"((?:https?://)?hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9+/_\-]{40,120})",
        H,
        category="saas_token",
    ),
    _provider(
        "teams-webhook",
        r"(https://[a-z0-9]+\.webhook\.office\.com/webhookb2/[a-z0-9\-]+@[a-z0-9\-]+/"
        r"IncomingWebhook/[a-z0-9]{32}/[a-z0-9\-]{36})",
        H,
        category="saas_token",
    ),
    _provider(
        "discord-webhook",
        r"(https://(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/\d{5,30}/"
        r"[A-Za-z0-9_\-]{60,80})",
        H,
        category="saas_token",
    ),
    _provider(
        "discord-bot-token",
        _b(r"[MNO][A-Za-z0-9_\-]{23,27}\.[A-Za-z0-9_\-]{6}\.[A-Za-z0-9_\-]{27,40}"),
        H,
        category="saas_token",
        random_body=True,
    ),
    _provider(
        "telegram-bot-token", rf"(?:^|[^{_TOK}]|bot)(\d{{8,10}}:AA[0-9A-Za-z_\-]{{33}})", H, category="saas_token"
    ),
    _provider("twilio-api-key", _b(r"SK[0-9a-fA-F]{32}"), H, category="saas_token", random_body=True),
    _provider("sendgrid-api-key", _b(r"SG\.[A-Za-z0-9_\-=]{20,24}\.[A-Za-z0-9_\-=]{39,50}"), C, category="saas_token"),
    _provider("sendinblue-api-key", _b(r"xkeysib-[a-f0-9]{64}-[A-Za-z0-9]{16}"), H, category="saas_token"),
    _provider("mailgun-key", _b(r"(?:key|pubkey)-[a-f0-9]{32}"), H, category="saas_token", random_body=True),
    # Mailgun's current private API keys: 32 hex, then two groups of 8 (no other common token
    # has this shape; a UUID's groups are 8-4-4-4-12).
    _provider(
        "mailgun-api-key", _b(r"[a-f0-9]{32}-[a-f0-9]{8}-[a-f0-9]{8}"), H, category="saas_token", random_body=True
    ),
    _provider("mailchimp-api-key", _b(r"[a-f0-9]{32}-us\d{1,2}"), H, category="saas_token"),
    _provider("postman-api-key", _b(r"PMAK-[a-fA-F0-9]{24}-[a-fA-F0-9]{34}"), H, category="saas_token"),
    _provider("netlify-token", _b(r"nfp_[A-Za-z0-9]{36,40}"), H, category="saas_token"),
    _provider("linear-api-key", _b(r"lin_api_[A-Za-z0-9]{40}"), H, category="saas_token"),
    _provider("figma-token", _b(r"figd_[A-Za-z0-9_\-]{40}"), H, category="saas_token", random_body=True),
    _provider(
        "dropbox-token", _b(r"sl\.(?:u\.)?[A-Za-z0-9_\-=]{130,1000}"), H, category="saas_token", random_body=True
    ),
    _provider("notion-token", _b(r"(?:ntn_[0-9]{11}[A-Za-z0-9]{35}|secret_[A-Za-z0-9]{43})"), H, category="saas_token"),
    _provider("new-relic-key", _b(r"NR(?:AK|II|JS)-[A-Za-z0-9]{19,32}"), H, category="saas_token"),
    _provider(
        "grafana-token",
        _b(
            r"(?:glc_[A-Za-z0-9+/]{32,400}={0,2}|glsa_[A-Za-z0-9]{32}_[A-Fa-f0-9]{8}|"
            r"eyJrIjoi[A-Za-z0-9]{70,400}={0,2})"
        ),
        H,
        category="saas_token",
    ),
    _provider(
        "sentry-token", _b(r"(?:sntrys_eyJ[A-Za-z0-9+/=_\-]{60,400}|sntryu_[a-f0-9]{64})"), H, category="saas_token"
    ),
    _provider("dynatrace-token", _b(r"dt0c01\.[A-Za-z0-9]{24}\.[A-Za-z0-9]{64}"), H, category="saas_token"),
    _provider("onepassword-token", _b(r"ops_eyJ[A-Za-z0-9+/]{250,}={0,3}"), C, category="saas_token"),
    _provider(
        "onepassword-secret-key",
        _b(
            r"A3-[A-Z0-9]{6}-(?:[A-Z0-9]{11}|[A-Z0-9]{6}-[A-Z0-9]{5})-[A-Z0-9]{5}"
            r"-[A-Z0-9]{5}-[A-Z0-9]{5}"
        ),
        C,
        category="saas_token",
        random_body=True,
    ),
    _provider(
        "facebook-access-token",
        _b(r"(?:EAA[MC][A-Za-z0-9]{100,400}|\d{15,16}\|[0-9A-Za-z\-_]{27})"),
        H,
        category="saas_token",
    ),
    _provider("twitter-bearer-token", _b(r"A{22}[A-Za-z0-9%]{80,120}"), H, category="saas_token"),
    _provider("readme-token", _b(r"rdme_[a-z0-9]{70}"), H, category="saas_token"),
    _provider("prefect-token", _b(r"pnu_[a-zA-Z0-9]{36}"), H, category="saas_token"),
    _provider("typeform-token", _b(r"tfp_[A-Za-z0-9\-_.=]{59}"), H, category="saas_token"),
    _provider("frameio-token", _b(r"fio-u-[A-Za-z0-9\-_=]{64}"), H, category="saas_token"),
    _provider("infracost-token", _b(r"ico-[A-Za-z0-9]{32}"), H, category="saas_token"),
    _provider("settlemint-token", _b(r"sm_(?:pat|aat|sat)_[a-z0-9]{16}"), H, category="saas_token"),
    _provider("defined-networking-token", _b(r"dnkey-[a-z0-9=_\-]{26}-[a-z0-9=_\-]{52}"), H, category="saas_token"),
    _provider(
        "authress-key",
        _b(
            r"(?:sc|ext|scauth|authress)_[a-z0-9]{5,30}\.[a-z0-9]{4,6}\.acc[_-][a-z0-9\-]{10,32}"
            r"\.[a-z0-9+/_=\-]{30,120}"
        ),
        H,
        category="saas_token",
    ),
    _provider("adobe-client-secret", _b(r"p8e-[A-Za-z0-9]{32}"), H, category="saas_token", case_insensitive=True),
    _provider(
        "harness-token",
        _b(r"(?:pat|sat)\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9]{24}\.[A-Za-z0-9]{20}"),
        H,
        category="saas_token",
    ),
    _provider("intra42-secret", _b(r"s-s4t2(?:ud|af)-[a-f0-9]{64}"), H, category="saas_token"),
    _provider("octopus-deploy-key", _b(r"API-[A-Z0-9]{26}"), H, category="saas_token", random_body=True),
    # Identifiers issued with credentials, reported at medium (warn + redact): a WeChat AppID
    # and a Twilio Account SID are half of a credential pair and name the account to attack.
    replace(_provider("wechat-app-id", _b(r"wx[0-9a-f]{16}"), M, category="cloud_key"), validate=_random_hex_id_ok),
    replace(
        _provider("twilio-account-sid", _b(r"AC[0-9a-f]{32}"), M, category="saas_token"), validate=_random_hex_id_ok
    ),
    _provider(
        "sidekiq-credentials",
        r"(?i)(?:BUNDLE_ENTERPRISE__CONTRIBSYS__COM|BUNDLE_GEMS__CONTRIBSYS__COM)"
        r"[\"']?\s*[:=]+\s*[\"']?([a-f0-9]{8}:[a-f0-9]{8})",
        H,
        category="saas_token",
    ),
    _provider(
        "sidekiq-url",
        r"(?i)https?://([a-f0-9]{8}:[a-f0-9]{8})@(?:gems\.contribsys\.com|enterprise\.contribsys\.com)",
        H,
        category="saas_token",
    ),
)


_UNSIGNED_ALG = re.compile(rb'"alg"\s*:\s*"none"', re.IGNORECASE)


def _jwt_ok(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    """A JWT whose header decodes to JSON (an ``{"alg"...`` object)."""
    if b"..." in data[max(start, end - 2) : end + 3]:
        return None  # "eyJ...eyJzdWIiOiIxMj...": an elided example, not a token
    header, _, rest = data[start:end].partition(b".")
    try:
        decoded = base64.urlsafe_b64decode(header + b"=" * (-len(header) % 4))
    except (binascii.Error, ValueError):
        return 0.6
    if rest.endswith(b".") and _UNSIGNED_ALG.search(decoded) is not None:
        return None  # alg "none" and no signature: anyone can mint it, it proves nothing
    return 0.95 if decoded.lstrip().startswith(b"{") else 0.6


def _bearer_ok(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    value = data[start:end]
    if is_placeholder(value) or char_classes(value) < 2 or shannon_entropy(value) < 3.0:
        return None
    return 0.85


def _basic_ok(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    """``Authorization: Basic`` values that decode to ``user:password``."""
    value = data[start:end]
    try:
        decoded = base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    _user, sep, password = decoded.partition(b":")
    if not sep or not password or is_placeholder(password):
        return None
    return 0.9


_B64_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
# A key body line is 64 characters (some tools 70-76, or one long line); a shorter run is
# an elided example ("BIIEogIBAAk15x0ID[...]") or code that assembles a key at run time.
_MIN_PEM_RUN = 32


def _longest_base64_run(body: bytes) -> int:
    longest = run = 0
    for b in body:
        run = run + 1 if b in _B64_BYTES else 0
        longest = max(longest, run)
    return longest


def _pem_ok(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    """A private key block with a body: a base64 line of key material, not just the header line
    of a template, an elided example or the code around ``"-----BEGIN ... KEY-----\\n" . $key``."""
    value = data[start:end]
    body = value.split(b"-----", 2)[-1]
    if _longest_base64_run(body[:1024]) < _MIN_PEM_RUN:
        return None
    if b"..." in body[:200] or is_placeholder(body.strip()[:40]):
        return None
    return 0.99


_DB_SCHEMES = (
    r"postgres(?:ql)?|mysql|mysqlx|mariadb|mongodb(?:\+srv)?|redis|rediss|amqps?|mssql|sqlserver|oracle|couchdb|"
    r"cassandra|neo4j|bolt|clickhouse|snowflake|db2|cockroachdb|memcached|elasticsearch|influxdb|"
    r"jdbc:[a-z0-9]+(?::[a-z0-9]+)?|postgresql\+[a-z0-9]+|mysql\+[a-z0-9]+"
)
# Any other scheme (nats-route://, amqp+ssl://, custom://) with user:password@ is a credential too.
_OTHER_SCHEMES = r"[a-z][a-z0-9+.\-]{1,24}"


# RFC 2606 / 6761 reserved documentation names: they never resolve, so credentials for them
# are examples, not in use. (A sample domain that is registered and resolves, such as
# contoso.com, is not one: a password in a proxy URL is reported whatever the host.)
_DOC_HOSTS = re.compile(
    rb"(?i)@(?:[A-Za-z0-9\-]+\.)*(?:example\.(?:com|net|org)|[a-z0-9\-]+\.example|"
    rb"[a-z0-9\-]+\.(?:test|invalid))(?:[:/\s\"'?#]|$)"
)


def _url_password_ok(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    value = data[start:end]
    if _DOC_HOSTS.match(data, end, min(len(data), end + 256)) is not None:
        return None
    if is_placeholder(value) or value.startswith((b"$", b"%", b"{", b"<")) or len(value) < 3:
        return None
    if value.lower() in {b"pass", b"password", b"pwd", b"user", b"secret", b"***", b"x"}:
        return None
    if b"?" in value or b"#" in value:
        return None  # no userinfo holds '?' or '#': the '@' is in a query or fragment
    low = value.lower()
    if low in _STAND_IN_VALUES or _SELF_DESCRIBING_RE.search(low) is not None:
        return None  # admin:admin, user1:pwd1, no-such-user:invalid-password
    return 0.9


def _der_key_ok(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    """A base64 DER private key body: long enough to hold one and not a repeated filler."""
    value = data[start:end]
    if len(set(value[-64:])) < 16:
        return None  # "MIIEpAIBAAKCAQEAAAAAAAA...": a truncated or padded stand-in
    return 0.95


def _sql_password_ok(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    """The literal password in SQL DDL (not a bind parameter, a stand-in or a stored hash)."""
    value = data[start:end]
    if len(value) < 3 or is_placeholder(value) or value.startswith((b"$", b":", b"?", b"@", b"%", b"<", b"{", b"&")):
        return None  # ${PW}, :pw, ?, @pw, %s, <password>, {pw}, &pw: parameters and template slots
    low = value.lower()
    if low in _STAND_IN_VALUES or _SELF_DESCRIBING_RE.search(low) is not None:
        return None
    if (value[:1] == b"*" and len(value) == 41) or (low[:3] == b"md5" and len(value) == 35 and is_hex(value[3:])):
        return None  # MySQL / PostgreSQL stored hashes: IDENTIFIED BY PASSWORD '*6BB4...', 'md5<32 hex>'
    if low.startswith(b"scram-sha-256$") or value.startswith(_HASH_PREFIXES):
        return None  # PostgreSQL SCRAM verifiers, bcrypt / sha-crypt hashes
    return 0.85


STRUCTURAL_RULES: tuple[Rule, ...] = (
    Rule(
        id="secrets.private-key",
        category="private_key",
        severity=C,
        pattern=r"-----BEGIN[ A-Z0-9]{0,30}PRIVATE KEY(?: BLOCK)?-----(?s:.)*?-----END[ A-Z0-9]{0,30}PRIVATE KEY"
        r"(?: BLOCK)?-----",
        validate=_pem_ok,
        confidence=0.99,
        max_len=MAX_MATCH,
    ),
    Rule(
        # A key whose END line is missing (truncated output) or far away: the header plus
        # every base64 / header line that follows it.
        id="secrets.private-key",
        category="private_key",
        severity=C,
        pattern=r"-----BEGIN[ A-Z0-9]{0,30}PRIVATE KEY(?: BLOCK)?-----(?:(?:\\[nr]|[\s\"',+])*(?:[A-Za-z0-9+/=]{16,}|"
        r"Proc-Type:[^\n]{0,80}|DEK-Info:[^\n]{0,120}|Comment:[^\n]{0,120}))+",
        validate=_pem_ok,
        confidence=0.95,
        max_len=MAX_MATCH,
    ),
    Rule(
        # A private key's base64 DER body without its PEM lines (payment SDK configs, JSON and
        # PHP arrays): PKCS#1 and PKCS#8 RSA start MII..IBAAK / MII..IBADAN, EC P-256 keys
        # MHcCAQEE (SEC1) or MIGHAgEAMBMGByqGSM49 (PKCS#8). Public keys (MIIBIjAN...) do not.
        id="secrets.private-key",
        category="private_key",
        severity=C,
        pattern=r"\b(MII[A-Za-z0-9+/]{2}[AQgw]IBA(?:AK|DAN)[A-Za-z0-9+/]{100,}={0,2}|MHcCAQEE[A-Za-z0-9+/]{150,300}"
        r"={0,2}|MIGHAgEAMBMGByqGSM49[A-Za-z0-9+/]{100,300}={0,2})",
        value_group=1,
        validate=_der_key_ok,
        confidence=0.95,
        max_len=MAX_MATCH,
        anchors=(r"MII[A-Za-z0-9+/]{2}[AQgw]IBA", r"MHcCAQEE", r"MIGHAgEAMBMGByqGSM49"),
    ),
    Rule(
        # SQL DDL: CREATE USER .. IDENTIFIED BY 'pw' (Oracle's CREATE/ALTER USER also unquoted),
        # CREATE ROLE .. WITH PASSWORD 'pw', CREATE LOGIN .. WITH PASSWORD = N'pw', and MySQL's
        # PASSWORD('pw'). Unquoted only after CREATE/ALTER USER: "identified by their email" is prose.
        id="secrets.sql-password",
        category="password",
        severity=H,
        pattern=r"(?i)(?:\b(?:create|alter)\s+user\s+[^\s;']{1,64}\s+identified\s+by\s+|\bidentified(?:\s+with\s+"
        r"[A-Za-z0-9_]+)?\s+by(?:\s+password)?\s+'+|\bwith\s+(?:encrypted\s+|unencrypted\s+)?password\s*=?\s*N?'+|"
        r"\bpassword\s*\(\s*'+)([^'\s;,)]{1,128})",
        value_group=1,
        validate=_sql_password_ok,
        anchors=(r"(?i)identified\s", r"(?i)password\s*[(=']", r"(?i)password\s+N'"),
    ),
    Rule(
        id="secrets.putty-private-key",
        category="private_key",
        severity=C,
        pattern=r"PuTTY-User-Key-File-\d: [^\n]{1,80}(?s:.){0,16}Private-Lines: \d+(?s:.)*?Private-MAC: "
        r"[a-f0-9]{40,64}",
        confidence=0.99,
        max_len=MAX_MATCH,
    ),
    Rule(
        id="secrets.jwt",
        category="jwt",
        severity=H,
        pattern=r"(?:^|[^A-Za-z0-9_\-])(eyJ[A-Za-z0-9_\-]{8,}\.ey[A-Za-z0-9_\-/+]{8,}\.[A-Za-z0-9_\-/+=]*)",
        value_group=1,
        validate=_jwt_ok,
    ),
    Rule(
        id="secrets.bearer-token",
        category="auth_header",
        severity=H,
        pattern=r"(?i)\bbearer\s+([A-Za-z0-9_\-.~+/]{16,1000}=*)",
        value_group=1,
        validate=_bearer_ok,
    ),
    Rule(
        id="secrets.basic-auth",
        category="auth_header",
        severity=H,
        pattern=r"(?i)\bbasic\s+([A-Za-z0-9+/]{8,1000}={0,2})",
        value_group=1,
        validate=_basic_ok,
    ),
    Rule(
        id="secrets.auth-header",
        category="auth_header",
        severity=H,
        pattern=r"(?i)(?:authorization|x-api-key|x-auth-token|api-key|private-token|x-access-token)[\"']?\s*[:=]\s*"
        r"[\"']?\s*(?:token\s+)?([A-Za-z0-9_\-.~+/]{16,1000}=*)",
        value_group=1,
        validate=_bearer_ok,
    ),
    Rule(
        id="secrets.db-connection-string",
        category="connection_string",
        severity=C,
        pattern=rf"(?i)\b(?:{_DB_SCHEMES})://[^\s:@/'\"<>]{{0,100}}:([^\s@/'\"<>]{{1,200}})@[A-Za-z0-9.\-\[\]_%]",
        value_group=1,
        validate=_url_password_ok,
    ),
    Rule(
        id="secrets.url-credentials",
        category="connection_string",
        severity=H,
        pattern=rf"(?i)\b(?:{_OTHER_SCHEMES})://[^\s:@/'\"<>]{{1,100}}:([^\s@/'\"<>]{{1,200}})@[A-Za-z0-9.\-\[\]_%]",
        value_group=1,
        validate=_url_password_ok,
    ),
)

# --- keyword + assignment -----------------------------------------------------------------

# (keyword patterns, not passwords)
_PASSWORD_WORDS = (
    r"pass(?:word|wd|wrd|phrase|code)?|pwd|pw|passwort|contrase[nñ]a|senha|mot_?de_?passe|"  # noqa: S105
    r"p(?:a|s)?s{1,2}w(?:o?r)?d"  # pswd, psswd, pswrd, paswd, paswrd, pasword ...
)
_SECRET_WORDS = (
    r"secret|token|api[ _.\-]?key|apikey|access[ _.\-]?key|priv(?:ate)?[ _.\-]?key|auth[ _.\-]?key|"  # noqa: S105
    r"credentials?|client[ _.\-]?secret|signing[ _.\-]?key|encryption[ _.\-]?key|enc[ _.\-]?key|master[ _.\-]?key|"
    r"session[ _.\-]?key|app[ _.\-]?key|secret[ _.\-]?key|access[ _.\-]?id|account[ _.\-]?key|auth|"
    r"license[ _.\-]?key|webhook[ _.\-]?url|consumer[ _.\-]?key|shared[ _.\-]?key|sas|salt|api[ _.\-]?id|"
    # Any other *key name (nkey, xkey, issuer_key, validationKey, KEY): only a value that
    # passes the entropy test is reported, so "key: value" in ordinary dictionaries is not.
    r"key"
)
# Prefilter form of the keywords: every name _KEY_NAME accepts contains one of these.
_KEYWORD_ANCHOR = (
    r"pass|pw|psw|pssw|pasw|secret|token|key|auth|credential|sas|salt|api|passwort|contrase|senha|mot_?de",
)

# Unbounded (not counted) repetition around the keyword: counted repetition multiplies
# automaton states, and this rule runs over every window that mentions a keyword.
_KEY_NAME = rf"[A-Za-z0-9_.\-]*(?:{_PASSWORD_WORDS}|{_SECRET_WORDS})[A-Za-z0-9_.\-]*"
# Separators of Python, JS, Go, YAML, JSON, INI, .env, shell, PHP, Ruby, TOML, C#, Makefile
# (``?=``, ``::=``, ``:::=``) and appending forms (PHP ``.=``, ``+=``) that build a secret up.
# An optional type between the name and the operator: Go ``var token string =``,
# Kotlin/Swift/TS ``val token: String =``.
_ASSIGN = r"(?:\\?[\"'`\]]){0,2}(?:[ \t]*:?[ \t]*(?:string|String|str|&str|\[\]byte|SecureString)\??)?[ \t]*(?::::=|::=|=>|:=|===|==|!==|!=|->|\?\?=|\|\|=|\?=|\.=|\+=|=|:)[ \t]*(?:@?\\?\"|\\?'|`|\([ \t]*[\"'])?"  # noqa: E501
_VALUE = r"([^\s\"'`,;<>(){}\[\]\\]+|[^\"'`\n\\]+(?:[\"'`]))"


def _strip_value(raw: bytes) -> bytes:
    value = raw.strip()
    if value[-1:] in (b'"', b"'", b"`"):
        value = value[:-1]
    return value


_CODE_REFERENCE_PREFIXES = (
    b"os.",
    b"self.",
    b"this.",
    b"process.",
    b"env.",
    b"config.",
    b"settings.",
    b"request.",
    b"req.",
    b"args.",
    b"opts.",
    b"options.",
    b"params.",
    b"ctx.",
    b"context.",
    b"props.",
    b"state.",
    b"System.",
    b"Environment.",
    b"ENV.",
    b"cls.",
    b"data.",
    b"cfg.",
    b"conf.",
    b"secrets.",
    b"vault.",
    b"kwargs",
    b"None",
    b"null",
    b"nil",
    b"undefined",
    b"new ",
    b"function",
    b"lambda",
    b"await ",
    b"get_",
    b"get(",
    b"$_",
    b"@",
    b"&",
    b"*",
    b"!",
    b"#",
    b"%",
    b"=",
    b"-",
    b"+",
    b"/",
    b".",
)


def _looks_like_code(value: bytes, quoted: bool) -> bool:
    """Whether an unquoted assignment value is an expression (a variable, a call), not a literal."""
    if quoted:
        return False
    if value.startswith(_CODE_REFERENCE_PREFIXES):
        return True
    # A bare identifier (``password = password``, ``token: str``), optionally dotted.
    stripped = value.replace(b"_", b"").replace(b".", b"")
    return stripped.isalpha() and len(value) <= 40 and not any(48 <= b <= 57 for b in value)


def _type_or_label(value: bytes) -> bool:
    low = value.lower()
    return low in {
        b"str",
        b"string",
        b"int",
        b"bool",
        b"bytes",
        b"text",
        b"varchar",
        b"char",
        b"boolean",
        b"object",
        b"any",
        b"none",
        b"optional",
        b"secretstr",
        b"password",
        b"required",
        b"integer",
        b"number",
    } or low.endswith((b":", b"?"))


_NOT_SECRET_KEY_PARTS = (
    b"path",
    b"file",
    b"dir",
    b"url",
    b"uri",
    b"length",
    b"size",
    b"type",
    b"name",
    b"format",
    b"field",
    b"label",
    b"prompt",
    b"hint",
    b"policy",
    b"expire",
    b"timeout",
    b"count",
    b"mode",
    b"enabled",
    b"required",
    b"scheme",
    b"algorithm",
    b"charset",
    b"header",
    b"behavior",
    b"behaviour",
    b"strategy",
    b"limit",
    b"mask",
)
# Words that contain a keyword but do not name a secret: "pass" in passthrough/passport/passes,
# "pw" in PWR (power), PWM, stopword, upward; "token" in tokenize(d)/tokenizer.
_PASS_WORDS = re.compile(rb"pass(?:through|ive|enger|port|age|es\b|ed\b|ing\b)|bypass|compass|pw[a-ce-z]|tokeni[sz]")
# Hash names: a hex value under such a name is a digest, not the plaintext.
_HASH_KEY = re.compile(rb"sha\d*|md5|hash|digest")
_HASH_LENGTHS = frozenset({32, 40, 56, 64, 96, 128})
# Code, not a literal: PHP/C++/Ruby member and scope access (``Yii::$app->request``), or a
# value starting with a scope operator (mimikatz ``token::elevate``).
_CODE_OPERATORS = (b"->", b"::")
# A shell/PHP/PowerShell variable or member reference.
_VARIABLE_REFERENCE = re.compile(rb"\$[A-Za-z_{]")
_INT_LITERAL = re.compile(rb"0[xX][0-9a-fA-F]{1,16}")
_DOTTED_NUMBERS = re.compile(rb"\d+(?:\.\d+){2,}[:=]*")
# Words joined by separators ("cognito_user_pools", "role-arn", "arn:role"): a label.
_WORD_PARTS = re.compile(rb"[A-Za-z]+(?:[_\-:./][A-Za-z]+)+")


# Password hashes are not plaintext credentials (bcrypt, sha-crypt, argon2, LDAP schemes).
_HASH_PREFIXES = (
    b"$2a$",
    b"$2b$",
    b"$2y$",
    b"$1$",
    b"$5$",
    b"$6$",
    b"$argon2",
    b"$pbkdf2",
    b"{SSHA}",
    b"{SHA}",
    b"{CRYPT}",
    b"pbkdf2_sha256$",
    b"sha1$",
    b"md5$",
)
_PASSWORD_KEY_PARTS = (b"pass", b"pwd", b"pw", b"psw", b"pssw", b"pasw", b"passwort", b"senha", b"contrase")


def _config_context(data: bytes, key_start: int, value_start: int) -> bool:
    """Whether the assignment is config syntax (YAML ``key: v``, ``.env``/shell ``KEY=v``).

    There an unquoted word is a literal; in code (``password = password``) it is a variable.
    """
    between = data[key_start:value_start]
    if b":" in between and b"=" not in between and b":=" not in between:
        return True  # YAML, JS object literals in config, INI-style "key: value"
    line_start = data.rfind(b"\n", max(0, key_start - 200), key_start) + 1
    prefix = data[line_start:key_start].strip()
    key = between.split(b"=", 1)[0]
    # .env / shell: KEY=value at the start of a line (after an optional "export"/"set"/"-").
    return (
        prefix in (b"", b"export", b"set", b"-", b"SET", b"ENV", b"ARG")
        and key.isupper()
        and b" =" not in between
        and b"= " not in between
    )


_SELF_DESCRIBING = (
    b"password",
    b"passwd",
    b"secret",
    b"notreal",
    b"not_real",
    b"not-real",
    b"apikey",
    b"api_key",
    b"token",
    b"letmein",
    b"let_me_in",
    b"pass",
    b"pwd",
)
# Stand-ins used as passwords in documentation and tests: account names and "wrong" values.
_STAND_IN_VALUES = frozenset(
    {
        b"admin",
        b"administrator",
        b"root",
        b"guest",
        b"user",
        b"username",
        b"login",
        b"auth",
        b"client",
        b"hello",
        b"world",
        b"wrong",
        b"incorrect",
        b"invalid",
        b"bad",
        b"good",
        b"right",
        b"correct",
    }
)
_FILE_SUFFIXES = (
    b".md",
    b".pem",
    b".json",
    b".txt",
    b".crt",
    b".cer",
    b".key",
    b".html",
    b".yaml",
    b".yml",
    b".xml",
    b".py",
    b".js",
    b".ts",
    b".go",
    b".cs",
    b".java",
    b".rb",
    b".php",
    b".sh",
    b".cfg",
    b".conf",
    b".ini",
    b".p12",
    b".pfx",
    b".jks",
    b".der",
    b".csr",
    b".log",
    b".png",
    b".svg",
)
_UPPER_SNAKE = re.compile(rb"[A-Z][A-Z0-9]*(?:[_\-][A-Z0-9]+)+")
_MEMBER_ACCESS = re.compile(rb"[A-Za-z_$][A-Za-z0-9_$]*(?:\.[A-Za-z_$][A-Za-z0-9_$]*)+")


def _identifier_like(value: bytes) -> bool:
    """camelCase / PascalCase words without digits ("bitbucketAuthModes") name things; keys are random."""
    if not value.isalpha() or value.islower() or value.isupper() or reads_as_gibberish(value):
        return False  # "UulakqEfCuawyiXb": capitals at random, letters in no word's order
    words = re.findall(rb"[A-Z]?[a-z]+|[A-Z]+(?![a-z])", value)
    return len(words) >= 2 and sum(len(w) for w in words) / len(words) >= 3


_BASE64_BLOB = re.compile(rb"[A-Za-z0-9+/]{16,200}={0,2}")


def _base64_blob(value: bytes) -> bool:
    """A base64 key or salt rather than a path: the base64 alphabet, with a '/'-separated part of
    16+ characters mixing upper case, lower case and digits (path segments are words:
    ``/home/User1``). Longer than 200 characters it is an encrypted blob (SealedSecrets, SOPS)
    meant to be stored, not a key."""
    if _BASE64_BLOB.fullmatch(value) is None:
        return False
    return any(len(part) >= 16 and char_classes(part) == 3 for part in value.rstrip(b"=").split(b"/"))


def _has_call(value: bytes) -> bool:
    """Whether ``value`` calls or wraps something: a name of three or more letters right before
    ``(`` (``Base64(Header)``, jasypt's ``ENC(...)``); ``7r(h8(`` inside a password is not one."""
    i = value.find(b"(")
    while i > 0:
        letters, j = 0, i - 1
        while j >= 0 and (value[j] == 95 or 48 <= value[j] <= 57 or 65 <= value[j] <= 90 or 97 <= value[j] <= 122):
            letters += 65 <= value[j] <= 90 or 97 <= value[j] <= 122
            j -= 1
        if letters >= 3:
            return True
        i = value.find(b"(", i + 1)
    return False


def _value_ok(value: bytes, quoted: bool) -> bool:
    """Common rejections: placeholders, type names, hashes, names, paths, self-describing and prose values."""
    if len(value) < 4 or is_placeholder(value) or _type_or_label(value) or value.lower() in _STAND_IN_VALUES:
        return False
    if value.startswith(_HASH_PREFIXES):
        return False
    low = value.lower()
    if _SELF_DESCRIBING_RE.search(low) is not None:
        return False  # "my_secret", "api_password", "correctAPIKey": a value that names itself is a stand-in
    if low.endswith(_FILE_SUFFIXES) or value.startswith((b"./", b"../", b"~/")):
        return False
    if b"/" in value and not quoted and not _base64_blob(value):
        return False  # an unquoted path; base64 ("rQVMSp6T...rpSz/wL=") has '/' too
    if _UPPER_SNAKE.fullmatch(value) is not None and not any(48 <= b <= 57 for b in value):
        return False  # GCM_MSAUTH_FLOW: a constant's name
    if (
        not quoted
        and _MEMBER_ACCESS.fullmatch(value) is not None
        and (not looks_random(value) or not any(reads_as_gibberish(part) for part in value.split(b".")))
    ):
        return False  # c.apiKey, config.APIKey, string.Empty: member access, each part a word
    if _has_call(value):
        return False  # an expression or an encrypted-value wrapper, not the literal secret
    if value.startswith(b"__") and _WORD_PARTS.fullmatch(value.strip(b"_")) is not None:
        return False  # "__closure_events_fn_": a property or symbol name
    if value.endswith((b"...", "\u2026".encode())):
        return False  # "ops_eyJzaWduSW5B...": elided in documentation or output
    return not (b" " in value or b"\t" in value or (not quoted and b"(" in value))


def _random_enough(value: bytes) -> bool:
    """Keys and tokens: machine-generated by a length-aware entropy test, per alphabet."""
    if value[:2] in (b"0x", b"0X") and is_hex(value[2:]):
        value = value[2:]  # 0x-prefixed hex (Ethereum private keys): judged as hex
    n = len(value)
    if looks_random(value) or (n >= 20 and char_classes(value) >= 3):
        return True
    ent = shannon_entropy(value)
    if value.isdigit():
        # Random digits average about 0.85 of log2(10) bits at 16 characters; 0.75 passes
        # all but about one random 16-digit token in twenty.
        return n >= 16 and ent >= 0.75 * math.log2(10)
    if is_hex(value):
        # Short random hex falls well short of log2(length) (10 characters: 2.85 bits on
        # average, 2.45 at the 5th percentile); a made-up one is caught by _typed_by_person.
        return n >= 10 and ent >= 0.72 * math.log2(min(n, 16)) and value.isalnum() and not value.isdigit()
    if value.isalnum() and value.upper() == value and n >= 32:
        # Base32 (upper-case letters and 2-7: NATS nkeys, TOTP seeds): 5 bits per character at most.
        return ent >= 0.85 * math.log2(32)
    # Single-alphabet random strings (all lower-case): high entropy for their length, or
    # letters no language strings together (few vowels, long consonant runs).
    if n >= 16 and char_classes(value) == 1 and ent >= 0.85 * math.log2(min(n, 26)):
        return True
    return n >= 12 and value.isalpha() and ent >= 3.0 and _gibberish(value.lower())


_VOWELS = frozenset(b"aeiouy")
_CONSONANT_RUN = re.compile(rb"[b-df-hj-np-tv-xz]{5,}")


def _gibberish(letters: bytes) -> bool:
    """Lower-case letters that are not words: under a fifth vowels, five consonants in a row
    (words have about two vowels in five; random letters about one in four), or letter pairs
    that words seldom contain (``jccoawgz``: jc, cc, wg, gz)."""
    vowels = sum(1 for b in letters if b in _VOWELS)
    if vowels * 5 < len(letters) or _CONSONANT_RUN.search(letters) is not None:
        return True
    return reads_as_gibberish(letters)


def _assigned_name(key: bytes) -> bytes:
    """The member a dotted name assigns: ``config.password`` -> ``password``, but ``Pw.Tb`` -> ``Tb``
    (a member of something named like a password is not one)."""
    _head, dot, last = key.rstrip(b".").rpartition(b".")
    return last if dot and last else key


def _mirrors_name(key_low: bytes, value: bytes) -> bool:
    """Whether the value spells the name it is assigned to, up to separators and prefixes:
    ``X509_pubkey_st = struct_X509_pubkey_st``, ``SN_..._KeyMeshing = "id-...-KeyMeshing"``."""
    k = key_low.replace(b"-", b"_").replace(b".", b"_").strip(b"_\"'`]")
    v = value.lower().replace(b"-", b"_").replace(b".", b"_")
    return len(k) >= 8 and len(v) >= 8 and (k in v or v in k)


def _fold_key(key: bytes) -> bytes:
    """``key`` lower-cased, with a camelCase ``Auth`` word kept apart (``expectedAuthCode`` ->
    ``expected_authcode``, ``keyAuth`` -> ``key_auth``) so that it still reads as the word "auth";
    ``OAuth``, ``Author`` and ``Authority`` are not that word."""
    i = key.find(b"Auth")
    while i > 0:
        before, after = key[i - 1], key[i + 4 : i + 5]
        if (97 <= before <= 122 or 48 <= before <= 57) and not (after and 97 <= after[0] <= 122):
            key = key[:i] + b"_" + key[i:]
            i += 1
        i = key.find(b"Auth", i + 4)
    return key.lower()


def _name_may_hold_secret(key_low: bytes) -> bool:
    """Whether an assigned name can hold a secret at all (judged before its value)."""
    if key_low.rstrip(b"\"'`]").endswith(
        (b"id", b"uri", b"url", b"name", b"mode", b"modes", b"flow", b"helper", b"user")
    ):
        return False  # OAuthClientId, RedirectUri, auth_user: identifiers next to secrets, not secrets
    if b"csrf" in key_low or b"xsrf" in key_low or b"authenticity" in key_low:
        return False  # anti-forgery tokens (Rails: authenticity_token) are in every HTML form a site serves
    if not _keyword_is_token(key_low):
        return False
    if _PASS_WORDS.search(key_low) is not None:
        # passthroughBehavior, passport, PWR_MGM, stopword, fp_tokenized_value: no secret
        # unless another secret word remains
        rest = _PASS_WORDS.sub(b"", key_low)
        return _STRONG_RE.search(rest) is not None or _AUTH_WORD.search(rest) is not None
    return True


def _prose_follows(data: bytes, end: int) -> bool:
    """Whether a space and another word follow the value on its line."""
    after = data[end : end + 2]
    return len(after) == 2 and after[0] in (32, 9) and (65 <= after[1] <= 90 or 97 <= after[1] <= 122)


# How far past a value stopped at punctuation its closing quote is looked for.
_MAX_QUOTED = 300


_QUOTE_ENTITIES = frozenset({b"&#34;", b"&quot;", b"&#39;", b"&apos;", b"&#x22;", b"&#x27;"})
_ENTITY_STEMS = frozenset({b"&lt", b"&gt", b"&amp", b"&quot", b"&apos", b"&nbsp", b"&#34", b"&#39", b"&#60", b"&#62"})


def _assignment_ok(
    data: bytes, start: int, end: int, spans: Spans, *, entity_quoted: bool = False, reshaped: bool = False
) -> float | tuple[float, int] | None:
    """Judge the value extracted by a keyword + assignment rule.

    The candidate may be reshaped once (cut at a query's '&', run to a closing quote, taken
    from between HTML-escaped quotes, or cut before an escaped tag) and judged again; a
    reshaped candidate is never reshaped a second time, so the recursion is one level deep
    whatever the input (``?k="a&b"`` would otherwise cut and extend forever)."""
    if end - start > 1024:
        return None  # no assigned credential is this long; a run of "key=key=..." is not one
    key_start, key_end = spans[1]
    key_low = _fold_key(_assigned_name(data[key_start:key_end])) if key_start >= 0 else b""
    # The name alone rules most candidates out; judge it before the value (cheaper).
    if not _name_may_hold_secret(key_low):
        return None
    raw = data[start:end]
    if key_start > 0 and data[key_start - 1] in b"?&" and data[key_end : key_end + 1] == b"=":
        # A URL query parameter (?api_key=...&format=json): its value ends at the next '&'.
        cut = min((i for i in (raw.find(b"&"), raw.find(b"#")) if i > 0), default=-1)
        if cut > 0:
            if reshaped:
                return None
            verdict = _assignment_ok(data, start, start + cut, spans, reshaped=True)
            return None if verdict is None or isinstance(verdict, tuple) else (verdict, start + cut)
    opening = data[start - 1 : start]
    closing_quote = raw[-1:] in (b'"', b"'", b"`")
    if closing_quote and opening not in (b'"', b"'", b"`"):
        return None  # text up to some later quote, not a quoted literal
    quoted = closing_quote or opening in (b'"', b"'", b"`") or entity_quoted
    if quoted and not closing_quote and not entity_quoted and data[end : end + 1] not in (b'"', b"'", b"`", b"\\"):
        # The unquoted-value pattern stopped at punctuation inside the quotes: judge the
        # whole quoted literal ("DP@$7r(h8(w@dbKGsh!5^%"); prose ("User Password") has spaces
        # and is rejected there.
        close = data.find(opening, end, min(len(data), end + _MAX_QUOTED))
        if reshaped or close < 0 or b" " in data[end:close] or b"\t" in data[end:close] or b"\n" in data[end:close]:
            return None  # no closing quote, or words with spaces between: prose
        verdict = _assignment_ok(data, start, close + 1, spans, reshaped=True)
        return None if verdict is None or isinstance(verdict, tuple) else (verdict, close)
    value = _strip_value(raw)
    if value[:1] == b"&" and data[end : end + 1] == b";":
        # HTML-escaped quotes (pass: &#34;...&#34;): judge what is between them.
        entity = data[start : end + 1]
        close = data.find(entity, end + 1, min(len(data), end + 1 + _MAX_QUOTED))
        if reshaped or entity.lower() not in _QUOTE_ENTITIES or close <= end + 1 or b"\n" in data[end + 1 : close]:
            return None
        verdict = _assignment_ok(data, end + 1, close, spans, entity_quoted=True, reshaped=True)
        return None if verdict is None or isinstance(verdict, tuple) else (verdict, close)
    amp = value.rfind(b"&")
    if amp > 0 and data[end : end + 1] == b";" and value[amp:].lower() in _ENTITY_STEMS:
        # Escaped markup follows the value ("password: String&lt;/div&gt;"): the entity is not part of it.
        if reshaped:
            return None
        verdict = _assignment_ok(data, start, start + amp, spans, entity_quoted=entity_quoted, reshaped=True)
        return None if verdict is None or isinstance(verdict, tuple) else (verdict, start + amp)
    if not _value_ok(value, quoted):
        return None
    config = not quoted and key_start >= 0 and _config_context(data, key_start, start)
    if not quoted and not config and _looks_like_code(value, quoted):
        return None
    if not quoted and _prose_follows(data, end) and value.isalpha() and not _gibberish(value.lower()):
        return None  # "Password: Shows the pwdLastSet attribute ...": a sentence, not a value
    if not quoted and not config and value.startswith(_CODE_REFERENCE_PREFIXES):
        return None
    if not quoted and (any(op in value for op in _CODE_OPERATORS) or value.startswith(b":")):
        return None
    if not quoted and (_VARIABLE_REFERENCE.match(value) is not None or value.startswith(b"<")):
        return None  # $this->x, $doc.Create(...), ${X}; "<your password>": a slot, not a value
    if not quoted and not config and data[end : end + 2] in (b" '", b' "'):
        return None  # "$p = ConvertTo-SecureString '...'": a command with arguments, not a literal
    if _DOTTED_NUMBERS.fullmatch(value) is not None:
        return None  # 2.5.13.18, 10.0.0.1:=: an OID, version or address
    if _INT_LITERAL.fullmatch(value) is not None:
        return None  # 0x31c45018: a machine-word integer literal (a 256-bit 0x... key is still reported)
    if _HASH_KEY.search(key_low) is not None and is_hex(value) and len(value) in _HASH_LENGTHS:
        return None  # GRAYLOG_SHA256_PASSWORD=<hex>: a digest of the password
    # Identifiers, file names, flags and sizes named like secrets are not secrets.
    parts = key_low.replace(b"-", b"_").replace(b".", b"_").split(b"_")
    named_like_data = _NOT_SECRET_KEY_RE.search(key_low) is not None or b"id" in parts[:-1]
    if named_like_data and (not looks_random(value) or len(value) < 16 or _TOKEN_ALPHABET.fullmatch(value) is None):
        return None  # a size, limit or path ("10/minute;1000/hour"); a random token is still one
    if value.lower() == key_low or value.lower() in key_low or _mirrors_name(key_low, value):
        return None
    if _PASSWORD_KEY_RE.search(key_low) is not None:
        if value.isdigit() and len(value) < 6:
            return None
        if len(value) < 6 and not (quoted or config):
            return None
        return 0.8 if char_classes(value) >= 2 or len(value) >= 8 else 0.6
    if _PUBLIC_NAME_RE.search(key_low.replace(b"_", b"").replace(b"-", b"").replace(b".", b"")) is not None:
        return None  # public and publishable keys, reCAPTCHA/Turnstile site keys: meant to be shared
    if not _random_enough(value) or _identifier_like(value):
        return None
    if len(value) < 24 and _typed_by_person(value.lower()):
        return None  # "at-0987654321", "012345abcdef": the typed run is most of a short value
    if _WORD_PARTS.fullmatch(value) is not None and not _gibberish(value.lower()):
        return None
    if not any(w in key_low for w in _STRONG_WORDS if w != b"key") and not _AUTH_WORD.search(key_low):
        # Named only "...key" (nkey, KEY, validationKey): dictionaries and lookup tables use
        # that name for ordinary words, so the value must be one machine-made token.
        if _TOKEN_ALPHABET.fullmatch(value) is None or len(value) < 16:
            return None
        if not any(48 <= b <= 57 for b in value) and not _gibberish(value.lower()):
            return None
    return 0.8


# A token's alphabet: base64 / base64url / hex / base32 (no word separators but - and _).
_TOKEN_ALPHABET = re.compile(rb"[A-Za-z0-9+/=_\-]+")


# "auth" is a keyword only as a word of its own ("auth_token", "x-auth"), not inside
# "OAuth", "Authentication", "Authority".
_AUTH_WORD = re.compile(rb"(?:^|[^a-z])auth(?:$|[^a-z]|token|key|code|secret|pass)")
_STRONG_WORDS = (
    b"pass",
    b"pwd",
    b"pw",
    b"psw",
    b"pssw",
    b"pasw",
    b"secret",
    b"token",
    b"key",
    b"credential",
    b"salt",
    b"sas",
    b"api",
    b"passwort",
    b"senha",
    b"contrase",
    b"mot",
    # HMAC keys of ASP.NET's machineKey and Yii's cookieValidationKey: leaking
    # one lets an attacker forge signed ViewState / cookies
    b"validationkey",
    b"validation_key",
    b"decryptionkey",
    b"decryption_key",
)


def _literals(words: tuple[bytes, ...]) -> re.Pattern[bytes]:
    """One C-speed search for any of ``words`` (an alternation of literals cannot backtrack)."""
    return re.compile(b"|".join(re.escape(w) for w in words))


_STRONG_RE = _literals(_STRONG_WORDS)
_PUBLIC_NAME_RE = _literals((b"public", b"pubkey", b"publishable", b"sitekey"))
_PASSWORD_KEY_RE = _literals(_PASSWORD_KEY_PARTS)
_SELF_DESCRIBING_RE = _literals(_SELF_DESCRIBING)
_NOT_SECRET_KEY_RE = _literals(_NOT_SECRET_KEY_PARTS)


def _keyword_is_token(key_low: bytes) -> bool:
    return _STRONG_RE.search(key_low) is not None or _AUTH_WORD.search(key_low) is not None


def _cli_ok(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    """A value given to a password/token flag on a command line is a literal by construction."""
    value = data[start:end].strip(b"\"'")
    if len(value) < 3 or is_placeholder(value) or value.startswith((b"$", b"%", b"<", b"{", b"-")):
        return None
    if value.lower() in (b"stdin", b"prompt", b"ask", b"file", b"env", b"none", b"true", b"false"):
        return None
    if _SELF_DESCRIBING_RE.search(value.lower()) is not None or value.lower() in _STAND_IN_VALUES:
        return None  # --password NATS_PASSWORD, -pass Password1234, --auth user:pass: stand-ins
    if value.endswith((b"...", "\u2026".encode())):
        return None  # --secret-key StF0q...: elided in documentation
    return 0.8


ASSIGNMENT_RULES: tuple[Rule, ...] = (
    Rule(
        id="secrets.password-assignment",
        category="password",
        severity=H,
        pattern=rf"(?i)({_KEY_NAME}){_ASSIGN}{_VALUE}",
        value_group=2,
        validate=_assignment_ok,
        confidence=0.8,
    ),
    Rule(
        # <password>hunter2</password>, <entry key="ApiKey">...</entry>
        id="secrets.password-assignment",
        category="password",
        severity=H,
        pattern=rf"(?i)<({_KEY_NAME})(?:\s[^>]{{0,100}})?>\s{{0,20}}([^<\s]{{1,300}})\s{{0,20}}</",
        value_group=2,
        validate=_assignment_ok,
        confidence=0.8,
    ),
    Rule(
        # <add key="DbPassword" value="hunter2" />, name="token" value="..."
        id="secrets.password-assignment",
        category="password",
        severity=H,
        pattern=rf"(?i)(?:key|name)\s*=\s*[\"']({_KEY_NAME})[\"']\s+value\s*=\s*[\"']([^\"'\n]{{1,300}})",
        value_group=2,
        validate=_assignment_ok,
        confidence=0.8,
    ),
    Rule(
        # .env / shell: TUMBLR_KEY=..., export GH_TOKEN=... (a bare KEY/TOKEN suffix counts here,
        # where the upper-case NAME=value shape says "configuration")
        id="secrets.password-assignment",
        category="password",
        severity=H,
        pattern=r"(?m)^[ \t]*(?:export[ \t]+|set[ \t]+)?([A-Z][A-Z0-9_]*_(?:KEY|TOKEN|SECRET|PASS|PASSWD|PASSWORD|"
        r"PWD|PW|AUTH|CREDENTIALS?|APIKEY|ACCESS_KEY))=[\"']?([^\s\"']{1,300})",
        value_group=2,
        validate=_assignment_ok,
        confidence=0.8,
    ),
    Rule(
        # A name and a value passed together: System.setProperty("DB_PASSWORD", "..."),
        # os.Setenv("GITHUB_TOKEN", "..."), headers.put("X-Api-Key", "..."), config.set("secret", "...")
        id="secrets.password-assignment",
        category="password",
        severity=H,
        pattern=rf"(?i)\(\s*[\"']({_KEY_NAME})[\"']\s*,\s*[\"']([^\"'\n]{{1,300}})[\"']",
        value_group=2,
        validate=_assignment_ok,
        confidence=0.8,
        anchors=(rf"(?i)\(\s*[\"'][A-Za-z0-9_.\-]*(?:{_KEYWORD_ANCHOR[0]})[A-Za-z0-9_.\-]*[\"']\s*,",),
    ),
    Rule(
        # PHP serialize() output (WordPress options, Magento/fecshop config rows in SQL dumps):
        # s:17:"paypal_password";s:16:"hunter2..."
        id="secrets.password-assignment",
        category="password",
        severity=H,
        pattern=rf"(?i)s:\d{{1,4}}:\"({_KEY_NAME})\";s:\d{{1,4}}:\"([^\"\n]{{1,300}})",
        value_group=2,
        validate=_assignment_ok,
        confidence=0.8,
        anchors=(r'";s:\d',),
    ),
    Rule(
        # PHP define('DB_PASSWORD', 'hunter2'); C #define PASSWORD "x"; RPM %define; batch SET x "y"
        id="secrets.password-assignment",
        category="password",
        severity=H,
        pattern=rf"(?i)(?:\bdefine\(\s*[\"']|#define\s+|%define\s+|%global\s+|\bset\s+)({_KEY_NAME})"
        r"(?:[\"']\s*,\s*|\s+)[\"']([^\"'\n]{1,300})[\"']",
        value_group=2,
        validate=_assignment_ok,
        confidence=0.8,
    ),
    Rule(
        # --password hunter2, --token=abc, -p'secret' for mysql-style clients, sshpass -p x
        id="secrets.cli-password",
        category="password",
        severity=H,
        pattern=r"(?i)(?:^|\s)(--?[A-Za-z_\-]{0,20}(?:password|passwd|passphrase|pass|pwd|token|api-key|apikey|"
        r"secret|auth-token|access-key|client-secret|secret-key|bearer))(?:=|\s+)[\"']?([^\s\"'$]{3,300})",
        value_group=2,
        validate=_cli_ok,
        confidence=0.8,
    ),
    Rule(
        id="secrets.cli-password",
        category="password",
        severity=H,
        pattern=r"(\b(?:mysql|mysqldump|mysqladmin|mariadb|sshpass)\b[^\n|;&]{0,120}?\s-p)[\"']?([^\s\"'$-][^\s\"']{2,100})",
        value_group=2,
        validate=_cli_ok,
        confidence=0.8,
    ),
    Rule(
        id="secrets.cli-password",
        category="password",
        severity=H,
        pattern=r"(\bcurl\b[^\n|;&]{0,200}?\s(?:-u|--user)\s+[\"']?[^\s:\"']{1,100}:)([^\s\"'$]{3,200})",
        value_group=2,
        validate=_cli_ok,
        confidence=0.8,
    ),
    Rule(
        # PowerShell: ConvertTo-SecureString 'hunter2' -AsPlainText
        id="secrets.cli-password",
        category="password",
        severity=H,
        pattern=r"(?i)(ConvertTo-SecureString)\s+(?:-String\s+)?(?:-Force\s+)?\\?[\"']?([^\"'\s\\]{3,200})",
        value_group=2,
        validate=_cli_ok,
        confidence=0.9,
    ),
)

# Bare UUIDs are everywhere in ordinary output (request ids, container and cloud resource
# ids); one is a possible credential only when its line names a credential. (A UUID assigned
# to a secret's name is found by the assignment rules anyway.)
_UUID_CONTEXT = re.compile(
    rb"(?i)secret|token|passw|pwd|api[_.\-]?key|apikey|access[_.\-]?key|private[_.\-]?key|auth|credential|"
    rb"bearer|\bkey\b|_key\b|signature|\bsas\b|license|"
    # identity-provider identifiers travel with credentials (OAuth client ids, tenant ids)
    rb"client[_.\-]?id|tenant"
)
_UUID_CONTEXT_REACH = 160  # bytes looked at on each side, within the line


def _uuid_line_context(data: bytes, start: int, end: int) -> bytes:
    lo = max(0, start - _UUID_CONTEXT_REACH)
    line_start = data.rfind(b"\n", lo, start) + 1 or lo
    hi = min(len(data), end + _UUID_CONTEXT_REACH)
    newline = data.find(b"\n", end, hi)
    return data[line_start:start] + b" " + data[end : hi if newline < 0 else newline]


_NAME_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def _owner_name(data: bytes, start: int) -> bytes | None:
    """The name a value is assigned to (``uid=<v>``, ``"id": "<v>"``, ``tenantId = '<v>'``), or None.

    Looks back over at most a few quotes and spaces, an assignment operator (``=``, ``:``, ``.=``,
    ``:=``, ``+=``, ``?=``), and a name of up to 64 characters: O(1) per candidate."""
    i = start - 1
    while i >= 0 and start - i <= 4 and data[i] in b"\"' \t":
        i -= 1
    if i < 0 or data[i] not in b"=:":
        return None
    op_end = i
    while i >= 0 and op_end - i < 3 and data[i] in b"=:.+?|&!":
        i -= 1
    while i >= 0 and op_end - i < 12 and data[i] in b"\"' \t]":
        i -= 1
    name_end = i + 1
    while i >= 0 and name_end - i <= 64 and data[i] in _NAME_BYTES:
        i -= 1
    return data[i + 1 : name_end] or None


def _uuid_ok(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    """A random-looking UUID (not ``0000...`` or ``12345678-ABCD-...``) on a line that names a
    credential; a UUID assigned to a name of its own (``uid=``, ``"id":``) belongs to that name."""
    hexdigits = data[start:end].replace(b"-", b"").lower()
    if len(set(hexdigits)) < 8 or _typed_by_person(hexdigits):
        return None  # 00000000-0000-..., 11111111-1111-..., bace4d19-dead-beef-...
    owner = _owner_name(data, start)
    context = owner if owner is not None else _uuid_line_context(data, start, end)
    if not _UUID_CONTEXT.search(context):
        return None  # "?access_token=x&uid=<uuid>": the uid is not the token
    return 0.5


UUID_RULE = Rule(
    # Many credentials are UUID-shaped (Heroku and Azure keys, client secrets, tenant-scoped
    # tokens); a random UUID leaving the sandbox is reported at medium (warn + redact), with
    # a category of its own so a policy can lower it (``category_overrides: {uuid: info}``).
    id="secrets.uuid",
    category="uuid",
    severity=M,
    pattern=r"\b([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})",
    value_group=1,
    validate=_uuid_ok,
    confidence=0.5,
    not_followed_by=_TOKEN_END,
    anchors=(r"[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",),
)

AWS_SECRET_RULE = Rule(
    id="secrets.aws-secret-access-key",
    category="cloud_key",
    severity=C,
    pattern=r"(?i)(?:aws|amazon)[A-Za-z0-9_.\-]{0,30}(?:secret|sk)[A-Za-z0-9_.\-]{0,30}[\"'`]?\s{0,8}(?:=|:=|:|=>)"
    r"\s{0,8}[\"'`]?([A-Za-z0-9/+]{40})(?:$|[^A-Za-z0-9/+])",
    value_group=1,
    validate=_token_ok,
    confidence=0.95,
)


def _looks_random_ok(data: bytes, start: int, end: int, spans: Spans) -> float | None:
    if _token_ok(data, start, end, spans) is None:
        return None
    return 0.7 if looks_random(data[start:end]) else None


STANDALONE_AWS_SECRET_RULE = Rule(
    # A 40-character base64 string right after an access key id on the same line
    # (``AKIA... wJalr...``): CSV exports and CLI output.
    id="secrets.aws-secret-access-key",
    category="cloud_key",
    severity=C,
    pattern=r"(?:AKIA|ASIA)[0-9A-Z]{16}[\"']?[\s,;:|]{1,8}[\"']?([A-Za-z0-9/+]{40})(?:$|[^A-Za-z0-9/+=])",
    value_group=1,
    validate=_looks_random_ok,
)


# Prefilter anchors for rules whose pattern does not start with a usable literal.
_ANCHORS: dict[str, tuple[str, ...]] = {
    "secrets.azure-ad-client-secret": (r"Q~",),
    "secrets.azure-sas-token": (r"sig=",),
    "secrets.digitalocean-token": (r"_v1_",),
    "secrets.yandex-token": (r"YC", r"AQVN", r"t1\."),
    "secrets.hashicorp-tf-token": (r"\.atlasv1\.",),
    "secrets.vault-token": (r"hvs\.", r"hvb\.", r"\bs\.[A-Za-z0-9]{24}"),
    "secrets.github-token": (r"gh[pousr]_",),
    "secrets.stripe-secret-key": (r"_live_",),
    "secrets.stripe-test-key": (r"_test_",),
    "secrets.easypost-token": (r"EZ[AT]K",),
    "secrets.slack-webhook": (r"hooks\.slack\.com",),
    "secrets.telegram-bot-token": (r":AA",),
    "secrets.gcp-oauth-refresh-token": (r"1//0",),
    "secrets.twilio-api-key": (r"SK[0-9a-fA-F]{8}",),
    "secrets.mailchimp-api-key": (r"-us\d",),
    "secrets.new-relic-key": (r"NR(?:AK|II|JS)-",),
    "secrets.facebook-access-token": (r"EAA[MC]", r"\d\|"),
    "secrets.twitter-bearer-token": (r"AAAAAAAAAAAAAAAAAAAA",),
    "secrets.authress-key": (r"\.acc[_-]",),
    "secrets.jwt": (r"eyJ",),
    "secrets.onepassword-token": (r"ops_eyJ",),
    "secrets.db-connection-string": (r"://[^\s:@/]*:[^\s@/]*@",),
    "secrets.url-credentials": (r"://[^\s:@/]*:[^\s@/]*@",),
    "secrets.aws-secret-access-key": (r"(?i)(?:aws|amazon)[A-Za-z0-9_.\-]*(?:secret|sk)", r"AKIA|ASIA"),
    "secrets.mailgun-key": (r"\b(?:key|pubkey)-[a-f0-9]{8}",),
    "secrets.mailgun-api-key": (r"[a-f0-9]-[a-f0-9]{8}-[a-f0-9]{8}",),
    "secrets.harness-token": (r"\b(?:pat|sat)\.[A-Za-z0-9_\-]{22}\.",),
    "secrets.sidekiq-url": (r"(?i)contribsys",),
    "secrets.bearer-token": (r"bearer",),
    "secrets.basic-auth": (r"basic",),
    "pii.email": (r"@",),
    "secrets.gitlab-token": (r"gl(?:pat|ptt|dt|rtr|rt|cbt|ft|imt|agent|oas|soat|ffct|wt)-",),
    "secrets.sidekiq-credentials": (r"(?i)CONTRIBSYS",),
    "secrets.auth-header": (r"(?i)authorization|api-key|auth-token|private-token|access-token",),
    # The host part, not "https://" (in every other line of output).
    "secrets.teams-webhook": (r"\.webhook\.office\.com/webhookb2/",),
    "secrets.discord-webhook": (r"discord(?:app)?\.com/api/webhooks/",),
}
_CLI_ANCHORS = (
    (r"(?i)-[A-Za-z_\-]{0,20}(?:pass|pwd|token|api|secret|auth|access|client|bearer)",),
    (r"mysql|mariadb|sshpass",),
    (r"curl",),
    (r"(?i)ConvertTo-SecureString",),
)


# The three keyword-assignment shapes: ``name = value``, ``<name>value</``, ``key="name" value=``.
_ASSIGNMENT_ANCHORS = (
    # keyword, then (after the rest of the name, quotes and an optional type) the operator
    (
        rf"(?i)(?:{_KEYWORD_ANCHOR[0]})[A-Za-z0-9_.\-]*(?:\\?[\"'`\]]){{0,2}}"
        r"(?:[ \t]*:?[ \t]*(?:string|str|&str|\[\]byte|SecureString)\??)?[ \t]*[!?.+]?[=:]",
    ),
    (rf"(?i)<[A-Za-z0-9_.\-]*(?:{_KEYWORD_ANCHOR[0]})",),
    (rf"(?i)(?:key|name)\s*=\s*[\"'][^\"']*(?:{_KEYWORD_ANCHOR[0]})",),
    # the directive, then a name holding a keyword ("set " alone is in every other shell script)
    (
        rf"(?i)(?:define\(\s*[\"']|#define\s+|%define\s+|%global\s+|\bset\s+)[A-Za-z0-9_.\-]*"
        rf"(?:{_KEYWORD_ANCHOR[0]})",
    ),
    (r"_(?:KEY|TOKEN|SECRET|PASS|PASSWD|PASSWORD|PWD|PW|AUTH|CREDENTIALS?|APIKEY|ACCESS_KEY)=",),
)


def _anchored(rule: Rule) -> Rule:
    if rule.anchors:
        return rule
    if rule.id == "secrets.password-assignment":
        shape = 0
        if rule.pattern.startswith("(?i)<"):
            shape = 1
        elif rule.pattern.startswith("(?i)(?:key|name)"):
            shape = 2
        elif rule.pattern.startswith("(?i)(?:\\bdefine"):
            shape = 3
        elif rule.pattern.startswith("(?m)^"):
            shape = 4
        return replace(rule, anchors=_ASSIGNMENT_ANCHORS[shape])
    if rule.id == "secrets.cli-password":
        for marker, anchors in (("ConvertTo", _CLI_ANCHORS[3]), ("mysql", _CLI_ANCHORS[1]), ("curl", _CLI_ANCHORS[2])):
            if marker in rule.pattern:
                return replace(rule, anchors=anchors)
        return replace(rule, anchors=_CLI_ANCHORS[0])
    if rule.id not in _ANCHORS:
        return rule
    return replace(rule, anchors=_ANCHORS[rule.id])


SECRET_RULES: tuple[Rule, ...] = tuple(
    _anchored(r)
    for r in (
        *PROVIDER_RULES,
        *STRUCTURAL_RULES,
        AWS_SECRET_RULE,
        STANDALONE_AWS_SECRET_RULE,
        UUID_RULE,
        *ASSIGNMENT_RULES,
        EMAIL_RULE,
        SSN_RULE,
    )
)

# A provider or structural finding explains a value better than the generic assignment
# rule that also matched it; the generic one is dropped when its span overlaps.
_GENERIC_RULES = frozenset(
    {"secrets.password-assignment", "secrets.cli-password", "secrets.url-credentials", "secrets.uuid"}
)


def _prefer_specific(findings: list[Finding]) -> list[Finding]:
    specific = SpanIndex((f.start, f.end) for f in findings if f.rule not in _GENERIC_RULES)
    if specific:
        findings = [f for f in findings if not (f.rule in _GENERIC_RULES and specific.overlaps(f.start, f.end))]
    # A UUID assigned to a secret's name is reported once, as that secret.
    named = SpanIndex((f.start, f.end) for f in findings if f.rule != UUID_RULE.id)
    if not named:
        return findings
    return [f for f in findings if not (f.rule == UUID_RULE.id and named.overlaps(f.start, f.end))]


class SecretsScanner:
    """Finds credentials; every match is reported and its span is the secret value."""

    name = "secrets"

    pattern_rules: tuple[Rule, ...] = SECRET_RULES

    @functools.cached_property
    def _bank(self) -> PatternBank:
        # Built on first use: the gate matches the scanners' rules with one combined
        # bank and never needs this one (only a scanner used on its own does).
        return PatternBank(SECRET_RULES)

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules this scanner runs."""
        return SECRET_RULES

    def direct(self, data: bytes) -> list[Finding]:
        """No findings of its own: every finding of this scanner comes from a rule match."""
        return []

    def post(self, data: bytes, raw: list[Finding], direct: list[Finding] | None = None) -> list[Finding]:
        """Scanner-specific clean-up of the raw rule matches (no line numbers yet)."""
        return _prefer_specific(dedupe(raw))

    def scan(self, data: bytes, source: str = "") -> list[Finding]:
        """Findings in ``data`` (bytes), sorted by position, with line numbers."""
        return finalize(data, self.post(data, self._bank.scan(data, self.name)), source)


__all__ = ["ASSIGNMENT_RULES", "PROVIDER_RULES", "SECRET_RULES", "STRUCTURAL_RULES", "SecretsScanner"]
