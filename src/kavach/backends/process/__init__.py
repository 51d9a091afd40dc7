"""The Process backend: kavach's native Linux sandbox engine.

See ``docs/process.md``. Public entry point: :class:`ProcessDriver`.
"""

from kavach.backends.process.driver import ProcessDriver, ProcessInstance

__all__ = ["ProcessDriver", "ProcessInstance"]
