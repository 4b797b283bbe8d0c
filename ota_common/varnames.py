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


#: the response header of ``next`` (and of the device's configuration GET) that carries the hash of the
#: device's effective configuration: the agent fetches the configuration when it differs from the one it applied
CONFIG_HASH_HEADER = "X-VV-Config-Hash"
_CONFIG_HASH = re.compile(r"[0-9a-f]{64}")


def is_config_hash(value: object) -> bool:
    """A configuration hash: 64 lower-case hex digits (sha256), nothing else."""
    return isinstance(value, str) and _CONFIG_HASH.fullmatch(value) is not None
