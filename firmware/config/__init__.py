"""Appliance configuration: one versioned schema, a two-slot store, peer backup blobs."""

from .errors import (
    ConfigError,
    ConfigStoreError,
    SealError,
    SealFormatError,
    SealTampered,
    WrongPassword,
)
from .password import (
    MIN_PASSWORD_LENGTH,
    check_admin_password,
    hash_password,
    set_admin_password,
    verify_password,
)
from .schema import (
    FIELDS,
    SCHEMA,
    SCHEMA_VERSION,
    BoardLimits,
    Config,
    ConfigDiff,
    Field,
    diff_live,
    format_show,
    from_document,
    parse_size,
    set_value,
    show,
    validate,
)
from .seal import seal, unseal
from .store import (
    ConfigStore,
    LoadResult,
    SetResult,
    SlotInfo,
    SlotStatus,
    StoreSettings,
    StoreState,
    export_config,
    import_config,
)

__all__ = [
    "FIELDS", "MIN_PASSWORD_LENGTH", "SCHEMA", "SCHEMA_VERSION", "BoardLimits", "Config",
    "ConfigDiff", "ConfigError", "ConfigStore", "ConfigStoreError", "Field", "LoadResult",
    "SealError", "SealFormatError", "SealTampered", "SetResult", "SlotInfo", "SlotStatus",
    "StoreSettings", "StoreState", "WrongPassword", "check_admin_password", "diff_live",
    "export_config", "format_show", "from_document", "hash_password", "import_config",
    "parse_size", "seal", "set_admin_password", "set_value", "show", "unseal", "validate",
    "verify_password",
]
