"""A failed run is posted to the JSON alert webhook (the sandbox alert sink), with no secrets."""

import dagster as dg
import requests

from personalization_pipeline.sandbox.server import SandboxConfig, start_sandbox
from personalization_pipeline.sensors import run_failure_alert_sensor


@dg.op
def explode():
    raise dg.Failure(description="HubSpot POST /crm/v3/objects/contacts/search answered 500 after 6 attempts")


@dg.job(tags={"pp/trigger": "schedule"})
def failing_job():
    explode()


def test_run_failure_is_posted_to_the_alert_webhook(monkeypatch):
    with start_sandbox(SandboxConfig(size=50)) as sandbox, dg.instance_for_test() as instance:
        monkeypatch.setenv("PP_ALERT_WEBHOOK_URL", f"{sandbox.alerts_url}/alerts")
        result = failing_job.execute_in_process(instance=instance, raise_on_error=False)
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE")
        context = dg.build_run_status_sensor_context(
            sensor_name="run_failure_alert_sensor",
            dagster_instance=instance,
            dagster_run=result.dagster_run,
            dagster_event=failure,
        ).for_run_failure()
        run_failure_alert_sensor(context)
        alerts = requests.get(f"{sandbox.alerts_url}/_admin/alerts", timeout=5).json()
    items = alerts["alerts"] if isinstance(alerts, dict) else alerts
    assert len(items) == 1
    body = items[0].get("body", items[0])
    assert body["kind"] == "run_failure" and body["job"] == "failing_job" and body["run_id"] == result.run_id
    assert body["tags"] == {"pp/trigger": "schedule"}
