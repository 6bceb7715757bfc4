"""``papo train``'s typed config: sections, presets (YAML files beside this module) and overrides."""

from papo.config.schema import PRESETS, TrainConfig, apply, load_config, preset_path
from papo.errors import ConfigError

__all__ = ["PRESETS", "ConfigError", "TrainConfig", "apply", "load_config", "preset_path"]
