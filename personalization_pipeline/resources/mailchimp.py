"""Mailchimp Marketing API v3: OAuth token (with `dc` discovery) or API key; members by
change window; merge fields; batch member updates.

The same code talks to Mailchimp and to the sandbox; only URLs and credentials differ.
"""

from __future__ import annotations

import hashlib
import threading
from datetime import datetime, timezone
from typing import Iterator, Optional

import dagster as dg
import requests
from pydantic import Field

from personalization_pipeline import settings
from personalization_pipeline.core.clock import SYSTEM_CLOCK, Clock
from personalization_pipeline.resources.http import CallStats, RequestLoop, RetryPolicy, VendorError
from personalization_pipeline.resources.shared_state import SecretStore

MEMBERS_PAGE_SIZE = 1000
BATCH_LIMIT = 500
"""Mailchimp accepts at most 500 members per batch subscribe/update call."""


def subscriber_hash(email: str) -> str:
    """Mailchimp's member id: md5 of the lower-cased address."""
    return hashlib.md5(email.strip().lower().encode("utf-8")).hexdigest()


def mailchimp_token_key(account: str) -> str:
    """Where `pp-auth mailchimp` keeps the OAuth token in the secret store."""
    return f"mailchimp:{account}:token"


def mailchimp_time(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("naive datetime; use UTC-aware datetimes")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+00:00")


class MailchimpClient:
    def __init__(
        self,
        *,
        access_token: str | None,
        api_key: str | None,
        metadata_url: str,
        api_base: str | None,
        max_connections: int = 10,
        retry: RetryPolicy | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._token = access_token or api_key
        if not self._token:
            raise VendorError(
                "Mailchimp is not configured: set MAILCHIMP_ACCESS_TOKEN (OAuth, see `pp-auth mailchimp`) "
                "or MAILCHIMP_API_KEY"
            )
        self._is_oauth = bool(access_token)
        self._metadata_url = metadata_url
        self._api_base = api_base.rstrip("/") if api_base else None
        self._http = requests.Session()
        # Mailchimp counts simultaneous connections per user; never open more than allowed.
        self._slots = threading.BoundedSemaphore(max_connections)
        self.stats = CallStats()
        self._loop = RequestLoop(
            vendor="Mailchimp",
            session_request=self._request,
            stats=self.stats,
            policy=retry or RetryPolicy(),
            clock=clock,
        )

    def _request(self, method: str, url: str, **kwargs) -> requests.Response:
        headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {self._token}"}
        with self._slots:
            return self._http.request(method, url, headers=headers, **kwargs)

    @property
    def api_base(self) -> str:
        """`{api_endpoint}/3.0`, discovered once through the OAuth metadata endpoint."""
        if self._api_base is None:
            if self._is_oauth:
                response = self._http.get(
                    self._metadata_url, headers={"Authorization": f"OAuth {self._token}"}, timeout=30
                )
                self.stats.api_calls += 1
                if response.status_code != 200:
                    raise VendorError(
                        f"Mailchimp metadata endpoint answered {response.status_code}: "
                        "the access token is invalid or revoked",
                        status=response.status_code,
                    )
                meta = response.json()
                endpoint = meta.get("api_endpoint") or f"https://{meta['dc']}.api.mailchimp.com"
            else:
                dc = self._token.rsplit("-", 1)[-1]
                endpoint = f"https://{dc}.api.mailchimp.com"
            self._api_base = endpoint.rstrip("/") + "/3.0"
        return self._api_base

    def members_changed(
        self, list_id: str, since: datetime, before: datetime
    ) -> Iterator[list[dict]]:
        """Members whose `last_changed` is in [since, before), in pages of up to 1,000,
        ordered by last_changed (a stable order, so offsets walk the window once)."""
        offset = 0
        while True:
            params = {
                "count": MEMBERS_PAGE_SIZE,
                "offset": offset,
                "since_last_changed": mailchimp_time(since),
                "before_last_changed": mailchimp_time(before),
                "sort_field": "last_changed",
                "sort_dir": "ASC",
            }
            self.stats.pages += 1
            payload = self._loop.json("GET", f"{self.api_base}/lists/{list_id}/members", params=params)
            if not isinstance(payload, dict) or not isinstance(payload.get("members"), list):
                raise VendorError("Mailchimp members page has no `members` list")
            members = payload["members"]
            if members:
                yield members
            offset += len(members)
            if len(members) < MEMBERS_PAGE_SIZE or offset >= int(payload.get("total_items", 0)):
                return

    def merge_fields(self, list_id: str) -> list[dict]:
        payload = self._loop.json(
            "GET", f"{self.api_base}/lists/{list_id}/merge-fields", params={"count": 1000}
        )
        return list(payload.get("merge_fields", []))

    def create_merge_field(self, list_id: str, tag: str, name: str, field_type: str) -> dict:
        return self._loop.json(
            "POST",
            f"{self.api_base}/lists/{list_id}/merge-fields",
            json={"tag": tag, "name": name, "type": field_type},
        )

    def batch_update_members(self, list_id: str, members: list[dict]) -> dict:
        """Batch subscribe/update; `update_existing` so known members are updated.

        Mailchimp would create unknown addresses, so callers send only known members.
        """
        if len(members) > BATCH_LIMIT:
            raise ValueError(f"at most {BATCH_LIMIT} members per batch call, got {len(members)}")
        return self._loop.json(
            "POST",
            f"{self.api_base}/lists/{list_id}",
            json={"members": members, "update_existing": True},
        )


class MailchimpResource(dg.ConfigurableResource):
    """Mailchimp account and audience (list). OAuth access token (tokens do not expire;
    the data centre comes from the metadata endpoint) or an API key."""

    access_token: Optional[str] = None
    api_key: Optional[str] = None
    list_id: str = Field(description="The audience whose members are pulled and updated.")
    metadata_url: str = "https://login.mailchimp.com/oauth2/metadata"
    api_base: Optional[str] = Field(
        default=None, description="Override the discovered base, e.g. https://us1.api.mailchimp.com/3.0."
    )
    max_connections: int = 10
    max_attempts: int = 6
    timeout_seconds: float = 120
    account: str = "default"
    state_dir: Optional[str] = Field(default=None, description="Defaults to $PP_DATA_DIR/state.")

    def get_client(self) -> MailchimpClient:
        access_token = self.access_token
        if not access_token and not self.api_key:
            # Stored by `pp-auth mailchimp`.
            stored = SecretStore(settings.state_dir(self.state_dir) / "secrets.json").get(
                mailchimp_token_key(self.account)
            )
            if isinstance(stored, dict):
                access_token = stored.get("access_token")
        return MailchimpClient(
            access_token=access_token,
            api_key=self.api_key,
            metadata_url=self.metadata_url,
            api_base=self.api_base,
            max_connections=self.max_connections,
            retry=RetryPolicy(max_attempts=self.max_attempts, timeout_seconds=self.timeout_seconds),
        )
