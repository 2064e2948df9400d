"""Identity resolution and the resolved profile table, kept in the profile store and
updated incrementally: each run applies the staged batches that passed validation and
were not applied yet, and recomputes only the profiles they touch (PRODUCT.md section 12).
A configuration change, or the `profile_rebuild_job`, recomputes everything."""


import os

import dagster as dg
import pandas as pd

from personalization_pipeline import settings
from personalization_pipeline.core.canonical import mask_email
from personalization_pipeline.core.identity import IdentityLimits
from personalization_pipeline.core.rules import config_hash, load_conflict_rules
from personalization_pipeline.partitions import PROFILE_FRESHNESS
from personalization_pipeline.resources.lake import Lake, LakeResource
from personalization_pipeline.resources.profile_store import ProfileStore

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


def open_store(target: Lake) -> ProfileStore:
    """The profile store next to the lake, with the configured rules, limits and mapping."""
    return ProfileStore(
        target.root / "profile_store",
        load_conflict_rules(RULES_FILE),
        IdentityLimits.from_yaml(LIMITS_FILE),
        config_hash(RULES_FILE, LIMITS_FILE, MAPPING_FILE),
    )


def largest_component_limit() -> int:
    return int(os.environ.get("PP_MAX_COMPONENT_SIZE", "60"))


def conflict_growth_limit() -> tuple[int, float]:
    """(minimum count, share): the conflict trend warns when the conflicts added over the
    recent runs exceed both."""
    return int(os.environ.get("PP_CONFLICT_GROWTH_MIN", "50")), float(os.environ.get("PP_CONFLICT_GROWTH_SHARE", "0.10"))


def no_email_share_limit() -> float:
    return float(os.environ.get("PP_MAX_SHARE_WITHOUT_EMAIL", "0.5"))


def masked_sample(profiles: pd.DataFrame, provenance: pd.DataFrame) -> str:
    """One profile and its provenance as Markdown, identifiers masked (no PII in the event log)."""
    if profiles.empty:
        return "_no profiles yet_"
    row = profiles.iloc[0]
    lines = [
        f"**profile** `{row['profile_id']}` — email {mask_email(row.get('primary_email')) or '(none)'}",
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


class ProfileRunConfig(dg.Config):
    full_rebuild: bool = False
    """Recompute every profile from staged history instead of applying new batches."""


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
        ),
        dg.AssetCheckSpec(
            "share_without_email",
            asset="resolved_profiles",
            description="Warns when more than PP_MAX_SHARE_WITHOUT_EMAIL of profiles have no email (nothing to push to).",
        ),
        dg.AssetCheckSpec(
            "conflict_trend",
            asset="identity_conflicts",
            description="Warns when rejected edges grew by more than PP_CONFLICT_GROWTH_MIN and "
            "PP_CONFLICT_GROWTH_SHARE over the recent runs (a source starting to share identifiers).",
        ),
    ],
)
def identity_and_profiles(context: dg.AssetExecutionContext, config: ProfileRunConfig, lake: LakeResource):
    """Applies every staged batch that passed validation and is not in the ledger yet, and
    recomputes the profiles those batches touch (every profile in a merge or split too).
    Batches whose blocking check failed are held back and named in the metadata. The four
    tables and the ledger are committed together in the profile store."""
    target = lake.get_lake()
    store = open_store(target)
    if config.full_rebuild:
        report = store.rebuild(target, run_id=context.run.run_id, reason="profile_rebuild_job")
    else:
        report = store.apply(target, run_id=context.run.run_id)
    if report.batches_held:
        context.log.warning(
            f"{len(report.batches_held)} batch(es) held back by a failed validation check: "
            + ", ".join(report.batches_held[:20])
        )
    totals = report.totals
    sample = "_no profile touched in this run_"
    if report.sample_profile_id:
        sample = masked_sample(store.profiles([report.sample_profile_id]), store.provenance(report.sample_profile_id))
    run = report.as_metadata()
    digest = store.digest
    yield dg.MaterializeResult(
        asset_key="identity_map",
        metadata={"config_hash": digest, "mode": report.mode, "clusters_touched": report.clusters_touched},
    )
    yield dg.MaterializeResult(
        asset_key="identity_conflicts", metadata={"dagster/row_count": totals.get("conflicts", 0)}
    )
    yield dg.MaterializeResult(
        asset_key="resolved_profiles",
        metadata={
            "dagster/row_count": totals.get("profiles", 0),
            **run,
            "held_batches": dg.MetadataValue.md("\n".join(f"- {b}" for b in report.batches_held[:50]) or "_none_"),
            "largest_component": totals.get("largest_component", 0),
            "profiles_without_email": totals.get("without_email", 0),
            "config_hash": digest,
            "sample_profile": dg.MetadataValue.md(sample),
        },
    )
    yield dg.MaterializeResult(
        asset_key="profile_attribute_provenance", metadata={"profiles_written": report.profiles_written}
    )
    limit = largest_component_limit()
    largest = totals.get("largest_component", 0)
    yield dg.AssetCheckResult(
        check_name="largest_identity_component",
        asset_key="resolved_profiles",
        passed=largest <= limit,
        metadata={"largest_component": largest, "limit": limit},
    )
    profiles_total = totals.get("profiles", 0)
    share = totals.get("without_email", 0) / profiles_total if profiles_total else 0.0
    yield dg.AssetCheckResult(
        check_name="share_without_email",
        asset_key="resolved_profiles",
        passed=share <= no_email_share_limit(),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"share_without_email": round(share, 4), "limit": no_email_share_limit(), "profiles": profiles_total},
    )
    history = store.stats(limit=50)
    growth, before = conflict_growth(history)
    minimum, fraction = conflict_growth_limit()
    yield dg.AssetCheckResult(
        check_name="conflict_trend",
        asset_key="identity_conflicts",
        passed=not (growth > minimum and growth > fraction * max(before, 1)),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "conflicts": totals.get("conflicts", 0),
            "added_over_recent_runs": growth,
            "conflicts_before": before,
            "runs_compared": len(history),
        },
    )


def conflict_growth(history: pd.DataFrame) -> tuple[int, int]:
    """(conflicts added over the runs in ``history``, conflicts at its start). A rebuild
    after a configuration change starts a new series."""
    if history.empty:
        return 0, 0
    series = history.reset_index(drop=True)
    rebuilds = series.index[series["mode"] == "rebuild"]
    if len(rebuilds) and rebuilds[-1] > 0:
        series = series.iloc[rebuilds[-1]:]
    first, last = int(series["conflicts"].iloc[0]), int(series["conflicts"].iloc[-1])
    return max(0, last - first), first
