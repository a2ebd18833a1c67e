"""Settings from a YAML file plus command-line overrides, validated by the settings model."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .errors import ConfigError

T = TypeVar("T", bound=BaseModel)


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict):
            out[key] = _merge(out.get(key) or {}, value)
        elif value is not None:
            out[key] = value
    return out


def settings_error(e: ValidationError, where: str = "") -> ConfigError:
    """One line naming every invalid field, from pydantic's error."""
    problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
    return ConfigError(f"invalid settings{where}: {problems}")


def read_mapping(path: Path, what: str = "config file") -> dict:
    """A YAML file holding a mapping of settings, or a one-line ConfigError naming the fault."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, not {type(data).__name__}")
    return data


def load_settings(model: type[T], path: Path | None, overrides: dict) -> T:
    """Read `path` (YAML mapping, optional), apply the non-None `overrides`, validate."""
    data = read_mapping(path) if path is not None else {}
    try:
        return model.model_validate(_merge(data, overrides))
    except ValidationError as e:
        raise settings_error(e, f" in {path}" if path else "") from e


def dump_settings(settings: BaseModel, path: Path) -> None:
    from .atomic import write_atomic

    write_atomic(path, yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
