"""The canonical staged record: one schema for every source (PRODUCT.md section 4).

Every staged row, whether it came from a HubSpot contact, a Mailchimp member, a Shopify
webhook or a track event, is a row of ``CANONICAL_SCHEMA``. Identity resolution and the
conflict rules read only these columns, so a new source only needs a converter to it.

No Dagster import here: this is pure logic, tested on its own.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import pandas as pd
import pyarrow as pa

SOURCES = ("crm", "shop", "esp", "web")
"""Source systems, in edge-trust order (PRODUCT.md section 5: crm < shop < esp < web)."""

SOURCE_CLASS = {"crm": "crm", "esp": "esp", "shop": "transactional", "web": "behavioral"}
"""Source -> source class used by the conflict rules (PRODUCT.md section 4)."""

IDENTIFIER_TYPES = ("crm_id", "customer_id", "email", "anonymous_id")
"""Identifier columns, highest type first."""

EVENT_TYPES = (
    "page_viewed",
    "product_viewed",
    "added_to_cart",
    "checkout_started",
    "order_completed",
    "order_cancelled",
    "email_opened",
    "email_clicked",
    "subscribed",
    "unsubscribed",
    "profile_updated",
)

_TS = pa.timestamp("us", tz="UTC")

CANONICAL_SCHEMA = pa.schema(
    [
        # Where the row came from and when.
        ("source", pa.string()),  # crm | esp | shop | web
        ("source_class", pa.string()),  # crm | esp | transactional | behavioral
        ("source_record_id", pa.string()),  # contact id, member hash, event delivery id
        ("observed_at", _TS),  # when the source says the fact became true
        ("received_at", _TS),  # when we got it
        ("record_kind", pa.string()),  # contact | member | event
        ("event_type", pa.string()),  # one of EVENT_TYPES for events, else null
        ("is_deleted", pa.bool_()),  # archived / deleted / merged away at the source
        # Identifiers, as the source gave them (normalised by identity resolution).
        ("crm_id", pa.string()),
        ("customer_id", pa.string()),
        ("email", pa.string()),
        ("anonymous_id", pa.string()),
        # Attribute observations read by the conflict rules (config/conflict_rules.yaml).
        ("first_name", pa.string()),
        ("last_name", pa.string()),
        ("city", pa.string()),
        ("country", pa.string()),  # ISO 3166-1 alpha-2
        ("loyalty_tier", pa.string()),
        ("lifecycle_stage", pa.string()),
        ("email_consent", pa.string()),  # subscribed | unsubscribed | cleaned | pending | ...
        ("category", pa.string()),  # order's top line item category, or a viewed product's
        ("device_type", pa.string()),  # desktop | mobile | tablet | bot | other
        # Event facts read by the aggregates.
        ("shop", pa.string()),
        ("order_id", pa.string()),
        ("order_total_minor", pa.int64()),  # integer minor units of `currency`
        ("currency", pa.string()),
        ("cart_value_minor", pa.int64()),
        ("cart_items", pa.int64()),
        ("product_id", pa.string()),
    ]
)

CANONICAL_COLUMNS = tuple(CANONICAL_SCHEMA.names)
RECORD_KEY = ("source", "source_record_id", "observed_at")
"""Staged history is keyed by this: one row per version of a source record."""

BLOCKED_VALUES = frozenset({"", "null", "none", "undefined", "unknown", "0", "-1"})
_ZEROS_AND_DASHES = re.compile(r"^[0-]*$")


def is_blocked_identifier(value: object) -> bool:
    """True for values that must never link anything (PRODUCT.md section 4)."""
    if value is None or (isinstance(value, float) and value != value):
        return True
    text = str(value).strip().lower()
    return text in BLOCKED_VALUES or bool(_ZEROS_AND_DASHES.match(text))


def normalise_identifier(kind: str, value: object) -> str | None:
    """Strip whitespace, lower-case emails; blocked values become None."""
    if is_blocked_identifier(value):
        return None
    text = str(value).strip()
    return text.lower() if kind == "email" else text


def normalise_identifiers(frame: pd.DataFrame) -> pd.DataFrame:
    """Vectorised `normalise_identifier` over the identifier columns of a frame (copy)."""
    out = frame.copy()
    for kind in IDENTIFIER_TYPES:
        col = out[kind].astype("string").str.strip()
        if kind == "email":
            col = col.str.lower()
        lowered = col.str.lower()
        blocked = lowered.isin(BLOCKED_VALUES) | lowered.str.fullmatch(r"[0-]*").fillna(True)
        out[kind] = col.mask(blocked | col.isna(), None).astype(object)
    return out


def empty_frame() -> pd.DataFrame:
    """An empty canonical frame with the right dtypes."""
    return CANONICAL_SCHEMA.empty_table().to_pandas()


def to_table(rows: Iterable[Mapping[str, object]] | pd.DataFrame) -> pa.Table:
    """Canonical rows (dicts or a frame; missing columns are null) -> an Arrow table."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    frame = frame.reindex(columns=list(CANONICAL_COLUMNS))
    for name in ("observed_at", "received_at"):
        frame[name] = pd.to_datetime(frame[name], utc=True, format="ISO8601")
    if frame["is_deleted"].isna().any():
        frame["is_deleted"] = frame["is_deleted"].astype("boolean").fillna(False)
    for name in ("order_total_minor", "cart_value_minor", "cart_items"):
        frame[name] = pd.to_numeric(frame[name]).astype("Int64")
    frame = frame.astype(
        {
            f.name: object
            for f in CANONICAL_SCHEMA
            if pa.types.is_string(f.type)
        }
    )
    return pa.Table.from_pandas(frame, schema=CANONICAL_SCHEMA, preserve_index=False)


def to_frame(rows: Iterable[Mapping[str, object]] | pd.DataFrame) -> pd.DataFrame:
    """Canonical rows -> a canonical frame (timestamps tz-aware UTC, nullable ints)."""
    return to_table(rows).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


def mask_email(value: object) -> str | None:
    """``john@example.com`` -> ``j***@example.com``: enough to recognise, not enough to
    identify (PII never enters Dagster's event log in the clear). Missing -> None;
    anything without an @ -> ``***``."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return None
    local, at, domain = str(value).rpartition("@")
    if not at or not local:
        return "***"
    return f"{local[0]}***@{domain[:100]}"
