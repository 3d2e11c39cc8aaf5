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
printf 'COMPRESS=zstd\nMODULES=most\n' > "$root/etc/initramfs-tools/conf.d/mirrorunit"
# No generic hostname baked in: it is set from the board's serial at every boot.
echo mirrorunit > "$root/etc/hostname"
