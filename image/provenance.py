"""What a release's ``provenance.intoto.json`` says (SLSA provenance v1): which outputs (subjects) were built from
which inputs (the release configuration, every layer file, the Debian package list) by which tools. The
envelope and its signature are :mod:`artifacts.provenance`'s.

Only facts that a rebuild reproduces are in the statement (no wall-clock start and end times: the build's time
is its ``SOURCE_DATE_EPOCH``), so two builds of one release make the same statement but for the artifacts' digests: ECDSA signatures (the
artifacts' and the envelope's) are randomised.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ota_common.files import sha256_file

from .layers import Layer
from .sbom import layer_files

PROVENANCE = "provenance.intoto.json"
BUILD_TYPE = "urn:vv-ota:build-type:release:v1"  # a URI naming our build process (no public address yet)
BUILDER_ID = "urn:vv-ota:builder:build.py"


def packages_sha256(packages: Sequence[Mapping[str, str]]) -> str:
    """sha256 of the package list as canonical JSON (sorted keys, no spaces): the same list, the same hash."""
    return hashlib.sha256(json.dumps(list(packages), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def git_commit(repo: Path) -> str | None:
    """The repository's HEAD commit, None outside a git checkout (a source tarball)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def release_predicate(*, config: Path, name: str, version: str, boards: Sequence[str], epoch: int, base_key: str,
                      suite: str, layers: Sequence[Layer], packages: Sequence[Mapping[str, str]], repo: Path,
                      tool_version: Callable[[list[str]], str]) -> dict[str, Any]:
    """The SLSA provenance v1 predicate of a release build."""
    deps: list[dict[str, Any]] = [{"name": f"config:{config.name}", "digest": {"sha256": sha256_file(config)}}]
    for layer in layers:
        deps += [{"name": f"layer:{layer.name}:{rel}", "digest": {"sha256": sha256_file(p)}}
                 for rel, p in layer_files(layer)]
    deps.append({"name": f"debian-packages:{suite}", "digest": {"sha256": packages_sha256(packages)},
                 "annotations": {"base_key": base_key, "count": len(packages)}})
    commit = git_commit(repo)
    if commit is not None:
        deps.append({"name": "source", "digest": {"gitCommit": commit}})
    return {
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {"config": config.name, "name": name, "version": version, "boards": list(boards)},
            "internalParameters": {"source_date_epoch": epoch},
            "resolvedDependencies": deps,
        },
        "runDetails": {
            "builder": {"id": BUILDER_ID, "version": {
                "python": platform.python_version(),
                "mmdebstrap": tool_version(["mmdebstrap", "--version"]),
                "mender-artifact": tool_version(["mender-artifact", "--version"]),
                "vv-ota": commit or "unknown",
            }},
            "metadata": {"invocationId": f"{name}-{version}"},
        },
    }


__all__ = ["BUILDER_ID", "BUILD_TYPE", "PROVENANCE", "git_commit", "packages_sha256", "release_predicate"]
