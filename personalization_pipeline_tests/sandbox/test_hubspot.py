"""The HubSpot sandbox over real HTTP: OAuth, search, CRUD, limits, admin."""

from __future__ import annotations

import re
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from personalization_pipeline.sandbox import SandboxConfig, start_sandbox

from .conftest import HUBSPOT, WORLD_NOW

CONTACTS = "/crm/v3/objects/contacts"
ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
START_MS = int(WORLD_NOW.timestamp() * 1000) - 30 * 86_400_000
END_MS = int(WORLD_NOW.timestamp() * 1000) + 3_600_000
PROPS = ["email", "firstname", "lastname", "city", "country", "lifecyclestage", "loyalty_tier",
         "lastmodifieddate", "hs_object_id"]


def search(http, sandbox, body, headers=HUBSPOT):
    return http.post(f"{sandbox.hubspot_url}{CONTACTS}/search", json=body, headers=headers)


def window(lo, hi, *extra):
    return [{"filters": [
        {"propertyName": "lastmodifieddate", "operator": "GTE", "value": str(lo)},
        {"propertyName": "lastmodifieddate", "operator": "LT", "value": str(hi)},
        *extra,
    ]}]


def everything(http, sandbox):
    truth = http.get(f"{sandbox.hubspot_url}/_admin/contacts").json()
    return truth["results"]


def pull(http, sandbox, groups, sorts=None, limit=200):
    rows, after = [], None
    while True:
        body = {"filterGroups": groups, "properties": PROPS, "limit": limit,
                "sorts": sorts or [{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}]}
        if after:
            body["after"] = after
        r = search(http, sandbox, body)
        assert r.status_code == 200, r.text
        page = r.json()
        rows.extend(page["results"])
        after = page.get("paging", {}).get("next", {}).get("after")
        if not after:
            assert len(rows) == page["total"]
            return rows


# -- OAuth ----------------------------------------------------------------------------


def test_authorization_code_and_refresh_grants(fresh, http):
    url = fresh.hubspot_url
    r = http.get(f"{url}/oauth/authorize", allow_redirects=False, params={
        "client_id": "sandbox-hubspot-client", "redirect_uri": "http://localhost:9/cb",
        "scope": "crm.objects.contacts.read crm.objects.contacts.write", "state": "xyz"})
    assert r.status_code == 302
    location = urlsplit(r.headers["location"])
    query = parse_qs(location.query)
    assert location.netloc == "localhost:9" and query["state"] == ["xyz"]
    form = {"grant_type": "authorization_code", "client_id": "sandbox-hubspot-client",
            "client_secret": "sandbox-hubspot-secret", "redirect_uri": "http://localhost:9/cb",
            "code": query["code"][0]}
    r = http.post(f"{url}/oauth/v1/token", data=form)
    assert r.status_code == 200, r.text
    token = r.json()
    assert token["token_type"] == "bearer" and token["expires_in"] == 1800
    assert token["access_token"] and token["refresh_token"]
    assert http.get(f"{url}{CONTACTS}", headers={"Authorization": f"Bearer {token['access_token']}"}).status_code == 200
    # Codes are single-use.
    assert http.post(f"{url}/oauth/v1/token", data=form).json()["status"] == "BAD_AUTH_CODE"
    # Refresh keeps the same refresh token; the bootstrap refresh token works too.
    for refresh in (token["refresh_token"], "sandbox-hubspot-refresh"):
        r = http.post(f"{url}/oauth/v1/token", data={
            "grant_type": "refresh_token", "client_id": "sandbox-hubspot-client",
            "client_secret": "sandbox-hubspot-secret", "refresh_token": refresh})
        assert r.status_code == 200 and r.json()["refresh_token"] == refresh
        assert r.json()["access_token"] != token["access_token"]
    bad = http.post(f"{url}/oauth/v1/token", data={
        "grant_type": "refresh_token", "client_id": "sandbox-hubspot-client",
        "client_secret": "wrong", "refresh_token": "sandbox-hubspot-refresh"})
    assert bad.status_code == 400 and bad.json()["status"] == "BAD_CLIENT_SECRET"
    bad = http.post(f"{url}/oauth/v1/token", data={
        "grant_type": "refresh_token", "client_id": "sandbox-hubspot-client",
        "client_secret": "sandbox-hubspot-secret", "refresh_token": "nope"})
    assert bad.status_code == 400 and bad.json()["status"] == "BAD_REFRESH_TOKEN"


def test_access_tokens_expire_after_the_ttl(http):
    with start_sandbox(SandboxConfig(token_ttl_seconds=2, world_now=WORLD_NOW)) as sandbox:
        url = sandbox.hubspot_url
        form = {"grant_type": "refresh_token", "client_id": "sandbox-hubspot-client",
                "client_secret": "sandbox-hubspot-secret", "refresh_token": "sandbox-hubspot-refresh"}
        token = http.post(f"{url}/oauth/v1/token", data=form).json()
        assert token["expires_in"] == 2
        auth = {"Authorization": f"Bearer {token['access_token']}"}
        assert http.get(f"{url}{CONTACTS}", headers=auth).status_code == 200
        time.sleep(2.2)
        r = http.get(f"{url}{CONTACTS}", headers=auth)
        assert r.status_code == 401
        assert r.json()["category"] == "EXPIRED_AUTHENTICATION"
        assert r.json()["message"].startswith("Authentication credentials not found")
        fresh_token = http.post(f"{url}/oauth/v1/token", data=form).json()["access_token"]
        assert http.get(f"{url}{CONTACTS}", headers={"Authorization": f"Bearer {fresh_token}"}).status_code == 200


def test_unknown_or_missing_credentials_get_401(fresh, http):
    url = f"{fresh.hubspot_url}{CONTACTS}"
    r = http.get(url, headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401 and r.json()["category"] == "EXPIRED_AUTHENTICATION"
    assert r.headers["X-HubSpot-RateLimit-Max"] and r.headers["X-HubSpot-RateLimit-Remaining"]
    r = http.get(url)
    assert r.status_code == 401 and r.json()["category"] == "INVALID_AUTHENTICATION"


# -- search ---------------------------------------------------------------------------


def test_window_pull_returns_exactly_the_window_in_order(fresh, http):
    lo, hi = START_MS + 5 * 86_400_000, START_MS + 20 * 86_400_000
    rows = pull(http, fresh, window(lo, hi))
    truth = {c["id"] for c in everything(http, fresh)
             if lo <= c["lastmodifieddate_ms"] < hi}
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) and set(ids) == truth and len(truth) > 500
    keys = [(r["properties"]["lastmodifieddate"], int(r["id"])) for r in rows]
    assert keys == sorted(keys)
    record = rows[0]
    assert set(record) >= {"id", "properties", "createdAt", "updatedAt", "archived"}
    assert record["archived"] is False and ISO_MS.match(record["updatedAt"])
    assert ISO_MS.match(record["properties"]["lastmodifieddate"])
    assert record["properties"]["hs_object_id"] == record["id"]
    assert all(v is None or isinstance(v, str) for v in record["properties"].values())


def test_ties_at_one_instant_are_paged_by_id(fresh, http):
    c = fresh.hubspot_state
    instant = int(max(set(c.lmd.tolist()), key=c.lmd.tolist().count))
    expected = sorted(int(i) for i in c.ids[c.lmd == instant])
    assert len(expected) > 50
    got, after_id = [], 0
    while True:
        r = search(http, fresh, {
            "filterGroups": [{"filters": [
                {"propertyName": "lastmodifieddate", "operator": "EQ", "value": str(instant)},
                {"propertyName": "hs_object_id", "operator": "GT", "value": str(after_id)}]}],
            "sorts": [{"propertyName": "hs_object_id", "direction": "ASCENDING"}], "limit": 20})
        page = [int(x["id"]) for x in r.json()["results"]]
        got.extend(page)
        if len(page) < 20:
            break
        after_id = page[-1]
    assert got == expected


def brute(contacts, predicate):
    return {c["id"] for c in contacts if predicate(c["properties"])}


@pytest.mark.parametrize(
    "flt, predicate",
    [
        ({"propertyName": "city", "operator": "EQ", "value": "berlin"}, lambda p: p["city"].lower() == "berlin"),
        ({"propertyName": "lifecyclestage", "operator": "NEQ", "value": "lead"}, lambda p: p["lifecyclestage"] != "lead"),
        ({"propertyName": "lifecyclestage", "operator": "IN", "values": ["customer", "evangelist"]},
         lambda p: p["lifecyclestage"] in ("customer", "evangelist")),
        ({"propertyName": "country", "operator": "NOT_IN", "values": ["US", "DE"]},
         lambda p: p["country"] not in ("US", "DE")),
        ({"propertyName": "loyalty_tier", "operator": "HAS_PROPERTY"}, lambda p: p["loyalty_tier"] != ""),
        ({"propertyName": "city", "operator": "NOT_HAS_PROPERTY"}, lambda p: p["city"] == ""),
        ({"propertyName": "hs_object_id", "operator": "LT", "value": "10001000"},
         lambda p: int(p["hs_object_id"]) < 10001000),
        ({"propertyName": "hs_object_id", "operator": "GTE", "value": "10003000"},
         lambda p: int(p["hs_object_id"]) >= 10003000),
        ({"propertyName": "lastmodifieddate", "operator": "BETWEEN", "value": str(START_MS + 86_400_000 * 3),
          "highValue": str(START_MS + 86_400_000 * 4)},
         lambda p: START_MS + 86_400_000 * 3 <= int(p["_lmd"]) <= START_MS + 86_400_000 * 4),
        ({"propertyName": "lastmodifieddate", "operator": "LTE", "value": "2026-11-05T00:00:00.000Z"},
         lambda p: int(p["_lmd"]) <= 1793836800000),
        ({"propertyName": "firstname", "operator": "CONTAINS_TOKEN", "value": "jo*"},
         lambda p: p["firstname"].lower().startswith("jo")),
    ],
)
def test_filter_operators_match_a_brute_force_scan(fresh, http, flt, predicate):
    contacts = everything(http, fresh)
    for c in contacts:
        c["properties"]["_lmd"] = c["lastmodifieddate_ms"]
    rows = pull(http, fresh, [{"filters": [flt]}], sorts=[{"propertyName": "hs_object_id", "direction": "ASCENDING"}])
    expected = brute(contacts, predicate)
    assert {r["id"] for r in rows} == expected and expected
    assert [int(r["id"]) for r in rows] == sorted(int(r["id"]) for r in rows)


def test_email_lookup_ignores_case_and_whitespace_and_groups_are_ored(fresh, http):
    contacts = everything(http, fresh)
    messy = next(c for c in contacts if c["properties"]["email"] != c["properties"]["email"].strip())
    address = messy["properties"]["email"].strip().upper()
    other = contacts[5]
    r = search(http, fresh, {"filterGroups": [
        {"filters": [{"propertyName": "email", "operator": "EQ", "value": address}]},
        {"filters": [{"propertyName": "hs_object_id", "operator": "EQ", "value": other["id"]}]}],
        "properties": ["email"]})
    assert {x["id"] for x in r.json()["results"]} >= {messy["id"], other["id"]}


def test_sorts_and_default_properties(fresh, http):
    body = {"filterGroups": window(START_MS, END_MS), "limit": 50,
            "sorts": [{"propertyName": "lastmodifieddate", "direction": "DESCENDING"}]}
    page = search(http, fresh, body).json()["results"]
    assert set(page[0]["properties"]) == {"createdate", "email", "firstname", "hs_object_id",
                                          "lastmodifieddate", "lastname"}
    stamps = [p["properties"]["lastmodifieddate"] for p in page]
    assert stamps == sorted(stamps, reverse=True)
    body["sorts"] = [{"propertyName": "createdate", "direction": "ASCENDING"}]
    created = [p["properties"]["createdate"] for p in search(http, fresh, body).json()["results"]]
    assert created == sorted(created)
    body["sorts"] = ["-hs_object_id"]
    ids = [int(p["id"]) for p in search(http, fresh, body).json()["results"]]
    assert ids == sorted(ids, reverse=True)
    body["sorts"] = [{"propertyName": "lastname", "direction": "ASCENDING"}]
    body["properties"] = ["lastname"]
    names = [p["properties"]["lastname"] for p in search(http, fresh, body).json()["results"]]
    assert [n.lower() for n in names if n] == sorted(n.lower() for n in names if n)


def test_paging_past_the_result_cap_is_a_400(fresh, http):
    ok = search(http, fresh, {"filterGroups": [], "limit": 200, "after": "9800"})
    assert ok.status_code == 200
    r = search(http, fresh, {"filterGroups": [], "limit": 200, "after": "9900"})
    assert r.status_code == 400 and r.json()["category"] == "VALIDATION_ERROR"
    assert "10000" in r.json()["message"]


def test_a_smaller_configured_cap_is_reached_while_paging(http):
    with start_sandbox(SandboxConfig(hubspot_search_max_results=100, world_now=WORLD_NOW)) as sandbox:
        body = {"filterGroups": window(START_MS, END_MS), "limit": 50}
        first = search(http, sandbox, body).json()
        assert first["total"] > 100 and first["paging"]["next"]["after"] == "50"
        second = search(http, sandbox, {**body, "after": "50"}).json()
        assert second["paging"]["next"]["after"] == "100"
        assert search(http, sandbox, {**body, "after": "100"}).status_code == 400


@pytest.mark.parametrize(
    "body",
    [
        {"filterGroups": [{"filters": []}] * 6},
        {"filterGroups": [{"filters": [{"propertyName": "city", "operator": "HAS_PROPERTY"}] * 11}]},
        {"filterGroups": [{"filters": [{"propertyName": "city", "operator": "HAS_PROPERTY"}] * 6}] * 5},
        {"filterGroups": [], "limit": 201},
        {"filterGroups": [{"filters": [{"propertyName": "nope", "operator": "EQ", "value": "x"}]}]},
        {"filterGroups": [{"filters": [{"propertyName": "city", "operator": "LIKE", "value": "x"}]}]},
        {"filterGroups": [{"filters": [{"propertyName": "lastmodifieddate", "operator": "GT", "value": "soon"}]}]},
        {"filterGroups": [], "sorts": [{"propertyName": "city"}, {"propertyName": "email"}]},
    ],
)
def test_invalid_searches_are_400(fresh, http, body):
    r = search(http, fresh, body)
    assert r.status_code == 400
    assert r.json()["status"] == "error" and r.json()["category"] == "VALIDATION_ERROR"


# -- rate limits ----------------------------------------------------------------------------


def test_rate_limits_answer_429_with_retry_after(http):
    config = SandboxConfig(world_now=WORLD_NOW, hubspot_requests_per_10s=5, hubspot_search_per_second=2)
    with start_sandbox(config) as sandbox:
        body = {"filterGroups": [], "limit": 1}
        statuses = [search(http, sandbox, body) for _ in range(3)]
        assert [r.status_code for r in statuses[:2]] == [200, 200]
        limited = statuses[2]
        assert limited.status_code == 429
        assert limited.json()["policyName"] == "SECONDLY" and limited.json()["errorType"] == "RATE_LIMIT"
        assert int(limited.headers["Retry-After"]) >= 1
        ok = statuses[0]
        assert ok.headers["X-HubSpot-RateLimit-Max"] == "5"
        assert ok.headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "10000"
        assert ok.headers["X-HubSpot-RateLimit-Remaining"] == "4"
        url = f"{sandbox.hubspot_url}{CONTACTS}"
        codes = [http.get(url, headers=HUBSPOT).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = http.get(url, headers=HUBSPOT)
        assert r.status_code == 429
        assert r.json()["policyName"] == "TEN_SECONDLY_ROLLING"
        assert r.json()["message"] == "You have reached your ten_secondly_rolling limit."
        assert 1 <= int(r.headers["Retry-After"]) <= 10
        assert r.headers["X-HubSpot-RateLimit-Remaining"] == "0"
        # The token endpoint is not limited.
        token = http.post(f"{sandbox.hubspot_url}/oauth/v1/token", data={
            "grant_type": "refresh_token", "client_id": "sandbox-hubspot-client",
            "client_secret": "sandbox-hubspot-secret", "refresh_token": "sandbox-hubspot-refresh"})
        assert token.status_code == 200


# -- objects ----------------------------------------------------------------------------------


def test_get_list_and_read_by_id_or_email(fresh, http):
    url = fresh.hubspot_url + CONTACTS
    contacts = everything(http, fresh)
    target = next(c for c in contacts if c["properties"]["email"] and c["properties"]["city"])
    one = http.get(f"{url}/{target['id']}", params={"properties": "email,city"}, headers=HUBSPOT).json()
    assert one["properties"]["city"] == target["properties"]["city"]
    by_email = http.get(f"{url}/{target['properties']['email'].strip().upper()}",
                        params={"idProperty": "email"}, headers=HUBSPOT)
    assert by_email.status_code == 200
    missing = http.get(f"{url}/1", headers=HUBSPOT)
    assert missing.status_code == 404 and missing.json()["category"] == "OBJECT_NOT_FOUND"
    r = http.post(f"{url}/batch/read", headers=HUBSPOT, json={
        "inputs": [{"id": target["id"]}, {"id": "1"}], "properties": ["email"]})
    assert r.status_code == 207 and len(r.json()["results"]) == 1 and r.json()["numErrors"] == 1
    seen, after = [], None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        page = http.get(url, params=params, headers=HUBSPOT).json()
        seen.extend(x["id"] for x in page["results"])
        after = page.get("paging", {}).get("next", {}).get("after")
        if not after:
            break
    assert len(seen) == len(set(seen)) == len(contacts)
    assert http.get(url, params={"limit": 101}, headers=HUBSPOT).status_code == 400


def test_writes_stamp_lastmodifieddate_with_the_clock(fresh, http, clock):
    url = fresh.hubspot_url + CONTACTS
    now = clock.advance(60)
    now_ms = int(now.timestamp() * 1000)
    target = everything(http, fresh)[10]
    r = http.post(f"{url}/batch/update", headers=HUBSPOT, json={
        "inputs": [{"id": target["id"], "properties": {"city": "Lisboa", "loyalty_tier": "gold"}}]})
    assert r.status_code == 200, r.text
    props = r.json()["results"][0]["properties"]
    assert props["city"] == "Lisboa" and props["loyalty_tier"] == "gold"
    found = search(http, fresh, {"filterGroups": window(now_ms, now_ms + 1), "properties": ["city"]}).json()
    assert [x["id"] for x in found["results"]] == [target["id"]]
    for bad in ({"nope": "x"}, {"lifecyclestage": "champion"}, {"hs_object_id": "5"}, {"email": "not-an-email"}):
        r = http.post(f"{url}/batch/update", headers=HUBSPOT,
                      json={"inputs": [{"id": target["id"], "properties": bad}]})
        assert r.status_code == 400, bad
    too_many = {"inputs": [{"id": target["id"], "properties": {"city": "x"}}] * 101}
    assert http.post(f"{url}/batch/update", headers=HUBSPOT, json=too_many).status_code == 400


def test_create_upsert_archive_and_gdpr_delete(fresh, http, clock):
    url = fresh.hubspot_url + CONTACTS
    r = http.post(f"{url}/batch/create", headers=HUBSPOT, json={"inputs": [
        {"properties": {"email": " New.Person@Example.org ", "firstname": "New"}}]})
    assert r.status_code == 201, r.text
    created = r.json()["results"][0]
    assert created["properties"]["email"] == "new.person@example.org"
    conflict = http.post(f"{url}/batch/create", headers=HUBSPOT, json={"inputs": [
        {"properties": {"email": "new.person@example.org"}}]})
    assert conflict.status_code == 409 and conflict.json()["category"] == "CONFLICT"
    r = http.post(f"{url}/batch/upsert", headers=HUBSPOT, json={"inputs": [
        {"id": "new.person@example.org", "idProperty": "email", "properties": {"city": "Oslo"}},
        {"id": "other@example.org", "idProperty": "email", "properties": {"firstname": "Other"}}]})
    assert r.status_code == 200
    results = {x["properties"]["email"]: x for x in r.json()["results"]}
    assert results["new.person@example.org"]["new"] is False
    assert results["new.person@example.org"]["properties"]["city"] == "Oslo"
    assert results["other@example.org"]["new"] is True
    # Archive: gone from search and list, visible with archived=true.
    assert http.delete(f"{url}/{created['id']}", headers=HUBSPOT).status_code == 204
    hits = search(http, fresh, {"filterGroups": [{"filters": [
        {"propertyName": "email", "operator": "EQ", "value": "new.person@example.org"}]}]}).json()
    assert hits["total"] == 0
    assert http.get(f"{url}/{created['id']}", headers=HUBSPOT).status_code == 404
    archived = http.get(f"{url}/{created['id']}", params={"archived": "true"}, headers=HUBSPOT).json()
    assert archived["archived"] is True
    listed = http.get(url, params={"archived": "true", "limit": 100}, headers=HUBSPOT).json()
    assert created["id"] in {x["id"] for x in listed["results"]}
    # GDPR delete: gone everywhere.
    victim = everything(http, fresh)[3]
    r = http.post(f"{url}/gdpr-delete", headers=HUBSPOT, json={"objectId": victim["id"]})
    assert r.status_code == 204
    assert http.get(f"{url}/{victim['id']}", headers=HUBSPOT).status_code == 404
    assert victim["id"] not in {c["id"] for c in everything(http, fresh)}
    r = http.post(f"{url}/gdpr-delete", headers=HUBSPOT,
                  json={"objectId": "other@example.org", "idProperty": "email"})
    assert r.status_code == 204
    assert http.get(f"{url}/other@example.org", params={"idProperty": "email"}, headers=HUBSPOT).status_code == 404


def test_admin_contacts_and_mutate(fresh, http, clock):
    url = fresh.hubspot_url
    now = clock.advance(30)
    now_ms = int(now.timestamp() * 1000)
    r = http.post(f"{url}/_admin/mutate", json={"count": 7})
    assert r.status_code == 200 and len(r.json()["mutated"]) == 7
    window_truth = http.get(f"{url}/_admin/contacts", params={"modified_from": now_ms, "modified_to": now_ms + 1}).json()
    assert {c["id"] for c in window_truth["results"]} == set(r.json()["mutated"])
    assert all("person_id" in c for c in window_truth["results"])
    found = pull(http, fresh, window(now_ms, now_ms + 1))
    assert {x["id"] for x in found} == set(r.json()["mutated"])
    reset = http.post(f"{url}/_admin/reset")
    assert reset.status_code == 200
    assert http.get(f"{url}/_admin/contacts", params={"modified_from": now_ms}).json()["total"] == 0
