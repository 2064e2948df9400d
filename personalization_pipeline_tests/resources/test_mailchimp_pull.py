"""Mailchimp pulls over real HTTP against the sandbox: members by change window (keyset
paging, members edited while paged, bulk updates sharing one second) and engagement from
campaigns' email activity, down to the `esp_engagement` asset."""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import requests

from personalization_pipeline.assets.profiles import identity_and_profiles, open_store
from personalization_pipeline.assets.sources import esp_engagement
from personalization_pipeline.core.sources import esp_activity_record_id, esp_engagement_to_canonical
from personalization_pipeline.resources.http import RetryPolicy
from personalization_pipeline.resources.lake import Lake, LakeResource
from personalization_pipeline.resources import mailchimp as mailchimp_module
from personalization_pipeline.resources.mailchimp import MEMBERS_PAGE_SIZE, MailchimpClient, MailchimpResource
from personalization_pipeline.resources.runtime import RuntimeResource
from personalization_pipeline.sandbox.data import ACTIVITY_ACTIONS
from personalization_pipeline.sandbox.server import SandboxConfig, start_sandbox

HOUR = timedelta(hours=1)


@pytest.fixture(scope="module")
def sandbox():
    with start_sandbox(SandboxConfig(seed=31, size=3000, history_days=10)) as running:
        yield running


@pytest.fixture(autouse=True)
def clear_faults(sandbox):
    requests.delete(f"{sandbox.mailchimp_url}/_admin/faults", timeout=5)
    yield
    requests.delete(f"{sandbox.mailchimp_url}/_admin/faults", timeout=5)


def client(sandbox) -> MailchimpClient:
    return MailchimpClient(
        access_token=sandbox.config.mailchimp_access_token,
        api_key=None,
        metadata_url=f"{sandbox.mailchimp_url}/oauth2/metadata",
        api_base=None,
        retry=RetryPolicy(base_delay=0.05, max_delay=0.5, timeout_seconds=5),
    )


def fault(sandbox, kind: str, count: int = 1, **extra) -> None:
    response = requests.post(
        f"{sandbox.mailchimp_url}/_admin/faults", json={"kind": kind, "count": count, **extra}, timeout=5
    )
    assert response.status_code < 300, response.text


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def truth(sandbox, start: datetime, end: datetime) -> set[str]:
    """What the members list serves for [start, end): everything but archived and deleted."""
    members = sandbox.mailchimp_state.ground_truth(ms(start), ms(end))
    return {m["id"] for m in members if m["status"] != "archived"}


def pull(mc: MailchimpClient, list_id: str, start: datetime, end: datetime) -> list[str]:
    return [m["id"] for page in mc.members_changed(list_id, start, end) for m in page]


def next_second() -> datetime:
    """Wait until the wall clock is in a later second than now; return that second."""
    now = datetime.now(timezone.utc)
    target = now.replace(microsecond=0) + timedelta(seconds=1)
    time.sleep(max(0.0, (target - now).total_seconds()) + 0.01)
    return target


# -- members ---------------------------------------------------------------------------------


def test_members_window_equals_the_sandbox_with_no_duplicates(sandbox):
    end = datetime.now(timezone.utc) - timedelta(minutes=1)
    start = end - timedelta(days=30)
    mc = client(sandbox)
    ids = pull(mc, sandbox.config.mailchimp_list_id, start, end)
    expected = truth(sandbox, start, end)
    assert len(expected) > 2 * MEMBERS_PAGE_SIZE  # several keyset pages
    assert len(ids) == len(set(ids))
    assert set(ids) == expected
    assert mc.stats.pages <= len(expected) // MEMBERS_PAGE_SIZE + 2


def test_members_edited_while_paged_lose_nothing_that_stayed(sandbox):
    end = datetime.now(timezone.utc) - timedelta(minutes=1)
    start = end - timedelta(days=30)
    list_id = sandbox.config.mailchimp_list_id
    before = truth(sandbox, start, end)
    # After each of the first three pages, five members of the window are edited: their
    # last_changed moves to now, outside the window (offset paging would skip members here).
    fault(sandbox, "mutate_during_paging", count=3, records=5, path_prefix=f"/3.0/lists/{list_id}/members")
    ids = pull(client(sandbox), list_id, start, end)
    after = truth(sandbox, start, end)
    assert len(before) - len(after) == 15  # members really moved out while we paged
    assert len(ids) == len(set(ids))
    assert after <= set(ids) <= before
    # The moved members are caught by the window that holds their new last_changed.
    moved = before - after
    later = pull(client(sandbox), list_id, end, datetime.now(timezone.utc) + timedelta(seconds=1))
    assert moved <= set(later)


def test_a_bulk_update_of_more_than_a_page_in_one_second(sandbox):
    list_id = sandbox.config.mailchimp_list_id
    bulk = set(sandbox.mailchimp_state.mutate(1600))  # 1,600 members, one last_changed second
    stamp = {m["last_changed"] for m in sandbox.mailchimp_state.ground_truth(None, None) if m["id"] in bulk}
    assert len(bulk) == 1600 and len(stamp) == 1
    end = next_second()  # the bulk's second is over: nothing else can land in it
    start = end - timedelta(minutes=10)
    expected = truth(sandbox, start, end)
    mc = client(sandbox)
    ids = pull(mc, list_id, start, end)
    assert len(ids) == len(set(ids))
    assert set(ids) == expected and bulk <= expected


def test_a_bulk_second_edited_while_paged_loses_nothing_that_stayed(sandbox):
    list_id = sandbox.config.mailchimp_list_id
    bulk = set(sandbox.mailchimp_state.mutate(1600))
    end = next_second()
    start = end - timedelta(seconds=30)
    before = truth(sandbox, start, end)
    assert bulk <= before
    # Every request of the pull, including the count/offset walk of the bulk's second,
    # edits members of the second it asked for, so they leave it and shift the offsets.
    fault(sandbox, "mutate_during_paging", count=4, records=7, path_prefix=f"/3.0/lists/{list_id}/members")
    mc = client(sandbox)
    requested: list[tuple[datetime, datetime, int]] = []
    page = mc._members_page

    def recording_page(list_id, since, before, offset):
        requested.append((since, before, offset))
        return page(list_id, since, before, offset)

    mc._members_page = recording_page
    ids = pull(mc, list_id, start, end)
    after = truth(sandbox, start, end)
    assert len(before) - len(after) == 28
    assert len(ids) == len(set(ids))
    assert after <= set(ids) <= before
    # The bulk's second was walked by count/offset over [T, T+1 s), and walked again
    # because members left it (the total changed) during the first walk.
    second_walks = [r for r in requested if r[1] - r[0] == timedelta(seconds=1) and r[2] == 0]
    assert len(second_walks) >= 2
    assert any(offset >= MEMBERS_PAGE_SIZE for _, _, offset in requested)


# -- engagement ------------------------------------------------------------------------------


def activity_truth(sandbox, start: datetime, end: datetime) -> tuple[set[str], int]:
    """Stable ids of the opens, clicks and unsubscribes in [start, end), and the bounces,
    from the sandbox's own activity table."""
    state = sandbox.mailchimp_state
    act = state.world.activity
    inside = (act.timestamp >= ms(start)) & (act.timestamp < ms(end)) & (state.status[act.member] >= 0)
    ids, bounces = set(), 0
    for i in np.flatnonzero(inside).tolist():
        action = ACTIVITY_ACTIONS[int(act.action[i])]
        if action == "bounce":
            bounces += 1
            continue
        campaign = state.world.campaigns[int(act.campaign[i])]["id"]
        moment = datetime.fromtimestamp(int(act.timestamp[i]) / 1000, tz=timezone.utc)
        ids.add(esp_activity_record_id(campaign, state.hash(int(act.member[i])), action, moment))
    return ids, bounces


def busiest_hour(sandbox) -> datetime:
    stamps = sandbox.mailchimp_state.world.activity.timestamp
    hours = Counter(int(t) // 3_600_000 for t in stamps.tolist())
    hour, _ = hours.most_common(1)[0]
    return datetime.fromtimestamp(hour * 3600, tz=timezone.utc)


def pull_engagement(mc: MailchimpClient, start: datetime, end: datetime) -> tuple[pd.DataFrame, dict]:
    emails = []
    for campaign in mc.campaigns_sent_since(start - timedelta(days=30), before=end):
        for page in mc.email_activity(campaign["id"], start):
            emails.extend(page)
    return esp_engagement_to_canonical(emails, datetime.now(timezone.utc), start, end)


def test_engagement_window_equals_the_sandbox_activity(sandbox):
    start = busiest_hour(sandbox)
    end = start + HOUR
    expected, bounces = activity_truth(sandbox, start, end)
    assert len(expected) > 20
    frame, counts = pull_engagement(client(sandbox), start, end)
    assert frame["source_record_id"].is_unique
    assert set(frame["source_record_id"]) == expected
    assert counts["bounces"] == bounces
    assert (frame["observed_at"] >= pd.Timestamp(start)).all() and (frame["observed_at"] < pd.Timestamp(end)).all()
    assert set(frame["event_type"]) <= {"email_opened", "email_clicked", "unsubscribed"}
    assert (frame["source"] == "esp").all() and (frame["record_kind"] == "event").all()
    assert frame["email"].notna().all()
    unsubs = frame[frame["event_type"] == "unsubscribed"]
    assert (unsubs["email_consent"] == "unsubscribed").all()
    assert frame.loc[frame["event_type"] != "unsubscribed", "email_consent"].isna().all()


def test_engagement_over_the_whole_history_pages_every_report(sandbox, monkeypatch):
    """Ten days of every campaign, with 100-recipient pages so each report takes several."""
    monkeypatch.setattr(mailchimp_module, "ACTIVITY_PAGE_SIZE", 100)
    end = datetime.now(timezone.utc) - timedelta(minutes=1)
    start = end - timedelta(days=11)
    expected, bounces = activity_truth(sandbox, start, end)
    mc = client(sandbox)
    frame, counts = pull_engagement(mc, start, end)
    assert frame["source_record_id"].is_unique
    assert set(frame["source_record_id"]) == expected
    assert counts["bounces"] == bounces > 0
    assert set(frame["event_type"]) == {"email_opened", "email_clicked", "unsubscribed"}
    assert mc.stats.pages > 2 * len(sandbox.mailchimp_state.world.campaigns)


def test_engagement_re_pull_gives_the_same_rows_even_through_faults(sandbox, tmp_path):
    start = busiest_hour(sandbox) + HOUR
    end = start + HOUR
    first, _ = pull_engagement(client(sandbox), start, end)
    fault(sandbox, "http_503", count=2, path_prefix="/3.0/reports/")
    fault(sandbox, "drop_connection", count=1, path_prefix="/3.0/campaigns")
    mc = client(sandbox)
    second, _ = pull_engagement(mc, start, end)
    assert mc.stats.retries >= 3
    columns = ["source_record_id", "observed_at", "event_type", "email", "email_consent"]
    ordered = lambda f: f[columns].sort_values("source_record_id").reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(ordered(first), ordered(second))
    lake = Lake(tmp_path / "lake")
    assert lake.write_staged("engagement", "hour", first)["rows_new"] == len(first)
    assert lake.write_staged("engagement", "hour", second) == {"rows_new": 0, "rows_total": len(first), "rows_held": 0}


def test_esp_engagement_materialises_a_partition(sandbox, tmp_path, monkeypatch):
    monkeypatch.setenv("PP_DATA_DIR", str(tmp_path))
    start = busiest_hour(sandbox)
    expected, bounces = activity_truth(sandbox, start, start + HOUR)
    resources = {
        "mailchimp": MailchimpResource(
            access_token=sandbox.config.mailchimp_access_token,
            list_id=sandbox.config.mailchimp_list_id,
            metadata_url=f"{sandbox.mailchimp_url}/oauth2/metadata",
        ),
        "lake": LakeResource(),
        "runtime": RuntimeResource(lag_seconds=60),
    }
    key = start.strftime("%Y-%m-%d-%H:%M")
    for attempt in range(2):  # the second run re-pulls the hour and must add nothing
        result = dg.materialize([esp_engagement], resources=resources, partition_key=key)
        assert result.success
        [event] = result.get_asset_materialization_events()
        meta = {k: v.value for k, v in event.materialization.metadata.items()}
        assert meta["dagster/row_count"] == len(expected)
        assert meta["rows_new"] == (len(expected) if attempt == 0 else 0)
        assert meta["bounces"] == bounces and meta["campaigns"] >= 1
        assert meta["api_calls"] >= 2 and meta["http_429"] == 0 and meta["lag_seconds"] > 0
    staged = Lake(tmp_path / "lake").read_staged("engagement")
    assert set(staged["source_record_id"]) == expected and len(staged) == len(expected)

    # Identity and profiles read the staged engagement with the rest of the history.
    assert dg.materialize([identity_and_profiles], resources={"lake": LakeResource()}).success
    profiles = open_store(Lake(tmp_path / "lake")).profiles()
    opened = staged[staged["event_type"] == "email_opened"]
    assert profiles["last_email_open_at"].notna().sum() == opened["email"].str.lower().nunique() > 0
