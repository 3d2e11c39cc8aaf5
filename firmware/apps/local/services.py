"""The local unit built from its settings: the data path first, then each service over it,
in the order they start (and stop in reverse)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from ...local import DataPath, LocalUnit, LocalUnitError
from ...local.unit import NbdFrontEnd, Service
from .settings import LocalAppSettings, ReplicationSettings, UpsSettings, UsbSettings

log = logging.getLogger("mirrorunit.local")


def usb_front_end(settings: UsbSettings, data: DataPath) -> Service:
    from ...scsi import LogicalUnit
    from ...usb_gadget.service import UsbService

    # A volume on a disk that can be unplugged is a removable medium to the host: Linux
    # re-reads a removable unit's capacity once MEDIUM NOT PRESENT is over, while a fixed
    # disk that once reported it stays failed until it is probed again.
    lu = LogicalUnit(data.volume, serial=settings.scsi_serial or settings.gadget.serial_number,
                     vendor=settings.scsi_vendor, product=settings.scsi_product,
                     revision=settings.scsi_revision, read_only=settings.read_only,
                     removable=data.disk_identity is not None)
    return UsbService(lu, settings.gadget)


def replication(settings: ReplicationSettings, local: LocalAppSettings,
                data: DataPath) -> Service:
    from ...link.tls import PeerStore, unit_identity
    from ...local.replication import LinkService, default_local_state_dir

    names = [r.name for r in settings.remotes]
    state_dir = settings.state_dir or default_local_state_dir(local.unit.buffer)
    identity, unit_id = unit_identity(state_dir, settings.unit_id)
    peers = PeerStore.in_dir(state_dir)
    cbq = data.cbq
    if settings.prune_default_consumer and "remote" in cbq.consumers and "remote" not in names:
        # The default consumer nobody replicates to would pin the queue's space.
        cbq.remove_consumer("remote")
    for name in names:
        if peers.get(name) is None:
            logging.getLogger("mirrorunit.link").error(
                "remote %s is not paired: pin its certificate with `mirrorunit pair` "
                "(state dir %s); the link will be refused until then", name, state_dir)
    return LinkService(cbq=cbq, volume=data.volume, identity=identity, peers=peers,
                       unit_id=unit_id, remotes=list(settings.remotes), state_dir=state_dir,
                       bandwidth=settings.bandwidth, compression=settings.compression,
                       signature=settings.signature, config_path=settings.config)


def ups_monitor(settings: UpsSettings, data: DataPath) -> Service:
    from ...config.store import open_store
    from ...ups.service import UpsService, command_hook

    return UpsService(data.volume, open_store(settings.config),
                      command_hook(settings.poweroff_command))


def external_disks(data: DataPath) -> list[Service]:
    """The watchers of the data and buffer disks named by identity."""
    from ...local.external_disk import BufferDiskService, ExternalDiskService

    out: list[Service] = []
    disk: ExternalDiskService | None = None
    if data.disk_identity is not None:
        assert data.udev is not None
        disk = ExternalDiskService(data.volume, data.disk_identity, data.udev,
                                   node=data.mirror.path)
        out.append(disk)
    if data.buffer_identity is not None:
        assert data.udev is not None
        out.append(BufferDiskService(data.volume, data.buffer_identity, data.udev, data=disk,
                                     node=data.cbq_storage.path))
    return out


def build_services(s: LocalAppSettings, data: DataPath) -> list[Service]:
    # First: the disks are watched before any front end lets a host write to them.
    services: list[Service] = external_disks(data)
    if s.nbd is not None:
        services.append(NbdFrontEnd(data.volume, s.nbd.address, s.nbd.export_name))
    if s.usb is not None:
        services.append(usb_front_end(s.usb, data))
    if s.replication.remotes:
        services.append(replication(s.replication, s, data))
    if s.ups is not None:
        services.append(ups_monitor(s.ups, data))
    return services


def build_unit(s: LocalAppSettings) -> LocalUnit:
    data = DataPath.open(s.unit)
    try:
        return LocalUnit(s.unit, build_services(s, data), data=data)
    except BaseException:
        data.close()
        raise


def run(s: LocalAppSettings) -> int:
    """Run the local unit until SIGTERM/SIGINT; 2 when it cannot start as configured."""
    try:
        unit = build_unit(s)
        unit.start()
    except (LocalUnitError, OSError) as e:
        print(f"mirrorunit local: {e}", file=sys.stderr)
        return 2
    threading.Thread(target=_restart_watchdog, args=(unit,), name="restart-watchdog",
                     daemon=True).start()
    unit.run_forever()
    if unit.restart_reason is not None:
        restart(unit.restart_reason)
    return 0


#: how long a stop before a restart may take before the restart goes ahead without it
RESTART_STOP_SECONDS = 30.0


def _restart_watchdog(unit: LocalUnit) -> None:
    unit.stopping.wait()
    if unit.restart_reason is None:
        return
    time.sleep(RESTART_STOP_SECONDS)
    # Still here: a service did not stop on the lost disk.  The restart is as safe as
    # after a power cut, which the queue is built for.
    logging.getLogger("mirrorunit.local").error(
        "the unit did not stop in %g s; restarting without it", RESTART_STOP_SECONDS)
    restart(unit.restart_reason)


def restart(reason: str) -> None:
    """Start this program again in this process (same pid, so a service manager sees
    no exit): the command line it was started with, from the beginning."""
    logging.getLogger("mirrorunit.local").warning("restarting: %s", reason)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
