"""Settings as YAML, before any schema: a file read as a mapping, and ``--set KEY=VALUE``
parsed (the value as YAML) and applied to one. Plain dicts; the typed schema is
``faceage.config``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from faceage.errors import UserError


def parse_override(item: str) -> tuple[list[str], Any]:
    """``dotted.key=value`` → (``["dotted", "key"]``, value parsed as YAML).

    The one ``--set`` syntax of ``faceage train``, ``faceage tune`` and
    ``python -m faceage.serving.local``: the value is YAML, so ``3``, ``0.001``, ``true``,
    ``[a, b]`` and ``{k: v}`` get their types and anything YAML cannot read stays a string
    (``1e-4`` too, YAML 1.1 wanting ``1.0e-4``; the schema's float fields still take it).
    """
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise UserError(f"--set {item!r}: expected KEY=VALUE with a dotted key, "
                        "e.g. --set train.batch_size=32")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    return [p.strip() for p in parts], value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a raw config dict (in place) and return it."""
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping; every way it can be wrong is one ``UserError``."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of settings at the top level")
    return raw
