"""Mailchimp Marketing API v3: OAuth token (with `dc` discovery) or API key; members by
change window; merge fields; batch member updates.

The same code talks to Mailchimp and to the sandbox; only URLs and credentials differ.
"""

from __future__ import annotations

import hashlib
import threading
from datetime import datetime, timedelta, timezone
from typing import Iterator, Optional

import dagster as dg
import requests
from pydantic import Field

from personalization_pipeline import settings
from personalization_pipeline.core.breaker import BreakerPolicy
from personalization_pipeline.core.clock import SYSTEM_CLOCK, Clock
from personalization_pipeline.resources.http import CallStats, RequestLoop, RetryPolicy, VendorError
from personalization_pipeline.resources.shared_state import (
    SecretStore,
    SharedCircuitBreaker,
    SharedConnectionSlots,
    SlotWaitTimeout,
)

MEMBERS_PAGE_SIZE = 1000
ACTIVITY_PAGE_SIZE = 1000
CAMPAIGNS_PAGE_SIZE = 1000
STABLE_PASSES = 5
"""How often a same-second member walk or an email-activity report is re-walked when it
changed while being paged, before the pull fails (the next run completes it)."""
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


def parse_mailchimp_time(text: str) -> datetime:
    """Mailchimp's `2026-11-28T10:00:00+00:00` (or with `Z`) as an aware UTC datetime."""
    moment = datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _changed_second(member: dict) -> datetime:
    """A member's `last_changed`, floored to the second (Mailchimp's filter resolution)."""
    try:
        return parse_mailchimp_time(member["last_changed"]).replace(microsecond=0)
    except (KeyError, TypeError, ValueError):
        raise VendorError("Mailchimp members page has a member without a valid `last_changed`") from None


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
        account: str = "default",
        connection_slots: SharedConnectionSlots | None = None,
        breaker: SharedCircuitBreaker | None = None,
    ) -> None:
        """`connection_slots` shares the simultaneous-connection limit with every process
        using the coordination file; without it the limit holds for this process only.
        `breaker` is the account's shared circuit breaker."""
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
        # Mailchimp counts simultaneous connections per user, across every process; the
        # local semaphore keeps this process's threads from polling the shared slots.
        self._slots = threading.BoundedSemaphore(max_connections)
        self._max_connections = max_connections
        self._shared_slots = connection_slots
        self._slot_key = f"mailchimp:{account}:connections"
        self.stats = CallStats()
        self._loop = RequestLoop(
            vendor="Mailchimp",
            session_request=self._request,
            stats=self.stats,
            policy=retry or RetryPolicy(),
            clock=clock,
            breaker=breaker,
        )

    def _request(self, method: str, url: str, **kwargs) -> requests.Response:
        headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {self._token}"}
        with self._slots:
            if self._shared_slots is None:
                return self._http.request(method, url, headers=headers, **kwargs)
            # The lease outlives the request timeout, so only a killed process leaves one.
            lease_seconds = float(kwargs.get("timeout") or self._loop.policy.timeout_seconds) + 30
            try:
                lease, waited = self._shared_slots.acquire(
                    self._slot_key, self._max_connections, lease_seconds, timeout=lease_seconds
                )
            except SlotWaitTimeout:
                raise VendorError(
                    f"Mailchimp: no free connection slot of {self._max_connections} after "
                    f"{lease_seconds:.0f}s; other runs hold them all"
                ) from None
            self.stats.wait_seconds += waited
            try:
                return self._http.request(method, url, headers=headers, **kwargs)
            finally:
                self._shared_slots.release(lease)

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
        """Members whose `last_changed` is in [since, before), in pages of up to 1,000;
        each (member, last_changed) version once.

        Paged by key, not by offset: every request asks for `since_last_changed` = the
        last `last_changed` seen (inclusive) at offset 0, and the overlap at that second is
        dropped by member id. A member edited mid-pull moves to a later `last_changed`
        instead of shifting the offsets of the members after it, so nothing that stayed
        in the window is skipped; the edited member is pulled at its new `last_changed`,
        later in this window or by the partition that holds it. When one second holds a
        full page or more (a bulk update), that second is walked with count/offset over
        [T, T+1 s) until a walk sees one total on every page (nobody left it meanwhile).
        """
        cursor = since
        at_cursor: set[str] = set()  # ids already yielded whose last_changed is `cursor`
        while cursor < before:
            members, _ = self._members_page(list_id, cursor, before, 0)
            fresh = [m for m in members if m.get("id") not in at_cursor]
            if fresh:
                yield fresh
            if len(members) < MEMBERS_PAGE_SIZE:
                return
            first, last = _changed_second(members[0]), _changed_second(members[-1])
            ids_at_last = {m.get("id") for m in members if _changed_second(m) == last}
            at_cursor = at_cursor | ids_at_last if last == cursor else ids_at_last
            if first == last:
                # A page that is all one second cannot move the key forward: walk the second.
                second_end = min(last + timedelta(seconds=1), before)
                yield from self._members_in_second(list_id, last, second_end, at_cursor)
                cursor, at_cursor = last + timedelta(seconds=1), set()
            else:
                cursor = last

    def _members_page(
        self, list_id: str, since: datetime, before: datetime, offset: int
    ) -> tuple[list[dict], int]:
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
        return payload["members"], int(payload.get("total_items", 0) or 0)

    def _members_in_second(
        self, list_id: str, second: datetime, before: datetime, seen: set[str]
    ) -> Iterator[list[dict]]:
        """Every member last changed in [second, before) (at most one second) that is not
        in `seen`, by count/offset; `seen` is updated. A walk during which the total
        changed (a member left the second and shifted the offsets) is walked again."""
        for _ in range(STABLE_PASSES):
            offset, totals, walked = 0, set(), set()
            while True:
                members, total = self._members_page(list_id, second, before, offset)
                totals.add(total)
                walked.update(m.get("id") for m in members)
                fresh = [m for m in members if m.get("id") not in seen]
                seen.update(m.get("id") for m in fresh)
                if fresh:
                    yield fresh
                offset += len(members)
                if len(members) < MEMBERS_PAGE_SIZE or offset >= total:
                    break
            if len(totals) == 1 and len(walked) == total:
                return
        raise VendorError(
            f"Mailchimp members last changed at {mailchimp_time(second)} kept changing while they were "
            f"paged ({STABLE_PASSES} walks); the next run of this window completes it"
        )

    def campaigns_sent_since(
        self, since: datetime, before: datetime | None = None, list_id: str | None = None
    ) -> list[dict]:
        """Sent campaigns with `send_time` at or after `since` (and before `before`), oldest
        first; only those sent to `list_id` when given."""
        campaigns: list[dict] = []
        offset = 0
        while True:
            params: dict[str, object] = {
                "count": CAMPAIGNS_PAGE_SIZE,
                "offset": offset,
                "status": "sent",
                "since_send_time": mailchimp_time(since),
                "sort_field": "send_time",
                "sort_dir": "ASC",
            }
            if before is not None:
                params["before_send_time"] = mailchimp_time(before)
            if list_id:
                params["list_id"] = list_id
            self.stats.pages += 1
            payload = self._loop.json("GET", f"{self.api_base}/campaigns", params=params)
            if not isinstance(payload, dict) or not isinstance(payload.get("campaigns"), list):
                raise VendorError("Mailchimp campaigns page has no `campaigns` list")
            page = payload["campaigns"]
            campaigns.extend(page)
            offset += len(page)
            if len(page) < CAMPAIGNS_PAGE_SIZE or offset >= int(payload.get("total_items", 0) or 0):
                break
        unique = {c["id"]: c for c in campaigns if c.get("id")}
        return sorted(unique.values(), key=lambda c: str(c.get("send_time") or ""))

    def email_activity(self, campaign_id: str, since: datetime) -> Iterator[list[dict]]:
        """The campaign's email-activity report from `since` (inclusive), in pages of up to
        1,000 recipients, each `{campaign_id, email_id, email_address, activity: [...]}`.

        Each activity (recipient, action, timestamp) is yielded once. The report lists
        recipients with activity in range, so a recipient's first activity during the walk
        can shift the offsets: a walk whose total changed is walked again, yielding only
        activity not yielded before.
        """
        seen: set[tuple[str, str, str]] = set()
        for _ in range(STABLE_PASSES):
            offset, totals = 0, set()
            while True:
                params = {"count": ACTIVITY_PAGE_SIZE, "offset": offset, "since": mailchimp_time(since)}
                self.stats.pages += 1
                payload = self._loop.json("GET", f"{self.api_base}/reports/{campaign_id}/email-activity", params=params)
                if not isinstance(payload, dict) or not isinstance(payload.get("emails"), list):
                    raise VendorError("Mailchimp email-activity page has no `emails` list")
                total = int(payload.get("total_items", 0) or 0)
                totals.add(total)
                page = []
                for entry in payload["emails"]:
                    who = str(entry.get("email_id") or entry.get("email_address") or "")
                    fresh = []
                    for act in entry.get("activity") or []:
                        key = (who, str(act.get("action")), str(act.get("timestamp")))
                        if key not in seen:
                            seen.add(key)
                            fresh.append(act)
                    if fresh:
                        page.append({**entry, "campaign_id": entry.get("campaign_id") or campaign_id, "activity": fresh})
                if page:
                    yield page
                offset += len(payload["emails"])
                if len(payload["emails"]) < ACTIVITY_PAGE_SIZE or offset >= total:
                    break
            if len(totals) == 1:
                return
        raise VendorError(
            f"Mailchimp email activity of campaign {campaign_id} kept changing while it was paged "
            f"({STABLE_PASSES} walks); the next run of this window completes it"
        )

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
    max_connections: int = Field(
        default=10, description="Simultaneous connections, shared by every run and process using the account."
    )
    max_attempts: int = 6
    timeout_seconds: float = 120
    account: str = "default"
    breaker_failure_threshold: int = Field(
        default=5, description="Consecutive failed requests (after retries) that open the circuit breaker."
    )
    breaker_cooldown_seconds: float = Field(
        default=60, description="How long the open breaker refuses calls before one probe request."
    )
    campaign_lookback_days: float = Field(
        default=30,
        description="Engagement is read from campaigns sent up to this many days before a window starts.",
    )
    state_dir: Optional[str] = Field(default=None, description="Defaults to $PP_DATA_DIR/state.")

    def get_client(self) -> MailchimpClient:
        coordination = settings.state_dir(self.state_dir) / "coordination.sqlite"
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
            account=self.account,
            connection_slots=SharedConnectionSlots(coordination),
            breaker=SharedCircuitBreaker(
                coordination,
                f"mailchimp:{self.account}",
                BreakerPolicy(
                self.breaker_failure_threshold,
                self.breaker_cooldown_seconds,
                # A probe is one attempt; another caller may probe if it has not answered by then.
                probe_lease_seconds=self.timeout_seconds + 10,
            ),
            ),
        )
