#!/usr/bin/env bash
# Install the Debian packages the tests and the demo use, if any is missing.
set -euo pipefail
packages=(
    qemu-utils          # qemu-img, qemu-io: NBD clients
    libnbd-bin          # nbdinfo, nbdcopy
    qemu-system-x86     # the VM that plays the USB host
    linux-image-amd64   # the guest kernel and its modules
    busybox-static      # the guest initramfs
    sg3-utils           # sg_inq, sg_readcap... inside the guest
    e2fsprogs           # mkfs.ext4, e2fsck
    kmod                # modinfo, to order module dependencies
    snmptrapd           # SNMP trap receiver the notification tests send to
    openssh-server      # sshd: the SSH access test logs in with a key it enabled
    openssh-client      # ssh, ssh-keygen: the client side of that test
)
exec "$(dirname "$0")/apt-ensure.sh" setup "${packages[@]}"
