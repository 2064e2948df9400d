"""Conflict-rule files (PRODUCT.md section 6): the defaults, validation, the config hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from personalization_pipeline.core.rules import (
    ConflictRules,
    ConflictRulesError,
    config_hash,
    load_conflict_rules,
)

CONFIG = Path(__file__).resolve().parents[2] / "personalization_pipeline" / "config"


def test_the_default_rules_are_the_product_table():
    rules = load_conflict_rules(CONFIG / "conflict_rules.yaml")
    assert rules == ConflictRules(
        attributes={
            "first_name": [{"crm": "first_name"}, {"transactional": "first_name"}, {"esp": "first_name"}],
            "last_name": [{"crm": "last_name"}, {"transactional": "last_name"}, {"esp": "last_name"}],
            "city": [{"crm": "city", "transactional": "city", "behavioral": "city"}],
            "country": [
                {"crm": "country", "esp": "country", "transactional": "country", "behavioral": "country"}
            ],
            "loyalty_tier": [{"crm": "loyalty_tier"}],
            "lifecycle_stage": [{"crm": "lifecycle_stage"}],
            "email_consent": [{"esp": "email_consent"}],
            "next_best_category": [{"transactional": "category"}, {"behavioral": "category"}],
            "device_type": [{"behavioral": "device_type"}],
        }
    )
    assert list(rules.attributes) == [
        "first_name", "last_name", "city", "country", "loyalty_tier", "lifecycle_stage",
        "email_consent", "next_best_category", "device_type",
    ]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("city:\n  - {crm: city}\n  - {shopify: city}\n", 3, "unknown source class 'shopify'"),
        ("city:\n  - {crm: town}\n", 2, "unknown column 'town'"),
        ("city:\n  - {crm: source_record_id}\n", 2, "unknown column 'source_record_id'"),
        ("city:\n  - {crm: 12}\n", 2, "unknown column '12'"),
        ("city: []\n", 1, "non-empty list of tiers"),
        ("city:\n", 1, "non-empty list of tiers"),
        ("city: {crm: city}\n", 1, "non-empty list of tiers"),
        ("a: [{crm: city}]\ncity:\n  - {}\n", 3, "non-empty mapping"),
        ("city:\n  - crm\n", 2, "non-empty mapping"),
        ("city: [{crm: city}]\n\ncity: [{esp: city}]\n", 3, "defined twice"),
        ("order_count: [{crm: city}]\n", 1, "reserved profile column"),
        ("City: [{crm: city}]\n", 1, "lower-case identifier"),
        ("city:\n  - {crm: city}\n  - {behavioral: city, crm: city}\n", 3, "'crm' appears twice"),
        ("- city\n", 1, "expected a mapping"),
        ("", 1, "holds no rules"),
        ("city:\n  - {crm: city\n  - x\n", 4, "flow mapping at line 2"),
        ("city:\n  - {crm: city}\n\tbad: 1\n", 3, "not valid YAML"),
    ],
)
def test_bad_rules_name_the_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(ConflictRulesError) as caught:
        load_conflict_rules(path)
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_an_attribute_may_read_different_columns_per_class(tmp_path):
    path = write(tmp_path, "interest:\n  - {transactional: category, behavioral: category}\n  - {crm: lifecycle_stage}\n")
    assert load_conflict_rules(path).attributes == {
        "interest": [{"transactional": "category", "behavioral": "category"}, {"crm": "lifecycle_stage"}]
    }


def test_config_hash_follows_the_bytes(tmp_path):
    rules = CONFIG / "conflict_rules.yaml"
    limits = CONFIG / "identity_limits.yaml"
    digest = config_hash(rules, limits)
    assert len(digest) == 64 and digest == config_hash(str(rules), str(limits))
    assert config_hash(limits, rules) != digest

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("x: 1\n")
    b.write_text("y: 2\n")
    before = config_hash(a, b)
    b.write_text("y: 3\n")
    assert config_hash(a, b) != before
    # Moving bytes from one file to the next changes the hash too.
    a.write_text("x: 1\ny")
    b.write_text(": 3\n")
    c, d = tmp_path / "c.yaml", tmp_path / "d.yaml"
    c.write_text("x: 1\n")
    d.write_text("y: 3\n")
    assert config_hash(a, b) != config_hash(c, d)
