"""YAML configuration into typed dataclasses: one loader for every config in the project.

`load_config(path_or_preset, cls)` reads YAML with `yaml.safe_load` and builds `cls`, recursing
into dataclass-typed fields. Unknown keys are rejected with a message naming the key, where it
sits and the file; values are checked against the field types and against the lower bound a
field declares (`at_least`: counts such as `steps` must be positive). Float fields also take
YAML 1.1's exponent forms that PyYAML reads as strings (`lr: 1e-4`). Presets ship in
`vastdet/configs/` and are named without `.yaml` (`vastdet train --config demo`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

PRESETS = Path(__file__).parent / "configs"
T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that does not fit its schema; names the key and the file."""


# YAML 1.1 (PyYAML) reads `1e-4` and `1.0e5` as strings: its floats need a dot and a signed
# exponent. A float field takes any decimal number written this way.
DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def at_least(minimum: float, default: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A dataclass field whose number (or each number of a list) must be >= `minimum`; checked
    when a config is loaded, the error naming the key and the file. Other modules declare the
    same bound as `field(metadata={"min": n})`."""
    return dataclasses.field(default=default, metadata={"min": minimum}, **kwargs)


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML file's top-level mapping; a file that is not UTF-8 YAML gets one clear error."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    data = data if data is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def merged(base: dict, override: dict) -> dict:
    """`override` on top of `base`, mappings merged key by key at every depth (a preset's
    `data.transforms` survives a file that sets only `data.train_shards`); other values,
    lists included, are replaced whole."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def _check_minimum(value: Any, minimum: float, where: str, source: str) -> None:
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, (int, float)) and not item >= minimum:
            raise ConfigError(f"{source}: {where} must be at least {minimum}, not {value!r}")


def preset_path(name: str | os.PathLike) -> Path:
    """A file path as given, or a preset name from `vastdet/configs/`."""
    path = Path(name)
    if path.is_file():
        return path
    preset = PRESETS / f"{name}.yaml"
    if preset.is_file():
        return preset
    known = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    raise FileNotFoundError(
        f"no config file {name!r} and no preset of that name (presets: {', '.join(known)})"
    )


def _convert(value: Any, hint: Any, where: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a mapping, not {value!r}")
        return from_dict(hint, value, source, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, where, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {where} must be a list, not {value!r}")
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        items = [_convert(v, inner, f"{where}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a mapping, not {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and DECIMAL.fullmatch(value.strip()):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{source}: {where} must be {hint.__name__}, not {value!r}")
    return value


def from_dict(cls: type[T], data: dict, source: str = "<config>", where: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and ill-typed values.

    A `preset` key starts from that preset (or YAML file) and overrides its keys with the
    others, nested mappings key by key: `model: {preset: cq_dino_tiny, init_from: runs/s1}`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    seen: set[str] = set()
    while "preset" in data and "preset" not in names:  # presets may start from presets
        if str(data["preset"]) in seen:
            raise ConfigError(f"{source}: presets name each other in a loop: {sorted(seen)}")
        seen.add(str(data["preset"]))
        base = read_yaml(preset_path(data["preset"]))
        data = merged(base, {k: v for k, v in data.items() if k != "preset"})
    unknown = sorted(set(data) - names)
    if unknown:
        place = f" in {where}" if where else ""
        raise ConfigError(
            f"{source}: unknown key {unknown[0]!r}{place} (known: {', '.join(sorted(names))})"
        )
    values = {
        k: _convert(v, hints[k], f"{where}.{k}" if where else k, source) for k, v in data.items()
    }
    for f in dataclasses.fields(cls):
        if "min" in f.metadata and f.name in values:
            _check_minimum(
                values[f.name], f.metadata["min"], f"{where}.{f.name}".lstrip("."), source
            )
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {where or cls.__name__}: {err}") from None


def load_config(name: str | os.PathLike, cls: type[T]) -> T:
    """Read a YAML file or preset into `cls`."""
    path = preset_path(name)
    return from_dict(cls, read_yaml(path), str(path))
