"""`make image BOARD=pi4`: the flashable card image of one board.

Stages (each output lands in build/image/<board>/):

    base      Debian bookworm arm64 root from image/packages.txt (mmdebstrap, configured
              under qemu-user-static); board independent, cached by its recipe's hash
    root      the base plus our package, its pinned aarch64 wheels, units and settings
    boot      firmware from raspi-firmware, kernel, initrd, patched DTBs, config/cmdline
    image     MBR image (image/layout.py) -> .img.xz + .bmap + .sha256

`--stage root` stops after the root tree (what the fast tests inspect); `--no-xz` skips
compression for the boot test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import layout, profile

REPO = Path(__file__).resolve().parent.parent
HERE = REPO / "image"
PYVER = "3.11"
PYLIB = f"/usr/local/lib/python{PYVER}/dist-packages"
#: manylinux tags a bookworm arm64 root (glibc 2.36) can load, newest first
PLATFORMS = ["manylinux_2_36_aarch64", "manylinux_2_34_aarch64", "manylinux_2_28_aarch64",
             "manylinux_2_17_aarch64", "manylinux2014_aarch64"]
ROOT_SLOT = 640 << 20
#: units that start at boot; the others are there for the console to turn on
ENABLED_UNITS = [
    "var.mount", "mirrorunit-firstboot.service", "mirrorunit-hostname.service",
    "mirrorunit-gadget.service", "mirrorunit-local.service", "mirrorunit-remote.service",
    "mirrorunit-ups.service", "mirrorunit-notify.service", "mirrorunit-boot-report.service",
    "mirrorunit-network.service",
    "systemd-networkd.service", "systemd-resolved.service", "systemd-timesyncd.service",
    "ssh.service",
]
#: units enabled only on boards whose profile asks for them
BOARD_UNITS: dict[str, Callable[[profile.Board], bool]] = {
    "mirrorunit-panel.service": lambda board: board.panel is not None,
}


def enabled_units(board: profile.Board) -> list[str]:
    return ENABLED_UNITS + [u for u, wanted in BOARD_UNITS.items() if wanted(board)]


#: never at boot: they write to the root, prompt on the console, or are replaced by ours
DISABLED_UNITS = ["apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                  "e2scrub_reap.service", "wpa_supplicant.service"]
MASKED_UNITS = ["systemd-firstboot.service", "console-getty.service",
                "systemd-networkd-wait-online.service", "debug-shell.service",
                "systemd-random-seed.service", "ldconfig.service",
                "systemd-update-done.service", "autovt@.service",
                # sulogin on the console: with root locked it is a dead end, and the setup
                # console must stay the only way in whatever failed at boot
                "emergency.service", "rescue.service"]
#: Python packages only the image has (the board's hardware), pinned like the dependencies
IMAGE_PACKAGES = HERE / "python-packages.txt"


#: what rpi-lgpio needs to import off a Pi: a board revision (a Pi 4 B, 4 GB) and a directory
#: for lgpio's notification pipe (it defaults to the working directory, read-only here)
GPIO_IMPORT_ENV = {"RPI_LGPIO_REVISION": "c03111", "LG_WD": "/tmp"}


class BuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"image: {msg}", flush=True)


def sh(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    log("$ " + " ".join(argv))
    try:
        return subprocess.run(argv, check=True, text=True, **kw)  # type: ignore[call-overload,no-any-return]
    except subprocess.CalledProcessError as e:
        raise BuildError(f"{argv[0]} failed with status {e.returncode}") from e


@dataclass
class Context:
    board: profile.Board
    out: Path
    cache: Path
    mirror: str
    version: str
    base: Path | None = None

    @property
    def root(self) -> Path:
        return self.out / "root"

    @property
    def bootdir(self) -> Path:
        return self.out / "boot"


def image_version() -> str:
    """The package version plus the commit the image was built from."""
    pkg = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=10", "HEAD"],
                             check=True, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "firmware", "image", "board", "pyproject.toml"],
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return pkg
    return f"{pkg}+g{rev}{'.dirty' if dirty else ''}"


def base_key() -> str:
    h = hashlib.sha256()
    for p in [HERE / "packages.txt", HERE / "mkbase.sh", *sorted((HERE / "hooks").iterdir())]:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def build_base(cache: Path, mirror: str) -> Path:
    tar = cache / f"base-{base_key()}.tar"
    if tar.exists():
        log(f"base root: cached {tar.name}")
        return tar
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f"base-{base_key()}.part.tar"
    t0 = time.monotonic()
    sh(["nice", "-n", "10", str(HERE / "mkbase.sh"), str(tmp), mirror])
    tmp.rename(tar)
    log(f"base root built in {time.monotonic() - t0:.0f} s")
    return tar


def pinned_dependencies() -> list[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for d in deps:
        if "==" not in d:
            raise BuildError(f"dependency {d!r} is not pinned (name==version)")
    return list(deps)


def image_packages() -> list[str]:
    """Pins from image/python-packages.txt (one `name==version` a line, '#' comments)."""
    pins = [ln.split("#", 1)[0].strip() for ln in IMAGE_PACKAGES.read_text().splitlines()]
    pins = [p for p in pins if p]
    for d in pins:
        if "==" not in d:
            raise BuildError(f"image package {d!r} is not pinned (name==version)")
    return pins


def install_python(ctx: Context) -> None:
    target = ctx.root / PYLIB.lstrip("/")
    target.mkdir(parents=True, exist_ok=True)
    wheels = ctx.cache / "wheels-aarch64"
    wheels.mkdir(parents=True, exist_ok=True)
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    # abi3 too: argon2-cffi-bindings ships its aarch64 build as a stable-ABI wheel
    common = [*plat, "--python-version", PYVER, "--implementation", "cp", "--abi",
              f"cp{PYVER.replace('.', '')}", "--abi", "abi3", "--only-binary=:all:"]
    deps = pinned_dependencies() + image_packages()
    # Download once into the cache, then install from it without the index.
    sh([sys.executable, "-m", "pip", "download", "-q", "--dest", str(wheels), *common, *deps])
    sh([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
        "--target", str(target), "--no-compile", *common, *deps])
    shutil.rmtree(target / "bin", ignore_errors=True)  # scripts with the build host's shebang
    pkg = target / "firmware"
    shutil.rmtree(pkg, ignore_errors=True)
    shutil.copytree(REPO / "firmware", pkg,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "tests"))
    # The root is read-only: without bytecode in the image every start compiles in RAM.
    sh([sys.executable, "-m", "compileall", "-q", "-j", "2", "--invalidation-mode",
        "unchecked-hash", "-d", PYLIB, str(target)], stdout=subprocess.DEVNULL)
    launcher = ctx.root / "usr/bin/mirrorunit"
    launcher.write_text("#!/usr/bin/python3\nimport sys\n\nfrom firmware.cli import main\n\n"
                        "sys.exit(main())\n")
    launcher.chmod(0o755)


def _subst(text: str, board: profile.Board) -> str:
    panel = board.panel or profile.Panel()
    return (text.replace("@PYLIB@", PYLIB)
            .replace("@PANEL_DEVICE@", panel.device)
            .replace("@PANEL_BAUD@", str(panel.baud))
            .replace("@I2C_BUS@", str(board.i2c_bus))
            .replace("@USB_MODULES@", " ".join(board.usb_device.modules)))


def install_files(ctx: Context) -> None:
    root, board = ctx.root, ctx.board
    for src in sorted((HERE / "rootfs").rglob("*")):
        if src.is_dir():
            continue
        dst = root / src.relative_to(HERE / "rootfs")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(_subst(src.read_text(), board))
        dst.chmod(src.stat().st_mode & 0o777)
    lib = root / "usr/lib/mirrorunit"
    for name in ("firstboot.py", "layout.py"):
        shutil.copy2(HERE / name, lib / name)
    units = root / "usr/lib/systemd/system"
    for src in sorted((HERE / "units").glob("*.*")):
        (units / src.name).write_text(_subst(src.read_text(), board))
    install_console_dropins(ctx)
    share = root / "usr/share/mirrorunit"
    share.mkdir(parents=True, exist_ok=True)
    (share / "board.json").write_text(json.dumps(board.to_json(), indent=2) + "\n")
    (share / "version").write_text(ctx.version + "\n")
    for d in ("config", "boot/firmware"):
        (root / d).mkdir(parents=True, exist_ok=True)
    etc = root / "etc"
    (etc / "fstab").write_text(
        "# Root: squashfs from the kernel command line (ro). Everything writable is RAM\n"
        "# (/run, /tmp, the /var overlay) except /config, which the config service\n"
        "# remounts read-write only while it writes.\n"
        "LABEL=MU-BOOT    /boot/firmware vfat  ro,nofail,noexec,nodev,nosuid,umask=0022 0 0\n"
        # nofail: a missing or broken config partition must not fail local-fs.target, which
        # would isolate to emergency.target; the roles then skip (no storage map) and the
        # setup console offers recovery.
        "LABEL=MU-CONFIG  /config        ext4  ro,nofail,nodev,nosuid,noexec,"
        "x-systemd.device-timeout=30s 0 2\n"
        "tmpfs            /tmp           tmpfs mode=1777,nodev,nosuid,size=64M 0 0\n")
    (etc / "mirrorunit").mkdir(exist_ok=True)
    _symlink(etc / "mirrorunit/config.slots", "/config/config.slots")
    (etc / "hostname").write_text("mirrorunit\n")
    _symlink(etc / "resolv.conf", "/run/systemd/resolve/stub-resolv.conf")
    _symlink(etc / "wpa_supplicant/wpa_supplicant-wlan0.conf", "/config/wifi/wpa_supplicant.conf")
    lock_accounts(etc / "shadow")


def lock_accounts(shadow: Path) -> None:
    """Root gets a locked password field; any account that could log in fails the build.

    An empty field means "no password" to PAM and sulogin, so it is refused like a hash:
    every field must be locked ('*' or '!' first)."""
    lines = shadow.read_text().splitlines()
    out = []
    for ln in lines:
        f = ln.split(":")
        if f[0] == "root" and f[1] in ("", "*"):
            f[1] = "!*"
        out.append(":".join(f))
    shadow.write_text("\n".join(out) + "\n")
    check_shadow(shadow.read_text())


def check_shadow(text: str) -> None:
    entries = [ln.split(":") for ln in text.splitlines() if ln]
    if "root" not in [f[0] for f in entries]:
        raise BuildError("no root entry in /etc/shadow")
    open_ = [f[0] for f in entries if len(f) < 2 or f[1][:1] not in ("*", "!")]
    if open_:
        raise BuildError(f"accounts with a password or an empty password field: {open_}")


def _symlink(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(target)


def install_console_dropins(ctx: Context) -> None:
    """The console's own getty drop-ins when the firmware ships them, else ours."""
    system = ctx.root / "etc/systemd/system"
    shipped = REPO / "firmware/console/systemd"
    if shipped.is_dir() and any(shipped.rglob("*.conf")):
        for src in sorted(shipped.rglob("*")):
            if src.is_file():
                dst = system / src.relative_to(shipped)
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_text(_subst(src.read_text(), ctx.board))
        log(f"console: drop-ins from {shipped.relative_to(REPO)}")
        return
    text = (HERE / "units/getty-dropins/mirrorunit-console.conf").read_text()
    for unit in ("getty@.service", "serial-getty@.service"):
        d = system / f"{unit}.d"
        d.mkdir(parents=True, exist_ok=True)
        (d / "mirrorunit-console.conf").write_text(text)


def configure_units(ctx: Context) -> None:
    root = str(ctx.root)
    sh(["systemctl", f"--root={root}", "enable", *enabled_units(ctx.board)],
       capture_output=True)
    sh(["systemctl", f"--root={root}", "disable", *DISABLED_UNITS], capture_output=True)
    sh(["systemctl", f"--root={root}", "mask", *MASKED_UNITS], capture_output=True)


def mark_updated(root: Path) -> None:
    """Tell systemd's ConditionNeedsUpdate= that /etc and /var match /usr, so nothing tries
    to rebuild caches or users on the read-only root at boot."""
    usr = (root / "usr").stat()
    for d in ("etc", "var"):
        stamp = root / d / ".updated"
        stamp.write_text("# stamped by the image build: /usr is never updated in place\n"
                         f"TIMESTAMP_NSEC={usr.st_mtime_ns}\n")
        os.utime(stamp, ns=(usr.st_mtime_ns, usr.st_mtime_ns))


def check_imports(ctx: Context) -> str:
    """Import our package and its dependencies with the root's own arm64 python3."""
    code = ("import platform, cbor2, crc32c, cryptography, zstandard, smbus2, firmware, "
            "firmware.cli, RPi.GPIO, lgpio, argon2, zxcvbn, blake3; "
            "from cryptography.hazmat.primitives.asymmetric import ec; "
            "ec.generate_private_key(ec.SECP256R1()); firmware.cli.build_parser(); "
            # the native Argon2 of the aarch64 wheel, at a tiny cost
            "argon2.PasswordHasher(time_cost=1, memory_cost=64, parallelism=1).hash('x'); "
            "zxcvbn.zxcvbn('correct horse battery'); "
            # the link's chunk digest, from the native aarch64 wheel
            "from firmware.link.frames import chunk_digest; chunk_digest(b'x'); "
            "print(platform.machine(), firmware.__version__)")
    # rpi-lgpio reads the board revision at import; the build host has no Pi device tree
    env = {**os.environ, **GPIO_IMPORT_ENV}
    out = sh(["chroot", str(ctx.root), "/usr/bin/python3", "-c", code],
             capture_output=True, env=env).stdout.strip()
    if not out.startswith("aarch64 "):
        raise BuildError(f"import check printed {out!r}")
    return out


def extract_boot_payload(ctx: Context) -> None:
    """Kernel, initrd, DTBs and the Pi firmware go to the boot partition, not the root."""
    root, boot = ctx.root, ctx.bootdir
    shutil.rmtree(boot, ignore_errors=True)
    boot.mkdir(parents=True)
    debs = sorted((root / "usr/share/mirrorunit/debs").glob("raspi-firmware_*.deb"))
    if not debs:
        raise BuildError("raspi-firmware .deb missing from the base root")
    fw = ctx.out / "raspi-firmware"
    shutil.rmtree(fw, ignore_errors=True)
    sh(["dpkg-deb", "-x", str(debs[-1]), str(fw)])
    shutil.rmtree(root / "usr/share/mirrorunit/debs")
    for name in ctx.board.firmware:
        src = fw / "usr/lib/raspi-firmware" / name
        if not src.exists():
            raise BuildError(f"raspi-firmware has no {name}")
        shutil.copy2(src, boot / name)
    licence = fw / "usr/share/doc/raspi-firmware/copyright"
    if licence.exists():
        shutil.copy2(licence, boot / "LICENCE.raspi-firmware")
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise BuildError(f"expected one kernel in the base root, found {kernels}")
    kver = kernels[0].name.removeprefix("vmlinuz-")
    shutil.copy2(kernels[0], boot / "vmlinuz")
    shutil.copy2(root / f"boot/initrd.img-{kver}", boot / "initrd.img")
    dtbdir = root / f"usr/lib/linux-image-{kver}/broadcom"
    for dtb in [ctx.board.dtb, *ctx.board.variant_dtbs.values()]:
        src = dtbdir / dtb
        if not src.exists():
            raise BuildError(f"linux-image-{kver} has no broadcom/{dtb}")
        shutil.copy2(src, boot / dtb)
        patched = boot / profile.patched_dtb_name(ctx.board, dtb)
        shutil.copy2(src, patched)
        node = ctx.board.usb_device.dt_node
        for prop, value in sorted(ctx.board.usb_device.dt_properties.items()):
            sh(["fdtput", "-t", "s", str(patched), node, prop, value])
        sh(["fdtput", "-t", "s", str(patched), ctx.board.i2c_dt_node, "status", "okay"])
    (boot / "config.txt").write_text(profile.render_config_txt(ctx.board, ctx.version))
    (boot / "cmdline.txt").write_text(profile.render_cmdline(ctx.board, layout.partuuid(2)))
    (boot / "mirrorunit-version.txt").write_text(ctx.version + "\n")
    (ctx.out / "kernel-version").write_text(kver + "\n")
    # Nothing in the running root uses these; the boot partition has its own copies.
    for entry in (root / "boot").iterdir():
        if entry.name == "firmware":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for name in ("vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"):
        if (root / name).is_symlink():
            (root / name).unlink()
    shutil.rmtree(root / f"usr/lib/linux-image-{kver}", ignore_errors=True)


def build_root(ctx: Context) -> None:
    tar = ctx.base or build_base(ctx.cache, ctx.mirror)
    if ctx.root.exists():
        shutil.rmtree(ctx.root)
    ctx.root.mkdir(parents=True)
    sh(["tar", "-C", str(ctx.root), "--numeric-owner", "--xattrs", "-xpf", str(tar)])
    extract_boot_payload(ctx)
    install_python(ctx)
    install_files(ctx)
    configure_units(ctx)
    mark_updated(ctx.root)
    log("import check: " + check_imports(ctx))


def make_image(ctx: Context, compress: bool) -> Path:
    out, root = ctx.out, ctx.root
    sqfs = out / "root.squashfs"
    sqfs.unlink(missing_ok=True)
    sh(["nice", "-n", "10", "mksquashfs", str(root), str(sqfs), "-comp", "zstd",
        "-noappend", "-quiet", "-no-progress", "-processors", "2", "-wildcards",
        "-e", "proc/*", "sys/*", "dev/*", "run/*", "tmp/*"], stdout=subprocess.DEVNULL)
    if sqfs.stat().st_size > ROOT_SLOT:
        raise BuildError(f"root is {sqfs.stat().st_size} bytes; a slot holds {ROOT_SLOT}")
    parts = {p.name: p for p in layout.build_layout(ROOT_SLOT)}
    bootimg = out / "boot.vfat"
    bootimg.unlink(missing_ok=True)
    sh(["mkfs.vfat", "-F", "32", "-n", "MU-BOOT", "-i", "4d550001", "-C", str(bootimg),
        str(parts["boot"].size // 1024)], stdout=subprocess.DEVNULL)
    sh(["mcopy", "-s", "-p", "-m", "-i", str(bootimg),
        *[str(p) for p in sorted(ctx.bootdir.iterdir())], "::/"])
    confimg = out / "config.ext4"
    confimg.unlink(missing_ok=True)
    confsrc = out / "config-skel"
    shutil.rmtree(confsrc, ignore_errors=True)
    confsrc.mkdir()
    (confsrc / "README").write_text(
        "MirrorUnit config partition: config slots, unit identity and TLS key, storage map.\n"
        "Mounted read-only; written only by the unit's own config service.\n")
    sh(["mke2fs", "-q", "-t", "ext4", "-L", "MU-CONFIG", "-E", "root_owner=0:0",
        "-d", str(confsrc), str(confimg), str(parts["config"].size // 1024)],
       env={**os.environ, "E2FSPROGS_FAKE_TIME": "1735689600"})
    final = out / f"mirrorunit-{ctx.board.name}.img"
    # Built under another name and renamed whole: tests may be reading the previous image.
    img = out / f"mirrorunit-{ctx.board.name}.img.part"
    img.unlink(missing_ok=True)
    with img.open("wb") as f:
        f.truncate(layout.image_size(list(parts.values())))
    sh(["sfdisk", "-q", str(img)], input=layout.sfdisk_script(list(parts.values())))
    for name, src in (("boot", bootimg), ("rootA", sqfs), ("config", confimg)):
        sh(["dd", f"if={src}", f"of={img}", "bs=4M", "conv=notrunc,sparse",
            f"seek={parts[name].start}", "oflag=seek_bytes", "status=none"])
    if not compress:
        img.rename(final)
        return final
    sh(["bmaptool", "-q", "create", "-o", str(final) + ".bmap", str(img)])
    xz = Path(str(final) + ".xz")
    sh(["nice", "-n", "10", "xz", "-k", "-f", "-T2", "-6", str(img)])
    Path(str(img) + ".xz").rename(xz)
    img.rename(final)
    digest = hashlib.sha256(xz.read_bytes()).hexdigest()
    Path(str(xz) + ".sha256").write_text(f"{digest}  {xz.name}\n")
    return xz


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m image.build")
    p.add_argument("--board", default="pi4")
    p.add_argument("--out", type=Path, default=None, help="default build/image/<board>")
    p.add_argument("--cache", type=Path, default=REPO / "build/image")
    p.add_argument("--mirror", default=os.environ.get("MIRRORUNIT_MIRROR",
                                                      "http://deb.debian.org/debian"))
    p.add_argument("--base", type=Path, default=None,
                   help="use this base root tarball instead of the cached/built one")
    p.add_argument("--stage", choices=("root", "image"), default="image")
    p.add_argument("--no-xz", action="store_true", help="leave the image uncompressed")
    args = p.parse_args(argv)
    try:
        board = profile.load(args.board)
    except profile.ProfileError as e:
        print(f"image: {e}", file=sys.stderr)
        return 2
    out = args.out or args.cache / board.name
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(board, out, args.cache, args.mirror, image_version(), args.base)
    t0 = time.monotonic()
    try:
        build_root(ctx)
        result = ctx.root if args.stage == "root" else make_image(ctx, not args.no_xz)
    except BuildError as e:
        print(f"image: {e}", file=sys.stderr)
        return 1
    secs = time.monotonic() - t0
    stats = {"board": board.name, "version": ctx.version, "seconds": round(secs),
             "output": str(result)}
    if args.stage == "image":
        stats["image_bytes"] = (out / f"mirrorunit-{board.name}.img").stat().st_size
        stats["root_squashfs_bytes"] = (out / "root.squashfs").stat().st_size
        if not args.no_xz:
            stats["xz_bytes"] = result.stat().st_size
    (out / "build.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(f"done in {secs:.0f} s: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
