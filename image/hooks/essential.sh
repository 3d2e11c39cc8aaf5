#!/bin/sh
# mmdebstrap essential hook: runs after the Essential set is unpacked, before the kernel and
# initramfs-tools are installed, so the first initramfs already mounts a squashfs root.
set -eu
root="$1"
mkdir -p "$root/etc/initramfs-tools/hooks" "$root/etc/initramfs-tools/conf.d"
cat > "$root/etc/initramfs-tools/hooks/mirrorunit" <<'HOOK'
#!/bin/sh
# The root is squashfs (read-only); overlay backs the writable /var.
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
manual_add_modules squashfs overlay
HOOK
chmod 0755 "$root/etc/initramfs-tools/hooks/mirrorunit"
# zstd: smaller than gzip and fast to unpack on a Cortex-A53.
# MODULES=list: the initramfs only has to mount the root from the SD card (or, in the boot
# test, a virtio disk); everything else loads from the root. MODULES=most would copy about
# 3,000 modules, which under emulation took most of the base build (20+ minutes); the list
# takes seconds. Clocks, pin control, the firmware mailbox and mmc_block are built in.
printf 'COMPRESS=zstd\nMODULES=list\n' > "$root/etc/initramfs-tools/conf.d/mirrorunit"
cat > "$root/etc/initramfs-tools/modules" <<'MODULES'
# SD/eMMC host controllers of the supported boards (BCM2835 sdhost, BCM2711 emmc2 and the
# Arasan SDHCI behind sdhci-iproc) and the regulators their DTs switch for 1.8 V signalling
sdhci-iproc
bcm2835
gpio-regulator
fixed
reset-raspberrypi
# the QEMU virt machine of the boot test
virtio_pci
virtio_mmio
virtio_blk
# the root filesystem and the writable overlay
squashfs
overlay
MODULES
# Each package that touches the initramfs would rebuild it (under emulation, ~10 min each):
# divert update-initramfs to a no-op while packages install; customize.sh runs it once.
chroot "$root" dpkg-divert --quiet --local --no-rename \
    --divert /usr/sbin/update-initramfs.mirrorunit --add /usr/sbin/update-initramfs
mkdir -p "$root/usr/sbin"
ln -sf /bin/true "$root/usr/sbin/update-initramfs"
# No generic hostname baked in: it is set from the board's serial at every boot.
echo mirrorunit > "$root/etc/hostname"
