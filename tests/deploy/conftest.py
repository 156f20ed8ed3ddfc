"""Deployment tests: no Docker engine runs here, so the compose file, the Dockerfiles, the
Prometheus, Grafana and Kubernetes files are validated statically, and the stack the compose file
describes is started natively (redis-server, hmt-serve, prometheus) on loopback ports."""

from __future__ import annotations

import sys
from pathlib import Path

# serve_helpers (real redis-server and hmt-serve processes) lives with the service tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
