"""HubSpot CRM: OAuth 2.0 (refresh-token grant) or a private-app token, and the
incremental contacts pull through the search endpoint.

The same code talks to HubSpot and to the sandbox; only `base_url`, `token_url` and the
credentials differ.
"""

from __future__ import annotations

import os
import threading
from datetime import datetime, timezone
from typing import Iterator, Optional
from urllib.parse import urlsplit

import dagster as dg
import requests
from oauthlib.oauth2 import OAuth2Error, TokenExpiredError
from pydantic import Field, PrivateAttr
from requests_oauthlib import OAuth2Session

from personalization_pipeline import settings
from personalization_pipeline.core.breaker import BreakerPolicy
from personalization_pipeline.core.clock import SYSTEM_CLOCK, Clock
from personalization_pipeline.core.ratelimit import RateLimit, backoff_delay, is_backfill_run
from personalization_pipeline.core.sources import merged_object_ids
from personalization_pipeline.resources.http import (
    RETRYABLE_STATUS,
    CallStats,
    RequestLoop,
    RetryPolicy,
    VendorAuthError,
    VendorError,
    VendorUnavailableError,
)
from personalization_pipeline.resources.shared_state import SecretStore, SharedCircuitBreaker, SharedRateLimiter

DEFAULT_PROPERTIES = (
    "email",
    "firstname",
    "lastname",
    "city",
    "country",
    "lifecyclestage",
    "loyalty_tier",
    "lastmodifieddate",
    "hs_object_id",
    "hs_merged_object_ids",
)
"""`hs_merged_object_ids` names the contacts merged into this one (semicolon-separated):
they left search for good, and become deletion versions (core.sources.crm_merged_away_to_canonical)."""
BATCH_SIZE = 100
"""HubSpot's batch endpoints take at most 100 inputs per call."""
PAGE_SIZE = 200
"""HubSpot's maximum page size for search."""
PACING_SAFETY = 0.98


def allow_loopback_http(url: str) -> None:
    """oauthlib insists on HTTPS; the sandbox on loopback is plain HTTP, so allow that only."""
    host = urlsplit(url).hostname or ""
    if urlsplit(url).scheme == "http" and host in {"127.0.0.1", "localhost", "::1"}:
        os.environ["OAUTHLIB_INSECURE_TRANSPORT"] = "1"


def hubspot_token_key(account: str, client_id: str | None) -> str:
    """Where an app's tokens live in the secret store (shared by every process)."""
    return f"hubspot:{account}:{client_id}:token"


def to_epoch_ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("naive datetime; use UTC-aware datetimes")
    return int(round(moment.timestamp() * 1000))


def parse_hubspot_time(value: str | None) -> int | None:
    """HubSpot dates arrive as ISO 8601 strings (or epoch ms strings) -> epoch ms."""
    if value in (None, ""):
        return None
    text = str(value)
    if text.isdigit():
        return int(text)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return to_epoch_ms(moment)


class _TransientTokenError(Exception):
    pass


class HubSpotClient:
    """One account's client. Tokens and rate-limit buckets are shared across processes
    through the secret store and the coordination file."""

    def __init__(
        self,
        *,
        base_url: str,
        token_url: str,
        client_id: str | None,
        client_secret: str | None,
        refresh_token: str | None,
        private_app_token: str | None,
        secret_store: SecretStore,
        limiter: SharedRateLimiter,
        requests_per_10s: float = 100,
        search_per_second: float = 4,
        refresh_margin_seconds: float = 60,
        retry: RetryPolicy | None = None,
        clock: Clock = SYSTEM_CLOCK,
        account: str = "default",
        breaker: SharedCircuitBreaker | None = None,
        backfill: bool = False,
        live_reserve: float = 0.0,
    ) -> None:
        """`breaker` (the account's shared circuit breaker) makes calls fail fast while
        HubSpot is down. `backfill` (a run a backfill launched) makes every request wait
        in the account's backfill bucket first, which leaves `live_reserve` of each rate
        limit to live runs. `clock` times token lifetimes, rate limits and backoff. These are measured
        against the vendor's real clock (and shared with other processes), so production
        code passes the system clock; tests may pass a manual one to avoid sleeping."""
        self.base_url = base_url.rstrip("/")
        self.token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._bootstrap_refresh_token = refresh_token
        self._private_app_token = private_app_token
        if not private_app_token and not (client_id and client_secret):
            raise VendorError(
                "HubSpot is not configured: set HUBSPOT_PRIVATE_APP_TOKEN, or HUBSPOT_CLIENT_ID, "
                "HUBSPOT_CLIENT_SECRET and HUBSPOT_REFRESH_TOKEN (or run `pp-auth hubspot`)"
            )
        self._store = secret_store
        self._limiter = limiter
        self._backfill = backfill
        self._live_reserve = live_reserve
        # Pace a little under the published limits: the vendor counts arrivals in a rolling
        # window, and a request delayed on our side bunches up with the next one.
        self._limits = {
            "default": RateLimit(requests_per_10s * PACING_SAFETY, 10.0, burst=1),
            "search": RateLimit(search_per_second * PACING_SAFETY, 1.0, burst=1),
        }
        self._margin = refresh_margin_seconds
        self._clock = clock
        self._account = account
        self._token_key = hubspot_token_key(account, client_id)
        self._lock = threading.Lock()
        allow_loopback_http(self.token_url)
        allow_loopback_http(self.base_url)
        self._session = OAuth2Session(client_id=client_id) if not private_app_token else None
        self._plain = requests.Session()
        self.stats = CallStats()
        self._loop = RequestLoop(
            vendor="HubSpot",
            session_request=self._request,
            stats=self.stats,
            policy=retry or RetryPolicy(),
            clock=clock,
            before_attempt=self._before_attempt,
            on_429=self._on_429,
            on_401=self._on_401,
            breaker=breaker,
        )

    # -- auth -------------------------------------------------------------------------

    def _before_attempt(self, limit_key: str) -> float:
        def acquire(name: str) -> float:
            return self._limiter.acquire_shared(
                f"hubspot:{self._account}:{name}", self._limits[name], self._backfill, self._live_reserve
            )

        waited = acquire("default")
        if limit_key == "search":
            waited += acquire("search")
        return waited

    def _on_429(self, retry_after: float) -> None:
        self._limiter.push_back(f"hubspot:{self._account}:default", retry_after)

    def _on_401(self) -> bool:
        if self._private_app_token:
            return False
        self._refresh(force=True)
        return True

    def _token(self) -> dict:
        stored = self._store.get(self._token_key)
        now = self._clock.now().timestamp()
        if isinstance(stored, dict) and stored.get("expires_at", 0) > now:
            return stored
        return self._refresh(force=False)

    def _refresh(self, force: bool) -> dict:
        """Refresh under the secret store's lock: one refresh per expiry across processes."""
        started = self._clock.now().timestamp()

        def renew(current: object | None) -> dict:
            now = self._clock.now().timestamp()
            if isinstance(current, dict) and current.get("expires_at", 0) > now:
                # Another process refreshed while we waited for the lock.
                if not force or current.get("obtained_at", 0) > started:
                    return current
            refresh_token = (current or {}).get("refresh_token") if isinstance(current, dict) else None
            refresh_token = refresh_token or self._bootstrap_refresh_token
            if not refresh_token:
                raise VendorAuthError(
                    "HubSpot has no refresh token: set HUBSPOT_REFRESH_TOKEN or run `pp-auth hubspot`"
                )
            token = self._refresh_call(refresh_token)
            expires_in = float(token.get("expires_in") or 1800)
            margin = min(self._margin, expires_in / 4)
            return {
                "access_token": token["access_token"],
                "refresh_token": token.get("refresh_token") or refresh_token,
                "token_type": "Bearer",
                "expires_in": expires_in,
                # Refresh early: the server's clock and ours never agree to the millisecond.
                "expires_at": now + expires_in - margin,
                "obtained_at": now,
            }

        with self._lock:
            token = self._store.update(self._token_key, renew)
        if token.get("obtained_at", 0) >= started:  # type: ignore[union-attr]
            self.stats.token_refreshes += 1
        return token  # type: ignore[return-value]

    def _refresh_call(self, refresh_token: str) -> dict:
        """The refresh-token grant through requests-oauthlib; 429, 5xx and network errors at
        the token endpoint are retried with backoff like any other call."""

        def transient(response: requests.Response) -> requests.Response:
            if response.status_code in RETRYABLE_STATUS:
                raise _TransientTokenError(f"HTTP {response.status_code}")
            return response

        policy = self._loop.policy
        for attempt in range(1, policy.max_attempts + 1):
            session = OAuth2Session(client_id=self._client_id)
            session.register_compliance_hook("refresh_token_response", transient)
            try:
                self.stats.api_calls += 1
                return session.refresh_token(
                    self.token_url,
                    refresh_token=refresh_token,
                    client_id=self._client_id,
                    client_secret=self._client_secret,
                    timeout=policy.timeout_seconds,
                )
            except OAuth2Error as exc:
                raise VendorAuthError(
                    f"HubSpot refused the refresh token ({exc.error}); re-authorise with `pp-auth hubspot`"
                ) from None
            except (_TransientTokenError, requests.RequestException) as exc:
                reason = str(exc) if isinstance(exc, _TransientTokenError) else type(exc).__name__
                if attempt == policy.max_attempts:
                    raise VendorUnavailableError(
                        f"HubSpot token endpoint failed ({reason}) after {attempt} attempts"
                    ) from None
                self.stats.retries += 1
                self._clock.sleep(backoff_delay(attempt, policy.base_delay, policy.max_delay))
        raise AssertionError("unreachable")

    def _request(self, method: str, url: str, **kwargs) -> requests.Response:
        if self._private_app_token:
            headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {self._private_app_token}"}
            return self._plain.request(method, url, headers=headers, **kwargs)
        assert self._session is not None
        for attempt in range(2):
            token = self._token() if attempt == 0 else self._refresh(force=True)
            # requests-oauthlib checks expires_at against the wall clock before sending.
            self._session.token = {
                "access_token": token["access_token"],
                "token_type": "Bearer",
                "expires_at": token["expires_at"],
            }
            try:
                return self._session.request(method, url, **kwargs)
            except TokenExpiredError:
                continue
        raise VendorAuthError("HubSpot issued an access token that had already expired; check the clock")

    # -- API --------------------------------------------------------------------------

    def search(self, body: dict) -> dict:
        self.stats.pages += 1
        return self._loop.json(
            "POST",
            f"{self.base_url}/crm/v3/objects/contacts/search",
            json=body,
            limit_key="search",
        )

    def get_contact(self, contact_id: str, properties: tuple[str, ...] = DEFAULT_PROPERTIES) -> dict:
        return self._loop.json(
            "GET",
            f"{self.base_url}/crm/v3/objects/contacts/{contact_id}",
            params={"properties": ",".join(properties)},
        )

    def contacts_modified(
        self,
        start: datetime,
        end: datetime,
        properties: tuple[str, ...] = DEFAULT_PROPERTIES,
    ) -> Iterator[list[dict]]:
        """Every contact whose lastmodifieddate is in [start, end), once, in pages.

        Paged by keyset on (lastmodifieddate, hs_object_id) rather than by `after`
        offsets: a contact modified while we page moves out of the window, and with offsets
        that would shift the rest and skip one. Keyset queries never pass the 10,000-result
        cap either.
        """
        props = list(dict.fromkeys([*properties, "lastmodifieddate", "hs_object_id"]))
        start_ms, end_ms = to_epoch_ms(start), to_epoch_ms(end)
        if end_ms <= start_ms:
            return
        lower, lower_op = start_ms, "GTE"
        while True:
            body = {
                "filterGroups": [
                    {
                        "filters": [
                            {"propertyName": "lastmodifieddate", "operator": lower_op, "value": str(lower)},
                            {"propertyName": "lastmodifieddate", "operator": "LT", "value": str(end_ms)},
                        ]
                    }
                ],
                "sorts": [{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}],
                "properties": props,
                "limit": PAGE_SIZE,
            }
            results = self._check_page(self.search(body))
            if len(results) < PAGE_SIZE:
                if results:
                    yield results
                return
            last_ms = parse_hubspot_time(results[-1]["properties"].get("lastmodifieddate"))
            first_ms = parse_hubspot_time(results[0]["properties"].get("lastmodifieddate"))
            if first_ms == last_ms:
                # A whole page shares one timestamp (a bulk update): drain that instant by id.
                yield from self._drain_instant(last_ms, props)
                lower, lower_op = last_ms, "GT"
                continue
            page = [
                r
                for r in results
                if parse_hubspot_time(r["properties"].get("lastmodifieddate")) < last_ms
            ]
            yield page
            # Records at `last_ms` come again in the next query (GTE); nothing before it does.
            lower, lower_op = last_ms, "GTE"

    def archived_contacts(self) -> Iterator[list[dict]]:
        """Every archived contact (`archivedAt` says when), through the list endpoint with
        `archived=true` (search never returns archived records), 100 per page."""
        after: str | None = None
        while True:
            params = {"archived": "true", "limit": 100, "properties": "email,lastmodifieddate,hs_object_id"}
            if after:
                params["after"] = after
            self.stats.pages += 1
            payload = self._loop.json("GET", f"{self.base_url}/crm/v3/objects/contacts", params=params)
            results = self._check_page(payload)
            if results:
                yield results
            after = ((payload.get("paging") or {}).get("next") or {}).get("after")
            if not after:
                return

    def contacts_gone(self, contact_ids: list[str], max_calls: int | None = None) -> tuple[set[str], list[dict]]:
        """Which of `contact_ids` HubSpot no longer has as live contacts, by batch read
        (`POST .../batch/read`, 100 ids a call, so ceil(len / 100) calls, at most `max_calls`
        when given: the caller slices the ids to fit).

        Returns (gone, merged_into): `gone` are ids HubSpot answers neither by themselves
        nor as a merge of another record (archived or gdpr-deleted: gdpr-deleted contacts are
        in no list at all); `merged_into` are the surviving records that answered for ids
        merged away (HubSpot answers a merged-away id with the record it went into).
        """
        ids = list(dict.fromkeys(str(i) for i in contact_ids))
        calls = -(-len(ids) // BATCH_SIZE)
        if max_calls is not None and calls > max_calls:
            raise ValueError(f"{len(ids)} ids need {calls} batch reads, more than max_calls={max_calls}")
        gone: set[str] = set()
        merged_into: dict[str, dict] = {}
        for at in range(0, len(ids), BATCH_SIZE):
            chunk = ids[at : at + BATCH_SIZE]
            payload = self._loop.json(
                "POST",
                f"{self.base_url}/crm/v3/objects/contacts/batch/read",
                # 207 (some ids not found) is an answer, not an error.
                json={
                    "inputs": [{"id": i} for i in chunk],
                    "properties": ["hs_object_id", "lastmodifieddate", "hs_merged_object_ids"],
                },
            )
            results = self._check_page(payload)
            answered: set[str] = set()
            wanted = set(chunk)
            for record in results:
                answered.add(str(record["id"]))
                covered = set(merged_object_ids(record)) & wanted
                if covered:
                    merged_into[str(record["id"])] = record
                answered |= covered
            gone |= set(chunk) - answered
        return gone, list(merged_into.values())

    def _drain_instant(self, instant_ms: int, props: list[str]) -> Iterator[list[dict]]:
        after_id = 0
        while True:
            filters = [
                {"propertyName": "lastmodifieddate", "operator": "EQ", "value": str(instant_ms)},
                {"propertyName": "hs_object_id", "operator": "GT", "value": str(after_id)},
            ]
            body = {
                "filterGroups": [{"filters": filters}],
                "sorts": [{"propertyName": "hs_object_id", "direction": "ASCENDING"}],
                "properties": props,
                "limit": PAGE_SIZE,
            }
            results = self._check_page(self.search(body))
            if results:
                yield results
            if len(results) < PAGE_SIZE:
                return
            after_id = int(results[-1]["id"])

    @staticmethod
    def _check_page(payload: object) -> list[dict]:
        if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
            raise VendorError("HubSpot search returned a page without a `results` list")
        for record in payload["results"]:
            if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("properties"), dict):
                raise VendorError("HubSpot search returned a record without `id` or `properties`")
        return payload["results"]


class HubSpotResource(dg.ConfigurableResource):
    """HubSpot CRM account: OAuth 2.0 app (client id/secret + refresh token) or a
    private-app token. Point `base_url` / `token_url` at the sandbox for local runs."""

    base_url: str = Field(default="https://api.hubapi.com", description="API base URL.")
    token_url: Optional[str] = Field(default=None, description="Defaults to {base_url}/oauth/v1/token.")
    client_id: Optional[str] = None
    client_secret: Optional[str] = None
    refresh_token: Optional[str] = Field(
        default=None, description="Bootstrap refresh token; rotated tokens live in the secret store."
    )
    private_app_token: Optional[str] = None
    properties: list[str] = Field(default_factory=lambda: list(DEFAULT_PROPERTIES))
    reconcile_calls_per_run: int = Field(
        default=10,
        description="Batch reads (100 contacts each) that `crm_deletions` spends per run checking that the "
        "contacts the lake believes live still exist in HubSpot (gdpr-deleted contacts vanish from every "
        "list). A full sweep of N live contacts takes ceil(N / (100 x this)) runs.",
    )
    requests_per_10s: float = 100
    search_per_second: float = 4
    max_attempts: int = 6
    timeout_seconds: float = 30
    account: str = "default"
    breaker_failure_threshold: int = Field(
        default=5, description="Consecutive failed requests (after retries) that open the circuit breaker."
    )
    breaker_cooldown_seconds: float = Field(
        default=60, description="How long the open breaker refuses calls before one probe request."
    )
    live_reserve: float = Field(
        default=0.25,
        description="Share of each HubSpot rate limit that runs launched by a backfill (tag dagster/backfill) "
        "leave to live runs: all backfill runs of the account together pace at most at (1 - this) of the rate, "
        "so a live pull never queues behind a backfill's backlog.",
    )
    state_dir: Optional[str] = Field(default=None, description="Defaults to $PP_DATA_DIR/state.")
    _backfill: bool = PrivateAttr(default=False)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        run = context.run
        self._backfill = is_backfill_run(run.tags if run is not None else None)

    def get_client(self) -> HubSpotClient:
        state = settings.state_dir(self.state_dir)
        breaker = SharedCircuitBreaker(
            state / "coordination.sqlite",
            f"hubspot:{self.account}",
            BreakerPolicy(
                self.breaker_failure_threshold,
                self.breaker_cooldown_seconds,
                # A probe is one attempt; another caller may probe if it has not answered by then.
                probe_lease_seconds=self.timeout_seconds + 10,
            ),
        )
        return HubSpotClient(
            base_url=self.base_url,
            token_url=self.token_url or f"{self.base_url.rstrip('/')}/oauth/v1/token",
            client_id=self.client_id,
            client_secret=self.client_secret,
            refresh_token=self.refresh_token,
            private_app_token=self.private_app_token,
            secret_store=SecretStore(state / "secrets.json"),
            limiter=SharedRateLimiter(state / "coordination.sqlite"),
            requests_per_10s=self.requests_per_10s,
            search_per_second=self.search_per_second,
            retry=RetryPolicy(max_attempts=self.max_attempts, timeout_seconds=self.timeout_seconds),
            account=self.account,
            breaker=breaker,
            backfill=self._backfill,
            live_reserve=self.live_reserve,
        )
