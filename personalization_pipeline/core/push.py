"""What to push to the ESP: the field mapping, type conversion and the diff against what
the ESP last acknowledged (PRODUCT.md section 8). Pure functions, no I/O."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
import yaml

from personalization_pipeline.core import canonical
from personalization_pipeline.core.canonical import normalise_identifier

FIELD_TYPES = ("text", "number", "date")
PUSHABLE_STATUSES = frozenset({"subscribed", "unsubscribed", "pending", "transactional"})
"""Members the push may update; cleaned and archived addresses are left alone."""
TEXT_LIMIT = 255


class FieldMappingError(ValueError):
    pass


@dataclass(frozen=True)
class FieldSpec:
    column: str
    tag: str
    name: str
    type: str
    scale: float = 1.0


@dataclass(frozen=True)
class FieldMapping:
    fields: tuple[FieldSpec, ...]

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(f.tag for f in self.fields)


def load_field_mapping(path: str | Path) -> FieldMapping:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise FieldMappingError(f"{path}: cannot read the ESP field mapping: {exc}") from None
    entries = (doc or {}).get("fields") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise FieldMappingError(f"{path}: expected a non-empty `fields:` list")
    specs, tags = [], set()
    for number, entry in enumerate(entries, start=1):
        where = f"{path}: field #{number}"
        if not isinstance(entry, dict) or not {"column", "tag", "type"} <= entry.keys():
            raise FieldMappingError(f"{where}: needs column, tag and type")
        tag = str(entry["tag"])
        if not (1 <= len(tag) <= 10 and tag.isupper() and tag.replace("_", "").isalnum()):
            raise FieldMappingError(f"{where}: tag {tag!r} must be 1-10 upper-case letters or digits")
        if tag in tags:
            raise FieldMappingError(f"{where}: tag {tag!r} appears twice")
        if entry["type"] not in FIELD_TYPES:
            raise FieldMappingError(f"{where}: type must be one of {FIELD_TYPES}, got {entry['type']!r}")
        tags.add(tag)
        specs.append(
            FieldSpec(
                column=str(entry["column"]),
                tag=tag,
                name=str(entry.get("name") or tag),
                type=entry["type"],
                scale=float(entry.get("scale", 1)),
            )
        )
    return FieldMapping(tuple(specs))


def _missing(value: object) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


def convert(value: object, spec: FieldSpec) -> object:
    """A profile value -> the ESP's representation. Missing values clear the field ("")."""
    if _missing(value):
        return ""
    if spec.type == "number":
        number = float(value) / spec.scale
        return int(number) if number.is_integer() else round(number, 2)
    if spec.type == "date":
        moment = value if isinstance(value, datetime) else pd.Timestamp(value).to_pydatetime()
        return moment.strftime("%Y-%m-%d")
    return str(value)[:TEXT_LIMIT]


def payload_hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def desired_member_fields(
    profiles: pd.DataFrame,
    identity_map: pd.DataFrame,
    members: pd.DataFrame,
    mapping: FieldMapping,
) -> pd.DataFrame:
    """For every known list member whose email belongs to a profile: the merge fields the
    ESP should hold. `members` has member_hash, email, status (the members pull's current
    state); only known members are returned, so the push never creates an address.

    Returns member_hash, email, profile_id, fields (dict), payload_hash.
    """
    columns = ["member_hash", "email", "profile_id", "fields", "payload_hash"]
    if profiles.empty or members.empty:
        return pd.DataFrame(columns=columns)
    emails = identity_map[identity_map["identifier_type"] == "email"][["identifier_value", "profile_id"]]
    pushable = members[members["status"].isin(PUSHABLE_STATUSES)].copy()
    pushable["email_norm"] = [normalise_identifier("email", e) for e in pushable["email"]]
    joined = pushable.merge(emails, left_on="email_norm", right_on="identifier_value", how="inner")
    joined = joined.merge(profiles, on="profile_id", how="inner", suffixes=("", "_profile"))
    records = []
    for row in joined.to_dict("records"):
        fields = {spec.tag: convert(row.get(spec.column), spec) for spec in mapping.fields}
        records.append(
            {
                "member_hash": row["member_hash"],
                "email": row["email"],
                "profile_id": row["profile_id"],
                "fields": fields,
                "payload_hash": payload_hash(fields),
            }
        )
    out = pd.DataFrame.from_records(records, columns=columns)
    return out.sort_values("member_hash", kind="stable").reset_index(drop=True)


def changed_members(desired: pd.DataFrame, acknowledged: dict[str, str]) -> pd.DataFrame:
    """Members whose desired payload differs from the last one the ESP acknowledged."""
    if desired.empty:
        return desired
    last = desired["member_hash"].map(acknowledged)
    return desired[last.ne(desired["payload_hash"]) | last.isna()].reset_index(drop=True)


def chunks(frame: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    return [frame.iloc[i : i + size] for i in range(0, len(frame), size)]


def mask_email(email: object) -> str:
    """`canonical.mask_email`, with a missing address shown as ``***`` too."""
    return canonical.mask_email(email) or "***"
