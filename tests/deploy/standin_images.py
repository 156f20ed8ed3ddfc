"""Local stand-ins for the images docker-compose.yml and docker/Dockerfile.cpu name, for the live
deployment test on machines that cannot reach Docker Hub: a Debian bookworm root filesystem made
with debootstrap and imported, then Debian's python3, redis-server and prometheus on top, each
tagged with the official name it stands in for. A tag that already exists without the stand-in
label is a real image and is used as it is; stand-ins already built are reused.

Also a PEP 503 mirror of torch for the image build: the image installs torch from
TORCH_INDEX_URL (the PyTorch CPU index by default), which is out of reach too, so the test serves
the torch this machine's own pip configuration resolves, with its dependencies, over HTTP on the
Docker bridge.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import html
import http.server
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent / "standin-images"
BASE_IMAGE = "hmt-standin/debian:bookworm"
LABEL = "org.hmt-serve.standin"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def docker(*args: str, timeout: float = 900, input_bytes: bytes | None = None) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, timeout=timeout, input=input_bytes)
    if result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed:\n{result.stderr.decode(errors='replace')[-4000:]}")
    return result.stdout.decode()


def image_label(tag: str) -> str | None:
    """The stand-in label of an existing image ('' when it has none); None when there is no such image."""
    result = subprocess.run(["docker", "image", "inspect", "-f", f'{{{{index .Config.Labels "{LABEL}"}}}}', tag],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return None
    return result.stdout.strip().replace("<no value>", "")


def ensure_base_image() -> None:
    """Debian bookworm, minbase, imported as BASE_IMAGE (about half a minute the first time)."""
    if image_label(BASE_IMAGE) is not None:
        return
    with tempfile.TemporaryDirectory(prefix="hmt-rootfs-") as tmp:
        rootfs = Path(tmp) / "bookworm"
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs)], check=True,
                       capture_output=True, timeout=900)
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], check=True, capture_output=True, timeout=300)
        docker("import", "--change", f"LABEL {LABEL}=debian", "-", BASE_IMAGE, input_bytes=tar.stdout)


def ensure_standin(tag: str, kind: str) -> str:
    """`tag` as a stand-in built from standin-images/<kind>.Dockerfile, unless a real image or an
    earlier stand-in already has that tag. Returns what was used: 'real', 'reused' or 'built'."""
    label = image_label(tag)
    if label == "":
        return "real"
    if label is not None:
        return "reused"
    ensure_base_image()
    with tempfile.TemporaryDirectory(prefix=f"hmt-standin-{kind}-") as tmp:
        context = Path(tmp)
        for item in HERE.iterdir():
            shutil.copy2(item, context / item.name)
        shutil.copy2(HOST_CA_BUNDLE, context / "ca-certificates.crt")
        (context / "pip.conf").write_text(f"[global]\ncert = {HOST_CA_BUNDLE}\n")
        # the classic builder: BuildKit needs the buildx plugin, which Debian's docker.io lacks
        subprocess.run(["docker", "build", "-q", "-f", f"{kind}.Dockerfile", "-t", tag, "."], cwd=context,
                       check=True, capture_output=True, timeout=900, env=classic_builder_env())
    return "built"


def classic_builder_env() -> dict[str, str]:
    return {**os.environ, "DOCKER_BUILDKIT": "0"}


def bridge_gateway() -> str:
    """The host's address on Docker's default bridge, where build containers reach it. IPAM names
    it on some engines; otherwise it is the bridge interface's own address."""
    gateway = docker("network", "inspect", "bridge", "-f", "{{range .IPAM.Config}}{{.Gateway}}{{end}}").strip()
    if gateway:
        return gateway
    interface = docker("network", "inspect", "bridge", "-f",
                       '{{index .Options "com.docker.network.bridge.name"}}').strip() or "docker0"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        request = struct.pack("256s", interface.encode()[:15])
        return socket.inet_ntoa(fcntl.ioctl(probe.fileno(), 0x8915, request)[20:24])  # SIOCGIFADDR


def write_torch_mirror(root: Path, torch_version: str) -> Path:
    """A simple index at root/simple with torch==torch_version and its dependencies, as this
    machine's pip configuration resolves them (here: the local CPU build)."""
    files = root / "files"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                    f"torch=={torch_version}", "-d", str(files)], check=True, capture_output=True, timeout=900)
    for wheel in sorted(files.iterdir()):
        page = root / "simple" / canonicalize_name(wheel.name.split("-")[0]) / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        with page.open("a") as out:
            out.write(f'<a href="../../files/{urllib.parse.quote(wheel.name)}">{html.escape(wheel.name)}</a>\n')
    return root / "simple"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_directory(root: Path, host: str) -> Iterator[int]:
    """Serve root over HTTP on host (the Docker bridge's gateway, where build containers reach it)."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
