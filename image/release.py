"""``build.py release``: everything for a release into ``out/<version>/``.

:func:`build_release` checks everything it can before building (configuration and layers, all errors at once;
keys and server settings; the previous release's artifacts; the tools), gathers it into a
:class:`BuildContext`, then runs :data:`STEPS`, a straight list of small step functions ``step(ctx)``, each
timed (:class:`ota_common.progress.Steps`) and returning early when its :class:`Stage` was not asked for:

    base rootfs (reuse the cached base, or bootstrap it when missing or out of date: :mod:`image.basecache`) → layers (the rootfs tree: layers, kernel, normalisation)
    → ``rootfs.ext4`` (one for every board) → per board: boot partition, ``disk.img``, ``disk.img.bmap``,
    ``disk.img.gz`` (for a board Raspberry Pi Imager knows also the Imager file :data:`image.imager.IMAGER_FILE`
    for ``disk.img.gz``), the SBOM ``sbom.cdx.json`` and the signed artifact ``<name>-<version>-<board>.mender``
    (its header carries the SBOM's sha256) → deltas from the previous release → ``provenance.intoto.json`` (signed
    SLSA provenance of the outputs) → ``manifest.json`` (not timed: it records the timings).

The release's ``SOURCE_DATE_EPOCH`` (:attr:`BuildContext.epoch`) is passed to each step's tools, never written
into ``os.environ`` (:mod:`image.epoch`).
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from artifacts.compression import ParallelGzipEncoder
from artifacts.format import Compression
from artifacts.keys import Signer, Verifier
from ota_common.errors import UserError
from ota_common.files import sha256_file
from ota_common.progress import Steps
from ota_common.tools import require_tools

from . import rootfs as rootfs_mod
from .basecache import BaseInfo, BasePolicy, ensure_base
from .build import build_disk, firmware_files, template_context
from .config import BoardModel, ReleaseModel, load_board, load_release, with_overrides
from .disk import DiskLayout, make_ext4, plan_layout
from .epoch import release_epoch
from .imager import IMAGER_FILE, check_url_base, write_imager_file
from .layers import Layer, MergedLayers, load_layers, merge_layers, tree_files
from .manifest import (
    MANIFEST,
    BaseEntry,
    BoardEntry,
    DiskEntry,
    OutputEntry,
    PackageEntry,
    PreviousRelease,
    ReleaseManifest,
    TrustEntry,
)
from .trust import ImageTrust, check_server_url, install_trust, load_trust

if TYPE_CHECKING:
    from artifacts.delta import DeltaStats

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "release.yaml"
TOOLS = ["mmdebstrap", "mkfs.ext4", "debugfs", "mkfs.vfat", "mcopy", "mmd", "sfdisk", "bmaptool", "mkimage", "dpkg-deb"]


class Stage(enum.Enum):
    """How far a build goes: the rootfs (``build.py rootfs``), the disk images (``build.py image``), the
    artifacts (``build.py release``). Each needs the ones before it."""

    ROOTFS = "rootfs"
    IMAGES = "images"
    ARTIFACTS = "artifacts"


ALL_STAGES = frozenset(Stage)


def stage_set(stages: Iterable[Stage | str]) -> frozenset[Stage]:
    """Stages given as members or by their values (``"images"``). Raises :class:`ValueError` for an unknown one."""
    return frozenset(Stage(s) for s in stages)


def preflight() -> None:
    """What a build needs, checked in a fraction of a second before any work: the programs (with the packages
    that provide them) and arm64 emulation. Raises :class:`ToolError`."""
    require_tools(TOOLS, "building a release")
    rootfs_mod.check_arm64_emulation()


@contextmanager
def cache_lock(cache: Path, progress: Callable[[str], None] = lambda msg: None) -> Iterator[None]:
    """One build at a time per build cache: two would share its work tree and its bootstrap's temporary tar.
    A second build waits (and says so) until the first is done."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another build that uses the build cache {cache}")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def default_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vv-ota"


@dataclass
class ReleaseResult:
    version: str
    out_dir: Path
    outputs: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def layer_hash(layer: Layer) -> str:
    """Hash of a layer file and every source it references (of a tree, what the image gets of it)."""
    h = hashlib.sha256(layer.path.read_bytes())
    m = layer.model
    for entry in (*m.files, *m.templates):
        h.update(entry.src.encode() + b"\0" + layer.source(entry.src).read_bytes())
    for tree in m.trees:
        src = layer.source(tree.src)
        for p in tree_files(src):
            h.update(str(p.relative_to(src)).encode() + b"\0")
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


@dataclass
class BuildContext:
    """What the steps read (the checked inputs of one build), and what earlier steps leave for later ones."""

    release: ReleaseModel
    trust: ImageTrust
    boards: dict[str, BoardModel]
    layers: list[Layer]
    merged: MergedLayers
    spec: rootfs_mod.BaseSpec
    layout: DiskLayout
    stages: frozenset[Stage]
    signer: Signer | None
    previous: PreviousRelease | None
    cache: Path
    #: the release's SOURCE_DATE_EPOCH, given to every tool that stamps times
    epoch: int
    out_dir: Path
    steps: Steps
    started: float  # time.monotonic() when the build began
    base_policy: BasePolicy = field(default_factory=BasePolicy)
    #: where Raspberry Pi Imager downloads the compressed images from (None: the local files)
    image_url_base: str | None = None
    # left by the steps
    outputs: dict[str, Path] = field(default_factory=dict)
    base: Path | None = None
    base_info: BaseInfo | None = None
    kernel: str = ""
    packages: list[dict[str, str]] = field(default_factory=list)
    deltas: dict[str, dict[str, Any]] = field(default_factory=dict)
    sboms: dict[str, Path] = field(default_factory=dict)  # by board
    config: Path = DEFAULT_CONFIG

    @property
    def artifact_name(self) -> str:
        return f"{self.release.name}-{self.release.version}"

    @property
    def work(self) -> Path:
        return self.cache / "work" / self.release.name

    @property
    def root(self) -> Path:
        return self.work / "root"

    @property
    def rootfs_image(self) -> Path:
        return self.out_dir / "rootfs.ext4"

    def full_artifact(self, board: str) -> Path:
        return self.out_dir / f"{self.artifact_name}-{board}.mender"


def build_release(
    *,
    config: Path = DEFAULT_CONFIG,
    version: str | None = None,
    boards: Sequence[str] = (),
    signer: Signer | None = None,
    unsigned: bool = False,
    out: Path = Path("out"),
    cache_dir: Path | None = None,
    server_url: str | None = None,
    security_version: int | None = None,
    server_ca: Path | None = None,
    insecure_http: bool | None = None,
    progress: Callable[[str], None] = lambda msg: None,
    stages: Iterable[Stage | str] = ALL_STAGES,
    previous: Path | None = None,
    epoch: int | None = None,
    base_policy: BasePolicy | None = None,
    image_url_base: str | None = None,
) -> ReleaseResult:
    """Build a release, or only its first ``stages`` (:class:`Stage` members or their values: ``rootfs``;
    ``rootfs`` + ``images``) for debugging.

    The image trusts ``signer``'s public key (and the configuration's ``trusted_keys``). Without a signer the
    image trusts no key and refuses every update, so that must be asked for with ``unsigned=True``.
    ``security_version``, ``server_ca`` (a PEM file of certificates) and ``insecure_http`` replace the
    configuration's values when given. ``previous``: the output directory of the release this one updates
    from (delta artifacts from it). ``epoch``: the release's SOURCE_DATE_EPOCH (default: ``$SOURCE_DATE_EPOCH``,
    else the last commit's time). ``base_policy``: when the cached base rootfs is rebuilt (default: when the
    archive has newer versions of its packages or it is a week old; :mod:`image.basecache`).
    ``image_url_base``: the URL the Raspberry Pi Imager file points at for boards Imager knows
    (:mod:`image.imager`; default: the local file). Raises :class:`UserError` for bad configuration, keys, server settings or
    previous release (:class:`image.trust.InsecureServerError` for a plain http server URL that is not allowed),
    all before anything is built; :class:`ToolError` for tools."""
    if signer is None and not unsigned:
        raise UserError("no release key to sign with: an image built without one trusts no release key and refuses "
                        "every update; give a signer, or ask for an unsigned image explicitly (unsigned=True)")
    if signer is not None and unsigned:
        raise UserError("an unsigned image was asked for, but with a release key to sign it: choose one")
    wanted = stage_set(stages)
    cache = cache_dir or default_cache_dir()
    with cache_lock(cache, progress):
        from artifacts.writer import pinned_epoch

        started = time.monotonic()
        release = _release_config(config, version=version, boards=boards, server_url=server_url,
                                  security_version=security_version, insecure_http=insecure_http)
        trust = load_trust(release, config.parent, signer, server_ca=server_ca, config=str(config))
        for line in (*check_server_url(release.server_url, insecure_http=release.insecure_http,
                                       server_ca=trust.server_ca is not None, config=str(config)), *trust.notes):
            progress(line)
        if not trust.signed:
            progress("unsigned image: it trusts no release key and refuses every update (its boot script and "
                     "ota.conf say so)")
        board_models = {b: load_board(b) for b in release.boards}
        layers = load_layers([config.parent / "layers" / f"{n}.yaml" for n in release.layers])
        merged = merge_layers(layers)
        prev = PreviousRelease.load(previous) if previous is not None else None
        if prev is not None and Stage.ARTIFACTS in wanted:
            # fail before the build, not after it, when a delta could not be made from the previous artifacts
            check_previous_artifacts(prev.path, prev, board_models, trust.verifiers())
        if image_url_base is not None:
            check_url_base(image_url_base)
        preflight()
        out_dir = (out / release.version).absolute()
        out_dir.mkdir(parents=True, exist_ok=True)
        ctx = BuildContext(
            release=release, trust=trust, boards=board_models, layers=layers, merged=merged,
            spec=rootfs_mod.base_spec(release.suite, release.mirror, merged),
            layout=plan_layout(slot_mib=release.slot_size_mib, boot_mib=release.boot_size_mib,
                               data_mib=release.data_size_mib, seed=release.name),
            stages=wanted, signer=signer, previous=prev, cache=cache,
            epoch=release_epoch(REPO) if epoch is None else epoch,
            out_dir=out_dir, steps=Steps(progress), started=started, config=config,
            base_policy=base_policy or BasePolicy(), image_url_base=image_url_base)
        with pinned_epoch(ctx.epoch):  # the artifact writers' clock, for this build only
            for step in STEPS:
                step(ctx)
        return ReleaseResult(release.version, out_dir, dict(ctx.outputs), dict(ctx.steps.timings))


def _release_config(config: Path, *, version: str | None, boards: Sequence[str], server_url: str | None,
                    security_version: int | None, insecure_http: bool | None) -> ReleaseModel:
    """The release configuration with what the caller gave replaced. Raises :class:`UserError`."""
    overrides: dict[str, Any] = {}
    if version:
        overrides["version"] = version
    if boards:
        overrides["boards"] = tuple(boards)
    for key, value in (("server_url", server_url), ("security_version", security_version),
                       ("insecure_http", insecure_http)):
        if value is not None:
            overrides[key] = value
    return with_overrides(load_release(config), overrides)


# ---------------------------------------------------------------------------------------------------------
# the steps, in order


def base_rootfs(ctx: BuildContext) -> None:
    with ctx.steps.step("base rootfs") as note:
        ctx.base, ctx.base_info = ensure_base(ctx.spec, ctx.cache, ctx.base_policy, progress=note)


def rootfs_tree(ctx: BuildContext) -> None:
    """The base unpacked, the layers and the trust settings applied, the kernel placed, times normalised."""
    assert ctx.base is not None, "the base rootfs step runs first"
    with ctx.steps.step("layers"):
        unpacked = time.time() - 2  # file times have a coarse clock: anything from here on is this build's
        rootfs_mod.extract(ctx.base, ctx.root, epoch=ctx.epoch)
        variables = {**ctx.merged.variables, **ctx.release.variables}
        context = template_context(ctx.release, ctx.layout, variables, signed=ctx.trust.signed,
                                   config_variables=ctx.merged.config_variables,
                                   required_config=ctx.merged.required_config,
                                   config_placeholders=ctx.merged.config_placeholders,
                                   server_ca=ctx.trust.server_ca is not None)
        rootfs_mod.apply_layers(ctx.root, ctx.merged, context, epoch=ctx.epoch)
        install_trust(ctx.root, ctx.trust)
        ctx.kernel = rootfs_mod.place_kernel(ctx.root)
        ctx.packages = rootfs_mod.package_list(ctx.root)
        rootfs_mod.normalise(ctx.root, ctx.epoch, touched_since=unpacked)


def rootfs_image(ctx: BuildContext) -> None:
    with ctx.steps.step("rootfs.ext4"):
        make_ext4(ctx.rootfs_image, ctx.root, size_mib=ctx.release.slot_size_mib, label="rootfs",
                  seed=f"{ctx.release.name}:rootfs", clamp_mtime=False, epoch=ctx.epoch)
        ctx.outputs["rootfs.ext4"] = ctx.rootfs_image


def board_outputs(ctx: BuildContext) -> None:
    """Per board, its disk image, then its artifact."""
    if Stage.IMAGES not in ctx.stages:
        return
    data_files = _data_partition_files(ctx)
    for board in ctx.boards:
        disk_image(ctx, board, data_files)
        board_sbom(ctx, board)
        full_artifact(ctx, board)


def _data_partition_files(ctx: BuildContext) -> dict[str, bytes]:
    """What the agent knows about the factory slot A (an installed slot gets the same record from its
    artifact), for the data partition."""
    from artifacts.writer import SECURITY_VERSION_KEY

    release = ctx.release
    slot_a = {"artifact_name": ctx.artifact_name,
              "provides": {"artifact_name": ctx.artifact_name, "rootfs-image.version": release.version,
                           SECURITY_VERSION_KEY: str(release.security_version),
                           "rootfs-image.checksum": sha256_file(ctx.rootfs_image)}}
    return {"ota/slots.json": (json.dumps({"2": slot_a}, indent=1, sort_keys=True) + "\n").encode()}


def disk_image(ctx: BuildContext, board_name: str, data_files: dict[str, bytes]) -> None:
    board = ctx.boards[board_name]
    release = ctx.release
    with ctx.steps.step(f"{board_name}: disk image"):
        files = firmware_files(board, ctx.work / board_name, ctx.cache, root=ctx.root, mirror=release.mirror,
                               suite=release.suite, offline=ctx.base_policy.offline)
        image = build_disk(board_name=board_name, board=board, layout=ctx.layout, rootfs_image=ctx.rootfs_image,
                           boot_files=files, out_dir=ctx.out_dir / board_name, seed=release.name,
                           signed=ctx.trust.signed, data_files=data_files, epoch=ctx.epoch)
        gz = image.disk.with_name("disk.img.gz")
        _gzip(image.disk, gz)
        ctx.outputs.update({f"{board_name}/disk.img": image.disk, f"{board_name}/disk.img.bmap": image.bmap,
                            f"{board_name}/disk.img.gz": gz})
    if board.imager_devices:
        with ctx.steps.step(f"{board_name}: Raspberry Pi Imager file"):
            # the gzip the release writes anyway (Imager reads gz, xz, zstd and zip): xz -T0 took 10 min more
            listing = write_imager_file(image.disk.parent / IMAGER_FILE, disk=image.disk, compressed=gz,
                                        devices=board.imager_devices,
                                        name=f"{release.name} {release.version} ({board_name})",
                                        description=f"Debian {release.suite} arm64 with A/B slots and OTA updates",
                                        release_date=ctx.epoch, url_base=ctx.image_url_base)
            ctx.outputs[f"{board_name}/{IMAGER_FILE}"] = listing


def board_sbom(ctx: BuildContext, board_name: str) -> None:
    """``<board>/sbom.cdx.json``, written with the artifacts (whose header carries its sha256). Not timed: it
    takes milliseconds."""
    if Stage.ARTIFACTS not in ctx.stages:
        return
    from .sbom import SBOM, make_sbom

    path = ctx.out_dir / board_name / SBOM
    path.write_bytes(make_sbom(name=ctx.release.name, version=ctx.release.version, board=board_name,
                               device_type=ctx.boards[board_name].device_type, suite=ctx.release.suite,
                               kernel=ctx.kernel, epoch=ctx.epoch, packages=ctx.packages, layers=ctx.layers))
    ctx.sboms[board_name] = path
    ctx.outputs[f"{board_name}/{SBOM}"] = path


def full_artifact(ctx: BuildContext, board_name: str) -> None:
    if Stage.ARTIFACTS not in ctx.stages:
        return
    from artifacts.writer import rootfs_image_spec, write_artifact

    release = ctx.release
    with ctx.steps.step(f"{board_name}: artifact"):
        art = ctx.full_artifact(board_name)
        write_artifact(rootfs_image_spec(file=ctx.rootfs_image, name=ctx.artifact_name,
                                         device_types=[ctx.boards[board_name].device_type],
                                         software_version=release.version, security_version=release.security_version,
                                         sbom_sha256=sha256_file(ctx.sboms[board_name])),
                       art, compression=Compression(release.compression), signer=ctx.signer)
        ctx.outputs[art.name] = art


def deltas(ctx: BuildContext) -> None:
    """Delta artifacts from the previous release's full artifacts (timed per board)."""
    if ctx.previous is None:
        return
    full = {b: ctx.full_artifact(b) for b in ctx.boards if ctx.full_artifact(b).name in ctx.outputs}
    if not full:
        return
    ctx.deltas = write_release_deltas(ctx.previous.path, ctx.previous, full, ctx.out_dir, ctx.work / "delta",
                                      signer=ctx.signer, verifiers=ctx.trust.verifiers(), steps=ctx.steps)
    ctx.outputs.update({entry["file"]: ctx.out_dir / entry["file"] for entry in ctx.deltas.values()})


def provenance(ctx: BuildContext) -> None:
    """``provenance.intoto.json``: the SLSA provenance of the artifacts, disk images and SBOMs, in a DSSE envelope
    signed with the release key (unsigned for an unsigned release)."""
    if Stage.ARTIFACTS not in ctx.stages:
        return
    from artifacts.provenance import sign_envelope, statement

    from .provenance import PROVENANCE, release_predicate

    with ctx.steps.step("provenance"):
        subjects = {name: sha256_file(p) for name, p in ctx.outputs.items()
                    if name.endswith((".mender", "/disk.img", "/disk.img.gz", "/sbom.cdx.json"))}
        predicate = release_predicate(config=ctx.config, name=ctx.release.name, version=ctx.release.version,
                                      boards=list(ctx.boards), epoch=ctx.epoch, base_key=ctx.spec.key,
                                      suite=ctx.release.suite, layers=ctx.layers, packages=ctx.packages, repo=REPO,
                                      tool_version=_tool_version)
        path = ctx.out_dir / PROVENANCE
        path.write_bytes(sign_envelope(statement(subjects, predicate), ctx.signer))
        ctx.outputs[PROVENANCE] = path


def manifest(ctx: BuildContext) -> None:
    """``manifest.json``: what was built, from what, with which tools, how long each step took."""
    release = ctx.release
    doc = ReleaseManifest(
        name=release.name,
        version=release.version,
        artifact_name=ctx.artifact_name,
        boards={b: BoardEntry(m.device_type) for b, m in ctx.boards.items()},
        source_date_epoch=ctx.epoch,
        built_at=int(time.time()),
        build_seconds=round(time.monotonic() - ctx.started, 1),
        signed=ctx.signer is not None,
        security_version=release.security_version,
        trust=TrustEntry(**ctx.trust.manifest(), server_url=release.server_url, insecure_http=release.insecure_http,
                         config_variables=list(ctx.merged.config_variables)),
        previous=None if ctx.previous is None else ctx.previous.entry(ctx.deltas),
        kernel=ctx.kernel,
        disk=DiskEntry(f"{ctx.layout.disk_id:08x}", release.slot_size_mib),
        layers={layer.name: layer_hash(layer) for layer in ctx.layers},
        base=BaseEntry(ctx.spec.key, release.suite, release.mirror or "(apt default)",
                       built_at=None if ctx.base_info is None else ctx.base_info.built_at,
                       archive=[] if ctx.base_info is None else list(ctx.base_info.archive),
                       decision="" if ctx.base_info is None else ctx.base_info.decision),
        outputs={name: OutputEntry(sha256_file(p), p.stat().st_size) for name, p in sorted(ctx.outputs.items())},
        packages=[PackageEntry(**p) for p in ctx.packages],
        tools={
            "python": platform.python_version(),
            "mmdebstrap": _tool_version(["mmdebstrap", "--version"]),
            "mke2fs": _tool_version(["mke2fs", "-V"]),
            "mkimage": _tool_version(["mkimage", "-V"]),
        },
        timings={k: round(v, 1) for k, v in ctx.steps.timings.items()},
    )
    path = ctx.out_dir / MANIFEST
    path.write_text(doc.to_json())
    ctx.outputs[MANIFEST] = path


#: the build, in order; each step returns early when it does not apply
STEPS: tuple[Callable[[BuildContext], None], ...] = (base_rootfs, rootfs_tree, rootfs_image, board_outputs, deltas,
                                                     provenance, manifest)


# ---------------------------------------------------------------------------------------------------------
# the previous release and delta artifacts from it


def _previous_of(previous: Path, previous_manifest: PreviousRelease | Mapping[str, Any]) -> PreviousRelease:
    if isinstance(previous_manifest, PreviousRelease):
        return previous_manifest
    return PreviousRelease.from_manifest(previous, previous_manifest)


def check_previous_artifacts(previous: Path, previous_manifest: PreviousRelease | Mapping[str, Any],
                             boards: Iterable[str], verifiers: Sequence[Verifier]) -> None:
    """The previous release's full artifacts that deltas will be made from must be full rootfs-image
    artifacts signed by a key the devices trust (header only: quick). ``previous_manifest``: what
    :meth:`PreviousRelease.load` read, or the manifest document. Raises UserError or ArtifactError."""
    from artifacts.reader import ArtifactReader

    prev = _previous_of(previous, previous_manifest)
    for board in boards:
        art = prev.artifact(board)
        if not art.is_file():
            continue
        with ArtifactReader.open(art, verifiers=verifiers, require_signature=bool(verifiers)) as r:
            types = r.read_header().info.payload_types
        if types != ("rootfs-image",):
            raise UserError(f"the previous release {previous}: {art.name} is not a full rootfs-image artifact "
                            f"({', '.join(types)})")


def write_release_deltas(
    previous: Path,
    previous_manifest: PreviousRelease | Mapping[str, Any],
    full: dict[str, Path],
    out_dir: Path,
    work: Path,
    *,
    signer: Signer | None,
    verifiers: Sequence[Verifier] = (),
    steps: Steps | None = None,
    progress: Callable[[str], None] = lambda msg: None,
) -> dict[str, dict[str, Any]]:
    """For each board's new full artifact (``full``: board → path), ``delta-from-<old>-<board>.mender`` in
    ``out_dir`` from the previous release's full artifact of the same board. The images are the same for every
    board, so the delta payload is made once (in ``work``) and reused. A board without a previous artifact,
    or with the same image as before, gets none. Steps are timed in ``steps`` (else reported to ``progress``).
    Returns the manifest entries, by board."""
    from artifacts.delta import write_delta_artifact

    prev = _previous_of(previous, previous_manifest)
    steps = steps or Steps(progress, heartbeat=None)
    out: dict[str, dict[str, Any]] = {}
    payloads: dict[tuple[str | None, str | None], tuple[Path, DeltaStats]] = {}
    work.mkdir(parents=True, exist_ok=True)
    try:
        for board, art in full.items():
            old_art = prev.artifact(board)
            if not old_art.is_file():
                steps.emit(f"{board}: no delta: the previous release has no artifact {old_art.name}")
                continue
            with steps.step(f"{board}: delta from {prev.version}") as note:
                key = (prev.rootfs_sha256, None)
                if key not in payloads:
                    payload = work / f"rootfs-{len(payloads)}.delta"
                    stats = delta_payload_unless_same_image(old_art, art, payload, verifiers)
                    if stats is None:
                        note(f"no delta: the image is the same as {prev.version}'s")
                        continue
                    payloads[key] = (payload, stats)
                payload, stats = payloads[key]
                target = out_dir / f"delta-from-{prev.version}-{board}.mender"
                res = write_delta_artifact(old_art, art, signer=signer, out=target, verifiers=tuple(verifiers),
                                           payload=payload)
                out[board] = {"file": target.name, "from": old_art.name, "size": res.artifact.size,
                              "literal_bytes": stats.literal_bytes, "copied_bytes": stats.copied_bytes,
                              "zero_bytes": stats.zero_bytes}
    finally:
        for payload, _ in payloads.values():
            payload.unlink(missing_ok=True)
    return out


def delta_payload_unless_same_image(old: Path, new: Path, payload: Path,
                                    verifiers: Sequence[Verifier]) -> DeltaStats | None:
    """The delta payload from ``old``'s image to ``new``'s, written to ``payload``; None when both artifacts hold
    the same image (nothing to send). Raises what :func:`artifacts.delta.make_delta_payload` raises otherwise."""
    from artifacts.delta import SameImageError, make_delta_payload

    try:
        stats, _, _ = make_delta_payload(old, new, payload, verifiers=tuple(verifiers))
    except SameImageError:
        return None
    return stats


def _gzip(src: Path, dst: Path) -> None:
    """A compressed image for flashing (gzip: bmaptool, zcat and Raspberry Pi Imager read it), on all cores."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        enc = ParallelGzipEncoder(out)
        while b := f.read(4 << 20):
            enc.write(b)
        enc.close()


__all__ = ["ALL_STAGES", "DEFAULT_CONFIG", "STEPS", "BuildContext", "Stage", "build_release", "default_cache_dir",
           "sha256_file", "stage_set", "write_release_deltas"]
