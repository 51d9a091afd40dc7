"""Credentials: secrets injected into sandboxes, and the egress proxy that keeps them out.

Direct injection (:func:`env`, :func:`file`, :func:`stdin` on a :class:`SecretRef`) gives the
sandboxed process a real value. With network mode ``proxy``, secrets bound to a
:class:`CredentialRule` stay on the host: the sandbox holds a placeholder and the
:class:`EgressProxy` adds the real header only for the hosts the rule names.
"""

from kavach.credentials.options import ProxyOptions, parse_proxy_options
from kavach.credentials.proxy import (
    PLACEHOLDER_PREFIX,
    REASON_HEADER,
    CredentialRule,
    EgressProxy,
    ProxyConfig,
)
from kavach.credentials.rules import EgressDenied, HostRule
from kavach.credentials.secrets import (
    CredentialStore,
    EnvInjection,
    FileInjection,
    Injection,
    ResolvedSecrets,
    SecretRef,
    StdinInjection,
    env,
    file,
    resolve_secrets,
    stdin,
)

__all__ = [
    "PLACEHOLDER_PREFIX",
    "REASON_HEADER",
    "CredentialRule",
    "CredentialStore",
    "EgressDenied",
    "EgressProxy",
    "EnvInjection",
    "FileInjection",
    "HostRule",
    "Injection",
    "ProxyConfig",
    "ProxyOptions",
    "ResolvedSecrets",
    "SecretRef",
    "StdinInjection",
    "env",
    "file",
    "parse_proxy_options",
    "resolve_secrets",
    "stdin",
]
