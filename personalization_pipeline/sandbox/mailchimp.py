"""A Mailchimp-compatible ESP on loopback: Marketing API v3 (one list) plus OAuth 2.0.

Shapes follow VENDOR-APIS.md. What the sandbox decides where Mailchimp's docs are vague:

- `since_last_changed` is inclusive (last_changed >= since) and `before_last_changed`
  exclusive (last_changed < before), so consecutive windows [a, b), [b, c) never overlap
  and never leave a gap. The same holds for `since_timestamp_opt` / `before_timestamp_opt`
  and for `since` on email activity (timestamp >= since).
- The default order of the members list is stable: last_changed ascending, then the order
  in which members were added. `sort_field`/`sort_dir` change it; ties keep that order.
- Archived members are left out of the members list unless `status=archived`;
  permanently deleted members are gone everywhere (and cannot be re-imported).
- Merge-field tags in writes are matched case-insensitively; a tag the list does not
  define is an error naming the tag; values are checked against the field's type.
- Batch subscribe/update (`POST /lists/{id}`) creates unknown addresses with
  `status_if_new`, else `status`, else "subscribed", as Mailchimp does. Any update of a
  member sets its `last_changed` to now (the echo the pipeline must ignore).
- `count` above 1,000 is a 400. The email-activity report lists recipients that have at
  least one activity in range.
- Authorization for /3.0: `Bearer <OAuth token | API key>`, `OAuth <token>`,
  `apikey <key>` or HTTP Basic with any user and the token or key as password.
- At most `max_connections` requests in flight per account; the next one gets 429.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import threading
import uuid
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from personalization_pipeline.sandbox.data import (
    ACTIVITY_ACTIONS,
    CITIES,
    CITY_COUNTRY,
    CITY_LATITUDE,
    CITY_LONGITUDE,
    CITY_TIMEZONE,
    COUNTRIES,
    FIRST_NAMES,
    LAST_NAMES,
    MEMBER_STATUSES,
    SortedIndex,
    World,
    iso_offset,
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
DELETED = -1
ARCHIVED = MEMBER_STATUSES.index("archived")
MAX_COUNT = 1000
MAX_BATCH = 500
MERGE_TYPES = ("text", "number", "address", "phone", "date", "url", "imageurl", "radio", "dropdown", "birthday", "zip")
TAG_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,9}$")
EMAIL_RE = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}$")
ERROR_DOCS = "https://mailchimp.com/developer/marketing/docs/errors/"


class ProblemError(Exception):
    """An error answer in Mailchimp's problem-detail shape."""

    def __init__(self, status: int, title: str, detail: str, errors: list | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.body: dict[str, Any] = {
            "type": ERROR_DOCS,
            "title": title,
            "status": status,
            "detail": detail,
            "instance": str(uuid.uuid4()),
        }
        if errors is not None:
            self.body["errors"] = errors


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None,
            instance: str | None = None) -> Response:
    body = ProblemError(status, title, detail).body
    if instance is not None:
        body["instance"] = instance
    return json_response(body, status, headers=headers, media_type="application/problem+json")


def subscriber_hash(email: str) -> str:
    return hashlib.md5(email.strip().lower().encode("utf-8")).hexdigest()


def parse_iso_ms(value: str, name: str) -> int:
    text = value.strip()
    try:
        if re.fullmatch(r"\d+", text):
            return int(text)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "+", 1) if "T" in text and " " in text
                                        else text.replace("Z", "+00:00"))
    except ValueError:
        raise ProblemError(400, "Invalid Resource", f"{name} must be an ISO 8601 time, got {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def _seconds(ms: int) -> int:
    return ms // 1000 * 1000


class MailchimpState:
    """The list's members (the world's columns plus sparse edits), merge fields,
    campaigns and activity, and the log of pushes, under one lock."""

    def __init__(self, world: World, clock: Clock, *, list_id: str = "5f1a3c9e2b") -> None:
        self.world = world
        self.clock = clock
        self.list_id = list_id
        self.lock = threading.RLock()
        hashes = world.member_hashes
        prefixes = np.asarray([int(h[:16], 16) for h in hashes], dtype=np.uint64)
        self._prefix_order = np.argsort(prefixes, kind="stable")
        self._prefix_sorted = prefixes[self._prefix_order]
        act = world.activity
        self._act_by_member = np.lexsort((act.timestamp, act.member))
        self._act_member_sorted = act.member[self._act_by_member]
        self._campaign_bounds = np.searchsorted(act.campaign, np.arange(len(world.campaigns) + 1))
        self._report = self._summaries()
        self.reset()

    def reset(self) -> None:
        m = self.world.members
        with self.lock:
            self.n_base = len(m)
            self.status = m.status.astype(np.int8).copy()
            self.last_changed = m.last_changed.astype(np.int64).copy()
            self.timestamp_opt = m.timestamp_opt.astype(np.int64).copy()
            self.timestamp_signup = m.timestamp_signup.astype(np.int64).copy()
            self.person = m.person.astype(np.int32).copy()
            self.index = SortedIndex(self.last_changed)
            self.extra_email: dict[int, str] = {}
            self.extra_hash: dict[str, int] = {}
            self.merge_values: dict[int, dict[str, Any]] = {}
            self.location_override: dict[int, int] = {}
            self.deleted_hashes: set[str] = set()
            self.merge_fields: list[dict[str, Any]] = []
            for tag, name, kind in (("FNAME", "First Name", "text"), ("LNAME", "Last Name", "text"),
                                    ("ADDRESS", "Address", "address"), ("PHONE", "Phone Number", "phone")):
                self._add_merge_field(tag, name, kind)
            self.pushes: list[dict[str, Any]] = []
            self.rng = np.random.default_rng([self.world.seed, 202])
            self.next_web_id = int(m.web_id[-1]) + 1 if len(m) else 100_000_001

    def now(self) -> int:
        moment = self.clock()
        if moment.tzinfo is None:
            raise ValueError("the sandbox clock must return timezone-aware datetimes")
        return _seconds(int(moment.timestamp() * 1000))

    # -- members --------------------------------------------------------------------------

    def email(self, row: int) -> str:
        return self.extra_email[row] if row >= self.n_base else self.world.member_email(row)

    def hash(self, row: int) -> str:
        return self.world.member_hashes[row] if row < self.n_base else subscriber_hash(self.extra_email[row])

    def row_of_hash(self, member_hash: str) -> int | None:
        h = member_hash.strip().lower()
        if "@" in h:
            h = subscriber_hash(h)
        if h in self.extra_hash:
            row = self.extra_hash[h]
        else:
            if not re.fullmatch(r"[0-9a-f]{32}", h):
                return None
            prefix = np.uint64(int(h[:16], 16))
            a = int(np.searchsorted(self._prefix_sorted, prefix, "left"))
            b = int(np.searchsorted(self._prefix_sorted, prefix, "right"))
            row = next((int(r) for r in self._prefix_order[a:b] if self.world.member_hashes[int(r)] == h), None)
            if row is None:
                return None
        return row if self.status[row] != DELETED else None

    def merge_of(self, row: int) -> dict[str, Any]:
        values: dict[str, Any] = {f["tag"]: "" for f in self.merge_fields}
        if row < self.n_base:
            m = self.world.members
            values["FNAME"] = FIRST_NAMES.strings[m.fname[row]] if m.fname[row] >= 0 else ""
            values["LNAME"] = LAST_NAMES.strings[m.lname[row]] if m.lname[row] >= 0 else ""
        values.update(self.merge_values.get(row, {}))
        return values

    def render(self, row: int) -> dict[str, Any]:
        return self.render_many([row])[0]

    def render_many(self, rows: Any) -> list[dict[str, Any]]:
        """Members in Mailchimp's shape; columns are gathered once per page."""
        rows_arr = np.asarray(rows, dtype=np.int64)
        if len(rows_arr) == 0:
            return []
        m = self.world.members
        base = np.minimum(rows_arr, max(self.n_base - 1, 0))
        is_base = rows_arr < self.n_base
        tags = [f["tag"] for f in self.merge_fields]
        fname = np.where(is_base, m.fname[base], -1).tolist() if self.n_base else [-1] * len(rows_arr)
        lname = np.where(is_base, m.lname[base], -1).tolist() if self.n_base else [-1] * len(rows_arr)
        city = np.where(is_base, m.location_city[base], -1).tolist() if self.n_base else [-1] * len(rows_arr)
        open_rate = np.round(m.avg_open_rate[base].astype(float), 2).tolist() if self.n_base else [0.0] * len(rows_arr)
        click_rate = np.round(m.avg_click_rate[base].astype(float), 2).tolist() if self.n_base else [0.0] * len(rows_arr)
        rating = m.member_rating[base].tolist() if self.n_base else [2] * len(rows_arr)
        web_id = m.web_id[base].tolist() if self.n_base else [0] * len(rows_arr)
        status = self.status[rows_arr].tolist()
        signup = self.timestamp_signup[rows_arr].tolist()
        opt = self.timestamp_opt[rows_arr].tolist()
        changed = self.last_changed[rows_arr].tolist()
        out = []
        for k, row in enumerate(rows_arr.tolist()):
            base_row = row < self.n_base
            h = self.hash(row)
            merge = dict.fromkeys(tags, "")
            if base_row:
                merge["FNAME"] = FIRST_NAMES.strings[fname[k]] if fname[k] >= 0 else ""
                merge["LNAME"] = LAST_NAMES.strings[lname[k]] if lname[k] >= 0 else ""
            merge.update(self.merge_values.get(row, ()))
            where = self.location_override.get(row, city[k])
            if where >= 0:
                location = {"latitude": float(CITY_LATITUDE[where]), "longitude": float(CITY_LONGITUDE[where]),
                            "gmtoff": 0, "dstoff": 0, "country_code": COUNTRIES[CITY_COUNTRY[where]],
                            "timezone": CITY_TIMEZONE[where], "region": ""}
            else:
                location = {"latitude": 0, "longitude": 0, "gmtoff": 0, "dstoff": 0, "country_code": "",
                            "timezone": "", "region": ""}
            if base_row:
                stats = {"avg_open_rate": open_rate[k], "avg_click_rate": click_rate[k]}
                member_rating, member_web_id = rating[k], web_id[k]
            else:
                stats, member_rating, member_web_id = {"avg_open_rate": 0, "avg_click_rate": 0}, 2, 100_000_000 + row
            full_name = " ".join(str(v) for v in (merge.get("FNAME"), merge.get("LNAME")) if v)
            out.append({
                "id": h,
                "email_address": self.email(row),
                "unique_email_id": hashlib.md5(f"uid:{h}".encode()).hexdigest()[:10],
                "contact_id": hashlib.md5(f"cid:{h}".encode()).hexdigest(),
                "full_name": full_name,
                "web_id": member_web_id,
                "email_type": "html",
                "status": MEMBER_STATUSES[status[k]],
                "consents_to_one_to_one_messaging": True,
                "merge_fields": merge,
                "stats": stats,
                "ip_signup": "",
                "timestamp_signup": iso_offset(signup[k]) if signup[k] else "",
                "ip_opt": "",
                "timestamp_opt": iso_offset(opt[k]) if opt[k] else "",
                "member_rating": member_rating,
                "last_changed": iso_offset(changed[k]),
                "language": "",
                "vip": False,
                "email_client": "",
                "location": location,
                "source": "Import" if base_row else "API - Generic",
                "tags_count": 0,
                "tags": [],
                "list_id": self.list_id,
            })
        return out

    def list_members(self, params: dict[str, str]) -> dict[str, Any]:
        count = _int_param(params, "count", 10)
        offset = _int_param(params, "offset", 0)
        if count < 0 or count > MAX_COUNT:
            raise ProblemError(400, "Invalid Resource", f"count must be between 0 and {MAX_COUNT}, got {count}")
        if offset < 0:
            raise ProblemError(400, "Invalid Resource", f"offset must be non-negative, got {offset}")
        status = params.get("status")
        if status is not None and status not in MEMBER_STATUSES:
            raise ProblemError(400, "Invalid Resource", f"status must be one of {', '.join(MEMBER_STATUSES)}")
        sort_field = params.get("sort_field") or "last_changed"
        if sort_field not in ("last_changed", "timestamp_opt", "timestamp_signup"):
            raise ProblemError(400, "Invalid Resource",
                               "sort_field must be one of last_changed, timestamp_opt, timestamp_signup")
        sort_dir = (params.get("sort_dir") or "ASC").upper()
        if sort_dir not in ("ASC", "DESC"):
            raise ProblemError(400, "Invalid Resource", "sort_dir must be ASC or DESC")
        lo = parse_iso_ms(params["since_last_changed"], "since_last_changed") if params.get("since_last_changed") else None
        hi = (parse_iso_ms(params["before_last_changed"], "before_last_changed") - 1
              if params.get("before_last_changed") else None)
        with self.lock:
            a, b = self.index.span(lo, hi)
            rows = self.index.rows[a:b]
            st = self.status[rows]
            if status is not None:
                mask = st == MEMBER_STATUSES.index(status)
            else:
                mask = (st != DELETED) & (st != ARCHIVED)
            for name, column, op in (("since_timestamp_opt", self.timestamp_opt, "ge"),
                                     ("before_timestamp_opt", self.timestamp_opt, "lt")):
                if params.get(name):
                    bound = parse_iso_ms(params[name], name)
                    mask &= (column[rows] >= bound) if op == "ge" else (column[rows] < bound)
            positions = np.flatnonzero(mask)
            total = len(positions)
            if sort_field == "last_changed":
                ordered = positions[::-1] if sort_dir == "DESC" else positions
                page = rows[ordered[offset : offset + count]]
            else:
                selected = rows[positions]
                column = self.timestamp_opt if sort_field == "timestamp_opt" else self.timestamp_signup
                order = np.lexsort((selected, column[selected]))
                if sort_dir == "DESC":
                    order = order[::-1]
                page = selected[order[offset : offset + count]]
            members = self.render_many(page)
        return {"members": members, "list_id": self.list_id, "total_items": int(total), "_links": []}

    # -- merge fields -----------------------------------------------------------------------

    def _add_merge_field(self, tag: str, name: str, kind: str, **extra: Any) -> dict[str, Any]:
        field = {
            "merge_id": len(self.merge_fields) + 1 if not self.merge_fields else max(f["merge_id"] for f in self.merge_fields) + 1,
            "tag": tag,
            "name": name,
            "type": kind,
            "required": False,
            "default_value": extra.get("default_value", ""),
            "public": bool(extra.get("public", False)),
            "display_order": len(self.merge_fields) + 2,
            "options": extra.get("options") or ({"default_country": 164} if kind == "address" else {}),
            "help_text": extra.get("help_text", ""),
            "list_id": self.list_id,
            "_links": [],
        }
        self.merge_fields.append(field)
        return field

    def create_merge_field(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ProblemError(400, "Invalid Resource", "The resource submitted could not be validated.")
        name, kind = body.get("name"), body.get("type")
        errors = []
        if not isinstance(name, str) or not name.strip():
            errors.append({"field": "name", "message": "This value should not be blank."})
        if kind not in MERGE_TYPES:
            errors.append({"field": "type", "message": f"Value must be one of: {', '.join(MERGE_TYPES)}"})
        tag = body.get("tag")
        with self.lock:
            if tag in (None, ""):
                tag = f"MMERGE{len(self.merge_fields) + 1}"
            elif not isinstance(tag, str) or not TAG_RE.match(tag.upper()):
                errors.append({"field": "tag", "message": "The tag must be 1 to 10 letters, digits or underscores, "
                                                          "starting with a letter."})
            if errors:
                raise ProblemError(400, "Invalid Resource", "The resource submitted could not be validated. "
                                   "For field-specific details, see the 'errors' array.", errors)
            tag = tag.upper()
            if any(f["tag"] == tag for f in self.merge_fields):
                raise ProblemError(400, "Invalid Resource", f'A Merge Field with the tag "{tag}" already exists for this list.')
            return self._add_merge_field(tag, name.strip(), kind, **{k: body[k] for k in
                                                                    ("default_value", "public", "options", "help_text")
                                                                    if k in body})

    def _check_merge(self, merge: Any) -> tuple[dict[str, Any], tuple[str, str] | None]:
        """Clean merge values, or the first (field, message) error."""
        if merge in (None, ""):
            return {}, None
        if not isinstance(merge, dict):
            return {}, ("merge_fields", "merge_fields must be an object of TAG -> value")
        by_tag = {f["tag"]: f for f in self.merge_fields}
        clean: dict[str, Any] = {}
        for key, value in merge.items():
            tag = str(key).upper()
            field = by_tag.get(tag)
            if field is None:
                return {}, (str(key), f"Merge field {key} is not defined on this list; create it first.")
            kind = field["type"]
            if value is None or value == "":
                clean[tag] = ""
            elif kind == "number":
                if isinstance(value, bool):
                    return {}, (tag, "Please enter a number")
                if isinstance(value, (int, float)):
                    clean[tag] = value
                else:
                    try:
                        number = float(str(value).strip())
                    except ValueError:
                        return {}, (tag, "Please enter a number")
                    clean[tag] = int(number) if number.is_integer() else number
            elif kind in ("date", "birthday"):
                text = str(value).strip()
                if not (re.fullmatch(r"\d{4}-\d{2}-\d{2}([T ].*)?", text) or re.fullmatch(r"\d{2}/\d{2}(/\d{4})?", text)):
                    return {}, (tag, "Please enter the date")
                clean[tag] = text[:10] if kind == "date" and "-" in text else text
            elif kind == "address":
                if not isinstance(value, dict):
                    return {}, (tag, "Please enter a complete address")
                clean[tag] = value
            else:
                if isinstance(value, (dict, list)):
                    return {}, (tag, "Please enter a text value")
                clean[tag] = value if isinstance(value, str) else str(value)
        return clean, None

    # -- writes -------------------------------------------------------------------------------

    def _touch(self, rows: list[int], stamp: int) -> None:
        arr = np.unique(np.asarray(rows, dtype=np.int64))
        if len(arr) == 0:
            return
        old = self.last_changed[arr].copy()
        self.last_changed[arr] = stamp
        self.index.move(arr, old, np.full(len(arr), stamp, np.int64))

    def _create(self, email: str, status: str, merge: dict[str, Any], stamp: int) -> int:
        row = len(self.status)
        self.status = np.append(self.status, np.int8(MEMBER_STATUSES.index(status)))
        self.last_changed = np.append(self.last_changed, stamp)
        self.timestamp_opt = np.append(self.timestamp_opt, stamp if status == "subscribed" else 0)
        self.timestamp_signup = np.append(self.timestamp_signup, 0)
        self.person = np.append(self.person, np.int32(-1))
        self.extra_email[row] = email
        self.extra_hash[subscriber_hash(email)] = row
        if merge:
            self.merge_values[row] = dict(merge)
        self.index.insert(np.asarray([row]), np.asarray([stamp]))
        return row

    def _update(self, row: int, merge: dict[str, Any], status: str | None) -> None:
        if merge:
            self.merge_values.setdefault(row, {}).update(merge)
        if status is not None:
            code = MEMBER_STATUSES.index(status)
            if code == 0 and self.status[row] != 0:
                self.timestamp_opt[row] = self.now()
            self.status[row] = code

    def batch_subscribe(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("members"), list):
            raise ProblemError(400, "Invalid Resource", 'The body must be {"members": [...], "update_existing": true}')
        members = body["members"]
        if len(members) > MAX_BATCH:
            raise ProblemError(400, "Invalid Resource",
                               f"You may only submit up to {MAX_BATCH} members per batch; got {len(members)}.")
        update_existing = bool(body.get("update_existing", False))
        with self.lock:
            stamp = self.now()
            new_members, updated_members, errors = [], [], []
            touched: list[int] = []
            for item in members:
                if not isinstance(item, dict):
                    errors.append(_member_error("", "Each member must be an object", "email_address"))
                    continue
                email = str(item.get("email_address") or "").strip()
                if not EMAIL_RE.match(email):
                    errors.append(_member_error(
                        email, f"{email or 'An empty address'} looks fake or invalid, please enter a real email address.",
                        "email_address", "Please provide a valid email address."))
                    continue
                h = subscriber_hash(email)
                if h in self.deleted_hashes:
                    errors.append(_member_error(
                        email, f"{email} was permanently deleted and cannot be re-imported. The contact must "
                               "re-subscribe to get back on the list.", "email_address"))
                    continue
                merge, problem_field = self._check_merge(item.get("merge_fields"))
                if problem_field:
                    errors.append(_member_error(email, f"Your merge fields were invalid. {problem_field[1]}",
                                                problem_field[0], problem_field[1]))
                    continue
                status, status_if_new = item.get("status"), item.get("status_if_new")
                bad = next((s for s in (status, status_if_new) if s is not None and s not in MEMBER_STATUSES), None)
                if bad is not None:
                    errors.append(_member_error(email, f"Invalid status {bad!r}", "status",
                                                f"Value must be one of: {', '.join(MEMBER_STATUSES)}"))
                    continue
                row = self.row_of_hash(h)
                if row is None:
                    row = self._create(email, status_if_new or status or "subscribed", merge, stamp)
                    new_members.append(row)
                elif not update_existing:
                    errors.append(_member_error(
                        email, f"{email} is already a list member. Use PUT to insert or update list members.",
                        "email_address", code="ERROR_CONTACT_EXISTS"))
                    continue
                else:
                    self._update(row, merge, status)
                    touched.append(row)
                    updated_members.append(row)
            self._touch(touched, stamp)
            answer = {
                "new_members": self.render_many(new_members),
                "updated_members": self.render_many(updated_members),
                "errors": errors,
                "total_created": len(new_members),
                "total_updated": len(updated_members),
                "error_count": len(errors),
                "_links": [],
            }
            self._record_push("batch", members, stamp, answer, update_existing=update_existing)
            return answer

    def put_member(self, member_hash: str, body: Any, *, patch: bool) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ProblemError(400, "Invalid Resource", "The resource submitted could not be validated.")
        with self.lock:
            row = self.row_of_hash(member_hash)
            email = str(body.get("email_address") or "").strip()
            if email and subscriber_hash(email) != member_hash.strip().lower():
                raise ProblemError(400, "Invalid Resource",
                                   "The email address does not match the subscriber hash in the URL.")
            merge, problem_field = self._check_merge(body.get("merge_fields"))
            if problem_field:
                raise ProblemError(400, "Invalid Resource", f"Your merge fields were invalid. {problem_field[1]}",
                                   [{"field": problem_field[0], "message": problem_field[1]}])
            status, status_if_new = body.get("status"), body.get("status_if_new")
            for s in (status, status_if_new):
                if s is not None and s not in MEMBER_STATUSES:
                    raise ProblemError(400, "Invalid Resource", f"Invalid status {s!r}")
            stamp = self.now()
            if row is None:
                if patch:
                    raise ProblemError(404, "Resource Not Found", "The requested resource could not be found.")
                if not email:
                    raise ProblemError(400, "Invalid Resource", "email_address is required to add a member.")
                if subscriber_hash(email) in self.deleted_hashes:
                    raise ProblemError(400, "Forgotten Email Not Subscribed",
                                       f"{email} was permanently deleted and cannot be re-imported.")
                if not EMAIL_RE.match(email):
                    raise ProblemError(400, "Invalid Resource",
                                       f"{email} looks fake or invalid, please enter a real email address.")
                row = self._create(email, status_if_new or status or "subscribed", merge, stamp)
                result = {"total_created": 1, "total_updated": 0, "error_count": 0}
            else:
                self._update(row, merge, status)
                self._touch([row], stamp)
                result = {"total_created": 0, "total_updated": 1, "error_count": 0}
            self._record_push("patch" if patch else "put", [body], stamp, result)
            return self.render(row)

    def archive(self, member_hash: str) -> None:
        with self.lock:
            row = self.row_of_hash(member_hash)
            if row is None:
                raise ProblemError(404, "Resource Not Found", "The requested resource could not be found.")
            self.status[row] = ARCHIVED
            self._touch([row], self.now())

    def delete_permanent(self, member_hash: str) -> None:
        with self.lock:
            row = self.row_of_hash(member_hash)
            if row is None:
                raise ProblemError(404, "Resource Not Found", "The requested resource could not be found.")
            self.deleted_hashes.add(self.hash(row))
            self.status[row] = DELETED
            self.merge_values.pop(row, None)
            self.index.remove(np.asarray([row]), self.last_changed[[row]])

    def _record_push(self, kind: str, members: list, stamp: int, result: dict[str, Any], **extra: Any) -> None:
        self.pushes.append({
            "at": iso_offset(stamp),
            "at_ms": stamp,
            "kind": kind,
            "list_id": self.list_id,
            "members": [
                {k: m.get(k) for k in ("email_address", "merge_fields", "status", "status_if_new") if k in m}
                if isinstance(m, dict) else m
                for m in members
            ],
            "result": {k: result[k] for k in ("total_created", "total_updated", "error_count")},
            **extra,
        })

    # -- engagement ---------------------------------------------------------------------------

    def _summaries(self) -> list[dict[str, Any]]:
        act = self.world.activity
        out = []
        for c, campaign in enumerate(self.world.campaigns):
            a, b = np.searchsorted(act.campaign, [c, c + 1])
            actions, members = act.action[a:b], act.member[a:b]
            opens = int((actions == 0).sum())
            unique_opens = len(np.unique(members[actions == 0]))
            clicks = int((actions == 1).sum())
            clickers = len(np.unique(members[actions == 1]))
            sent = max(1, campaign["emails_sent"])
            out.append({
                "opens": opens, "unique_opens": unique_opens, "open_rate": round(unique_opens / sent, 4),
                "clicks": clicks, "subscriber_clicks": clickers, "click_rate": round(clickers / sent, 4),
            })
        return out

    def campaign_json(self, c: int) -> dict[str, Any]:
        campaign = self.world.campaigns[c]
        return {
            "id": campaign["id"],
            "web_id": campaign["web_id"],
            "type": "regular",
            "create_time": iso_offset(campaign["create_time"]),
            "archive_url": f"https://mailchi.mp/sandbox/{campaign['id']}",
            "status": "sent",
            "emails_sent": campaign["emails_sent"],
            "send_time": iso_offset(campaign["send_time"]),
            "content_type": "template",
            "recipients": {"list_id": self.list_id, "list_is_active": True, "list_name": "Sandbox Audience",
                           "segment_text": "", "recipient_count": campaign["emails_sent"]},
            "settings": {"subject_line": campaign["subject_line"], "title": campaign["title"],
                         "from_name": "Sandbox Outfitters", "reply_to": "hello@shop.example.com"},
            "report_summary": self._report[c],
        }

    def campaign_index(self, campaign_id: str) -> int:
        for c, campaign in enumerate(self.world.campaigns):
            if campaign["id"] == campaign_id:
                return c
        raise ProblemError(404, "Resource Not Found", "The requested resource could not be found.")

    def list_campaigns(self, params: dict[str, str]) -> dict[str, Any]:
        count, offset = _int_param(params, "count", 10), _int_param(params, "offset", 0)
        if count < 0 or count > MAX_COUNT or offset < 0:
            raise ProblemError(400, "Invalid Resource", f"count must be 0..{MAX_COUNT} and offset non-negative")
        since = parse_iso_ms(params["since_send_time"], "since_send_time") if params.get("since_send_time") else None
        before = parse_iso_ms(params["before_send_time"], "before_send_time") if params.get("before_send_time") else None
        chosen = [
            c for c, campaign in enumerate(self.world.campaigns)
            if (since is None or campaign["send_time"] >= since) and (before is None or campaign["send_time"] < before)
        ]
        chosen.sort(key=lambda c: self.world.campaigns[c]["send_time"])
        if (params.get("sort_dir") or "ASC").upper() == "DESC":
            chosen.reverse()
        return {"campaigns": [self.campaign_json(c) for c in chosen[offset : offset + count]],
                "total_items": len(chosen), "_links": []}

    def _activity_json(self, i: int, with_campaign: bool = False) -> dict[str, Any]:
        act = self.world.activity
        action = ACTIVITY_ACTIONS[act.action[i]]
        event: dict[str, Any] = {"action": action, "timestamp": iso_offset(int(act.timestamp[i])), "ip": ""}
        if action == "click" and act.url[i] >= 0:
            event["url"] = self.world.products[int(act.url[i])]["url"]
        if action == "bounce":
            event["type"] = "hard"
        if with_campaign:
            campaign = self.world.campaigns[int(act.campaign[i])]
            event.update(campaign_id=campaign["id"], title=campaign["title"], type=event.get("type", "regular"))
        return event

    def email_activity(self, campaign_id: str, params: dict[str, str]) -> dict[str, Any]:
        c = self.campaign_index(campaign_id)
        count, offset = _int_param(params, "count", 10), _int_param(params, "offset", 0)
        if count < 0 or count > MAX_COUNT or offset < 0:
            raise ProblemError(400, "Invalid Resource", f"count must be 0..{MAX_COUNT} and offset non-negative")
        since = parse_iso_ms(params["since"], "since") if params.get("since") else None
        act = self.world.activity
        with self.lock:
            a, b = int(self._campaign_bounds[c]), int(self._campaign_bounds[c + 1])
            members = act.member[a:b]
            mask = self.status[members] != DELETED
            if since is not None:
                mask &= act.timestamp[a:b] >= since
            rows = a + np.flatnonzero(mask)
            who = act.member[rows]
            starts = np.flatnonzero(np.r_[True, who[1:] != who[:-1]]) if len(who) else np.zeros(0, np.int64)
            ends = np.r_[starts[1:], len(who)].astype(np.int64) if len(who) else np.zeros(0, np.int64)
            emails = []
            for s, e in zip(starts[offset : offset + count].tolist(), ends[offset : offset + count].tolist()):
                member = int(who[s])
                emails.append({
                    "campaign_id": campaign_id,
                    "list_id": self.list_id,
                    "list_is_active": True,
                    "email_id": self.hash(member),
                    "email_address": self.email(member),
                    "activity": [self._activity_json(int(i)) for i in rows[s:e]],
                })
        return {"emails": emails, "campaign_id": campaign_id, "total_items": int(len(starts)), "_links": []}

    def member_activity(self, member_hash: str) -> dict[str, Any]:
        with self.lock:
            row = self.row_of_hash(member_hash)
            if row is None:
                raise ProblemError(404, "Resource Not Found", "The requested resource could not be found.")
            a = int(np.searchsorted(self._act_member_sorted, row, "left"))
            b = int(np.searchsorted(self._act_member_sorted, row, "right"))
            events = self._act_by_member[a:b][::-1][:50]
            return {
                "activity": [self._activity_json(int(i), with_campaign=True) for i in events],
                "email_id": self.hash(row),
                "list_id": self.list_id,
                "total_items": int(min(50, b - a)),
                "_links": [],
            }

    # -- sandbox-only -------------------------------------------------------------------------

    def mutate(self, count: int, rows: np.ndarray | None = None) -> list[str]:
        """Edit `count` random members as subscribers do: change status, name or
        location; all get one new last_changed."""
        with self.lock:
            if rows is None:
                live = np.flatnonzero((self.status != DELETED) & (self.status != ARCHIVED))
                if len(live) == 0 or count <= 0:
                    return []
                rows = self.rng.choice(live, min(count, len(live)), replace=False)
            rows = np.asarray(rows, dtype=np.int64)
            for row in rows.tolist():
                kind = self.rng.choice(3, p=[0.4, 0.3, 0.3])
                if kind == 0:
                    current = MEMBER_STATUSES[self.status[row]]
                    new = {"subscribed": "unsubscribed", "pending": "subscribed",
                           "unsubscribed": "subscribed", "cleaned": "cleaned"}.get(current, current)
                    self._update(row, {}, new)
                elif kind == 1:
                    person = int(self.person[row])
                    canon = int(self.world.last[person]) if person >= 0 else 0
                    options = [LAST_NAMES.canonical[canon], *LAST_NAMES.variants[canon][: LAST_NAMES.n_variants[canon]]]
                    self.merge_values.setdefault(row, {})["LNAME"] = LAST_NAMES.strings[int(self.rng.choice(options))]
                else:
                    self.location_override[row] = int(self.rng.integers(len(CITIES.canonical)))
            self._touch(rows.tolist(), self.now())
            return [self.hash(int(r)) for r in rows]

    def mutate_window(self, query: str, records: int) -> list[str]:
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        try:
            lo = parse_iso_ms(params["since_last_changed"], "since") if params.get("since_last_changed") else None
            hi = parse_iso_ms(params["before_last_changed"], "before") - 1 if params.get("before_last_changed") else None
        except ProblemError:
            lo = hi = None
        with self.lock:
            a, b = self.index.span(lo, hi)
            rows = self.index.rows[a:b]
            rows = rows[(self.status[rows] != DELETED) & (self.status[rows] != ARCHIVED)]
            if len(rows) == 0:
                return []
            chosen = self.rng.choice(rows, min(records, len(rows)), replace=False)
            return self.mutate(len(chosen), rows=chosen)

    def ground_truth(self, lo: int | None, hi_exclusive: int | None, status: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            a, b = self.index.span(lo, None if hi_exclusive is None else hi_exclusive - 1)
            rows = self.index.rows[a:b]
            st = self.status[rows]
            mask = (st != DELETED) if status is None else (st == MEMBER_STATUSES.index(status))
            out = []
            for row in rows[mask].tolist():
                record = self.render(row)
                record["person_id"] = int(self.person[row])
                record["last_changed_ms"] = int(self.last_changed[row])
                out.append(record)
            return out


def _member_error(email: str, error: str, field: str, field_message: str = "", code: str = "ERROR_GENERIC") -> dict:
    return {"email_address": email, "error": error, "error_code": code, "field": field,
            "field_message": field_message or error}


def _int_param(params: dict[str, str], name: str, default: int) -> int:
    raw = params.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ProblemError(400, "Invalid Resource", f"{name} must be an integer, got {raw!r}") from None


def _filter_fields(payload: Any, fields: str | None, exclude: str | None) -> Any:
    """Mailchimp's partial responses: `fields=members.id,total_items`, `exclude_fields=...`."""

    def tree(spec: str) -> dict:
        root: dict = {}
        for path in (p.strip() for p in spec.split(",") if p.strip()):
            node = root
            for part in path.split("."):
                node = node.setdefault(part, {})
        return root

    def keep(value: Any, node: dict) -> Any:
        if not node:
            return value
        if isinstance(value, list):
            return [keep(v, node) for v in value]
        if isinstance(value, dict):
            return {k: keep(v, node[k]) for k, v in value.items() if k in node}
        return value

    def drop(value: Any, node: dict) -> Any:
        if isinstance(value, list):
            return [drop(v, node) for v in value]
        if isinstance(value, dict):
            return {k: (drop(v, node[k]) if node.get(k) else v) for k, v in value.items()
                    if not (k in node and not node[k])}
        return value

    if fields:
        payload = keep(payload, tree(fields))
    if exclude:
        payload = drop(payload, tree(exclude))
    return payload


# -- OAuth and the connection limit ------------------------------------------------------


class MailchimpAuth:
    """OAuth codes and tokens (tokens never expire; no refresh token), the configured
    access token and the API key."""

    def __init__(self, *, client_id: str, client_secret: str, access_token: str, api_key: str) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.static_tokens = {t for t in (access_token, api_key) if t}
        self._lock = threading.Lock()
        self._codes: dict[str, tuple[str, str]] = {}
        self._issued: set[str] = set()

    def authorize(self, client_id: str, redirect_uri: str) -> str:
        code = "mc-code-" + secrets.token_hex(16)
        with self._lock:
            self._codes[code] = (client_id, redirect_uri)
        return code

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("grant_type") != "authorization_code":
            return 400, {"error": "unsupported_grant_type", "error_description": "grant_type must be authorization_code"}
        if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
            return 401, {"error": "invalid_client", "error_description": "Invalid client_id or client_secret"}
        with self._lock:
            entry = self._codes.pop(form.get("code", ""), None)
        if entry is None or entry[0] != form.get("client_id"):
            return 400, {"error": "invalid_grant", "error_description": "Invalid authorization code"}
        if entry[1] != form.get("redirect_uri", ""):
            return 400, {"error": "invalid_grant", "error_description": "redirect_uri does not match"}
        token = secrets.token_hex(16)
        with self._lock:
            self._issued.add(token)
        return 200, {"access_token": token, "expires_in": 0, "scope": None}

    def valid(self, token: str) -> bool:
        if token in self.static_tokens:
            return True
        with self._lock:
            return token in self._issued

    def credential(self, authorization: str | None) -> str | None:
        """The token or key in an Authorization header, if it is valid."""
        if not authorization:
            return None
        scheme, _, rest = authorization.strip().partition(" ")
        scheme = scheme.lower()
        rest = rest.strip()
        if scheme == "basic":
            try:
                _, _, rest = base64.b64decode(rest).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
        elif scheme not in ("bearer", "oauth", "apikey"):
            return None
        return rest if rest and self.valid(rest) else None

    def revoke_issued(self) -> None:
        with self._lock:
            self._issued.clear()


class ConnectionLimit:
    """At most `limit` API requests in flight per account; the next gets 429."""

    def __init__(self, app: Callable, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0
        self.peak = 0
        self.rejected = 0
        self._lock = threading.Lock()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/3.0"):
            await self.app(scope, receive, send)
            return
        with self._lock:
            if self.in_flight >= self.limit:
                self.rejected += 1
                admitted = False
            else:
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
                admitted = True
        if not admitted:
            response = problem(429, "Too Many Requests",
                               f"You have exceeded the limit of {self.limit} simultaneous connections.", instance="")
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            with self._lock:
                self.in_flight -= 1


class _Hooks:
    def __init__(self, state: MailchimpState, auth: MailchimpAuth) -> None:
        self.state, self.auth = state, auth

    def fault_error(self, status: int, path: str, retry_after: float) -> Response:
        headers = {"Retry-After": str(max(1, int(round(retry_after))))} if status in (429, 503) else None
        title, detail = {
            429: ("Too Many Requests", "You have exceeded the limit of 10 simultaneous connections."),
            500: ("Internal Server Error", "An unexpected internal error has occurred. Please contact Support for more information."),
            503: ("Service Unavailable", "This service is temporarily unavailable. Please try again later."),
        }[status]
        return problem(status, title, detail, headers=headers)

    def unauthorized(self) -> Response:
        return problem(401, "API Key Invalid",
                       "Your API key may be invalid, or you've attempted to access the wrong datacenter.")

    def expire_tokens(self) -> None:
        self.auth.revoke_issued()

    def mutate_during_paging(self, method: str, path: str, query: str, body: bytes, records: int) -> None:
        self.state.mutate_window(query, records)


def _form(raw: bytes) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True).items()}


def build_mailchimp_app(state: MailchimpState, auth: MailchimpAuth, *, max_connections: int = 10,
                        dc: str = "us1") -> BuiltApp:
    """The Mailchimp sandbox as an ASGI app (stats -> connection limit -> faults -> routes)."""
    list_id = state.list_id

    def handle(fn: Callable, *, api: bool = True) -> Callable:
        async def endpoint(request: Request) -> Response:
            if api and auth.credential(request.headers.get("authorization")) is None:
                return _Hooks(state, auth).unauthorized()
            try:
                if api and "list_id" in request.path_params and request.path_params["list_id"] != list_id:
                    raise ProblemError(404, "Resource Not Found", "The requested resource could not be found.")
                return await fn(request)
            except ProblemError as exc:
                return json_response(exc.body, exc.status, media_type="application/problem+json")
            except ValueError as exc:
                return problem(400, "JSON Parse Exception", f"We encountered an unspecified JSON parsing error: {exc}")

        return endpoint

    def filtered(request: Request, payload: Any) -> Response:
        q = request.query_params
        return json_response(_filter_fields(payload, q.get("fields"), q.get("exclude_fields")))

    async def authorize(request: Request) -> Response:
        q = request.query_params
        if q.get("client_id") != auth.client_id:
            return json_response({"error": "invalid_client", "error_description": "unknown client_id"}, 400)
        redirect_uri = q.get("redirect_uri", "")
        if not redirect_uri.startswith(("http://", "https://")):
            return json_response({"error": "invalid_request", "error_description": "redirect_uri is required"}, 400)
        code = auth.authorize(q["client_id"], redirect_uri)
        parts = urlsplit(redirect_uri)
        params = {"code": code, **({"state": q["state"]} if q.get("state") is not None else {})}
        query = (parts.query + "&" if parts.query else "") + urlencode(params)
        return RedirectResponse(urlunsplit(parts._replace(query=query)), status_code=302)

    async def token(request: Request) -> Response:
        status, body = auth.token(_form(await request.body()))
        return json_response(body, status)

    async def metadata(request: Request) -> Response:
        if auth.credential(request.headers.get("authorization")) is None:
            return json_response({"error": "invalid_token", "error_description": "Invalid or revoked token"}, 401)
        base = str(request.base_url).rstrip("/")
        return json_response({
            "dc": dc,
            "role": "owner",
            "accountname": "Sandbox",
            "user_id": 1,
            "login": {"email": "owner@shop.example.com", "avatar": None, "login_id": 1,
                      "login_name": "sandbox-owner", "login_email": "owner@shop.example.com"},
            "login_url": f"{base}/login",
            "api_endpoint": base,
        })

    async def root(request: Request) -> Response:
        return json_response({"account_id": "sandbox0001", "login_id": "1", "account_name": "Sandbox",
                              "email": "owner@shop.example.com", "role": "owner", "total_subscribers": int(len(state.status))})

    async def ping(request: Request) -> Response:
        return json_response({"health_status": "Everything's Chimpy!"})

    def list_json() -> dict[str, Any]:
        with state.lock:
            counts = {s: int((state.status == i).sum()) for i, s in enumerate(MEMBER_STATUSES)}
        return {
            "id": list_id, "web_id": 1, "name": "Sandbox Audience",
            "contact": {"company": "Sandbox Outfitters", "country": "US"},
            "permission_reminder": "You signed up at our shop.", "email_type_option": False,
            "campaign_defaults": {"from_name": "Sandbox Outfitters", "from_email": "hello@shop.example.com",
                                  "subject": "", "language": "en"},
            "stats": {"member_count": counts["subscribed"], "unsubscribe_count": counts["unsubscribed"],
                      "cleaned_count": counts["cleaned"], "merge_field_count": len(state.merge_fields)},
        }

    async def lists(request: Request) -> Response:
        return filtered(request, {"lists": [list_json()], "total_items": 1})

    async def get_list(request: Request) -> Response:
        return filtered(request, list_json())

    async def members(request: Request) -> Response:
        return filtered(request, state.list_members(dict(request.query_params)))

    async def batch(request: Request) -> Response:
        return json_response(state.batch_subscribe(await read_json(request)))

    async def get_member(request: Request) -> Response:
        with state.lock:
            row = state.row_of_hash(request.path_params["hash"])
            if row is None:
                raise ProblemError(404, "Resource Not Found", "The requested resource could not be found.")
            return filtered(request, state.render(row))

    async def put_member(request: Request) -> Response:
        return json_response(state.put_member(request.path_params["hash"], await read_json(request),
                                              patch=request.method == "PATCH"))

    async def archive_member(request: Request) -> Response:
        state.archive(request.path_params["hash"])
        return Response(status_code=204)

    async def delete_permanent(request: Request) -> Response:
        state.delete_permanent(request.path_params["hash"])
        return Response(status_code=204)

    async def member_activity(request: Request) -> Response:
        return filtered(request, state.member_activity(request.path_params["hash"]))

    async def merge_fields(request: Request) -> Response:
        params = dict(request.query_params)
        count, offset = _int_param(params, "count", 10), _int_param(params, "offset", 0)
        if count < 0 or count > MAX_COUNT or offset < 0:
            raise ProblemError(400, "Invalid Resource", f"count must be 0..{MAX_COUNT} and offset non-negative")
        with state.lock:
            fields = list(state.merge_fields)
        return filtered(request, {"merge_fields": fields[offset : offset + count], "list_id": list_id,
                                  "total_items": len(fields), "_links": []})

    async def create_merge_field(request: Request) -> Response:
        return json_response(state.create_merge_field(await read_json(request)))

    async def get_merge_field(request: Request) -> Response:
        wanted = request.path_params["merge_id"]
        for field in state.merge_fields:
            if str(field["merge_id"]) == wanted:
                return json_response(field)
        raise ProblemError(404, "Resource Not Found", "The requested resource could not be found.")

    async def campaigns(request: Request) -> Response:
        return filtered(request, state.list_campaigns(dict(request.query_params)))

    async def campaign(request: Request) -> Response:
        return filtered(request, state.campaign_json(state.campaign_index(request.path_params["campaign_id"])))

    async def email_activity(request: Request) -> Response:
        return filtered(request, state.email_activity(request.path_params["campaign_id"], dict(request.query_params)))

    def admin_window(params: dict[str, str]) -> tuple[int | None, int | None]:
        lo = hi = None
        if params.get("changed_from"):
            lo = int(params["changed_from"])
        if params.get("changed_to"):
            hi = int(params["changed_to"])
        if params.get("since_last_changed"):
            lo = parse_iso_ms(params["since_last_changed"], "since_last_changed")
        if params.get("before_last_changed"):
            hi = parse_iso_ms(params["before_last_changed"], "before_last_changed")
        return lo, hi

    async def admin_members(request: Request) -> Response:
        params = dict(request.query_params)
        try:
            lo, hi = admin_window(params)
        except ValueError:
            raise ProblemError(400, "Invalid Resource", "changed_from / changed_to are epoch milliseconds") from None
        status = params.get("status")
        if status is not None and status not in MEMBER_STATUSES:
            raise ProblemError(400, "Invalid Resource", f"status must be one of {', '.join(MEMBER_STATUSES)}")
        members_ = state.ground_truth(lo, hi, status)
        return json_response({"total_items": len(members_), "members": members_})

    async def admin_mutate(request: Request) -> Response:
        raw = await request.body()
        body = await read_json(request) if raw.strip() else {}
        count = body.get("count", 1) if isinstance(body, dict) else 1
        if not isinstance(count, int) or count < 0:
            raise ProblemError(400, "Invalid Resource", "count must be a non-negative integer")
        return json_response({"mutated": state.mutate(count)})

    async def admin_pushes(request: Request) -> Response:
        with state.lock:
            pushes = list(state.pushes)
        return json_response({"total": len(pushes), "pushes": pushes})

    async def admin_clear_pushes(request: Request) -> Response:
        with state.lock:
            state.pushes.clear()
        return Response(status_code=204)

    async def admin_reset(request: Request) -> Response:
        state.reset()
        injector.clear()
        return json_response({"reset": True, "members": int(len(state.status))})

    async def admin_connections(request: Request) -> Response:
        limiter = limit_box["limit"]
        return json_response({"in_flight": limiter.in_flight, "peak": limiter.peak, "limit": limiter.limit,
                              "rejected": limiter.rejected})

    lists_base = "/3.0/lists/{list_id}"
    member = lists_base + "/members/{hash}"
    injector = FaultInjector()
    stats_box: dict[str, RequestStats] = {}
    limit_box: dict[str, ConnectionLimit] = {}
    routes = [
        Route("/oauth2/authorize", handle(authorize, api=False), methods=["GET"]),
        Route("/oauth2/token", handle(token, api=False), methods=["POST"]),
        Route("/oauth2/metadata", handle(metadata, api=False), methods=["GET"]),
        Route("/3.0", handle(root), methods=["GET"]),
        Route("/3.0/", handle(root), methods=["GET"]),
        Route("/3.0/ping", handle(ping), methods=["GET"]),
        Route("/3.0/lists", handle(lists), methods=["GET"]),
        Route(lists_base, handle(get_list), methods=["GET"]),
        Route(lists_base, handle(batch), methods=["POST"]),
        Route(lists_base + "/members", handle(members), methods=["GET"]),
        Route(member, handle(get_member), methods=["GET"]),
        Route(member, handle(put_member), methods=["PUT", "PATCH"]),
        Route(member, handle(archive_member), methods=["DELETE"]),
        Route(member + "/actions/delete-permanent", handle(delete_permanent), methods=["POST"]),
        Route(member + "/activity", handle(member_activity), methods=["GET"]),
        Route(lists_base + "/merge-fields", handle(merge_fields), methods=["GET"]),
        Route(lists_base + "/merge-fields", handle(create_merge_field), methods=["POST"]),
        Route(lists_base + "/merge-fields/{merge_id}", handle(get_merge_field), methods=["GET"]),
        Route("/3.0/campaigns", handle(campaigns), methods=["GET"]),
        Route("/3.0/campaigns/{campaign_id}", handle(campaign), methods=["GET"]),
        Route("/3.0/reports/{campaign_id}/email-activity", handle(email_activity), methods=["GET"]),
        Route("/_admin/members", handle(admin_members, api=False), methods=["GET"]),
        Route("/_admin/mutate", handle(admin_mutate, api=False), methods=["POST"]),
        Route("/_admin/pushes", handle(admin_pushes, api=False), methods=["GET"]),
        Route("/_admin/pushes", handle(admin_clear_pushes, api=False), methods=["DELETE"]),
        Route("/_admin/reset", handle(admin_reset, api=False), methods=["POST"]),
        Route("/_admin/connections", handle(admin_connections, api=False), methods=["GET"]),
        *admin_routes(injector, stats_box),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        if status == 405:
            return problem(405, "Method Not Allowed", "The requested method and resource are not compatible.")
        return problem(404, "Resource Not Found", "The requested resource could not be found.")

    async def server_error(request: Request, exc: Exception) -> Response:
        return problem(500, "Internal Server Error", "An unexpected internal error has occurred.")

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, 500: server_error})
    faulted = FaultMiddleware(app, injector, _Hooks(state, auth))
    limiter = ConnectionLimit(faulted, max_connections)
    limit_box["limit"] = limiter
    stats = RequestStats(limiter)
    stats_box["stats"] = stats
    return BuiltApp(asgi=stats, stats=stats, faults=injector, extras={"connections": limiter})
