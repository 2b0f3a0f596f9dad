"""Shared test settings: everything offline, everything small."""
import os

# No test may reach a hub; model and dataset loading is always from local directories.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Keep torch to one thread per xdist worker: two workers share two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
