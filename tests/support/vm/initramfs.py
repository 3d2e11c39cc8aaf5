"""Build (and cache) the guest initramfs: static busybox, a few kernel modules, /init.

The guest boots the host's own Debian kernel.  Only what is needed to reach the
host's root over 9p lives in the initramfs; everything else (python, sg3_utils,
our code) is used from the shared host root, so the image stays a few MiB and
is rebuilt only when its inputs change.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

#: Modules the guest needs, by name; their dependencies are added from modules.dep.
#: crc32c_generic stands in for the "crypto-crc32c" softdep of ext4/jbd2, which
#: busybox insmod does not follow.
GUEST_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "configfs",
    "libcomposite",
    "usb_f_fs",
    "usb_f_mass_storage",
    "dummy_hcd",
    "usb_storage",
    "sd_mod",
    "sg",
    "crc32c_generic",
    "ext4",
)

INIT_SCRIPT = Path(__file__).with_name("guest_init.sh")


class KernelNotFound(Exception):
    pass


@dataclass(frozen=True)
class KernelImage:
    version: str
    vmlinuz: Path
    modules_dir: Path


def find_kernel(
    boot_dir: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")
) -> KernelImage:
    """The newest installed kernel that has both an image and a module tree."""
    candidates = []
    for image in boot_dir.glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        mods = modules_root / version
        if (mods / "modules.dep").is_file() and os.access(image, os.R_OK):
            candidates.append(KernelImage(version, image, mods))
    if not candidates:
        raise KernelNotFound(
            f"no readable {boot_dir}/vmlinuz-* with {modules_root}/<ver>/modules.dep"
        )
    return sorted(candidates, key=lambda k: k.version)[-1]


def _normalise(name: str) -> str:
    return name.replace("-", "_")


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            return _normalise(base[: -len(suffix)])
    raise ValueError(f"not a module path: {path}")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (relative path, relative paths of its dependencies)."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        table[_module_name(path)] = (path, deps.split())
    return table


def builtin_modules(text: str) -> set[str]:
    return {_module_name(line.strip()) for line in text.splitlines() if line.strip()}


def load_order(wanted: tuple[str, ...], modules_dir: Path) -> list[str]:
    """Relative module paths in an order where every module follows its dependencies.

    Modules built into the kernel are skipped; a wanted module that is neither
    modular nor built in is an error, since the guest could not work without it.
    """
    table = parse_modules_dep((modules_dir / "modules.dep").read_text())
    builtin_path = modules_dir / "modules.builtin"
    builtin = builtin_modules(builtin_path.read_text()) if builtin_path.exists() else set()
    by_path = {path: name for name, (path, _) in table.items()}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        path, deps = table[name]
        for dep in deps:
            visit(by_path[dep])
        order.append(path)

    for want in wanted:
        key = _normalise(want)
        if key in table:
            visit(key)
        elif key not in builtin:
            raise KernelNotFound(f"module {want} is neither modular nor built in")
    return order


class _Cpio:
    """Minimal writer of the "newc" cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        encoded = name.encode() + b"\0"
        header = (
            "070701"
            + "".join(
                f"{v:08x}"
                for v in (
                    self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0,
                )
            )
        ).encode()
        self._ino += 1
        self._out.write(header + encoded)
        self._out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self._out.write(data)
        self._out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


def build_initramfs(
    build_root: Path,
    kernel: KernelImage,
    busybox: Path = Path("/bin/busybox"),
) -> Path:
    """Return the path of an initramfs for `kernel`, building it unless cached."""
    if not busybox.is_file():
        raise KernelNotFound(f"{busybox} missing (install busybox-static)")
    order = load_order(GUEST_MODULES, kernel.modules_dir)
    init = INIT_SCRIPT.read_bytes()
    key = hashlib.sha256()
    for part in (init, busybox.read_bytes(), "\n".join(order).encode()):
        key.update(hashlib.sha256(part).digest())
    out_dir = build_root / kernel.version
    target = out_dir / f"initramfs-{key.hexdigest()[:16]}.cpio"
    if target.exists():
        return target

    cpio = _Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "dev", "modules",
              "lower", "rw", "newroot"):
        cpio.directory(d)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", init, 0o755)
    names = []
    for rel in order:
        name = rel.rsplit("/", 1)[-1]
        cpio.file(f"modules/{name}", (kernel.modules_dir / rel).read_bytes())
        names.append(name)
    cpio.file("modules/order", ("\n".join(names) + "\n").encode())

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(cpio.finish())
    os.replace(tmp, target)
    for stale in out_dir.glob("initramfs-*.cpio"):
        if stale != target:
            stale.unlink(missing_ok=True)
    return target
