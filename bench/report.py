"""The benchmark's table, machine description and latency plot."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The targets of issue 4, on a 2-core machine with the load generator on it.
TARGETS = {
    ("latency", "rate<=200"): "delivery p50<=5 p99<=30, ack p99<=20 ms",
    ("latency", "rate>200"): "no loss; delivery p99<=100 ms",
    ("throughput", ""): ">=1000 msg/s acked and delivered",
    ("idle", ""): "all held; <=20 KiB/conn; active delivery p99<=30 ms",
    ("wake", ""): "cross-process p99<=10 ms",
}


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    try:
        memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(memory / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_end": loadavg(),
    }


def _ms(stats: dict, key: str) -> str:
    value = stats.get(key)
    return "-" if value is None else f"{value:g}"


def _row(result: dict) -> list[str]:
    workload = result["workload"]
    params = result["params"]
    cpu = result["cpu_secs"]
    cpu_text = f"{cpu['client']:g}/{cpu['server']:g}/{cpu['postgres']:g} in {cpu['wall_secs']:g}s"
    status = "FAIL " + ",".join(result["failures"]) if result["failures"] else "ok"
    if workload == "latency" or workload == "idle":
        d, a = result["delivery_ms"], result["ack_ms"]
        what = (
            f"P={params['pairs']} R={params['rate']:g}/s D={params['duration']:g}s"
            if workload == "latency"
            else f"K={params['idle']} held={result['idle_waiting_seen']:g} "
            f"{result['rss_per_idle_kib']:g} KiB/conn; active P={params['pairs']} R={params['rate']:g}/s"
        )
        numbers = (
            f"delivery p50/p90/p99/max {_ms(d, 'p50')}/{_ms(d, 'p90')}/{_ms(d, 'p99')}/{_ms(d, 'max')} ms; "
            f"ack p50/p99 {_ms(a, 'p50')}/{_ms(a, 'p99')} ms"
        )
    elif workload == "throughput":
        what = f"C={params['concurrency']} D={params['duration']:g}s"
        numbers = f"acked {result['acked_per_sec']:g}/s, delivered {result['delivered_per_sec']:g}/s"
    else:
        c, s = result["cross_process_ms"], result["same_process_ms"]
        what = f"samples={params['samples']}"
        w = result["cross_process_after_ack_ms"]
        numbers = (
            f"send -> woken poll answered: cross-process p50/p99/max "
            f"{_ms(c, 'p50')}/{_ms(c, 'p99')}/{_ms(c, 'max')} ms, "
            f"same instance p50/p99 {_ms(s, 'p50')}/{_ms(s, 'p99')} ms; "
            f"201 -> cross-process poll answered p50/p99 {_ms(w, 'p50')}/{_ms(w, 'p99')} ms"
        )
    sessions = str(result.get("postgres_sessions_opened", "-"))
    return [workload, what, numbers, cpu_text, sessions, str(cpu["load_average_before"][0]), status]


def table(results: list[dict]) -> str:
    header = ["workload", "parameters", "result", "CPU s client/server/pg", "PG sessions opened", "load", "checks"]
    rows = [header, *[_row(r) for r in results]]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
    return "\n".join(lines)


def plot_latency(results: list[dict], path: Path) -> Path | None:
    """CDFs of ack and delivery latency for every run that has samples."""
    series = [r for r in results if r.get("samples")]
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for result in series:
        params = result["params"]
        label = f"{result['workload']} R={params['rate']:g}/s P={params['pairs']}"
        if result["workload"] == "idle":
            label += f" beside {params['idle']} idle polls"
        for kind, style in (("delivery", "-"), ("ack", "--")):
            values = sorted(v * 1000 for v in result["samples"][kind])
            if not values:
                continue
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            ax.plot(values, fractions, style, label=f"{kind}, {label}")
    ax.set_xscale("log")
    ax.set_xlabel("latency from scheduled send time (ms, log scale)")
    ax.set_ylabel("fraction of messages")
    ax.set_title("chatapi latency CDF (PostgreSQL, gunicorn+gevent, 2 cores shared with the load generator)")
    ax.title.set_fontsize(9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
