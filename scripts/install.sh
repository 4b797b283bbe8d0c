#!/usr/bin/env bash
# Install everything this repository needs on Debian bookworm: apt packages and a virtualenv in .venv.
# Idempotent and quick when nothing changed (apt runs only for missing packages; pip only when
# pyproject.toml changed). apt installs without recommends, so every package a command of ours needs is named
# here, recommended-only ones included (ipxe-qemu): tests/test_install_contract.py checks this list against the
# tool table of ota_common/tools.py, and the last step below names any package whose programs are still missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc git ca-certificates   # pip reaches the package index over HTTPS
  mender-artifact          # interop tests and benchmark run the real tool
  xdelta3                  # bench/delta.py compares our deltas with it
  e2fsprogs dosfstools mtools fdisk bmap-tools xz-utils zstd
  mmdebstrap qemu-user-static binfmt-support arch-test   # arm64 rootfs under emulation
  qemu-system-arm u-boot-qemu u-boot-tools qemu-utils    # boot scripts and QEMU boots
  ipxe-qemu                # QEMU NIC option ROMs: only recommended by qemu-system-arm (our NICs pass romfile=)
  systemd                  # systemctl --root enables units in images; journalctl reads journals
  openssh-client                                         # the QEMU tests run commands in the guest
  openssl                                                # TLS tests check certificates with openssl verify
  libubootenv-tool                                       # fw_printenv/fw_setenv interop
  systemd-journal-remote                                 # writes real journal files for the forensics test
  libglib2.0-0 libssl3 liblzma5                          # the unpacked stock mender client (interop test)
  postgresql postgresql-client                           # the server's PostgreSQL test starts its own cluster
  iproute2 time                                          # ip (agent tests), /usr/bin/time (bench/delta.py peaks)
  chromium                                               # the dashboard test renders pages headless
  nginx                                                  # the server's reverse-proxy test: nginx terminates TLS
)

sudo_() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing apt packages: ${missing[*]}"
  sudo_ apt-get update -qq
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # the tests run their own nginx and PostgreSQL: the stock services the packages start are not wanted here
  for svc in nginx postgresql; do
    if printf '%s\n' "${missing[@]}" | grep -qx "$svc" && command -v systemctl >/dev/null; then
      sudo_ systemctl disable --now "$svc.service" >/dev/null 2>&1 || true
    fi
  done
fi

# the stock Mender client for the interop test: downloaded, never installed (its postinst would start a daemon)
if ! ls var/cache/debs/mender-client_*.deb >/dev/null 2>&1; then
  mkdir -p var/cache/debs
  (cd var/cache/debs && apt-get download -qq mender-client 2>/dev/null) \
    || { sudo_ apt-get update -qq; (cd var/cache/debs && apt-get download -qq mender-client); }
fi

# arm64 binaries run through qemu-user: binfmt_misc must be mounted and the handler enabled
if ! arch-test arm64 >/dev/null 2>&1; then
  mountpoint -q /proc/sys/fs/binfmt_misc || sudo_ mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || true
  sudo_ update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  arch-test arm64 >/dev/null 2>&1 || echo "warning: cannot run arm64 binaries (binfmt_misc); image builds will fail" >&2
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "error: Python >= 3.11 is required" >&2; exit 1; }

stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # dependencies only: build.py and the tests run from the repository (an editable install would add
  # an import hook that costs every command 20 ms of start-up)
  .venv/bin/python - <<'PY' > .venv/requirements.txt
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
print("\n".join(project["dependencies"] + extras["test"] + extras["ansible"] + extras["s3"] + extras["sbom"]))
PY
  .venv/bin/python -m pip install -q -r .venv/requirements.txt
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# the install contract: every program and data file the code needs, by Debian package (fails naming them)
.venv/bin/python -m ota_common.tools
