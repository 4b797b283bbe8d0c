#!/usr/bin/env python3
"""Instant fleet rollback (issue 16): the time per device to go back to the release in the inactive slot, against
downloading and writing it again, with the product's own code on this host, side by side in one run.

- re-download: the agent's download (:class:`device_hooks.download.ResumableDownload` from a local HTTP server)
  streamed through :func:`device_hooks.install.stream_install` (verify, decompress, write the slot, read it back);
- instant: :func:`device_hooks.slot_rollback.fetch_header` of the header part from the same server,
  :func:`~device_hooks.slot_rollback.verify_header`, the slot read and hashed
  (:func:`device_hooks.install.verify_slot`), and :func:`device_hooks.install.arm` of a boot state.

The image is a root file system image made here (``--size`` MiB: about 40 % zero blocks, the rest text and
binary-looking data, like a real slot) unless ``--image`` names one (a ``rootfs.ext4`` of ``build.py release``);
the artifact is gzip, signed. Slot files are plain files on ``--work`` (page cache dropped where the kernel lets
us); the network is loopback, so the download side is a lower bound: a Pi on a real network and an SD card
(10–40 MB/s writes) gains more. It asserts nothing.

    .venv/bin/python bench/rollback.py [--size 1024] [--image rootfs.ext4] [--work DIR]
    .venv/bin/python bench/rollback.py --quick
"""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from artifacts import KeyType, generate_keypair, load_signer, load_verifier  # noqa: E402
from artifacts.reader import header_part_size  # noqa: E402
from artifacts.writer import rootfs_image_spec, write_artifact  # noqa: E402
from device_hooks.api import Deployment, StrictSession  # noqa: E402
from device_hooks.bootenv import INITIAL_STATE, BootEnv  # noqa: E402
from device_hooks.download import ResumableDownload  # noqa: E402
from device_hooks.install import DeviceFacts, arm, stream_install, verify_slot  # noqa: E402
from device_hooks.slot_rollback import fetch_header, verify_header  # noqa: E402

MIB = 1024 * 1024


def make_image(path: Path, size_mib: int, seed: int = 5) -> Path:
    """A slot-like image: 4 KiB blocks, ~40 % zeros, the rest text-like (compressible) or random."""
    rng = random.Random(seed)
    words = [b"systemd ", b"video ", b"/usr/lib/aarch64-linux-gnu/ ", b"libc.so.6 ", b"\x7fELF\x02\x01\x01 "]
    text = b"".join(rng.choice(words) for _ in range(8192))[:65536]
    with open(path, "wb") as f:
        for _ in range(size_mib * 16):  # 64 KiB pieces
            r = rng.random()
            f.write(bytes(65536) if r < 0.4 else text if r < 0.75 else rng.randbytes(65536))
    return path


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_Quiet, directory=str(directory))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="MiB of the generated image (default 1024)")
    ap.add_argument("--image", type=Path, help="a root file system image to use instead")
    ap.add_argument("--work", type=Path, help="work directory (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="a 32 MiB image: seconds")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-rollback-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run(work, 32 if args.quick else args.size, args.image)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, size_mib: int, image: Path | None) -> int:
    keys = work / "keys"
    if (keys / "private.pem").exists():
        priv, pub = keys / "private.pem", keys / "public.pem"
    else:
        keys.mkdir(exist_ok=True)
        priv, pub = generate_keypair(KeyType.ECDSA_P256, keys)
    image = image or make_image(work / "rootfs.ext4", size_mib)
    site = work / "site"
    site.mkdir(exist_ok=True)
    art = site / "release.mender"
    write_artifact(rootfs_image_spec(file=image, name="vv-1.0.0", device_types=["bench"],
                                     software_version="1.0.0"), art, signer=load_signer(priv))
    with open(art, "rb") as f:
        head = f.read(2 * MIB)
    (site / "release.header").write_bytes(head[:header_part_size(io.BytesIO(head))])
    art_size = art.stat().st_size
    verifiers = [load_verifier(pub)]
    facts = DeviceFacts(device_type="bench", artifact_name="vv-2.0.0", provides={"rootfs-image.version": "2.0.0"})
    slot = work / "slot.img"
    with open(slot, "wb") as f:
        f.truncate(image.stat().st_size + 16 * MIB)
    env = BootEnv([work / "env.a", work / "env.b"])
    env.create(INITIAL_STATE)
    srv, url = serve(site)
    session = StrictSession(allow_http=True)
    try:
        t0 = time.monotonic()
        dl = ResumableDownload(f"{url}/release.mender", session=session)
        size = dl.start()
        result = stream_install(dl, verifiers=verifiers, device=facts, target=slot, allow_downgrade=True,
                                source_size=size)
        dl.close()
        arm(env, 3)
        full = time.monotonic() - t0

        dep = Deployment(id="0" * 8 + "-0000-4000-8000-" + "0" * 12, artifact_name="vv-1.0.0", uri="",
                         device_types=(), allow_downgrade=True, rollback_header_uri=f"{url}/release.header")
        t0 = time.monotonic()
        header = fetch_header(session, dep.rollback_header_uri, timeout=30)
        _, _, checksum = verify_header(header, verifiers, facts, dep)
        verify_slot(slot, result.size, checksum)
        arm(env, 3)
        instant = time.monotonic() - t0
    finally:
        srv.shutdown()
    print(f"Instant rollback: image {result.size / MIB:.0f} MiB, artifact {art_size / MIB:.0f} MiB, "
          f"header {len(header)} bytes")
    print(f"  re-download  download + verify + write + read back + arm  {full:7.2f} s  ({art_size / MIB:.0f} MiB "
          "over the network)")
    print(f"  instant      header + verify + read slot + arm            {instant:7.2f} s  ({len(header) / 1024:.1f} KiB "
          "over the network)")
    print(f"  rollback speed-up  re-download/instant                    {full / instant:7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
