"""The failures a user fixes (a bad spec, a bad data line, a model not there yet)."""

from __future__ import annotations


class UserError(Exception):
    """Printed as `error: MESSAGE` with exit status 2 and no traceback."""
