"""Prefect flows: the DAG and nothing else. Importing this package makes Prefect offline-safe."""
import os

# No network here or in most clusters: Prefect's analytics otherwise log error tracebacks.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# With no PREFECT_API_URL, Prefect starts a local server whose first start creates and migrates
# its SQLite database: longer than Prefect's 20 s default on 2 busy cores. An explicit setting wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
# The store's and stages' own log lines (a quarantined output, a lock waited for) in the run's logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "acepipe")
# ... which may also log outside a run (acepipe inspect, verify): no warning about the missing run.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
