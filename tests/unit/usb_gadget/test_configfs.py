"""configfs gadget setup/teardown against a fake configfs tree; FunctionFS blobs."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from firmware.usb_gadget import functionfs as ffs
from firmware.usb_gadget.configfs import (
    ConfigfsOps,
    Gadget,
    GadgetError,
    GadgetSettings,
    gadget_down,
    gadget_up,
)


class FakeConfigfs(ConfigfsOps):
    """Plain directories behaving like configfs where it matters here.

    In configfs an item's attribute files and default groups vanish with it and a
    directory holding child items or links cannot be removed; writing "" to UDC
    of an unbound gadget fails with ENODEV.
    """

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.fail_unbind_with: int | None = None

    def write(self, path: Path, value: str) -> None:
        self.log.append(("write", f"{path.name}={value}"))
        if path.name == "UDC" and not value:
            if self.fail_unbind_with is not None:
                raise OSError(self.fail_unbind_with, os.strerror(self.fail_unbind_with))
            if not path.exists() or not path.read_text().strip():
                raise OSError(errno.ENODEV, "No such device")
        super().write(path, value)

    def rmdir(self, path: Path) -> None:
        self.log.append(("rmdir", str(path)))
        if not path.exists():
            raise OSError(errno.ENOENT, "No such file or directory")
        for child in path.iterdir():
            if child.is_symlink() or (child.is_dir() and any(child.iterdir())):
                raise OSError(errno.ENOTEMPTY, "Directory not empty")
        for child in path.iterdir():
            child.rmdir() if child.is_dir() else child.unlink()
        path.rmdir()


@pytest.fixture
def settings(tmp_path: Path) -> GadgetSettings:
    (tmp_path / "config" / "usb_gadget").mkdir(parents=True)
    (tmp_path / "udc" / "dummy_udc.0").mkdir(parents=True)
    (tmp_path / "udc" / "dummy_udc.1").mkdir(parents=True)
    return GadgetSettings(
        configfs_root=tmp_path / "config",
        udc_class_dir=tmp_path / "udc",
        ffs_mount=tmp_path / "ffs",
        serial_number="SN42",
    )


def read(path: Path) -> str:
    return path.read_text().strip()


def test_create_writes_descriptor_fields(settings: GadgetSettings) -> None:
    gadget_up(settings, FakeConfigfs())
    g = settings.gadget_dir
    assert read(g / "idVendor") == "0x1d6b"
    assert read(g / "idProduct") == "0x0104"
    assert read(g / "bcdUSB") == "0x0200"
    assert read(g / "strings" / "0x409" / "serialnumber") == "SN42"
    assert read(g / "strings" / "0x409" / "manufacturer") == "MirrorUnit"
    assert read(g / "configs" / "c.1" / "MaxPower") == "250"
    link = g / "configs" / "c.1" / "ffs.mass"
    assert link.is_symlink()
    assert link.resolve() == (g / "functions" / "ffs.mass").resolve()
    assert not (g / "UDC").exists()  # not bound before FunctionFS has descriptors


def test_create_is_idempotent(settings: GadgetSettings) -> None:
    ops = FakeConfigfs()
    gadget_up(settings, ops)
    gadget_up(settings, ops)
    assert read(settings.gadget_dir / "idVendor") == "0x1d6b"


def test_bind_defaults_to_first_udc_and_rebinding_is_a_no_op(settings: GadgetSettings) -> None:
    ops = FakeConfigfs()
    gadget = gadget_up(settings, ops)
    assert gadget.bind() == "dummy_udc.0"
    assert read(settings.gadget_dir / "UDC") == "dummy_udc.0"
    writes = len(ops.log)
    gadget.bind()
    assert len(ops.log) == writes


def test_bind_uses_configured_udc(settings: GadgetSettings, tmp_path: Path) -> None:
    s = GadgetSettings(
        configfs_root=settings.configfs_root, udc_class_dir=settings.udc_class_dir,
        udc="dummy_udc.1",
    )
    assert gadget_up(s, FakeConfigfs()).bind() == "dummy_udc.1"


def test_bind_without_udc_names_the_directory(settings: GadgetSettings, tmp_path: Path) -> None:
    s = GadgetSettings(configfs_root=settings.configfs_root, udc_class_dir=tmp_path / "none")
    with pytest.raises(GadgetError, match="no UDC"):
        gadget_up(s, FakeConfigfs()).bind()


def test_missing_configfs_is_reported(tmp_path: Path) -> None:
    s = GadgetSettings(configfs_root=tmp_path / "nothing")
    with pytest.raises(GadgetError, match="usb_gadget"):
        gadget_up(s, FakeConfigfs())


def test_down_removes_everything_in_order(settings: GadgetSettings) -> None:
    ops = FakeConfigfs()
    gadget_up(settings, ops).bind()
    gadget_down(settings, ops)
    assert not settings.gadget_dir.exists()
    assert ("write", "UDC=") in ops.log
    removed = [p for op, p in ops.log if op == "rmdir"]
    # configs before the functions they link to, the gadget itself last
    assert removed.index(str(settings.gadget_dir / "configs" / "c.1")) < removed.index(
        str(settings.gadget_dir / "functions" / "ffs.mass")
    )
    assert removed[-1] == str(settings.gadget_dir)


def test_down_twice_and_on_missing_gadget(settings: GadgetSettings) -> None:
    ops = FakeConfigfs()
    gadget_down(settings, ops)
    gadget_up(settings, ops)
    gadget_down(settings, ops)
    gadget_down(settings, ops)
    assert not settings.gadget_dir.exists()


def test_down_tolerates_partial_state(settings: GadgetSettings) -> None:
    ops = FakeConfigfs()
    gadget_up(settings, ops)
    g = settings.gadget_dir
    # as if a previous setup died after creating the config but before linking
    (g / "configs" / "c.1" / "ffs.mass").unlink()
    (g / "functions" / "ffs.mass").rmdir()
    gadget_down(settings, ops)
    assert not g.exists()


@pytest.mark.parametrize("code", [errno.ENODEV, errno.ENOENT])
def test_unbind_tolerates_vanished_udc(settings: GadgetSettings, code: int) -> None:
    ops = FakeConfigfs()
    gadget_up(settings, ops).bind()
    ops.fail_unbind_with = code
    gadget_down(settings, ops)
    assert not settings.gadget_dir.exists()


def test_unbind_reports_other_errors(settings: GadgetSettings) -> None:
    ops = FakeConfigfs()
    gadget_up(settings, ops).bind()
    ops.fail_unbind_with = errno.EBUSY
    with pytest.raises(GadgetError, match="UDC"):
        Gadget(settings, ops).unbind()


def test_every_write_is_logged(settings: GadgetSettings, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mirrorunit.gadget"):
        gadget_up(settings, FakeConfigfs()).bind()
    messages = [r.getMessage() for r in caplog.records]
    assert any("idVendor" in m and "0x1d6b" in m for m in messages)
    assert any(m.endswith("UDC = 'dummy_udc.0'") for m in messages)
    assert all(r.name == "mirrorunit.gadget" for r in caplog.records)


def test_real_filesystem_ops_write_one_line(tmp_path: Path) -> None:
    ops = ConfigfsOps()
    ops.write(tmp_path / "attr", "0x1234")
    assert (tmp_path / "attr").read_bytes() == b"0x1234\n"


# -- FunctionFS blobs (the other half of the gadget's configuration) -------------------


def test_descriptor_blob_layout() -> None:
    blob = ffs.mass_storage_descriptors()
    magic, length, flags = ffs.DESCS_HEAD_V2.unpack_from(blob)
    assert magic == ffs.FUNCTIONFS_DESCRIPTORS_MAGIC_V2
    assert length == len(blob)
    assert flags == (
        ffs.FUNCTIONFS_HAS_FS_DESC | ffs.FUNCTIONFS_HAS_HS_DESC | ffs.FUNCTIONFS_HAS_SS_DESC
    )
    counts = [ffs.DESC_COUNT.unpack_from(blob, 12 + 4 * i)[0] for i in range(3)]
    assert counts == [3, 3, 5]  # interface + 2 endpoints (+ 2 SS companions)
    # walk the descriptors: every bLength must chain exactly to the end
    offset, seen = 24, []
    while offset < len(blob):
        b_length, b_type = blob[offset], blob[offset + 1]
        seen.append((b_type, bytes(blob[offset : offset + b_length])))
        offset += b_length
    assert offset == len(blob)
    assert len(seen) == sum(counts)
    interfaces = [d for t, d in seen if t == ffs.USB_DT_INTERFACE]
    assert all(d[5:8] == bytes([0x08, 0x06, 0x50]) for d in interfaces)  # BBB, SCSI
    endpoints = [ffs.ENDPOINT_DESCRIPTOR.unpack(d) for t, d in seen if t == ffs.USB_DT_ENDPOINT]
    assert [(e[2], e[4]) for e in endpoints] == [
        (0x81, 64), (0x02, 64), (0x81, 512), (0x02, 512), (0x81, 1024), (0x02, 1024),
    ]
    assert all(e[3] == ffs.USB_ENDPOINT_XFER_BULK for e in endpoints)


def test_strings_blob_layout() -> None:
    blob = ffs.strings_blob({ffs.LANG_EN_US: ["Mass Storage"]})
    assert ffs.STRINGS_HEAD.unpack_from(blob) == (ffs.FUNCTIONFS_STRINGS_MAGIC, len(blob), 1, 1)
    assert blob[16:] == b"\x09\x04Mass Storage\0"
    with pytest.raises(ValueError):
        ffs.strings_blob({0x409: ["a"], 0x407: ["a", "b"]})


def test_ep0_events_parse_setup_and_plain_events() -> None:
    data = ffs.EVENT.pack(0xA1, 0xFE, 0, 0, 1, ffs.EventType.SETUP) + ffs.EVENT.pack(
        0, 0, 0, 0, 0, ffs.EventType.ENABLE
    ) + ffs.EVENT.pack(0, 0, 0, 0, 0, 99)
    events = list(ffs.parse_events(data))
    assert events[0].type == ffs.EventType.SETUP
    assert events[0].setup == ffs.SetupRequest(0xA1, 0xFE, 0, 0, 1)
    assert events[0].setup.device_to_host
    assert events[1] == ffs.Ep0Event(ffs.EventType.ENABLE, None)
    assert events[2].type == 99  # unknown kinds are passed on, not fatal
    with pytest.raises(ffs.FunctionFsError):
        list(ffs.parse_events(data[:-1]))


# -- `mirrorunit gadget` and the USB options of `mirrorunit local` ------------------------


def _gadget_args(tmp_path: Path) -> list[str]:
    return ["--configfs", str(tmp_path / "config"), "--udc-dir", str(tmp_path / "udc"),
            "--ffs-mount", str(tmp_path / "ffs")]


def test_cli_gadget_up_status_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from firmware.cli import main

    (tmp_path / "config" / "usb_gadget").mkdir(parents=True)
    common = _gadget_args(tmp_path)
    assert main(["gadget", "up", "--no-mount", *common, "--vid", "0x1234", "--pid", "0xabcd",
                 "--serial", "SN42", "--product", "Test Disk"]) == 0
    g = tmp_path / "config" / "usb_gadget" / "mirrorunit"
    assert (g / "idVendor").read_text() == "0x1234\n"
    assert (g / "idProduct").read_text() == "0xabcd\n"
    assert (g / "strings" / "0x409" / "serialnumber").read_text() == "SN42\n"
    assert (g / "strings" / "0x409" / "product").read_text() == "Test Disk\n"
    assert (g / "configs" / "c.1" / "ffs.mass").is_symlink()
    capsys.readouterr()
    assert main(["gadget", "status", "--json", *common]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["exists"] and status["udc"] is None and not status["functionfs_mounted"]
    # a second `up` completes the same tree without complaint
    assert main(["gadget", "up", "--no-mount", *common, "--vid", "0x1234"]) == 0
    # `down` on a gadget that is already gone succeeds (idempotent teardown)
    missing = tmp_path / "other"
    (missing / "usb_gadget").mkdir(parents=True)
    assert main(["gadget", "down", "--configfs", str(missing), "--ffs-mount",
                 str(tmp_path / "ffs")]) == 0


def test_cli_gadget_up_reports_missing_configfs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from firmware.cli import main

    assert main(["gadget", "up", "--no-mount", *_gadget_args(tmp_path)]) == 1
    assert "configfs not mounted" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--vid", "0x10000"], ["--usb-serial", "é"],
                                 ["--scsi-vendor", "TOOLONGVENDOR"],
                                 ["--scsi-product", "x" * 17]])
def test_cli_local_refuses_bad_usb_options(bad: list[str], tmp_path: Path) -> None:
    from firmware.cli import build_parser

    argv = ["local", "--disk", str(tmp_path / "d"), "--buffer", str(tmp_path / "b"),
            "--frontend", "usb", *bad]
    if bad[0] == "--vid":
        argv = ["gadget", "up", *bad]
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)


def test_usb_service_only_with_usb_frontend(tmp_path: Path) -> None:
    from firmware.apps.local import build_services, settings_from_args
    from firmware.cli import build_parser
    from firmware.local import DataPath
    from firmware.usb_gadget.service import UsbService

    base = ["local", "--disk", str(tmp_path / "d"), "--size", "1M",
            "--buffer", str(tmp_path / "b"), "--buffer-size", "4M", "--nbd", ""]
    for extra, expect in (([], None), (["--frontend", "usb", "--lun-read-only",
                                        "--usb-serial", "SER9", "--scsi-vendor", "ACME"],
                                       UsbService)):
        settings = settings_from_args(build_parser().parse_args(base + extra))
        data = DataPath.open(settings.unit)
        try:
            services = [s for s in build_services(settings, data) if s.name == "usb"]
            if expect is None:
                assert services == []
            else:
                (service,) = services
                assert isinstance(service, UsbService)
                lu = service.logical_unit
                assert lu.read_only and lu.serial == b"SER9" and lu.vendor == b"ACME    "
                assert lu.block_count == (1 << 20) // 512
                assert service.status()["serving"] is False
        finally:
            data.close()
