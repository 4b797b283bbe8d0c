#!/usr/bin/env python3
"""Release build times, sizes and reproducibility (issue #3), measured in one run.

1. cold: `build.py release` with an empty cache directory (bootstraps the base rootfs) — skipped with
   --warm-only, which uses the normal cache instead;
2. warm: the same release again after editing one file of the `app` layer (target: under 2 minutes);
3. reproducibility: a second warm build of the same inputs with the same SOURCE_DATE_EPOCH must give a
   bit-identical rootfs.ext4 and the same artifact manifest (payload + header checksums).
Prints the times and the sizes of every output; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def release(config: Path, out: Path, cache: Path | None, key: Path,
            boards: tuple[str, ...] = ()) -> tuple[float, dict]:  # type: ignore[type-arg]
    cmd = [sys.executable, str(REPO / "build.py"), "release", "--config", str(config), "--out", str(out), "--key", str(key)]
    for board in boards:
        cmd += ["--board", board]
    if cache:
        cmd += ["--cache-dir", str(cache)]
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000", PYTHONPATH=str(REPO))
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"release failed:\n{proc.stderr[-4000:]}")
    return elapsed, json.loads((out / "1.0.0" / "manifest.json").read_text())


def artifact_manifest(path: Path) -> bytes:
    with tarfile.open(path) as tf:
        return tf.extractfile("manifest").read()  # type: ignore[union-attr]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm-only", action="store_true", help="skip the cold build (use the normal cache)")
    ap.add_argument("--quick", action="store_true",
                    help="for CI: one warm build of the qemu-virt board from the normal cache, its stage times and "
                         "outputs (no cold build, no rebuilds, so no reproducibility verdict)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-build-"))
    try:
        cfg_dir = work / "config"
        cfg_dir.mkdir()
        shutil.copy(REPO / "release.yaml", cfg_dir / "release.yaml")
        shutil.copytree(REPO / "layers", cfg_dir / "layers")
        for tree in ("device_hooks", "artifacts", "ota_common"):  # the ota layer's trees (src: ../<tree>)
            shutil.copytree(REPO / tree, cfg_dir / tree, ignore=shutil.ignore_patterns("__pycache__"))
        config = cfg_dir / "release.yaml"
        sys.path.insert(0, str(REPO))
        from artifacts import KeyType, generate_keypair

        key, _ = generate_keypair(KeyType.ECDSA_P256, work / "key")
        cache = None if args.warm_only or args.quick else work / "cache"
        rows = []
        if args.quick:
            t, first = release(config, work / "first", None, key, boards=("qemu-virt",))
            print(f"warm build of qemu-virt (normal cache): {t:.1f} s")
            print("stages:", ", ".join(f"{k} {v} s" for k, v in first["timings"].items()))
            for name, entry in first["outputs"].items():
                print(f"  {name:45} {entry['size'] / 1e6:10.1f} MB")
            return
        if not args.warm_only:
            t, manifest = release(config, work / "cold", cache, key)
            rows.append(("cold build (empty cache)", t))
        else:
            t, manifest = release(config, work / "first", cache, key)
            rows.append(("first build (normal cache)", t))
        app_file = cfg_dir / "layers" / "app" / "files" / "vv-video-ai.py"
        app_file.write_text(app_file.read_text() + "\n# bench: one edited file in the app layer\n")
        t, warm = release(config, work / "warm", cache, key)
        rows.append(("warm rebuild after editing one app-layer file", t))
        t, again = release(config, work / "again", cache, key)
        rows.append(("warm rebuild, same inputs", t))

        print(f"\n{'':50} {'seconds':>8}")
        for name, secs in rows:
            print(f"{name:50} {secs:8.1f}")
        print("\nstages of the warm rebuild:", ", ".join(f"{k} {v} s" for k, v in warm["timings"].items()))
        print("\noutputs:")
        for name, entry in warm["outputs"].items():
            print(f"  {name:45} {entry['size'] / 1e6:10.1f} MB")
        same_rootfs = (work / "warm" / "1.0.0" / "rootfs.ext4").read_bytes() == (work / "again" / "1.0.0" / "rootfs.ext4").read_bytes()
        arts = [n for n in warm["outputs"] if n.endswith(".mender")]
        same_art = all(
            artifact_manifest(work / "warm" / "1.0.0" / n) == artifact_manifest(work / "again" / "1.0.0" / n) for n in arts
        )
        changed = warm["outputs"]["rootfs.ext4"]["sha256"] != manifest["outputs"]["rootfs.ext4"]["sha256"]
        print(f"\nreproducible: rootfs.ext4 bit-identical: {same_rootfs}; artifact manifests identical: {same_art}")
        print(f"the edited app file changed the rootfs: {changed}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
