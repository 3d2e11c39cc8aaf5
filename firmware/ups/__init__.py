"""UPS monitor: drivers for UPS HAT chips and power-fail inputs, NUT-style status,
and the power-loss policy that flushes the volume's write cache and shuts down cleanly."""

from .drivers import (
    GpioPowerInput,
    Ina219,
    Max1704x,
    NoUps,
    SMBusLike,
    UpsDriver,
    build_driver,
    import_rpi_gpio,
)
from .errors import UpsDriverError, UpsError
from .monitor import UpsMonitor, monitor_from_config
from .policy import CachedVolume, PolicyEvent, PolicySettings, PolicyState, UpsPolicy
from .status import RuntimeEstimator, StatusTracker, UpsFlag, UpsReading, UpsStatus

__all__ = [
    "CachedVolume", "GpioPowerInput", "Ina219", "Max1704x", "NoUps", "PolicyEvent",
    "PolicySettings", "PolicyState", "RuntimeEstimator", "SMBusLike", "StatusTracker",
    "UpsDriver", "UpsDriverError", "UpsError", "UpsFlag", "UpsMonitor", "UpsPolicy",
    "UpsReading", "UpsStatus", "build_driver", "import_rpi_gpio", "monitor_from_config",
]
