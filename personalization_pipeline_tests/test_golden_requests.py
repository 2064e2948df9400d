"""The clients' request shapes, pinned by fixtures written from VENDOR-APIS.md (not from
the sandbox, which the same team writes). Requests are captured at the transport adapter,
so this is exactly what would go on the wire to the real vendor."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
from requests.adapters import HTTPAdapter

from personalization_pipeline.resources.hubspot import HubSpotClient
from personalization_pipeline.resources.mailchimp import MailchimpClient
from personalization_pipeline.resources.shared_state import SecretStore, SharedRateLimiter

GOLDEN = Path(__file__).parent / "fixtures" / "golden"


class Recorder:
    def __init__(self, responses):
        self.sent: list[requests.PreparedRequest] = []
        self.responses = responses

    def send(self, adapter, request, **kwargs):
        self.sent.append(request)
        status, body = self.responses(request)
        response = requests.Response()
        response.status_code = status
        response._content = json.dumps(body).encode()
        response.headers["Content-Type"] = "application/json"
        response.url = request.url
        response.request = request
        return response


def assert_matches(request: requests.PreparedRequest, fixture: str) -> None:
    golden = json.loads((GOLDEN / fixture).read_text())
    url = urlsplit(request.url)
    assert request.method == golden["method"]
    assert url.path == golden["path"]
    assert dict(parse_qsl(url.query)) == golden["query"]
    for name, value in golden["headers"].items():
        assert request.headers.get(name, "").split(";")[0] == value, name
    if "json" in golden:
        assert json.loads(request.body) == golden["json"]
    if "form" in golden:
        body = request.body.decode() if isinstance(request.body, bytes) else request.body
        assert dict(parse_qsl(body)) == golden["form"]


@pytest.fixture
def recorder(monkeypatch):
    holder = {}

    def install(responses):
        rec = Recorder(responses)
        monkeypatch.setattr(HTTPAdapter, "send", lambda self, request, **kw: rec.send(self, request, **kw))
        holder["rec"] = rec
        return rec

    return install


def test_hubspot_refresh_and_search_shapes(recorder, tmp_path):
    def responses(request):
        if request.url.endswith("/oauth/v1/token"):
            return 200, {"access_token": "golden-access", "refresh_token": "golden-refresh", "expires_in": 1800, "token_type": "bearer"}
        return 200, {"total": 0, "results": []}

    rec = recorder(responses)
    client = HubSpotClient(
        base_url="https://api.hubapi.com",
        token_url="https://api.hubapi.com/oauth/v1/token",
        client_id="golden-client",
        client_secret="golden-secret",
        refresh_token="golden-refresh",
        private_app_token=None,
        secret_store=SecretStore(tmp_path / "secrets.json"),
        limiter=SharedRateLimiter(tmp_path / "coord.sqlite"),
    )
    start = datetime(2026, 7, 1, tzinfo=timezone.utc)
    end = datetime(2026, 7, 1, 1, tzinfo=timezone.utc)
    assert list(client.contacts_modified(start, end)) == []
    assert len(rec.sent) == 2
    assert_matches(rec.sent[0], "hubspot_refresh_token.json")
    assert_matches(rec.sent[1], "hubspot_search_window.json")


def test_mailchimp_shapes(recorder):
    def responses(request):
        path = urlsplit(request.url).path
        if path == "/oauth2/metadata":
            return 200, {"dc": "us9", "api_endpoint": "https://us9.api.mailchimp.com"}
        if path.endswith("/members"):
            return 200, {"members": [], "total_items": 0}
        if path.endswith("/merge-fields"):
            return 200, {"merge_id": 9, "tag": "NEXTCAT"}
        return 200, {"new_members": [], "updated_members": [], "errors": [], "error_count": 0}

    rec = recorder(responses)
    client = MailchimpClient(
        access_token="golden-mc-token",
        api_key=None,
        metadata_url="https://login.mailchimp.com/oauth2/metadata",
        api_base=None,
    )
    start = datetime(2026, 7, 1, tzinfo=timezone.utc)
    end = datetime(2026, 7, 1, 1, tzinfo=timezone.utc)
    assert list(client.members_changed("goldenlist", start, end)) == []
    client.create_merge_field("goldenlist", "NEXTCAT", "Next best category", "text")
    client.batch_update_members(
        "goldenlist", [{"email_address": "Ann@Example.com", "merge_fields": {"CITY": "London", "LTV": 12.5}}]
    )
    assert_matches(rec.sent[0], "mailchimp_metadata.json")
    assert urlsplit(rec.sent[1].url).hostname == "us9.api.mailchimp.com"
    assert_matches(rec.sent[1], "mailchimp_members_window.json")
    assert_matches(rec.sent[2], "mailchimp_create_merge_field.json")
    assert_matches(rec.sent[3], "mailchimp_batch_update.json")


def test_mailchimp_engagement_shapes(recorder):
    def responses(request):
        path = urlsplit(request.url).path
        if path == "/oauth2/metadata":
            return 200, {"dc": "us9", "api_endpoint": "https://us9.api.mailchimp.com"}
        if path == "/3.0/campaigns":
            return 200, {"campaigns": [{"id": "goldencamp", "send_time": "2026-06-20T09:00:00+00:00"}], "total_items": 1}
        return 200, {"emails": [], "campaign_id": "goldencamp", "total_items": 0}

    rec = recorder(responses)
    client = MailchimpClient(
        access_token="golden-mc-token",
        api_key=None,
        metadata_url="https://login.mailchimp.com/oauth2/metadata",
        api_base=None,
    )
    start = datetime(2026, 7, 1, tzinfo=timezone.utc)
    end = datetime(2026, 7, 1, 1, tzinfo=timezone.utc)
    campaigns = client.campaigns_sent_since(datetime(2026, 6, 1, tzinfo=timezone.utc), before=end, list_id="goldenlist")
    assert [c["id"] for c in campaigns] == ["goldencamp"]
    assert list(client.email_activity("goldencamp", start)) == []
    assert len(rec.sent) == 3
    assert_matches(rec.sent[1], "mailchimp_campaigns_sent.json")
    assert_matches(rec.sent[2], "mailchimp_email_activity.json")


def test_hubspot_archived_list_shape(recorder, tmp_path):
    rec = recorder(lambda request: (200, {"results": []}))
    client = HubSpotClient(
        base_url="https://api.hubapi.com",
        token_url="unused",
        client_id=None,
        client_secret=None,
        refresh_token=None,
        private_app_token="golden-private-app",
        secret_store=SecretStore(tmp_path / "secrets.json"),
        limiter=SharedRateLimiter(tmp_path / "coord.sqlite"),
    )
    assert list(client.archived_contacts()) == []
    assert_matches(rec.sent[0], "hubspot_list_archived.json")
