"""The arm64 root filesystem: a cached ``mmdebstrap`` base, then the layers applied on a copy of it.

Speed (DESIGN.md §5): the initramfs is generated once, at the end of the bootstrap, with ``MODULES=list``
(``update-initramfs`` is diverted to ``true`` while packages install). The bootstrapped base is cached by
the hash of its inputs (suite, mirror, package list, initramfs module list, this recipe's version), so a
release that changes only files, templates, units or commands of a layer reuses it and takes seconds — while
the archive has nothing newer for its packages (:mod:`image.basecache` decides, and calls :func:`bootstrap`).

Applying layers uses host tools wherever possible (``systemctl --root``, ``useradd --root``, plain file
copies) and runs only the layers' own commands inside the rootfs, through qemu-user.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from ota_common.errors import ToolError, UserError
from ota_common.tools import require_tools, run

from .epoch import tool_env
from .layers import TREE_IGNORE, MergedLayers, tree_files

log = logging.getLogger(__name__)

#: bump when the bootstrap recipe below changes, so cached bases are rebuilt
RECIPE_VERSION = "1"
ARCH = "arm64"
#: SOURCE_DATE_EPOCH of every bootstrap (2023-01-01), whatever the release: mmdebstrap and mkinitramfs then
#: give the same bytes for the same packages, so a base bootstrapped again for one more package differs from
#: the old one only by that package (the initrd, dpkg's database and every generated file stay identical),
#: and base files are never newer than a release's epoch. (Bases cached before this was fixed are still
#: valid: only their timestamps and initrd bytes depend on when they were made.)
BASE_EPOCH = 1672531200


INITRAMFS_CONFIG = "/etc/initramfs-tools/"


@dataclass(frozen=True)
class BaseSpec:
    """What the cached base depends on. The layers' files under ``/etc/initramfs-tools/`` (the module list,
    hook and boot scripts) belong here: the initramfs is generated once, inside the bootstrap."""

    suite: str
    mirror: str
    packages: tuple[str, ...]
    initramfs_files: tuple[tuple[str, bytes, int], ...] = ()  # (dest, content, mode)

    @property
    def key(self) -> str:
        files = [[dest, hashlib.sha256(data).hexdigest(), mode] for dest, data, mode in self.initramfs_files]
        doc = json.dumps(
            {"recipe": RECIPE_VERSION, "arch": ARCH, "suite": self.suite, "mirror": self.mirror,
             "packages": sorted(self.packages), "initramfs": files},
            sort_keys=True,
        )
        return hashlib.sha256(doc.encode()).hexdigest()[:20]


def check_arm64_emulation() -> None:
    """arm64 programs must run here (qemu-user through binfmt_misc): the bootstrap and the layers' commands run
    them. Raises :class:`ToolError` with what to install or enable."""
    require_tools(["arch-test"], "checking that arm64 programs run here")
    proc = run(["arch-test", ARCH], stage="arm64 emulation check", check=False, timeout=60)
    if proc.returncode != 0:
        said = (proc.stdout + proc.stderr).decode(errors="replace").strip()
        raise ToolError(f"arm64 programs cannot run on this machine ({said}): apt-get install qemu-user-static "
                        "binfmt-support, then update-binfmts --enable qemu-aarch64 (scripts/install.sh does both)")


def base_spec(suite: str, mirror: str, merged: MergedLayers) -> BaseSpec:
    files = tuple(sorted((f.dest, f.source.read_bytes(), f.mode) for f in merged.files
                         if f.dest.startswith(INITRAMFS_CONFIG) and not f.template))
    return BaseSpec(suite, mirror, merged.packages, files)


def base_path(spec: BaseSpec, cache_dir: Path) -> Path:
    """Where the base tarball for ``spec`` is cached (:mod:`image.basecache` keeps its record next to it)."""
    return cache_dir / "base" / f"{spec.suite}-{ARCH}-{spec.key}.tar"


def bootstrap(spec: BaseSpec, cache_dir: Path, progress: Callable[[str], None] = lambda msg: None, *,
              force: bool = False) -> Path:
    """The cached base tarball for ``spec``, bootstrapping it when missing or when ``force`` (several minutes;
    mmdebstrap's stage lines, such as "installing remaining packages inside the chroot", go to ``progress``).
    A forced bootstrap replaces the cached tarball only once it is complete. Whether a cached base is still
    current is :func:`image.basecache.ensure_base`'s decision."""
    target = base_path(spec, cache_dir)
    if target.exists() and not force:
        log.info("base rootfs from cache: %s", target)
        progress(f"from the build cache ({target.name})")
        return target
    progress(f"bootstrapping {spec.suite} {ARCH} with {len(spec.packages)} packages "
             "(about 6 minutes on 2 cores; later builds reuse it)")
    require_tools(["mmdebstrap"], "bootstrapping the base rootfs")
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_suffix(".initramfs")
    if staged.exists():
        shutil.rmtree(staged)
    copy_hooks = []
    for i, (dest, data, fmode) in enumerate(spec.initramfs_files):
        src = staged / str(i)
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(data)
        copy_hooks.append(f"--customize-hook=mkdir -p \"$1{os.path.dirname(dest)}\" && cp {src} \"$1{dest}\""
                          f" && chmod {fmode:o} \"$1{dest}\"")
    tmp = target.with_suffix(".tmp.tar")
    mode = "root" if os.geteuid() == 0 else "unshare"
    args = [
        "mmdebstrap", f"--arch={ARCH}", "--variant=minbase", f"--mode={mode}", "--format=tar",
        f"--include={','.join(spec.packages)}",
        "--essential-hook=chroot \"$1\" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs"
        " && ln -sf /bin/true \"$1/usr/sbin/update-initramfs\"",
        "--customize-hook=rm \"$1/usr/sbin/update-initramfs\""
        " && chroot \"$1\" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs",
        "--customize-hook=sed -i 's/^MODULES=.*/MODULES=list/' \"$1/etc/initramfs-tools/initramfs.conf\"",
        *copy_hooks,
        "--customize-hook=chroot \"$1\" update-initramfs -c -k all",
        "--customize-hook=rm -rf \"$1/var/lib/apt/lists\"/*_* \"$1/var/cache/apt\"/*.bin",
        spec.suite, str(tmp),
    ]
    if spec.mirror:
        args.append(spec.mirror)
    run(args, stage="bootstrap (mmdebstrap)", timeout=3600, env={"SOURCE_DATE_EPOCH": str(BASE_EPOCH)},
        on_stderr_line=_mmdebstrap_stages(progress))
    tmp.replace(target)
    return target


def _mmdebstrap_stages(progress: Callable[[str], None]) -> Callable[[str], None]:
    """mmdebstrap's info lines (``I: downloading packages with apt...``) as progress; hooks by their kind only,
    a stage said once however many lines repeat it."""
    last = [""]

    def on_line(line: str) -> None:
        if not line.startswith("I: "):
            return
        text = line[3:].strip()
        if text.startswith("running --"):
            text = text.split(":", 1)[0].split(" directly")[0].split(" in shell")[0]
        if text != last[0]:
            last[0] = text
            progress("mmdebstrap: " + text[:120])

    return on_line


def extract(base: Path, root: Path, *, epoch: int | None = None) -> None:
    """Unpack a base tarball into an empty directory, keeping owners and modes (tar runs at the build's
    ``epoch``, like every program of a build)."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    run(["tar", "--extract", "--numeric-owner", "--same-owner", "--preserve-permissions", "--file", base,
         "--directory", root], stage="unpack base rootfs", env=tool_env(epoch))


def _ids(root: Path, owner: str) -> tuple[int, int]:
    user, _, group = owner.partition(":")
    group = group or user

    def lookup(db: str, name: str) -> int:
        for line in (root / "etc" / db).read_text().splitlines():
            fields = line.split(":")
            if fields and fields[0] == name:
                return int(fields[2])
        raise UserError(f"owner {owner!r}: no {'user' if db == 'passwd' else 'group'} {name!r} in the rootfs")

    return lookup("passwd", user), lookup("group", group)


def _inside(root: Path, dest: str) -> Path:
    path = root / dest.lstrip("/")
    # a symlinked parent inside the rootfs must not lead outside it
    real_parent = path.parent.resolve()
    if not real_parent.is_relative_to(root.resolve()):
        raise UserError(f"{dest} resolves outside the rootfs")
    return path


def render_template(source: Path, context: Mapping[str, Any], where: str = "") -> str:
    """A layer template rendered with ``context`` (see :func:`image.build.template_context`); an undefined name is
    an error. Raises :class:`UserError` naming the template (and ``where``, e.g. its layer)."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    try:
        return env.from_string(source.read_text()).render(**context)
    except jinja2.TemplateError as e:
        raise UserError(f"template {source}{f' ({where})' if where else ''}: {e}") from None


def apply_layers(root: Path, merged: MergedLayers, context: Mapping[str, Any], *, epoch: int | None = None) -> None:
    """Groups, users, files, trees, templates, units, then commands — in that order. The programs run at the
    build's ``epoch`` (useradd dates /etc/shadow by it; a layer's command may stamp files)."""
    env = tool_env(epoch)
    for g in merged.groups:
        if not _has(root / "etc/group", g.name):
            run(["groupadd", "--root", root, *(["--system"] if g.system else []), g.name], stage=f"group {g.name}",
                env=env)
    for u in merged.users:
        if not _has(root / "etc/passwd", u.name):
            args: list[str] = ["useradd", "--root", str(root), "--shell", u.shell]
            # a group of the user's name declared by a layer becomes its primary group
            args += ["--gid", u.name] if _has(root / "etc/group", u.name) else ["--user-group"]
            if u.system:
                args.append("--system")
            if u.home:
                args += ["--home-dir", u.home, "--create-home"]
            if u.groups:
                args += ["--groups", ",".join(u.groups)]
            run([*args, u.name], stage=f"user {u.name}", env=env)
    for f in merged.files:
        dest = _inside(root, f.dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        if f.template:
            dest.write_text(render_template(f.source, context, f"layer {f.layer}"))
        else:
            shutil.copyfile(f.source, dest)
        os.chmod(dest, f.mode)
        os.chown(dest, *_ids(root, f.owner))
    for t in merged.trees:
        dest = _inside(root, t.dest)
        shutil.copytree(t.source, dest, dirs_exist_ok=True, symlinks=True, ignore=shutil.ignore_patterns(*TREE_IGNORE))
        uid, gid = _ids(root, t.owner)
        for p in [dest, *(dest / p.relative_to(t.source) for p in tree_files(t.source))]:
            os.lchown(p, uid, gid)
            # copytree keeps the source's times, which are the checkout's (and a directory's moves whenever
            # Python writes a __pycache__ into it): what a layer puts in the image is this build's, like its
            # files, so that normalise() stamps it with the release's epoch
            os.utime(p, None, follow_symlinks=False)
    if merged.enable:
        run(["systemctl", f"--root={root}", "enable", *merged.enable], stage="enable units", env=env)
    if merged.mask:
        run(["systemctl", f"--root={root}", "mask", *merged.mask], stage="mask units", env=env)
    for layer, command in merged.commands:
        run(["chroot", root, "/bin/sh", "-c", command], stage=f"command of layer {layer}: {command}", env=env)


def _has(db: Path, name: str) -> bool:
    return any(line.split(":", 1)[0] == name for line in db.read_text().splitlines())


def place_kernel(root: Path) -> str:
    """Fixed names in /boot for the boot script: Image, initrd.img, dtbs/. Returns the kernel version."""
    boot = root / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise UserError(f"expected one kernel in /boot, found {[k.name for k in kernels]}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    initrd = boot / f"initrd.img-{version}"
    if not initrd.exists():
        raise UserError(f"no initramfs for kernel {version}")
    shutil.copyfile(kernels[0], boot / "Image")  # Debian's arm64 vmlinuz is an uncompressed Image
    shutil.copyfile(initrd, boot / "initrd.img")
    dtbs = root / "usr" / "lib" / f"linux-image-{version}"
    if dtbs.is_dir():
        shutil.copytree(dtbs, boot / "dtbs", dirs_exist_ok=True)
    return version


def normalise(root: Path, epoch: int | None, touched_since: float | None = None) -> None:
    """Remove per-machine and per-build state and clamp timestamps, for reproducible, shareable images.

    With ``touched_since`` (the time the base was unpacked), only what this build created or changed is
    clamped to ``epoch``; files and directories as the cached base has them keep their times, which come
    from the base (an input of the build), not from the clock. That is what keeps two releases on the same
    base delta-friendly: with different epochs, clamping every file the bootstrap created (dpkg's lists,
    compiled Python, generated configuration: ~17,000 entries) would change all their inodes."""
    (root / "etc/machine-id").write_text("")  # systemd creates one on first boot
    for rel in ("var/lib/dbus/machine-id",):
        (root / rel).unlink(missing_ok=True)
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    for d in ("var/log", "var/cache/apt", "var/lib/apt/lists", "tmp", "var/tmp"):
        p = root / d
        if p.is_dir():
            for child in p.rglob("*"):
                if child.is_file() and not child.is_symlink():
                    child.unlink()
    if epoch is None:
        return

    def clamp(entry: str) -> None:
        mtime = os.lstat(entry).st_mtime
        if (mtime > epoch) if touched_since is None else (mtime >= touched_since):
            os.utime(entry, (epoch, epoch), follow_symlinks=False)

    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            clamp(os.path.join(dirpath, name))
    clamp(str(root))


def package_list(root: Path) -> list[dict[str, str]]:
    """The exact Debian packages in the rootfs (software bill of materials)."""
    return dpkg_packages((root / "var/lib/dpkg/status").read_text())


def dpkg_packages(status: str) -> list[dict[str, str]]:
    """The installed packages of a dpkg status file (name, version, architecture), by name."""
    out = []
    for stanza in status.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line.startswith(" ")
        )
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            out.append({"name": fields["Package"], "version": fields.get("Version", ""),
                        "architecture": fields.get("Architecture", "")})
    return sorted(out, key=lambda p: p["name"])


__all__ = ["BaseSpec", "apply_layers", "base_path", "base_spec", "bootstrap", "dpkg_packages", "extract", "normalise",
           "package_list", "place_kernel", "render_template"]
