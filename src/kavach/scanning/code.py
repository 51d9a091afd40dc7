"""The code scanner: malicious or dangerous code in what leaves the sandbox.

Three layers, each tokenised rather than substring-based:

1. **RE2 rules** with word boundaries over the whole artifact (shell one-liners, JS and
   Ruby idioms, dangerous paths). Rules marked ``shell`` are confirmed by re-parsing the
   matched line with :mod:`shlex` (``punctuation_chars``), so ``curl ... | sh`` is a pipe
   whose *command word* is a shell, not a string that happens to contain ``| sh``.
2. **Python AST** where the artifact parses as Python: calls are resolved by name
   (``subprocess.run(..., shell=True)``, ``eval``/``exec`` of a non-literal, ``exec`` of a
   value decoded from base64/zlib/marshal, ``socket`` + ``os.dup2`` reverse shells,
   ``setup.py`` install hooks that touch the network, secrets sent over HTTP).
3. Severity reflects intent: ``critical`` only for code whose purpose is hostile
   (reverse shells, decode-and-execute, destroying the root filesystem), ``high`` for
   exfiltration and download-and-run, ``medium``/``low`` for risky-but-common idioms
   (``shell=True`` on a variable, MD5, ``verify=False``) so that ordinary tooling output
   ("Total amount of memory", "sync finished", "Running /bin/bash script") passes.
"""

from __future__ import annotations

import ast
import functools
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, replace

from kavach.scanning.engine import (
    MAX_MATCH,
    PatternBank,
    Rule,
    Spans,
    dedupe,
    finalize,
    line_bounds,
    make_finding,
    snippet,
)
from kavach.scanning.findings import Finding, Severity

C, H, M, L = Severity.CRITICAL, Severity.HIGH, Severity.MEDIUM, Severity.LOW

# Python source larger than this is matched by the RE2 rules only: ast.parse is neither
# linear-time-guaranteed nor cheap on multi-megabyte inputs.
MAX_AST_BYTES = 1 << 20

_SHELLS = frozenset(
    {"sh", "bash", "zsh", "dash", "ksh", "ash", "fish", "python", "python3", "perl", "ruby", "node", "php"}
)
_FETCHERS = frozenset({"curl", "wget", "fetch", "iwr", "invoke-webrequest", "irm", "invoke-restmethod"})


def _shell_tokens(line: str) -> list[str] | None:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:
        return None  # unbalanced quotes: the caller falls back to the regex verdict


def _pipe_to_shell(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    """``curl|wget ... | [sudo] sh``: the fetcher and the shell are command words of a pipeline."""
    lo, hi = line_bounds(data, start, end, 2048)
    tokens = _shell_tokens(data[lo:hi].decode("utf-8", "replace"))
    if tokens is None:
        return 0.6
    saw_fetch = False
    command_word = True
    for i, tok in enumerate(tokens):
        base = tok.rsplit("/", 1)[-1].lower()
        if command_word and base in _FETCHERS:
            saw_fetch = True
        if tok in ("|", "|&") and saw_fetch:
            rest = [t for t in tokens[i + 1 : i + 4] if t not in ("sudo", "-E", "env")]
            if rest and rest[0].rsplit("/", 1)[-1].lower() in _SHELLS:
                return 0.95
        command_word = tok in ("|", "||", "&&", ";", "(", "$(", "|&", "&") or (command_word and base == "sudo")
    return None


def _decode_to_shell(data: bytes, start: int, end: int, _spans: Spans) -> float | None:
    lo, hi = line_bounds(data, start, end, 2048)
    tokens = _shell_tokens(data[lo:hi].decode("utf-8", "replace"))
    if tokens is None:
        return 0.6
    for i, tok in enumerate(tokens):
        if tok in ("|", "|&"):
            nxt = [t for t in tokens[i + 1 : i + 3] if t != "sudo"]
            if (
                nxt
                and nxt[0].rsplit("/", 1)[-1] in _SHELLS
                and any(t in ("base64", "xxd", "openssl", "gunzip", "zcat", "rev") for t in tokens[:i])
            ):
                return 0.95
    return None


def _rule(
    rule_id: str,
    category: str,
    severity: Severity,
    pattern: str,
    *,
    validate: object = None,
    confidence: float = 0.85,
    case_insensitive: bool = False,
) -> Rule:
    return Rule(
        id=f"code.{rule_id}",
        category=category,
        severity=severity,
        pattern=pattern,
        validate=validate,  # type: ignore[arg-type]
        case_insensitive=case_insensitive,
        evidence="snippet",
        redact=False,
        confidence=confidence,
    )


CI, EX, PE, SC, OB, FS, CR = (
    "command_injection",
    "data_exfiltration",
    "privilege_escalation",
    "supply_chain",
    "obfuscation",
    "filesystem_abuse",
    "crypto_misuse",
)
_SENSITIVE = (
    r"(?:/etc/(?:passwd|shadow|sudoers|gshadow|master\.passwd)|~?/?\.ssh/(?:id_[a-z0-9]+|authorized_keys|known_hosts)|"
    r"\.aws/credentials|\.kube/config|\.docker/config\.json|\.git-credentials|\.netrc|\.npmrc|\.pypirc|"
    r"\.bash_history|\.zsh_history|/proc/self/environ|Login Data|Local State|cookies\.sqlite|\.env\b)"
)

REGEX_RULES: tuple[Rule, ...] = (
    # --- command injection / remote code execution in shell ---
    _rule(
        "pipe-to-shell",
        CI,
        H,
        r"(?i)\b(?:curl|wget|fetch|iwr|irm)\b[^\n]{0,400}\|[^\n]{0,40}\b(?:ba|z|da|k)?sh\b|"
        r"(?i)\b(?:curl|wget)\b[^\n]{0,400}\|[^\n]{0,40}\b(?:python3?|perl|ruby|node|php)\b",
        validate=_pipe_to_shell,
    ),
    _rule(
        "decode-to-shell",
        OB,
        C,
        r"\b(?:base64|xxd|openssl)\b[^\n]{0,200}\|[^\n]{0,20}\b(?:ba|z|da|k)?sh\b",
        validate=_decode_to_shell,
    ),
    _rule(
        "shell-eval-download",
        CI,
        H,
        r"\b(?:ba)?sh\s+-c\s+[\"']?\$\((?:curl|wget)\b|\beval\s+[\"']?\$\((?:curl|wget)\b|"
        r"\bsource\s+<\((?:curl|wget)\b|\b(?:ba)?sh\s+<\((?:curl|wget)\b",
    ),
    _rule(
        "powershell-encoded",
        OB,
        C,
        r"(?i)\bpowershell(?:\.exe)?\b[^\n]{0,80}\s-(?:e|enc|encodedcommand)\s+"
        r"[A-Za-z0-9+/=]{20,}",
    ),
    _rule(
        "powershell-download-exec",
        CI,
        C,
        r"(?i)\b(?:iex|invoke-expression)\b[^\n]{0,40}(?:downloadstring|"
        r"invoke-webrequest|iwr|new-object\s+net\.webclient)",
    ),
    # --- reverse shells ---
    _rule(
        "dev-tcp",
        CI,
        C,
        r"(?:[<>]&?|exec\s+\d*<>)\s{0,4}/dev/(?:tcp|udp)/[A-Za-z0-9.\-]+/\d{1,5}|"
        r"/dev/(?:tcp|udp)/[A-Za-z0-9.\-]+/\d{1,5}\s{0,4}(?:[<>]|0>&1)",
    ),
    _rule(
        "netcat-exec",
        CI,
        C,
        r"\b(?:nc|ncat|netcat|nc\.traditional)\b[^\n|;]{0,120}\s-(?:e|c|-exec|-sh-exec)\s+"
        r"[\"']?(?:/bin/|/usr/bin/)?(?:ba|z|da)?sh\b",
    ),
    _rule("mkfifo-shell", CI, C, r"\bmkfifo\b[^\n]{0,120}\b(?:nc|ncat|netcat|openssl\s+s_client|telnet)\b"),
    _rule("socat-exec", CI, C, r"\bsocat\b[^\n]{0,200}\b(?:exec|system):[\"']?(?:/bin/)?(?:ba)?sh"),
    _rule("bash-interactive-redirect", CI, C, r"\b(?:ba|z)?sh\s+-i\s*(?:[<>]&?|2>&1)[^\n]{0,40}/dev/(?:tcp|udp)/"),
    _rule(
        "scripted-reverse-shell",
        CI,
        C,
        r"(?i)(?:socket\.socket\([^\n]{0,300}\.connect\([^\n]{0,300}"
        r"(?:os\.dup2|pty\.spawn|subprocess\.call\(\[?[\"']/bin/(?:ba)?sh)|fsockopen\([^\n]{0,200}(?:/bin/sh|exec|"
        r"shell_exec|proc_open)|use\s+Socket;[^\n]{0,300}exec|TCPSocket\.(?:new|open)\([^\n]{0,200}(?:exec|spawn|"
        r"/bin/sh))",
    ),
    # --- privilege escalation ---
    _rule("setuid-chmod", PE, H, r"\bchmod\s+(?:-[A-Za-z]+\s+)?(?:[ugoa]*\+[rwx]*s[rwx]*|[2467][0-7]{3})\s+\S"),
    _rule("sudoers-write", PE, C, r"(?i)(?:>>?|tee\s+(?:-a\s+)?)\s*/etc/sudoers(?:\.d/\S*)?|NOPASSWD:\s*ALL"),
    _rule(
        "passwd-write",
        PE,
        C,
        r"(?:>>|tee\s+-a)\s*/etc/(?:passwd|shadow)\b|\busermod\s+-[a-zA-Z]*G\s*(?:sudo|wheel|root)\b",
    ),
    _rule("setcap-escalation", PE, H, r"\bsetcap\s+[\"']?cap_(?:setuid|sys_admin|dac_override|sys_ptrace)"),
    _rule(
        "container-escape",
        PE,
        C,
        r"\bnsenter\s+(?:-[a-zA-Z]+\s+)*-t\s*1\b|--privileged\b[^\n]{0,80}-v\s+/:/|"
        r"/var/run/docker\.sock|/proc/sys/kernel/core_pattern|release_agent|/proc/\d+/root/|/proc/1/root",
    ),
    _rule("ld-preload", PE, H, r"\bLD_PRELOAD\s*=\s*[\"']?(?:/tmp|/dev/shm|/var/tmp|\./)|/etc/ld\.so\.preload"),
    # --- filesystem abuse ---
    _rule(
        "rm-root",
        FS,
        C,
        r"\brm\s+(?:-[a-zA-Z]*[rR][a-zA-Z]*\s+|--recursive\s+|--force\s+|-[a-zA-Z]*f[a-zA-Z]*\s+|"
        r"--no-preserve-root\s+)+(?:/|/\*|~/?|\$HOME/?|/(?:etc|usr|bin|boot|lib|var|home))(?:\s|$|[;&|\"'])",
    ),
    _rule(
        "disk-wipe",
        FS,
        C,
        r"\bdd\b[^\n]{0,80}\bof=/dev/(?:sd[a-z]|nvme\d|hd[a-z]|vd[a-z]|xvd[a-z]|mmcblk\d)|"
        r"\bmkfs(?:\.[a-z0-9]+)?\s+/dev/(?:sd|nvme|hd|vd)|>\s*/dev/(?:sd[a-z]|nvme\d)\b|\bshred\b[^\n]{0,40}/dev/",
    ),
    _rule("fork-bomb", FS, C, r":\s*\(\s*\)\s*\{\s*:\s*\|\s*:\s*&\s*\}\s*;\s*:"),
    _rule(
        "persistence",
        FS,
        H,
        r"(?:>>?|tee\s+-a)\s*~?/?(?:[\w.\-/]*/)?\.ssh/authorized_keys|\bcrontab\s+-l\b[^\n]{0,120}"
        r"\|\s*crontab\s+-|(?:>>|tee\s+-a)\s*(?:~|\$HOME)?/?\.(?:bashrc|profile|bash_profile|zshrc)\b|"
        r"/etc/(?:cron\.d|rc\.local|systemd/system)/\S+\s*<<|\bchattr\s+\+i\b",
    ),
    _rule(
        "history-tamper", FS, M, r"\bhistory\s+-c\b|\bunset\s+HISTFILE\b|HISTFILE=/dev/null|>\s*~?/?\.bash_history\b"
    ),
    _rule("path-traversal-sensitive", FS, H, r"(?:\.\./){3,}(?:etc/(?:passwd|shadow)|root/|proc/self)"),
    # --- exfiltration ---
    _rule(
        "curl-upload-sensitive",
        EX,
        C,
        rf"\b(?:curl|wget)\b[^\n]{{0,300}}(?:-d|--data(?:-binary|-raw|-urlencode)?|"
        rf"-F|--form|-T|--upload-file|--post-file)[= ]\s*[\"']?@?[^\s\"']{{0,60}}{_SENSITIVE}",
    ),
    _rule(
        "pipe-secrets-to-network",
        EX,
        C,
        rf"(?:\bcat\b|\benv\b|\bprintenv\b|\bset\b)[^\n|]{{0,120}}(?:{_SENSITIVE}[^\n|]{{0,40}})?"
        r"\|\s*(?:base64\s*\|\s*)?(?:curl|wget|nc|ncat|netcat|telnet|openssl\s+s_client)\b",
    ),
    _rule("netcat-send-file", EX, H, rf"\b(?:nc|ncat|netcat)\b[^\n]{{0,80}}<\s*[^\s]{{0,60}}{_SENSITIVE}"),
    _rule(
        "dns-exfiltration",
        EX,
        H,
        r"\b(?:nslookup|dig|host|ping)\s+[^\n]{0,20}\$\((?:whoami|hostname|id|cat|"
        r"base64|env|uname)\b|\b(?:nslookup|dig)\s+[^\n]{0,40}`(?:whoami|hostname|id|cat)",
    ),
    _rule(
        "read-sensitive",
        EX,
        M,
        rf"\b(?:cat|less|more|head|tail|base64|xxd|strings|cp|scp|tar)\b[^\n|;]{{0,80}}{_SENSITIVE}",
    ),
    _rule(
        "js-serialize-env",
        EX,
        H,
        r"JSON\.stringify\(\s*process(?:\.env|\[\s*[\"']env[\"']\s*\])\s*\)|"
        r"\bENV\.(?:to_h|to_hash|inspect)\b[^\n]{0,20}(?:\.to_json|to_yaml)|JSON\.(?:dump|generate)\(\s*ENV\b|"
        r"\bENV\.to_h\.to_json|Marshal\.dump\(\s*ENV",
    ),
    _rule(
        "js-send-env",
        EX,
        H,
        r"(?:https?\.request|fetch|axios\.post|\.write|\.send|\.post)\([^\n]{0,200}"
        r"process\.env\b(?:[^\n.]|$)",
    ),
    _rule(
        "discord-webhook-exfil",
        EX,
        H,
        r"discord(?:app)?\.com/api/webhooks/[^\n]{0,300}(?:token|password|cookie|"
        r"passw|login data|leveldb)|(?:token|password|cookie)[^\n]{0,300}discord(?:app)?\.com/api/webhooks/",
    ),
    _rule(
        "browser-credential-theft",
        EX,
        H,
        r"(?i)(?:Login Data|Local Storage[/\\\\]leveldb|Cookies|"
        r"Web Data)[\"'][^\n]{0,200}(?:Chrome|Edge|Brave|Opera|discord)|(?:Chrome|Edge|Brave|discord)[^\n]{0,120}"
        r"(?:Local Storage[/\\\\]+leveldb|Login Data)",
    ),
    _rule("screenshot-capture", EX, M, r"\b(?:ImageGrab\.grab|pyautogui\.screenshot|mss\(\)\.shot|screenshot\(\))"),
    _rule(
        "clipboard-hijack",
        EX,
        M,
        r"\b(?:pyperclip\.(?:copy|paste)|clipboard\.(?:writeText|readText)|"
        r"win32clipboard\.SetClipboardData)\b",
    ),
    # --- supply chain ---
    _rule(
        "pip-install-url",
        SC,
        M,
        r"\bpip3?\s+install\b[^\n]{0,120}(?:--(?:extra-)?index-url\s+http://|"
        r"--trusted-host\b|\bhttps?://[^\s]+\.(?:whl|tar\.gz|zip)\b|git\+http)",
    ),
    _rule("npm-install-url", SC, M, r"\bnpm\s+(?:i|install)\b[^\n]{0,80}\bhttps?://[^\s]+\.(?:tgz|tar\.gz)"),
    _rule(
        "install-hook-network",
        SC,
        H,
        r"[\"'](?:pre|post)?install[\"']\s*:\s*[\"'][^\"'\n]{0,200}\b(?:curl|wget|node\s+-e|"
        r"sh\s+-c|bash\s+-c|powershell|python\s+-c)\b",
    ),
    _rule(
        "download-to-path-and-run",
        SC,
        H,
        r"\b(?:curl|wget)\b[^\n]{0,200}(?:-o|-O|--output)\s+\S*"
        r"(?:/usr/local/bin|/usr/bin|/tmp|/dev/shm)/\S+[^\n]{0,120}(?:&&|;)\s*(?:chmod\s+\+x|\.?/|sh\s|bash\s)",
    ),
    _rule("go-exec-download", SC, H, r"http\.Get\([^\n]{0,120}\n(?:[^\n]{0,120}\n){0,6}[^\n]{0,120}exec\.Command\("),
    _rule(
        "urlretrieve-exec",
        SC,
        H,
        r"(?:urlretrieve|urlopen|requests\.get)\([^\n]{0,200}\.(?:exe|bin|sh|elf|dll|scr)"
        r"\b[\"']",
    ),
    _rule(
        "shady-link",
        SC,
        M,
        r"(?i)https?://[^\s\"']{0,80}(?:grabify\.link|iplogger\.(?:org|com)|\.workers\.dev|"
        r"ngrok(?:-free)?\.(?:io|app)|pastebin\.com/raw|transfer\.sh|requestbin|webhook\.site|interact\.sh|"
        r"burpcollaborator\.net|oast\.(?:fun|me|live|pro)|\.(?:tk|ml|ga|cf|gq)/)",
    ),
    _rule(
        "dll-hijack",
        SC,
        H,
        r"\b(?:WriteProcessMemory|CreateRemoteThread|VirtualAllocEx|NtCreateThreadEx|"
        r"SetWindowsHookEx|QueueUserAPC)\b",
    ),
    # --- obfuscation ---
    _rule(
        "js-eval-decoded",
        OB,
        C,
        r"\beval\s*\(\s*(?:atob|unescape|decodeURIComponent|Buffer\.from|"
        r"String\.fromCharCode|require\([\"']zlib)\b",
    ),
    _rule(
        "js-function-constructor",
        OB,
        H,
        r"\b(?:new\s+Function|Function)\s*\(\s*(?:atob|Buffer\.from|"
        r"String\.fromCharCode|unescape)\b|\bconstructor\s*\(\s*[\"']return\s+this",
    ),
    _rule(
        "js-obfuscator-identifiers",
        OB,
        M,
        r"\b_0x[a-f0-9]{4,6}\b[^\n]{0,200}\b_0x[a-f0-9]{4,6}\b[^\n]{0,200}"
        r"\b_0x[a-f0-9]{4,6}\b",
    ),
    _rule("hex-escaped-blob", OB, M, r"(?:\\x[0-9a-fA-F]{2}){24,}"),
    _rule(
        "charcode-chain",
        OB,
        M,
        r"(?:String\.fromCharCode|chr)\(\s*\d{2,3}\s*\)(?:\s*[+,]\s*(?:String\.fromCharCode|"
        r"chr)\(\s*\d{2,3}\s*\)){8,}",
    ),
    _rule(
        "python-exec-decoded",
        OB,
        C,
        r"\b(?:exec|eval)\s*\(\s*(?:compile\()?\s*(?:base64\.b(?:64|32|16|85)decode|"
        r"zlib\.decompress|marshal\.loads|codecs\.decode|bytes\.fromhex|__import__\([\"'](?:base64|zlib|marshal|codecs)"
        r"|[\"'][^\"'\n]{0,10}[\"']\.join\(\s*(?:map\(\s*)?chr)",
    ),
    _rule(
        "ruby-eval-decoded",
        OB,
        C,
        r"\b(?:eval|instance_eval|class_eval)\s*\(?\s*(?:Base64\.(?:decode64|strict_decode64|"
        r"urlsafe_decode64)|\[[^\]\n]{0,200}\]\.pack\(|Zlib::Inflate)",
    ),
    _rule(
        "go-exec-decoded",
        OB,
        H,
        r"base64\.StdEncoding\.DecodeString\([^\n]{0,200}\n(?:[^\n]{0,120}\n){0,6}"
        r"[^\n]{0,120}exec\.Command",
    ),
    _rule(
        "builtins-indirection",
        OB,
        H,
        r"(?:getattr\(\s*(?:__builtins__|builtins)\s*,|vars\(\s*(?:globals|locals)\(\)\s*"
        r"\[\s*[\"']__builtins__[\"']\s*\]\s*\)\s*\[|__builtins__\.__dict__\s*\[)",
    ),
    _rule(
        "js-api-obfuscation",
        OB,
        M,
        r"\b(?:process|os|child_process|require\([\"']child_process[\"']\))\s*\[\s*"
        r"[^\]\n]{1,160}\]\s*(?:\(|\.(?:call|apply|bind)\s*\()|Reflect\.get\(\s*(?:process|os|child_process)\s*,|"
        r"Object\.getOwnPropertyDescriptor\(\s*(?:process|os|child_process)\s*,|"
        r"Object\.(?:getOwnPropertyNames|keys|entries)\(\s*(?:process|os|child_process)\s*\)\.(?:find|filter)\(",
    ),
    _rule(
        "python-api-obfuscation",
        OB,
        M,
        r"__import__\(\s*[\"'][a-z]+[\"']\s*\)\.__getattribute__\(|"
        r"__getattribute__\(\s*[\"'](?:system|popen|startfile|exec|spawn)",
    ),
    _rule("steganography", OB, M, r"\b(?:steganography|stegano|lsb\.reveal|exif\.load|piexif)\b"),
    _rule("unicode-identifier-exec", OB, H, r"(?:\xf0\x9d[\x90-\x9f][\x80-\xbf]){2,}"),
    # --- JS / Ruby / Go command execution ---
    _rule(
        "js-child-process-exec",
        CI,
        M,
        r"\b(?:child_process|cp)\.(?:exec|execSync)\s*\(\s*(?:`[^`\n]{0,200}\$\{|"
        r"[^)\n]{0,200}\+\s*[A-Za-z_$])|require\(\s*[\"']child_process[\"']\s*\)\.(?:exec|execSync|spawn)\s*\(",
    ),
    _rule(
        "silent-process",
        CI,
        M,
        r"detached\s*:\s*true[^\n]{0,80}\n?[^\n]{0,80}stdio\s*:\s*[\"']ignore[\"']|"
        r"(?:stdout|stderr|stdin)\s*=\s*subprocess\.DEVNULL[^\n]{0,10}\n?[^\n]{0,80}(?:stdout|stderr|stdin)\s*=\s*"
        r"subprocess\.DEVNULL[^\n]{0,10}\n?[^\n]{0,80}(?:stdout|stderr|stdin)\s*=\s*subprocess\.DEVNULL",
    ),
    _rule(
        "ruby-system",
        CI,
        M,
        r"\b(?:Kernel\.)?(?:system|exec|spawn|IO\.popen|Open3\.(?:capture[23e]?|popen[23]))\s*\(?\s*"
        r"[\"'][^\"'\n]{0,200}#\{|\bKernel\.(?:system|exec|spawn)\b|%x[({\[]",
    ),
    _rule("ruby-network-on-require", SC, M, r"\b(?:Net::HTTP\.(?:get|post|start)|open-uri|URI\.open|TCPSocket\.new)\b"),
    _rule("java-runtime-exec", CI, M, r"\bRuntime\.getRuntime\(\)\.exec\s*\("),
    # --- crypto misuse (code that weakens protection of data leaving) ---
    _rule(
        "tls-verify-disabled",
        CR,
        M,
        r"\bverify\s*=\s*False\b|\brejectUnauthorized\s*:\s*false\b|"
        r"NODE_TLS_REJECT_UNAUTHORIZED\s*=\s*[\"']?0|\bInsecureSkipVerify\s*:\s*true\b|ssl\._create_unverified_context|"
        r"\bCERT_NONE\b|curl\s+(?:-[a-zA-Z]*k\b|--insecure\b)",
    ),
    _rule(
        "weak-cipher",
        CR,
        M,
        r"\b(?:DES|DES3|ARC4|ARC2|Blowfish|RC4)\.new\s*\(|\bMODE_ECB\b|\bmodes\.ECB\s*\(|"
        r"\bECB\s*\(|\balgorithms\.(?:ARC4|TripleDES|Blowfish|IDEA)\s*\(|createCipher\s*\(|openssl\s+enc\s+-des",
    ),
    _rule(
        "weak-hash",
        CR,
        L,
        r"\bhashlib\.(?:md5|sha1)\s*\(|\bhashes\.(?:MD5|SHA1)\s*\(|\bMD5\.new\s*\(|"
        r"createHash\(\s*[\"'](?:md5|sha1)[\"']",
    ),
    _rule(
        "weak-rsa-key",
        CR,
        M,
        r"generate_private_key\([^\n)]{0,80}key_size\s*=\s*(?:512|768|1024)\b|"
        r"RSA\.generate\(\s*(?:512|768|1024)\b|dsa\.generate_private_key\(\s*key_size\s*=\s*(?:512|1024)",
    ),
)


_NC = r"\bn(?:c|cat|etcat)\b"
_CODE_ANCHORS: dict[str, tuple[str, ...]] = {
    "code.pipe-to-shell": (r"(?i)curl|wget|fetch|iwr|irm",),
    "code.shell-eval-download": (r"curl|wget",),
    "code.dev-tcp": (r"/dev/tcp/|/dev/udp/",),
    "code.netcat-exec": (_NC,),
    "code.bash-interactive-redirect": (r"/dev/tcp/|/dev/udp/",),
    # Each alternative's opening call, not the bare word "socket" (in most networking code).
    "code.scripted-reverse-shell": (r"(?i)socket\.socket\(|fsockopen\(|use\s+socket;|tcpsocket\.(?:new|open)\(",),
    "code.sudoers-write": (r"sudoers|NOPASSWD",),
    "code.passwd-write": (r"/etc/passwd|/etc/shadow|usermod",),
    "code.rm-root": (r"\brm\s",),
    "code.disk-wipe": (r"/dev/",),
    "code.fork-bomb": (r":\s*\(\s*\)",),
    "code.persistence": (
        r"authorized_keys|crontab|\.bashrc|\.profile|\.bash_profile|\.zshrc|/etc/cron\.d|"
        r"/etc/rc\.local|/etc/systemd/system|chattr",
    ),
    "code.history-tamper": (r"history|HISTFILE",),
    "code.path-traversal-sensitive": (r"\.\./\.\./\.\./",),
    "code.netcat-send-file": (_NC,),
    "code.read-sensitive": (
        r"/etc/passwd|/etc/shadow|/etc/sudoers|/etc/gshadow|master\.passwd|\.ssh/|"
        r"\.aws/credentials|\.kube/config|\.docker/config|\.git-credentials|\.netrc|\.npmrc|"
        r"\.pypirc|_history|/proc/self/environ|Login Data|Local State|cookies\.sqlite|\.env",
    ),
    "code.install-hook-network": (r"[\"'](?:pre|post)?install[\"']\s*:",),
    "code.pipe-secrets-to-network": (r"\|\s*(?:base64\s*\|\s*)?(?:curl|wget|nc|ncat|netcat|telnet|openssl)\b",),
    "code.js-send-env": (r"process\.env",),
    "code.dns-exfiltration": (r"\$\((?:whoami|hostname|id|cat|base64|env|uname)|`(?:whoami|hostname|id|cat)",),
    "code.python-exec-decoded": (
        r"(?:exec|eval)\s*\(\s*(?:compile\()?\s*(?:base64|zlib|marshal|codecs|bytes|"
        r"__import__|[\"'])",
    ),
    "code.shady-link": (
        r"(?i)grabify|iplogger|workers\.dev|ngrok|pastebin\.com/raw|transfer\.sh|requestbin|"
        r"webhook\.site|interact\.sh|burpcollaborator|oast\.|\.(?:tk|ml|ga|cf|gq)/",
    ),
    "code.discord-webhook-exfil": (r"discord(?:app)?\.com/api/webhooks",),
    "code.js-function-constructor": (
        r"Function\s*\(\s*(?:atob|Buffer|String|unescape)|constructor\s*\(\s*[\"']return",
    ),
    "code.hex-escaped-blob": (r"(?:\\x[0-9a-fA-F]{2}){4}",),
    "code.builtins-indirection": (r"builtins",),
    "code.js-api-obfuscation": (r"Object\.|Reflect\.get|process\s*\[|os\s*\[|child_process",),
    "code.unicode-identifier-exec": (r"\xf0\x9d",),
    "code.js-child-process-exec": (r"child_process|cp\.",),
    "code.ruby-system": (r"Kernel\.|%x[({\[]|#\{|Open3\.|IO\.popen",),
    # The call with its decoder, not the bare word "eval" / "stdout" (common in ordinary code).
    "code.js-eval-decoded": (r"eval\s*\(\s*(?:atob|unescape|decodeURIComponent|Buffer|String|require)",),
    "code.ruby-eval-decoded": (r"eval\s*\(?\s*(?:Base64|\[|Zlib)",),
    "code.silent-process": (r"detached\s*:\s*true|subprocess\.DEVNULL",),
    # Each alternative's first tokens: "pip", "verify", "DES", "chr", "Cookies" and "Chrome"
    # alone are in many windows of ordinary code and prose.
    "code.pip-install-url": (r"pip3?\s+install",),
    "code.tls-verify-disabled": (
        r"verify\s*=\s*False|rejectUnauthorized\s*:\s*false|NODE_TLS_REJECT_UNAUTHORIZED|"
        r"InsecureSkipVerify\s*:\s*true|ssl\._create_unverified_context|CERT_NONE|"
        r"curl\s+(?:-[a-zA-Z]*k|--insecure)",
    ),
    "code.weak-cipher": (
        r"(?:DES|DES3|ARC4|ARC2|Blowfish|RC4)\.new|MODE_ECB|modes\.ECB|ECB\s*\(|"
        r"algorithms\.(?:ARC4|TripleDES|Blowfish|IDEA)|createCipher\s*\(|openssl\s+enc",
    ),
    "code.charcode-chain": (r"(?:String\.fromCharCode|chr)\(\s*\d",),
    # The second alternative holds "Local Storage" or "Login Data" within 130 bytes of its start.
    "code.browser-credential-theft": (r"(?i)Login Data|Local Storage|Cookies[\"']|Web Data[\"']",),
}
_MULTILINE = frozenset({"code.go-exec-download", "code.go-exec-decoded", "code.silent-process"})
REGEX_RULES = tuple(
    replace(
        rule,
        anchors=_CODE_ANCHORS.get(rule.id, rule.anchors),
        max_len=MAX_MATCH if rule.id in _MULTILINE else rule.max_len,
    )
    for rule in REGEX_RULES
)


# --- Python AST layer ------------------------------------------------------------------------


@dataclass(frozen=True)
class _AstHit:
    rule: Rule
    node: ast.AST


def _ast_rule(rule_id: str, category: str, severity: Severity, description: str) -> Rule:
    return Rule(
        id=f"code.py.{rule_id}",
        category=category,
        severity=severity,
        pattern="",
        evidence="snippet",
        redact=False,
        confidence=0.9,
        description=description,
    )


PY_EXEC_DYNAMIC = _ast_rule("exec-dynamic", CI, M, "eval/exec/compile of a non-literal")
PY_EXEC_DECODED = _ast_rule("exec-decoded", OB, C, "eval/exec of a value decoded from base64/zlib/marshal/hex/chr")
PY_DUNDER_IMPORT = _ast_rule("dynamic-import", OB, M, "__import__ of a computed or dangerous module name")
PY_SHELL_TRUE = _ast_rule("subprocess-shell", CI, M, "subprocess call with shell=True on a non-literal command")
PY_OS_SYSTEM = _ast_rule("os-system-dynamic", CI, M, "os.system/os.popen of a non-literal command")
PY_REVERSE_SHELL = _ast_rule("reverse-shell", CI, C, "socket connected and duplicated onto stdin/stdout/stderr")
PY_EXFIL = _ast_rule("exfiltrate-env", EX, H, "environment, credentials or key files sent over the network")
PY_SETUP_HOOK = _ast_rule("install-hook", SC, H, "setup.py cmdclass overriding install that runs commands or network")
PY_SETUID = _ast_rule("setuid-root", PE, H, "os.setuid(0)/setgid(0)")
PY_DESERIALIZE = _ast_rule("unsafe-deserialize", CI, L, "pickle/marshal/yaml.load of data")
PY_DOWNLOAD_EXEC = _ast_rule("download-execute", SC, H, "file downloaded, made executable and run")
PY_DNS_EXFIL = _ast_rule("dns-exfiltration", EX, H, "data smuggled out in a DNS name (f-string host lookup)")

AST_RULES: tuple[Rule, ...] = (
    PY_EXEC_DYNAMIC,
    PY_EXEC_DECODED,
    PY_DUNDER_IMPORT,
    PY_SHELL_TRUE,
    PY_OS_SYSTEM,
    PY_REVERSE_SHELL,
    PY_EXFIL,
    PY_SETUP_HOOK,
    PY_SETUID,
    PY_DESERIALIZE,
    PY_DOWNLOAD_EXEC,
    PY_DNS_EXFIL,
)

_DECODERS = frozenset(
    {
        "b64decode",
        "b32decode",
        "b16decode",
        "b85decode",
        "a85decode",
        "urlsafe_b64decode",
        "decompress",
        "loads",
        "fromhex",
        "unhexlify",
        "decode",
        "standard_b64decode",
    }
)
_SUBPROCESS = frozenset({"call", "run", "Popen", "check_output", "check_call", "getoutput", "getstatusoutput"})
_NETWORK_SEND = frozenset({"post", "put", "urlopen", "Request", "send", "sendall", "sendto", "request", "patch"})


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    if isinstance(node, ast.Call):
        return _dotted(node.func)
    return ""


def _is_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, (ast.List, ast.Tuple)):
        return all(_is_literal(e) for e in node.elts)
    return False


def _contains_decoder(node: ast.AST, tainted: set[str]) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            name = _dotted(sub.func)
            last = name.rsplit(".", 1)[-1]
            if last in _DECODERS and (
                name.split(".")[0]
                in {"base64", "zlib", "marshal", "codecs", "bytes", "binascii", "lzma", "bz2", "gzip"}
                or last != "decode"
            ):
                return True
            if last == "join" and any(
                isinstance(a, (ast.GeneratorExp, ast.ListComp, ast.Call))
                and "chr" in {_dotted(n) for n in ast.walk(a) if isinstance(n, ast.Call)}
                for a in sub.args
            ):
                return True
        if isinstance(sub, ast.Name) and sub.id in tainted:
            return True
    return False


def _mentions(node: ast.AST, names: frozenset[str]) -> bool:
    for sub in ast.walk(node):
        text = _dotted(sub) if isinstance(sub, (ast.Attribute, ast.Name, ast.Call)) else ""
        if text and any(n in text for n in names):
            return True
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and any(n in sub.value for n in names):
            return True
    return False


_SECRET_SOURCES = frozenset(
    {
        "os.environ",
        "environ",
        "getenv",
        ".ssh",
        "id_rsa",
        ".aws",
        "credentials",
        "passwd",
        "Login Data",
        "cookies",
        "keychain",
        "token",
        "creds",
        "env_vars",
        "AWS_",
        "password",
        "secret",
        "cookie",
    }
)
_DNS_LOOKUPS = frozenset(
    {
        "socket.gethostbyname",
        "socket.gethostbyname_ex",
        "socket.getaddrinfo",
        "gethostbyname",
        "dns.resolver.query",
        "dns.resolver.resolve",
        "resolver.query",
        "resolver.resolve",
    }
)
_EXEC_BITS = frozenset({"S_IEXEC", "S_IXUSR", "S_IXGRP", "S_IXOTH", "0o7", "0o5", "493", "511", "777", "755"})


def _python_hits(tree: ast.Module) -> Iterator[_AstHit]:
    tainted: set[str] = set()
    calls: list[ast.Call] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and _contains_decoder(node.value, set()):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    tainted.add(target.id)
        if isinstance(node, ast.Call):
            calls.append(node)
    names = {_dotted(c.func) for c in calls}
    has_socket_connect = any(n.endswith(".connect") for n in names) and any("socket" in n for n in names)
    dup2 = [c for c in calls if _dotted(c.func) in ("os.dup2", "dup2")]
    for call in calls:
        name = _dotted(call.func)
        last = name.rsplit(".", 1)[-1]
        if last in ("eval", "exec", "compile") and name in (
            "eval",
            "exec",
            "compile",
            "builtins.eval",
            "builtins.exec",
        ):
            if call.args and not _is_literal(call.args[0]):
                yield _AstHit(PY_EXEC_DECODED if _contains_decoder(call.args[0], tainted) else PY_EXEC_DYNAMIC, call)
        elif name == "__import__" and call.args:
            arg = call.args[0]
            if not isinstance(arg, ast.Constant) or arg.value in (
                "os",
                "subprocess",
                "socket",
                "base64",
                "pty",
                "ctypes",
            ):
                yield _AstHit(PY_DUNDER_IMPORT, call)
        elif (name.startswith(("subprocess.", "sp.")) or name in _SUBPROCESS or last == "run") and (
            last in _SUBPROCESS
        ):
            shell = any(
                k.arg == "shell" and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords
            )
            if call.args and _contains_decoder(call.args[0], tainted):
                yield _AstHit(PY_EXEC_DECODED, call)  # python -c <base64-decoded code>
            elif shell and call.args and not _is_literal(call.args[0]):
                yield _AstHit(PY_SHELL_TRUE, call)
        elif name in ("os.system", "os.popen", "system", "popen", "os.popen2", "os.popen3") and call.args:
            if _contains_decoder(call.args[0], tainted):
                yield _AstHit(PY_EXEC_DECODED, call)
            elif not _is_literal(call.args[0]):
                yield _AstHit(PY_OS_SYSTEM, call)
        elif name in _DNS_LOOKUPS and call.args and isinstance(call.args[0], (ast.JoinedStr, ast.BinOp)):
            yield _AstHit(PY_DNS_EXFIL, call)
        elif name in ("os.setuid", "os.setgid", "os.seteuid", "setuid") and call.args:
            arg = call.args[0]
            if isinstance(arg, ast.Constant) and arg.value == 0:
                yield _AstHit(PY_SETUID, call)
        elif name in ("pickle.loads", "pickle.load", "marshal.loads", "cPickle.loads", "yaml.load") and not any(
            k.arg == "Loader" for k in call.keywords
        ):
            yield _AstHit(PY_DESERIALIZE, call)
        if (
            last in _NETWORK_SEND
            and _mentions(call, _SECRET_SOURCES)
            and (
                name.startswith(("requests.", "urllib", "http", "httpx.", "session.", "s.", "sock", "conn"))
                or last in ("urlopen", "sendall", "sendto")
            )
        ):
            yield _AstHit(PY_EXFIL, call)
    if has_socket_connect and len(dup2) >= 2:
        yield _AstHit(PY_REVERSE_SHELL, dup2[0])
    if "setup" in names:
        for call in calls:
            if (
                _dotted(call.func) == "setup"
                and any(k.arg == "cmdclass" for k in call.keywords)
                and (
                    any(
                        n.startswith(("urllib", "requests.", "socket.", "subprocess.", "os.system", "http"))
                        for n in names
                    )
                )
            ):
                yield _AstHit(PY_SETUP_HOOK, call)
    fetched = any(
        _dotted(c.func).endswith(("urlretrieve", "urlopen", "requests.get", ".get", ".content")) for c in calls
    ) or _writes_binary(calls)
    made_executable = [
        c
        for c in calls
        if (_dotted(c.func) == "os.chmod" and _mentions(c, _EXEC_BITS))
        or (
            _dotted(c.func) in ("os.system", "subprocess.call", "subprocess.run")
            and _mentions(c, frozenset({"chmod +x", "start "}))
        )
    ]
    if fetched and made_executable:
        yield _AstHit(PY_DOWNLOAD_EXEC, made_executable[0])


def _writes_binary(calls: list[ast.Call]) -> bool:
    """``open(path, "wb")``: a payload being written to disk."""
    for call in calls:
        if _dotted(call.func) == "open" and len(call.args) >= 2:
            mode = call.args[1]
            text = mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else ""
            if "w" in text and "b" in text:
                return True
    return False


def _line_offsets(data: bytes) -> list[int]:
    offsets = [0]
    pos = data.find(b"\n")
    while pos >= 0:
        offsets.append(pos + 1)
        pos = data.find(b"\n", pos + 1)
    return offsets


def _looks_like_python(data: bytes) -> bool:
    if len(data) <= 65536:
        return True  # small artifacts are cheap to try: a one-line snippet has no "import"
    head = data[:65536]
    return any(marker in head for marker in (b"import ", b"def ", b"print(", b"exec(", b"eval(", b"setup(", b"class "))


def python_findings(data: bytes) -> list[Finding]:
    """AST findings for ``data`` if it parses as Python (and is at most ``MAX_AST_BYTES``)."""
    if len(data) > MAX_AST_BYTES or not _looks_like_python(data):
        return []
    try:
        tree = ast.parse(data)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    offsets = _line_offsets(data)
    out: list[Finding] = []
    for hit in _python_hits(tree):
        lineno = getattr(hit.node, "lineno", 1)
        end_lineno = getattr(hit.node, "end_lineno", lineno) or lineno
        # ast columns are UTF-8 byte offsets, which is exactly what findings use.
        start = offsets[lineno - 1] + getattr(hit.node, "col_offset", 0)
        end = offsets[end_lineno - 1] + (getattr(hit.node, "end_col_offset", 0) or 0)
        end = max(end, start + 1)
        f = make_finding("code", hit.rule, data, start, end, hit.rule.confidence)
        out.append(Finding(**{**f.__dict__, "evidence": snippet(data[start:end])}))
    return out


class CodeScanner:
    """Finds hostile or dangerous code; tokenised (word boundaries, ``shlex``, ``ast``)."""

    name = "code"

    pattern_rules: tuple[Rule, ...] = REGEX_RULES

    def __init__(self, *, python_ast: bool = True) -> None:
        self._python_ast = python_ast

    @functools.cached_property
    def _bank(self) -> PatternBank:
        # Built on first use: the gate matches the scanners' rules with one combined
        # bank and never needs this one (only a scanner used on its own does).
        return PatternBank(REGEX_RULES)

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The RE2 rules and the Python AST rules."""
        return (*REGEX_RULES, *AST_RULES)

    def direct(self, data: bytes) -> list[Finding]:
        """The Python AST findings: they need the artifact only, not the rule matches."""
        return python_findings(data) if self._python_ast else []

    def post(self, data: bytes, raw: list[Finding], direct: list[Finding] | None = None) -> list[Finding]:
        """Add the AST findings (:meth:`direct`, computed here when not given) and drop the
        regex findings the AST explains better."""
        found = [*raw, *(self.direct(data) if direct is None else direct)]
        return _drop_regex_shadowed(dedupe(found))

    def scan(self, data: bytes, source: str = "") -> list[Finding]:
        """Findings in ``data`` (bytes), sorted by position, with line numbers."""
        return finalize(data, self.post(data, self._bank.scan(data, self.name)), source)


def _drop_regex_shadowed(findings: list[Finding]) -> list[Finding]:
    """When the AST confirmed an exec-of-decoded value, the regex rule for the same span is redundant."""
    ast_spans = [(f.start, f.end) for f in findings if f.rule.startswith("code.py.")]
    if not ast_spans:
        return findings
    return [
        f for f in findings if f.rule != "code.python-exec-decoded" or not any(s <= f.start < e for s, e in ast_spans)
    ]


__all__ = ["AST_RULES", "MAX_AST_BYTES", "REGEX_RULES", "CodeScanner", "python_findings"]
