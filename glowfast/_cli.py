"""What the command-line entry points share: how they print warnings."""

from __future__ import annotations

import warnings


def plain_warnings() -> None:
    """Warnings as one ``warning: ...`` line on stderr, as the CLIs print their errors and notes, instead of Python's
    ``path:line: UserWarning: ...`` followed by the source line that raised it. Called only under ``__main__``: a
    library user's warnings keep Python's format."""
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"warning: {message}\n"
