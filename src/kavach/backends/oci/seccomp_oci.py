"""Translate kavach's seccomp profiles (:mod:`kavach.backends.seccomp_profiles`) to OCI JSON.

One source of truth: the Process backend compiles the same :class:`SeccompSpec` to BPF with
libseccomp, this module writes it as the runtime-spec ``linux.seccomp`` object, and the
runtime (runc, crun) compiles that with the host's libseccomp. That libseccomp skips names
it does not know, so :func:`policy_to_oci` sends ``basic`` as an allow list with a refusing
default (:func:`~kavach.backends.seccomp_profiles.build_runtime_spec`), where a skipped name
can only refuse more. The mapping of a spec is a table lookup:

* ``defaultAction`` / ``defaultErrnoRet`` from the spec's default;
* ``architectures``: the native architecture only. A syscall made through another ABI (i386
  ``int 0x80``, x32) matches no architecture and libseccomp's bad-architecture action kills
  it, which is the spec's ``bad_arch_action`` (KILL_PROCESS);
* one ``syscalls[]`` entry per rule, in rule order, with ``errnoRet`` for ERRNO actions and
  ``args`` (``SCMP_CMP_MASKED_EQ``: ``value`` is the mask, ``valueTwo`` the datum, the same
  convention as libseccomp and as :class:`~kavach.backends.seccomp_profiles.ArgCmp`).
"""

from __future__ import annotations

import platform
from typing import Any

from kavach.backends.seccomp_profiles import Action, ArgCmp, SeccompSpec, SyscallRule, build_runtime_spec
from kavach.errors import PolicyError
from kavach.policy import SeccompPolicy

# uname machine -> runtime-spec architecture name
_ARCHITECTURES: dict[str, str] = {
    "x86_64": "SCMP_ARCH_X86_64",
    "aarch64": "SCMP_ARCH_AARCH64",
    "ppc64le": "SCMP_ARCH_PPC64LE",
    "s390x": "SCMP_ARCH_S390X",
    "riscv64": "SCMP_ARCH_RISCV64",
}


def native_architecture(machine: str | None = None) -> str:
    """The runtime-spec name of the host's architecture (``SCMP_ARCH_X86_64`` here)."""
    machine = machine or platform.machine()
    try:
        return _ARCHITECTURES[machine]
    except KeyError:
        raise PolicyError("seccomp", machine, "no seccomp architecture mapping for this machine") from None


def oci_action(action: Action) -> str:
    """``SCMP_ACT_<ACTION>``."""
    return f"SCMP_ACT_{action.value.upper()}"


def oci_arg(arg: ArgCmp) -> dict[str, Any]:
    """One ``LinuxSeccompArg``."""
    return {
        "index": arg.index,
        "value": arg.value,
        "valueTwo": arg.value_two,
        "op": f"SCMP_CMP_{arg.op.value.upper()}",
    }


def oci_rule(rule: SyscallRule) -> dict[str, Any]:
    """One ``LinuxSyscall`` entry."""
    entry: dict[str, Any] = {"names": list(rule.names), "action": oci_action(rule.action)}
    if rule.action is Action.ERRNO:
        entry["errnoRet"] = rule.errno
    if rule.args:
        entry["args"] = [oci_arg(a) for a in rule.args]
    return entry


def to_oci(spec: SeccompSpec, machine: str | None = None) -> dict[str, Any]:
    """The ``linux.seccomp`` object of ``spec``."""
    if spec.bad_arch_action is not Action.KILL_PROCESS:
        # The runtime spec cannot express another bad-architecture action; refuse rather
        # than silently enforce something different from the Process backend.
        raise PolicyError("seccomp", spec.bad_arch_action.value, "OCI runtimes only kill foreign architectures")
    seccomp: dict[str, Any] = {
        "defaultAction": oci_action(spec.default_action),
        "architectures": [native_architecture(machine)],
        "syscalls": [oci_rule(r) for r in spec.rules],
    }
    if spec.default_action is Action.ERRNO:
        seccomp["defaultErrnoRet"] = spec.default_errno
    return seccomp


def policy_to_oci(
    policy: SeccompPolicy, machine: str | None = None, known: frozenset[str] | None = None
) -> dict[str, Any] | None:
    """The ``linux.seccomp`` object for a policy; None when the policy filters nothing.

    The runtime skips names its libseccomp does not know, so ``basic`` is sent as an allow
    list of ``known`` (default: this host's syscall names) with a refusing default
    (:func:`~kavach.backends.seccomp_profiles.build_runtime_spec`).
    """
    if known is None:
        from kavach.backends.process.seccomp import known_syscall_names

        known = known_syscall_names()
    spec = build_runtime_spec(policy, known)
    return None if spec is None else to_oci(spec, machine)


__all__ = ["native_architecture", "oci_action", "oci_arg", "oci_rule", "policy_to_oci", "to_oci"]
