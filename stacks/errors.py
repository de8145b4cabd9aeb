"""The one error a stack raises for bad input: said before any resource is declared."""

from __future__ import annotations

from servegrid.sdk.errors import UserError


class StackConfigError(UserError):
    """Bad stack config (or a graph config that does not load): what, where, what to do."""
