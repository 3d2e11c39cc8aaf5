"""Where the config partition is: --config, else $MIRRORUNIT_CONFIG, else
DEFAULT_CONFIG_PATH; and the store opened on it with its remount hook.  The
`mirrorunit config` commands are in firmware/apps/config."""

from __future__ import annotations

import os

from .mount import RemountHook
from .store import ConfigStore, StoreSettings

ENV_CONFIG = "MIRRORUNIT_CONFIG"
DEFAULT_CONFIG_PATH = "/etc/mirrorunit/config.slots"


def default_config_path() -> str:
    return os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH


def open_store(path: str | os.PathLike[str] | None = None) -> ConfigStore:
    p = os.fspath(path) if path is not None else default_config_path()
    return ConfigStore(StoreSettings(p), remount=RemountHook(p))
