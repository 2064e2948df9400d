"""A HubSpot-compatible CRM on loopback: CRM v3 contacts and the OAuth v1 token endpoint.

Shapes follow VENDOR-APIS.md. What the sandbox decides where HubSpot's docs are silent:

- Property values are strings; a requested property that is empty comes back as `null`
  (as HubSpot does); properties that do not exist are left out of the answer but are a 400
  in filters, sorts and writes. Dates are ISO 8601 with milliseconds and `Z`.
- Search `after` is an offset. Without `sorts`, results come in `hs_object_id` order
  (creation order). Sorting by `lastmodifieddate` breaks ties by `hs_object_id`.
- `after + limit` beyond the result cap (10,000 by default, `search_max_results`) is a
  400 even when fewer results exist, so a client must narrow the window instead.
- EQ/NEQ/IN/NOT_IN on text compare case-insensitively (`email` also ignores surrounding
  whitespace); `lastmodifieddate`, `createdate` and `hs_object_id` compare as numbers
  (epoch ms as numbers or strings, or ISO 8601).
- API writes store emails stripped and lower-cased. The generated data keeps the messy
  spellings (case, whitespace, shared addresses) an import leaves behind.
- Every write (update, upsert, create, archive, merge) sets `lastmodifieddate` to the
  sandbox clock's now; archived contacts leave search and list (`archived=true` lists them).
- Merge (`POST /crm/v3/objects/contacts/merge`, `{primaryObjectId, objectIdToMerge}`): the
  primary keeps its id and its non-empty values, takes the merged contact's values where
  its own are empty, and lists every id merged into it in `hs_merged_object_ids`
  (semicolon-separated, oldest first, including ids merged into the merged contact). The
  merged-away contact leaves search and list for good (it is not archived); reading its id
  (GET or batch read) returns the record it was merged into, under that record's id, as
  HubSpot does. Writes, archive and gdpr-delete of a merged-away id are 404. HubSpot's
  changelog announces merges that create a new id for the result; with either behaviour
  every id merged away is in the surviving record's `hs_merged_object_ids`.
- The list endpoint's `after` is an `hs_object_id` cursor; token expiry uses real
  (monotonic) time, not the injectable clock.
- Authorization: Bearer <OAuth access token or the private-app token>. Unknown or expired
  tokens get 401 `EXPIRED_AUTHENTICATION`; a missing header gets 401
  `INVALID_AUTHENTICATION`.
"""

from __future__ import annotations

import base64
import fnmatch
import math
import re
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from personalization_pipeline.sandbox.data import (
    CITIES,
    COUNTRIES,
    FIRST_NAMES,
    LAST_NAMES,
    LIFECYCLE_STAGES,
    LOYALTY_TIERS,
    SortedIndex,
    World,
    format_email,
    iso_ms_z,
)
from personalization_pipeline.sandbox.faults import (
    BuiltApp,
    FaultInjector,
    FaultMiddleware,
    RequestStats,
    admin_routes,
    json_response,
    read_json,
)

Clock = Callable[[], datetime]

PROPERTY_NAMES = (
    "email", "firstname", "lastname", "city", "country", "lifecyclestage", "loyalty_tier",
    "phone", "mobilephone", "company", "jobtitle", "address", "state", "zip", "website",
    "createdate", "lastmodifieddate", "hs_object_id", "hs_merged_object_ids",
)
KNOWN = frozenset(PROPERTY_NAMES)
READ_ONLY = frozenset({"createdate", "lastmodifieddate", "hs_object_id", "hs_merged_object_ids"})
NUMERIC = ("lastmodifieddate", "createdate", "hs_object_id")
DATES = frozenset({"createdate", "lastmodifieddate"})
DEFAULT_PROPERTIES = ("createdate", "email", "firstname", "hs_object_id", "lastmodifieddate", "lastname")
OPTIONS = {"lifecyclestage": LIFECYCLE_STAGES, "loyalty_tier": LOYALTY_TIERS}
OPERATORS = frozenset(
    {"EQ", "NEQ", "LT", "LTE", "GT", "GTE", "BETWEEN", "IN", "NOT_IN", "HAS_PROPERTY",
     "NOT_HAS_PROPERTY", "CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"}
)
MAX_GROUPS, MAX_FILTERS_PER_GROUP, MAX_FILTERS = 5, 10, 25
MAX_SEARCH_LIMIT, MAX_LIST_LIMIT, MAX_BATCH = 200, 100, 100
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
QUERY_PROPERTIES = ("email", "firstname", "lastname", "phone", "company")

ALIVE, ARCHIVED, DELETED, MERGED = 0, 1, 2, 3


class ApiError(Exception):
    """An error answer in HubSpot's shape."""

    def __init__(self, status: int, message: str, category: str = "VALIDATION_ERROR", **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {
            "status": "error",
            "message": message,
            "correlationId": str(uuid.uuid4()),
            "category": category,
            **extra,
        }


def now_ms(clock: Clock) -> int:
    moment = clock()
    if moment.tzinfo is None:
        raise ValueError("the sandbox clock must return timezone-aware datetimes")
    return int(moment.timestamp() * 1000)


def parse_time_ms(value: Any) -> int:
    """Epoch ms (number or digit string) or ISO 8601 -> epoch ms."""
    if isinstance(value, bool):
        raise ValueError("not a time")
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


@dataclass
class _Filter:
    prop: str
    op: str
    value: Any = None
    high: Any = None
    values: tuple = ()


# -- the contacts ----------------------------------------------------------------------


class HubSpotState:
    """The CRM's contacts: the world's columns plus sparse edits, under one lock.

    A contact is a row number. `overrides[row]` holds properties written since start
    (always the full truth for rows created through the API); `lastmodifieddate` lives in
    `self.lmd` and in `self.index`, ordered by (lastmodifieddate, row), and row order is
    hs_object_id order.
    """

    def __init__(self, world: World, clock: Clock, *, search_max_results: int = 10_000) -> None:
        self.world = world
        self.clock = clock
        self.search_max_results = search_max_results
        self.lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        c = self.world.contacts
        with self.lock:
            self.n_base = len(c)
            self.ids = c.hs_object_id.astype(np.int64).copy()
            self.lmd = c.lastmodifieddate.astype(np.int64).copy()
            self.created = c.createdate.astype(np.int64).copy()
            self.status = np.zeros(len(c), np.int8)
            self.email_ref = c.email_ref.astype(np.int32).copy()
            self.person = c.person.astype(np.int32).copy()
            self.archived_at: dict[int, int] = {}
            self.merged_into: dict[int, int] = {}
            self.overrides: dict[int, dict[str, str]] = {}
            self.extra_email: dict[str, set[int]] = {}
            self.index = SortedIndex(self.lmd)
            self._by_ref = np.argsort(c.email_ref, kind="stable")
            self._ref_sorted = c.email_ref[self._by_ref]
            self.rng = np.random.default_rng([self.world.seed, 101])
            self.next_id = int(self.ids[-1]) + 7 if len(self.ids) else 10_000_001

    # -- reading ------------------------------------------------------------------------

    def now(self) -> int:
        return now_ms(self.clock)

    def properties(self, row: int) -> dict[str, str]:
        """Every known property of a row as a string ('' = empty; dates as epoch ms)."""
        if row < self.n_base:
            props = dict.fromkeys(PROPERTY_NAMES, "")
            props.update(self.world.contact_properties(row))
        else:
            props = dict.fromkeys(PROPERTY_NAMES, "")
        props.update(self.overrides.get(row, {}))
        props["lastmodifieddate"] = str(int(self.lmd[row]))
        props["createdate"] = str(int(self.created[row]))
        props["hs_object_id"] = str(int(self.ids[row]))
        return props

    def value(self, row: int, prop: str) -> str:
        override = self.overrides.get(row)
        if override is not None and prop in override:
            return override[prop]
        if prop == "lastmodifieddate":
            return str(int(self.lmd[row]))
        if prop == "createdate":
            return str(int(self.created[row]))
        if prop == "hs_object_id":
            return str(int(self.ids[row]))
        if row >= self.n_base:
            return ""
        return _base_value(self.world, row, prop)

    def render(self, row: int, names: tuple[str, ...] | list[str]) -> dict[str, Any]:
        props = self.properties(row)
        out: dict[str, Any] = {}
        for name in names:
            if name not in KNOWN:
                continue
            value = props.get(name, "")
            if name in DATES and value:
                value = iso_ms_z(int(value))
            out[name] = value if value != "" else None
        record = {
            "id": str(int(self.ids[row])),
            "properties": out,
            "createdAt": iso_ms_z(int(self.created[row])),
            "updatedAt": iso_ms_z(int(self.lmd[row])),
            "archived": bool(self.status[row] == ARCHIVED),
        }
        if self.status[row] == ARCHIVED:
            record["archivedAt"] = iso_ms_z(self.archived_at.get(row, int(self.lmd[row])))
        return record

    def row_of_id(self, object_id: Any) -> int | None:
        try:
            key = int(str(object_id).strip())
        except ValueError:
            return None
        pos = int(np.searchsorted(self.ids, key))
        if pos < len(self.ids) and self.ids[pos] == key and self.status[pos] != DELETED:
            return pos
        return None

    def rows_of_email(self, email: str) -> list[int]:
        """Rows (not deleted) whose email matches after strip + lower-case, by id."""
        norm = email.strip().lower()
        rows = set(self.extra_email.get(norm, ()))
        ref = self.world.find_email(norm)
        if ref >= 0:
            a = int(np.searchsorted(self._ref_sorted, ref, "left"))
            b = int(np.searchsorted(self._ref_sorted, ref, "right"))
            rows.update(int(r) for r in self._by_ref[a:b] if self.email_ref[r] == ref)
        return sorted(r for r in rows if self.status[r] != DELETED)

    def surviving_row(self, row: int) -> int:
        """The row a merged-away row now lives in (merges can chain); `row` itself otherwise."""
        seen = set()
        while row in self.merged_into and row not in seen:
            seen.add(row)
            row = self.merged_into[row]
        return row

    def locate(
        self, key: Any, id_property: str | None, *, archived: bool = False, follow_merges: bool = False
    ) -> int | None:
        """The row of a live (or, with `archived`, archived) contact. `follow_merges`: reads
        of a merged-away id land on the contact it was merged into, as in HubSpot."""
        if id_property in (None, "", "hs_object_id"):
            row = self.row_of_id(key)
            if row is not None and follow_merges and not archived and self.status[row] == MERGED:
                row = self.surviving_row(row)
        elif id_property == "email":
            wanted = ARCHIVED if archived else ALIVE
            rows = [r for r in self.rows_of_email(str(key)) if self.status[r] == wanted]
            return rows[0] if rows else None
        else:
            raise ApiError(400, f"idProperty {id_property!r} is not a unique property of contacts; use email")
        if row is None:
            return None
        return row if self.status[row] == (ARCHIVED if archived else ALIVE) else None

    # -- search -------------------------------------------------------------------------

    def search(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "Invalid input JSON: the body must be an object")
        with self.lock:
            groups = self._parse_groups(body.get("filterGroups") or [])
            sort_prop, descending = self._parse_sort(body.get("sorts") or [])
            names = body.get("properties") or list(DEFAULT_PROPERTIES)
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ApiError(400, "properties must be a list of property names")
            limit = _int_field(body, "limit", 10)
            if limit < 1 or limit > MAX_SEARCH_LIMIT:
                raise ApiError(400, f"limit must be between 1 and {MAX_SEARCH_LIMIT}, got {limit}")
            after = _int_field(body, "after", 0)
            if after < 0:
                raise ApiError(400, f"after must be a non-negative offset, got {after}")
            if after + limit > self.search_max_results:
                raise ApiError(
                    400,
                    f"Search results are limited to {self.search_max_results} per query: after={after} "
                    f"with limit={limit} pages past them. Narrow the query (for example by "
                    "lastmodifieddate and hs_object_id) instead of paging further.",
                )
            positions = self._match(groups, body.get("query"))
            total = len(positions)
            page = self._order_page(positions, sort_prop, descending, after, limit)
            result: dict[str, Any] = {"total": total, "results": [self.render(int(r), names) for r in page]}
            if after + limit < total:
                nxt = str(after + limit)
                result["paging"] = {"next": {"after": nxt, "link": f"?after={nxt}"}}
            return result

    def _parse_groups(self, raw: Any) -> list[list[_Filter]]:
        if not isinstance(raw, list):
            raise ApiError(400, "filterGroups must be a list")
        if len(raw) > MAX_GROUPS:
            raise ApiError(400, f"Too many filter groups: {len(raw)}; at most {MAX_GROUPS} are allowed")
        groups, total = [], 0
        for group in raw:
            filters = group.get("filters") if isinstance(group, dict) else None
            if not isinstance(filters, list):
                raise ApiError(400, "each filter group needs a `filters` list")
            if len(filters) > MAX_FILTERS_PER_GROUP:
                raise ApiError(
                    400, f"Too many filters in a group: {len(filters)}; at most {MAX_FILTERS_PER_GROUP} are allowed"
                )
            total += len(filters)
            groups.append([self._parse_filter(f) for f in filters])
        if total > MAX_FILTERS:
            raise ApiError(400, f"Too many filters: {total}; at most {MAX_FILTERS} in all groups are allowed")
        return groups

    @staticmethod
    def _parse_filter(raw: Any) -> _Filter:
        if not isinstance(raw, dict):
            raise ApiError(400, "a filter must be an object")
        prop, op = raw.get("propertyName"), raw.get("operator")
        if prop not in KNOWN:
            raise ApiError(400, f"Unable to filter by property {prop!r}: it does not exist on contacts")
        if op not in OPERATORS:
            raise ApiError(400, f"Unknown filter operator {op!r}; use one of {', '.join(sorted(OPERATORS))}")
        f = _Filter(prop, op)
        numeric = prop in NUMERIC

        def conv(v: Any) -> Any:
            if v is None:
                raise ApiError(400, f"filter {prop} {op} needs a value")
            if numeric:
                try:
                    return parse_time_ms(v) if prop in DATES else int(str(v).strip())
                except (ValueError, TypeError):
                    raise ApiError(400, f"{v!r} is not a valid value for {prop}") from None
            return str(v)

        if op in ("IN", "NOT_IN"):
            values = raw.get("values")
            if not isinstance(values, list) or not values:
                raise ApiError(400, f"filter {prop} {op} needs a non-empty `values` list")
            f.values = tuple(conv(v) for v in values)
        elif op == "BETWEEN":
            f.value, f.high = conv(raw.get("value")), conv(raw.get("highValue"))
        elif op not in ("HAS_PROPERTY", "NOT_HAS_PROPERTY"):
            f.value = conv(raw.get("value"))
        return f

    @staticmethod
    def _parse_sort(raw: Any) -> tuple[str, bool]:
        if not isinstance(raw, list):
            raise ApiError(400, "sorts must be a list")
        if not raw:
            return "hs_object_id", False
        if len(raw) > 1:
            raise ApiError(400, "Only one sort is allowed")
        sort = raw[0]
        if isinstance(sort, str):
            name, descending = sort.lstrip("-"), sort.startswith("-")
        elif isinstance(sort, dict):
            name = sort.get("propertyName")
            direction = str(sort.get("direction", "ASCENDING")).upper()
            if direction not in ("ASCENDING", "DESCENDING"):
                raise ApiError(400, f"sort direction must be ASCENDING or DESCENDING, got {direction!r}")
            descending = direction == "DESCENDING"
        else:
            raise ApiError(400, "a sort is an object {propertyName, direction}")
        if name not in KNOWN:
            raise ApiError(400, f"Unable to sort by property {name!r}: it does not exist on contacts")
        return name, descending

    def _match(self, groups: list[list[_Filter]], query: Any) -> np.ndarray:
        """Index positions (ascending = (lastmodifieddate, id) order) of matching rows."""
        index = self.index
        if not groups:
            found = np.flatnonzero(self.status[index.rows] == ALIVE)
        else:
            parts = [self._group_positions(g) for g in groups]
            if len(parts) == 1:
                found = parts[0]
            elif sum(len(p) for p in parts) > 50_000:
                lo = min(int(p[0]) for p in parts if len(p)) if any(len(p) for p in parts) else 0
                hi = max(int(p[-1]) for p in parts if len(p)) if any(len(p) for p in parts) else -1
                mask = np.zeros(max(0, hi - lo + 1), bool)
                for p in parts:
                    mask[p - lo] = True
                found = lo + np.flatnonzero(mask)
            else:
                found = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        if query not in (None, ""):
            needle = str(query).strip().lower()
            keep = [
                p for p in found.tolist()
                if any(needle in self.value(int(index.rows[p]), prop).lower() for prop in QUERY_PROPERTIES)
            ]
            found = np.asarray(keep, dtype=np.int64)
        return found

    def _group_positions(self, filters: list[_Filter]) -> np.ndarray:
        index = self.index
        lo, hi = None, None
        rest: list[_Filter] = []
        for f in filters:
            if f.prop == "lastmodifieddate" and f.op in ("EQ", "GT", "GTE", "LT", "LTE", "BETWEEN"):
                a = b = None
                if f.op in ("EQ", "GTE", "BETWEEN"):
                    a = f.value
                elif f.op == "GT":
                    a = f.value + 1
                if f.op in ("EQ", "LTE"):
                    b = f.value
                elif f.op == "LT":
                    b = f.value - 1
                elif f.op == "BETWEEN":
                    b = f.high
                if a is not None:
                    lo = a if lo is None else max(lo, a)
                if b is not None:
                    hi = b if hi is None else min(hi, b)
            else:
                rest.append(f)
        if lo is not None and hi is not None and lo > hi:
            return np.zeros(0, np.int64)
        email_keys = [f for f in rest if f.prop == "email" and f.op in ("EQ", "IN")]
        if lo is None and hi is None and email_keys:
            # A lookup by address: candidates from the address book, not a scan.
            f = email_keys[0]
            rows = sorted({r for v in (f.values or (f.value,)) for r in self.rows_of_email(str(v))
                           if self.status[r] == ALIVE})
            rows_arr = np.asarray(rows, dtype=np.int64)
            positions = np.sort(index.positions(self.lmd[rows_arr], rows_arr)) if rows else np.zeros(0, np.int64)
            return np.asarray(
                [p for p in positions.tolist() if self._row_matches(int(index.rows[p]), rest)], dtype=np.int64
            )
        a, b = index.span(lo, hi)
        rows = index.rows[a:b]
        mask = self.status[rows] == ALIVE
        slow: list[_Filter] = []
        for f in rest:
            if f.prop in NUMERIC:
                column = {"lastmodifieddate": self.lmd, "createdate": self.created, "hs_object_id": self.ids}[f.prop]
                mask &= _numeric_mask(column[rows], f)
            else:
                slow.append(f)
        found = a + np.flatnonzero(mask)
        if slow:
            found = np.asarray(
                [p for p in found.tolist() if self._row_matches(int(index.rows[p]), slow)], dtype=np.int64
            )
        return found

    def _row_matches(self, row: int, filters: list[_Filter]) -> bool:
        for f in filters:
            if f.prop in NUMERIC:
                column = {"lastmodifieddate": self.lmd, "createdate": self.created, "hs_object_id": self.ids}[f.prop]
                if not bool(_numeric_mask(column[row : row + 1], f)[0]):
                    return False
            elif not _text_matches(self.value(row, f.prop), f):
                return False
        return True

    def _order_page(self, positions: np.ndarray, prop: str, descending: bool, after: int, limit: int) -> np.ndarray:
        rows_at = self.index.rows
        if len(positions) == 0:
            return np.zeros(0, np.int64)
        single_instant = self.index.keys[positions[0]] == self.index.keys[positions[-1]]
        if prop == "lastmodifieddate" or (prop == "hs_object_id" and single_instant):
            ordered = positions[::-1] if descending else positions
            return rows_at[ordered[after : after + limit]]
        rows = rows_at[positions]
        if prop == "hs_object_id":
            rows = np.sort(rows)  # row order is id order
        elif prop == "createdate":
            rows = rows[np.lexsort((rows, self.created[rows]))]
        else:
            keyed = sorted(rows.tolist(), key=lambda r: (self.value(r, prop) == "", self.value(r, prop).lower(), r))
            rows = np.asarray(keyed, dtype=np.int64)
        if descending:
            rows = rows[::-1]
        return rows[after : after + limit]

    # -- list and get -------------------------------------------------------------------

    def list_page(self, limit: int, after: str | None, names: list[str], archived: bool) -> dict[str, Any]:
        if limit < 1 or limit > MAX_LIST_LIMIT:
            raise ApiError(400, f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}")
        try:
            start_id = int(after) if after not in (None, "") else 0
        except ValueError:
            raise ApiError(400, f"after must be the cursor from paging.next.after, got {after!r}") from None
        wanted = ARCHIVED if archived else ALIVE
        with self.lock:
            start = int(np.searchsorted(self.ids, start_id))
            rows: list[int] = []
            chunk = max(1024, limit * 4)
            pos = start
            while pos < len(self.ids) and len(rows) <= limit:
                hit = np.flatnonzero(self.status[pos : pos + chunk] == wanted) + pos
                rows.extend(hit[: limit + 1 - len(rows)].tolist())
                pos += chunk
            page, more = rows[:limit], len(rows) > limit
            result: dict[str, Any] = {"results": [self.render(r, names) for r in page]}
            if more:
                nxt = str(int(self.ids[rows[limit]]))
                result["paging"] = {"next": {"after": nxt, "link": f"?after={nxt}"}}
            return result

    # -- writes -------------------------------------------------------------------------

    def _validate(self, props: Any, *, creating: bool = False) -> dict[str, str]:
        if not isinstance(props, dict):
            raise ApiError(400, "properties must be an object of property name -> value")
        errors, clean = [], {}
        for name, raw in props.items():
            if name not in KNOWN:
                errors.append({"isValid": False, "message": f'Property "{name}" does not exist',
                               "error": "PROPERTY_DOESNT_EXIST", "name": name})
                continue
            if name in READ_ONLY:
                errors.append({"isValid": False, "message": f'"{name}" is a read only property; its value cannot be set.',
                               "error": "READ_ONLY_VALUE", "name": name})
                continue
            if isinstance(raw, bool):
                value = "true" if raw else "false"
            else:
                value = "" if raw is None else str(raw)
            if name == "email":
                value = value.strip().lower()
                if value and not EMAIL_RE.match(value):
                    errors.append({"isValid": False, "message": f"Email address {raw} is invalid",
                                   "error": "INVALID_EMAIL", "name": name})
                    continue
            if name in OPTIONS and value and value not in OPTIONS[name]:
                errors.append({"isValid": False,
                               "message": f"{value} was not one of the allowed options: {', '.join(OPTIONS[name])}",
                               "error": "INVALID_OPTION", "name": name})
                continue
            clean[name] = value
        if errors:
            raise ApiError(400, "Property values were not valid: " + str(errors).replace("'", '"'), errors=errors)
        return clean

    def _set_email(self, row: int, new: str) -> None:
        old_override = self.overrides.get(row, {}).get("email")
        if old_override is not None:
            self.extra_email.get(old_override, set()).discard(row)
        elif row < self.n_base:
            self.email_ref[row] = -1
        if new:
            self.extra_email.setdefault(new, set()).add(row)

    def _write(self, rows: list[int], props_list: list[dict[str, str]], stamp: int) -> None:
        for row, props in zip(rows, props_list):
            if "email" in props:
                self._set_email(row, props["email"])
            self.overrides.setdefault(row, {}).update(props)
        self._touch(rows, stamp)

    def _touch(self, rows: list[int], stamp: int) -> None:
        arr = np.unique(np.asarray(rows, dtype=np.int64))
        if len(arr) == 0:
            return
        old = self.lmd[arr].copy()
        self.lmd[arr] = stamp
        self.index.move(arr, old, np.full(len(arr), stamp, np.int64))

    def _append(self, props: dict[str, str], stamp: int) -> int:
        row = len(self.ids)
        self.ids = np.append(self.ids, self.next_id)
        self.next_id += int(self.rng.integers(1, 8))
        self.lmd = np.append(self.lmd, stamp)
        self.created = np.append(self.created, stamp)
        self.status = np.append(self.status, np.int8(ALIVE))
        self.email_ref = np.append(self.email_ref, np.int32(-1))
        self.person = np.append(self.person, np.int32(-1))
        self.overrides[row] = {}
        if props.get("email"):
            self._set_email(row, props["email"])
        self.overrides[row].update(props)
        self.index.insert(np.asarray([row]), np.asarray([stamp]))
        return row

    def _check_batch(self, body: Any) -> list[Any]:
        inputs = body.get("inputs") if isinstance(body, dict) else None
        if not isinstance(inputs, list):
            raise ApiError(400, "the body must be {\"inputs\": [...]}")
        if len(inputs) > MAX_BATCH:
            raise ApiError(400, f"Batch input limit exceeded: {len(inputs)} inputs; at most {MAX_BATCH} are allowed")
        return inputs

    @staticmethod
    def _batch_answer(results: list[dict], missing: list[str], verb: str) -> tuple[int, dict[str, Any]]:
        body = _batch_envelope(results)
        if not missing:
            return 200, body
        body["numErrors"] = 1
        body["errors"] = [{
            "status": "error",
            "category": "OBJECT_NOT_FOUND",
            "message": f"Could not {verb} some CONTACT objects, they may be deleted or not exist. "
                       "Check that ids are valid.",
            "context": {"ids": missing},
        }]
        return 207, body

    def batch_read(self, body: Any, archived: bool = False) -> tuple[int, dict[str, Any]]:
        inputs = self._check_batch(body)
        names = body.get("properties") or list(DEFAULT_PROPERTIES)
        id_property = body.get("idProperty")
        with self.lock:
            results, missing = [], []
            for item in inputs:
                key = item.get("id") if isinstance(item, dict) else None
                row = (
                    self.locate(key, id_property, archived=archived, follow_merges=True) if key is not None else None
                )
                if row is None:
                    missing.append(str(key))
                else:
                    results.append(self.render(row, names))
            return self._batch_answer(results, missing, "get")

    def batch_update(self, body: Any) -> tuple[int, dict[str, Any]]:
        inputs = self._check_batch(body)
        with self.lock:
            rows, props_list, missing = [], [], []
            for item in inputs:
                if not isinstance(item, dict):
                    raise ApiError(400, "each input is {\"id\": ..., \"properties\": {...}}")
                props = self._validate(item.get("properties"))
                row = self.locate(item.get("id"), item.get("idProperty") or body.get("idProperty"))
                if row is None:
                    missing.append(str(item.get("id")))
                    continue
                rows.append(row)
                props_list.append(props)
            self._write(rows, props_list, self.now())
            results = [self.render(r, list(dict.fromkeys([*DEFAULT_PROPERTIES, *p]))) for r, p in zip(rows, props_list)]
            return self._batch_answer(results, missing, "update")

    def batch_create(self, body: Any) -> tuple[int, dict[str, Any]]:
        inputs = self._check_batch(body)
        with self.lock:
            props_list = []
            seen: set[str] = set()
            for item in inputs:
                if not isinstance(item, dict):
                    raise ApiError(400, "each input is {\"properties\": {...}}")
                props = self._validate(item.get("properties"), creating=True)
                email = props.get("email", "")
                if email:
                    existing = [r for r in self.rows_of_email(email) if self.status[r] == ALIVE]
                    if existing or email in seen:
                        existing_id = int(self.ids[existing[0]]) if existing else "in this batch"
                        raise ApiError(409, f"Contact already exists. Existing ID: {existing_id}", "CONFLICT")
                    seen.add(email)
                props_list.append(props)
            stamp = self.now()
            rows = [self._append(p, stamp) for p in props_list]
            results = [self.render(r, list(dict.fromkeys([*DEFAULT_PROPERTIES, *p]))) for r, p in zip(rows, props_list)]
            return 201, _batch_envelope(results)

    def batch_upsert(self, body: Any) -> tuple[int, dict[str, Any]]:
        inputs = self._check_batch(body)
        with self.lock:
            plan = []
            for item in inputs:
                if not isinstance(item, dict) or item.get("id") in (None, ""):
                    raise ApiError(400, "each input is {\"id\": ..., \"idProperty\": \"email\", \"properties\": {...}}")
                id_property = item.get("idProperty") or body.get("idProperty") or "email"
                props = self._validate(item.get("properties") or {})
                row = self.locate(item["id"], id_property)
                if row is None and id_property != "email":
                    raise ApiError(400, f"cannot create a contact from {id_property}={item['id']!r}; upsert by email")
                if row is None:
                    props = {"email": str(item["id"]).strip().lower(), **props}
                    if not EMAIL_RE.match(props["email"]):
                        raise ApiError(400, f"Email address {item['id']} is invalid")
                plan.append((row, props))
            stamp = self.now()
            results = []
            for row, props in plan:
                new = row is None
                if new:
                    # Two inputs for one new address: the second updates the first.
                    found = self.locate(props["email"], "email")
                    if found is None:
                        row = self._append(props, stamp)
                    else:
                        new = False
                        row = found
                        self._write([row], [props], stamp)
                else:
                    self._write([row], [props], stamp)
                record = self.render(row, list(dict.fromkeys([*DEFAULT_PROPERTIES, *props])))
                record["new"] = new
                results.append(record)
            return 200, _batch_envelope(results)

    def archive(self, key: Any, id_property: str | None = None) -> None:
        with self.lock:
            row = self.locate(key, id_property)
            if row is None:
                if self.locate(key, id_property, archived=True) is not None:
                    return
                raise ApiError(404, "resource not found", "OBJECT_NOT_FOUND")
            stamp = self.now()
            self.status[row] = ARCHIVED
            self.archived_at[row] = stamp
            self._touch([row], stamp)

    def gdpr_delete(self, body: Any) -> None:
        if not isinstance(body, dict) or body.get("objectId") in (None, ""):
            raise ApiError(400, "the body must be {\"objectId\": ..., \"idProperty\"?: \"email\"}")
        with self.lock:
            id_property = body.get("idProperty")
            row = self.locate(body["objectId"], id_property)
            if row is None:
                row = self.locate(body["objectId"], id_property, archived=True)
            if row is None:
                raise ApiError(404, "resource not found", "OBJECT_NOT_FOUND")
            self._set_email(row, "")
            self.overrides[row] = {}
            self.status[row] = DELETED
            self.index.remove(np.asarray([row]), self.lmd[[row]])

    def merge(self, body: Any) -> dict[str, Any]:
        """`POST /crm/v3/objects/contacts/merge`: `objectIdToMerge` merges into
        `primaryObjectId`; answers the primary as it is after the merge."""
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be {\"primaryObjectId\": ..., \"objectIdToMerge\": ...}")
        primary_key, merged_key = body.get("primaryObjectId"), body.get("objectIdToMerge")
        if primary_key in (None, "") or merged_key in (None, ""):
            raise ApiError(400, "primaryObjectId and objectIdToMerge are required")
        with self.lock:
            primary, merged = self.locate(primary_key, None), self.locate(merged_key, None)
            if primary is None or merged is None:
                missing = [str(k) for k, r in ((primary_key, primary), (merged_key, merged)) if r is None]
                raise ApiError(404, f"Could not find contacts {', '.join(missing)} to merge", "OBJECT_NOT_FOUND")
            if primary == merged:
                raise ApiError(400, "A contact cannot be merged with itself")
            mine, theirs = self.properties(primary), self.properties(merged)
            filled = {
                name: theirs[name]
                for name in PROPERTY_NAMES
                if name not in READ_ONLY and name != "email" and not mine.get(name) and theirs.get(name)
            }
            ids = [*self._merged_ids(primary), *self._merged_ids(merged), str(int(self.ids[merged]))]
            filled["hs_merged_object_ids"] = ";".join(dict.fromkeys(ids))
            self._write([primary], [filled], self.now())
            self.status[merged] = MERGED
            self.merged_into[merged] = primary
            self.index.remove(np.asarray([merged]), self.lmd[[merged]])
            return self.render(primary, list(dict.fromkeys([*DEFAULT_PROPERTIES, "hs_merged_object_ids"])))

    def _merged_ids(self, row: int) -> list[str]:
        return [i for i in self.value(row, "hs_merged_object_ids").split(";") if i]

    # -- sandbox-only ---------------------------------------------------------------------

    def merge_duplicates(self, count: int) -> list[dict[str, str]]:
        """Merge `count` pairs of live contacts as a CRM user cleaning duplicates would:
        two contacts of the same generated person when there are such pairs, else any
        two. Returns `{primary, merged}` ids per merge."""
        done = []
        with self.lock:
            for _ in range(max(0, count)):
                alive = np.flatnonzero(self.status == ALIVE)
                if len(alive) < 2:
                    break
                persons = self.person[alive]
                order = np.argsort(persons, kind="stable")
                sorted_persons = persons[order]
                dup = np.flatnonzero((sorted_persons[1:] == sorted_persons[:-1]) & (sorted_persons[1:] >= 0))
                if len(dup):
                    at = int(dup[int(self.rng.integers(len(dup)))])
                    pair = [int(alive[order[at]]), int(alive[order[at + 1]])]
                else:
                    pair = [int(r) for r in self.rng.choice(alive, 2, replace=False)]
                primary, merged = (str(int(self.ids[r])) for r in pair)
                self.merge({"primaryObjectId": primary, "objectIdToMerge": merged})
                done.append({"primary": primary, "merged": merged})
        return done


    def mutate(self, count: int, rows: np.ndarray | None = None) -> list[str]:
        """Edit `count` random live contacts as a person in the CRM would (city, last
        name, lifecycle stage, loyalty tier, first name); all get one new timestamp."""
        with self.lock:
            if rows is None:
                alive = np.flatnonzero(self.status == ALIVE)
                if len(alive) == 0 or count <= 0:
                    return []
                rows = self.rng.choice(alive, min(count, len(alive)), replace=False)
            rows = np.asarray(rows, dtype=np.int64)
            props_list = []
            for row in rows.tolist():
                kind = self.rng.choice(5, p=[0.4, 0.15, 0.2, 0.15, 0.1])
                if kind == 0:
                    new = "" if self.rng.random() < 0.1 else CITIES.strings[
                        CITIES.canonical[int(self.rng.integers(len(CITIES.canonical)))]]
                    props_list.append({"city": new})
                elif kind == 1:
                    props_list.append({"lastname": LAST_NAMES.strings[
                        LAST_NAMES.canonical[int(self.rng.integers(len(LAST_NAMES.canonical)))]]})
                elif kind == 2:
                    current = self.value(row, "lifecyclestage")
                    step = LIFECYCLE_STAGES.index(current) + 1 if current in LIFECYCLE_STAGES else 0
                    props_list.append({"lifecyclestage": LIFECYCLE_STAGES[min(step, len(LIFECYCLE_STAGES) - 1)]})
                elif kind == 3:
                    tiers = ("", *LOYALTY_TIERS)
                    props_list.append({"loyalty_tier": tiers[int(self.rng.integers(len(tiers)))]})
                else:
                    person = int(self.person[row])
                    canon = int(self.world.first[person]) if person >= 0 else 0
                    variants = [FIRST_NAMES.canonical[canon], *FIRST_NAMES.variants[canon][: FIRST_NAMES.n_variants[canon]]]
                    props_list.append({"firstname": FIRST_NAMES.strings[int(self.rng.choice(variants))]})
            self._write(rows.tolist(), props_list, self.now())
            return [str(int(self.ids[r])) for r in rows]

    def mutate_window(self, body: bytes, records: int) -> list[str]:
        """For the mutate_during_paging fault: edit `records` live contacts inside the
        lastmodifieddate range of the search body's first group that has one."""
        import json

        try:
            parsed = json.loads(body or b"{}")
            groups = self._parse_groups(parsed.get("filterGroups") or [])
        except (ValueError, ApiError, AttributeError):
            groups = []
        with self.lock:
            candidates = None
            for group in groups:
                found = self._group_positions(group)
                if len(found):
                    candidates = self.index.rows[found]
                    break
            if candidates is None:
                candidates = np.flatnonzero(self.status == ALIVE)
            if len(candidates) == 0:
                return []
            chosen = self.rng.choice(candidates, min(records, len(candidates)), replace=False)
            return self.mutate(len(chosen), rows=np.asarray(chosen))

    def ground_truth(self, modified_from: int | None, modified_to: int | None, archived: bool = False) -> list[dict]:
        """Live contacts with lastmodifieddate in [from, to), every property, raw strings."""
        with self.lock:
            hi = None if modified_to is None else modified_to - 1
            a, b = self.index.span(modified_from, hi)
            rows = self.index.rows[a:b]
            wanted = self.status[rows] == (ARCHIVED if archived else ALIVE)
            out = []
            for row in rows[wanted].tolist():
                props = self.properties(row)
                for name in DATES:
                    props[name] = iso_ms_z(int(props[name]))
                out.append({
                    "id": props["hs_object_id"],
                    "properties": props,
                    "lastmodifieddate_ms": int(self.lmd[row]),
                    "archived": archived,
                    "person_id": int(self.person[row]),
                })
            return out


def _base_value(world: World, row: int, prop: str) -> str:
    """One generated property of a base row, without formatting the whole record."""
    c = world.contacts
    if prop == "email":
        ref = int(c.email_ref[row])
        return format_email(world.email(ref), int(c.email_variant[row])) if ref >= 0 else ""
    if prop == "firstname":
        return FIRST_NAMES.strings[c.firstname[row]] if c.firstname[row] >= 0 else ""
    if prop == "lastname":
        return LAST_NAMES.strings[c.lastname[row]] if c.lastname[row] >= 0 else ""
    if prop == "city":
        return CITIES.strings[c.city[row]] if c.city[row] >= 0 else ""
    if prop == "country":
        return COUNTRIES[c.country[row]] if c.country[row] >= 0 else ""
    if prop == "lifecyclestage":
        return LIFECYCLE_STAGES[c.lifecyclestage[row]] if c.lifecyclestage[row] >= 0 else ""
    if prop == "loyalty_tier":
        return LOYALTY_TIERS[c.loyalty_tier[row]] if c.loyalty_tier[row] >= 0 else ""
    return ""


def _int_field(body: dict, name: str, default: int) -> int:
    raw = body.get(name, default)
    if raw in (None, ""):
        return default
    try:
        return int(str(raw))
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {raw!r}") from None


def _batch_envelope(results: list[dict]) -> dict[str, Any]:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return {"status": "COMPLETE", "results": results, "startedAt": stamp, "completedAt": stamp}


def _numeric_mask(values: np.ndarray, f: _Filter) -> np.ndarray:
    op = f.op
    if op == "EQ":
        return values == f.value
    if op == "NEQ":
        return values != f.value
    if op == "LT":
        return values < f.value
    if op == "LTE":
        return values <= f.value
    if op == "GT":
        return values > f.value
    if op == "GTE":
        return values >= f.value
    if op == "BETWEEN":
        return (values >= f.value) & (values <= f.high)
    if op == "IN":
        return np.isin(values, np.asarray(f.values, dtype=np.int64))
    if op == "NOT_IN":
        return ~np.isin(values, np.asarray(f.values, dtype=np.int64))
    if op == "HAS_PROPERTY":
        return np.ones(len(values), bool)
    if op == "NOT_HAS_PROPERTY":
        return np.zeros(len(values), bool)
    if op in ("CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"):
        hit = np.asarray([str(f.value) in str(v) for v in values.tolist()], bool)
        return hit if op == "CONTAINS_TOKEN" else ~hit
    raise ApiError(400, f"operator {op} is not supported")


def _norm(prop: str, value: str) -> str:
    return value.strip().lower() if prop == "email" else value.lower()


def _text_matches(value: str, f: _Filter) -> bool:
    op = f.op
    if op == "HAS_PROPERTY":
        return value != ""
    if op == "NOT_HAS_PROPERTY":
        return value == ""
    v = _norm(f.prop, value)
    if op in ("IN", "NOT_IN"):
        hit = v in {_norm(f.prop, x) for x in f.values}
        return hit if op == "IN" else not hit
    if op in ("CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"):
        pattern = str(f.value).lower()
        tokens = [t for t in re.split(r"[\s@.,;_\-]+", v) if t] + [v]
        hit = any(fnmatch.fnmatchcase(t, pattern) for t in tokens)
        return hit if op == "CONTAINS_TOKEN" else not hit
    target = _norm(f.prop, str(f.value))
    if op == "EQ":
        return v == target
    if op == "NEQ":
        return v != target
    if value == "":
        return False
    if op == "LT":
        return v < target
    if op == "LTE":
        return v <= target
    if op == "GT":
        return v > target
    if op == "GTE":
        return v >= target
    if op == "BETWEEN":
        return target <= v <= _norm(f.prop, str(f.high))
    return False


# -- OAuth and rate limits --------------------------------------------------------------


class HubSpotAuth:
    """Authorization codes, access tokens (TTL in real seconds) and refresh tokens.

    Refresh tokens do not rotate: the refresh grant returns the same refresh token.
    """

    def __init__(self, *, client_id: str, client_secret: str, refresh_token: str,
                 private_app_token: str, token_ttl_seconds: float) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.private_app_token = private_app_token
        self.token_ttl_seconds = token_ttl_seconds
        self._lock = threading.Lock()
        self._codes: dict[str, tuple[str, str, str, float]] = {}
        self._access: dict[str, float] = {}
        self._refresh: set[str] = {refresh_token} if refresh_token else set()
        self.issued = 0

    def authorize(self, client_id: str, redirect_uri: str, scope: str) -> str:
        code = "hs-code-" + secrets.token_urlsafe(16)
        with self._lock:
            self._codes[code] = (client_id, redirect_uri, scope, time.monotonic() + 600)
        return code

    def _issue(self, refresh: str | None) -> dict[str, Any]:
        token = "hs-access-" + secrets.token_urlsafe(24)
        ttl = self.token_ttl_seconds
        with self._lock:
            self._access[token] = time.monotonic() + ttl
            self.issued += 1
        body: dict[str, Any] = {"token_type": "bearer", "access_token": token, "expires_in": int(math.ceil(ttl))}
        if refresh:
            body["refresh_token"] = refresh
        return body

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        grant = form.get("grant_type", "")
        if form.get("client_id") != self.client_id:
            return 400, _oauth_error("BAD_CLIENT_ID", "missing or unknown client_id", "invalid_client")
        if form.get("client_secret") != self.client_secret:
            return 400, _oauth_error("BAD_CLIENT_SECRET", "missing or invalid client_secret", "invalid_client")
        if grant == "authorization_code":
            with self._lock:
                entry = self._codes.pop(form.get("code", ""), None)
            if entry is None or entry[3] < time.monotonic() or entry[0] != form.get("client_id"):
                return 400, _oauth_error("BAD_AUTH_CODE", "missing or unknown auth code", "invalid_grant")
            if entry[1] != form.get("redirect_uri", ""):
                return 400, _oauth_error("BAD_REDIRECT_URI", "redirect_uri does not match the one authorized",
                                         "invalid_grant")
            refresh = "hs-refresh-" + secrets.token_urlsafe(24)
            with self._lock:
                self._refresh.add(refresh)
            return 200, self._issue(refresh)
        if grant == "refresh_token":
            refresh = form.get("refresh_token", "")
            with self._lock:
                known = refresh in self._refresh
            if not known:
                return 400, _oauth_error("BAD_REFRESH_TOKEN", "missing or invalid refresh token", "invalid_grant")
            return 200, self._issue(refresh)
        if grant == "client_credentials":
            return 200, self._issue(None)
        return 400, _oauth_error("BAD_GRANT_TYPE", f"unsupported grant_type {grant!r}", "unsupported_grant_type")

    def check(self, authorization: str | None) -> str | None:
        """None when allowed, else the 401 category."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return "INVALID_AUTHENTICATION"
        token = authorization[7:].strip()
        if self.private_app_token and token == self.private_app_token:
            return None
        with self._lock:
            expires = self._access.get(token)
        if expires is None or expires <= time.monotonic():
            return "EXPIRED_AUTHENTICATION"
        return None

    def expire_all(self) -> None:
        with self._lock:
            self._access.clear()


def _oauth_error(status: str, message: str, error: str) -> dict[str, Any]:
    return {
        "status": status,
        "message": message,
        "correlationId": str(uuid.uuid4()),
        # The RFC 6749 fields too, so standard OAuth clients raise a precise error.
        "error": error,
        "error_description": message,
    }


class RollingLimit:
    """At most `limit` requests in any rolling `interval` seconds (real time)."""

    def __init__(self, limit: int, interval: float) -> None:
        self.limit = limit
        self.interval = interval
        self._times: deque[float] = deque()

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.interval:
            self._times.popleft()

    def wait(self, now: float) -> float:
        """Seconds until a request would fit (0 = fits now)."""
        self._trim(now)
        if len(self._times) < self.limit:
            return 0.0
        return max(0.001, self._times[len(self._times) - self.limit] + self.interval - now)

    def add(self, now: float) -> None:
        self._times.append(now)

    def remaining(self, now: float) -> int:
        self._trim(now)
        return max(0, self.limit - len(self._times))


class HubSpotGate:
    """Auth and rate limits for the API paths (everything but /oauth and /_admin)."""

    def __init__(self, app: Callable, auth: HubSpotAuth, requests_per_10s: int, search_per_second: int) -> None:
        self.app = app
        self.auth = auth
        self.window = RollingLimit(requests_per_10s, 10.0)
        self.secondly = RollingLimit(search_per_second, 1.0)
        self._lock = threading.Lock()
        self.rejected = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path.startswith(("/_admin", "/oauth")):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        category = self.auth.check(headers.get("authorization"))
        is_search = path.rstrip("/").endswith("/search")
        if category is not None:
            response = unauthorized_response(category)
            response.headers.update(self.current_headers(path))
            await response(scope, receive, send)
            return
        now = time.monotonic()
        with self._lock:
            wait_10s = self.window.wait(now)
            wait_1s = self.secondly.wait(now) if is_search else 0.0
            if not wait_10s and not wait_1s:
                self.window.add(now)
                if is_search:
                    self.secondly.add(now)
            rate_headers = self._headers(now, is_search)
        if wait_10s or wait_1s:
            self.rejected += 1
            policy = "TEN_SECONDLY_ROLLING" if wait_10s else "SECONDLY"
            response = rate_limited(policy, wait_10s or wait_1s)
            response.headers.update(rate_headers)
            await response(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [
                    (k.lower().encode(), v.encode()) for k, v in rate_headers.items()
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def current_headers(self, path: str) -> dict[str, str]:
        """The rate-limit headers as they stand, without counting a request."""
        with self._lock:
            return self._headers(time.monotonic(), path.rstrip("/").endswith("/search"))

    def _headers(self, now: float, is_search: bool) -> dict[str, str]:
        headers = {
            "X-HubSpot-RateLimit-Max": str(self.window.limit),
            "X-HubSpot-RateLimit-Remaining": str(self.window.remaining(now)),
            "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
        }
        if is_search:
            headers["X-HubSpot-RateLimit-Secondly"] = str(self.secondly.limit)
            headers["X-HubSpot-RateLimit-Secondly-Remaining"] = str(self.secondly.remaining(now))
        return headers


def unauthorized_response(category: str = "EXPIRED_AUTHENTICATION") -> Response:
    return json_response(
        {
            "status": "error",
            "message": "Authentication credentials not found. This API supports OAuth 2.0 authentication "
                       "and you can find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview",
            "correlationId": str(uuid.uuid4()),
            "category": category,
        },
        401,
    )


def rate_limited(policy: str, wait_seconds: float) -> Response:
    label = "ten_secondly_rolling" if policy == "TEN_SECONDLY_ROLLING" else "secondly"
    return json_response(
        {
            "status": "error",
            "message": f"You have reached your {label} limit.",
            "errorType": "RATE_LIMIT",
            "correlationId": str(uuid.uuid4()),
            "policyName": policy,
        },
        429,
        headers={"Retry-After": str(max(1, int(math.ceil(wait_seconds))))},
    )


# -- the app -----------------------------------------------------------------------------


class _Hooks:
    def __init__(self, state: HubSpotState, auth: HubSpotAuth, gate: HubSpotGate) -> None:
        self.state, self.auth, self.gate = state, auth, gate

    def fault_error(self, status: int, path: str, retry_after: float) -> Response:
        if status == 429:
            policy = "SECONDLY" if path.rstrip("/").endswith("/search") else "TEN_SECONDLY_ROLLING"
            response = rate_limited(policy, retry_after)
        else:
            body = {"status": "error", "correlationId": str(uuid.uuid4())}
            if status == 503:
                body.update(message="Service Unavailable", category="SERVICE_UNAVAILABLE")
                response = json_response(body, 503, headers={"Retry-After": str(max(1, int(math.ceil(retry_after))))})
            else:
                body.update(message="internal error", category="INTERNAL_ERROR")
                response = json_response(body, status)
        if not path.startswith("/oauth"):
            response.headers.update(self.gate.current_headers(path))
        return response

    def unauthorized(self) -> Response:
        response = unauthorized_response("EXPIRED_AUTHENTICATION")
        response.headers.update(self.gate.current_headers("/crm"))
        return response

    def expire_tokens(self) -> None:
        self.auth.expire_all()

    def mutate_during_paging(self, method: str, path: str, query: str, body: bytes, records: int) -> None:
        self.state.mutate_window(body, records)


def _props_param(request: Request) -> list[str]:
    names: list[str] = []
    for raw in request.query_params.getlist("properties"):
        names.extend(n.strip() for n in raw.split(",") if n.strip())
    return names or list(DEFAULT_PROPERTIES)


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "false").lower() == "true"


def _form(raw: bytes, authorization: str | None) -> dict[str, str]:
    form = {k: v[-1] for k, v in parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True).items()}
    if authorization and authorization.lower().startswith("basic ") and "client_id" not in form:
        try:
            user, _, password = base64.b64decode(authorization[6:].strip()).decode().partition(":")
            form.setdefault("client_id", user)
            form.setdefault("client_secret", password)
        except (ValueError, UnicodeDecodeError):
            pass
    return form


def build_hubspot_app(
    state: HubSpotState,
    auth: HubSpotAuth,
    *,
    requests_per_10s: int = 100,
    search_per_second: int = 4,
) -> BuiltApp:
    """The HubSpot sandbox as an ASGI app (stats -> faults -> auth/rate limits -> routes)."""

    def handle(fn: Callable) -> Callable:
        async def endpoint(request: Request) -> Response:
            try:
                return await fn(request)
            except ApiError as exc:
                return json_response(exc.body, exc.status)
            except ValueError as exc:
                return json_response(ApiError(400, f"Invalid input JSON: {exc}").body, 400)

        return endpoint

    async def authorize(request: Request) -> Response:
        q = request.query_params
        client_id, redirect_uri = q.get("client_id", ""), q.get("redirect_uri", "")
        if client_id != auth.client_id:
            return json_response(_oauth_error("BAD_CLIENT_ID", "unknown client_id", "invalid_client"), 400)
        if not redirect_uri.startswith(("http://", "https://")):
            return json_response(_oauth_error("BAD_REDIRECT_URI", "redirect_uri is required", "invalid_request"), 400)
        code = auth.authorize(client_id, redirect_uri, q.get("scope", ""))
        parts = urlsplit(redirect_uri)
        params = {"code": code}
        if q.get("state") is not None:
            params["state"] = q["state"]
        query = (parts.query + "&" if parts.query else "") + urlencode(params)
        return RedirectResponse(urlunsplit(parts._replace(query=query)), status_code=302)

    async def token(request: Request) -> Response:
        form = _form(await request.body(), request.headers.get("authorization"))
        status, body = auth.token(form)
        return json_response(body, status, headers={"Cache-Control": "no-store"})

    async def search(request: Request) -> Response:
        return json_response(state.search(await read_json(request)))

    async def list_contacts(request: Request) -> Response:
        q = request.query_params
        limit = _int_field(dict(q), "limit", 10)
        return json_response(state.list_page(limit, q.get("after"), _props_param(request), _flag(request, "archived")))

    async def get_contact(request: Request) -> Response:
        key = request.path_params["contact_id"]
        id_property = request.query_params.get("idProperty")
        with state.lock:
            row = state.locate(key, id_property, archived=_flag(request, "archived"), follow_merges=True)
            if row is None:
                raise ApiError(404, "resource not found", "OBJECT_NOT_FOUND")
            return json_response(state.render(row, _props_param(request)))

    async def update_contact(request: Request) -> Response:
        key = request.path_params["contact_id"]
        body = await read_json(request)
        payload = {"inputs": [{"id": key, "idProperty": request.query_params.get("idProperty"),
                               "properties": (body or {}).get("properties")}]}
        status, answer = state.batch_update(payload)
        if status != 200:
            raise ApiError(404, "resource not found", "OBJECT_NOT_FOUND")
        return json_response(answer["results"][0])

    async def create_contact(request: Request) -> Response:
        body = await read_json(request)
        status, answer = state.batch_create({"inputs": [{"properties": (body or {}).get("properties")}]})
        return json_response(answer["results"][0], 201)

    async def delete_contact(request: Request) -> Response:
        state.archive(request.path_params["contact_id"], request.query_params.get("idProperty"))
        return Response(status_code=204)

    def batch(kind: str) -> Callable:
        async def run(request: Request) -> Response:
            body = await read_json(request)
            if kind == "read":
                status, answer = state.batch_read(body, _flag(request, "archived"))
            else:
                status, answer = getattr(state, f"batch_{kind}")(body)
            return json_response(answer, status)

        return run

    async def batch_archive(request: Request) -> Response:
        body = await read_json(request)
        inputs = state._check_batch(body)
        for item in inputs:
            try:
                state.archive(item.get("id") if isinstance(item, dict) else None)
            except ApiError:
                pass
        return Response(status_code=204)

    async def gdpr_delete(request: Request) -> Response:
        state.gdpr_delete(await read_json(request))
        return Response(status_code=204)

    async def admin_contacts(request: Request) -> Response:
        q = request.query_params
        try:
            lo = int(q["modified_from"]) if q.get("modified_from") else None
            hi = int(q["modified_to"]) if q.get("modified_to") else None
        except ValueError:
            raise ApiError(400, "modified_from and modified_to are epoch milliseconds") from None
        results = state.ground_truth(lo, hi, archived=_flag(request, "archived"))
        return json_response({"total": len(results), "results": results})

    async def merge(request: Request) -> Response:
        return json_response(state.merge(await read_json(request)))

    async def admin_merge(request: Request) -> Response:
        """Sandbox-only: `{"count": n}` merges n duplicate pairs; or name the pair with
        `primaryObjectId` and `objectIdToMerge` (as the API does, without auth or limits)."""
        raw = await request.body()
        body = await read_json(request) if raw.strip() else {}
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be an object")
        if body.get("primaryObjectId") not in (None, "") or body.get("objectIdToMerge") not in (None, ""):
            merged = state.merge(body)
            return json_response({"merged": [{"primary": merged["id"], "merged": str(body["objectIdToMerge"])}],
                                  "lastmodifieddate": merged["properties"]["lastmodifieddate"]})
        count = body.get("count", 1)
        if not isinstance(count, int) or count < 0:
            raise ApiError(400, "count must be a non-negative integer")
        done = state.merge_duplicates(count)
        return json_response({"merged": done, "lastmodifieddate": iso_ms_z(state.now()) if done else None})

    async def admin_mutate(request: Request) -> Response:
        raw = await request.body()
        body = await read_json(request) if raw.strip() else {}
        count = body.get("count", 1) if isinstance(body, dict) else 1
        if not isinstance(count, int) or count < 0:
            raise ApiError(400, "count must be a non-negative integer")
        ids = state.mutate(count)
        return json_response({"mutated": ids, "lastmodifieddate": iso_ms_z(state.now()) if ids else None})

    async def admin_reset(request: Request) -> Response:
        state.reset()
        injector.clear()
        return json_response({"reset": True, "contacts": int(len(state.ids))})

    async def admin_tokens(request: Request) -> Response:
        return json_response({"issued_access_tokens": auth.issued, "token_ttl_seconds": auth.token_ttl_seconds,
                              "rate_limited_responses": gate_box["gate"].rejected if gate_box else 0})

    base = "/crm/v3/objects/contacts"
    injector = FaultInjector()
    stats_box: dict[str, RequestStats] = {}
    gate_box: dict[str, HubSpotGate] = {}
    routes = [
        Route("/oauth/authorize", handle(authorize), methods=["GET"]),
        Route("/oauth/v1/token", handle(token), methods=["POST"]),
        Route(f"{base}/search", handle(search), methods=["POST"]),
        Route(f"{base}/batch/read", handle(batch("read")), methods=["POST"]),
        Route(f"{base}/batch/update", handle(batch("update")), methods=["POST"]),
        Route(f"{base}/batch/create", handle(batch("create")), methods=["POST"]),
        Route(f"{base}/batch/upsert", handle(batch("upsert")), methods=["POST"]),
        Route(f"{base}/batch/archive", handle(batch_archive), methods=["POST"]),
        Route(f"{base}/gdpr-delete", handle(gdpr_delete), methods=["POST"]),
        Route(f"{base}/merge", handle(merge), methods=["POST"]),
        Route(base, handle(list_contacts), methods=["GET"]),
        Route(base, handle(create_contact), methods=["POST"]),
        Route(base + "/{contact_id}", handle(get_contact), methods=["GET"]),
        Route(base + "/{contact_id}", handle(update_contact), methods=["PATCH"]),
        Route(base + "/{contact_id}", handle(delete_contact), methods=["DELETE"]),
        Route("/_admin/contacts", handle(admin_contacts), methods=["GET"]),
        Route("/_admin/mutate", handle(admin_mutate), methods=["POST"]),
        Route("/_admin/merge", handle(admin_merge), methods=["POST"]),
        Route("/_admin/reset", handle(admin_reset), methods=["POST"]),
        Route("/_admin/auth", handle(admin_tokens), methods=["GET"]),
        *admin_routes(injector, stats_box),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "resource not found" if status == 404 else "method not allowed"
        return json_response(ApiError(status, message, "OBJECT_NOT_FOUND" if status == 404 else "VALIDATION_ERROR").body,
                             status)

    async def server_error(request: Request, exc: Exception) -> Response:
        return json_response(ApiError(500, "internal error", "INTERNAL_ERROR").body, 500)

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, 500: server_error})
    gate = HubSpotGate(app, auth, requests_per_10s, search_per_second)
    gate_box["gate"] = gate
    faulted = FaultMiddleware(gate, injector, _Hooks(state, auth, gate))
    stats = RequestStats(faulted)
    stats_box["stats"] = stats
    return BuiltApp(asgi=stats, stats=stats, faults=injector, extras={"gate": gate})
