#!/usr/bin/env bash
# Install the Debian (bookworm, amd64 host) tools `make image` and `make image-test` use.
# The fast image tests only need sfdisk/unsquashfs/mtools; they skip when those are missing.
set -euo pipefail
packages=(
    mmdebstrap          # builds the arm64 root from Debian packages, no chroot tricks of our own
    qemu-user-static    # runs arm64 maintainer scripts (and our import check) via binfmt_misc
    arch-test           # lets mmdebstrap confirm that arm64 binaries run here
    squashfs-tools      # mksquashfs/unsquashfs: the read-only root
    mtools              # mcopy/mdir: fill and read the vfat boot partition without mounting
    dosfstools          # mkfs.vfat
    e2fsprogs           # mke2fs -d: the config partition from a directory
    fdisk               # sfdisk: the MBR partition table
    bmap-tools          # bmaptool create: the .bmap beside the image
    xz-utils            # xz: the compressed image
    qemu-system-arm     # qemu-system-aarch64: the boot test (virt machine, TCG)
    device-tree-compiler  # fdtput/fdtget: dwc2 peripheral mode patched into the board's DTB
    systemd             # systemd-analyze security --offline: the role units' exposure scores
)
"$(dirname "$0")/../scripts/apt-ensure.sh" image/setup "${packages[@]}"
# qemu-user-static registers its interpreters only where binfmt_misc is mounted.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
fi
# Without binfmt-support nothing loads qemu-user-static's binfmt.d entry; systemd-binfmt can.
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && [ -e /usr/lib/binfmt.d/qemu-aarch64.conf ]; then
    /lib/systemd/systemd-binfmt /usr/lib/binfmt.d/qemu-aarch64.conf || true
fi
