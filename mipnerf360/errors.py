"""The package's one error type for user-facing problems.

Every problem a user can fix (a missing or corrupt file, a bad config value, a busy run
folder, a full disk) is raised as a ``UserError`` (or a subclass named for where it
arises) whose message names the file or key and the problem. ``cli.main`` catches it once
and prints one line: exit 1, or 2 for configuration and usage errors (``ConfigError``).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names the culprit. Exit code 1."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """A config file, override or command-line value names an unknown key or a bad value."""

    exit_code = 2
