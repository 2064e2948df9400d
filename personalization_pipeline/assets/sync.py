"""Push the changed personalisation attributes back to the ESP."""


import dagster as dg
import pandas as pd

from personalization_pipeline.assets.profiles import MAPPING_FILE, open_store
from personalization_pipeline.core.identity import current_state
from personalization_pipeline.core.push import (
    changed_members,
    chunks,
    desired_member_fields,
    load_field_mapping,
    mask_email,
)
from personalization_pipeline.resources.http import CircuitOpenError, VendorError
from personalization_pipeline.resources.lake import LakeResource
from personalization_pipeline.resources.mailchimp import BATCH_LIMIT, MailchimpResource, subscriber_hash
from personalization_pipeline.resources.runtime import RuntimeResource
from personalization_pipeline.resources.state_store import StateStoreResource

DEAD_LETTER_AFTER = 5


def known_members(lake_frame: pd.DataFrame) -> pd.DataFrame:
    """Current list members from the members pull: member_hash, email, status."""
    members = lake_frame[lake_frame["record_kind"] == "member"]
    return pd.DataFrame(
        {
            "member_hash": members["source_record_id"].astype(str).to_numpy(),
            "email": members["email"].astype(object).to_numpy(),
            "status": members["email_consent"].astype(object).to_numpy(),
        }
    )


@dg.asset(
    deps=["resolved_profiles", "identity_map"],
    group_name="sync",
    kinds={"mailchimp"},
    retry_policy=dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.FULL),
)
def esp_attribute_sync(
    context: dg.AssetExecutionContext,
    lake: LakeResource,
    mailchimp: MailchimpResource,
    state: StateStoreResource,
    runtime: RuntimeResource,
) -> dg.MaterializeResult:
    """Sends each list member the merge fields of its profile, but only members whose
    values changed since the ESP last acknowledged them, in batches of 500. Members are
    only updated, never created, and subscription status is never written. Per-member
    errors go to `sync_failures` and are retried on later runs, then dead-lettered."""
    target, store = lake.get_lake(), state.get_store()
    mapping = load_field_mapping(MAPPING_FILE)
    profile_store = open_store(target)
    if profile_store.current_path() is None:
        raise dg.Failure(description="resolved_profiles has not been materialised yet")
    profiles = profile_store.profiles()
    identity_map = profile_store.identity_map()
    members = known_members(current_state(target.read_staged("esp")))
    list_id = mailchimp.list_id
    client = mailchimp.get_client()

    desired = desired_member_fields(profiles, identity_map, members, mapping)
    changed = changed_members(desired, store.acknowledged(list_id))
    dead = store.dead_lettered(list_id)
    if dead and not changed.empty:
        changed = changed[changed["member_hash"].map(dead).ne(changed["payload_hash"])]

    created_fields: list[str] = []
    sent = acknowledged = failed = 0
    samples: list[str] = []
    try:
        if not changed.empty:
            existing = {f["tag"] for f in client.merge_fields(list_id)}
            for spec in mapping.fields:
                if spec.tag not in existing:
                    client.create_merge_field(list_id, spec.tag, spec.name, spec.type)
                    created_fields.append(spec.tag)
        for batch in chunks(changed, BATCH_LIMIT):
            body = [{"email_address": r["email"], "merge_fields": r["fields"]} for r in batch.to_dict("records")]
            response = client.batch_update_members(list_id, body)
            errors = {subscriber_hash(e.get("email_address", "")): e for e in response.get("errors", [])}
            ok, bad = [], []
            for row in batch.to_dict("records"):
                error = errors.get(row["member_hash"])
                if error is None:
                    ok.append((row["member_hash"], row["profile_id"], row["payload_hash"], row["fields"]))
                else:
                    message = str(error.get("error", "")).replace(str(row["email"]), mask_email(row["email"]))
                    bad.append((row["member_hash"], row["payload_hash"], str(error.get("error_code", "")), message))
            store.record_batch(list_id, ok, bad, runtime.clock().now(), DEAD_LETTER_AFTER)
            sent += len(batch)
            acknowledged += len(ok)
            failed += len(bad)
            if len(samples) < 3:
                samples.extend(f"{mask_email(r['email'])}: {sorted(r['fields'])[:4]}" for r in batch.head(3 - len(samples)).to_dict("records"))
    except VendorError as exc:
        raise dg.Failure(
            description=f"push stopped after {acknowledged} acknowledged members: {exc}",
            metadata={"members_acknowledged": acknowledged},
            allow_retries=not isinstance(exc, CircuitOpenError),
        ) from None

    context.log.info(f"pushed {acknowledged} members ({failed} failed) of {len(desired)} mapped")
    return dg.MaterializeResult(
        metadata={
            "members_mapped": len(desired),
            "members_changed": len(changed),
            "members_sent": sent,
            "members_acknowledged": acknowledged,
            "members_failed": failed,
            "members_dead_lettered": len(dead),
            "batch_calls": -(-sent // BATCH_LIMIT) if sent else 0,
            "merge_fields_created": ", ".join(created_fields) or "none",
            **client.stats.as_metadata(),
            "sample": dg.MetadataValue.md("\n".join(f"- {s}" for s in samples) or "_nothing changed_"),
        }
    )
