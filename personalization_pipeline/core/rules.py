"""Conflict rules: which observation of an attribute wins (PRODUCT.md section 6).

The rules live in ``config/conflict_rules.yaml``. Each attribute has an ordered list of
tiers; a tier maps source classes to the canonical column they read::

    city:
      - {crm: city, transactional: city, behavioral: city}
    next_best_category:
      - {transactional: category}
      - {behavioral: category}

Among the non-null, non-empty observations of an attribute for a profile, the winner has
the smallest key (tier index, -observed_at, source, source_record_id). Classes a rule does
not name are ignored for that attribute. ``core/profiles.py`` applies the rules.

Also here: ``config_hash``, the hash of the rule, limit and mapping files stored with the
tables, so that a change of configuration forces a rebuild instead of mixing rule sets.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import pyarrow as pa
import yaml

from personalization_pipeline.core.canonical import CANONICAL_SCHEMA, SOURCE_CLASS

SOURCE_CLASSES = tuple(dict.fromkeys(SOURCE_CLASS.values()))
"""The source classes a rule may name (PRODUCT.md section 4)."""

_BOOKKEEPING_COLUMNS = {"source", "source_class", "source_record_id", "record_kind"}
READABLE_COLUMNS = tuple(
    field.name
    for field in CANONICAL_SCHEMA
    if pa.types.is_string(field.type) and field.name not in _BOOKKEEPING_COLUMNS
)
"""Canonical columns a rule may read: the string-valued observation and event columns."""

AGGREGATE_COLUMNS = (
    "order_count",
    "lifetime_value",
    "last_order_at",
    "cart_value",
    "cart_items",
    "cart_started_at",
    "last_viewed_product",
    "last_email_open_at",
    "last_email_click_at",
    "last_seen_at",
)
"""Profile columns computed from events, not by conflict rules."""
RESERVED_NAMES = ("profile_id", "primary_email", "emails", *AGGREGATE_COLUMNS)
"""Columns of resolved_profiles that are not rule attributes; a rule may not take them."""

_ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class ConflictRulesError(ValueError):
    """A conflict-rules file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class ConflictRules:
    """Attribute -> ordered tiers; each tier maps a source class to the column it reads.

    Attributes keep the order of the file; that order is the column order of
    resolved_profiles.
    """

    attributes: dict[str, list[dict[str, str]]]


def load_conflict_rules(path: str | PathLike[str]) -> ConflictRules:
    """Read and validate a conflict-rules YAML file.

    Rejected, with ``ConflictRulesError("<file>:<line>: <what is wrong>")``: YAML that does
    not parse; a top level that is not a mapping; an attribute name that is not a
    lower-case identifier, is repeated, or is a reserved profile column; tiers that are
    not a non-empty list of non-empty mappings; an unknown source class; a class named
    twice in one attribute (a record gives at most one observation per attribute); a
    column that is not a readable canonical column.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and context_mark is not None:
            problem = f"{problem} ({context} at line {context_mark.line + 1})"
        raise ConflictRulesError(f"{path}:{line}: not valid YAML: {problem}") from exc

    def fail(node: yaml.Node | None, message: str) -> ConflictRulesError:
        line = node.start_mark.line + 1 if node is not None else 1
        return ConflictRulesError(f"{path}:{line}: {message}")

    if root is None:
        raise fail(None, "the file holds no rules")
    if not isinstance(root, yaml.MappingNode):
        raise fail(root, "expected a mapping of attribute name -> list of tiers")

    attributes: dict[str, list[dict[str, str]]] = {}
    for name_node, tiers_node in root.value:
        name = _scalar(name_node)
        if name is None or not _ATTRIBUTE_NAME.match(name):
            raise fail(
                name_node, f"attribute name {_show(name_node)} must be a lower-case identifier"
            )
        if name in attributes:
            raise fail(name_node, f"attribute {name!r} is defined twice")
        if name in RESERVED_NAMES:
            raise fail(name_node, f"attribute {name!r} is a reserved profile column")
        if not isinstance(tiers_node, yaml.SequenceNode) or not tiers_node.value:
            raise fail(
                tiers_node,
                f"attribute {name!r}: expected a non-empty list of tiers, "
                "e.g. [{crm: city}, {behavioral: city}]",
            )
        tiers: list[dict[str, str]] = []
        seen_classes: set[str] = set()
        for tier_node in tiers_node.value:
            if not isinstance(tier_node, yaml.MappingNode) or not tier_node.value:
                raise fail(
                    tier_node,
                    f"attribute {name!r}: a tier must be a non-empty mapping of "
                    "source class -> column",
                )
            tier: dict[str, str] = {}
            for class_node, column_node in tier_node.value:
                source_class = _scalar(class_node)
                if source_class not in SOURCE_CLASSES:
                    raise fail(
                        class_node,
                        f"attribute {name!r}: unknown source class {_show(class_node)}; "
                        f"known: {', '.join(SOURCE_CLASSES)}",
                    )
                if source_class in seen_classes:
                    raise fail(
                        class_node,
                        f"attribute {name!r}: source class {source_class!r} appears twice",
                    )
                column = _scalar(column_node)
                if column not in READABLE_COLUMNS:
                    raise fail(
                        column_node,
                        f"attribute {name!r}: unknown column {_show(column_node)} for "
                        f"{source_class!r}; readable canonical columns: "
                        f"{', '.join(READABLE_COLUMNS)}",
                    )
                seen_classes.add(source_class)
                tier[source_class] = column
            tiers.append(tier)
        attributes[name] = tiers
    return ConflictRules(attributes=attributes)


def config_hash(*paths: str | PathLike[str]) -> str:
    """sha256 (hex) over the bytes of the given configuration files, in the given order.

    Each file's length goes in before its bytes, so moving text from one file to the next
    changes the hash. File names do not take part: moving the checkout changes nothing.
    Call it with the files in a fixed order (rules, limits, mapping).
    """
    digest = hashlib.sha256()
    for path in paths:
        data = Path(path).read_bytes()
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def _scalar(node: yaml.Node) -> str | None:
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
        return node.value
    return None


def _show(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return repr(node.value)
    return f"<{type(node).__name__.removesuffix('Node').lower()}>"
