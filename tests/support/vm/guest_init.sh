#!/bin/busybox sh
# PID 1 of the test guest: load modules, mount the host root read-only over 9p
# with a tmpfs overlay, then hand the console to the command agent in a chroot.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "mu-init: loading modules"
while read -r m; do
    insmod "/modules/$m" || echo "mu-init: insmod $m failed"
done < /modules/order

xchg=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        mu.xchg=*) xchg="${arg#mu.xchg=}" ;;
    esac
done

fail() { echo "mu-init: FAILED: $*"; echo o > /proc/sysrq-trigger; sleep 10; }

# cache=loose: the lower layer is read-only for the VM's whole life.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /lower \
    || fail "mount hostroot"
mount -t tmpfs -o mode=755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work,xino=off,index=off /newroot \
    || fail "mount overlay"
for d in proc sys dev tmp run; do mkdir -p "/newroot/$d"; done
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t configfs configfs /newroot/sys/kernel/config
# /tmp stays on the overlay (writable through its tmpfs upper): a tmpfs mounted over it
# would hide a checkout of the project that lives under the host's /tmp.
chmod 1777 /newroot/tmp
mount -t tmpfs -o mode=755 tmpfs /newroot/run
if [ -n "$xchg" ]; then
    mkdir -p "/newroot$xchg"
    # cache=none: the host adds scripts here while the guest runs.
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none xchg "/newroot$xchg" \
        || fail "mount xchg"
fi

# The agent: one line "RUN <id>" runs <xchg>/<id>.sh with output to <id>.out and
# answers "DONE <id> <status>"; "POWEROFF" ends the VM.  It speaks on ttyS1 so
# kernel messages on the console (ttyS0) never interleave with the protocol.
cat > /newroot/run/mu-agent.sh <<AGENT
#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
stty -F /dev/ttyS1 raw -echo
exec 0</dev/ttyS1 1>/dev/ttyS1 2>/dev/console
echo "MU-READY \$(cut -d' ' -f1 /proc/uptime)"
while read -r cmd id; do
    case "\$cmd" in
        RUN)
            ( cd "$xchg" && exec /bin/sh "$xchg/\$id.sh" ) >"$xchg/\$id.out" 2>&1 </dev/null
            echo "MU-DONE \$id \$?"
            ;;
        POWEROFF)
            sync
            echo o > /proc/sysrq-trigger
            ;;
    esac
done
AGENT
chmod 755 /newroot/run/mu-agent.sh
echo "mu-init: entering host root"
exec chroot /newroot /bin/sh /run/mu-agent.sh
