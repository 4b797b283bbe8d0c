"""Layer files: validated before merging, every problem reported with its file and key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from image.layers import LayerError, load_layer, load_layers, merge_layers


def _layer(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


def test_valid_layer_loads_with_sources_resolved(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "app.py").write_text("print('hi')\n")
    (tmp_path / "tree").mkdir()
    p = _layer(tmp_path, "app", """
description: the app
packages: [python3, python3-requests]
files:
  - {src: files/app.py, dest: /opt/vv/app.py, mode: "0755", owner: "vvai:vvai"}
trees:
  - {src: tree, dest: /opt/vv/static}
templates:
  - {src: files/app.py, dest: /etc/vv/.env, mode: "0600"}
units: {enable: [vv-video-ai.service], mask: [apt-daily.timer]}
users: [{name: vvai, groups: [video]}]
groups: [{name: video}]
variables: {DVR_IP: 192.168.1.10, DEVICE_ID: unset}
commands: ["systemctl set-default multi-user.target"]
""")
    layer = load_layer(p)
    assert layer.name == "app"
    assert layer.model.files[0].mode == "0755"
    assert layer.source("files/app.py") == (tmp_path / "files" / "app.py").resolve()


def test_every_problem_is_reported_with_file_and_key_path(tmp_path: Path) -> None:
    p = _layer(tmp_path, "bad", """
pakages: [python3]
packages: [Not A Package]
files:
  - {src: x, dest: relative/path}
  - {src: y, dest: /etc/ok, mode: "rwx", colour: blue}
units: {enable: [not-a-unit]}
variables: {"1BAD": x}
""")
    with pytest.raises(LayerError) as exc:
        load_layer(p)
    msg = str(exc.value)
    for expected in (
        f"{p}: pakages: unknown key",
        f"{p}: packages: not a Debian package name",
        f"{p}: files[0].dest: must be a normalised absolute path",
        f"{p}: files[1].mode: must be an octal mode",
        f"{p}: files[1].colour: unknown key",
        f"{p}: units.enable: not a systemd unit name",
        f"{p}: variables: not a variable name",
    ):
        assert expected in msg, msg


def test_wrong_types_and_missing_sources_are_errors(tmp_path: Path) -> None:
    p = _layer(tmp_path, "types", "packages: python3\ncommands: [1]\n")
    with pytest.raises(LayerError, match=r"packages: Input should be a valid tuple"):
        load_layer(p)
    q = _layer(tmp_path, "missing", "files: [{src: nope.txt, dest: /etc/nope}]\ntrees: [{src: nodir, dest: /x}]\n")
    with pytest.raises(LayerError) as exc:
        load_layer(q)
    assert "files[0].src: file not found" in str(exc.value) and "trees[0].src: directory not found" in str(exc.value)
    with pytest.raises(LayerError, match="not valid YAML"):
        load_layer(_layer(tmp_path, "yaml", "packages: [\n"))
    with pytest.raises(LayerError, match="layer file must be a mapping"):
        load_layer(_layer(tmp_path, "list", "- a\n"))


def test_all_invalid_files_are_reported_together(tmp_path: Path) -> None:
    a = _layer(tmp_path, "a", "bogus: 1\n")
    b = _layer(tmp_path, "b", "packages: [ok]\n")
    c = _layer(tmp_path, "c", "units: {mask: [x]}\n")
    with pytest.raises(LayerError) as exc:
        load_layers([a, b, c])
    assert str(a) in str(exc.value) and str(c) in str(exc.value) and str(b) not in str(exc.value)


def test_merge_rules(tmp_path: Path) -> None:
    for n in ("one", "two"):
        (tmp_path / f"{n}.conf").write_text(n)
    base = _layer(tmp_path, "base", """
packages: [systemd, openssh-server]
files: [{src: one.conf, dest: /etc/x.conf}]
units: {enable: [ssh.service]}
variables: {A: base, B: base}
commands: [first]
""")
    app = _layer(tmp_path, "app", """
packages: [python3, systemd]
files: [{src: two.conf, dest: /etc/x.conf, mode: "0600"}]
units: {enable: [vv.service, ssh.service]}
variables: {B: app}
commands: [second]
""")
    merged = merge_layers(load_layers([base, app]))
    assert merged.packages == ("systemd", "openssh-server", "python3")
    (f,) = merged.files
    assert (f.source.name, f.mode, f.layer) == ("two.conf", 0o600, "app")
    assert merged.enable == ("ssh.service", "vv.service")
    assert merged.variables == {"A": "base", "B": "app"}
    assert merged.commands == (("base", "first"), ("app", "second"))

    masker = _layer(tmp_path, "masker", "units: {mask: [ssh.service]}\n")
    with pytest.raises(LayerError, match="both enabled and masked: ssh.service"):
        merge_layers(load_layers([base, masker]))


def test_config_variables_are_checked_names_merged_as_an_ordered_union(tmp_path: Path) -> None:
    base = _layer(tmp_path, "base", "config_variables: [DVR_IP, SITE]\n")
    app = _layer(tmp_path, "app", "config_variables: [DEVICE_ID, DVR_IP]\n")
    merged = merge_layers(load_layers([base, app]))
    assert merged.config_variables == ("DVR_IP", "SITE", "DEVICE_ID")
    bad = _layer(tmp_path, "bad", "config_variables: [OK_NAME, LD_PRELOAD, lower, PYTHONPATH, 9LIVES]\n")
    with pytest.raises(LayerError) as exc:
        load_layer(bad)
    msg = str(exc.value)
    for i, name, why in ((1, "LD_PRELOAD", "changes how programs load code or run commands"),
                         (2, "lower", "not a variable name"),
                         (3, "PYTHONPATH", "changes how programs load code or run commands"),
                         (4, "9LIVES", "not a variable name")):
        assert f"{bad}: config_variables[{i}]: {name!r}: {why}" in msg, msg
    assert "OK_NAME" not in msg
    with pytest.raises(LayerError, match=r"config_variables: Input should be a valid tuple"):
        load_layer(_layer(tmp_path, "scalar", "config_variables: DEVICE_ID\n"))


def test_the_app_layer_declares_its_variables_and_the_base_key_ignores_them(tmp_path: Path) -> None:
    from image.release import DEFAULT_CONFIG
    from image.rootfs import base_spec

    layers_dir = DEFAULT_CONFIG.parent / "layers"
    layers = load_layers([layers_dir / f"{n}.yaml" for n in ("base", "boot", "ota", "app")])
    merged = merge_layers(layers)
    assert merged.config_variables == ("DEVICE_ID", "DVR_IP")
    # the cached base rootfs is keyed by packages and initramfs files only: declaring (or changing) the
    # configuration variables must not cost a new bootstrap
    from dataclasses import replace

    without = replace(merged, config_variables=())
    assert base_spec("bookworm", "", merged).key == base_spec("bookworm", "", without).key
    more = _layer(tmp_path, "more", "config_variables: [SITE]\n")
    with_more = merge_layers([*layers, load_layer(more)])
    assert with_more.config_variables == ("DEVICE_ID", "DVR_IP", "SITE")
    assert base_spec("bookworm", "", with_more).key == base_spec("bookworm", "", merged).key


def test_required_config_must_be_settable_and_its_placeholder_one_word(tmp_path: Path) -> None:
    app = _layer(tmp_path, "app", "variables: {DVR_IP: 192.168.1.100, SITE: x}\nconfig_variables: [DVR_IP, SITE]\n"
                                  "required_config: [DVR_IP]\n")
    more = _layer(tmp_path, "more", "required_config: [SITE, DVR_IP]\n")
    merged = merge_layers(load_layers([app, more]))
    assert merged.required_config == ("DVR_IP", "SITE")
    assert merged.config_placeholders == {"DVR_IP": "192.168.1.100", "SITE": "x"}
    orphan = _layer(tmp_path, "orphan", "required_config: [CAMERA_URL]\n")
    with pytest.raises(LayerError, match="required_config: CAMERA_URL is not in any layer's config_variables"):
        merge_layers(load_layers([app, orphan]))
    spaced = _layer(tmp_path, "spaced", "variables: {SITE: north wing}\n")
    with pytest.raises(LayerError, match="SITE: the placeholder of a required variable must not contain whitespace"):
        merge_layers(load_layers([app, more, spaced]))
    with pytest.raises(LayerError, match=r"required_config\[0\]: 'LD_PRELOAD': changes how programs load code"):
        load_layer(_layer(tmp_path, "bad", "required_config: [LD_PRELOAD]\n"))


def test_initramfs_carries_what_a_real_pi4_needs_to_find_its_root() -> None:
    """On a Pi 4 the SD card is on emmc2, whose vqmmc is a regulator-gpio and vmmc a regulator-fixed: modules in
    Debian's kernel that emmc2 waits for. Emulation uses the other controller and cannot show them missing."""
    listed = (Path(__file__).resolve().parent.parent / "layers" / "boot" / "files" / "initramfs-modules").read_text()
    modules = {line.strip() for line in listed.splitlines() if line.strip() and not line.startswith("#")}
    assert {"sdhci_iproc", "gpio-regulator", "fixed", "mmc_block", "ext4"} <= modules
