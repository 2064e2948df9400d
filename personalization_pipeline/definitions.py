"""The code location: assets, checks, jobs, schedules, sensors and resources.

Resources read the environment (see README, "Configuration"); secrets are passed as
`EnvVar`s so their values never appear in the UI or the event log.
"""

from __future__ import annotations

import os

import dagster as dg

from personalization_pipeline.assets.kafka_events import kafka_events, kafka_offsets_sensor
from personalization_pipeline.assets.profiles import identity_and_profiles
from personalization_pipeline.assets.sources import (
    crm_contacts,
    crm_deletions,
    esp_engagement,
    esp_members,
    source_snapshot,
    stream_events,
)
from personalization_pipeline.assets.sync import esp_attribute_sync
from personalization_pipeline.jobs import kafka_stream_job, profile_job, snapshot_job, source_pull_job, stream_job
from personalization_pipeline.jobs import profile_rebuild_job
from personalization_pipeline.jobs import quarantine_replay_job
from personalization_pipeline.resources.hubspot import HubSpotResource
from personalization_pipeline.resources.kafka import KafkaResource
from personalization_pipeline.resources.lake import LakeResource
from personalization_pipeline.resources.landing_zone import landing_zone_from_env
from personalization_pipeline.resources.mailchimp import MailchimpResource
from personalization_pipeline.resources.runtime import RuntimeResource
from personalization_pipeline.resources.shop import ShopResource
from personalization_pipeline.resources.state_store import StateStoreResource
from personalization_pipeline.schedules import PULL_LAG_SECONDS, source_pull_schedule
from personalization_pipeline.sensors import (
    asset_check_alert_sensor,
    initial_snapshot_sensor,
    landing_zone_sensor,
    profile_refresh_sensor,
    run_failure_alert_sensor,
)
from personalization_pipeline.settings import env_float


def _opt(**fields: str) -> dict:
    """EnvVars for the variables that are set: the UI shows their names, never the values."""
    out = {}
    for field, env in fields.items():
        if os.environ.get(env):
            out[field] = dg.EnvVar(env)
    return out


def _breaker() -> dict:
    """The vendor circuit breakers' settings (the same for every vendor)."""
    return {
        "breaker_failure_threshold": int(env_float("PP_BREAKER_FAILURES", 5)),
        "breaker_cooldown_seconds": env_float("PP_BREAKER_COOLDOWN_SECONDS", 60),
    }


def build_resources() -> dict:
    return {
        "hubspot": HubSpotResource(
            base_url=os.environ.get("HUBSPOT_BASE_URL", "https://api.hubapi.com"),
            **_breaker(),
            **_opt(
                token_url="HUBSPOT_TOKEN_URL",
                client_id="HUBSPOT_CLIENT_ID",
                client_secret="HUBSPOT_CLIENT_SECRET",
                refresh_token="HUBSPOT_REFRESH_TOKEN",
                private_app_token="HUBSPOT_PRIVATE_APP_TOKEN",
            ),
        ),
        "mailchimp": MailchimpResource(
            list_id=os.environ.get("MAILCHIMP_LIST_ID", ""),
            **_breaker(),
            metadata_url=os.environ.get(
                "MAILCHIMP_METADATA_URL", "https://login.mailchimp.com/oauth2/metadata"
            ),
            campaign_lookback_days=float(os.environ.get("MAILCHIMP_CAMPAIGN_LOOKBACK_DAYS", "30")),
            **_opt(access_token="MAILCHIMP_ACCESS_TOKEN", api_key="MAILCHIMP_API_KEY", api_base="MAILCHIMP_API_BASE"),
        ),
        "shop": ShopResource(
            base_url=os.environ.get("SHOP_BASE_URL", "http://127.0.0.1:8703"),
            **_opt(access_token="SHOPIFY_ACCESS_TOKEN"),
        ),
        "lake": LakeResource(),
        "kafka": KafkaResource(
            bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", ""),
            topic=os.environ.get("KAFKA_TOPIC", "pp.events"),
            **_opt(
                security_protocol="KAFKA_SECURITY_PROTOCOL",
                sasl_mechanism="KAFKA_SASL_MECHANISM",
                sasl_username="KAFKA_SASL_USERNAME",
                sasl_password="KAFKA_SASL_PASSWORD",
            ),
        ),
        "landing_zone": landing_zone_from_env(),
        "state": StateStoreResource(),
        "runtime": RuntimeResource(lag_seconds=PULL_LAG_SECONDS),
    }


defs = dg.Definitions(
    assets=[
        crm_contacts,
        crm_deletions,
        esp_members,
        esp_engagement,
        source_snapshot,
        stream_events,
        kafka_events,
        identity_and_profiles,
        esp_attribute_sync,
    ],
    jobs=[source_pull_job, snapshot_job, profile_job, profile_rebuild_job, stream_job, kafka_stream_job, quarantine_replay_job],
    schedules=[source_pull_schedule],
    sensors=[
        landing_zone_sensor,
        kafka_offsets_sensor,
        profile_refresh_sensor,
        initial_snapshot_sensor,
        run_failure_alert_sensor,
        asset_check_alert_sensor,
    ],
    resources=build_resources(),
    executor=dg.in_process_executor,
)
