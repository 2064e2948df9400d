"""Identity resolution and the resolved profile table, written together."""


import os

import dagster as dg
import pandas as pd

from personalization_pipeline import settings
from personalization_pipeline.core.identity import (
    IdentityLimits,
    current_state,
    profile_id_changes,
    resolve_identities,
)
from personalization_pipeline.core.profiles import build_profiles
from personalization_pipeline.core.push import mask_email
from personalization_pipeline.core.rules import config_hash, load_conflict_rules
from personalization_pipeline.partitions import PROFILE_FRESHNESS
from personalization_pipeline.resources.lake import LakeResource

RULES_FILE = settings.CONFIG_DIR / "conflict_rules.yaml"
LIMITS_FILE = settings.CONFIG_DIR / "identity_limits.yaml"
MAPPING_FILE = settings.CONFIG_DIR / "esp_field_mapping.yaml"

UPSTREAM = [
    dg.AssetKey("crm_contacts"),
    dg.AssetKey("crm_deletions"),
    dg.AssetKey("esp_members"),
    dg.AssetKey("esp_engagement"),
    dg.AssetKey("source_snapshot"),
    dg.AssetKey("stream_events"),
    dg.AssetKey("kafka_events"),
]


def largest_component_limit() -> int:
    return int(os.environ.get("PP_MAX_COMPONENT_SIZE", "60"))


def _masked_sample(profiles: pd.DataFrame, provenance: pd.DataFrame) -> str:
    """One profile and its provenance as Markdown, identifiers masked (no PII in the event log)."""
    if profiles.empty:
        return "_no profiles yet_"
    candidates = profiles[profiles["primary_email"].notna()] if "primary_email" in profiles else profiles
    row = (candidates if not candidates.empty else profiles).iloc[0]
    lines = [
        f"**profile** `{row['profile_id']}` — email {mask_email(row.get('primary_email'))}",
        "",
        "| attribute | value | source | tier | observed_at |",
        "|---|---|---|---|---|",
    ]
    for item in provenance[provenance["profile_id"] == row["profile_id"]].to_dict("records"):
        value = item["value"]
        if item["attribute"] in ("first_name", "last_name") and value:
            value = f"{str(value)[:1]}."
        lines.append(
            f"| {item['attribute']} | {value} | {item['source']} | {item['tier']} | {item['observed_at']} |"
        )
    return "\n".join(lines)


@dg.multi_asset(
    specs=[
        dg.AssetSpec("identity_map", deps=UPSTREAM, group_name="profiles", kinds={"parquet"},
                     description="Every identifier (crm_id, customer_id, email, anonymous_id) and its profile."),
        dg.AssetSpec("identity_conflicts", deps=UPSTREAM, group_name="profiles", kinds={"parquet"},
                     description="Edges rejected by the merge limits, with the reason."),
        dg.AssetSpec("resolved_profiles", deps=UPSTREAM, group_name="profiles", kinds={"parquet"},
                     freshness_policy=PROFILE_FRESHNESS,
                     description="One row per person: resolved attributes by the conflict rules, and aggregates."),
        dg.AssetSpec("profile_attribute_provenance", deps=UPSTREAM, group_name="profiles", kinds={"parquet"},
                     description="For each profile and attribute: value, source, record, observed_at, tier."),
    ],
    check_specs=[
        dg.AssetCheckSpec(
            "largest_identity_component",
            asset="resolved_profiles",
            description="Fails when one person has more identifiers than PP_MAX_COMPONENT_SIZE (a merge explosion).",
        )
    ],
)
def identity_and_profiles(context: dg.AssetExecutionContext, lake: LakeResource):
    """Resolves identities over the current state of all staged sources and rebuilds the
    profiles. The four tables are written together so they always agree."""
    target = lake.get_lake()
    history = target.read_staged()
    current = current_state(history)
    limits = IdentityLimits.from_yaml(LIMITS_FILE)
    rules = load_conflict_rules(RULES_FILE)
    result = resolve_identities(current, limits)
    profiles, provenance = build_profiles(current, result.record_profiles, rules, identity_map=result.identity_map)

    previous = target.read_table("record_profiles")
    changes = (
        profile_id_changes(previous, result.record_profiles)
        if previous is not None
        else pd.DataFrame(columns=["old_profile_id", "new_profile_id"])
    )
    if not changes.empty:
        log = target.read_table("profile_id_changes")
        stamped = changes.assign(changed_at=pd.Timestamp.now(tz="UTC"))
        target.write_table("profile_id_changes", pd.concat([log, stamped]) if log is not None else stamped)

    digest = config_hash(RULES_FILE, LIMITS_FILE, MAPPING_FILE)
    target.write_table("identity_map", result.identity_map)
    target.write_table("identity_conflicts", result.conflicts)
    target.write_table("record_profiles", result.record_profiles)
    target.write_table("profile_attribute_provenance", provenance)
    target.write_table("resolved_profiles", profiles)

    largest = int(result.components["size"].max()) if not result.components.empty else 0
    yield dg.MaterializeResult(
        asset_key="identity_map",
        metadata={"dagster/row_count": len(result.identity_map), "config_hash": digest},
    )
    yield dg.MaterializeResult(
        asset_key="identity_conflicts", metadata={"dagster/row_count": len(result.conflicts)}
    )
    yield dg.MaterializeResult(
        asset_key="resolved_profiles",
        metadata={
            "dagster/row_count": len(profiles),
            "records_in_current_state": len(current),
            "staged_versions": len(history),
            "profile_id_changes": len(changes),
            "largest_component": largest,
            "profiles_without_email": int(profiles["primary_email"].isna().sum()) if len(profiles) else 0,
            "config_hash": digest,
            "sample_profile": dg.MetadataValue.md(_masked_sample(profiles, provenance)),
        },
    )
    yield dg.MaterializeResult(
        asset_key="profile_attribute_provenance", metadata={"dagster/row_count": len(provenance)}
    )
    limit = largest_component_limit()
    yield dg.AssetCheckResult(
        check_name="largest_identity_component",
        asset_key="resolved_profiles",
        passed=largest <= limit,
        metadata={"largest_component": largest, "limit": limit},
    )
