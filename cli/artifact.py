"""``build.py artifact ...``: write, sign, verify and show Mender v3 artifacts."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from artifacts.format import Compression
from artifacts.keys import load_signer, load_verifiers
from artifacts.reader import ArtifactInfo, read_artifact

if TYPE_CHECKING:
    from artifacts.writer import ArtifactSpec

_existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group()
def artifact() -> None:
    """Signed Mender v3 artifacts, compatible with mender-artifact 3.9."""


@artifact.group()
def write() -> None:
    """Write an artifact."""


def _key_value_pairs(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """Checked where the user typed them, so that the error names the option (``--provides must be
    KEY:VALUE, ...``); the library's own message names the provides or depends."""
    from artifacts.writer import parse_pairs

    parse_pairs(value, param.opts[0])
    return value


def _common_write_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--name", "-n", required=True, help="Artifact name (artifact_provides.artifact_name)."),
        click.option("--device-type", "-t", "device_types", multiple=True, required=True,
                     help="Compatible device type; repeat for several."),
        click.option("--key", "-k", type=_existing_file, help="Private key to sign with (PEM)."),
        click.option("--compression", type=click.Choice([c.value for c in Compression]), default="gzip",
                     show_default=True, help="zstd needs mender-artifact/mender-client 3.10+ to read."),
        click.option("--script", "-s", "scripts", type=_existing_file, multiple=True,
                     help="State script (Artifact<State>_<Enter|Leave|Error>_NN[_name]); repeatable."),
        click.option("--provides", "-p", multiple=True, metavar="KEY:VALUE", callback=_key_value_pairs,
                     help="Added to the payload's provides."),
        click.option("--depends", "-d", multiple=True, metavar="KEY:VALUE", callback=_key_value_pairs,
                     help="Added to the payload's depends."),
        click.option("--depends-artifact", "-N", "depends_artifacts", multiple=True, metavar="NAME",
                     help="Only installable on top of this artifact name; repeatable."),
        click.option("--software-version", help="Value of the software version provide (default: the name)."),
        click.option("--output", "-o", "output", type=click.Path(dir_okay=False, path_type=Path), required=True),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _write(spec: ArtifactSpec, output: Path, key: Path | None, compression: str) -> None:
    from artifacts.writer import write_artifact

    signer = load_signer(key) if key else None
    result = write_artifact(spec, output, compression=Compression(compression), signer=signer)
    click.echo(
        f"wrote {result.path} ({result.size} bytes, {compression}, {'signed' if result.signed else 'unsigned'})"
    )


@write.command("rootfs-image")
@click.option("--file", "-f", "file", type=_existing_file, required=True, help="The root filesystem image.")
@_common_write_options
def write_rootfs(file: Path, name: str, device_types: Sequence[str], key: Path | None, compression: str,
                 scripts: Sequence[Path], provides: Sequence[str], depends: Sequence[str],
                 depends_artifacts: Sequence[str], software_version: str | None, output: Path) -> None:
    """Full root filesystem update (payload type rootfs-image)."""
    from artifacts.writer import rootfs_image_spec

    spec = rootfs_image_spec(file=file, name=name, device_types=device_types, provides=provides, depends=depends,
                             depends_artifacts=depends_artifacts, scripts=scripts, software_version=software_version)
    _write(spec, output, key, compression)


@write.command("module-image")
@click.option("--type", "-T", "module_type", required=True, help="Update module that installs the payload.")
@click.option("--file", "-f", "files", type=_existing_file, multiple=True, required=True, help="Payload file; repeatable.")
@click.option("--software-name", help="Software name in rootfs-image.<name>.version (default: the module type).")
@click.option("--meta-data", "-m", type=_existing_file, help="JSON object passed to the update module.")
@_common_write_options
def write_module(module_type: str, files: Sequence[Path], software_name: str | None, meta_data: Path | None,
                 name: str, device_types: Sequence[str], key: Path | None, compression: str, scripts: Sequence[Path],
                 provides: Sequence[str], depends: Sequence[str], depends_artifacts: Sequence[str],
                 software_version: str | None, output: Path) -> None:
    """Application-level update handled by an update module."""
    from artifacts.writer import module_image_spec

    meta = None
    if meta_data is not None:
        try:
            meta = json.loads(meta_data.read_text())
        except ValueError as e:
            raise click.BadParameter(f"{meta_data} is not valid JSON: {e}", param_hint="--meta-data") from None
        if not isinstance(meta, dict):
            raise click.BadParameter(f"{meta_data} must hold a JSON object", param_hint="--meta-data")
    spec = module_image_spec(module_type=module_type, files=files, name=name, device_types=device_types,
                             provides=provides, depends=depends, depends_artifacts=depends_artifacts, scripts=scripts,
                             software_name=software_name, software_version=software_version, meta_data=meta)
    _write(spec, output, key, compression)


@artifact.command()
@click.argument("source", type=_existing_file)
@click.option("--key", "-k", type=_existing_file, required=True, help="Private key to sign with (PEM).")
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False, path_type=Path), required=True)
def sign(source: Path, key: Path, output: Path) -> None:
    """Sign (or re-sign) an artifact after verifying its structure and checksums."""
    from artifacts.writer import sign_artifact

    result = sign_artifact(source, output, load_signer(key))
    click.echo(f"wrote {result.path} ({result.size} bytes, signed)")


@artifact.command()
@click.option("--from", "old", type=_existing_file, required=True, metavar="OLD.mender",
              help="Full rootfs-image artifact the devices run now (the source).")
@click.option("--to", "new", type=_existing_file, required=True, metavar="NEW.mender",
              help="Full rootfs-image artifact to update them to (the target).")
@click.option("--key", "-k", type=_existing_file, required=True, help="Private key to sign the delta with (PEM).")
@click.option("--verify-key", "verify_keys", type=_existing_file, multiple=True,
              help="Public key the two inputs must be signed with; repeatable (default: the public half of --key).")
@click.option("--level", type=click.IntRange(0, 9), default=6, show_default=True, help="xz preset of the op stream.")
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False, path_type=Path), required=True)
def delta(old: Path, new: Path, key: Path, verify_keys: Sequence[Path], level: int, output: Path) -> None:
    """Delta artifact (payload type rootfs-delta) from OLD's image to NEW's: installable only on a device
    running exactly OLD's image (it depends on OLD's rootfs-image.checksum); named like NEW."""
    from artifacts.delta import write_delta_artifact
    from artifacts.keys import signer_verifier

    signer = load_signer(key)
    verifiers = load_verifiers(verify_keys) if verify_keys else [signer_verifier(signer)]
    result = write_delta_artifact(old, new, signer=signer, out=output, level=level, verifiers=tuple(verifiers))
    full = new.stat().st_size
    st = result.stats
    click.echo(
        f"wrote {result.artifact.path} ({result.artifact.size} bytes, {100 * result.artifact.size / full:.1f}% of "
        f"{new.name}, signed): {result.source.name} -> {result.target.name}, "
        f"{st.copied_bytes} bytes copied from the source, {st.literal_bytes} new, {st.zero_bytes} zero, "
        f"made in {st.seconds:.1f} s"
    )


@artifact.command()
@click.argument("source", type=_existing_file)
@click.option("--key", "-k", "keys", type=_existing_file, multiple=True, required=True,
              help="Trusted public key (PEM); repeat to trust several.")
def verify(source: Path, keys: Sequence[Path]) -> None:
    """Exit 0 only if the signature verifies with one of the keys and every checksum matches."""
    info = read_artifact(source, load_verifiers(keys), require_signature=True)
    click.echo(
        f"OK {source}: {info.header.info.artifact_name}, signature verified with {info.signed_by}, "
        f"{len(info.files)} file(s) match the manifest"
    )


@artifact.command("verify-provenance")
@click.argument("source", type=_existing_file)
@click.option("--key", "-k", "keys", type=_existing_file, multiple=True, required=True,
              help="Trusted public key (PEM); repeat to trust several.")
def verify_provenance(source: Path, keys: Sequence[Path]) -> None:
    """Exit 0 only if a release's provenance.intoto.json is signed by one of the keys; lists its subjects."""
    from artifacts.provenance import subjects_of
    from artifacts.provenance import verify_provenance as verify_envelope

    doc, signed_by = verify_envelope(source.read_bytes(), load_verifiers(keys))
    subjects = subjects_of(doc)
    click.echo(f"OK {source}: signature verified with {signed_by.description}, {len(subjects)} subject(s)")
    for name, digest in subjects.items():
        click.echo(f"  {digest}  {name}")


def info_to_dict(info: ArtifactInfo) -> dict[str, Any]:
    h = info.header
    return {
        "path": info.path,
        "size": info.size,
        "name": h.info.artifact_name,
        "format": info.format,
        "version": info.version,
        "signature": info.signature.value,
        "signed": info.signature.value != "unsigned",
        "signed_by": info.signed_by,
        "compression": h.compression.value,
        "device_types": list(h.info.device_types),
        "provides": {"artifact_name": h.info.artifact_name,
                     **({"artifact_group": h.info.artifact_group} if h.info.artifact_group else {})},
        "depends": {"device_type": list(h.info.device_types),
                    **({"artifact_name": list(h.info.depends_artifact_names)} if h.info.depends_artifact_names else {}),
                    **({"artifact_group": list(h.info.depends_groups)} if h.info.depends_groups else {})},
        "scripts": list(h.scripts),
        "payloads": [
            {
                "index": i,
                "type": ti.type,
                "provides": dict(ti.provides),
                "depends": {k: (list(v) if isinstance(v, tuple) else v) for k, v in ti.depends.items()},
                "clears_provides": list(ti.clears_provides),
                "meta_data": h.meta_data[i],
                "member": info.data_members[i] if i < len(info.data_members) else None,
                "files": [{"name": f.name, "size": f.size, "sha256": f.sha256}
                          for f in info.files if f.path.startswith(f"data/{i:04d}/")],
            }
            for i, ti in enumerate(h.type_infos)
        ],
    }


@artifact.command()
@click.argument("source", type=_existing_file)
@click.option("--key", "-k", "keys", type=_existing_file, multiple=True, help="Also verify the signature with this public key (PEM); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(source: Path, keys: Sequence[Path], as_json: bool) -> None:
    """Print what an artifact holds (structure and checksums are verified while reading)."""
    info = read_artifact(source, load_verifiers(keys))
    d = info_to_dict(info)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    signature = d["signature"] + (f" ({d['signed_by']})" if d["signed_by"] else "")
    lines = [
        f"Artifact:      {d['name']}",
        f"File:          {d['path']} ({d['size']} bytes)",
        f"Format:        {d['format']} v{d['version']}",
        f"Signature:     {signature}",
        f"Compression:   {d['compression']}",
        f"Device types:  {', '.join(d['device_types'])}",
        f"Provides:      {_kv(d['provides'])}",
        f"Depends:       {_kv(d['depends'])}",
        f"State scripts: {', '.join(d['scripts']) or '-'}",
    ]
    for p in d["payloads"]:
        lines += [
            f"Payload {p['index']}:     {p['type']}",
            f"  Provides:    {_kv(p['provides'])}",
            f"  Depends:     {_kv(p['depends'])}",
            f"  Clears:      {', '.join(p['clears_provides']) or '-'}",
            f"  Meta-data:   {json.dumps(p['meta_data']) if p['meta_data'] else '-'}",
            "  Files:",
            *(f"    {f['name']}  {f['size']} bytes  sha256 {f['sha256']}" for f in p["files"]),
        ]
    click.echo("\n".join(lines))


def _kv(d: dict[str, Any]) -> str:
    if not d:
        return "-"
    return ", ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in d.items())
