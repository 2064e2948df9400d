"""The real HubSpot and Mailchimp clients against the sandbox over HTTP, with faults."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
import requests

from personalization_pipeline.resources.hubspot import HubSpotClient, parse_hubspot_time
from personalization_pipeline.resources.http import RetryPolicy, VendorError
from personalization_pipeline.resources.mailchimp import MailchimpClient
from personalization_pipeline.resources.shared_state import SecretStore, SharedRateLimiter
from personalization_pipeline.sandbox.server import SandboxConfig, start_sandbox


@pytest.fixture(scope="module")
def sandbox():
    with start_sandbox(SandboxConfig(seed=21, size=1500, history_days=10, token_ttl_seconds=3)) as running:
        yield running


@pytest.fixture(autouse=True)
def clear_faults(sandbox):
    for url in (sandbox.hubspot_url, sandbox.mailchimp_url):
        requests.delete(f"{url}/_admin/faults", timeout=5)
    yield


def hub(sandbox, tmp_path, **retry) -> HubSpotClient:
    cfg = sandbox.config
    return HubSpotClient(
        base_url=sandbox.hubspot_url,
        token_url=f"{sandbox.hubspot_url}/oauth/v1/token",
        client_id=cfg.hubspot_client_id,
        client_secret=cfg.hubspot_client_secret,
        refresh_token=cfg.hubspot_refresh_token,
        private_app_token=None,
        secret_store=SecretStore(tmp_path / "secrets.json"),
        limiter=SharedRateLimiter(tmp_path / "coordination.sqlite"),
        retry=RetryPolicy(base_delay=0.05, max_delay=0.5, timeout_seconds=2, **retry),
    )


def fault(url: str, kind: str, count: int = 1, **extra) -> None:
    response = requests.post(f"{url}/_admin/faults", json={"kind": kind, "count": count, **extra}, timeout=5)
    assert response.status_code < 300, response.text


def window():
    end = datetime.now(timezone.utc) - timedelta(minutes=1)
    return end - timedelta(days=30), end


def truth(sandbox, start, end) -> set[str]:
    return {c["id"] for c in sandbox.hubspot_state.ground_truth(int(start.timestamp() * 1000), int(end.timestamp() * 1000))}


def pull(client, start, end, pause_after_first: float = 0) -> list[str]:
    ids = []
    for number, page in enumerate(client.contacts_modified(start, end)):
        ids.extend(r["id"] for r in page)
        if number == 0 and pause_after_first:
            time.sleep(pause_after_first)
    return ids


def test_window_pull_equals_the_sandbox_exactly(sandbox, tmp_path):
    start, end = window()
    client = hub(sandbox, tmp_path)
    ids = pull(client, start, end)
    assert len(ids) == len(set(ids))
    assert set(ids) == truth(sandbox, start, end)
    assert client.stats.pages >= 5 and client.stats.http_429 == 0


def test_a_bulk_update_sharing_one_timestamp_is_paged_by_id(sandbox, tmp_path):
    bulk = set(sandbox.hubspot_state.mutate(450))  # 450 contacts, one lastmodifieddate
    time.sleep(0.01)
    end = datetime.now(timezone.utc) + timedelta(seconds=1)
    ids = pull(hub(sandbox, tmp_path), end - timedelta(minutes=5), end)
    assert len(ids) == len(set(ids))
    assert bulk <= set(ids)


def test_token_expiring_between_pages_is_refreshed(sandbox, tmp_path):
    start, end = window()
    client = hub(sandbox, tmp_path)
    ids = pull(client, start, end, pause_after_first=3.2)  # the sandbox TTL is 3 s
    assert set(ids) == truth(sandbox, start, end) and len(ids) == len(set(ids))
    assert client.stats.token_refreshes >= 2


def test_token_revoked_mid_pagination_is_refreshed_once_and_retried(sandbox, tmp_path):
    start, end = window()
    client = hub(sandbox, tmp_path)
    fault(sandbox.hubspot_url, "expire_token", path_prefix="/crm/v3/objects/contacts/search")
    ids = pull(client, start, end)
    assert set(ids) == truth(sandbox, start, end) and len(ids) == len(set(ids))


@pytest.mark.parametrize(
    "kind,extra",
    [
        ("http_429", {"retry_after": 1}),
        ("http_500", {}),
        ("http_503", {}),
        ("drop_connection", {}),
        ("malformed_json", {}),
        ("timeout", {"delay_seconds": 3}),
    ],
)
def test_transient_faults_are_retried_without_loss_or_duplicates(sandbox, tmp_path, kind, extra):
    start, end = window()
    client = hub(sandbox, tmp_path)
    fault(sandbox.hubspot_url, kind, count=2, path_prefix="/crm/v3/objects/contacts/search", **extra)
    ids = pull(client, start, end)
    assert set(ids) == truth(sandbox, start, end) and len(ids) == len(set(ids))
    assert client.stats.retries >= 2
    if kind == "http_429":
        assert client.stats.http_429 == 2


def test_records_modified_while_paging_lose_nothing_that_stayed(sandbox, tmp_path):
    start, end = window()
    before = truth(sandbox, start, end)
    fault(sandbox.hubspot_url, "mutate_during_paging", count=4, records=5, path_prefix="/crm/v3/objects/contacts/search")
    ids = pull(hub(sandbox, tmp_path), start, end)
    after = truth(sandbox, start, end)
    assert len(after) < len(before)  # records really moved out of the window
    assert len(ids) == len(set(ids))
    assert after <= set(ids) <= before


def test_a_persistent_failure_is_a_clear_error_without_secrets(sandbox, tmp_path):
    start, end = window()
    client = hub(sandbox, tmp_path, max_attempts=3)
    fault(sandbox.hubspot_url, "http_500", count=10, path_prefix="/crm/v3/objects/contacts/search")
    with pytest.raises(VendorError) as failure:
        pull(client, start, end)
    message = str(failure.value)
    assert "POST /crm/v3/objects/contacts/search answered 500" in message and "after 3 attempts" in message
    assert sandbox.config.hubspot_client_secret not in message and "Bearer" not in message


def test_rejected_refresh_token_says_how_to_fix_it(sandbox, tmp_path):
    cfg = sandbox.config
    client = HubSpotClient(
        base_url=sandbox.hubspot_url,
        token_url=f"{sandbox.hubspot_url}/oauth/v1/token",
        client_id=cfg.hubspot_client_id,
        client_secret=cfg.hubspot_client_secret,
        refresh_token="not-a-real-refresh-token",
        private_app_token=None,
        secret_store=SecretStore(tmp_path / "secrets.json"),
        limiter=SharedRateLimiter(tmp_path / "coordination.sqlite"),
    )
    with pytest.raises(VendorError, match="pp-auth hubspot") as failure:
        pull(client, *window())
    assert "not-a-real-refresh-token" not in str(failure.value)


def test_rotated_tokens_are_kept_in_a_private_secret_store(sandbox, tmp_path):
    # One-page pulls: this sandbox's tokens live 3 s (2.25 s after the refresh margin), and
    # a 30-day pull of several rate-limited pages can outlast that on a loaded machine.
    end = datetime.now(timezone.utc) - timedelta(minutes=1)
    start = end - timedelta(hours=2)
    first = hub(sandbox, tmp_path)
    pull(first, start, end)
    assert first.stats.token_refreshes == 1
    store = tmp_path / "secrets.json"
    assert oct(store.stat().st_mode & 0o777) == "0o600"
    # A second client (another process, a restart) reuses the stored token: no new refresh.
    second = hub(sandbox, tmp_path)
    pull(second, start, end)
    assert second.stats.token_refreshes == 0


def test_private_app_token(sandbox, tmp_path):
    client = HubSpotClient(
        base_url=sandbox.hubspot_url,
        token_url="unused",
        client_id=None,
        client_secret=None,
        refresh_token=None,
        private_app_token=sandbox.config.hubspot_private_app_token,
        secret_store=SecretStore(tmp_path / "s.json"),
        limiter=SharedRateLimiter(tmp_path / "c.sqlite"),
    )
    start, end = window()
    assert set(pull(client, start, end)) == truth(sandbox, start, end)


def test_mailchimp_members_window_equals_the_sandbox(sandbox):
    cfg = sandbox.config
    client = MailchimpClient(
        access_token=cfg.mailchimp_access_token,
        api_key=None,
        metadata_url=f"{sandbox.mailchimp_url}/oauth2/metadata",
        api_base=None,
    )
    start, end = window()
    got = [m["id"] for page in client.members_changed(cfg.mailchimp_list_id, start, end) for m in page]
    lo, hi = int(start.timestamp()) * 1000, int(end.timestamp()) * 1000
    expected = {m["id"] for m in sandbox.mailchimp_state.ground_truth(lo, hi)}
    assert len(got) == len(set(got)) and set(got) == expected
    assert client.api_base == f"{sandbox.mailchimp_url}/3.0"


def test_mailchimp_batch_reports_per_member_errors(sandbox):
    cfg = sandbox.config
    client = MailchimpClient(
        access_token=None, api_key=cfg.mailchimp_api_key, metadata_url="unused", api_base=f"{sandbox.mailchimp_url}/3.0"
    )
    member = sandbox.mailchimp_state.ground_truth(None, None, status="subscribed")[0]
    response = client.batch_update_members(
        cfg.mailchimp_list_id,
        [
            {"email_address": member["email_address"], "merge_fields": {"FNAME": "Zed"}},
            {"email_address": "not-an-email", "merge_fields": {"FNAME": "X"}},
            {"email_address": member["email_address"], "merge_fields": {"NOSUCHTAG": "1"}},
        ],
    )
    assert response["error_count"] == 2
    with pytest.raises(ValueError, match="at most 500"):
        client.batch_update_members(cfg.mailchimp_list_id, [{"email_address": "a@b.c"}] * 501)


@pytest.mark.parametrize("kind", ["http_503", "drop_connection"])
def test_token_endpoint_failures_are_retried(sandbox, tmp_path, kind):
    client = hub(sandbox, tmp_path)
    fault(sandbox.hubspot_url, kind, count=2, path_prefix="/oauth/v1/token")
    start, end = window()
    assert set(pull(client, start, end)) == truth(sandbox, start, end)
    assert client.stats.retries >= 2


def test_more_records_at_one_timestamp_than_the_search_cap(tmp_path):
    """The cap (10,000 at HubSpot; 300 here, so the test stays small) is never hit: one
    instant is paged by hs_object_id, not by `after` offsets."""
    config = SandboxConfig(seed=5, size=1500, hubspot_search_max_results=300)
    with start_sandbox(config) as small_cap:
        bulk = set(small_cap.hubspot_state.mutate(700))
        end = datetime.now(timezone.utc) + timedelta(seconds=1)
        ids = pull(hub(small_cap, tmp_path), end - timedelta(days=40), end)
        truth_all = {c["id"] for c in small_cap.hubspot_state.ground_truth(None, int(end.timestamp() * 1000))}
    assert len(ids) == len(set(ids)) and set(ids) == truth_all and bulk <= set(ids)
