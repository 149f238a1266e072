"""The README's curl walkthrough, run as written against a live server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from tests.support.server import REPO


def walkthrough() -> str:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- walkthrough:start -->\s*```sh\n(.*?)```\s*<!-- walkthrough:end -->", readme, re.S)
    assert block, "README.md lost its walkthrough markers"
    return block.group(1)


def test_readme_walkthrough_works(start_server, tmp_path) -> None:
    assert shutil.which("curl"), "curl is needed to run the README walkthrough"
    server = start_server(f"sqlite:///{tmp_path / 'readme.sqlite3'}")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", walkthrough()],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "API": server.base_url + "/api/v1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    documents = [json.loads(line) for line in lines[:-2]]
    alice, bob, bob_starts, sent, bob_events, read, alice_events = documents
    assert (alice["username"], bob["username"]) == ("alice", "bob")
    assert bob_starts["peer"] == "alice" and bob_starts["last_seq"] == 0
    assert sent["seq"] == 1 and sent["text"] == "Hi Bob!" and sent["client_id"] == "alice-1"
    assert [e["message"] for e in bob_events["events"] if e["type"] == "message"] == [sent]
    assert read["read_seq"] == 1 and read["unread"] == 0
    bob_receipts = [e for e in alice_events["events"] if e["type"] == "receipt" and e["user"] == "bob"]
    assert [(r["delivered_seq"], r["read_seq"]) for r in bob_receipts] == [(1, 1)]
    assert lines[-2] == "204"
    assert json.loads(lines[-1])["error"]["code"] == "unauthorized"


def test_the_configuration_table_lists_every_variable_the_code_reads() -> None:
    """One place documents the configuration: a variable added to the code must be added there."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([A-Z][A-Z_]+)`", section))
    code = "".join(path.read_text() for path in [*(REPO / "chatapi").glob("*.py"), REPO / "gunicorn.conf.py"])
    read = set(re.findall(r'"(CHATAPI_[A-Z_]+)"', code))
    # config.py reads the rate limits through a helper, by suffix: limit("SEND_PER_USER").
    read |= {f"CHATAPI_RATE_LIMIT_{suffix}" for suffix in re.findall(r'limit\("([A-Z_]+)"\)', code)}
    assert len(read) > 20, f"found only {sorted(read)} in the code: the patterns are out of date"
    # The scripts' and the tests' own: a shell default in bin/, os.environ's in Python.
    tools = [*(REPO / "bin").iterdir(), *(REPO / "tests").rglob("*.py"), *(REPO / "bench").glob("*.py")]
    tools_text = "".join(path.read_text() for path in tools)
    by_tools = set(re.findall(r"\$\{([A-Z_]+)", tools_text))
    by_tools |= set(re.findall(r'os\.environ(?:\.get\(|\[)"([A-Z_]+)"', tools_text + code))
    assert {"PYTHON", "CHATAPI_PYTHON", "CHATAPI_PG_BIN"} <= by_tools, "the patterns are out of date"
    read |= by_tools
    assert read - documented == set()

    # And no document or example names a variable that does not exist (a
    # misspelt one is silently ignored by whoever sets it).
    def named(path: Path) -> set[str]:
        return set(re.findall(r"\b(CHATAPI_[A-Z_]*[A-Z])\b", path.read_text()))

    read |= {name for path in tools for name in named(path)}
    for path in [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "deploy").rglob("*.*")]:
        assert named(path) - read == set(), f"{path.name} names variables nothing reads"
