"""The spawner runs only kavach's code: no site hooks of the host's Python installation.

The spawner is started with a plain argv[0] (``kavach-spawner``), so Python does not find
the virtualenv it belongs to; with the site module it would then add the *base*
installation's site-packages and execute every ``.pth`` file there, in the process whose
memory every sandbox process inherits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from kavach.backends.process import ProcessDriver

pytestmark = pytest.mark.skipif(not ProcessDriver().probe().available, reason="Process backend unavailable here")


def _site_dirs_seen_by_a_plain_argv0() -> list[Path]:
    """The site-packages directories an interpreter started as the spawner was would process."""
    out = subprocess.run(
        ["kavach-spawner", "-I", "-c", "import site; print('\\n'.join(site.getsitepackages()))"],
        executable=sys.executable,
        env={},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [Path(line) for line in out.splitlines() if line and Path(line).is_dir()]


def test_the_spawner_does_not_run_pth_files_of_the_base_installation(tmp_path: Path) -> None:
    writable = [d for d in _site_dirs_seen_by_a_plain_argv0() if os.access(d, os.W_OK)]
    if not writable:
        pytest.skip("no writable site-packages directory of the base installation (needs root)")
    marker = tmp_path / "pth-ran"
    pth = writable[0] / f"kavach-test-{uuid.uuid4().hex}.pth"
    # Harmless if left behind by a killed run: it does nothing once tmp_path is gone.
    create = f"os.close(os.open({str(marker)!r}, os.O_CREAT | os.O_WRONLY, 0o600))"
    pth.write_text(f"import os; os.path.isdir({str(tmp_path)!r}) and {create}\n")
    try:
        # Control: an interpreter started the way the spawner is, but with site, runs it.
        subprocess.run(["kavach-spawner", "-I", "-c", "pass"], executable=sys.executable, env={}, check=True)
        if not marker.exists():
            pytest.skip(f"{pth.parent} is not processed by an interpreter started with a plain argv[0]")
        marker.unlink()
        # A fresh process, so that its spawner is started now (this one's may be running).
        script = textwrap.dedent(
            """
            import asyncio
            from kavach.backends.base import ExecRequest, LaunchSpec
            from kavach.backends.process import ProcessDriver
            from kavach.policy import SandboxPolicy

            async def main():
                box = await ProcessDriver().start(LaunchSpec(sandbox_id="spawner-site", policy=SandboxPolicy.basic()))
                try:
                    result = await box.exec(ExecRequest(argv=("/bin/true",)))
                    assert result.exit_code == 0, result
                finally:
                    await box.destroy()

            asyncio.run(main())
            """
        )
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    finally:
        pth.unlink()
    assert not marker.exists(), "the spawner executed a .pth file of the base installation's site-packages"
