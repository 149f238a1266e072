"""The benchmark's smoke mode runs every workload at small scale against a real
PostgreSQL and gunicorn: it must finish with no message lost, duplicated or out
of order and no `pos` gap. Correctness only: timings on a shared machine say
nothing, so none are asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.server import REPO

pytestmark = pytest.mark.postgres


def test_bench_smoke_delivers_everything_exactly_once_in_order(tmp_path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench", "smoke", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["workload"] for r in summary["results"]] == ["latency", "throughput", "idle", "wake"]
    for result in summary["results"]:
        assert result["failures"] == [], result
        checks = result["checks"]
        assert checks["lost"] == checks["duplicated"] == checks["out_of_order"] == checks["pos_gaps"] == 0, result
        # Nothing lost out of nothing sent would pass the checks above too.
        measured = result.get("delivery_ms") or result["cross_process_ms"]
        assert measured["count"] > 0, result["workload"]
    assert summary["results"][0]["acked"] == summary["results"][0]["scheduled"] > 0
