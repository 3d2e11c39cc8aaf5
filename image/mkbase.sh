#!/usr/bin/env bash
# Build the board-independent arm64 base root as a tarball: Debian bookworm packages from
# packages.txt, configured under qemu-user-static (binfmt_misc), kernel + initramfs included.
# usage: mkbase.sh OUT.tar [MIRROR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$1"
mirror="${2:-http://deb.debian.org/debian}"
security="${MIRRORUNIT_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
include="$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/packages.txt" | tr -s '[:space:]' ',' | sed 's/,$//')"
# SOURCE_DATE_EPOCH keeps timestamps fixed so two builds of one package set compare equal.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1735689600}"
exec mmdebstrap \
    --mode=auto --format=tar --variant=minbase --architectures=arm64 \
    --components=main,non-free-firmware \
    --include="$include" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --essential-hook="$here/hooks/essential.sh \"\$1\"" \
    --customize-hook="$here/hooks/customize.sh \"\$1\"" \
    bookworm "$out" \
    "deb $mirror bookworm main non-free-firmware" \
    "deb $mirror bookworm-updates main non-free-firmware" \
    "deb $security bookworm-security main non-free-firmware"
