"""Default locations of kavach's persistent state, in one place.

Everything lives under the user's data directory: ``$KAVACH_DATA_DIR`` when set (tests and
deployments use it), else ``$XDG_DATA_HOME/kavach``, else ``~/.local/share/kavach``.
Individual locations can be moved with their own variables:

=========================  ==============================================
``KAVACH_AUDIT_LOG``       the audit log (JSON Lines)
``KAVACH_AUDIT_KEY_FILE``  the audit HMAC key file
``KAVACH_AUDIT_KEY``       the audit HMAC key itself, hex (no file)
``KAVACH_QUARANTINE_DIR``  the quarantine store directory
=========================  ==============================================

The functions read the environment on every call (never cached), so a test can point
them somewhere else with ``monkeypatch.setenv``.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_DATA_DIR = "KAVACH_DATA_DIR"
ENV_AUDIT_LOG = "KAVACH_AUDIT_LOG"
ENV_AUDIT_KEY_FILE = "KAVACH_AUDIT_KEY_FILE"
ENV_AUDIT_KEY = "KAVACH_AUDIT_KEY"
ENV_QUARANTINE_DIR = "KAVACH_QUARANTINE_DIR"

# Private state (keys, held artifacts, offender records) is never group/world accessible.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def data_dir() -> Path:
    """The directory holding kavach's state (not created here)."""
    override = _env_path(ENV_DATA_DIR)
    if override is not None:
        return override
    xdg = _env_path("XDG_DATA_HOME")
    # The XDG spec says a relative XDG_DATA_HOME is invalid and must be ignored.
    if xdg is not None and xdg.is_absolute():
        return xdg / "kavach"
    return Path.home() / ".local" / "share" / "kavach"


def default_audit_log() -> Path:
    """Where the audit log is written when nothing else is configured."""
    return data_dir() / "audit.jsonl"


def audit_log_path() -> Path:
    """``$KAVACH_AUDIT_LOG`` or :func:`default_audit_log`."""
    return _env_path(ENV_AUDIT_LOG) or default_audit_log()


def default_audit_key_file() -> Path:
    """The key file used when neither an explicit key nor a key variable is given."""
    return data_dir() / "audit.key"


def audit_key_file_from_env() -> Path | None:
    """``$KAVACH_AUDIT_KEY_FILE`` when set."""
    return _env_path(ENV_AUDIT_KEY_FILE)


def quarantine_dir() -> Path:
    """``$KAVACH_QUARANTINE_DIR`` or ``<data dir>/quarantine``."""
    return _env_path(ENV_QUARANTINE_DIR) or data_dir() / "quarantine"


def offenders_db() -> Path:
    """The SQLite database of repeat offenders and revoked agents."""
    return data_dir() / "offenders.sqlite3"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make sure it is ours and mode 0700.

    An existing directory owned by someone else is refused rather than used: another
    user could read or swap what we put there.
    """
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.geteuid():
        raise PermissionError(f"{path} is owned by uid {info.st_uid}, not by us (uid {os.geteuid()})")
    if info.st_mode & 0o777 != PRIVATE_DIR_MODE:
        os.chmod(path, PRIVATE_DIR_MODE)
    return path


__all__ = [
    "ENV_AUDIT_KEY",
    "ENV_AUDIT_KEY_FILE",
    "ENV_AUDIT_LOG",
    "ENV_DATA_DIR",
    "ENV_QUARANTINE_DIR",
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "audit_key_file_from_env",
    "audit_log_path",
    "data_dir",
    "default_audit_key_file",
    "default_audit_log",
    "ensure_private_dir",
    "offenders_db",
    "quarantine_dir",
]
