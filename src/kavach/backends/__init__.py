"""Isolation backends: the driver interface, the registry and one module per backend."""

from kavach.backends.names import Backend

__all__ = ["Backend"]
