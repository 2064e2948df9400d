"""deploy/dagster.production.yaml against a real PostgreSQL server: the instance loads,
runs and their events are stored there, and the sensors read them back."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import dagster as dg
import pytest

from personalization_pipeline.ports import free_ports
from personalization_pipeline.assets.sources import stream_events
from personalization_pipeline.resources.lake import LakeResource
from personalization_pipeline.resources.landing_zone import LocalLandingZoneResource
from personalization_pipeline.resources.shop import ShopResource
from personalization_pipeline.sensors import profile_refresh_sensor

REPO = Path(__file__).resolve().parent.parent
PG_BIN = Path(
    os.environ.get("PG_BIN")
    or next((str(p.parent) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), "/usr/lib/postgresql/15/bin")
)


@pytest.fixture(scope="module")
def postgres():
    assert (PG_BIN / "initdb").exists(), f"PostgreSQL server binaries not found in {PG_BIN} (.ci/run installs them)"
    # Outside pytest's 0700 tmp tree: initdb runs as the postgres user, who must reach it.
    root = Path(tempfile.mkdtemp(prefix="pp-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    port = free_ports()[0]
    as_pg = ["su", "postgres", "-s", "/bin/sh", "-c"] if os.geteuid() == 0 else ["sh", "-c"]
    subprocess.run(
        [*as_pg, f"{PG_BIN}/initdb -D {root}/data -U postgres --auth=trust -E UTF8 --no-sync"],
        check=True, capture_output=True,
    )
    subprocess.run(
        [*as_pg, f"{PG_BIN}/pg_ctl -D {root}/data -l {root}/log -w -o "
                 f"'-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off' start"],
        check=True, capture_output=True,
    )
    subprocess.run([*as_pg, f"{PG_BIN}/createdb -h 127.0.0.1 -p {port} -U postgres dagster"], check=True)
    try:
        yield port
    finally:
        subprocess.run([*as_pg, f"{PG_BIN}/pg_ctl -D {root}/data -m immediate stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_production_instance_stores_runs_in_postgres(postgres, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.production.yaml", home / "dagster.yaml")
    for name, value in {
        "DAGSTER_PG_USERNAME": "postgres", "DAGSTER_PG_PASSWORD": "unused-with-trust",
        "DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_DB": "dagster", "DAGSTER_PG_PORT": str(postgres),
        "PP_DATA_DIR": str(tmp_path / "data"),
    }.items():
        monkeypatch.setenv(name, value)
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert instance.run_coordinator.__class__.__name__ == "QueuedRunCoordinator"
        result = dg.materialize(
            [stream_events],
            instance=instance,
            partition_key="2026-11-28-10:00",
            resources={
                "lake": LakeResource(),
                "shop": ShopResource(base_url="http://127.0.0.1:9"),
                "landing_zone": LocalLandingZoneResource(),
            },
        )
        assert result.success
        assert instance.get_run_by_id(result.run_id).is_success
        request = profile_refresh_sensor(dg.build_sensor_context(instance=instance))
        assert isinstance(request, dg.SkipReason)  # stream_events alone does not trigger it
        instance.report_runless_asset_event(dg.AssetMaterialization("crm_contacts"))
        fired = profile_refresh_sensor(dg.build_sensor_context(instance=instance))
        assert len(fired.run_requests) == 1
    finally:
        instance.dispose()
