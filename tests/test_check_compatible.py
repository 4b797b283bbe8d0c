"""``check_compatible`` (device_hooks/install.py), the device's decision whether a verified artifact header fits
it, as a table: each row a header and a device, and either the provides the slot will have or the refusal
(its reason named). In process, no artifact file, no agent."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from artifacts import Compression
from artifacts.header import ArtifactHeader, HeaderInfo, TypeInfo
from device_hooks.install import DELTA, ROOTFS, SECURITY_VERSION, DeviceFacts, check_compatible
from ota_common.errors import IncompatibleArtifact

RUNNING_CHECKSUM = "a" * 64


def sv(n: int | str, version: str = "2.0.0") -> dict[str, str]:
    """Provides with a signed security version."""
    return {"rootfs-image.version": version, SECURITY_VERSION: str(n)}


@dataclass(frozen=True)
class Art:
    """The parts of a header the decision reads; :meth:`header` builds the real thing."""

    name: str = "vv-2.0.0"
    device_types: tuple[str, ...] = ("raspberrypi4",)
    payload_types: tuple[str, ...] = (ROOTFS,)
    type_infos: int = 1  # how many headers/NNNN/type-info the header holds
    depends_artifact_names: tuple[str, ...] = ()
    depends_groups: tuple[str, ...] = ()
    provides: dict[str, str] = field(default_factory=lambda: sv(3))
    depends: dict[str, Any] = field(default_factory=dict)

    def header(self) -> ArtifactHeader:
        info = HeaderInfo(self.name, self.device_types, self.payload_types,
                          depends_artifact_names=self.depends_artifact_names, depends_groups=self.depends_groups)
        ti = TypeInfo(self.payload_types[0] if self.payload_types else ROOTFS, dict(self.provides), dict(self.depends))
        return ArtifactHeader(info, (ti,) * self.type_infos, (None,) * self.type_infos, {}, Compression.GZIP)


DEVICE = DeviceFacts(device_type="raspberrypi4", artifact_name="vv-1.0.0", groups=("lobby",),
                     provides={"rootfs-image.version": "1.0.0", "rootfs-image.checksum": RUNNING_CHECKSUM,
                               SECURITY_VERSION: "3"},
                     security_floor=3)


ACCEPTED: list[tuple[str, Art, DeviceFacts, bool]] = [
    ("a newer full image", Art(), DEVICE, False),
    ("one of several device types", Art(device_types=("qemu-virt", "raspberrypi4")), DEVICE, False),
    ("the same version again", Art(provides=sv(3, "1.0.0")), DEVICE, False),
    ("an older version the deployment allows", Art(provides=sv(3, "0.9.0")), DEVICE, True),
    ("a delta from the running image", Art(payload_types=(DELTA,),
                                           depends={"rootfs-image.checksum": RUNNING_CHECKSUM}), DEVICE, False),
    ("a depends value given as a list", Art(depends={"rootfs-image.checksum": ("b" * 64, RUNNING_CHECKSUM)}),
     DEVICE, False),
    ("the artifact it depends on runs", Art(depends_artifact_names=("vv-0.9.0", "vv-1.0.0")), DEVICE, False),
    ("one of the device's groups", Art(depends_groups=("warehouse", "lobby")), DEVICE, False),
    ("security version at the floor", Art(provides=sv(3)), DEVICE, False),
    ("security version above the floor", Art(provides=sv(9)), DEVICE, False),
    ("no security version on a device with floor 0", Art(provides={"rootfs-image.version": "2.0.0"}),
     replace(DEVICE, security_floor=0), False),
    ("1.10.0 is newer than 1.9.2 (natural order)", Art(provides=sv(3, "1.10.0")),
     replace(DEVICE, provides={"rootfs-image.version": "1.9.2"}), False),
    ("a release is newer than its release candidate", Art(provides=sv(3, "1.0.0")),
     replace(DEVICE, provides={"rootfs-image.version": "1.0.0-rc2"}), False),
    ("no version known on the device", Art(), replace(DEVICE, provides={}, security_floor=0), False),
]


@pytest.mark.parametrize(("art", "device", "allow_downgrade"), [row[1:] for row in ACCEPTED],
                         ids=[row[0] for row in ACCEPTED])
def test_accepted_artifact_gives_the_slot_its_provides(art: Art, device: DeviceFacts, allow_downgrade: bool) -> None:
    provides = check_compatible(art.header(), device, allow_downgrade=allow_downgrade)
    assert provides == {**art.provides, "artifact_name": art.name}


REFUSED: list[tuple[str, Art, DeviceFacts, bool, str]] = [
    ("another device type", Art(device_types=("qemu-virt",)), DEVICE, False,
     "is for device types qemu-virt, this device is 'raspberrypi4'"),
    ("no payload", Art(payload_types=()), DEVICE, False, "has payloads []"),
    ("two payloads", Art(payload_types=(ROOTFS, ROOTFS)), DEVICE, False, "exactly one rootfs-image or rootfs-delta"),
    ("an update module payload", Art(payload_types=("single-file",)), DEVICE, False, "has payloads ['single-file']"),
    ("one payload type but two type-infos", Art(type_infos=2), DEVICE, False, "exactly one rootfs-image"),
    ("a delta that names no source image", Art(payload_types=(DELTA,)), DEVICE, False,
     "does not name the image it applies to"),
    ("a delta from another image", Art(payload_types=(DELTA,), depends={"rootfs-image.checksum": "b" * 64}),
     DEVICE, False, f"needs rootfs-image.checksum={'b' * 64}, this device has rootfs-image.checksum={RUNNING_CHECKSUM}"),
    ("a depends the device does not know", Art(depends={"hardware.revision": "2"}), DEVICE, False,
     "needs hardware.revision=2, this device has hardware.revision=(unknown)"),
    ("none of a list of depends values", Art(depends={"rootfs-image.checksum": ("b" * 64, "c" * 64)}), DEVICE, False,
     f"needs rootfs-image.checksum={'b' * 64}|{'c' * 64}"),
    ("depends on an artifact the device does not run", Art(depends_artifact_names=("vv-0.9.0",)), DEVICE, False,
     "depends on artifact vv-0.9.0; this device runs 'vv-1.0.0'"),
    ("depends on a group the device is not in", Art(depends_groups=("warehouse",)), DEVICE, False,
     "depends on group warehouse"),
    ("a group dependency on a device in no group", Art(depends_groups=("lobby",)), replace(DEVICE, groups=()), False,
     "depends on group lobby"),
    ("security version below the floor", Art(provides=sv(2)), DEVICE, False,
     "security version 2 of the artifact is below this device's floor 3"),
    ("no security version (0) on a device with a floor", Art(provides={"rootfs-image.version": "2.0.0"}), DEVICE,
     False,
     "security version 0 of the artifact is below this device's floor 3"),
    ("below the floor even when the deployment allows a downgrade", Art(provides=sv(2, "0.9.0")), DEVICE, True,
     "below this device's floor 3: refused whatever the deployment allows"),
    ("a security version that is no number", Art(provides=sv("3; rm -rf /")), DEVICE, False,
     "is not a non-negative integer"),
    ("a negative security version", Art(provides=sv(-1)), DEVICE, False, "is not a non-negative integer"),
    ("an older version", Art(provides=sv(3, "0.9.0")), DEVICE, False,
     "artifact version 0.9.0 is older than the running 1.0.0; the deployment does not allow a downgrade"),
    ("1.9.2 is older than 1.10.0 (natural order)", Art(provides={"rootfs-image.version": "1.9.2"}),
     replace(DEVICE, provides={"rootfs-image.version": "1.10.0"}, security_floor=0), False,
     "version 1.9.2 is older than the running 1.10.0"),
    ("a release candidate of the running release", Art(provides={"rootfs-image.version": "1.0.0-rc1"}),
     replace(DEVICE, security_floor=0), False, "version 1.0.0-rc1 is older than the running 1.0.0"),
]


@pytest.mark.parametrize(("art", "device", "allow_downgrade", "reason"), [row[1:] for row in REFUSED],
                         ids=[row[0] for row in REFUSED])
def test_refused_artifact_names_the_reason(art: Art, device: DeviceFacts, allow_downgrade: bool, reason: str) -> None:
    with pytest.raises(IncompatibleArtifact) as e:
        check_compatible(art.header(), device, allow_downgrade=allow_downgrade)
    assert reason in str(e.value)


def test_checks_run_in_order_device_type_first() -> None:
    """An artifact wrong in every way is refused for the first reason a user can act on: the device type."""
    art = Art(device_types=("qemu-virt",), payload_types=(ROOTFS, ROOTFS), depends_groups=("warehouse",),
              provides=sv(0, "0.1.0"))
    with pytest.raises(IncompatibleArtifact, match="is for device types qemu-virt"):
        check_compatible(art.header(), DEVICE)


def test_the_header_is_not_changed() -> None:
    """The returned provides are a new map: the verified header stays as it was signed."""
    header = Art().header()
    check_compatible(header, DEVICE)["artifact_name"] = "changed"
    assert dict(header.type_infos[0].provides) == sv(3)
