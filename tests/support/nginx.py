"""A throwaway nginx in front of chatapi instances, made from the shipped
deploy/nginx/chatapi.conf: its own prefix directory, pid file and logs, a
free loopback port, and the upstream servers replaced by the test's."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.support.ports import free_port, wait_until_answering
from tests.support.server import REPO

SITE = REPO / "deploy" / "nginx" / "chatapi.conf"


def find_nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        raise RuntimeError("nginx not found: install Debian's nginx-light (bin/test does it as root)")
    return found


def site_for(upstream_ports: list[int], port: int) -> str:
    """The shipped site with the test's upstreams and listening port."""
    site = SITE.read_text()
    servers = "".join(f"    server 127.0.0.1:{p};\n" for p in upstream_ports)
    site, count = re.subn(r"^    server [^\s;]+;\n", servers, site, flags=re.M)
    assert count == 1, "deploy/nginx/chatapi.conf: upstream server line not found"
    site, count = re.subn(
        r"^    listen 80;\n    listen \[::\]:80;\n", f"    listen 127.0.0.1:{port};\n", site, flags=re.M
    )
    assert count == 1, "deploy/nginx/chatapi.conf: listen lines not found"
    return site


class NginxProcess:
    def __init__(self, upstream_ports: list[int]) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.prefix = Path(tempfile.mkdtemp(prefix="chatapi-nginx-"))
        # nginx's workers drop root privileges to nobody: they must reach the temp dirs.
        os.chmod(self.prefix, 0o755)
        for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.prefix / name).mkdir(mode=0o777)
            os.chmod(self.prefix / name, 0o777)
        (self.prefix / "chatapi.conf").write_text(site_for(upstream_ports, self.port))
        mime = "include /etc/nginx/mime.types;" if Path("/etc/nginx/mime.types").exists() else ""
        (self.prefix / "nginx.conf").write_text(
            f"""daemon off;
pid {self.prefix}/nginx.pid;
error_log {self.prefix}/error.log info;
worker_processes 1;
events {{ worker_connections 1024; }}
http {{
    {mime}
    default_type application/octet-stream;
    access_log {self.prefix}/access.log;
    client_body_temp_path {self.prefix}/body;
    proxy_temp_path {self.prefix}/proxy;
    fastcgi_temp_path {self.prefix}/fastcgi;
    uwsgi_temp_path {self.prefix}/uwsgi;
    scgi_temp_path {self.prefix}/scgi;
    include {self.prefix}/chatapi.conf;
}}
"""
        )
        self.process: subprocess.Popen | None = None

    def command(self, *extra: str) -> list[str]:
        return [
            find_nginx(),
            "-p",
            str(self.prefix),
            "-c",
            str(self.prefix / "nginx.conf"),
            "-e",
            str(self.prefix / "error.log"),
            *extra,
        ]

    def start(self, timeout: float = 15) -> NginxProcess:
        check = subprocess.run(self.command("-t"), capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            # Any answer will do: nginx is up even when no upstream is.
            wait_until_answering(self.process, self.base_url + "/healthz", timeout, describe=self.error_log)
        except TimeoutError:
            self.stop()
            raise
        return self

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        shutil.rmtree(self.prefix, ignore_errors=True)
