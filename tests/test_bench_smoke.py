"""The benchmark's smoke mode runs every workload at small scale against a real
PostgreSQL and gunicorn: it must finish with no message lost, duplicated or out
of order and no `pos` gap. Correctness only: timings on a shared machine say
nothing, so none are asserted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.server import REPO

pytestmark = pytest.mark.postgres


def _bench(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bench", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(bench: subprocess.Popen, timeout: float) -> str:
    """Its output; on timeout it is stopped as a user would (SIGTERM), so that it
    stops what it started instead of leaving it running as SIGKILL would."""
    try:
        return bench.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        bench.terminate()
        output = bench.communicate(timeout=60)[0]
        pytest.fail(f"bench did not finish in {timeout}s:\n{output[-3000:]}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_bench_smoke_delivers_everything_exactly_once_in_order(tmp_path) -> None:
    bench = _bench("smoke", "--out", str(tmp_path))
    output = _finish(bench, 240)
    assert bench.returncode == 0, output[-6000:]
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


def test_a_stopped_bench_stops_the_servers_and_the_cluster_it_started(tmp_path: Path) -> None:
    bench = _bench("latency", "--pairs", "2", "--rate", "10", "--duration", "60", "--out", str(tmp_path))
    spec_path = tmp_path / "1-latency-spec.json"
    deadline = time.monotonic() + 120
    while not spec_path.exists():  # written when the servers run and the load starts
        assert bench.poll() is None, bench.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the load never started"
        time.sleep(0.2)
    time.sleep(1)
    spec = json.loads(spec_path.read_text())
    started = [*spec["server_pids"], *spec["worker_pids"], spec["postgres_pid"]]
    assert all(_running(pid) for pid in started)
    bench.send_signal(signal.SIGTERM)
    output = _finish(bench, 60)
    assert bench.returncode == 128 + signal.SIGTERM, output[-3000:]
    deadline = time.monotonic() + 10  # an exited process lingers until its parent (init) reaps it
    while any(_running(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in started if _running(pid)] == []
