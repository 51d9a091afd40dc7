"""Suite-wide fixtures: every test gets its own kavach data directory.

Audit logs, keys, quarantine stores and offender databases land under ``tmp_path``, never
in the real home directory, and no test sees another test's state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs are reproducible (the same examples every run, so a green run stays green and a red
# one can be replayed); local runs draw new examples and keep exploring.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

_KAVACH_VARS = (
    "KAVACH_AUDIT_LOG",
    "KAVACH_AUDIT_KEY_FILE",
    "KAVACH_AUDIT_KEY",
    "KAVACH_QUARANTINE_DIR",
)


@pytest.fixture(autouse=True)
def kavach_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point KAVACH_DATA_DIR at a fresh directory and clear the other location variables."""
    data = tmp_path / "kavach-data"
    monkeypatch.setenv("KAVACH_DATA_DIR", str(data))
    for name in _KAVACH_VARS:
        monkeypatch.delenv(name, raising=False)
    yield data
