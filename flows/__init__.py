"""Prefect flows: the DAG and nothing else. Importing this package makes Prefect offline-safe."""
import os

# No network here or in most clusters: Prefect's analytics otherwise log error tracebacks.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
