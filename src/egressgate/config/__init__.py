"""Configuration: YAML -> validated, frozen ``Config``. See ``schema`` for every key."""

from .loader import load_config, load_config_text
from .schema import Config

__all__ = ["Config", "load_config", "load_config_text"]
