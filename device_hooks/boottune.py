"""Local boot tuning: variables of the boot-state environment that ``boot.scr`` honours besides the A/B state.

- ``ota_bootargs``: extra kernel arguments, put *before* the image's own (``root=``, ``console=``, ``panic=``,
  ``ota.slot=``...), which come last and so win wherever the kernel or the agent takes the last value.
- ``ota_console``: the console device instead of the board's (``ttyAMA0,115200``).
- ``ota_fdt_disable``: device-tree node paths whose ``status`` becomes ``disabled``.
- ``ota_fdt_delprop``: ``/node/path:property`` items whose property is deleted.

They are for whoever holds the device or a copy of its image (a per-board quirk, an emulator's missing
hardware), set with ``fw_setenv``; never by the agent and never from the server: :meth:`BootEnv.update
<device_hooks.bootenv.BootEnv.update>` refuses them, the agent's A/B writes keep them as they are, and the
server's configuration variables cannot name them (:mod:`.envvars` takes upper-case names only).

The grammar is strict and checked here when a value is written (:func:`check`, :func:`fw_setenv_script`);
``boot.scr`` checks each value again against the characters of :data:`BOOT_SCR_CHARS` (U-Boot's regular
expressions have no ranges, so the sets are spelled out) and ignores a value with any other character, so a
hand-edited environment cannot inject U-Boot commands.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping

from ota_common.errors import BootEnvError

BOOTARGS = "ota_bootargs"
CONSOLE = "ota_console"
FDT_DISABLE = "ota_fdt_disable"
FDT_DELPROP = "ota_fdt_delprop"
NAMES = (BOOTARGS, CONSOLE, FDT_DISABLE, FDT_DELPROP)
MAX_LEN = 1024

_ALNUM = string.ascii_letters + string.digits
#: per variable: the characters boot.scr accepts (a space separates items of the list variables)
BOOT_SCR_CHARS = {
    BOOTARGS: _ALNUM + "_.,:/=+@- ",
    CONSOLE: _ALNUM + ",",
    FDT_DISABLE: _ALNUM + ",._+@/- ",
    FDT_DELPROP: _ALNUM + ",._+@/-:# ",
}

#: one kernel argument: a name (``clk_ignore_unused``, ``modprobe.blacklist``), optionally ``=value``
_ARG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}(=[A-Za-z0-9_.,:/=+@-]{1,256})?")
#: the image's own arguments: the root, the init, the hang reboot, the console, the A/B state
PROTECTED_ARGS = frozenset({"root", "rootfstype", "rootwait", "rw", "ro", "init", "rdinit", "panic", "console"})
_CONSOLE = re.compile(r"tty[A-Za-z]{1,8}[0-9]{1,3}(,[0-9]{2,7}[noe]?[5-8]?)?")
#: a device-tree node path: ``/``-separated node names (``name[@unit]``, DT spec characters)
_NODE = r"(/[A-Za-z0-9,._+-]{1,31}(@[A-Za-z0-9,._+-]{1,31})?){1,16}"
_PATH = re.compile(_NODE)
_PROP = re.compile(_NODE + r":[A-Za-z0-9,._+#-]{1,31}")
#: properties whose deletion would make the device tree unusable rather than tune a device
_PROTECTED_PROPS = frozenset({"compatible", "reg", "#address-cells", "#size-cells", "ranges", "phandle"})


def check(name: str, value: str) -> None:
    """Raise :class:`BootEnvError` unless ``value`` is valid for the tuning variable ``name`` (empty clears)."""
    if name not in NAMES:
        raise BootEnvError(f"{name!r} is not a boot tuning variable ({', '.join(NAMES)})")
    if len(value) > MAX_LEN:
        raise BootEnvError(f"{name}: {len(value)} characters, at most {MAX_LEN}")
    bad = sorted(set(value) - set(BOOT_SCR_CHARS[name]))
    if bad:
        raise BootEnvError(f"{name}: characters not allowed: {''.join(bad)!r}")
    if value != " ".join(value.split()):
        raise BootEnvError(f"{name}: items are separated by single spaces")
    for item in value.split():
        if name == BOOTARGS:
            if not _ARG.fullmatch(item):
                raise BootEnvError(f"{name}: {item!r} is not a kernel argument (name or name=value)")
            arg = item.partition("=")[0]
            if arg in PROTECTED_ARGS or arg.startswith("ota."):
                hint = f" (use {CONSOLE})" if arg == "console" else ""
                raise BootEnvError(f"{name}: {arg!r} is the image's own kernel argument{hint}")
        elif name == CONSOLE:
            if not _CONSOLE.fullmatch(item) or " " in value:
                raise BootEnvError(f"{name}: {value!r} is not a console (ttyNAME<n>[,baud[parity][bits]])")
        elif name == FDT_DISABLE:
            if not _PATH.fullmatch(item):
                raise BootEnvError(f"{name}: {item!r} is not a device-tree node path (/soc/mmc@7e300000)")
        elif not _PROP.fullmatch(item):
            raise BootEnvError(f"{name}: {item!r} is not /node/path:property")
        elif item.rpartition(":")[2] in _PROTECTED_PROPS:
            raise BootEnvError(f"{name}: deleting {item.rpartition(':')[2]!r} would break the node, not tune it")


def fw_setenv_script(values: Mapping[str, str]) -> str:
    """The ``fw_setenv -s`` script setting ``values`` (an empty value deletes the variable: ``name=``), after checking
    every value. Raises :class:`BootEnvError` for the first invalid one."""
    lines = []
    for name, value in values.items():
        check(name, value)
        lines.append(f"{name}={value}")  # libubootenv 0.3.2 deletes on "name=", not on a bare "name"
    return "".join(line + "\n" for line in lines)


__all__ = ["BOOTARGS", "BOOT_SCR_CHARS", "CONSOLE", "FDT_DELPROP", "FDT_DISABLE", "NAMES", "PROTECTED_ARGS",
           "check", "fw_setenv_script"]
