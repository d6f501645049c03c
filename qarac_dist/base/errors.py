"""The two kinds of user mistake. Both are printed as one line per problem, with exit code 2."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix (a config value, a missing column): printed as one line, exit 2."""

    exit_code = 2
    """What the command exits with; a subclass that is no mistake of the user's says otherwise."""


class ConfigError(UserError):
    """One or more user mistakes in a config, each naming where it is: `file: dotted.key: what`."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))
