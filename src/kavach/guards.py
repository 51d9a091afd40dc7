"""Runtime guards: pre-exec command analysis, fork-bomb detection and integrity monitoring.

**Command analysis** (:func:`check_command`) looks at what would really run, not at the first
word. It parses the command (``shlex``, plus a small quote-aware pre-pass for what ``shlex``
does not know: comments, newlines, ``$(...)``, backticks, process substitution and ``$'...'``
strings) and follows it through

- wrappers that run another program: ``env`` (including ``-S``), ``nice``, ``nohup``,
  ``timeout``, ``stdbuf``, ``ionice``, ``setsid``, ``taskset``, ``chrt``, ``time``, ``command``,
  ``exec``, ``sudo``, ``doas``, ``xargs``, ``strace``, ``chroot``, ``unshare``, ``setpriv``,
  ``flock``, ``watch``, ``su -c``, ``script -c``, ``find -exec`` and ``busybox APPLET``;
- shells (``sh``/``bash``/``dash``/``zsh``/... ``-c STRING``, recursively), ``eval`` and
  command substitutions;
- absolute paths (``/usr/bin/bash`` is ``bash``) and versioned names (``python3.11`` is also
  ``python3`` and ``python``; ``gcc-12`` is also ``gcc``).

Every program on that path is checked against ``GuardPolicy.blocked_commands`` and, when set,
``allowed_commands`` (wrappers and shells must be allowed too: they run). Every word is checked
for ``sensitive_paths`` (normalised: ``//etc/./shadow``, ``/etc/sha*``, ``/proc/self/root/etc/shadow``).
With ``block_shell_tricks``, constructs that hide what runs are refused: ``$IFS`` splitting,
``/dev/tcp`` sockets, a command name that comes from an expansion, ``eval`` of expanded text,
interpreter code or ``source`` from a command substitution, and piping into a bare shell or
interpreter (``curl ... | sh``). Ordinary pipelines, redirections and ``$VAR`` arguments pass.

This is a tripwire in front of the real controls (namespaces, Landlock, seccomp), not a
replacement for them: a renamed copy of a blocked binary, a script file's contents or a path
assembled at run time cannot be seen before the command runs.

**Fork bombs** (:class:`ForkBombWatch`) are caught by polling the sandbox's live process count.

**Integrity** (:func:`check_integrity`) runs a probe inside the sandbox and compares what it
sees with the host: namespaces, mounts, seccomp, no_new_privs and capabilities.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import hashlib
import logging
import os
import posixpath
import re
import shlex
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kavach.backends.base import ExecRequest, Instance
from kavach.backends.names import Backend
from kavach.errors import ExecError, GuardViolation, PolicyError
from kavach.policy import GuardPolicy
from kavach.scanning.findings import Finding, Severity
from kavach.scoring import Control, Enforcement

logger = logging.getLogger(__name__)

MAX_DEPTH = 12  # nested shells / wrappers / substitutions before we stop trusting the analysis

SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "yash", "posh", "rbash", "fish", "csh", "tcsh"})
# Interpreters and the options that take inline code; awk takes its program as the first operand.
INTERPRETER_CODE_FLAGS: Mapping[str, frozenset[str]] = {
    "python": frozenset({"-c"}),
    "perl": frozenset({"-e", "-E"}),
    "ruby": frozenset({"-e"}),
    "node": frozenset({"-e", "--eval", "-p", "--print"}),
    "nodejs": frozenset({"-e", "--eval", "-p", "--print"}),
    "php": frozenset({"-r"}),
    "lua": frozenset({"-e"}),
    "tclsh": frozenset(),
}
AWKS = frozenset({"awk", "gawk", "mawk", "nawk"})

REDIRECTIONS = frozenset({">", ">>", "<", "<<", "<<<", ">&", "<&", "&>", "&>>", ">|", "<>", "<<-"})
# "{" and "}" as whole tokens are group delimiters; treating them as separators puts the
# command after "{" (function bodies, coproc groups) at a command position.
SEPARATORS = frozenset({";", "&", "&&", "||", "|", "|&", ";;", ";&", ";;&", "(", ")", "{", "}", "\n"})
PIPES = frozenset({"|", "|&"})
# Reserved words after which a command starts (skipped), and those that start no command.
LEADING_KEYWORDS = frozenset(
    {"!", "then", "do", "else", "elif", "if", "while", "until", "fi", "done", "esac", "coproc"}
)
NON_COMMANDS = frozenset({"for", "select", "case", "[[", "function"})

_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\[[^\]]*\])?\+?=")
_VERSIONED = re.compile(r"(?P<stem>[A-Za-z][A-Za-z_+]*?)(?P<sep>-?)(?P<version>\d+(?:\.\d+)*)")
_PATH_IN_WORD = re.compile(r"/[^\s'\"();|&<>=,:`]*")
_IFS = re.compile(r"\$\{?IFS\b")
_DEV_NET = re.compile(r"/dev/(tcp|udp)/")
_PLACEHOLDER = "__kavach_subst_"
_GLOB_CHARS = frozenset("*?[")
# Sensitive paths that are files on every Linux host (kernel nodes, sockets, account files):
# nothing lies below them, so a glob that reaches deeper (``/proc/*/environ``) cannot touch
# them. Any other sensitive path may be a directory, and a deeper glob that could expand to a
# path below it is refused.
_KNOWN_FILES = frozenset(
    {
        "/etc/shadow",
        "/etc/gshadow",
        "/etc/sudoers",
        "/proc/kcore",
        "/proc/sysrq-trigger",
        "/dev/mem",
        "/var/run/docker.sock",
        "/run/docker.sock",
    }
)
_OCTAL = re.compile(r"[0-7]{1,3}")
_HEX_DIGITS = {width: re.compile(rf"[0-9a-fA-F]{{1,{width}}}") for width in (2, 4, 8)}


def _is_brace_list(word: str) -> bool:
    """``{a,b}``: a brace expansion bash turns into separate words (checked without a regex)."""
    inner = word[1:-1]
    return len(word) > 2 and word[0] == "{" and word[-1] == "}" and "," in inner and not {"{", "}"} & set(inner)


# -- wrappers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Wrapper:
    """How to find the command a wrapper runs: its options that take a value, then operands."""

    with_arg: frozenset[str] = frozenset()
    operands: int = 0  # operands before the command (timeout DURATION, chroot DIR ...)
    shell_flag: str | None = None  # an option whose value is a shell command (su -c, flock -c)
    default: tuple[str, ...] = ()  # what runs when no command is given (chroot runs a shell)


def _w(with_arg: str = "", operands: int = 0, shell_flag: str | None = None, default: str = "") -> _Wrapper:
    return _Wrapper(frozenset(with_arg.split()), operands, shell_flag, tuple(default.split()))


WRAPPERS: Mapping[str, _Wrapper] = {
    "nice": _w("-n --adjustment"),
    "nohup": _w(),
    "timeout": _w("-s --signal -k --kill-after", operands=1),
    "stdbuf": _w("-i -o -e --input --output --error"),
    "ionice": _w("-c --class -n --classdata -p --pid -P --pgid -u --uid"),
    "setsid": _w(),
    "taskset": _w(operands=1),
    "chrt": _w(operands=1),
    "time": _w("-o --output -f --format"),
    "command": _w(),
    "builtin": _w(),
    "exec": _w("-a"),
    "sudo": _w(
        "-u --user -g --group -C --close-from -D --chdir -h --host -p --prompt -r --role -t --type "
        "-U --other-user -T --command-timeout"
    ),
    "doas": _w("-u -C"),
    "pkexec": _w("--user"),
    "xargs": _w(
        "-a --arg-file -d --delimiter -E -I -L -n --max-args -P --max-procs -s --max-chars --process-slot-var",
        default="echo",
    ),
    "strace": _w("-e -o -p -s -u -E -a -b -I -O -P -S -X"),
    "ltrace": _w("-e -o -p -s -u -a -n -A -D -F -l -w -x"),
    "chroot": _w("--userspec --groups", operands=1, default="sh"),
    "unshare": _w("-S --setuid -G --setgid -R --root -w --wd --map-user --map-group --map-users --map-groups"),
    "nsenter": _w("-t --target -S --setuid -G --setgid"),
    "setpriv": _w(
        "--reuid --regid --ruid --euid --rgid --egid --groups --inh-caps --ambient-caps --bounding-set "
        "--securebits --pdeathsig --selinux-label --apparmor-profile --landlock-access --landlock-rule"
    ),
    "flock": _w("-w --timeout -E --conflict-exit-code", operands=1, shell_flag="-c"),
    "su": _w("-s --shell -g --group -G --supp-group -w --whitelist-environment", shell_flag="-c"),
    "runuser": _w("-u --user -s --shell -g --group -G --supp-group -w", shell_flag="-c"),
    "script": _w("-E --echo -I --log-in -O --log-out -B --log-io -T --log-timing -m --logging-format", shell_flag="-c"),
    "faketime": _w("-m -p -f", operands=1),
    "unbuffer": _w(),
    "catchsegv": _w(),
    "firejail": _w(),
}


def program_names(program: str) -> frozenset[str]:
    """The names a program answers to: its basename and, for versioned names, the shorter ones.

    ``/usr/bin/python3.11`` -> ``{python3.11, python3, python}``; ``gcc-12`` -> ``{gcc-12, gcc}``.
    """
    base = posixpath.basename(program.rstrip("/")) or program
    names = {base}
    match = _VERSIONED.fullmatch(base)
    if match:
        stem, sep, version = match["stem"], match["sep"], match["version"]
        names.add(stem)
        parts = version.split(".")
        for i in range(1, len(parts)):
            names.add(stem + sep + ".".join(parts[:i]))
    return frozenset(names)


def _canonical(program: str) -> str:
    """The unversioned basename used to recognise wrappers, shells and interpreters."""
    names = program_names(program)
    match = _VERSIONED.fullmatch(posixpath.basename(program.rstrip("/")) or program)
    return match["stem"] if match else next(iter(names))


def _skip_options(words: Sequence[str], start: int, with_arg: frozenset[str]) -> int:
    """Index of the first operand at or after ``start`` (GNU-style options, ``--`` ends them)."""
    i = start
    while i < len(words):
        word = words[i]
        if word == "--":
            return i + 1
        if word.startswith("--"):
            name = word.split("=", 1)[0]
            i += 2 if ("=" not in word and name in with_arg) else 1
            continue
        if word.startswith("-") and len(word) > 1:
            i += 1
            for j in range(1, len(word)):
                if f"-{word[j]}" in with_arg:
                    if j == len(word) - 1:
                        i += 1  # the value is the next word
                    break
            continue
        return i
    return i


def _short_option_value(
    words: Sequence[str], start: int, end: int, flag: str, with_arg: frozenset[str] = frozenset()
) -> str | None:
    """The value of short option ``flag`` in ``words[start:end]``: ``-c CMD``, ``-cCMD``, ``-qc CMD``.

    Letters of a cluster are read left to right; another option in ``with_arg`` takes the rest
    of the word as its value, so ``-Ecmd`` is ``-E cmd``, not ``-c``.
    """
    letter = flag[1]
    for i in range(start, min(end, len(words))):
        word = words[i]
        if not word.startswith("-") or word.startswith("--") or len(word) < 2:
            continue
        for j in range(1, len(word)):
            if word[j] == letter:
                value = word[j + 1 :]
                if value:
                    return value
                return words[i + 1] if i + 1 < len(words) else ""
            if f"-{word[j]}" in with_arg:
                break
    return None


_ENV_LONG_WITH_ARG = frozenset({"--unset", "--chdir"})


def _unwrap_env(words: Sequence[str]) -> list[str]:
    """The command ``env`` runs, after its options, ``-S`` strings and NAME=VALUE assignments."""
    rest = list(words[1:])
    i = 0
    while i < len(rest):
        word = rest[i]
        if word == "--":
            i += 1
            break
        if word.startswith("--split-string"):
            _, sep, value = word.partition("=")
            split, tail = (value, rest[i + 1 :]) if sep else (rest[i + 1] if i + 1 < len(rest) else "", rest[i + 2 :])
            # env -S splits the string into separate arguments and carries on parsing them.
            rest, i = _split_words(split) + tail, 0
            continue
        if word.startswith("--"):
            i += 2 if ("=" not in word and word in _ENV_LONG_WITH_ARG) else 1
            continue
        if not word.startswith("-") or len(word) == 1:
            break
        # A short-option cluster, read left to right: -u NAME and -C DIR take a value,
        # -S STRING takes the rest of the word (or the next word) as arguments to split.
        step = 1
        for j in range(1, len(word)):
            letter = word[j]
            if letter not in "uCS":
                continue
            attached = word[j + 1 :]
            value = attached if attached else (rest[i + 1] if i + 1 < len(rest) else "")
            step = 1 if attached else 2
            if letter == "S":
                rest, i, step = _split_words(value) + rest[i + step :], 0, 0
            break
        i += step
    while i < len(rest) and "=" in rest[i] and not rest[i].startswith("="):
        i += 1  # NAME=VALUE assignments before the command
    return rest[i:]


def _split_words(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=False, posix=True)
    except ValueError as exc:
        raise GuardViolation("unparseable", f"cannot parse {text!r}: {exc}") from None


# -- the shell pre-pass -------------------------------------------------------------------------

_ANSI_C_ESCAPES = {"a": "\a", "b": "\b", "e": "\x1b", "E": "\x1b", "f": "\f", "n": "\n", "r": "\r",
                   "t": "\t", "v": "\v", "\\": "\\", "'": "'", '"': '"', "?": "?"}  # fmt: skip


def _decode_ansi_c(text: str, start: int) -> tuple[str, int]:
    """Decode a ``$'...'`` string starting at ``start`` (the ``$``); returns (value, end index)."""
    out: list[str] = []
    i = start + 2
    while i < len(text):
        c = text[i]
        if c == "'":
            return "".join(out), i + 1
        if c != "\\" or i + 1 >= len(text):
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt in _ANSI_C_ESCAPES:
            out.append(_ANSI_C_ESCAPES[nxt])
            i += 2
        elif nxt in "01234567":
            digits = _OCTAL.match(text, i + 1)
            assert digits is not None
            out.append(chr(int(digits.group(), 8) & 0xFF))
            i += 1 + len(digits.group())
        elif nxt in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[nxt]
            digits = _HEX_DIGITS[width].match(text, i + 2)
            if digits is None:
                out.append("\\" + nxt)
                i += 2
            else:
                out.append(chr(min(int(digits.group(), 16), 0x10FFFF)))
                i += 2 + len(digits.group())
        elif nxt == "c" and i + 2 < len(text):
            out.append(chr(ord(text[i + 2]) & 0x1F))
            i += 3
        else:
            out.append("\\" + nxt)
            i += 2
    raise GuardViolation("unparseable", "unterminated $'...' string")


def _matching_paren(text: str, start: int) -> int:
    """Index of the ``)`` closing the ``(`` at ``start``, quote-aware."""
    depth = 0
    i = start
    quote: str | None = None
    while i < len(text):
        c = text[i]
        if quote == "'":
            if c == "'":
                quote = None
        elif c == "\\":
            i += 1
        elif quote == '"':
            if c == '"':
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise GuardViolation("unparseable", "unterminated command substitution")


def _backtick_end(text: str, start: int) -> int:
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == "`":
            return i
        i += 1
    raise GuardViolation("unparseable", "unterminated backtick substitution")


@dataclass
class _Prepass:
    text: str
    substitutions: list[str]


def _prepass(script: str, depth: int = 0) -> _Prepass:
    """Rewrite ``script`` into something ``shlex`` tokenises like a shell would.

    Command substitutions become placeholder words (their text is returned for separate
    analysis), comments are dropped, unquoted newlines become ``;``, line continuations are
    joined and ``$'...'`` strings are decoded into ordinary quoted words.
    """
    out: list[str] = []
    subs: list[str] = []
    quote: str | None = None
    word_start = True
    i = 0
    n = len(script)

    def placeholder(inner: str) -> str:
        subs.append(inner)
        return f"{_PLACEHOLDER}{len(subs) - 1}__"

    while i < n:
        c = script[i]
        if quote == "'":
            out.append(c)
            quote = None if c == "'" else quote
            i += 1
            continue
        if c == "\\":
            if script.startswith("\\\n", i):
                i += 2
                continue
            out.append(script[i : i + 2])
            i += 2
            word_start = False
            continue
        if quote is None and script.startswith("$'", i):
            value, i = _decode_ansi_c(script, i)
            out.append(shlex.quote(value))
            word_start = False
            continue
        if script.startswith("$((", i):
            end = _matching_paren(script, i + 1)
            if script[end - 1] == ")":
                # Arithmetic is not a command, but a substitution inside it is.
                if depth >= MAX_DEPTH:
                    raise GuardViolation("unparseable", f"arithmetic nests deeper than {MAX_DEPTH} levels")
                subs.extend(_prepass(script[i + 3 : end - 1], depth + 1).substitutions)
                out.append("0")
                i = end + 1
                word_start = False
                continue
            # "$((cmd) )": bash reads a command substitution of a subshell; fall through.
        if script.startswith("$(", i) or (quote is None and script[i : i + 2] in ("<(", ">(")):
            end = _matching_paren(script, i + 1)
            out.append(placeholder(script[i + 2 : end]))
            i = end + 1
            word_start = False
            continue
        if c == "`":
            end = _backtick_end(script, i)
            out.append(placeholder(script[i + 1 : end].replace("\\`", "`")))
            i = end + 1
            word_start = False
            continue
        if c == '"':
            quote = None if quote == '"' else '"'
        elif c == "'" and quote is None:
            quote = "'"
        elif quote is None and c == "#" and word_start:
            while i < n and script[i] != "\n":
                i += 1
            continue
        elif quote is None and c == "\n":
            out.append(" ; ")
            word_start = True
            i += 1
            continue
        out.append(c)
        word_start = quote is None and c in " \t;&|()<>"
        i += 1
    return _Prepass("".join(out), subs)


def _tokens(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""  # comments were handled by the pre-pass, which knows word starts
    try:
        return list(lexer)
    except ValueError as exc:
        raise GuardViolation("unparseable", f"cannot parse the command: {exc}") from None


# -- the analysis -------------------------------------------------------------------------------


class _Analyzer:
    def __init__(self, policy: GuardPolicy) -> None:
        self.policy = policy
        self.blocked = frozenset(posixpath.basename(c.rstrip("/")) or c for c in policy.blocked_commands)
        self.allowed = (
            None
            if policy.allowed_commands is None
            else frozenset(posixpath.basename(c.rstrip("/")) or c for c in policy.allowed_commands)
        )
        self.sensitive = tuple(_normalise_path(p) for p in policy.sensitive_paths)
        self.tricks = policy.block_shell_tricks
        # Digests of commands this analyzer let through. The analysis is a pure function of the
        # policy and the command (no filesystem, no environment), so an allowed command stays
        # allowed; refused ones are analysed every time (their violation carries the detail).
        self.passed: set[bytes] = set()
        self._blocked_word = (
            re.compile(
                # "/" in the lookbehind: a match starts only at the start of a path-like run,
                # which keeps the search linear on adversarial input such as "a/a/a/...".
                r"(?<![\w./-])(?:[\w./-]*/)?(?:"
                + "|".join(re.escape(b) for b in sorted(self.blocked))
                + r")(?:-?\d+(?:\.\d+)*)?(?![\w.-])"
            )
            if self.blocked
            else None
        )

    # -- checks ----------------------------------------------------------------------------

    def check_program(self, program: str) -> None:
        names = program_names(program)
        hit = names & self.blocked
        if hit:
            raise GuardViolation("blocked_command", f"{program!r} is blocked by the policy ({sorted(hit)[0]})")
        if self.allowed is not None and not names & self.allowed:
            raise GuardViolation("not_allowed", f"{program!r} is not in the policy's allowed commands")

    def check_words(self, words: Iterable[str]) -> None:
        for word in words:
            path = self.sensitive_hit(word)
            if path is not None:
                raise GuardViolation("sensitive_path", f"{word!r} touches the sensitive path {path}")
            if self.tricks and _DEV_NET.search(word):
                raise GuardViolation("shell_trick", f"{word!r} opens a network socket through /dev/tcp or /dev/udp")

    def sensitive_hit(self, word: str) -> str | None:
        for raw in _PATH_IN_WORD.findall(word):
            candidate = _normalise_path(raw)
            for sensitive in self.sensitive:
                if _path_covers(candidate, sensitive):
                    return sensitive
        return None

    def check_code(self, program: str, code: str) -> None:
        """Inline interpreter code: sensitive paths (already checked) and blocked program names."""
        if self.tricks and _PLACEHOLDER in code:
            raise GuardViolation("shell_trick", f"{program} runs code produced by a command substitution")
        if self._blocked_word is not None:
            match = self._blocked_word.search(code)
            if match:
                raise GuardViolation(
                    "blocked_command", f"{program} code mentions the blocked program {match.group()!r}"
                )

    # -- argv ------------------------------------------------------------------------------

    def argv(self, words: Sequence[str], depth: int, *, in_shell: bool = False) -> None:
        if depth > MAX_DEPTH:
            raise GuardViolation("unparseable", f"command nests deeper than {MAX_DEPTH} levels")
        words = list(words)
        if not words:
            return
        self.check_words(words)
        program = words[0]
        if in_shell and self.tricks and ("$" in program or _PLACEHOLDER in program):
            raise GuardViolation("shell_trick", f"the command name {program!r} comes from an expansion")
        self.check_program(program)
        base = _canonical(program)
        if base == "env":
            self.argv(_unwrap_env(words), depth + 1, in_shell=in_shell)
        elif base == "busybox":
            start = _skip_options(words, 1, frozenset())
            self.argv(words[start:], depth + 1, in_shell=in_shell)
        elif base in WRAPPERS:
            self.wrapper(base, words, depth, in_shell)
        elif base in SHELLS:
            self.shell(words, depth)
        elif base in ("eval",):
            self.eval(words, depth)
        elif base in ("source", "."):
            if self.tricks and any(_PLACEHOLDER in w or "$" in w for w in words[1:2]):
                raise GuardViolation("shell_trick", f"{program} reads a file named by an expansion")
        elif base == "find":
            self.find(words, depth, in_shell)
        elif base in AWKS:
            self.awk(words)
        elif base in INTERPRETER_CODE_FLAGS:
            flags = INTERPRETER_CODE_FLAGS[base]
            for i, word in enumerate(words[1:], start=1):
                if word in flags and i + 1 < len(words):
                    self.check_code(program, words[i + 1])

    def wrapper(self, base: str, words: list[str], depth: int, in_shell: bool) -> None:
        spec = WRAPPERS[base]
        start = _skip_options(words, 1, spec.with_arg | ({spec.shell_flag} if spec.shell_flag else set()))
        rest = words[start + spec.operands :]
        if spec.shell_flag is not None:
            if base in ("su", "runuser"):
                # su USER -c CMD: options may follow the user name; without -c it starts the
                # user's login shell, a program we cannot name here.
                command = _short_option_value(words, 1, len(words), spec.shell_flag, spec.with_arg)
            elif rest and rest[0] == spec.shell_flag:  # flock FILE -c CMD
                command = rest[1] if len(rest) > 1 else ""
            else:
                command = _short_option_value(words, 1, start, spec.shell_flag, spec.with_arg)
            if command is not None:
                self.script(command, depth + 1)
                return
            if base in ("su", "runuser"):
                return
        self.argv(rest or list(spec.default), depth + 1, in_shell=in_shell)

    def shell(self, words: list[str], depth: int) -> None:
        command_mode = False
        i = 1
        while i < len(words):
            word = words[i]
            if word in ("--", "-"):
                i += 1
                break
            if word in ("--rcfile", "--init-file", "-o", "+o", "-O", "+O"):
                i += 2
                continue
            if word.startswith("--"):
                i += 1
                continue
            if word[:1] in ("-", "+") and len(word) > 1:
                command_mode = command_mode or "c" in word[1:]
                i += 1
                continue
            break
        if command_mode and i < len(words):
            self.script(words[i], depth + 1)
        # Otherwise a script file (not inspectable here) or commands from stdin.

    def eval(self, words: list[str], depth: int) -> None:
        text = " ".join(words[1:])
        if self.tricks and ("$" in text or _PLACEHOLDER in text):
            raise GuardViolation("shell_trick", "eval of text built from an expansion")
        self.script(text, depth + 1)

    def find(self, words: list[str], depth: int, in_shell: bool) -> None:
        i = 1
        while i < len(words):
            if words[i] in ("-exec", "-execdir", "-ok", "-okdir"):
                end = i + 1
                while end < len(words) and words[end] not in (";", "+"):
                    end += 1
                self.argv(words[i + 1 : end], depth + 1, in_shell=in_shell)
                i = end
            i += 1

    def awk(self, words: list[str]) -> None:
        start = _skip_options(words, 1, frozenset({"-F", "-v", "-f", "--field-separator", "--assign", "--file"}))
        if "-f" not in words and "--file" not in words and start < len(words):
            self.check_code(words[0], words[start])

    # -- shell scripts ---------------------------------------------------------------------

    def script(self, text: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise GuardViolation("unparseable", f"command nests deeper than {MAX_DEPTH} levels")
        if self.tricks and _IFS.search(text):
            raise GuardViolation("shell_trick", "uses $IFS to split words (a filter-evasion trick)")
        pre = _prepass(text)
        for inner in pre.substitutions:
            self.script(inner, depth + 1)
        tokens = _tokens(pre.text)
        pipeline: list[list[str]] = []
        command: list[str] = []
        for token in [*tokens, ";"]:
            if token in SEPARATORS:
                if command:
                    pipeline.append(command)
                    command = []
                if token not in PIPES:
                    self.pipeline(pipeline, depth)
                    pipeline = []
                continue
            command.append(token)

    def pipeline(self, commands: list[list[str]], depth: int) -> None:
        for position, words in enumerate(commands):
            argv = self.simple_command(words)
            if argv is None:
                continue
            self.argv(argv, depth + 1, in_shell=True)
            if position > 0 and self.tricks and _reads_program_from_stdin(argv):
                raise GuardViolation(
                    "shell_trick", f"pipes data into {argv[0]!r}, which runs it as code that cannot be inspected"
                )

    def simple_command(self, words: list[str]) -> list[str] | None:
        """The argv of one simple command: keywords, assignments and redirections removed."""
        argv: list[str] = []
        i = 0
        while i < len(words) and not argv and words[i] in LEADING_KEYWORDS:
            i += 1
        if i < len(words) and words[i] in NON_COMMANDS:
            self.check_words(words[i:])
            return None
        while i < len(words):
            word = words[i]
            if word in REDIRECTIONS or word in ("<(", ">("):
                if i + 1 < len(words):
                    self.check_words([words[i + 1]])
                i += 2
                continue
            if not argv and _ASSIGNMENT.match(word):
                self.check_words([word])
                i += 1
                continue
            argv.append(word)
            i += 1
        if argv and _is_brace_list(argv[0]):
            # Brace expansion at the command position: {cat,/etc/shadow} runs cat /etc/shadow.
            argv = argv[0][1:-1].split(",") + argv[1:]
        return argv or None


def _reads_program_from_stdin(argv: Sequence[str]) -> bool:
    """True for a shell or interpreter that would execute whatever arrives on stdin."""
    words = list(argv)
    for _ in range(MAX_DEPTH):
        if not words:
            return False
        base = _canonical(words[0])
        if base == "env":
            words = _unwrap_env(words)
        elif base == "busybox":
            words = words[1:]
        elif base in WRAPPERS and base not in ("xargs", "su", "runuser", "script", "flock"):
            spec = WRAPPERS[base]
            words = words[_skip_options(words, 1, spec.with_arg) + spec.operands :]
        else:
            break
    if not words:
        return False
    base = _canonical(words[0])
    operands = [w for w in words[1:] if not w.startswith("-") or w == "-"]
    if base in SHELLS:
        has_command = any(w.startswith("-") and not w.startswith("--") and "c" in w[1:] for w in words[1:])
        return not has_command and (not operands or operands[0] == "-" or "-s" in words[1:])
    if base in INTERPRETER_CODE_FLAGS:
        has_code = any(w in INTERPRETER_CODE_FLAGS[base] for w in words[1:])
        return not has_code and (not operands or operands[0] == "-")
    return False


def _normalise_path(path: str) -> str:
    """Lexically normalised absolute path; ``/proc/<pid>/root`` prefixes removed."""
    norm = posixpath.normpath("/" + path.lstrip("/")) if path.startswith("/") else posixpath.normpath(path)
    return re.sub(r"^/proc/(?:self|thread-self|\d+|\*)/root(?=/|$)", "", norm) or "/"


def _path_covers(candidate: str, sensitive: str) -> bool:
    """True if ``candidate`` is ``sensitive``, lies below it, or is a glob that matches either."""
    if candidate == sensitive or candidate.startswith(sensitive.rstrip("/") + "/"):
        return True
    if not _GLOB_CHARS & set(candidate):
        return False
    cand_parts = candidate.strip("/").split("/")
    sens_parts = sensitive.strip("/").split("/")
    if len(cand_parts) > len(sens_parts) and sensitive in _KNOWN_FILES and "**" not in candidate:
        # It could only expand to paths below a file, and there are none. ("**" may match
        # no directory at all: bash's globstar, Python's recursive glob.)
        return False
    if len(cand_parts) < len(sens_parts) and not cand_parts[-1].endswith("*"):
        return False
    pairs = zip(cand_parts, sens_parts, strict=False)
    if len(cand_parts) < len(sens_parts):
        # A trailing "*" component can cover the rest (fnmatch's * matches "/").
        head = "/".join(sens_parts[len(cand_parts) - 1 :])
        pairs = zip([*cand_parts[:-1], cand_parts[-1]], [*sens_parts[: len(cand_parts) - 1], head], strict=True)
    return all(fnmatch.fnmatchcase(s, c) for c, s in pairs)


_PASSED_COMMANDS = 1024  # allowed-command digests remembered per policy (then forgotten at once)


@functools.lru_cache(maxsize=64)
def _analyzer_for(policy: GuardPolicy) -> _Analyzer:
    # Analyzers hold only what they derive from the (frozen) policy, so one per policy suffices.
    return _Analyzer(policy)


def check_command(argv: Sequence[str], policy: GuardPolicy, *, shell: str | None = None) -> None:
    """Refuse a command the guard policy forbids; raises :class:`GuardViolation` (rule, detail).

    ``shell`` is the original command string when the caller gave one (the sandbox runs it with
    ``sh -c``); it is what gets analysed then, and ``argv`` (the shell invocation the sandbox
    built around it) is not. Rules: ``blocked_command``, ``not_allowed``, ``sensitive_path``,
    ``shell_trick`` and ``unparseable`` (the guard could not follow the command: fail closed).
    """
    try:
        analyzer = _analyzer_for(policy)
    except TypeError:  # a policy built with lists is not hashable: analyse without the cache
        analyzer = _Analyzer(policy)
    # Unambiguous: a script and an argv never encode alike, nor do two different argvs.
    key = hashlib.blake2b(repr((shell, tuple(argv) if shell is None else None)).encode(), digest_size=16).digest()
    if key in analyzer.passed:
        return
    if shell is not None:
        analyzer.script(shell, 0)
    else:
        analyzer.argv(argv, 0)
    if len(analyzer.passed) >= _PASSED_COMMANDS:
        analyzer.passed.clear()
    analyzer.passed.add(key)


# What a refused command says about intent, for threat assessment (kavach.threat maps the
# category to a kill-chain stage: sensitive_path is reconnaissance, the rest exploitation).
_VIOLATION_SEVERITY: Mapping[str, Severity] = {
    "sensitive_path": Severity.HIGH,
    "shell_trick": Severity.HIGH,
    "blocked_command": Severity.MEDIUM,
    "unparseable": Severity.MEDIUM,
    "not_allowed": Severity.LOW,
    "fork_bomb": Severity.HIGH,
}
VIOLATION_CONFIDENCE = 0.9  # the rule fired for certain; the intent behind it is an inference


def violation_finding(violation: GuardViolation) -> Finding:
    """A :class:`Finding` for a guard violation, so refused commands count in threat assessment."""
    detail = violation.detail if len(violation.detail) <= 200 else violation.detail[:197] + "..."
    return Finding(
        scanner="guards",
        rule=violation.rule,
        category=violation.rule,
        severity=_VIOLATION_SEVERITY.get(violation.rule, Severity.MEDIUM),
        start=0,
        end=0,
        line=0,
        evidence=detail,
        confidence=VIOLATION_CONFIDENCE,
        source="command",
        redact=False,
    )


# -- fork bombs ---------------------------------------------------------------------------------


class ForkBombWatch:
    """Polls the sandbox's live process count and calls ``on_trip(count)`` once at ``threshold``.

    ``live_pids`` returning None means the backend cannot tell right now; polling continues.
    An exception from ``live_pids`` or ``on_trip`` ends the watch and is raised by :meth:`stop`.
    Call :meth:`stop` before destroying the instance whose pids it counts.
    """

    def __init__(
        self,
        live_pids: Callable[[], int | None],
        threshold: int,
        on_trip: Callable[[int], Awaitable[None]],
        interval: float = 0.05,
    ) -> None:
        if threshold < 2:
            raise PolicyError("guards.fork_bomb_threshold", threshold, "must be at least 2")
        if interval <= 0:
            raise PolicyError("fork_bomb_interval", interval, "must be positive")
        self.live_pids = live_pids
        self.threshold = threshold
        self.on_trip = on_trip
        self.interval = interval
        self.tripped: int | None = None  # the count that tripped the watch
        self.peak = 0  # the highest count seen
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """True while the watch is polling."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start polling (needs a running event loop). Starting twice is an error."""
        if self._task is not None:
            raise RuntimeError("ForkBombWatch already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kavach-fork-bomb-watch")

    async def _run(self) -> None:
        while True:
            count = self.live_pids()
            if count is not None:
                self.peak = max(self.peak, count)
                if count >= self.threshold:
                    self.tripped = count
                    logger.warning("fork-bomb guard tripped: %d live pids (threshold %d)", count, self.threshold)
                    await self.on_trip(count)
                    return
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        """Stop polling; re-raises what ended the watch abnormally. Safe to call from ``on_trip``."""
        task = self._task
        if task is None or task is asyncio.current_task():
            return
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- integrity ----------------------------------------------------------------------------------

NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")
DEFAULT_EXPECTED_NAMESPACES = frozenset({"mnt", "pid", "ipc", "uts"})
# Host mounts a sandbox may show on purpose when they are read-only (system directories).
SYSTEM_BIND_PREFIXES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt")
_NS_PATHS = " ".join(f"/proc/self/ns/{n}" for n in NAMESPACES)
_STATUS_PREFIX = "/proc/self/status:"
_MOUNTINFO_PREFIX = "/proc/self/mountinfo:"
# A namespace link's target names its type: "net:[4026532182]".
_NS_LINK = re.compile(r"^(" + "|".join(NAMESPACES) + r"):\[\d+\]$")
# Two freshly exec'd commands read what a command sees, side by side (each a fork and an exec:
# in a basic sandbox the probe took 3.75 ms against 5.1 ms one after the other, throwaway
# timing, medians of 25): `readlink` prints the namespace links to stderr, each target naming its
# type, so an unreadable link leaves only its own line out; `grep` prints both /proc files
# to stdout with each line labelled by its file, its own /proc/self. The two streams are
# separate pipes, so their lines cannot interleave. The shell waits for both and exits with
# grep's status, which is 0 only when it read both files; check_integrity requires that.
# (Reading the files with the shell's `read` builtin costs a read(2) per byte: ~6,000
# filtered syscalls.)
PROBE_SCRIPT = f"readlink {_NS_PATHS} >&2 & grep -H '' /proc/self/status /proc/self/mountinfo; s=$?; wait $!; exit $s"
PROBE_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/<pid>/mountinfo`` (the fields the integrity check needs)."""

    device: str
    root: str
    mount_point: str
    options: frozenset[str]
    fstype: str

    @property
    def key(self) -> tuple[str, str, str]:
        """Identity across mount namespaces: same device, same subtree, same place."""
        return self.device, self.root, self.mount_point


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse ``/proc/<pid>/mountinfo`` text; malformed lines raise :class:`ValueError`."""
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split()
        sep = fields.index("-")
        mounts.append(
            Mount(
                device=fields[2],
                root=_unescape_octal(fields[3]),
                mount_point=_unescape_octal(fields[4]),
                options=frozenset(fields[5].split(",")),
                fstype=fields[sep + 1],
            )
        )
    return mounts


def _unescape_octal(text: str) -> str:
    if "\\" not in text:
        return text  # the common case: nothing escaped
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def parse_status(text: str) -> dict[str, str]:
    """``/proc/<pid>/status`` as a mapping of field -> value."""
    result = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            result[name.strip()] = value.strip()
    return result


def _host_namespaces() -> dict[str, str]:
    found = {}
    for name in NAMESPACES:
        try:
            found[name] = os.readlink(f"/proc/self/ns/{name}")
        except OSError as exc:
            logger.debug("host namespace %s unreadable: %s", name, exc.strerror)
    return found


def _host_mounts() -> list[Mount]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        return parse_mountinfo(fh.read())


@dataclass(frozen=True)
class IntegrityReport:
    """What the in-sandbox probe saw and what is wrong with it (``problems`` empty = ok)."""

    problems: tuple[str, ...]
    namespaces: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    host_mounts_visible: tuple[str, ...] = ()
    seccomp: str | None = None
    no_new_privs: str | None = None
    capabilities: Mapping[str, str] = field(default_factory=dict)
    checked: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the probe ran and nothing was wrong."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the enforcement report and the audit log."""
        return {
            "ok": self.ok,
            "problems": list(self.problems),
            "checked": list(self.checked),
            "namespaces": {k: dict(v) for k, v in self.namespaces.items()},
            "host_mounts_visible": list(self.host_mounts_visible),
            "seccomp": self.seccomp,
            "no_new_privs": self.no_new_privs,
            "capabilities": dict(self.capabilities),
        }


def _sections(stdout: str, stderr: str) -> dict[str, str]:
    """The probe's output split into ``ns`` (``name target`` lines), ``status`` and ``mountinfo``."""
    ns = [f"{m.group(1)} {m.group(0)}" for m in map(_NS_LINK.match, stderr.splitlines()) if m is not None]
    # grep's labelled output: split it back into the two files.
    status, mountinfo = [], []
    for line in stdout.splitlines():
        if line.startswith(_STATUS_PREFIX):
            status.append(line[len(_STATUS_PREFIX) :])
        elif line.startswith(_MOUNTINFO_PREFIX):
            mountinfo.append(line[len(_MOUNTINFO_PREFIX) :])
    sections = {"ns": ns, "status": status, "mountinfo": mountinfo}
    return {name: "\n".join(lines) for name, lines in sections.items() if lines}


def expected_namespaces(enforcement: Enforcement) -> frozenset[str]:
    """The namespaces the sandbox must not share with the host, from what the backend reported."""
    if enforcement.backend is Backend.NOOP:
        return frozenset()
    if any(d.startswith("namespaces") for d in enforcement.degraded):
        return frozenset()
    details = enforcement.details
    reported = details.get("namespaces")
    expected = set(reported) if isinstance(reported, Mapping) and reported else set(DEFAULT_EXPECTED_NAMESPACES)
    if details.get("network") == "host" or ("network" not in details and not enforcement.has(Control.NETWORK_ISOLATED)):
        expected.discard("net")
    return frozenset(expected & set(NAMESPACES))


def assess_probe(stdout: str, stderr: str, enforcement: Enforcement) -> IntegrityReport:
    """Compare the probe's output (:data:`PROBE_SCRIPT`'s two streams) with the host and with
    what ``enforcement`` claims."""
    return _assess(_sections(stdout, stderr), enforcement, _host_mounts())


def _assess(sections: Mapping[str, str], enforcement: Enforcement, host_mount_list: list[Mount]) -> IntegrityReport:
    if not all(sections.get(name) for name in ("ns", "status", "mountinfo")):
        return IntegrityReport(("the probe output is incomplete (namespaces, status or mountinfo missing)",))
    problems: list[str] = []
    checked: list[str] = []
    status = parse_status(sections.get("status", ""))

    caps = {k: status.get(k, "?") for k in ("CapEff", "CapPrm", "CapAmb")}
    checked.append("capabilities")
    for name, value in caps.items():
        if value.strip("0") != "":
            problems.append(f"{name} is {value}, not 0 (the sandbox holds capabilities)")

    seccomp, nnp = status.get("Seccomp"), status.get("NoNewPrivs")
    if enforcement.has(Control.SECCOMP) or enforcement.details.get("seccomp_mode") == "2":
        checked += ["seccomp", "no_new_privs"]
        if seccomp != "2":
            problems.append(f"Seccomp is {seccomp!r}, not 2 (filter mode) although seccomp is enforced")
        if nnp != "1":
            problems.append(f"NoNewPrivs is {nnp!r}, not 1")
    elif enforcement.details.get("no_new_privs") == "1":
        checked.append("no_new_privs")
        if nnp != "1":
            problems.append(f"NoNewPrivs is {nnp!r}, not 1")

    host_ns = _host_namespaces()
    inside_ns = dict(line.split(" ", 1) for line in sections.get("ns", "").splitlines() if " " in line)
    expected = expected_namespaces(enforcement)
    ns_report: dict[str, dict[str, Any]] = {}
    if expected:
        checked.append("namespaces")
    for name in NAMESPACES:
        inside, host = inside_ns.get(name, "").strip(), host_ns.get(name)
        differs = bool(inside) and host is not None and inside != host
        ns_report[name] = {"inside": inside or None, "host": host, "differs": differs}
        if name in expected and not differs:
            problems.append(
                f"{name} namespace is shared with the host ({inside})" if inside else f"{name} namespace unreadable"
            )

    visible: list[str] = []
    if "mnt" in expected:
        checked.append("mounts")
        try:
            inside_mounts = parse_mountinfo(sections.get("mountinfo", ""))
        except (ValueError, IndexError):
            inside_mounts = []
            problems.append("the sandbox's mountinfo could not be parsed")
        host_keys = {m.key for m in host_mount_list}
        for mount in inside_mounts:
            if mount.key not in host_keys:
                continue
            deliberate = "ro" in mount.options and mount.mount_point.startswith(SYSTEM_BIND_PREFIXES)
            if not deliberate:
                visible.append(mount.mount_point)
        if visible:
            problems.append(f"host mounts visible inside: {', '.join(visible[:8])}")

    return IntegrityReport(
        problems=tuple(problems),
        namespaces=ns_report,
        host_mounts_visible=tuple(visible),
        seccomp=seccomp,
        no_new_privs=nnp,
        capabilities=caps,
        checked=tuple(checked),
    )


async def check_integrity(
    instance: Instance, enforcement: Enforcement, *, meanwhile: Callable[[], None] | None = None
) -> IntegrityReport:
    """Run the probe inside ``instance`` and compare what it sees with the host.

    ``meanwhile`` (optional) is host-side work the caller wants done while the probe runs in
    the sandbox; what it raises propagates, after the probe is cancelled.

    Checks (each only where ``enforcement`` says the control is in place): namespaces differ
    from the host's, no host mount is visible, seccomp is in filter mode with no_new_privs,
    and the process holds no capabilities (always). A probe that fails to run is a problem,
    not an exception: the report says so.
    """
    request = ExecRequest(
        argv=("/bin/sh", "-c", PROBE_SCRIPT),
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"},
        timeout_ms=PROBE_TIMEOUT_MS,
        stdout_cap=4 * 1024 * 1024,
        stderr_cap=64 * 1024,
    )
    probe = asyncio.ensure_future(instance.exec(request))
    try:
        # Let the probe be dispatched, then read the host's mount table while it runs in the
        # sandbox (the comparison needs both; neither depends on the other).
        await asyncio.sleep(0)
        host_mount_list = _host_mounts()
        if meanwhile is not None:
            meanwhile()
        result = await probe
    except ExecError as exc:
        return IntegrityReport((f"the integrity probe could not run: {exc}",))
    finally:
        if not probe.done():  # cancelled, or the host-side work raised
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
    if result.exit_code != 0 or result.timed_out:
        why = result.reason or f"exit code {result.exit_code}"
        return IntegrityReport((f"the integrity probe failed ({why})",))
    if result.stdout_truncated or result.stderr_truncated:
        return IntegrityReport(("the integrity probe's output was truncated",))
    stdout = result.stdout.decode("utf-8", errors="replace")
    sections = _sections(stdout, result.stderr.decode("utf-8", errors="replace"))
    return _assess(sections, enforcement, host_mount_list)


__all__ = [
    "MAX_DEPTH",
    "PROBE_SCRIPT",
    "SHELLS",
    "WRAPPERS",
    "ForkBombWatch",
    "IntegrityReport",
    "Mount",
    "assess_probe",
    "check_command",
    "check_integrity",
    "expected_namespaces",
    "parse_mountinfo",
    "parse_status",
    "program_names",
    "violation_finding",
]
