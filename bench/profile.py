"""Profile the hot paths in-process: `python -m bench.profile [N]`.

Runs the app (Flask test client, no HTTP server) on a throwaway PostgreSQL
database and profiles N sends and N event polls with pyinstrument; writes
HTML profiles to bench/results/. For the why behind each optimization see
docs/performance.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pyinstrument import Profiler

from bench.server import REPO
from chatapi import Settings, create_app
from tests.conftest import migrate
from tests.support.postgres import PostgresCluster


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    out = REPO / "bench" / "results" / "profiles"
    out.mkdir(parents=True, exist_ok=True)
    cluster = PostgresCluster()
    cluster.start()
    try:
        url = cluster.new_database()
        migrate(url)
        app = create_app(Settings.from_env({"CHATAPI_DATABASE_URL": url, "CHATAPI_RATE_LIMITS": "off"}))
        client = app.test_client()
        tokens = []
        for name in ("alice", "bob"):
            client.post("/api/v1/users", json={"username": name, "password": "correct horse battery"})
            answer = client.post("/api/v1/tokens", json={"username": name, "password": "correct horse battery"})
            tokens.append({"Authorization": f"Bearer {answer.get_json()['token']}"})
        conversation = client.post("/api/v1/conversations", json={"peer": "bob"}, headers=tokens[0]).get_json()
        path = f"/api/v1/conversations/{conversation['id']}/messages"
        for i in range(50):  # warm up caches and the pool
            client.post(path, json={"text": f"warm {i}"}, headers=tokens[0])
        cursor = {"after": 0}

        def send(i: int) -> None:
            answer = client.post(path, json={"text": f"hello {i}"}, headers=tokens[0])
            assert answer.status_code == 201, answer.get_data()

        def events(i: int) -> None:
            # Bob reads two events at a time: each request acknowledges a message.
            page = client.get(f"/api/v1/events?after={cursor['after']}&timeout=0&limit=2", headers=tokens[1])
            items = page.get_json()["events"]
            cursor["after"] = items[-1]["pos"] if items else cursor["after"]

        timings = {}
        for name, step in (("send", send), ("events", events)):
            started, cpu = time.perf_counter(), time.process_time()
            for i in range(count):
                step(i)
            timings[name] = ((time.perf_counter() - started) / count * 1000, (time.process_time() - cpu) / count * 1000)
            profiler = Profiler(interval=0.0005)
            profiler.start()
            for i in range(count):
                step(count + i)
            profiler.stop()
            Path(out / f"{name}.html").write_text(profiler.output_html())
            print(profiler.output_text(unicode=False, color=False, show_all=False)[:6000])
        for name, (wall, cpu) in timings.items():
            print(f"{name}: {wall:.2f} ms wall, {cpu:.2f} ms CPU per request (in-process, unprofiled, one at a time)")
        app.extensions["chatapi"].notifier.stop()
        app.extensions["chatapi"].db.dispose()
    finally:
        cluster.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
