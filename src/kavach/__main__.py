"""``python -m kavach``: the ``kavach`` command, for an interpreter without the console script on PATH."""

from __future__ import annotations

import sys

from kavach.cli import main

if __name__ == "__main__":
    sys.exit(main())
