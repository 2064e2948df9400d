"""Jobs the schedules and sensors launch. All run in-process: a step per process would
cost seconds per run on a minute-scale cadence (PLATFORM-NOTES.md)."""

from __future__ import annotations

import dagster as dg

PROFILE_ASSETS = ["identity_map", "identity_conflicts", "resolved_profiles", "profile_attribute_provenance"]

# Runs that write the profile tables or the push ledger carry this tag; the run queue
# lets one such run go at a time (dagster.yaml: tag_concurrency_limits).
PROFILE_WRITER_TAG = {"pp/writes-profiles": "true"}

source_pull_job = dg.define_asset_job(
    "source_pull_job",
    selection=["crm_contacts", "crm_deletions", "esp_members", "esp_engagement"],
    description="Pull the CRM (and its archived contacts) and the ESP (members and engagement) for one hourly window.",
)

snapshot_job = dg.define_asset_job(
    "snapshot_job",
    selection=["source_snapshot"],
    description="First load of the existing CRM and ESP (everything before the first partition).",
)

profile_job = dg.define_asset_job(
    "profile_job",
    selection=[*PROFILE_ASSETS, "esp_attribute_sync"],
    description="Resolve identities, rebuild profiles and push what changed to the ESP.",
    tags=PROFILE_WRITER_TAG,
)

stream_job = dg.define_asset_job(
    "stream_job",
    selection=["stream_events", *PROFILE_ASSETS, "esp_attribute_sync"],
    description="New landing files -> staged events -> profiles -> push, in one run.",
    tags=PROFILE_WRITER_TAG,
)

profile_rebuild_job = dg.define_asset_job(
    "profile_rebuild_job",
    selection=[*PROFILE_ASSETS, "esp_attribute_sync"],
    description="Recompute identity and every profile from staged history (after a change of rules, "
    "limits or mapping this happens by itself), then push what changed.",
    tags=PROFILE_WRITER_TAG,
    config={"ops": {"identity_and_profiles": {"config": {"full_rebuild": True}}}},
)

kafka_stream_job = dg.define_asset_job(
    "kafka_stream_job",
    selection=["kafka_events", *PROFILE_ASSETS, "esp_attribute_sync"],
    description="New Kafka offset ranges -> staged events -> profiles -> push, in one run.",
    tags=PROFILE_WRITER_TAG,
)


from personalization_pipeline.assets.replay import replay_quarantine  # noqa: E402 - an op, not an asset


@dg.job(
    description="Re-validate quarantined rows with the current suites (config/validation.yaml) and stage the "
    "rows that now pass as replay batches; run config names the sources and a batch range.",
    tags={"pp/trigger": "quarantine_replay"},
)
def quarantine_replay_job():
    replay_quarantine()
