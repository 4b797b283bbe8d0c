"""``bench/blockwrite.py --qemu``: the same small update installed in a QEMU device whose disk is throttled like an
SD card (``-drive ...,throttling.bps-write=20971520,throttling.iops-write=500``: 20 MB/s, 500 writes/s), with the
whole-slot write (``[install] block_index = no``) and with the block index, side by side.

Two releases are built from this repository (``image.release.build_release``, the build cache warm after the
first): 1.0.0 with its disk image, and 1.0.1 with one configuration variable changed (a file of the application
layer: the app-only change of ``bench/delta.py``'s pair a) and its delta from 1.0.0. Both carry a layer that lets
root log in over SSH with a key made for the run. The device boots a copy of 1.0.0's disk whose slot B holds
1.0.0's image, as after an update from B to A. In the guest, over SSH, the product's install
(:func:`device_hooks.install.stream_install`, the code of this repository copied in) installs 1.0.1 into slot B
from an artifact on a second, unthrottled drive:

1. the index of slot B is made as the agent makes it after installing 1.0.0 there;
2. after: the delta installed with the block index (slot B not booted since its install: after a rollback, an
   aborted or failed deployment);
3. slot B is given 1.0.0's image again (``dd`` from a third drive) and the delta installed without an index: the
   slot is read and compared (a slot booted since its install: its first block, the ext4 superblock, changed);
4. before: the same install with every block written.

(Full installs are measured on the host by ``bench/blockwrite.py``: under TCG, inflating 1.25 GB in an emulated
CPU would measure the emulator.)

Each install starts with cold caches, the guest's and the host's (of the drives' files), as on a device.
Bytes written are the install's own count and the kernel's (``/sys/block/vda/vda3/stat``: sectors written to slot
B); time is the install's wall time in the guest (verify, write, read back against the signed checksum).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: an SD card's sequential write speed and small-write rate (DESIGN.md §7: 10–40 MB/s)
THROTTLE = (20 * 1024 * 1024, 500)
#: the releases' SOURCE_DATE_EPOCH: 1.0.1 is a day later, as a later commit is
BASE_EPOCH = 1700000000
SSH_LAYER = """description: bench only - root logs in over SSH with the run's key
files:
  - {src: benchssh/authorized_keys, dest: /root/.ssh/authorized_keys, mode: "0600"}
commands:
  - "chmod 0700 /root/.ssh"
"""

GUEST = r'''
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from artifacts import load_verifier
from artifacts.blockwrite import BLOCK_SIZE, block_digest
from device_hooks.blockindex import Binding, SlotIndex
from device_hooks.install import DeviceFacts, stream_install

SLOT, ACTIVE, STATE = Path("/dev/vda3"), Path("/dev/vda2"), Path("/data/bench-blockindex")
STATE.mkdir(exist_ok=True)


def sectors_written():
    return int(open("/sys/block/vda/vda3/stat").read().split()[6])


def capacity():
    fd = os.open(SLOT, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


cmd = sys.argv[2]
if cmd == "index":
    size, checksum = int(sys.argv[3]), sys.argv[4]
    digests = bytearray()
    with open(SLOT, "rb") as f:
        left = size
        while left:
            b = f.read(min(BLOCK_SIZE, left))
            digests += block_digest(b)
            left -= len(b)
    gen = SlotIndex(STATE, "B", None).save(device_size=capacity(), payload_size=size, checksum=checksum,
                                           digests=bytes(digests))
    print(json.dumps({"generation": gen}))
else:
    art, size, mode, checksum, gen, source = sys.argv[3:9]
    index = SlotIndex(STATE, "B", Binding(checksum, gen), enabled=mode != "before")
    facts = DeviceFacts("qemu-virt", "bench", {"rootfs-image.version": "0", "rootfs-image.checksum": source})
    os.sync()
    before = sectors_written()
    t = time.monotonic()
    with open(art, "rb") as f:
        r = stream_install(f, verifiers=[load_verifier(Path(sys.argv[1]) / "release.pem")], device=facts,
                           target=SLOT, source_size=int(size), index=index, active=ACTIVE, allow_downgrade=True)
    seconds = time.monotonic() - t
    print(json.dumps({"seconds": seconds, "write_seconds": r.write_seconds, "verify_seconds": r.verify_seconds,
                      "written": r.written, "zeroed": r.zeroed, "skipped": r.skipped, "blocks": r.blocks,
                      "skipped_blocks": r.skipped_blocks, "kernel_written": (sectors_written() - before) * 512,
                      "note": r.index_note, "sha256": r.sha256}))
'''


def build(work: Path, log: Callable[[str], None]) -> dict[str, Path]:
    """1.0.0 (with its disk image) and 1.0.1 (one variable changed, with its delta from 1.0.0); reused when
    built."""
    from artifacts import KeyType, generate_keypair, load_signer
    from devkit.config import demo_config
    from image.release import DEFAULT_CONFIG, build_release

    keys = work / "keys"
    if not (keys / "private.pem").exists():
        generate_keypair(KeyType.ECDSA_P256, keys)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(keys / "ssh")],
                       check=True)
    layers = work / "layers"
    (layers / "benchssh").mkdir(parents=True, exist_ok=True)
    (layers / "benchssh" / "authorized_keys").write_text((keys / "ssh.pub").read_text())
    (layers / "benchssh.yaml").write_text(SSH_LAYER)
    out: dict[str, Path] = {}
    for version, dvr, previous, epoch in (("1.0.0", "10.0.2.2", None, BASE_EPOCH),
                                          ("1.0.1", "10.0.2.3", "1.0.0", BASE_EPOCH + 86400)):
        done = work / "releases" / version / "built"
        rel_dir = work / "releases" / version
        if done.exists():
            out[version] = Path(done.read_text())
            log(f"release {version}: reused {out[version]}")
            continue
        log(f"release {version}: building ...")
        t = time.monotonic()
        config = demo_config(work / "config" / version, DEFAULT_CONFIG, "https://10.0.2.2:9",
                             {"DVR_IP": dvr}, extra_layers=[layers / "benchssh.yaml"])
        stages = {"rootfs", "images", "artifacts"}  # the artifacts are made from the board's images
        result = build_release(config=config, version=version, boards=["qemu-virt"],
                               signer=load_signer(keys / "private.pem"), out=rel_dir, cache_dir=None,
                               progress=lambda m: None, stages=frozenset(stages), epoch=epoch,
                               previous=out[previous] if previous else None)
        done.write_text(str(result.out_dir))
        out[version] = result.out_dir
        log(f"release {version}: built in {time.monotonic() - t:.0f} s")
    return out


def _partition(disk: Path, number: int) -> tuple[int, int]:
    """(offset, size) in bytes of partition ``number`` of ``disk`` (sfdisk's JSON)."""
    doc = json.loads(subprocess.run(["sfdisk", "-J", str(disk)], check=True, capture_output=True, text=True).stdout)
    table = doc["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    part = next(p for p in table["partitions"] if p["node"].endswith(str(number)))
    return int(part["start"]) * sector, int(part["size"]) * sector


def _padded(src: Path, dest: Path) -> int:
    """``src`` copied to ``dest`` padded with zeros to whole MiB (a drive); returns ``src``'s size."""
    shutil.copyfile(src, dest)
    size = src.stat().st_size
    with open(dest, "r+b") as f:
        f.truncate(-(-size // (1 << 20)) * (1 << 20))
    return size


def _code_tar(dest: Path, public_key: Path) -> None:
    with tarfile.open(dest, "w") as tar:
        for name in ("artifacts", "device_hooks", "ota_common"):
            tar.add(REPO / name, arcname=name, filter=lambda ti: None if "__pycache__" in ti.name else ti)
        tar.add(public_key, arcname="release.pem")


def run(work: Path, log: Callable[[str], None],
        drop_cache: Callable[..., None]) -> list[tuple[str, str, dict[str, object]]]:
    """Build (or reuse) the releases, boot the throttled device, install; returns (kind, mode, result) rows.
    ``drop_cache(*paths)``: flush and drop this machine's page cache of files (``bench/blockwrite.py``'s)."""
    from devkit.net import free_port
    from devkit.qemu import Vm, virt_argv, virtio_drive

    releases = build(work, log)
    v1, v2 = releases["1.0.0"], releases["1.0.1"]
    rootfs1 = v1 / "rootfs.ext4"
    delta2 = next(v2.glob("delta-from-1.0.0-qemu-virt.mender"))
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    disk = run_dir / "disk.img"
    log("copying 1.0.0's disk, slot B := 1.0.0's image ...")
    subprocess.run(["cp", "--sparse=always", str(v1 / "qemu-virt" / "disk.img"), str(disk)], check=True)
    offset, size = _partition(disk, 3)
    if rootfs1.stat().st_size > size:
        raise SystemExit(f"{rootfs1} does not fit slot B ({size} bytes)")
    subprocess.run(["dd", f"if={rootfs1}", f"of={disk}", "bs=4M", f"seek={offset}", "oflag=seek_bytes",
                    "conv=notrunc,sparse", "status=none"], check=True)
    from ota_common.files import sha256_file as sha

    src_sum = sha(rootfs1)
    drives = {"delta": (_padded(delta2, run_dir / "delta.img"), "/dev/vdb")}
    _padded(rootfs1, run_dir / "source.img")
    extra = ["-drive", virtio_drive(run_dir / "delta.img") + ",readonly=on",
             "-drive", virtio_drive(run_dir / "source.img") + ",readonly=on"]  # /dev/vdc: 1.0.0's image
    code = run_dir / "code.tar"
    _code_tar(code, work / "keys" / "public.pem")
    port = free_port()
    argv = virt_argv(disk, ssh_port=port, throttle_write=THROTTLE, extra=extra)
    keys = work / "keys"
    vm = Vm(argv, run_dir / "console.log", ssh_key=keys / "ssh", ssh_port=port)
    rows: list[tuple[str, str, dict[str, object]]] = []
    with vm:
        log(f"booting 1.0.0 on a disk throttled to {THROTTLE[0] >> 20} MiB/s and {THROTTLE[1]} writes/s ...")
        vm.wait_for_ssh(900)
        vm.ssh("systemctl stop ota-agent.service ota-health.service 2>/dev/null; mkdir -p /tmp/code", check=False)
        with open(code, "rb") as f:
            subprocess.run(["ssh", "-q", "-i", str(keys / "ssh"), "-p", str(port), "-o", "BatchMode=yes",
                            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                            "root@127.0.0.1", "tar x -C /tmp/code"], stdin=f, check=True, timeout=300)
        (run_dir / "guest.py").write_text(GUEST)
        with open(run_dir / "guest.py", "rb") as f:
            subprocess.run(["ssh", "-q", "-i", str(keys / "ssh"), "-p", str(port), "-o", "BatchMode=yes",
                            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                            "root@127.0.0.1", "cat > /tmp/code/guest.py"], stdin=f, check=True, timeout=60)
        py = "python3 /tmp/code/guest.py /tmp/code"

        def index_slot_b() -> str:
            log("indexing slot B (as the agent does after installing 1.0.0 there) ...")
            out = vm.ssh(f"{py} index {rootfs1.stat().st_size} {src_sum}", timeout=1800).stdout
            return str(json.loads(out.strip().splitlines()[-1])["generation"])

        def install(kind: str, mode: str, generation: str) -> None:
            size, dev = drives[kind]
            log(f"{kind} install into slot B, {mode} ...")
            # every install starts cold, as on a device: the guest's page cache and the host's cache of the
            # drives' files (else a read of slot B is as fast as the host's memory when an earlier step read or
            # wrote it: measured 13-32 s for the same read-back)
            vm.ssh("sync; echo 3 > /proc/sys/vm/drop_caches")
            drop_cache(disk, run_dir / "delta.img", run_dir / "source.img")
            out = vm.ssh(f"{py} install {dev} {size} {mode} {src_sum} {generation} {src_sum}", timeout=3600).stdout
            result = json.loads(out.strip().splitlines()[-1])
            log(f"  {result}")
            rows.append((kind, mode, result))

        install("delta", "index", index_slot_b())
        log("slot B := 1.0.0's image again (dd in the guest, throttled) ...")
        vm.ssh(f"head -c {rootfs1.stat().st_size} /dev/vdc | dd of=/dev/vda3 bs=4M iflag=fullblock conv=fsync "
               "status=none", timeout=3600)
        install("delta", "read", "0" * 32)  # the index was removed by the install before: none to use
        install("delta", "before", "0" * 32)  # whatever slot B holds, every block is written
    return rows


def report(rows: list[tuple[str, str, dict[str, object]]]) -> None:
    mb = 1e6
    print(f"\nSmall update (1.0.0 -> 1.0.1, one file of the app layer) installed in QEMU on a disk throttled to "
          f"{THROTTLE[0] >> 20} MiB/s and {THROTTLE[1]} writes/s (slot B held 1.0.0)")
    print("mode: index = slot B's block index used; read = no usable index, slot B read and compared; before = "
          "every block written")
    print(f"{'install':8} {'mode':7} {'written MB':>11} {'kernel MB':>10} {'skipped blocks':>18} {'time s':>8} "
          f"{'write s':>8} {'read-back s':>12}")
    by: dict[tuple[str, str], dict[str, object]] = {}
    for kind, mode, r in rows:
        by[(kind, mode)] = r
        written = int(r["written"]) + int(r["zeroed"])  # type: ignore[call-overload]
        print(f"{kind:8} {mode:7} {written / mb:11.1f} {int(r['kernel_written']) / mb:10.1f} "  # type: ignore[call-overload]
              f"{r['skipped_blocks']:>8} of {r['blocks']:<7} {float(r['seconds']):8.1f} "  # type: ignore[arg-type]
              f"{float(r['write_seconds']):8.1f} {float(r['verify_seconds']):12.1f}")  # type: ignore[arg-type]
    for kind in ("delta",):
        if (kind, "before") in by and (kind, "index") in by:
            b, a = by[(kind, "before")], by[(kind, "index")]
            bw = int(b["kernel_written"])  # type: ignore[call-overload]
            aw = max(int(a["kernel_written"]), 1)  # type: ignore[call-overload]
            print(f"  {kind}: bytes written before/after {bw / aw:8.1f}x (kernel count), install time before/after "
                  f"{float(b['seconds']) / float(a['seconds']):6.1f}x")  # type: ignore[arg-type]
            if (kind, "read") in by:
                r = by[(kind, "read")]
                rw = max(int(r["kernel_written"]), 1)  # type: ignore[call-overload]
                print(f"  {kind} without an index (slot read): bytes written before/after {bw / rw:8.1f}x, install "
                      f"time before/after {float(b['seconds']) / float(r['seconds']):6.1f}x")  # type: ignore[arg-type]


def main(work: Path, drop_cache: Callable[..., None]) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    work.mkdir(parents=True, exist_ok=True)
    rows = run(work, log, drop_cache)
    report(rows)
    return 0
