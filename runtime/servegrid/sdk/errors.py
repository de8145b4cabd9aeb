"""Errors a person fixes: bad config, bad graph. The CLI prints them as one line, exit 2."""

from __future__ import annotations


class UserError(Exception):
    """Something the user must fix; the message says what, where, and what to do."""


class ConfigError(UserError):
    pass


class GraphError(UserError):
    pass
