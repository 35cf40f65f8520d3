"""Prefect settings for offline, single-machine use, applied only where the user set nothing.

Without a configured server, Prefect starts a temporary local one; on a busy 2-core machine it
can need more than the default startup timeout, and its telemetry tries to reach the internet.
"""

from __future__ import annotations

import os

OFFLINE_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def apply_offline_defaults() -> None:
    """Set :data:`OFFLINE_DEFAULTS` in the environment unless already set (call before a flow runs)."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
