"""Benchmark harness: workloads, peer runners (each peer in its own venv) and the side-by-side table (`run.py`)."""
