#!/bin/sh
# mmdebstrap customize hook: build the initramfs once (see essential.sh); keep
# raspi-firmware's files for the boot partition without installing the package (its kernel
# hooks want a mounted /boot/firmware); drop what must be unique per unit (SSH host keys,
# machine-id) and the apt caches.
set -eu
root="$1"
rm -f "$root/usr/sbin/update-initramfs"
chroot "$root" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs
# update-initramfs -k all only knows kernels it built for before; name them instead.
for kdir in "$root"/lib/modules/*; do
    chroot "$root" update-initramfs -c -k "$(basename "$kdir")"
done
# apt inside the chroot needs a resolver: its resolv.conf points into /run (resolved).
resolv_link="$(readlink "$root/etc/resolv.conf" || true)"
cp --remove-destination /etc/resolv.conf "$root/etc/resolv.conf"
chroot "$root" sh -c 'cd /tmp && apt-get download -q raspi-firmware'
[ -z "$resolv_link" ] || ln -sf "$resolv_link" "$root/etc/resolv.conf"
mkdir -p "$root/usr/share/mirrorunit/debs"
mv "$root"/tmp/raspi-firmware_*.deb "$root/usr/share/mirrorunit/debs/"
rm -f "$root"/etc/ssh/ssh_host_*
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
