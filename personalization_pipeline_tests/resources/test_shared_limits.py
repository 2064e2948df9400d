"""Limits and the circuit breaker shared across OS processes, measured at the sandbox over
real HTTP: the HubSpot search bucket, Mailchimp's simultaneous-connection limit, and the
breaker (in the clients and in an asset run)."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pytest
import requests

from personalization_pipeline.core.breaker import CLOSED, HALF_OPEN, OPEN, BreakerPolicy
from personalization_pipeline.resources.http import CircuitOpenError, RetryPolicy, VendorError
from personalization_pipeline.resources.hubspot import HubSpotClient, HubSpotResource
from personalization_pipeline.resources.mailchimp import MailchimpClient
from personalization_pipeline.resources.shared_state import (
    SecretStore,
    SharedCircuitBreaker,
    SharedConnectionSlots,
    SharedRateLimiter,
)
from personalization_pipeline.sandbox.server import SandboxConfig, start_sandbox

SEARCH = "/crm/v3/objects/contacts/search"
SEARCH_BODY = {"filterGroups": [], "sorts": [], "properties": ["email"], "limit": 10}


@pytest.fixture(scope="module")
def sandbox():
    with start_sandbox(SandboxConfig(seed=31, size=1600, history_days=10)) as running:
        yield running


@pytest.fixture(scope="module")
def pool():
    """Two spawned worker processes, started once (spawning costs about a second)."""
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as executor:
        for future in [executor.submit(_noop) for _ in range(2)]:
            future.result(timeout=60)
        yield executor


@pytest.fixture(autouse=True)
def clear_faults(sandbox):
    for url in (sandbox.hubspot_url, sandbox.mailchimp_url):
        requests.delete(f"{url}/_admin/faults", timeout=5)
    yield
    for url in (sandbox.hubspot_url, sandbox.mailchimp_url):
        requests.delete(f"{url}/_admin/faults", timeout=5)


def _noop() -> int:
    return os.getpid()


def fault(url: str, kind: str, count: int = 1, **extra) -> None:
    response = requests.post(f"{url}/_admin/faults", json={"kind": kind, "count": count, **extra}, timeout=5)
    assert response.status_code < 300, response.text


def sandbox_stats(url: str) -> dict:
    return requests.get(f"{url}/_admin/stats", timeout=5).json()


def count_status(stats: dict, status: str) -> int:
    return sum(by.get(status, 0) for by in stats["by_endpoint"].values())


def hub_client(hubspot_url: str, cfg: dict, state_dir: str, breaker: SharedCircuitBreaker | None = None,
               **retry) -> HubSpotClient:
    state = Path(state_dir)
    return HubSpotClient(
        base_url=hubspot_url,
        token_url=f"{hubspot_url}/oauth/v1/token",
        client_id=cfg["client_id"],
        client_secret=cfg["client_secret"],
        refresh_token=cfg["refresh_token"],
        private_app_token=None,
        secret_store=SecretStore(state / "secrets.json"),
        limiter=SharedRateLimiter(state / "coordination.sqlite"),
        retry=RetryPolicy(**{"base_delay": 0.05, "max_delay": 0.5, "timeout_seconds": 5, **retry}),
        breaker=breaker,
    )


def hub_cfg(sandbox) -> dict:
    c = sandbox.config
    return {"client_id": c.hubspot_client_id, "client_secret": c.hubspot_client_secret,
            "refresh_token": c.hubspot_refresh_token}


# -- workers (module level, so spawned processes can import them) ----------------------


def pull_hubspot(hubspot_url: str, cfg: dict, state_dir: str, window: tuple[float, float],
                 start_at: float, repeats: int = 1) -> dict:
    """Pull the window `repeats` times, starting at wall time `start_at`."""
    client = hub_client(hubspot_url, cfg, state_dir)
    client._token()  # authorise before the clock starts; the token is shared anyway
    start, end = (datetime.fromtimestamp(t, timezone.utc) for t in window)
    time.sleep(max(0.0, start_at - time.time()))
    began = time.time()
    rows = 0
    for _ in range(repeats):
        rows += sum(len(page) for page in client.contacts_modified(start, end))
    return {"began": began, "ended": time.time(), "rows": rows, "pages": client.stats.pages,
            "http_429": client.stats.http_429}


def hammer_mailchimp(mailchimp_url: str, api_key: str, list_id: str, state_dir: str, start_at: float,
                     emails: list[str], threads: int = 8, rounds: int = 4) -> dict:
    """`threads` threads sharing one client, each reading and pushing `rounds` times."""
    client = MailchimpClient(
        access_token=None,
        api_key=api_key,
        metadata_url="unused",
        api_base=f"{mailchimp_url}/3.0",
        retry=RetryPolicy(max_attempts=2, base_delay=0.05, timeout_seconds=10),
        connection_slots=SharedConnectionSlots(Path(state_dir) / "coordination.sqlite"),
    )
    errors: list[str] = []

    def work(number: int) -> None:
        try:
            for round_ in range(rounds):
                if round_ % 2:
                    client.merge_fields(list_id)
                else:
                    email = emails[(number + round_) % len(emails)]
                    client.batch_update_members(
                        list_id, [{"email_address": email, "merge_fields": {"FNAME": f"T{number}"}}]
                    )
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errors.append(repr(exc))

    time.sleep(max(0.0, start_at - time.time()))
    pool = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return {"errors": errors, "api_calls": client.stats.api_calls, "http_429": client.stats.http_429}


def call_through_resource(hubspot_url: str, cfg: dict, state_dir: str) -> tuple[str, str]:
    """Another process builds its client from the resource, as a run would."""
    resource = HubSpotResource(base_url=hubspot_url, client_id=cfg["client_id"],
                               client_secret=cfg["client_secret"], refresh_token=cfg["refresh_token"],
                               state_dir=state_dir)
    client = resource.get_client()
    try:
        client.search(SEARCH_BODY)
    except VendorError as exc:
        return type(exc).__name__, str(exc)
    return "ok", ""


# -- HubSpot: one search bucket for two processes ---------------------------------------


def test_two_processes_share_the_hubspot_search_bucket(sandbox, pool, tmp_path):
    end = datetime.now(timezone.utc) - timedelta(minutes=1)
    window = ((end - timedelta(days=30)).timestamp(), end.timestamp())
    cfg = hub_cfg(sandbox)

    # One process pulling the window twice: the time two processes sharing one bucket
    # should take together.
    alone = pull_hubspot(sandbox.hubspot_url, cfg, str(tmp_path / "alone"), window, 0, repeats=2)
    single_seconds = alone["ended"] - alone["began"]
    assert alone["http_429"] == 0

    time.sleep(1.1)  # the sandbox's rolling second forgets the first pull
    requests.delete(f"{sandbox.hubspot_url}/_admin/stats", timeout=5)
    shared = str(tmp_path / "shared")
    pull_hubspot(sandbox.hubspot_url, cfg, shared, window, 0)  # warm the token in the shared store
    time.sleep(1.1)
    requests.delete(f"{sandbox.hubspot_url}/_admin/stats", timeout=5)
    start_at = time.time() + 1.0
    futures = [pool.submit(pull_hubspot, sandbox.hubspot_url, cfg, shared, window, start_at) for _ in range(2)]
    results = [f.result(timeout=60) for f in futures]
    together = max(r["ended"] for r in results) - start_at

    stats = sandbox_stats(sandbox.hubspot_url)
    search_counts = stats["by_endpoint"][f"POST {SEARCH}"]
    assert count_status(stats, "429") == 0, stats
    assert sum(r["http_429"] for r in results) == 0
    assert search_counts.get("200") == sum(r["pages"] for r in results) == alone["pages"]
    assert results[0]["rows"] == results[1]["rows"] == alone["rows"] // 2
    # They share one bucket: together as slow as one process doing both pulls, not twice
    # as fast.
    print(f"one process, 2 pulls: {single_seconds:.2f}s; two processes, 1 pull each: {together:.2f}s "
          f"({alone['pages']} search pages)")
    assert 0.8 * single_seconds <= together <= 1.25 * single_seconds + 0.5


# -- Mailchimp: ten connections for everyone ----------------------------------------------


def test_two_processes_of_eight_threads_stay_within_ten_mailchimp_connections(sandbox, pool, tmp_path):
    cfg = sandbox.config
    emails = [m["email_address"] for m in sandbox.mailchimp_state.ground_truth(None, None, status="subscribed")[:16]]
    before = requests.get(f"{sandbox.mailchimp_url}/_admin/connections", timeout=5).json()
    requests.delete(f"{sandbox.mailchimp_url}/_admin/stats", timeout=5)
    # Every API request is held 0.25 s at the sandbox, so sixteen threads really overlap.
    fault(sandbox.mailchimp_url, "timeout", count=1000, delay_seconds=0.25, path_prefix="/3.0/lists")
    start_at = time.time() + 1.0
    futures = [
        pool.submit(hammer_mailchimp, sandbox.mailchimp_url, cfg.mailchimp_api_key, cfg.mailchimp_list_id,
                    str(tmp_path), start_at, emails)
        for _ in range(2)
    ]
    results = [f.result(timeout=60) for f in futures]
    elapsed = time.time() - start_at
    after = requests.get(f"{sandbox.mailchimp_url}/_admin/connections", timeout=5).json()
    stats = sandbox_stats(sandbox.mailchimp_url)

    assert [r["errors"] for r in results] == [[], []]
    assert sum(r["api_calls"] for r in results) == 2 * 8 * 4
    assert after["rejected"] == before["rejected"], after
    assert count_status(stats, "429") == 0, stats
    assert after["peak"] <= 10
    # 64 requests of 0.25 s through 10 slots take at least 1.6 s: the slots were the limit.
    print(f"64 requests in {elapsed:.2f}s, peak {after['peak']} connections")
    assert elapsed >= 1.5


def test_a_dead_holder_or_an_expired_lease_frees_its_slot(tmp_path):
    slots = SharedConnectionSlots(tmp_path / "coordination.sqlite")
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_take_slot_and_die, args=(str(tmp_path),))
    child.start()
    child.join(30)
    assert child.exitcode == 3
    # The killed process left its lease behind; it is not counted, and the slot is reused.
    assert slots.try_acquire("k", 1, 60) is not None
    held = SharedConnectionSlots(tmp_path / "coordination.sqlite").try_acquire("other", 1, 0.2)
    assert held is not None and slots.try_acquire("other", 1, 60) is None
    time.sleep(0.25)
    assert slots.try_acquire("other", 1, 60) is not None


def _take_slot_and_die(state_dir: str) -> None:
    SharedConnectionSlots(Path(state_dir) / "coordination.sqlite").try_acquire("k", 1, 600)
    os._exit(3)


# -- the circuit breaker -------------------------------------------------------------------


def test_breaker_opens_fails_fast_half_opens_and_closes(sandbox, tmp_path):
    breaker = SharedCircuitBreaker(tmp_path / "coordination.sqlite", "hubspot:default",
                                   BreakerPolicy(failure_threshold=3, cooldown_seconds=1.0))
    client = hub_client(sandbox.hubspot_url, hub_cfg(sandbox), str(tmp_path), breaker, max_attempts=2)
    client.search(SEARCH_BODY)
    assert client.stats.circuit_state == CLOSED

    fault(sandbox.hubspot_url, "http_500", count=6, path_prefix=SEARCH)
    for failures in (1, 2, 3):
        with pytest.raises(VendorError, match="answered 500"):
            client.search(SEARCH_BODY)
        assert client.stats.breaker_failures == failures
    state = breaker.state()
    assert state.state == OPEN and client.stats.circuit_state == OPEN
    assert client.stats.as_metadata()["circuit_state"] == "open"

    # Open: no request reaches the sandbox, no retry, no wait.
    seen = sandbox_stats(sandbox.hubspot_url)["requests"]
    calls = client.stats.api_calls
    began = time.monotonic()
    for _ in range(5):
        with pytest.raises(CircuitOpenError) as refused:
            client.search(SEARCH_BODY)
    assert time.monotonic() - began < 0.5
    assert sandbox_stats(sandbox.hubspot_url)["requests"] == seen and client.stats.api_calls == calls
    message = str(refused.value)
    opened = datetime.fromtimestamp(state.opened_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert f"HubSpot circuit breaker is open since {opened}" in message
    assert "after 3 consecutive failed requests" in message and "until" in message and "probe" in message
    assert "answered 500" in message  # the last error, for the reader of the run's failure
    assert refused.value.retry_at == pytest.approx(state.opened_at + 1.0)

    # After the cool-down one probe goes through, as a single attempt; it fails, so the
    # breaker opens again.
    time.sleep(max(0.0, refused.value.retry_at - time.time()) + 0.05)
    fault(sandbox.hubspot_url, "http_500", count=1, path_prefix=SEARCH)
    calls = client.stats.api_calls
    with pytest.raises(VendorError, match="answered 500 .* after 1 attempts"):
        client.search(SEARCH_BODY)
    assert client.stats.api_calls == calls + 1
    assert breaker.state().state == OPEN and breaker.state().opened_at > state.opened_at
    with pytest.raises(CircuitOpenError):
        client.search(SEARCH_BODY)

    # The next probe succeeds and closes it.
    time.sleep(1.05)
    assert client.search(SEARCH_BODY)["results"]
    assert breaker.state().state == CLOSED and client.stats.circuit_state == CLOSED
    assert client.stats.breaker_failures == 0
    client.search(SEARCH_BODY)


def test_one_probe_at_a_time_while_half_open(sandbox, tmp_path):
    breaker = SharedCircuitBreaker(tmp_path / "coordination.sqlite", "hubspot:default",
                                   BreakerPolicy(failure_threshold=1, cooldown_seconds=0.2, probe_lease_seconds=5))
    client = hub_client(sandbox.hubspot_url, hub_cfg(sandbox), str(tmp_path), breaker, max_attempts=1)
    client._token()
    fault(sandbox.hubspot_url, "http_500", path_prefix=SEARCH)
    with pytest.raises(VendorError):
        client.search(SEARCH_BODY)
    time.sleep(0.25)
    # The probe is held 1 s at the sandbox; a second caller meanwhile is refused at once.
    fault(sandbox.hubspot_url, "timeout", delay_seconds=1, path_prefix=SEARCH)
    probe = threading.Thread(target=client.search, args=(SEARCH_BODY,))
    probe.start()
    try:
        time.sleep(0.3)
        assert breaker.state().state == HALF_OPEN
        with pytest.raises(CircuitOpenError, match="half-open"):
            hub_client(sandbox.hubspot_url, hub_cfg(sandbox), str(tmp_path), breaker).search(SEARCH_BODY)
    finally:
        probe.join(10)
    assert breaker.state().state == CLOSED


def test_another_process_sees_the_open_breaker(sandbox, pool, tmp_path):
    cfg = hub_cfg(sandbox)
    state_dir = tmp_path / "state"
    breaker = SharedCircuitBreaker(state_dir / "coordination.sqlite", "hubspot:default",
                                   BreakerPolicy(failure_threshold=1, cooldown_seconds=60))
    client = hub_client(sandbox.hubspot_url, cfg, str(state_dir), breaker, max_attempts=1)
    fault(sandbox.hubspot_url, "http_500", path_prefix=SEARCH)
    with pytest.raises(VendorError):
        client.search(SEARCH_BODY)
    seen = sandbox_stats(sandbox.hubspot_url)["requests"]
    kind, message = pool.submit(call_through_resource, sandbox.hubspot_url, cfg, str(state_dir)).result(timeout=60)
    assert kind == "CircuitOpenError"
    assert "HubSpot circuit breaker is open since" in message
    assert sandbox_stats(sandbox.hubspot_url)["requests"] == seen


def test_an_asset_run_with_the_breaker_open_fails_fast_without_retries(sandbox, tmp_path, monkeypatch):
    from personalization_pipeline.assets.sources import crm_contacts
    from personalization_pipeline.resources.lake import LakeResource
    from personalization_pipeline.resources.runtime import RuntimeResource

    monkeypatch.setenv("PP_DATA_DIR", str(tmp_path))
    cfg = sandbox.config
    breaker = SharedCircuitBreaker(tmp_path / "state" / "coordination.sqlite", "hubspot:default")
    for _ in range(5):  # five failed requests, as a broken HubSpot would leave it
        admission, _ = breaker.admit()
        breaker.record(admission, False, "HubSpot POST /crm/v3/objects/contacts/search answered 503")
    assert breaker.state().state == OPEN

    seen = sandbox_stats(sandbox.hubspot_url)["requests"]
    now = datetime.now(timezone.utc).replace(minute=50, second=0, microsecond=0)
    resources = {
        "hubspot": HubSpotResource(base_url=sandbox.hubspot_url, client_id=cfg.hubspot_client_id,
                                   client_secret=cfg.hubspot_client_secret, refresh_token=cfg.hubspot_refresh_token),
        "lake": LakeResource(),
        "runtime": RuntimeResource(lag_seconds=60, now_override=now.isoformat()),
    }
    began = time.monotonic()
    result = dg.materialize([crm_contacts], resources=resources, partition_key=now.strftime("%Y-%m-%d-%H:00"),
                            raise_on_error=False)
    assert not result.success
    assert time.monotonic() - began < 20  # a Dagster retry would wait 5 s or more
    assert result.get_asset_materialization_events() == []
    events = result.all_events
    assert not [e for e in events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    failures = [e for e in events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert len(failures) == 1
    failure = failures[0].step_failure_data
    assert "HubSpot circuit breaker is open since" in failure.user_failure_data.description
    assert "answered 503" in failure.user_failure_data.description
    assert failure.user_failure_data.metadata["circuit_state"].value == "open"
    assert sandbox_stats(sandbox.hubspot_url)["requests"] == seen
    staged = tmp_path / "lake" / "staged" / "crm"
    assert not staged.exists() or not any(staged.iterdir())
