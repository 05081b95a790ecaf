"""Merge a Hydra/OmegaConf config onto its typed schema and fail early, naming the key."""

from __future__ import annotations

import os
import sys
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid; the message names the key."""


def load_config(schema: type[T], raw: DictConfig | dict[str, Any]) -> T:
    """Validate `raw` against the dataclass `schema` and return a typed instance.

    The YAML is merged onto the structured schema in struct mode, so an unknown key, a wrong
    type or a value outside an enum fails with the full key and the allowed values; then each
    dataclass's `__post_init__` checks values that span fields.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from None
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).split("\n")[0]
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        return f"unknown config key '{key}' ({msg}); check its spelling against the shipped YAML"
    return f"invalid config value for '{key}': {msg}" if key else msg



def instantiate_target(spec: dict[str, Any], *, key: str) -> Any:
    """Build the object the `_target_` config at `key` names; modules are looked up from the working
    directory too (a user's own module beside the run). A target that cannot be imported or built
    is a ConfigError naming `key`."""
    import hydra.utils
    from hydra.errors import InstantiationException

    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return hydra.utils.instantiate(spec)
    except InstantiationException as err:
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise ConfigError(f"{key}: {message.replace(', set env var HYDRA_FULL_ERROR=1 to see chained exception', '')}") from None

