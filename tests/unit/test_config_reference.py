"""docs/configuration.md is the one configuration reference; this test keeps it equal to
``PluginConfig``: every key the model accepts is a row and every row a key, and every documented
default is the model's default."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic_core import PydanticUndefined

from cniplugin.protocol.config import NODE_ONLY_KEYS, DetectOptions, PluginConfig, parse_go_duration
from cniplugin.protocol.log import LogOptions, resolve_log_options

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
NESTED = ("detectOptions", "logOptions")


def _tables() -> dict[str, dict[str, str]]:
    """section heading -> {key: default cell as written}, for every ``| key | type | default |``
    table; a row naming several keys (`a`, `b`) gives each the row's default."""
    tables: dict[str, dict[str, str]] = {}
    section = ""
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        default = re.fullmatch(r"`(.*)`", cells[2])
        assert default, f"default of {cells[0]} is not one `JSON value`: {cells[2]!r}"
        for key in re.findall(r"`([\w.]+)`", cells[0]):
            assert key not in tables.get(section, {}), f"{key} documented twice"
            tables.setdefault(section, {})[key] = default.group(1)
    return tables


def _documented() -> dict[str, object]:
    """Every documented key (``detectOptions.retries`` for nested ones) -> its default, parsed."""
    merged: dict[str, object] = {}
    for rows in _tables().values():
        assert not set(rows) & set(merged), "a key is documented in two tables"
        merged.update({key: json.loads(cell) for key, cell in rows.items()})
    return merged


def _aliases() -> dict[str, str]:
    """JSON key -> attribute name, for every field of PluginConfig."""
    return {field.alias or name: name for name, field in PluginConfig.model_fields.items()}


def test_the_reference_has_exactly_the_two_tables():
    assert sorted(_tables()) == ["Network config keys", "Node-only keys"]


def test_every_key_the_model_accepts_is_documented_and_nothing_else():
    top_level = {key for key in _documented() if "." not in key}
    assert top_level == set(_aliases())


def test_the_node_only_table_is_exactly_the_node_only_keys():
    assert set(_tables()["Node-only keys"]) == set(NODE_ONLY_KEYS)


def test_detect_options_keys_are_the_model_fields():
    documented = {key.split(".", 1)[1] for key in _documented() if key.startswith("detectOptions.")}
    assert documented == {field.alias or name for name, field in DetectOptions.model_fields.items()}


def test_log_options_keys_cover_every_resolved_field_once():
    """Each documented ``logOptions`` key, set to a value other than its default, changes exactly
    one field of the resolved ``LogOptions``, and together they change every field."""
    documented = {key.split(".", 1)[1]: value for key, value in _documented().items()
                  if key.startswith("logOptions.")}
    other = {"logLevel": "debug", "logFile": "other.log", "logMaxSize": 7, "logMaxAge": 8,
             "logMaxCount": 9}
    assert set(other) == set(documented), "give the new logOptions key a non-default value here"
    baseline = resolve_log_options(documented, "/var/log/route-tune")
    changed = {}
    for key, value in other.items():
        varied = resolve_log_options({**documented, key: value}, "/var/log/route-tune")
        changed[key] = [f for f in LogOptions._fields if getattr(varied, f) != getattr(baseline, f)]
    assert sorted(f for fields in changed.values() for f in fields) == sorted(LogOptions._fields)
    assert all(len(fields) == 1 for fields in changed.values()), changed


def test_plain_defaults_equal_the_model_defaults():
    documented = _documented()
    model = {}
    for key, name in _aliases().items():
        field = PluginConfig.model_fields[name]
        if key not in NESTED:
            assert field.default is not PydanticUndefined, key
            model[key] = field.default
    assert {key: documented[key] for key in model} == model


def test_nested_defaults_equal_the_model_defaults():
    documented = _documented()
    assert {key: documented[key] for key in NESTED} == {key: {} for key in NESTED}
    detect = {key.split(".", 1)[1]: value for key, value in documented.items()
              if key.startswith("detectOptions.")}
    as_seconds = {k: parse_go_duration(v) if k in ("interval", "timeout") else v
                  for k, v in detect.items()}
    assert as_seconds == DetectOptions().model_dump()


def test_the_documented_defaults_validate_to_the_model_built_from_nothing():
    config: dict[str, object] = {}
    for key, value in _documented().items():
        parent, _, child = key.partition(".")
        if child:
            config[parent] = {**config[parent], child: value}
        else:
            config[key] = value
    assert PluginConfig.model_validate(config).model_dump() == \
        PluginConfig.model_validate({}).model_dump()


def test_the_documented_duration_examples_parse():
    line = next(line for line in REFERENCE.read_text().splitlines()
                if line.startswith("Durations are Go's"))
    examples = re.findall(r"`([^`]+)`", line.partition(":")[2])
    assert {e: parse_go_duration(e) for e in examples} == \
        {"100ms": 0.1, "1.5s": 1.5, "1m30s": 90.0, "500us": 0.0005, "0": 0.0}
