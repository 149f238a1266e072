"""The benchmark: `bin/bench` (python -m bench); see docs/performance.md."""
