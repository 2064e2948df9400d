"""The retrying request loop shared by the vendor clients.

429 honours Retry-After (and pushes the shared bucket back, so other processes wait too);
5xx, timeouts and dropped connections are retried with exponential backoff and full
jitter, bounded. Errors name the vendor, method, path and status, never a credential.

With a circuit breaker (shared by every process using the account), a logical request
that fails after those retries counts against the vendor; once the breaker is open,
`send` raises `CircuitOpenError` at once, without a call or a retry.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Protocol
from urllib.parse import urlsplit

import requests

from personalization_pipeline.core.breaker import CLOSED, HALF_OPEN, Admission, BreakerPolicy, BreakerState
from personalization_pipeline.core.clock import SYSTEM_CLOCK, Clock
from personalization_pipeline.core.ratelimit import backoff_delay

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class VendorError(RuntimeError):
    """A vendor call that failed for good. The message is safe to show in the UI."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class VendorAuthError(VendorError):
    """Credentials were rejected even after a refresh."""


class VendorUnavailableError(VendorError):
    """5xx, timeouts or dropped connections outlasted the retries: counts against the
    vendor's circuit breaker."""


def _utc(epoch: float | None) -> str:
    if epoch is None:
        return "an unknown time"
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class CircuitOpenError(VendorError):
    """The vendor's circuit breaker is open: nothing was sent. Not worth retrying before
    `retry_at` (epoch seconds)."""

    def __init__(self, vendor: str, state: BreakerState, policy: BreakerPolicy) -> None:
        self.vendor = vendor
        self.breaker = state
        self.opened_at = state.opened_at
        self.retry_at = state.retry_at(policy)
        if state.state == HALF_OPEN:
            message = (
                f"{vendor} circuit breaker is half-open (open since {_utc(state.opened_at)}): another "
                f"request is probing whether {vendor} is back; no request is sent before "
                f"{_utc(self.retry_at)}"
            )
        else:
            message = (
                f"{vendor} circuit breaker is open since {_utc(state.opened_at)} after {state.failures} "
                f"consecutive failed requests; no request is sent until {_utc(self.retry_at)}, when one "
                f"probe request will try again"
            )
        if state.last_error:
            message += f". Last error: {state.last_error}"
        super().__init__(message, status=None)

    def as_metadata(self) -> dict[str, str | int]:
        return {
            "circuit_state": self.breaker.state,
            "breaker_failures": self.breaker.failures,
            "breaker_open_since": _utc(self.opened_at),
            "breaker_retry_at": _utc(self.retry_at),
        }


class Breaker(Protocol):
    """What the loop needs from a circuit breaker (`SharedCircuitBreaker`)."""

    policy: BreakerPolicy

    def admit(self) -> tuple[Admission, BreakerState]: ...

    def record(self, admission: Admission, ok: bool | None, error: str = "") -> BreakerState: ...


@dataclass
class CallStats:
    """Counters reported as materialisation metadata."""

    api_calls: int = 0
    http_429: int = 0
    retries: int = 0
    token_refreshes: int = 0
    wait_seconds: float = 0.0
    pages: int = 0
    circuit_state: str = CLOSED
    breaker_failures: int = 0

    def as_metadata(self) -> dict[str, float | str]:
        return {
            "api_calls": self.api_calls,
            "http_429": self.http_429,
            "retries": self.retries,
            "token_refreshes": self.token_refreshes,
            "rate_limit_wait_seconds": round(self.wait_seconds, 3),
            "pages": self.pages,
            "circuit_state": self.circuit_state,
            "breaker_failures": self.breaker_failures,
        }


@dataclass
class RetryPolicy:
    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    timeout_seconds: float = 30.0


def retry_after_seconds(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def describe(method: str, url: str) -> str:
    """`POST /crm/v3/objects/contacts/search` — the path only, no query (it may carry keys)."""
    return f"{method} {urlsplit(url).path}"


@dataclass
class RequestLoop:
    """Sends one logical request, retrying what is worth retrying.

    `before_attempt` runs before every attempt (rate limiting, connection slots);
    `on_429` receives the Retry-After so a shared bucket can be pushed back;
    `on_401` may refresh credentials once and return True to retry;
    `breaker`, when given, is asked before and told after every logical request.
    """

    vendor: str
    session_request: Callable[..., requests.Response]
    stats: CallStats = field(default_factory=CallStats)
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    clock: Clock = SYSTEM_CLOCK
    before_attempt: Callable[[str], float] | None = None
    on_429: Callable[[float], None] | None = None
    on_401: Callable[[], bool] | None = None
    breaker: Breaker | None = None

    def send(self, method: str, url: str, *, limit_key: str = "default", **kwargs: Any) -> requests.Response:
        if self.breaker is None:
            return self._send(method, url, limit_key, self.policy.max_attempts, **kwargs)
        admission, state = self.breaker.admit()
        self._note(state)
        if not admission.allowed:
            raise CircuitOpenError(self.vendor, state, self.breaker.policy)
        # A half-open breaker's probe is one attempt: retries would multiply calls to a
        # vendor that may still be down.
        attempts = 1 if admission.probe else self.policy.max_attempts
        try:
            response = self._send(method, url, limit_key, attempts, **kwargs)
        except VendorUnavailableError as exc:
            self._note(self.breaker.record(admission, False, str(exc)))
            raise
        except VendorError:
            # The vendor answered (4xx, 401, an exhausted 429): it is up.
            self._note(self.breaker.record(admission, True))
            raise
        except BaseException:
            self._note(self.breaker.record(admission, None))
            raise
        self._note(self.breaker.record(admission, True))
        return response

    def _note(self, state: BreakerState) -> None:
        self.stats.circuit_state = state.state
        self.stats.breaker_failures = state.failures

    def _send(self, method: str, url: str, limit_key: str, max_attempts: int, **kwargs: Any) -> requests.Response:
        what = f"{self.vendor} {describe(method, url)}"
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            if self.before_attempt is not None:
                self.stats.wait_seconds += self.before_attempt(limit_key)
            self.stats.api_calls += 1
            retry_after = None
            failure = None
            try:
                response = self.session_request(method, url, timeout=self.policy.timeout_seconds, **kwargs)
            except (requests.Timeout, requests.ConnectionError) as exc:
                failure = "timed out" if isinstance(exc, requests.Timeout) else "connection failed"
            # Raised and slept outside the `except`, so errors and interruptions do not
            # drag the network library's exception chain into the run's event log.
            if failure is not None:
                if attempt >= max_attempts:
                    raise VendorUnavailableError(f"{what} {failure} after {attempt} attempts")
                self._sleep(attempt, None, what, failure)
                continue
            if response.status_code == 401 and self.on_401 is not None and not refreshed:
                refreshed = True
                if self.on_401():
                    self.stats.token_refreshes += 1
                    attempt -= 1
                    continue
            if response.status_code in RETRYABLE_STATUS:
                if response.status_code == 429:
                    self.stats.http_429 += 1
                    retry_after = retry_after_seconds(response)
                    if self.on_429 is not None:
                        self.on_429(retry_after if retry_after is not None else 1.0)
                if attempt >= max_attempts:
                    error = VendorUnavailableError if response.status_code >= 500 else VendorError
                    raise error(
                        f"{what} answered {response.status_code} {self._brief(response)} "
                        f"after {attempt} attempts",
                        status=response.status_code,
                    )
                self._sleep(attempt, retry_after, what, f"HTTP {response.status_code}")
                continue
            if response.status_code == 401:
                raise VendorAuthError(
                    f"{what} was refused (401): the credentials are invalid or revoked; "
                    "re-run the authorisation (see README, 'Real accounts')",
                    status=401,
                )
            if response.status_code >= 400:
                raise VendorError(
                    f"{what} answered {response.status_code}: {self._brief(response)}",
                    status=response.status_code,
                )
            return response

    def json(self, method: str, url: str, **kwargs: Any) -> Any:
        """`send`, then parse JSON; a malformed body is retried like a dropped connection."""
        attempt = 0
        while True:
            attempt += 1
            response = self.send(method, url, **kwargs)
            if response.status_code == 204 or not response.content:
                return None
            try:
                return response.json()
            except (ValueError, json.JSONDecodeError):
                what = f"{self.vendor} {describe(method, url)}"
                if attempt >= self.policy.max_attempts:
                    raise VendorError(f"{what} returned a malformed JSON body {attempt} times") from None
                self._sleep(attempt, None, what, "malformed JSON body")

    def _sleep(self, attempt: int, retry_after: float | None, what: str, reason: str) -> None:
        self.stats.retries += 1
        delay = backoff_delay(attempt, self.policy.base_delay, self.policy.max_delay, retry_after)
        log.info("%s: %s, retry %d in %.2fs", what, reason, attempt, delay)
        self.clock.sleep(delay)

    @staticmethod
    def _brief(response: requests.Response) -> str:
        try:
            body = response.json()
        except ValueError:
            return response.text[:200]
        if isinstance(body, dict):
            for key in ("message", "detail", "title", "error"):
                if key in body:
                    return str(body[key])[:300]
        return str(body)[:200]
