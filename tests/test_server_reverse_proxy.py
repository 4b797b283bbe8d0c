"""The update server behind a real nginx that terminates TLS (docs/server.md, "Behind a reverse proxy").

The nginx ``server`` block is read from docs/server.md itself: only its listen address, certificate paths and
upstream port are replaced, so the docs and this test cannot drift apart. ``build.py server`` listens over plain
HTTP on 127.0.0.1; every client here talks to nginx over HTTPS and verifies it against the run's CA.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import ssl
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.net import free_port
from ota_common.tls import make_ca, make_server_cert

from .conftest import REPO, make_payload
from .server_helpers import Device, Server, deploy, upload, write_artifact

DOCS = REPO / "docs" / "server.md"
#: nginx's own default client_max_body_size: the uploaded artifact is larger, so the block's setting matters
NGINX_DEFAULT_MAX_BODY = 1024 * 1024


def documented_server_block() -> str:
    """The ```nginx block of docs/server.md's "Behind a reverse proxy" section."""
    m = re.search(r"^### Behind a reverse proxy$.*?^```nginx\n(.*?)^```$", DOCS.read_text(), re.S | re.M)
    assert m, "docs/server.md has no ```nginx block under '### Behind a reverse proxy'"
    return m.group(1)


@dataclass
class Site:
    """What the proxy and the server share: a CA, nginx's certificate for 127.0.0.1, and both ports."""

    base: Path
    ca: Path
    cert: Path
    key: Path
    proxy_port: int
    server_port: int

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.proxy_port}"

    def verify(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    base = tmp_path_factory.mktemp("reverse-proxy")
    ca, ca_key = make_ca(base / "ca")
    cert, key = make_server_cert(ca, ca_key, base / "tls", ["127.0.0.1"])
    return Site(base, ca, cert, key, proxy_port=free_port(), server_port=free_port())


def nginx_conf(site: Site, conf_dir: Path) -> str:
    """A complete nginx.conf around the documented server block: in the foreground, every file in conf_dir."""
    block = documented_server_block()
    for old, new in (
        ("listen 443 ssl;", f"listen 127.0.0.1:{site.proxy_port} ssl;"),
        ("/etc/ota/tls/server.pem", str(site.cert)),
        ("/etc/ota/tls/server.key", str(site.key)),
        ("proxy_pass http://127.0.0.1:8080;", f"proxy_pass http://127.0.0.1:{site.server_port};"),
    ):
        assert block.count(old) == 1, f"the nginx block of docs/server.md no longer has {old!r} once:\n{block}"
        block = block.replace(old, new)
    temp_paths = "\n".join(f"    {kind}_temp_path {conf_dir / kind};"
                           for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""\
daemon off;
worker_processes 1;
pid {conf_dir / "nginx.pid"};
error_log {conf_dir / "error.log"} info;

events {{
    worker_connections 64;
}}

http {{
    access_log {conf_dir / "access.log"};
{temp_paths}

{textwrap.indent(block, "    ")}
}}
"""


@dataclass
class Nginx:
    proc: subprocess.Popen[bytes]
    conf_dir: Path

    def access_log(self) -> str:
        return (self.conf_dir / "access.log").read_text()

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{(self.conf_dir / name).read_text()}" for name in ("nginx.out", "error.log")
                         if (self.conf_dir / name).exists())


@pytest.fixture(scope="module")
def nginx(site: Site) -> Iterator[Nginx]:
    """``nginx -c <conf>`` in the foreground, proxying to site.server_port (whether a server listens there or
    not); stopped at the end of the module."""
    if shutil.which("nginx") is None:
        pytest.fail("nginx is not installed: run scripts/install.sh (apt-get install nginx)")
    conf_dir = site.base / "nginx"
    conf_dir.mkdir()
    conf = conf_dir / "nginx.conf"
    conf.write_text(nginx_conf(site, conf_dir))
    cmd = ["nginx", "-p", str(conf_dir), "-e", str(conf_dir / "error.log"), "-c", str(conf)]
    check = subprocess.run([*cmd, "-t"], capture_output=True, text=True)
    assert check.returncode == 0, f"nginx -t refused the configuration:\n{check.stderr}\n{conf.read_text()}"
    with open(conf_dir / "nginx.out", "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    n = Nginx(proc, conf_dir)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"nginx exited with {proc.returncode}:\n{n.logs()}"
            try:  # any HTTP answer (a 502 while no server listens) means nginx serves TLS on its port
                httpx.get(site.url + "/health", verify=site.verify(), timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"nginx did not come up:\n{n.logs()}"
                time.sleep(0.1)
        yield n
    finally:
        _stop_nginx(proc)


def _stop_nginx(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # fast shutdown: the master stops its workers
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the workers too
            proc.wait()


@pytest.fixture
def start_server(site: Site, keys: dict[str, tuple[Path, Path]]) -> Iterator[Callable[..., Server]]:
    """Start ``build.py server`` over plain HTTP on site.server_port (the port nginx proxies to), with extra
    options; every test starts the same server (one database, one storage) and it is stopped after the test."""
    started: list[Server] = []

    def start(*args: str) -> Server:
        s = Server(site.base / "server", "--release-key", str(keys["ec"][1]), *args)
        s.port, s.url = site.server_port, f"http://127.0.0.1:{site.server_port}"
        started.append(s)
        return s.start()

    yield start
    for s in started:
        if s.proc is not None:
            s.stop()


def through(server: Server, site: Site) -> Server:
    """The server as its clients see it through nginx: Device, upload and deploy go to https://127.0.0.1:<nginx
    port> and verify it against the CA. (A view: stop the server itself, not this.)"""
    view = copy.copy(server)
    view.url, view.verify = site.url, site.verify()
    return view


def test_device_through_nginx_gets_https_links_and_ranges(
    site: Site, nginx: Nginx, start_server: Callable[..., Server], keys: dict[str, tuple[Path, Path]],
    run_cli: Callable[..., Any], tmp_path: Path,
) -> None:
    server = start_server()  # default --forwarded-allow-ips 127.0.0.1,::1: nginx on this machine is trusted
    assert server.url.startswith("http://")
    proxy = through(server, site)
    dev = Device(proxy)
    dev_id = dev.accept()  # signed auth requests through nginx: 401 pending, accepted, then a token
    assert dev.next().status_code == 204

    payload = make_payload(tmp_path / "app.bin", 1_500_000)
    art = tmp_path / "big.mender"
    run_cli("artifact", "write", "module-image", "--type", "vv-app", "--file", payload, "--name", "proxied-app-1",
            "-t", "qemu-virt", "--compression", "none", "--key", keys["ec"][0], "-o", art, check=True)
    data = art.read_bytes()
    assert len(data) > NGINX_DEFAULT_MAX_BODY, "the upload must exceed nginx's default client_max_body_size"
    r = upload(proxy, art)
    assert r.status_code == 201, f"{r.status_code} {r.text}\n{nginx.logs()}"
    with proxy.admin() as a:
        (stored,) = a.get("/api/management/v1/deployments/artifacts", params={"name": "proxied-app-1"}).json()
    assert stored["size"] == len(data), "the upload arrived whole"

    dep_id = deploy(proxy, name="through nginx", artifact_name="proxied-app-1", devices=[dev_id])
    r = dev.next()
    assert r.status_code == 200 and r.json()["id"] == dep_id, r.text
    uri = r.json()["artifact"]["source"]["uri"]
    # the server saw X-Forwarded-Proto: https from 127.0.0.1 and Host: 127.0.0.1:<nginx port>
    assert uri.startswith(f"{site.url}/api/devices/v1/download/"), uri

    with httpx.Client(verify=site.verify(), timeout=30) as c:  # the signed link needs no Authorization
        part = c.get(uri, headers={"Range": "bytes=1000-500999"})
        assert part.status_code == 206, part.text
        assert part.headers["content-range"] == f"bytes 1000-500999/{len(data)}"
        assert part.content == data[1000:501000]
        whole = c.get(uri)
        assert whole.status_code == 200 and whole.content == data
    download = uri.split(site.url, 1)[1]
    assert f'"GET {download} HTTP/1.1" 206 ' in nginx.access_log(), "the ranged download went through nginx"
    assert dev.status(dep_id, "success").status_code == 204


def test_server_trusting_no_proxy_ignores_x_forwarded_proto(
    site: Site, nginx: Nginx, start_server: Callable[..., Server], keys: dict[str, tuple[Path, Path]],
    run_cli: Callable[..., Any], tmp_path: Path,
) -> None:
    """The same server and the same nginx, the server started with --forwarded-allow-ips '': nginx still sends
    X-Forwarded-Proto: https, the server ignores it and hands out http:// links."""
    proxy = through(start_server("--forwarded-allow-ips", ""), site)
    dev = Device(proxy)
    dev_id = dev.accept()
    art = write_artifact(run_cli, tmp_path / "a.mender", "proxied-app-2", key=keys["ec"][0])
    assert upload(proxy, art).status_code == 201
    dep_id = deploy(proxy, name="header ignored", artifact_name="proxied-app-2", devices=[dev_id])
    r = dev.next()
    assert r.status_code == 200 and r.json()["id"] == dep_id, r.text
    assert r.json()["artifact"]["source"]["uri"].startswith(
        f"http://127.0.0.1:{site.proxy_port}/api/devices/v1/download/"), r.text
