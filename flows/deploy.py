"""Scheduled audits: a Prefect deployment of the ``audit`` flow with a cron schedule.

Two ways, one command each (``textcam schedule``):

* ``serve`` (no work pool): this process registers the deployment and runs the scheduled runs
  itself until stopped (``flow.serve``). Simplest for one machine.
* ``deploy`` to a work pool (``--pool NAME``): the deployment is stored on the Prefect server with
  the project folder as its source; any ``prefect worker start --pool NAME`` picks up the runs.
  A ``process`` pool is created if it does not exist.

The config is stored in the deployment's parameters with absolute paths, so runs do not depend on
the directory a worker starts in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import AuditConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = "flows/audit.py:audit"


def deployment_parameters(cfg: AuditConfig, base: Path | None = None) -> dict[str, Any]:
    """The flow parameters of a deployment: the config with paths made absolute."""
    base = (base or Path.cwd()).resolve()

    def absolute(value: str | None) -> str | None:
        if value is None or "://" in value:
            return value
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else base / path)

    data = cfg.to_dict()
    for holder, key in (
        (data, "data"),
        (data, "run_dir"),
        (data, "cache_dir"),
        (data["calibration"], "probe"),
    ):
        holder[key] = absolute(holder[key])
    if isinstance(data["classes"], str) and data["classes"] != "model":
        data["classes"] = absolute(data["classes"])
    data["vocab"] = [
        absolute(v) if not v.startswith("phrase:") and Path(v).exists() else v for v in data["vocab"]
    ]
    data["cache_dir"] = data["cache_dir"] or str(cfg.resolved_cache_dir())
    return {"config": data}


def _check_cron(cron: str, timezone: str | None) -> None:
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone or "UTC")
    except ValidationError as exc:
        raise ValueError(
            f"invalid schedule {cron!r} / timezone {timezone!r}: {exc.errors()[0]['msg']} "
            "(e.g. '0 3 * * *' = every day at 03:00)"
        ) from None


def ensure_process_pool(name: str) -> None:
    """Create a ``process`` work pool called ``name`` unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def deploy_to_pool(
    cfg: AuditConfig,
    *,
    name: str,
    cron: str,
    pool: str,
    timezone: str | None = None,
    source: Path = PROJECT_ROOT,
) -> str:
    """Register a cron-scheduled deployment for workers of ``pool``; returns the deployment id."""
    from prefect import flow
    from prefect.schedules import Cron

    _check_cron(cron, timezone)
    ensure_process_pool(pool)
    remote = flow.from_source(source=str(source), entrypoint=ENTRYPOINT)
    deployment_id = remote.deploy(
        name=name,
        work_pool_name=pool,
        schedules=[Cron(cron, timezone=timezone or "UTC")],
        parameters=deployment_parameters(cfg),
        description=f"TextCAM audit of {cfg.data}",
        tags=["textcam", "audit"],
        print_next_steps=False,
        ignore_warnings=True,
    )
    return str(deployment_id)


def serve(cfg: AuditConfig, *, name: str, cron: str, timezone: str | None = None) -> None:
    """Register the deployment and run its scheduled runs in this process until interrupted."""
    from prefect.schedules import Cron

    from flows.audit import audit

    _check_cron(cron, timezone)
    audit.serve(
        name=name,
        schedules=[Cron(cron, timezone=timezone or "UTC")],
        parameters=deployment_parameters(cfg),
        tags=["textcam", "audit"],
    )
