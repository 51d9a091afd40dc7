"""The Noop backend: runs nothing and says so (score 0). For users' tests of code that calls kavach.

Every exec returns exit code 0 with empty output, or what the optional ``responder``
returns; the requests are kept in ``NoopInstance.requests`` for assertions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from kavach.backends.base import Driver, ExecRequest, Instance, LaunchSpec, ProbeResult, RawProcess, RawResult
from kavach.backends.names import Backend
from kavach.errors import ExecError
from kavach.scoring import Enforcement

Responder = Callable[[ExecRequest], RawResult]


class NoopProcess(RawProcess):
    """A spawned no-op: yields the responder's output once, then exits."""

    def __init__(self, result: RawResult) -> None:
        self.pid = 0
        self._result = result
        self._streamed = False

    async def chunks(self) -> AsyncIterator[tuple[str, bytes]]:
        self._streamed = True
        if self._result.stdout:
            yield "stdout", self._result.stdout
        if self._result.stderr:
            yield "stderr", self._result.stderr

    async def wait(self) -> RawResult:
        if self._streamed:
            return RawResult(self._result.exit_code, duration_ms=self._result.duration_ms)
        return self._result

    async def kill(self, signum: int = 9) -> None:
        return None


class NoopInstance(Instance):
    """Records requests; runs nothing."""

    def __init__(self, spec: LaunchSpec, responder: Responder | None) -> None:
        self.spec = spec
        self.requests: list[ExecRequest] = []
        self._responder = responder
        self.files: dict[str, bytes] = {f.path: f.data for f in spec.files}

    def enforcement(self) -> Enforcement:
        return Enforcement(Backend.NOOP, frozenset(), verified=False, details={"note": "runs nothing"})

    def _respond(self, request: ExecRequest) -> RawResult:
        self.requests.append(request)
        return self._responder(request) if self._responder else RawResult(0)

    async def exec(self, request: ExecRequest) -> RawResult:
        return self._respond(request)

    async def spawn(self, request: ExecRequest) -> RawProcess:
        return NoopProcess(self._respond(request))

    async def pause(self) -> None:
        return None

    async def resume(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def destroy(self) -> None:
        return None

    async def read_file(self, path: str, max_bytes: int) -> bytes:
        if path not in self.files:
            raise ExecError(f"{path}: no such file in the noop sandbox")
        data = self.files[path]
        if len(data) > max_bytes:
            raise ExecError(f"{path}: larger than {max_bytes} bytes")
        return data


class NoopDriver(Driver):
    """Always available; isolates nothing."""

    backend = Backend.NOOP

    def __init__(self, responder: Responder | None = None) -> None:
        self.responder = responder

    def probe(self) -> ProbeResult:
        return ProbeResult(Backend.NOOP, True, "always available; runs nothing (score 0)", version=None)

    async def start(self, spec: LaunchSpec) -> Instance:
        return NoopInstance(spec, self.responder)


__all__ = ["NoopDriver", "NoopInstance", "NoopProcess", "Responder"]
