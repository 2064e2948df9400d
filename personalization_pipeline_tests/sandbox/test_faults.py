"""Every fault kind, on the HubSpot and Mailchimp sandboxes, over real HTTP."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import requests

from .conftest import HUBSPOT, LIST_ID, MAILCHIMP, WORLD_NOW

SEARCH = "/crm/v3/objects/contacts/search"
START_MS = int(WORLD_NOW.timestamp() * 1000) - 30 * 86_400_000
END_MS = int(WORLD_NOW.timestamp() * 1000) + 86_400_000


def body(lo=START_MS, hi=END_MS, limit=100):
    return {"filterGroups": [{"filters": [
        {"propertyName": "lastmodifieddate", "operator": "GTE", "value": str(lo)},
        {"propertyName": "lastmodifieddate", "operator": "LT", "value": str(hi)}]}],
        "sorts": [{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}], "limit": limit}


def inject(http, base, **spec):
    r = http.post(f"{base}/_admin/faults", json=spec)
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture
def hs(fresh, http):
    def post(**kwargs):
        return http.post(f"{fresh.hubspot_url}{SEARCH}", json=body(), headers=HUBSPOT, **kwargs)

    return post


@pytest.fixture
def mc(fresh, http):
    def get(**kwargs):
        return http.get(f"{fresh.mailchimp_url}/3.0/lists/{LIST_ID}/members", headers=MAILCHIMP, **kwargs)

    return get


def test_http_429_with_retry_after(fresh, http, hs, mc):
    inject(http, fresh.hubspot_url, kind="http_429", count=2, retry_after=3, path_prefix=SEARCH)
    for _ in range(2):
        r = hs()
        assert r.status_code == 429 and r.headers["Retry-After"] == "3"
        assert r.json()["policyName"] == "SECONDLY" and r.json()["errorType"] == "RATE_LIMIT"
    assert hs().status_code == 200
    inject(http, fresh.mailchimp_url, kind="http_429", retry_after=2)
    r = mc()
    assert r.status_code == 429 and r.headers["Retry-After"] == "2" and r.json()["title"] == "Too Many Requests"
    assert mc().status_code == 200


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors(fresh, http, hs, mc, status):
    inject(http, fresh.hubspot_url, kind=f"http_{status}")
    r = hs()
    assert r.status_code == status and r.json()["status"] == "error"
    assert hs().status_code == 200
    inject(http, fresh.mailchimp_url, kind=f"http_{status}", count=2)
    assert [mc().status_code for _ in range(3)] == [status, status, 200]


def test_timeout_delays_the_answer(fresh, http, hs, mc):
    inject(http, fresh.hubspot_url, kind="timeout", delay_seconds=1.0)
    with pytest.raises(requests.ReadTimeout):
        hs(timeout=0.3)
    assert hs(timeout=5).status_code == 200
    inject(http, fresh.mailchimp_url, kind="timeout", delay_seconds=0.5)
    slow = mc(timeout=5)
    assert slow.status_code == 200 and slow.elapsed.total_seconds() >= 0.45


def test_drop_connection(fresh, http, hs, mc):
    inject(http, fresh.hubspot_url, kind="drop_connection")
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{fresh.hubspot_url}{SEARCH}", json=body(), headers=HUBSPOT, timeout=5)
    assert hs().status_code == 200
    inject(http, fresh.mailchimp_url, kind="drop_connection")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{fresh.mailchimp_url}/3.0/ping", headers=MAILCHIMP, timeout=5)
    assert mc().status_code == 200


def test_malformed_json(fresh, http, hs, mc):
    inject(http, fresh.hubspot_url, kind="malformed_json")
    r = hs()
    assert r.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.content)
    assert hs().json()["total"] > 0
    inject(http, fresh.mailchimp_url, kind="malformed_json")
    with pytest.raises(ValueError):
        mc().json()
    assert "members" in mc().json()


def test_expire_token_invalidates_oauth_tokens(fresh, http):
    url = fresh.hubspot_url
    form = {"grant_type": "refresh_token", "client_id": "sandbox-hubspot-client",
            "client_secret": "sandbox-hubspot-secret", "refresh_token": "sandbox-hubspot-refresh"}
    token = http.post(f"{url}/oauth/v1/token", data=form).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    first = http.post(f"{url}{SEARCH}", json=body(), headers=auth).json()
    inject(http, url, kind="expire_token")
    r = http.post(f"{url}{SEARCH}", json={**body(), "after": first["paging"]["next"]["after"]}, headers=auth)
    assert r.status_code == 401 and r.json()["category"] == "EXPIRED_AUTHENTICATION"
    assert http.post(f"{url}{SEARCH}", json=body(), headers=auth).status_code == 401  # stays invalid
    renewed = http.post(f"{url}/oauth/v1/token", data=form).json()["access_token"]
    assert http.post(f"{url}{SEARCH}", json=body(), headers={"Authorization": f"Bearer {renewed}"}).status_code == 200
    assert http.post(f"{url}{SEARCH}", json=body(), headers=HUBSPOT).status_code == 200
    inject(http, fresh.mailchimp_url, kind="expire_token")
    r = http.get(f"{fresh.mailchimp_url}/3.0/ping", headers=MAILCHIMP)
    assert r.status_code == 401 and r.json()["title"] == "API Key Invalid"
    assert http.get(f"{fresh.mailchimp_url}/3.0/ping", headers=MAILCHIMP).status_code == 200


def test_mutate_during_paging_moves_records_out_of_the_window(fresh, http, clock):
    now = clock.advance(10)
    now_ms = int(now.timestamp() * 1000)
    lo, hi = START_MS, START_MS + 20 * 86_400_000
    inject(http, fresh.hubspot_url, kind="mutate_during_paging", records=4, path_prefix=SEARCH)
    page = http.post(f"{fresh.hubspot_url}{SEARCH}", json=body(lo, hi), headers=HUBSPOT).json()
    moved = http.get(f"{fresh.hubspot_url}/_admin/contacts", params={"modified_from": now_ms}).json()
    assert moved["total"] == 4
    again = http.post(f"{fresh.hubspot_url}{SEARCH}", json=body(lo, hi), headers=HUBSPOT).json()
    assert again["total"] == page["total"] - 4
    # Mailchimp: the members edited are ones inside the requested window.
    since, before = WORLD_NOW - timedelta(days=20), WORLD_NOW - timedelta(days=5)
    params = {"since_last_changed": since.isoformat(), "before_last_changed": before.isoformat(), "count": 50}
    inject(http, fresh.mailchimp_url, kind="mutate_during_paging", records=3)
    url = f"{fresh.mailchimp_url}/3.0/lists/{LIST_ID}/members"
    total = http.get(url, params=params, headers=MAILCHIMP).json()["total_items"]
    assert http.get(url, params=params, headers=MAILCHIMP).json()["total_items"] == total - 3


def test_fault_queue_matching_listing_and_clearing(fresh, http, hs):
    url = fresh.hubspot_url
    inject(http, url, kind="http_500", path_prefix="/crm/v3/objects/contacts/batch", count=3)
    inject(http, url, kind="http_503", method="GET")
    assert hs().status_code == 200  # POST search matches neither
    listed = http.get(f"{url}/_admin/faults").json()
    assert [f["kind"] for f in listed["faults"]] == ["http_500", "http_503"] and listed["applied"] == []
    assert http.get(f"{url}/crm/v3/objects/contacts", headers=HUBSPOT).status_code == 503
    listed = http.get(f"{url}/_admin/faults").json()
    assert [f["kind"] for f in listed["faults"]] == ["http_500"] and listed["applied"][0]["kind"] == "http_503"
    assert http.delete(f"{url}/_admin/faults").status_code == 204
    assert http.get(f"{url}/_admin/faults").json() == {"faults": [], "applied": []}
    assert http.post(f"{url}/_admin/faults", json={"kind": "meteor"}).status_code == 400
    assert http.post(f"{url}/_admin/faults", json={"kind": "http_500", "count": 0}).status_code == 400
    # Admin paths are never faulted.
    inject(http, url, kind="http_500", path_prefix="/")
    assert http.get(f"{url}/_admin/contacts", params={"modified_from": END_MS}).status_code == 200
    stats = http.get(f"{url}/_admin/stats").json()
    assert stats["by_endpoint"]["POST /crm/v3/objects/contacts/search"]["200"] >= 1
