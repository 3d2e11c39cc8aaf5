"""SCSI block target over BlockDevices: CDB in, data/status/sense out, no I/O of its own."""

from firmware.scsi.sense import CheckCondition, SenseKey
from firmware.scsi.target import (
    Command,
    CommandResult,
    DataDirection,
    LogicalUnit,
    ParsedCommand,
    ScsiTarget,
    Status,
)

__all__ = [
    "CheckCondition",
    "Command",
    "CommandResult",
    "DataDirection",
    "LogicalUnit",
    "ParsedCommand",
    "ScsiTarget",
    "SenseKey",
    "Status",
]
