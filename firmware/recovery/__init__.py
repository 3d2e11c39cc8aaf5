"""Config recovery: a unit's sealed config handed to its peers, and brought back
from one of them (by a unit whose identity is intact, or by a replaced one that
proves the admin password).  It sits above both the journey link, which moves the
sealed blobs, and the config, which seals and opens them."""

from firmware.recovery.failures import describe_recovery_failure
from firmware.recovery.restore import PeerRecovery, RestoreResult, fetch_own_backup
from firmware.recovery.sealing import seal_into_state_dir

__all__ = [
    "PeerRecovery",
    "RestoreResult",
    "describe_recovery_failure",
    "fetch_own_backup",
    "seal_into_state_dir",
]
