"""The one exception type for bad user input.

A `KdlabError` carries a one-paragraph message that says what was wrong and what to do.
It subclasses Hydra's `CompactHydraException`, so the CLI prints just the message (no
traceback) and exits non-zero, the same way Hydra reports an unknown config option.
"""

from hydra.errors import CompactHydraException


class KdlabError(CompactHydraException):
    """A user-facing error: the message alone must tell the user how to fix the problem."""
