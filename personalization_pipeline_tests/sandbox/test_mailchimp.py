"""The Mailchimp sandbox over real HTTP: OAuth, members windows, batch writes, merge
fields, engagement, the connection limit, admin."""

from __future__ import annotations

import base64
import hashlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit

import requests

from .conftest import LIST_ID, MAILCHIMP, WORLD_NOW


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def md5(email: str) -> str:
    return hashlib.md5(email.strip().lower().encode()).hexdigest()


def api(sandbox) -> str:
    return f"{sandbox.mailchimp_url}/3.0"


def members_window(http, sandbox, since, before, count=100, **extra):
    rows, offset = [], 0
    while True:
        r = http.get(f"{api(sandbox)}/lists/{LIST_ID}/members", headers=MAILCHIMP, params={
            "count": count, "offset": offset, "since_last_changed": iso(since),
            "before_last_changed": iso(before), **extra})
        assert r.status_code == 200, r.text
        page = r.json()
        rows.extend(page["members"])
        offset += len(page["members"])
        if len(page["members"]) < count:
            assert offset == page["total_items"]
            return rows


def test_oauth_code_flow_and_metadata(fresh, http):
    url = fresh.mailchimp_url
    r = http.get(f"{url}/oauth2/authorize", allow_redirects=False, params={
        "response_type": "code", "client_id": "sandbox-mailchimp-client",
        "redirect_uri": "http://127.0.0.1:9/callback", "state": "s1"})
    assert r.status_code == 302
    query = parse_qs(urlsplit(r.headers["location"]).query)
    assert query["state"] == ["s1"]
    form = {"grant_type": "authorization_code", "client_id": "sandbox-mailchimp-client",
            "client_secret": "sandbox-mailchimp-secret", "redirect_uri": "http://127.0.0.1:9/callback",
            "code": query["code"][0]}
    token = http.post(f"{url}/oauth2/token", data=form)
    assert token.status_code == 200
    assert token.json()["expires_in"] == 0 and token.json()["scope"] is None
    access = token.json()["access_token"]
    meta = http.get(f"{url}/oauth2/metadata", headers={"Authorization": f"OAuth {access}"}).json()
    assert meta["dc"] == "us1" and meta["api_endpoint"] == url and meta["accountname"] == "Sandbox"
    ping = http.get(f"{meta['api_endpoint']}/3.0/ping", headers={"Authorization": f"Bearer {access}"})
    assert ping.json() == {"health_status": "Everything's Chimpy!"}
    assert http.post(f"{url}/oauth2/token", data=form).status_code == 400  # code already used
    bad = http.post(f"{url}/oauth2/token", data={**form, "client_secret": "wrong"})
    assert bad.status_code == 401 and bad.json()["error"] == "invalid_client"


def test_api_key_bearer_and_basic_auth_and_401(fresh, http):
    key = "0123456789abcdef0123456789abcdef-us1"
    url = f"{api(fresh)}/lists/{LIST_ID}"
    assert http.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    basic = base64.b64encode(f"anystring:{key}".encode()).decode()
    assert http.get(url, headers={"Authorization": f"Basic {basic}"}).status_code == 200
    r = http.get(url, headers={"Authorization": "Bearer wrong-us1"})
    assert r.status_code == 401
    assert r.json()["title"] == "API Key Invalid" and r.json()["status"] == 401
    missing = http.get(f"{api(fresh)}/lists/nope/members", headers=MAILCHIMP)
    assert missing.status_code == 404 and missing.json()["title"] == "Resource Not Found"


def test_members_window_pages_match_the_ground_truth(fresh, http):
    since, before = WORLD_NOW - timedelta(days=12), WORLD_NOW - timedelta(days=4)
    rows = members_window(http, fresh, since, before, sort_field="last_changed", sort_dir="ASC")
    truth = http.get(f"{fresh.mailchimp_url}/_admin/members", params={
        "since_last_changed": iso(since), "before_last_changed": iso(before)}).json()["members"]
    live = {m["id"] for m in truth if m["status"] != "archived"}
    assert [m["id"] for m in rows] == [m["id"] for m in truth if m["id"] in live]
    assert len(rows) > 200
    changed = [m["last_changed"] for m in rows]
    assert changed == sorted(changed)
    assert all(iso(since) <= c < iso(before) for c in changed)
    member = rows[0]
    assert member["id"] == md5(member["email_address"])
    assert set(member) >= {"id", "email_address", "unique_email_id", "status", "merge_fields", "stats",
                           "member_rating", "location", "last_changed", "timestamp_opt", "tags"}
    assert set(member["merge_fields"]) == {"FNAME", "LNAME", "ADDRESS", "PHONE"}
    assert member["last_changed"].endswith("+00:00")


def test_since_is_inclusive_and_before_is_exclusive(fresh, http):
    some = http.get(f"{api(fresh)}/lists/{LIST_ID}/members", headers=MAILCHIMP, params={"count": 1}).json()
    member = some["members"][0]
    t = datetime.fromisoformat(member["last_changed"])
    at = {m["id"] for m in members_window(http, fresh, t, t + timedelta(seconds=1))}
    assert member["id"] in at
    assert member["id"] not in {m["id"] for m in members_window(http, fresh, t - timedelta(hours=1), t)}


def test_members_params_status_sort_fields_and_limits(fresh, http):
    url = f"{api(fresh)}/lists/{LIST_ID}/members"
    unsub = http.get(url, headers=MAILCHIMP, params={"status": "unsubscribed", "count": 1000}).json()
    assert unsub["total_items"] > 0 and {m["status"] for m in unsub["members"]} == {"unsubscribed"}
    by_opt = http.get(url, headers=MAILCHIMP, params={"sort_field": "timestamp_opt", "sort_dir": "DESC",
                                                      "count": 50}).json()["members"]
    stamps = [m["timestamp_opt"] for m in by_opt]
    assert stamps == sorted(stamps, reverse=True)
    trimmed = http.get(url, headers=MAILCHIMP, params={"fields": "members.id,members.email_address,total_items",
                                                       "count": 3}).json()
    assert set(trimmed) == {"members", "total_items"} and set(trimmed["members"][0]) == {"id", "email_address"}
    assert http.get(url, headers=MAILCHIMP, params={"count": 1001}).status_code == 400
    assert http.get(url, headers=MAILCHIMP, params={"sort_field": "email"}).status_code == 400
    default = http.get(url, headers=MAILCHIMP).json()
    assert len(default["members"]) == 10 and default["list_id"] == LIST_ID


def test_merge_fields_create_and_duplicates(fresh, http):
    url = f"{api(fresh)}/lists/{LIST_ID}/merge-fields"
    first = http.get(url, headers=MAILCHIMP).json()
    assert [f["tag"] for f in first["merge_fields"]] == ["FNAME", "LNAME", "ADDRESS", "PHONE"]
    created = http.post(url, headers=MAILCHIMP, json={"name": "City", "tag": "CITY", "type": "text"})
    assert created.status_code == 200 and created.json()["tag"] == "CITY" and created.json()["merge_id"] == 5
    dup = http.post(url, headers=MAILCHIMP, json={"name": "City again", "tag": "CITY", "type": "text"})
    assert dup.status_code == 400 and "already exists" in dup.json()["detail"]
    assert http.post(url, headers=MAILCHIMP, json={"name": "X", "tag": "WAYTOOLONGTAG", "type": "text"}).status_code == 400
    assert http.post(url, headers=MAILCHIMP, json={"name": "X", "tag": "X1", "type": "colour"}).status_code == 400
    for k in range(8):
        http.post(url, headers=MAILCHIMP, json={"name": f"F{k}", "tag": f"F{k}", "type": "number"})
    page = http.get(url, headers=MAILCHIMP).json()
    assert page["total_items"] == 13 and len(page["merge_fields"]) == 10  # default count is 10
    rest = http.get(url, headers=MAILCHIMP, params={"offset": 10}).json()["merge_fields"]
    assert [f["tag"] for f in rest] == ["F5", "F6", "F7"]


def test_batch_updates_known_members_creates_unknown_and_reports_errors(fresh, http, clock):
    url = f"{api(fresh)}/lists/{LIST_ID}"
    http.post(f"{url}/merge-fields", headers=MAILCHIMP, json={"name": "City", "tag": "CITY", "type": "text"})
    http.post(f"{url}/merge-fields", headers=MAILCHIMP, json={"name": "LTV", "tag": "LTV", "type": "number"})
    known = http.get(f"{url}/members", headers=MAILCHIMP, params={"count": 2}).json()["members"]
    now = clock.advance(120)
    body = {"update_existing": True, "members": [
        {"email_address": known[0]["email_address"], "merge_fields": {"CITY": "Porto", "LTV": 120.5}},
        {"email_address": known[1]["email_address"], "merge_fields": {"NEXTCAT": "shoes"}},
        {"email_address": "not-an-address", "merge_fields": {"CITY": "x"}},
        {"email_address": "Fresh.Person@Example.org", "status_if_new": "subscribed", "merge_fields": {"CITY": "Oslo"}},
        {"email_address": known[0]["email_address"].upper(), "merge_fields": {"LTV": "lots"}},
    ]}
    r = http.post(url, headers=MAILCHIMP, json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["total_updated"] == 1 and answer["total_created"] == 1 and answer["error_count"] == 3
    updated = answer["updated_members"][0]
    assert updated["merge_fields"]["CITY"] == "Porto" and updated["merge_fields"]["LTV"] == 120.5
    assert updated["last_changed"] == iso(now)
    assert answer["new_members"][0]["status"] == "subscribed"
    assert answer["new_members"][0]["id"] == md5("fresh.person@example.org")
    errors = {e["email_address"]: e for e in answer["errors"]}
    assert errors[known[1]["email_address"]]["field"] == "NEXTCAT"
    assert errors["not-an-address"]["field"] == "email_address"
    assert "looks fake or invalid" in errors["not-an-address"]["error"]
    assert errors[known[0]["email_address"].upper()]["field"] == "LTV"
    assert all(e["error_code"] for e in answer["errors"])
    # The untouched member did not change; the echo moved the updated one to "now".
    echo = members_window(http, fresh, now, now + timedelta(seconds=1))
    assert {m["id"] for m in echo} == {updated["id"], answer["new_members"][0]["id"]}
    pushes = http.get(f"{fresh.mailchimp_url}/_admin/pushes").json()
    assert pushes["total"] == 1 and len(pushes["pushes"][0]["members"]) == 5
    assert pushes["pushes"][0]["members"][0]["merge_fields"] == {"CITY": "Porto", "LTV": 120.5}
    assert http.delete(f"{fresh.mailchimp_url}/_admin/pushes").status_code == 204
    assert http.get(f"{fresh.mailchimp_url}/_admin/pushes").json()["total"] == 0
    # Without update_existing, a known member is an error; more than 500 is a 400.
    again = http.post(url, headers=MAILCHIMP, json={"members": [{"email_address": known[0]["email_address"]}]})
    assert again.json()["errors"][0]["error_code"] == "ERROR_CONTACT_EXISTS"
    big = {"members": [{"email_address": f"p{k}@example.org"} for k in range(501)], "update_existing": True}
    assert http.post(url, headers=MAILCHIMP, json=big).status_code == 400


def test_single_member_endpoints_and_permanent_delete(fresh, http):
    url = f"{api(fresh)}/lists/{LIST_ID}/members"
    member = http.get(url, headers=MAILCHIMP, params={"count": 1}).json()["members"][0]
    h = member["id"]
    assert http.get(f"{url}/{h}", headers=MAILCHIMP).json()["email_address"] == member["email_address"]
    patched = http.patch(f"{url}/{h}", headers=MAILCHIMP, json={"merge_fields": {"FNAME": "Zed"}})
    assert patched.status_code == 200 and patched.json()["merge_fields"]["FNAME"] == "Zed"
    assert http.patch(f"{url}/{md5('nobody@example.org')}", headers=MAILCHIMP,
                      json={"merge_fields": {"FNAME": "x"}}).status_code == 404
    put = http.put(f"{url}/{md5('put.me@example.org')}", headers=MAILCHIMP,
                   json={"email_address": "put.me@example.org", "status_if_new": "pending"})
    assert put.status_code == 200 and put.json()["status"] == "pending"
    bad_tag = http.put(f"{url}/{h}", headers=MAILCHIMP, json={"email_address": member["email_address"],
                                                              "merge_fields": {"NOPE": "x"}})
    assert bad_tag.status_code == 400 and bad_tag.json()["errors"][0]["field"] == "NOPE"
    activity = http.get(f"{url}/{h}/activity", headers=MAILCHIMP).json()
    assert activity["email_id"] == h and isinstance(activity["activity"], list)
    assert http.post(f"{url}/{h}/actions/delete-permanent", headers=MAILCHIMP).status_code == 204
    gone = http.get(f"{url}/{h}", headers=MAILCHIMP)
    assert gone.status_code == 404 and gone.json()["status"] == 404
    again = http.post(f"{api(fresh)}/lists/{LIST_ID}", headers=MAILCHIMP,
                      json={"members": [{"email_address": member["email_address"]}], "update_existing": True})
    assert again.json()["error_count"] == 1 and "permanently deleted" in again.json()["errors"][0]["error"]
    admin = http.get(f"{fresh.mailchimp_url}/_admin/members").json()
    assert h not in {m["id"] for m in admin["members"]}


def test_campaigns_and_email_activity(fresh, http):
    campaigns = http.get(f"{api(fresh)}/campaigns", headers=MAILCHIMP, params={"count": 100}).json()
    assert campaigns["total_items"] >= 2
    first = campaigns["campaigns"][0]
    assert first["status"] == "sent" and first["recipients"]["list_id"] == LIST_ID
    later = http.get(f"{api(fresh)}/campaigns", headers=MAILCHIMP,
                     params={"since_send_time": campaigns["campaigns"][1]["send_time"]}).json()
    assert later["total_items"] == campaigns["total_items"] - 1
    url = f"{api(fresh)}/reports/{first['id']}/email-activity"
    page = http.get(url, headers=MAILCHIMP, params={"count": 1000}).json()
    assert page["total_items"] > 0 and len(page["emails"]) == min(1000, page["total_items"])
    actions = {a["action"] for e in page["emails"] for a in e["activity"]}
    assert actions <= {"open", "click", "bounce", "unsub"} and "open" in actions
    entry = page["emails"][0]
    assert entry["email_id"] == md5(entry["email_address"]) and entry["list_id"] == LIST_ID
    stamps = sorted(a["timestamp"] for e in page["emails"] for a in e["activity"])
    mid = stamps[len(stamps) // 2]
    recent = http.get(url, headers=MAILCHIMP, params={"since": mid, "count": 1000}).json()
    assert all(a["timestamp"] >= mid for e in recent["emails"] for a in e["activity"])
    assert 0 < recent["total_items"] <= page["total_items"]
    assert http.get(f"{api(fresh)}/reports/nope/email-activity", headers=MAILCHIMP).status_code == 404


def test_the_eleventh_simultaneous_request_gets_429(fresh, http):
    faults = f"{fresh.mailchimp_url}/_admin/faults"
    http.post(faults, json={"kind": "timeout", "count": 15, "delay_seconds": 1.0, "path_prefix": "/3.0/ping"})

    def call(_):
        return requests.get(f"{api(fresh)}/ping", headers=MAILCHIMP, timeout=10)

    with ThreadPoolExecutor(max_workers=15) as pool:
        answers = list(pool.map(call, range(15)))
    codes = sorted(r.status_code for r in answers)
    assert codes.count(200) == 10 and codes.count(429) == 5
    limited = next(r for r in answers if r.status_code == 429).json()
    assert limited["title"] == "Too Many Requests" and limited["status"] == 429
    assert limited["detail"] == "You have exceeded the limit of 10 simultaneous connections."
    state = http.get(f"{fresh.mailchimp_url}/_admin/connections").json()
    assert state["peak"] == 10 and state["in_flight"] == 0
    http.delete(faults)


def test_admin_mutate_and_reset(fresh, http, clock):
    now = clock.advance(45)
    r = http.post(f"{fresh.mailchimp_url}/_admin/mutate", json={"count": 5})
    assert len(r.json()["mutated"]) == 5
    changed = http.get(f"{fresh.mailchimp_url}/_admin/members",
                       params={"since_last_changed": iso(now)}).json()["members"]
    assert {m["id"] for m in changed} == set(r.json()["mutated"])
    assert all(m["last_changed"] == iso(now) for m in changed)
    http.post(f"{fresh.mailchimp_url}/_admin/reset")
    after = http.get(f"{fresh.mailchimp_url}/_admin/members", params={"since_last_changed": iso(now)}).json()
    assert after["total_items"] == 0
