"""The files in deploy/ agree with each other, with docs/deploy.md and with the code they run.

An operator copies them as they are: an address, a path or a header that
differs between them is a service that does not answer, or answers less safely.
"""

from __future__ import annotations

import re

from chatapi.config import LONG_POLL_MAX_SECS
from chatapi.web import CONTENT_SECURITY_POLICY
from tests.support.server import REPO

SITE = (REPO / "deploy" / "nginx" / "chatapi.conf").read_text()
UNIT = (REPO / "deploy" / "systemd" / "chatapi.service").read_text()
ENV_EXAMPLE = (REPO / "deploy" / "systemd" / "chatapi.env.example").read_text()
DEPLOY_MD = (REPO / "docs" / "deploy.md").read_text()


def unit(name: str) -> str:
    """The value of one setting of chatapi.service."""
    [value] = re.findall(rf"^{name}=(.*)$", UNIT, re.M)
    return value


def test_nginx_proxies_to_the_address_the_example_instance_listens_on() -> None:
    upstream = re.search(r"^upstream chatapi \{\n(.*?)^\}", SITE, re.S | re.M).group(1)
    [bind] = re.findall(r"^CHATAPI_BIND=(\S+)$", ENV_EXAMPLE, re.M)
    assert re.findall(r"^    server (\S+);", upstream, re.M) == [bind]


def test_the_unit_runs_the_code_and_reads_the_settings_where_the_guide_puts_them() -> None:
    home = unit("WorkingDirectory")
    # The console script, which a binary upgrade needs (docs/deploy.md), and the shipped settings.
    assert unit("ExecStart") == f"{home}/.venv/bin/gunicorn -c gunicorn.conf.py wsgi:app"
    assert f"useradd --system --home {home} {unit('User')}" in DEPLOY_MD
    assert unit("Group") == unit("User")  # the group useradd makes
    settings = unit("EnvironmentFile")
    assert ENV_EXAMPLE.startswith(f"# {settings}, read by chatapi.service")
    assert f"`{settings}`" in DEPLOY_MD
    # The unit lets the service write one directory: the guide's SQLite file (and its lock) must be there.
    assert f"`sqlite:///{unit('ReadWritePaths')}/chatapi.sqlite3`" in DEPLOY_MD
    assert f"alias {home}/web/;" in SITE


def test_nginx_outwaits_the_longest_long_poll() -> None:
    [read_timeout] = re.findall(r"^\s*proxy_read_timeout (\d+)s;", SITE, re.M)
    assert int(read_timeout) > LONG_POLL_MAX_SECS


def test_the_page_served_from_disk_by_nginx_gets_the_apps_policy() -> None:
    assert f"""add_header Content-Security-Policy "{CONTENT_SECURITY_POLICY}";""" in SITE
