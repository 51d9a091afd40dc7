"""Sandbox policy: what the sandboxed command may see and do.

A :class:`SandboxPolicy` is a frozen value. Build one from a preset
(:meth:`SandboxPolicy.minimal`, :meth:`~SandboxPolicy.basic`, :meth:`~SandboxPolicy.strict`),
with :func:`dataclasses.replace`, or load it from a TOML, YAML or JSON file with
:meth:`SandboxPolicy.load`. Invalid values raise :class:`~kavach.errors.PolicyError`
naming the field (``network.mode``, ``resources.memory``, ...) and the value.

The policy says what is *asked*; the score is computed from what a backend *enforced*
(see :mod:`kavach.scoring`).
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from kavach.errors import PolicyError

MiB = 1024 * 1024
DEFAULT_OUTPUT_CAP = 16 * MiB
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MIN_CPUS = 0.01  # the kernel's smallest CFS quota, 1 ms, per kavach's 100 ms period
_PID_MAX_LIMIT = 4 * 1024 * 1024  # the kernel's ceiling for pids.max (PID_MAX_LIMIT of 64-bit kernels)
_NR_OPEN_MAX = 2147483584  # the kernel's ceiling for fs.nr_open, hence RLIMIT_NOFILE
# An environment variable name as shells and kavach accept it (use with fullmatch).
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class NetworkMode(StrEnum):
    """How the sandbox reaches the network, from strictest to loosest."""

    OFF = "off"  # a network namespace with only loopback
    PROXY = "proxy"  # only loopback, plus the host egress proxy that enforces the allowlist
    HOST = "host"  # the host's network (no isolation; scores no network modifier)


class SeccompProfile(StrEnum):
    """Built-in seccomp profiles, from loosest to strictest."""

    NONE = "none"
    BASIC = "basic"  # a deny list covering at least Docker's default profile
    STRICT = "strict"  # an allow list that still runs shells and /usr/bin/python3


class Access(StrEnum):
    """Landlock access rights a rule grants on a path."""

    READ = "read"
    WRITE = "write"
    EXECUTE = "execute"


_NETWORK_ORDER = {NetworkMode.OFF: 0, NetworkMode.PROXY: 1, NetworkMode.HOST: 2}
_SECCOMP_ORDER = {SeccompProfile.NONE: 0, SeccompProfile.BASIC: 1, SeccompProfile.STRICT: 2}


@dataclass(frozen=True)
class Bind:
    """A host path made visible inside the sandbox at ``target`` (``source`` when empty)."""

    source: str
    target: str = ""

    def __post_init__(self) -> None:
        if not self.target:
            object.__setattr__(self, "target", self.source)

    @classmethod
    def parse(cls, spec: str, field_name: str = "bind") -> Bind:
        """Parse ``SRC[:DST]``; both must be absolute paths."""
        source, sep, target = spec.partition(":")
        if not source or (sep and not target):
            raise PolicyError(field_name, spec, "expected SRC[:DST]")
        bind = cls(source, target)
        for label, path in (("source", bind.source), ("target", bind.target)):
            if not path.startswith("/"):
                raise PolicyError(field_name, spec, f"{label} must be an absolute path")
            if "\0" in path or any(part == ".." for part in path.split("/")):
                raise PolicyError(field_name, spec, f"{label} must not contain '..' or NUL")
        return bind

    def __str__(self) -> str:
        return self.source if self.source == self.target else f"{self.source}:{self.target}"


@dataclass(frozen=True)
class LandlockRule:
    """Grant ``access`` beneath ``path`` (inside-the-sandbox path) when Landlock is on."""

    path: str
    access: frozenset[Access]


@dataclass(frozen=True)
class FilesystemPolicy:
    """Mounts and the root filesystem.

    Bind targets and the workdir are absolute paths inside the sandbox; they may not be the
    root, nor /proc or /dev or anything beneath them (the sandbox builds those itself).
    """

    ro_binds: tuple[Bind, ...] = ()
    rw_binds: tuple[Bind, ...] = ()
    read_only_root: bool = True
    tmp_size: int = 64 * MiB  # size cap of the tmpfs mounted at /tmp
    workdir: str = "/work"  # cwd inside; a tmpfs unless the config binds a host directory there
    workdir_size: int = 64 * MiB


@dataclass(frozen=True)
class LandlockPolicy:
    """Landlock filesystem rules; ``enabled`` with no rules means nothing is accessible."""

    enabled: bool = False
    rules: tuple[LandlockRule, ...] = ()


@dataclass(frozen=True)
class SeccompPolicy:
    """A built-in profile plus extra denied syscalls; ``allow`` extends the strict allow list."""

    profile: SeccompProfile = SeccompProfile.BASIC
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class NetworkPolicy:
    """Network mode; with ``proxy`` only hosts on the allowlist are reachable (empty = none)."""

    mode: NetworkMode = NetworkMode.OFF
    egress_allowlist: tuple[str, ...] = ()
    egress_denylist: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResourceLimits:
    """Resource limits; ``None`` means not limited."""

    memory: int | None = None  # bytes, cgroup memory limit
    cpus: float | None = None  # CPU bandwidth in cores, at least 0.01 (the kernel's smallest quota)
    pids: int | None = None  # max processes/threads in the sandbox (the kernel allows up to 4194304)
    wall_timeout_ms: int | None = 30_000  # default per-exec wall clock
    cpu_time_s: int | None = None  # RLIMIT_CPU per exec
    file_size: int | None = None  # RLIMIT_FSIZE bytes
    open_files: int | None = None  # RLIMIT_NOFILE; a sandbox cannot exceed the caller's hard limit (ulimit -Hn)
    address_space: int | None = None  # RLIMIT_AS bytes
    stdout_cap: int = DEFAULT_OUTPUT_CAP
    stderr_cap: int = DEFAULT_OUTPUT_CAP

    def without_cgroup_limits(self) -> ResourceLimits:
        """These limits without the ones a cgroup enforces (memory, CPU share, pids): what a
        backend that gets no cgroup for this caller runs with when degrading is allowed."""
        return replace(self, memory=None, cpus=None, pids=None)


@dataclass(frozen=True)
class EnvPolicy:
    """The sandboxed environment: cleared by default.

    ``vars`` are set in every exec; ``passthrough`` names are copied from the caller.
    """

    clear: bool = True
    vars: tuple[tuple[str, str], ...] = (("HOME", "/tmp"), ("LANG", "C.UTF-8"), ("PATH", DEFAULT_PATH))
    passthrough: tuple[str, ...] = ()


DEFAULT_SENSITIVE_PATHS: tuple[str, ...] = (
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/sudoers",
    "/root/.ssh",
    "/proc/kcore",
    "/proc/sysrq-trigger",
    "/sys/kernel",
    "/dev/mem",
    "/var/run/docker.sock",
    "/run/docker.sock",
)


@dataclass(frozen=True)
class GuardPolicy:
    """Pre-exec command analysis (see :mod:`kavach.guards`)."""

    blocked_commands: tuple[str, ...] = ()
    allowed_commands: tuple[str, ...] | None = None  # None = any command not blocked
    sensitive_paths: tuple[str, ...] = DEFAULT_SENSITIVE_PATHS
    block_shell_tricks: bool = True
    fork_bomb_threshold: int | None = None  # live pids that trigger the fork-bomb guard


@dataclass(frozen=True)
class SandboxPolicy:
    """Everything a sandbox enforces. The default equals :meth:`basic`."""

    filesystem: FilesystemPolicy = field(default_factory=FilesystemPolicy)
    landlock: LandlockPolicy = field(default_factory=LandlockPolicy)
    seccomp: SeccompPolicy = field(default_factory=SeccompPolicy)
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    resources: ResourceLimits = field(
        default_factory=lambda: ResourceLimits(
            memory=512 * MiB, pids=256, cpu_time_s=60, file_size=256 * MiB, open_files=256
        )
    )
    env: EnvPolicy = field(default_factory=EnvPolicy)
    guards: GuardPolicy = field(default_factory=GuardPolicy)
    # True lets a backend run with fewer controls than asked (the score shows the loss);
    # False (default) makes any missing control a creation error.
    allow_degraded: bool = False

    # -- presets ---------------------------------------------------------------------------

    @classmethod
    def minimal(cls) -> SandboxPolicy:
        """Namespaces only: host network, no seccomp, writable root, no resource limits."""
        return cls(
            filesystem=FilesystemPolicy(read_only_root=False),
            seccomp=SeccompPolicy(profile=SeccompProfile.NONE),
            network=NetworkPolicy(mode=NetworkMode.HOST),
            resources=ResourceLimits(),
        )

    @classmethod
    def basic(cls) -> SandboxPolicy:
        """No network, seccomp deny list, read-only root, memory/pids/rlimits. Process scores 65."""
        return cls()

    @classmethod
    def strict(cls) -> SandboxPolicy:
        """Everything of basic plus the seccomp allow list and Landlock rules. Process scores 68."""
        rx = frozenset({Access.READ, Access.EXECUTE})
        rw = frozenset({Access.READ, Access.WRITE})
        rules = (
            *(LandlockRule(path, rx) for path in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc")),
            LandlockRule("/proc", frozenset({Access.READ})),
            LandlockRule("/dev", rw),
            LandlockRule("/tmp", rw),
            LandlockRule("/work", rw),
        )
        return cls(
            landlock=LandlockPolicy(enabled=True, rules=rules),
            seccomp=SeccompPolicy(profile=SeccompProfile.STRICT),
            resources=ResourceLimits(
                memory=256 * MiB,
                cpus=1.0,
                pids=128,
                cpu_time_s=30,
                file_size=64 * MiB,
                open_files=128,
            ),
        )

    @classmethod
    def preset(cls, name: str) -> SandboxPolicy:
        """Return the preset called ``name`` (minimal, basic, strict)."""
        presets: dict[str, Callable[[], SandboxPolicy]] = {
            "minimal": cls.minimal,
            "basic": cls.basic,
            "strict": cls.strict,
        }
        try:
            return presets[name.strip().lower()]()
        except KeyError:
            raise PolicyError("policy", name, "unknown preset; choose minimal, basic or strict") from None

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> SandboxPolicy:
        """Load a policy from a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError("policy", str(path), f"cannot read file: {exc.strerror}") from None
        data = _parse_policy_text(text, path.suffix.lower(), str(path))
        if data is None:
            data = {}
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SandboxPolicy:
        """Build a policy from plain data; ``extends`` names a preset to start from."""
        data = _mapping(data, "policy")
        _check_keys(data, "policy", {"extends", *(f.name for f in fields(cls))})
        base = cls.preset(_str(data["extends"], "extends")) if "extends" in data else cls()
        changes: dict[str, Any] = {}
        for name, parse in _SECTION_PARSERS.items():
            if name in data:
                changes[name] = parse(data[name], getattr(base, name))
        if "allow_degraded" in data:
            changes["allow_degraded"] = _bool(data["allow_degraded"], "allow_degraded")
        policy = replace(base, **changes)
        policy.validate()
        return policy

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :meth:`from_dict` reads back to an equal policy."""
        return {
            "filesystem": {
                "ro_binds": [str(b) for b in self.filesystem.ro_binds],
                "rw_binds": [str(b) for b in self.filesystem.rw_binds],
                "read_only_root": self.filesystem.read_only_root,
                "tmp_size": self.filesystem.tmp_size,
                "workdir": self.filesystem.workdir,
                "workdir_size": self.filesystem.workdir_size,
            },
            "landlock": {
                "enabled": self.landlock.enabled,
                "rules": [{"path": r.path, "access": sorted(a.value for a in r.access)} for r in self.landlock.rules],
            },
            "seccomp": {
                "profile": self.seccomp.profile.value,
                "allow": list(self.seccomp.allow),
                "deny": list(self.seccomp.deny),
            },
            "network": {
                "mode": self.network.mode.value,
                "egress_allowlist": list(self.network.egress_allowlist),
                "egress_denylist": list(self.network.egress_denylist),
            },
            "resources": {f.name: getattr(self.resources, f.name) for f in fields(ResourceLimits)},
            "env": {
                "clear": self.env.clear,
                "vars": dict(self.env.vars),
                "passthrough": list(self.env.passthrough),
            },
            "guards": {
                "blocked_commands": list(self.guards.blocked_commands),
                "allowed_commands": (
                    None if self.guards.allowed_commands is None else list(self.guards.allowed_commands)
                ),
                "sensitive_paths": list(self.guards.sensitive_paths),
                "block_shell_tricks": self.guards.block_shell_tricks,
                "fork_bomb_threshold": self.guards.fork_bomb_threshold,
            },
            "allow_degraded": self.allow_degraded,
        }

    def validate(self) -> None:
        """Check cross-field rules; raise :class:`PolicyError` naming the field."""
        if self.seccomp.allow and self.seccomp.profile is not SeccompProfile.STRICT:
            raise PolicyError(
                "seccomp.allow", list(self.seccomp.allow), "only valid with profile 'strict' (an allow list)"
            )
        _check_inside_path(self.filesystem.workdir, "filesystem.workdir")
        for field_name, binds in (
            ("filesystem.ro_binds", self.filesystem.ro_binds),
            ("filesystem.rw_binds", self.filesystem.rw_binds),
        ):
            for bind in binds:
                _check_bind(bind, field_name)
        for rule in self.landlock.rules:
            if not rule.path.startswith("/"):
                raise PolicyError("landlock.rules.path", rule.path, "must be an absolute path")
        r = self.resources
        for name in (
            "memory",
            "pids",
            "wall_timeout_ms",
            "cpu_time_s",
            "file_size",
            "open_files",
            "address_space",
        ):
            value = getattr(r, name)
            if value is not None and value <= 0:
                raise PolicyError(f"resources.{name}", value, "must be positive")
        if r.cpus is not None and not (math.isfinite(r.cpus) and r.cpus >= _MIN_CPUS):
            # Below 1 ms of CPU per 100 ms period the kernel cannot enforce the share: a
            # smaller quota would be rounded up, a weaker limit than the one asked for.
            raise PolicyError("resources.cpus", r.cpus, f"must be a finite number of cores, at least {_MIN_CPUS}")
        if r.pids is not None and r.pids > _PID_MAX_LIMIT:
            raise PolicyError("resources.pids", r.pids, f"the kernel allows at most {_PID_MAX_LIMIT}")
        if r.open_files is not None and r.open_files > _NR_OPEN_MAX:
            raise PolicyError("resources.open_files", r.open_files, f"the kernel allows at most {_NR_OPEN_MAX}")
        for name in ("stdout_cap", "stderr_cap"):
            if getattr(r, name) <= 0:
                raise PolicyError(f"resources.{name}", getattr(r, name), "must be positive")
        threshold = self.guards.fork_bomb_threshold
        if threshold is not None and threshold < 2:
            raise PolicyError("guards.fork_bomb_threshold", threshold, "must be at least 2 (init counts as one)")
        if self.filesystem.tmp_size <= 0:
            raise PolicyError("filesystem.tmp_size", self.filesystem.tmp_size, "must be positive")
        for entry in (*self.network.egress_allowlist, *self.network.egress_denylist):
            _check_host_pattern(entry, "network.egress_allowlist")
        for name in self.env.passthrough:
            if not ENV_NAME_RE.fullmatch(name):
                raise PolicyError("env.passthrough", name, "not a valid environment variable name")


# Sandbox paths a bind or the workdir may not cover: the root itself, and /proc and /dev,
# which every backend builds for the sandbox (a fresh procfs with masked entries, a minimal
# device tmpfs); a host directory over or inside them would undo that or fail to mount.
_RESERVED_TARGETS = ("/proc", "/dev")


def _check_inside_path(path: str, field_name: str) -> None:
    """``path`` (a path inside the sandbox) is absolute, normal and not reserved."""
    if not path.startswith("/") or "\0" in path or any(part in ("..", ".") for part in path.split("/")):
        raise PolicyError(field_name, path, "must be an absolute path without '.', '..' or NUL")
    normal = "/" + "/".join(part for part in path.split("/") if part)
    if normal == "/":
        raise PolicyError(field_name, path, "cannot be the sandbox's root")
    for reserved in _RESERVED_TARGETS:
        if normal == reserved or normal.startswith(reserved + "/"):
            raise PolicyError(
                field_name, path, f"{reserved} is built by the sandbox and cannot be replaced or bound into"
            )


def _check_bind(bind: Bind, field_name: str) -> None:
    if not bind.source.startswith("/") or "\0" in bind.source or ".." in bind.source.split("/"):
        raise PolicyError(field_name, str(bind), "source must be an absolute path without '..' or NUL")
    _check_inside_path(bind.target, field_name)


def _parse_policy_text(text: str, suffix: str, name: str) -> Any:
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise PolicyError("policy", name, "unknown file type; use .toml, .yaml, .yml or .json")
    try:
        if suffix == ".toml":
            return tomllib.loads(text)
        if suffix == ".json":
            return json.loads(text)
        import yaml  # only YAML policy files need it; keeps the spawner's imports small

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(str(exc)) from None
    except ValueError as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PolicyError("policy", name, f"syntax error: {first_line}") from None


def landlock_rules(policy: SandboxPolicy) -> tuple[LandlockRule, ...]:
    """The Landlock rules a backend applies: the policy's, plus one per bind.

    A bind is an explicit grant of a path, so Landlock must not hide it: read-only binds get
    read + execute, writable binds read + write (not execute, as /tmp and /work in
    ``strict``: execve of a file the command wrote is refused unless a rule allows it. This
    is not a guarantee that such code never runs: the dynamic loader can still map it
    (``ld.so ./file``), as any interpreter on the root can run a script).
    """
    if not policy.landlock.enabled:
        return ()
    rx = frozenset({Access.READ, Access.EXECUTE})
    rw = frozenset({Access.READ, Access.WRITE})
    extra = [LandlockRule(b.target, rx) for b in policy.filesystem.ro_binds]
    extra += [LandlockRule(b.target, rw) for b in policy.filesystem.rw_binds]
    return (*policy.landlock.rules, *extra)


# -- merge ---------------------------------------------------------------------------------------

T = TypeVar("T")


def merge(a: SandboxPolicy, b: SandboxPolicy) -> SandboxPolicy:
    """Combine two policies so that the stricter value wins for every field.

    Allowlists intersect (an empty intersection allows *nothing*), deny lists unite,
    limits take the minimum, booleans that restrict are OR-ed. Two different workdirs
    cannot be reconciled and raise :class:`PolicyError`.
    """
    merged = SandboxPolicy(
        filesystem=_merge_filesystem(a.filesystem, b.filesystem),
        landlock=_merge_landlock(a.landlock, b.landlock),
        seccomp=_merge_seccomp(a.seccomp, b.seccomp),
        network=_merge_network(a.network, b.network),
        resources=_merge_resources(a.resources, b.resources),
        env=EnvPolicy(
            clear=a.env.clear or b.env.clear,
            vars=_merge_env_vars(a.env.vars, b.env.vars),
            passthrough=_intersect(a.env.passthrough, b.env.passthrough),
        ),
        guards=GuardPolicy(
            blocked_commands=_union(a.guards.blocked_commands, b.guards.blocked_commands),
            allowed_commands=_intersect_optional(a.guards.allowed_commands, b.guards.allowed_commands),
            sensitive_paths=_union(a.guards.sensitive_paths, b.guards.sensitive_paths),
            block_shell_tricks=a.guards.block_shell_tricks or b.guards.block_shell_tricks,
            fork_bomb_threshold=_min_optional(a.guards.fork_bomb_threshold, b.guards.fork_bomb_threshold),
        ),
        allow_degraded=a.allow_degraded and b.allow_degraded,
    )
    merged.validate()
    return merged


def _union(a: Iterable[T], b: Iterable[T]) -> tuple[T, ...]:
    return tuple(dict.fromkeys([*a, *b]))


def _intersect(a: Iterable[T], b: Iterable[T]) -> tuple[T, ...]:
    other = set(b)
    return tuple(x for x in dict.fromkeys(a) if x in other)


def _intersect_optional(a: tuple[T, ...] | None, b: tuple[T, ...] | None) -> tuple[T, ...] | None:
    if a is None:
        return b
    if b is None:
        return a
    return _intersect(a, b)


def _min_optional(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _min_optional_float(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _merge_filesystem(a: FilesystemPolicy, b: FilesystemPolicy) -> FilesystemPolicy:
    if a.workdir != b.workdir:
        raise PolicyError("filesystem.workdir", (a.workdir, b.workdir), "policies name different workdirs")
    # A bind survives only if both policies grant it; read-write only if both say read-write.
    rw = _intersect(a.rw_binds, b.rw_binds)
    visible_b = {*b.ro_binds, *b.rw_binds}
    ro = tuple(x for x in dict.fromkeys([*a.ro_binds, *a.rw_binds]) if x in visible_b and x not in rw)
    return FilesystemPolicy(
        ro_binds=ro,
        rw_binds=rw,
        read_only_root=a.read_only_root or b.read_only_root,
        tmp_size=min(a.tmp_size, b.tmp_size),
        workdir=a.workdir,
        workdir_size=min(a.workdir_size, b.workdir_size),
    )


def _merge_landlock(a: LandlockPolicy, b: LandlockPolicy) -> LandlockPolicy:
    if not (a.enabled and b.enabled):
        # Landlock off is "everything allowed": the enabled side's rules are the stricter.
        return a if a.enabled else b
    b_access = {r.path: r.access for r in b.rules}
    rules = []
    for rule in a.rules:
        if rule.path in b_access and (access := rule.access & b_access[rule.path]):
            rules.append(LandlockRule(rule.path, access))
    return LandlockPolicy(enabled=True, rules=tuple(rules))


def _merge_seccomp(a: SeccompPolicy, b: SeccompPolicy) -> SeccompPolicy:
    profile = max(a.profile, b.profile, key=_SECCOMP_ORDER.__getitem__)
    strict_allows = [p.allow for p in (a, b) if p.profile is SeccompProfile.STRICT]
    if len(strict_allows) == 2:
        allow = _intersect(strict_allows[0], strict_allows[1])
    else:
        allow = strict_allows[0] if strict_allows else ()
    return SeccompPolicy(profile=profile, allow=allow, deny=_union(a.deny, b.deny))


def _merge_network(a: NetworkPolicy, b: NetworkPolicy) -> NetworkPolicy:
    mode = min(a.mode, b.mode, key=_NETWORK_ORDER.__getitem__)
    proxies = [p for p in (a, b) if p.mode is NetworkMode.PROXY]
    if len(proxies) == 2:
        allow = intersect_host_patterns(a.egress_allowlist, b.egress_allowlist)
    else:
        allow = proxies[0].egress_allowlist if proxies else ()
    return NetworkPolicy(
        mode=mode, egress_allowlist=allow, egress_denylist=_union(a.egress_denylist, b.egress_denylist)
    )


def _merge_resources(a: ResourceLimits, b: ResourceLimits) -> ResourceLimits:
    return ResourceLimits(
        memory=_min_optional(a.memory, b.memory),
        cpus=_min_optional_float(a.cpus, b.cpus),
        pids=_min_optional(a.pids, b.pids),
        wall_timeout_ms=_min_optional(a.wall_timeout_ms, b.wall_timeout_ms),
        cpu_time_s=_min_optional(a.cpu_time_s, b.cpu_time_s),
        file_size=_min_optional(a.file_size, b.file_size),
        open_files=_min_optional(a.open_files, b.open_files),
        address_space=_min_optional(a.address_space, b.address_space),
        stdout_cap=min(a.stdout_cap, b.stdout_cap),
        stderr_cap=min(a.stderr_cap, b.stderr_cap),
    )


def _merge_env_vars(a: tuple[tuple[str, str], ...], b: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    merged = dict(a)
    for key, value in b:
        if key in merged and merged[key] != value:
            raise PolicyError(f"env.vars.{key}", (merged[key], value), "policies set different values")
        merged[key] = value
    return tuple(sorted(merged.items()))


# -- host patterns ---------------------------------------------------------------------------------

_HOST_RE = re.compile(r"^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?(:[0-9]{1,5})?$")


def _check_host_pattern(entry: str, field_name: str) -> None:
    if not _HOST_RE.match(entry):
        raise PolicyError(field_name, entry, "expected HOST, *.DOMAIN, optionally with :PORT")


def host_pattern_matches(pattern: str, host: str) -> bool:
    """True if ``host`` (no port) matches ``pattern`` (``example.com`` or ``*.example.com``, no port)."""
    pattern, host = pattern.lower(), host.lower().rstrip(".")
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def _split_port(entry: str) -> tuple[str, str | None]:
    host, sep, port = entry.rpartition(":")
    return (host, port) if sep else (entry, None)


def intersect_host_patterns(a: Iterable[str], b: Iterable[str]) -> tuple[str, ...]:
    """Patterns allowed by both lists; a wildcard meeting a narrower pattern keeps the narrower one."""
    result: dict[str, None] = {}
    b_list = list(b)
    for pa in a:
        ha, porta = _split_port(pa)
        for pb in b_list:
            hb, portb = _split_port(pb)
            if porta and portb and porta != portb:
                continue
            port = porta or portb
            if ha.lower() == hb.lower() or (
                host_pattern_matches(hb, ha.removeprefix("*.")) and (not ha.startswith("*.") or hb.startswith("*."))
            ):
                host = ha
            elif host_pattern_matches(ha, hb.removeprefix("*.")) and (not hb.startswith("*.") or ha.startswith("*.")):
                host = hb
            else:
                continue
            result[f"{host}:{port}" if port else host] = None
    return tuple(result)


# -- parsing helpers ---------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": MiB, "g": 1024 * MiB, "t": 1024 * 1024 * MiB}


def parse_size(value: object, field_name: str) -> int:
    """Bytes from an int or a string like ``256M``, ``1GiB``, ``512k``."""
    if isinstance(value, bool):
        raise PolicyError(field_name, value, "expected a size such as 256M")
    if isinstance(value, int):
        if value <= 0:
            raise PolicyError(field_name, value, "must be positive")
        return value
    if isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
        if size <= 0:
            raise PolicyError(field_name, value, "must be positive")
        return size
    raise PolicyError(field_name, value, "expected a size such as 256M")


def _mapping(value: object, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PolicyError(name, value, "expected a table/mapping")
    return value


def _check_keys(data: Mapping[str, Any], name: str, allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        prefix = "" if name == "policy" else f"{name}."
        raise PolicyError(
            f"{prefix}{unknown[0]}", data[unknown[0]], f"unknown field; valid: {', '.join(sorted(allowed))}"
        )


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(name, value, "expected true or false")
    return value


def _str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise PolicyError(name, value, "expected a string")
    return value


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PolicyError(name, value, "expected a positive integer")
    return value


def _opt(value: object, name: str, parse: Callable[[object, str], T]) -> T | None:
    return None if value is None else parse(value, name)


def _str_list(value: object, name: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(x, str) for x in value):
        raise PolicyError(name, value, "expected a list of strings")
    return tuple(value)


def _enum(enum: type[StrEnumT], value: object, name: str) -> StrEnumT:
    try:
        return enum(str(value).lower())
    except ValueError:
        valid = ", ".join(m.value for m in enum)
        raise PolicyError(name, value, f"expected one of {valid}") from None


StrEnumT = TypeVar("StrEnumT", bound=StrEnum)


def _parse_filesystem(value: object, base: FilesystemPolicy) -> FilesystemPolicy:
    data = _mapping(value, "filesystem")
    _check_keys(data, "filesystem", {f.name for f in fields(FilesystemPolicy)})
    changes: dict[str, Any] = {}
    for key in ("ro_binds", "rw_binds"):
        if key in data:
            changes[key] = tuple(Bind.parse(s, f"filesystem.{key}") for s in _str_list(data[key], f"filesystem.{key}"))
    if "read_only_root" in data:
        changes["read_only_root"] = _bool(data["read_only_root"], "filesystem.read_only_root")
    for key in ("tmp_size", "workdir_size"):
        if key in data:
            changes[key] = parse_size(data[key], f"filesystem.{key}")
    if "workdir" in data:
        changes["workdir"] = _str(data["workdir"], "filesystem.workdir")
    return replace(base, **changes)


def _parse_landlock(value: object, base: LandlockPolicy) -> LandlockPolicy:
    data = _mapping(value, "landlock")
    _check_keys(data, "landlock", {"enabled", "rules"})
    enabled = _bool(data["enabled"], "landlock.enabled") if "enabled" in data else base.enabled
    rules = base.rules
    if "rules" in data:
        if not isinstance(data["rules"], list):
            raise PolicyError("landlock.rules", data["rules"], "expected a list of {path, access}")
        parsed = []
        for i, raw in enumerate(data["rules"]):
            item = _mapping(raw, f"landlock.rules[{i}]")
            _check_keys(item, f"landlock.rules[{i}]", {"path", "access"})
            path = _str(item.get("path"), f"landlock.rules[{i}].path")
            access = frozenset(
                _enum(Access, a, f"landlock.rules[{i}].access")
                for a in _str_list(item.get("access", []), f"landlock.rules[{i}].access")
            )
            parsed.append(LandlockRule(path, access))
        rules = tuple(parsed)
        enabled = enabled or "enabled" not in data
    return LandlockPolicy(enabled=enabled, rules=rules)


def _parse_seccomp(value: object, base: SeccompPolicy) -> SeccompPolicy:
    data = _mapping(value, "seccomp")
    _check_keys(data, "seccomp", {"profile", "allow", "deny"})
    changes: dict[str, Any] = {}
    if "profile" in data:
        changes["profile"] = _enum(SeccompProfile, data["profile"], "seccomp.profile")
    for key in ("allow", "deny"):
        if key in data:
            names = _str_list(data[key], f"seccomp.{key}")
            for n in names:
                if not re.fullmatch(r"[a-z0-9_]+", n):
                    raise PolicyError(f"seccomp.{key}", n, "not a syscall name")
            changes[key] = names
    return replace(base, **changes)


def _parse_network(value: object, base: NetworkPolicy) -> NetworkPolicy:
    data = _mapping(value, "network")
    _check_keys(data, "network", {"mode", "egress_allowlist", "egress_denylist"})
    changes: dict[str, Any] = {}
    if "mode" in data:
        changes["mode"] = _enum(NetworkMode, data["mode"], "network.mode")
    for key in ("egress_allowlist", "egress_denylist"):
        if key in data:
            entries = _str_list(data[key], f"network.{key}")
            for e in entries:
                _check_host_pattern(e, f"network.{key}")
            changes[key] = entries
    return replace(base, **changes)


_RESOURCE_SIZES = {"memory", "file_size", "address_space", "stdout_cap", "stderr_cap"}
_RESOURCE_INTS = {"pids", "wall_timeout_ms", "cpu_time_s", "open_files"}


def _parse_resources(value: object, base: ResourceLimits) -> ResourceLimits:
    data = _mapping(value, "resources")
    _check_keys(data, "resources", {f.name for f in fields(ResourceLimits)})
    changes: dict[str, Any] = {}
    for key, raw in data.items():
        name = f"resources.{key}"
        if key in _RESOURCE_SIZES:
            if key in ("stdout_cap", "stderr_cap"):
                changes[key] = parse_size(raw, name)
            else:
                changes[key] = _opt(raw, name, parse_size)
        elif key in _RESOURCE_INTS:
            changes[key] = _opt(raw, name, _int)
        elif key == "cpus":
            if raw is not None and (isinstance(raw, bool) or not isinstance(raw, int | float) or raw <= 0):
                raise PolicyError(name, raw, "expected a positive number of cores")
            changes[key] = None if raw is None else float(raw)
    return replace(base, **changes)


def _parse_env(value: object, base: EnvPolicy) -> EnvPolicy:
    data = _mapping(value, "env")
    _check_keys(data, "env", {"clear", "vars", "passthrough"})
    changes: dict[str, Any] = {}
    if "clear" in data:
        changes["clear"] = _bool(data["clear"], "env.clear")
    if "vars" in data:
        items = _mapping(data["vars"], "env.vars")
        for k, v in items.items():
            if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k)):
                raise PolicyError(f"env.vars.{k}", v, 'expected NAME = "string"')
        changes["vars"] = tuple(sorted((str(k), str(v)) for k, v in items.items()))  # order-free
    if "passthrough" in data:
        changes["passthrough"] = _str_list(data["passthrough"], "env.passthrough")
    return replace(base, **changes)


def _parse_guards(value: object, base: GuardPolicy) -> GuardPolicy:
    data = _mapping(value, "guards")
    _check_keys(data, "guards", {f.name for f in fields(GuardPolicy)})
    changes: dict[str, Any] = {}
    for key in ("blocked_commands", "sensitive_paths"):
        if key in data:
            changes[key] = _str_list(data[key], f"guards.{key}")
    if "allowed_commands" in data:
        raw = data["allowed_commands"]
        changes["allowed_commands"] = None if raw is None else _str_list(raw, "guards.allowed_commands")
    if "block_shell_tricks" in data:
        changes["block_shell_tricks"] = _bool(data["block_shell_tricks"], "guards.block_shell_tricks")
    if "fork_bomb_threshold" in data:
        changes["fork_bomb_threshold"] = _opt(data["fork_bomb_threshold"], "guards.fork_bomb_threshold", _int)
    return replace(base, **changes)


_SECTION_PARSERS: dict[str, Callable[[object, Any], Any]] = {
    "filesystem": _parse_filesystem,
    "landlock": _parse_landlock,
    "seccomp": _parse_seccomp,
    "network": _parse_network,
    "resources": _parse_resources,
    "env": _parse_env,
    "guards": _parse_guards,
}


__all__ = [
    "Access",
    "Bind",
    "EnvPolicy",
    "FilesystemPolicy",
    "GuardPolicy",
    "LandlockPolicy",
    "LandlockRule",
    "NetworkMode",
    "NetworkPolicy",
    "ResourceLimits",
    "SandboxPolicy",
    "SeccompPolicy",
    "SeccompProfile",
    "host_pattern_matches",
    "intersect_host_patterns",
    "landlock_rules",
    "merge",
    "parse_size",
]
