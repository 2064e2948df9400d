"""Landing-zone envelopes -> canonical staged rows (PRODUCT.md section 4). No Dagster here.

The ingest service writes one envelope per event (``ingest_service/app.py``)::

    {"v": 1, "delivery_id", "transport": "track"|"shopify"|"mailchimp", "topic",
     "received_at", "headers": {...}, "payload": {...}}

``envelopes_to_canonical`` turns each into one canonical row, or into a reject with a
reason when no row can be made at all (not a JSON object, unknown transport or topic,
unknown event name, an erasure request). It never raises and never drops anything
silently: ``len(rows) + len(rejects) == len(envelopes)``.

It does not validate: missing identifiers, unparseable times, negative totals or odd
currencies become nulls or pass through as given, and the validation stage (Great
Expectations) quarantines them with its own reasons. Unparseable fields become null and
the row goes on.

Track event names (``event`` of a ``type: track`` message), matched case-insensitively
with runs of spaces/underscores collapsed; the canonical names themselves
(``page_viewed`` ...) are accepted too:

=====================  ================
track name             event_type
=====================  ================
Page Viewed            page_viewed
Product Viewed         product_viewed
Product Added          added_to_cart
Checkout Started       checkout_started
Order Completed        order_completed
Order Cancelled        order_cancelled
Email Opened           email_opened
Email Link Clicked     email_clicked
Subscribed             subscribed
Unsubscribed           unsubscribed
Identify               profile_updated
Profile Updated        profile_updated
=====================  ================

Messages of ``type: page`` map to page_viewed and ``type: identify`` to profile_updated;
other message types (screen, group, alias) are rejected.

Shopify topics: orders/create -> order_completed, orders/cancelled -> order_cancelled,
checkouts/create -> checkout_started, customers/update -> profile_updated;
customers/redact is rejected ("erasure request (handled by the erase path)").
Mailchimp types: subscribe -> subscribed (consent subscribed), unsubscribe ->
unsubscribed (unsubscribed), cleaned -> unsubscribed (cleaned), profile and upemail ->
profile_updated.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from . import canonical

ENVELOPE_VERSION = 1
TRANSPORTS = ("track", "shopify", "mailchimp")
UNREADABLE_KEY = "_unreadable"
"""``read_landing_file`` returns ``{UNREADABLE_KEY: {file, line, reason, text}}`` for a line
it cannot parse; ``envelopes_to_canonical`` turns it into a reject with that reason."""

ERASURE_REASON = "erasure request (handled by the erase path)"

TRACK_EVENT_TYPES: dict[str, str] = {
    "Page Viewed": "page_viewed",
    "Product Viewed": "product_viewed",
    "Product Added": "added_to_cart",
    "Checkout Started": "checkout_started",
    "Order Completed": "order_completed",
    "Order Cancelled": "order_cancelled",
    "Order Canceled": "order_cancelled",
    "Email Opened": "email_opened",
    "Email Link Clicked": "email_clicked",
    "Subscribed": "subscribed",
    "Unsubscribed": "unsubscribed",
    "Identify": "profile_updated",
    "Profile Updated": "profile_updated",
}
"""Track-style event name -> canonical event type (see the module docstring)."""

SHOPIFY_TOPIC_EVENTS: dict[str, str] = {
    "orders/create": "order_completed",
    "orders/cancelled": "order_cancelled",
    "checkouts/create": "checkout_started",
    "customers/update": "profile_updated",
}

MAILCHIMP_TYPE_EVENTS: dict[str, tuple[str, str | None]] = {
    "subscribe": ("subscribed", "subscribed"),
    "unsubscribe": ("unsubscribed", "unsubscribed"),
    "cleaned": ("unsubscribed", "cleaned"),
    "profile": ("profile_updated", None),
    "upemail": ("profile_updated", None),
}
"""Mailchimp webhook type -> (event_type, email_consent)."""

CURRENCY_EXPONENTS: dict[str, int] = {
    **{c: 0 for c in (
        "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"
    ).split()},
    **{c: 3 for c in "BHD IQD JOD KWD LYD OMR TND".split()},
    **{c: 4 for c in "CLF UYW".split()},
}
"""ISO 4217 minor-unit exponents that are not 2 (every other code uses 2)."""

_INT64_MAX = (1 << 63) - 1
_INT64_MIN = -(1 << 63)


# --------------------------------------------------------------------------- scalars


def _text(value: Any) -> str | None:
    """A JSON scalar as text (ids may arrive as numbers); containers and bools -> None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() and abs(value) < 1e18 else repr(value)
    return None


def _attr(value: Any) -> str | None:
    """An attribute value: text, stripped; empty -> None."""
    text = _text(value)
    if text is None:
        return None
    text = text.strip()
    return text or None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def parse_time(value: Any) -> datetime | None:
    """ISO 8601 text (``Z``, offsets, a space separator, up to nanoseconds) or epoch
    seconds/milliseconds -> an aware UTC datetime; naive times are taken as UTC.
    Anything else -> None."""
    try:
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return None
            if text[-4:].upper() == " UTC":
                text = text[:-4]
            when = datetime.fromisoformat(text)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                return None
            seconds = value / 1000.0 if abs(value) >= 1e11 else float(value)
            when = datetime.fromtimestamp(seconds, timezone.utc)
        else:
            return None
    except (ValueError, OverflowError, OSError):
        return None
    if when.tzinfo is None:
        return when.replace(tzinfo=timezone.utc)
    try:
        return when.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        return None


def _shift(when: datetime | None, delta: timedelta | None) -> datetime | None:
    if when is None or delta is None:
        return when
    try:
        return when + delta
    except OverflowError:
        return None


def normalise_currency(value: Any) -> str | None:
    """Three letters -> upper case; anything else is passed through as given (validation
    flags it); non-text -> None."""
    text = _attr(value)
    if text is None:
        return None
    return text.upper() if len(text) == 3 and text.isascii() and text.isalpha() else text


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float):
        text = repr(value)
    elif isinstance(value, (int, str)):
        text = str(value).strip()
    else:
        return None
    if not text or len(text) > 64:
        return None
    try:
        result = Decimal(text)
    except (ArithmeticError, ValueError):
        return None
    return result if result.is_finite() else None


def to_minor_units(amount: Any, currency: str | None) -> int | None:
    """A decimal amount (string or JSON number) -> integer minor units of ``currency``.

    Exact decimal arithmetic (``Decimal`` from the text, never float maths): "19.99" USD
    -> 1999, "1500" JPY -> 1500, "1.234" KWD -> 1234. Unknown or missing currencies use 2
    decimals. An amount that is not a number, has more decimals than the currency has
    minor units, or does not fit in int64 -> None. Negative amounts are kept.
    """
    value = _decimal(amount)
    if value is None:
        return None
    try:
        exponent = CURRENCY_EXPONENTS.get((currency or "").upper(), 2)
        scaled = value.scaleb(exponent)
        if scaled != scaled.to_integral_value():
            return None
        minor = int(scaled)
    except (ArithmeticError, ValueError):  # InvalidOperation, decimal Overflow
        return None
    return minor if _INT64_MIN <= minor <= _INT64_MAX else None


def _quantity(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,18}\s*", value):
        return int(value)
    return None


def _clamp_int64(value: int | None) -> int | None:
    if value is None or not (_INT64_MIN <= value <= _INT64_MAX):
        return None
    return value


# --------------------------------------------------------------------------- countries

ISO_ALPHA2 = frozenset(
    """AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN
    BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE
    DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN
    GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE
    KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK
    ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA
    PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK
    SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG
    UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW""".split()
)
"""Every officially assigned ISO 3166-1 alpha-2 code."""

_COUNTRY_TABLE = """
AE ARE united arab emirates|uae
AR ARG argentina
AT AUT austria|österreich
AU AUS australia
BE BEL belgium|belgië|belgique
BG BGR bulgaria
BR BRA brazil|brasil
CA CAN canada
CH CHE switzerland|schweiz|suisse
CL CHL chile
CN CHN china|people's republic of china
CO COL colombia
CZ CZE czech republic|czechia
DE DEU germany|deutschland
DK DNK denmark|danmark
EE EST estonia
EG EGY egypt
ES ESP spain|españa
FI FIN finland|suomi
FR FRA france
GB GBR united kingdom|great britain|britain|uk|u.k.|england|scotland|wales|northern ireland|united kingdom of great britain and northern ireland
GR GRC greece
HK HKG hong kong
HR HRV croatia
HU HUN hungary
ID IDN indonesia
IE IRL ireland|éire
IL ISR israel
IN IND india
IS ISL iceland
IT ITA italy|italia
JP JPN japan
KR KOR south korea|korea|republic of korea|korea, republic of
KW KWT kuwait
LT LTU lithuania
LU LUX luxembourg
LV LVA latvia
MA MAR morocco
MX MEX mexico|méxico
MY MYS malaysia
NG NGA nigeria
NL NLD netherlands|the netherlands|holland|nederland
NO NOR norway|norge
NZ NZL new zealand
PE PER peru
PH PHL philippines
PK PAK pakistan
PL POL poland|polska
PT PRT portugal
RO ROU romania
RS SRB serbia
RU RUS russia|russian federation
SA SAU saudi arabia
SE SWE sweden|sverige
SG SGP singapore
SI SVN slovenia
SK SVK slovakia
TH THA thailand
TR TUR turkey|türkiye|turkiye
TW TWN taiwan
UA UKR ukraine
US USA united states|united states of america|usa|u.s.|u.s.a.|us|america
VN VNM vietnam|viet nam
ZA ZAF south africa
"""


def _country_key(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().casefold())


def _build_country_lookup() -> dict[str, str]:
    lookup: dict[str, str] = {}
    for line in _COUNTRY_TABLE.strip().splitlines():
        alpha2, alpha3, names = line.split(" ", 2)
        lookup[alpha3.casefold()] = alpha2
        for name in names.split("|"):
            lookup[_country_key(name)] = alpha2
    return lookup


_COUNTRY_LOOKUP = _build_country_lookup()


def normalise_country(value: Any) -> str | None:
    """A country code or name -> ISO 3166-1 alpha-2 ("United Kingdom", "gb", "GBR",
    "UK" -> "GB"). Unknown values -> None."""
    text = _attr(value)
    if text is None:
        return None
    return _country_code(text)


@functools.lru_cache(maxsize=4096)
def _country_code(text: str) -> str | None:
    key = _country_key(text)
    if key in _COUNTRY_LOOKUP:
        return _COUNTRY_LOOKUP[key]
    if len(key) == 2 and key.upper() in ISO_ALPHA2:
        return key.upper()
    return _COUNTRY_LOOKUP.get(key.replace(".", ""))


# --------------------------------------------------------------------------- devices

_BOT = re.compile(
    r"bot\b|bot/|crawl|spider|slurp|headless|lighthouse|pingdom|curl/|wget/|python-requests|"
    r"python-urllib|okhttp|go-http-client|java/|httpclient|facebookexternalhit|preview",
    re.I,
)
_TABLET = re.compile(r"ipad|tablet|kindle|silk/|playbook|nexus (7|9|10)|sm-t\d|tab\b", re.I)
_MOBILE = re.compile(
    r"mobi|iphone|ipod|windows phone|blackberry|bb10|opera mini|iemobile|android.*mobile", re.I
)
_DESKTOP = re.compile(r"windows nt|macintosh|mac os x|x11|linux|cros", re.I)


def device_type_from_user_agent(user_agent: Any) -> str | None:
    """``context.userAgent`` -> desktop | mobile | tablet | bot | other (None when absent)."""
    ua = _attr(user_agent)
    if ua is None:
        return None
    return _device_type(ua)


@functools.lru_cache(maxsize=4096)  # a site sees few distinct user agents
def _device_type(ua: str) -> str:
    if _BOT.search(ua):
        return "bot"
    if _TABLET.search(ua) or ("android" in ua.lower() and "mobile" not in ua.lower()):
        return "tablet"
    if _MOBILE.search(ua):
        return "mobile"
    if _DESKTOP.search(ua):
        return "desktop"
    return "other"


# --------------------------------------------------------------------------- mappers


class _Reject(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _base_row(envelope: Mapping[str, Any], source: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(canonical.CANONICAL_COLUMNS)
    row.update(
        source=source,
        source_class=canonical.SOURCE_CLASS[source],
        record_kind="event",
        is_deleted=False,
        source_record_id=_text(envelope.get("delivery_id")),
        received_at=parse_time(envelope.get("received_at")),
    )
    return row


def _event_key(name: str) -> str:
    return re.sub(r"[\s_]+", " ", name.strip()).casefold()


_TRACK_LOOKUP = {
    **{_event_key(k): v for k, v in TRACK_EVENT_TYPES.items()},
    **{_event_key(v): v for v in canonical.EVENT_TYPES},
}


def _track_row(envelope: Mapping[str, Any], payload: dict) -> dict[str, Any]:
    kind = payload.get("type", "track")
    if kind == "track":
        name = payload.get("event")
        if not isinstance(name, str):
            raise _Reject("unknown event type (missing event name)")
        event_type = TRACK_EVENT_TYPES.get(name) or _TRACK_LOOKUP.get(_event_key(name))
        if event_type is None:
            raise _Reject(f"unknown event type {name[:100]!r}")
    elif kind == "page":
        event_type = "page_viewed"
    elif kind == "identify":
        event_type = "profile_updated"
    else:
        raise _Reject(f"unsupported message type {str(kind)[:50]!r}")

    props = _dict(payload.get("properties"))
    context = _dict(payload.get("context"))
    location = _dict(context.get("location"))
    traits = _dict(payload.get("traits")) or _dict(context.get("traits"))

    row = _base_row(envelope, "web")
    message_id = _text(payload.get("messageId"))
    if message_id is not None:
        row["source_record_id"] = message_id
    sent_at = payload.get("sentAt")
    if sent_at is None:
        sent_at = _dict(envelope.get("headers")).get("batch_sent_at")
    sent = parse_time(sent_at)
    skew = None
    if sent is not None and row["received_at"] is not None:
        try:
            skew = row["received_at"] - sent
        except OverflowError:
            skew = None
    row["observed_at"] = _shift(parse_time(payload.get("timestamp")), skew)
    row["event_type"] = event_type
    row["anonymous_id"] = _text(payload.get("anonymousId"))
    row["customer_id"] = _text(payload.get("userId"))
    row["email"] = _text(props.get("email")) or _text(traits.get("email"))
    row["city"] = _attr(location.get("city"))
    row["country"] = normalise_country(location.get("country"))
    row["device_type"] = device_type_from_user_agent(context.get("userAgent"))
    row["product_id"] = _text(props.get("product_id"))
    if event_type == "product_viewed":
        row["category"] = _attr(props.get("category"))
    if event_type in ("order_completed", "order_cancelled", "checkout_started"):
        currency = normalise_currency(props.get("currency"))
        row["currency"] = currency
        amount = next(
            (props[k] for k in ("total", "revenue", "value") if props.get(k) is not None), None
        )
        if event_type == "checkout_started":
            row["cart_value_minor"] = to_minor_units(amount, currency)
            row["cart_items"] = _sum_quantities(props.get("products"))
        else:
            row["order_id"] = _text(props.get("order_id"))
            row["order_total_minor"] = to_minor_units(amount, currency)
    return row


def _sum_quantities(items: Any) -> int | None:
    if not isinstance(items, list):
        return None
    total = 0
    for item in items:
        q = _quantity(_dict(item).get("quantity"))
        if q is not None:
            total += q
    return _clamp_int64(total)


def _product_sort_key(product_id: str) -> tuple:
    text = product_id.strip()
    if re.fullmatch(r"-?\d+", text):
        return (0, int(text), text)
    return (1, 0, text)


def top_line_item_product(line_items: Any) -> str | None:
    """The product id of the line item with the highest price x quantity; ties -> the
    smallest product id (numerically when numeric). Items without a product id or a
    parseable price and quantity take no part."""
    if not isinstance(line_items, list):
        return None
    best: tuple | None = None
    for item in line_items:
        item = _dict(item)
        product_id = _text(item.get("product_id"))
        if product_id is None or not product_id.strip():
            continue
        quantity = _quantity(item.get("quantity", 1))
        price_value = _decimal(item.get("price"))
        if quantity is None or price_value is None:
            continue
        try:
            total = price_value * quantity
        except ArithmeticError:
            continue
        key = (-total, _product_sort_key(product_id))
        if best is None or key < best[0]:
            best = (key, product_id.strip())
    return best[1] if best else None


def _shopify_customer_fields(row: dict[str, Any], customer: dict) -> None:
    address = _dict(customer.get("default_address"))
    row["customer_id"] = _text(customer.get("id"))
    row["first_name"] = _attr(customer.get("first_name"))
    row["last_name"] = _attr(customer.get("last_name"))
    row["city"] = _attr(address.get("city"))
    row["country"] = normalise_country(address.get("country_code") or address.get("country"))


def _first_text(*values: Any) -> str | None:
    for value in values:
        text = _text(value)
        if text is not None and text.strip():
            return text
    return None


def _shopify_row(
    envelope: Mapping[str, Any], topic: str, payload: dict, catalogue: Mapping[str, str]
) -> dict[str, Any]:
    if topic == "customers/redact":
        raise _Reject(ERASURE_REASON)
    event_type = SHOPIFY_TOPIC_EVENTS.get(topic)
    if event_type is None:
        raise _Reject(f"unknown shopify topic {topic[:100]!r}")
    row = _base_row(envelope, "shop")
    row["event_type"] = event_type
    row["shop"] = _attr(_dict(envelope.get("headers")).get("shop_domain"))
    if topic == "customers/update":
        _shopify_customer_fields(row, payload)
        row["email"] = _first_text(payload.get("email"))
        row["observed_at"] = parse_time(payload.get("updated_at"))
        return row

    customer = _dict(payload.get("customer"))
    _shopify_customer_fields(row, customer)
    row["email"] = _first_text(payload.get("email"), payload.get("contact_email"), customer.get("email"))
    currency = normalise_currency(payload.get("currency"))
    row["currency"] = currency
    if topic == "checkouts/create":
        row["observed_at"] = parse_time(payload.get("created_at") or payload.get("updated_at"))
        amount = next(
            (payload[k] for k in ("total_price", "subtotal_price") if payload.get(k) is not None),
            None,
        )
        row["cart_value_minor"] = to_minor_units(amount, currency)
        row["cart_items"] = _sum_quantities(payload.get("line_items"))
        return row

    row["order_id"] = _text(payload.get("id"))
    row["order_total_minor"] = to_minor_units(payload.get("total_price"), currency)
    if topic == "orders/create":
        row["observed_at"] = parse_time(payload.get("created_at"))
        product_id = top_line_item_product(payload.get("line_items"))
        if product_id is not None:
            category = catalogue.get(product_id)
            row["category"] = _attr(category)
    else:  # orders/cancelled
        row["observed_at"] = parse_time(payload.get("cancelled_at") or payload.get("updated_at"))
    return row


def _mailchimp_row(envelope: Mapping[str, Any], topic: str, payload: dict) -> dict[str, Any]:
    mapped = MAILCHIMP_TYPE_EVENTS.get(topic)
    if mapped is None:
        raise _Reject(f"unknown mailchimp type {topic[:100]!r}")
    event_type, consent = mapped
    data = _dict(payload.get("data"))
    merges = _dict(data.get("merges"))
    row = _base_row(envelope, "esp")
    row["event_type"] = event_type
    row["email_consent"] = consent
    row["observed_at"] = parse_time(payload.get("fired_at"))
    if topic == "upemail":
        row["email"] = _first_text(data.get("new_email"), data.get("email"))
    else:
        row["email"] = _first_text(data.get("email"), merges.get("EMAIL"))
    row["first_name"] = _attr(merges.get("FNAME"))
    row["last_name"] = _attr(merges.get("LNAME"))
    return row


def _envelope_to_row(envelope: Any, catalogue: Mapping[str, str]) -> dict[str, Any]:
    if not isinstance(envelope, dict):
        raise _Reject("envelope is not a JSON object")
    if UNREADABLE_KEY in envelope:
        reason = _dict(envelope[UNREADABLE_KEY]).get("reason")
        raise _Reject(str(reason or "unreadable landing line"))
    version = envelope.get("v", ENVELOPE_VERSION)
    if version != ENVELOPE_VERSION or isinstance(version, bool):
        raise _Reject(f"unsupported envelope version {str(version)[:20]!r}")
    transport = envelope.get("transport")
    if transport not in TRANSPORTS:
        raise _Reject(f"unknown transport {str(transport)[:50]!r}")
    payload = envelope.get("payload")
    if not isinstance(payload, dict):
        raise _Reject("payload is not a JSON object")
    if transport == "track":
        return _track_row(envelope, payload)
    topic = envelope.get("topic")
    if transport == "mailchimp" and not isinstance(topic, str):
        topic = payload.get("type")
    if not isinstance(topic, str):
        raise _Reject(f"missing {transport} topic")
    if transport == "shopify":
        return _shopify_row(envelope, topic.strip(), payload, catalogue)
    return _mailchimp_row(envelope, topic.strip(), payload)


def _reject(envelope: Any, reason: str) -> dict[str, Any]:
    env = envelope if isinstance(envelope, dict) else {}
    return {
        "delivery_id": _text(env.get("delivery_id")),
        "transport": _text(env.get("transport")),
        "topic": _text(env.get("topic")),
        "received_at": _text(env.get("received_at")),
        "reason": reason,
        "raw": envelope,
    }


def envelopes_to_canonical(
    envelopes: Iterable[Any], catalogue: Mapping[str, str]
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Envelopes -> (canonical frame, rejects). Never raises on any input.

    ``catalogue`` maps product id (str) -> product type, the category of an order's top
    line item. Each reject is ``{delivery_id, transport, topic, received_at, reason, raw}``
    with ``raw`` the envelope as given. Rows keep input order, and
    ``frame.attrs["envelope_positions"]`` holds each row's position in ``envelopes``, so a
    later stage can quarantine a row together with its raw envelope.
    """
    rows: list[dict[str, Any]] = []
    positions: list[int] = []
    rejects: list[dict[str, Any]] = []
    try:
        items = list(envelopes)
    except Exception as exc:  # noqa: BLE001 - a broken iterable is still not a crash
        return _frame([], []), [_reject(None, f"cannot iterate envelopes: {exc!r}")]
    for position, envelope in enumerate(items):
        try:
            rows.append(_envelope_to_row(envelope, catalogue))
            positions.append(position)
        except _Reject as exc:
            rejects.append(_reject(envelope, exc.reason))
        except Exception as exc:  # noqa: BLE001 - defence in depth: reject, never raise
            rejects.append(_reject(envelope, f"cannot map envelope: {type(exc).__name__}"))
    try:
        return _frame(rows, positions), rejects
    except Exception:  # noqa: BLE001 - find the rows the schema refuses, keep the rest
        good_rows, good_positions = [], []
        for row, position in zip(rows, positions):
            try:
                canonical.to_table([row])
                good_rows.append(row)
                good_positions.append(position)
            except Exception as exc:  # noqa: BLE001
                rejects.append(
                    _reject(items[position], f"cannot convert to canonical row: {type(exc).__name__}")
                )
        return _frame(good_rows, good_positions), rejects


def _frame(rows: list[dict[str, Any]], positions: list[int]) -> pd.DataFrame:
    frame = canonical.to_frame(rows)
    frame.attrs["envelope_positions"] = positions
    return frame


def read_landing_file(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The envelopes of one landing file, in order.

    A line that is not JSON (a torn last line left by a crash mid-write, or corruption)
    comes back as ``{"_unreadable": {"file", "line", "reason", "text"}}``, which
    ``envelopes_to_canonical`` reports as a reject with that reason. A complete last line
    missing only its newline is read normally.
    """
    return parse_landing_bytes(Path(path).read_bytes(), str(path))


def parse_landing_bytes(data: bytes, name: str) -> list[dict[str, Any]]:
    """``read_landing_file`` over bytes already read (e.g. an S3 object); ``name`` is what
    an unreadable line reports as its file."""
    path = name
    lines = data.split(b"\n")
    tail = lines.pop()
    out: list[Any] = []

    def unreadable(number: int, raw: bytes, reason: str) -> dict[str, Any]:
        return {
            UNREADABLE_KEY: {
                "file": str(path),
                "line": number,
                "reason": reason,
                "text": raw.decode("utf-8", "replace"),
            }
        }

    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            out.append(json.loads(raw))
        except (ValueError, RecursionError):
            out.append(unreadable(number, raw, "landing line is not valid JSON"))
    if tail.strip():
        try:
            out.append(json.loads(tail))
        except (ValueError, RecursionError):
            out.append(unreadable(len(lines) + 1, tail, "torn last line (incomplete write)"))
    return out
