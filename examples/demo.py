"""`make demo`: a real command in the strongest sandbox this machine offers.

Prints the command's output, the sandbox's score with its label, what was enforced,
and the gate's verdict -- then shows the gate redacting a secret the command prints.
"""

from __future__ import annotations

import asyncio
import sys

import kavach
from kavach.backends.registry import probe_all

PROGRAM = r"""
import os, socket
print("hello from", os.uname().nodename, "as uid", os.getuid(), "pid", os.getpid(), flush=True)
pids = []
for i in range(3):
    pid = os.fork()
    if pid == 0:
        print(f"  child {i}: pid {os.getpid()}", flush=True)
        os._exit(0)
    pids.append(pid)
for pid in pids:
    os.waitpid(pid, 0)
with open("/tmp/note.txt", "w") as f:
    f.write("written inside the sandbox\n")
print("tmp file:", open("/tmp/note.txt").read().strip())
for path in ("/root", "/home", "/etc/ssh", "/var/log"):
    print(f"{path} visible:", os.path.exists(path))
try:
    socket.create_connection(("1.1.1.1", 80), timeout=1)
    print("network: reachable")
except OSError as exc:
    print("network: blocked", f"({exc.strerror or exc})")
"""

LEAKY = "print('deploying with AWS_ACCESS_KEY_ID=AKIAQYLPMN5HHHFPZAM2 region=eu-west-1')"


async def main() -> int:
    usable = [r.backend.value for r in probe_all() if r.usable]
    print(f"usable backends here: {', '.join(usable)}")
    config = kavach.SandboxConfig(policy=kavach.SandboxPolicy.strict())
    async with await kavach.Sandbox.create(config) as sandbox:
        print(f"sandbox {sandbox.id} on backend '{sandbox.backend}'", end="")
        if sandbox.backend is kavach.Backend.NOOP:
            print(" -- the Noop backend runs nothing: no isolation backend is usable here")
        else:
            print()
        result = await sandbox.exec(["/usr/bin/python3", "-c", PROGRAM])
        print("---- output ----")
        print(result.stdout_text.rstrip() or "(none)")
        if result.stderr:
            print("---- stderr ----")
            print(result.stderr_text.rstrip())
        print("----------------")
        enforced = sorted(c.value for c in sandbox.enforcement.controls)
        print(f"exit code: {result.exit_code}")
        print(f"score:     {sandbox.score}   enforced: {', '.join(enforced) or 'nothing'}")
        print(f"verdict:   {result.verdict.value}")

        print()
        print("a command that prints an AWS key:")
        try:
            leak = await sandbox.exec(["/usr/bin/python3", "-c", LEAKY])
        except kavach.ExternalizationBlocked as blocked:
            print("  verdict: block -- nothing released")
            print("  findings: " + ", ".join(f"{f.rule} ({f.severity}) {f.evidence}" for f in blocked.findings))
        else:
            print(f"  released output: {leak.stdout_text.strip() or '(nothing released)'}")
            print(
                f"  verdict: {leak.verdict.value}, findings: "
                + ", ".join(f"{f.rule} ({f.severity})" for f in leak.findings)
            )
            if leak.quarantine_id:
                print(f"  original held in quarantine as {leak.quarantine_id}")
    return 0 if result.exit_code == 0 else 1


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except kavach.KavachError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        sys.exit(1)
