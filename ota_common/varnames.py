"""The grammar of configuration variables and groups, shared by the update server (which stores them) and the
tools that read them from elsewhere (an Ansible inventory). Match with ``fullmatch``: ``$`` in a Python pattern
also matches before a trailing newline, and a name ending in a newline must not pass."""

from __future__ import annotations

import re

#: a variable name: letters, digits, ``_ . -``, not starting with a digit
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")
#: a group name
GROUP_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: the key of a ``vars`` mapping that lists the names of its secret values
SECRETS_KEY = "_secrets"
#: the longest value (characters)
MAX_VALUE = 64 * 1024
#: the most variables one device or group holds
MAX_VARS = 1000


def is_var_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def is_group_name(name: object) -> bool:
    return isinstance(name, str) and GROUP_RE.fullmatch(name) is not None
