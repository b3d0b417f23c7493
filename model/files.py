"""The one reader of the JSON and YAML files handloom reads (configs, meta.json, tokenizer and model
configs): a file that is missing, empty, not UTF-8 or does not parse is an error naming the file, and
the line and column where parsing stopped, never a bare JSONDecodeError or KeyError.

Lives in model/ because model/tokenizer.py needs it and model/ imports nothing from train/ or
checkpoints/; everything else imports it from here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read_json(path: str | os.PathLike, keys: Iterable[str] = ()) -> Any:
    """The parsed JSON file. With `keys`, the file must hold an object with every one of them."""
    path = Path(path)
    text = _read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    return _check_keys(path, value, keys)


def read_yaml(path: str | os.PathLike, keys: Iterable[str] = ()) -> Any:
    """The parsed YAML file (safe_load: plain data, never Python objects; an empty file is None). With
    `keys`, as read_json."""
    import yaml  # only config files need it

    path = Path(path)
    text = _read_text(path, allow_empty=True)
    try:
        value = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark  # 0-based
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}: invalid YAML{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    return _check_keys(path, value, keys)


def _read_text(path: Path, allow_empty: bool = False) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a folder, not a file") from None
    if not data.strip() and not allow_empty:
        raise ValueError(f"{path}: empty file")
    try:
        return data.decode("utf-8-sig")  # a byte-order mark some editors write is not content
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: not valid UTF-8 at line {line} (byte {e.start})") from None


def _check_keys(path: Path, value: Any, keys: Iterable[str]) -> Any:
    keys = list(keys)
    if not keys:
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON/YAML object with keys {keys}, found a {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise ValueError(f"{path}: missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                         f"(found {sorted(value)})")
    return value
