"""Dropping every capability and setting no_new_privs, in the order the kernel requires."""

from __future__ import annotations

import ctypes

from kavach.backends.process import _libc
from kavach.backends.process._libc import KernelCallError

# _libc.PRCTL has its argument types declared once: called with plain ints it builds no
# ctypes objects, and the step string is built only when a call fails. (The 41
# bounding-set drops of every exec child went through _libc.prctl with five ctypes objects
# and an f-string each: ~80 pages copied on write per child.)
_prctl = _libc.PRCTL

# securebits: root inside gets no capabilities from execve, the kernel does not fix up
# capabilities on uid changes, and the bits are locked so nothing can undo them.
_SECBIT_NOROOT = 1 << 0
_SECBIT_NOROOT_LOCKED = 1 << 1
_SECBIT_NO_SETUID_FIXUP = 1 << 2
_SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
_SECBIT_KEEP_CAPS_LOCKED = 1 << 5
_SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
_SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7
SECUREBITS = (
    _SECBIT_NOROOT
    | _SECBIT_NOROOT_LOCKED
    | _SECBIT_NO_SETUID_FIXUP
    | _SECBIT_NO_SETUID_FIXUP_LOCKED
    | _SECBIT_KEEP_CAPS_LOCKED
    | _SECBIT_NO_CAP_AMBIENT_RAISE
    | _SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED
)


def drop_bounding_and_lock(last_cap: int) -> None:
    """Empty the bounding and ambient sets and lock securebits (needs CAP_SETPCAP, so first)."""
    prctl, drop = _prctl, _libc.PR_CAPBSET_DROP
    for cap in range(last_cap + 1):
        if prctl(drop, cap, 0, 0, 0) != 0:
            raise KernelCallError(f"drop capability {cap} from the bounding set", ctypes.get_errno())
    if prctl(_libc.PR_CAP_AMBIENT, _libc.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        raise KernelCallError("clear the ambient capabilities", ctypes.get_errno())
    if prctl(_libc.PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0) != 0:
        raise KernelCallError("lock securebits", ctypes.get_errno())


def drop_all_capabilities(last_cap: int) -> None:
    """Empty the bounding, ambient, effective, permitted and inheritable sets; lock securebits.

    Order matters: PR_CAPBSET_DROP and PR_SET_SECUREBITS need CAP_SETPCAP, so they run
    before capset() clears the effective set.
    """
    drop_bounding_and_lock(last_cap)
    _libc.capset_empty("clear effective/permitted/inheritable capabilities")


def set_no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: execve can never grant privileges (setuid bits, file caps)."""
    if _prctl(_libc.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise KernelCallError("set no_new_privs", ctypes.get_errno())


__all__ = ["SECUREBITS", "drop_all_capabilities", "drop_bounding_and_lock", "set_no_new_privs"]
