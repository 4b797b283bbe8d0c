#!/usr/bin/env bash
# The main job at this stage of the project: build the default release (release.yaml: qemu-virt and rpi4
# images, signed artifacts, manifest) with a release key made on first use, then check the artifacts with
# the real mender-artifact. The first build bootstraps the arm64 base (~8 minutes); later ones reuse it.
# (`build.py demo` replaces this once the update server and the device agent exist.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
KEYS=${KEYS:-out/keys}
[ -f "$KEYS/private.pem" ] || $PY build.py keys generate --type ecdsa-p256 --out "$KEYS"
$PY build.py release --key "$KEYS/private.pem" "$@"
version=$($PY -c 'import yaml; print(yaml.safe_load(open("release.yaml"))["version"])')
for art in out/"$version"/*.mender; do
  mender-artifact validate -k "$KEYS/public.pem" "$art"
  $PY build.py artifact verify "$art" --key "$KEYS/public.pem"
done
echo "boot it: qemu-system-aarch64 -M virt -cpu cortex-a72 -m 1024 -nographic -bios /usr/lib/u-boot/qemu_arm64/u-boot.bin -drive if=virtio,format=raw,file=out/$version/qemu-virt/disk.img -device i6300esb -watchdog-action reset"
