#!/usr/bin/env bash
# The main job at this stage of the project: make a release key (once), build a small ext4 root filesystem,
# write a signed Mender artifact from it, and verify it with our verifier and with the real mender-artifact.
# (Later stages replace this with `build.py release` and `build.py demo`.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-out/main-job}
mkdir -p "$OUT"
[ -f "$OUT/keys/private.pem" ] || $PY build.py keys generate --type ecdsa-p256 --out "$OUT/keys"

rm -rf "$OUT/tree" && mkdir -p "$OUT/tree/etc/vv-video-ai" "$OUT/tree/usr/share/doc"
echo "DEVICE_ID=demo-0001" > "$OUT/tree/etc/vv-video-ai/.env"
cp -r /usr/share/doc/python3* "$OUT/tree/usr/share/doc/" 2>/dev/null || true
rm -f "$OUT/rootfs.ext4"
mkfs.ext4 -q -F -d "$OUT/tree" -E root_owner=0:0 -U clear "$OUT/rootfs.ext4" 64M

$PY build.py artifact write rootfs-image --file "$OUT/rootfs.ext4" --name demo-1.0 \
    --device-type qemu-virt --device-type rpi4 --key "$OUT/keys/private.pem" -o "$OUT/demo-1.0.mender"
$PY build.py artifact verify "$OUT/demo-1.0.mender" --key "$OUT/keys/public.pem"
mender-artifact validate -k "$OUT/keys/public.pem" "$OUT/demo-1.0.mender"
$PY build.py artifact show "$OUT/demo-1.0.mender" --key "$OUT/keys/public.pem"
