"""A real Prefect server + process work pool + worker runs the audit deployment to completion.

Everything listens on loopback, lives in a temp PREFECT_HOME (its own SQLite database) and is
stopped with bounded timeouts, whatever the outcome.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from audit_world import make_world

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)


def _wait_until(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_TELEMETRY_ENABLED": "false",
        "PYTHONPATH": str(Path(__file__).parent),
    }
    log = (tmp_path / "server.log").open("w")
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:

        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_until(healthy, 120, "the Prefect server")
        yield api, env
    finally:
        _stop(proc)
        log.close()


def test_worker_runs_the_deployment(server: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    api, env = server
    cfg = make_world(tmp_path / "world", n_per_class=6)  # 18 images, 2 shards
    cfg["run_dir"] = str(tmp_path / "runs" / "{run_id}")
    config_file = tmp_path / "audit.yaml"
    config_file.write_text(yaml.safe_dump(cfg))

    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "textcam.cli",
            "schedule",
            "--cron",
            "0 3 * * *",
            "--config",
            str(config_file),
            "--pool",
            "textcam-test",
            "--name",
            "nightly",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert created.returncode == 0, created.stderr[-3000:]
    deployment = json.loads(next(ln for ln in created.stdout.splitlines() if ln.startswith("{")))
    schedules = httpx.get(f"{api}/deployments/{deployment['id']}", timeout=10).json()["schedules"]
    assert [s["schedule"]["cron"] for s in schedules] == ["0 3 * * *"]

    worker_log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [
            str(BIN / "prefect"),
            "worker",
            "start",
            "--pool",
            "textcam-test",
            "--type",
            "process",
            "--limit",
            "1",
        ],
        env=env,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=tmp_path,
    )
    try:
        run = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={}, timeout=10)
        run.raise_for_status()
        run_id = run.json()["id"]

        def final_state() -> str | None:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()["state"]["type"]
            return state if state in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None

        state = _wait_until(final_state, 420, "the worker to finish the flow run", interval=1)
        assert state == "COMPLETED", (tmp_path / "worker.log").read_text()[-4000:]
    finally:
        _stop(worker)
        worker_log.close()

    (summary_file,) = (tmp_path / "runs").glob("*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["reconciled"] and summary["counts"]["explained_images"] == 18
    assert (summary_file.parent / "report.html").is_file()
