#!/usr/bin/env bash
# Proves the README's quick start on a Debian 12 that has never seen Rust:
# builds a clean bookworm root with debootstrap (from Debian's registry, with
# bookworm-updates and bookworm-security in its apt sources, as an installed
# Debian 12 has them), copies a `git archive` of HEAD into it, and runs the
# two README commands inside with chroot (/proc, /sys, /dev mounted: rustc
# and strace need them). Their wall times and the last lines of each go to
# docs/fresh-machine.md; the full logs stay in the work folder.
#
#   sudo scripts/fresh-machine.sh [WORK_DIR]   (default /var/tmp/time-onnx-fresh)
#
# Not part of CI (about 40 minutes on 2 cores). Run it when setup changes.
# Commit first: only committed files are copied.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/var/tmp/time-onnx-fresh}
MIRROR=http://deb.debian.org/debian
SECURITY=http://deb.debian.org/debian-security
say() { printf '[fresh] %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || { say "run as root: debootstrap and chroot need it"; exit 1; }
case "$WORK" in /|/usr|/var|/tmp|"$ROOT") say "refusing work folder $WORK"; exit 1 ;; esac
if ! command -v debootstrap >/dev/null 2>&1; then
  say "installing debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

fs=$WORK/root
unmount_all() {
  for m in dev/pts dev sys proc; do
    mountpoint -q "$fs/$m" 2>/dev/null && umount -l "$fs/$m"
  done
  return 0
}
unmount_all
rm -rf "$WORK"
mkdir -p "$WORK"
trap unmount_all EXIT

say "debootstrap bookworm into $fs"
t=$SECONDS
debootstrap bookworm "$fs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
  { tail -n 20 "$WORK/debootstrap.log" >&2; exit 1; }
t_boot=$((SECONDS - t))
cat >"$fs/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY bookworm-security main
EOF
cp /etc/resolv.conf "$fs/etc/resolv.conf"
# The host's registry access belongs to the machine, not to the project: extra CA
# certificates (a TLS-inspecting egress proxy) and pip's settings are copied in;
# ca-certificates, installed by setup.sh, picks the certificates up.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  mkdir -p "$fs/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$fs/usr/local/share/ca-certificates/"
fi
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$fs/etc/pip.conf"
mount -t proc proc "$fs/proc"
mount -t sysfs sys "$fs/sys"
mount --bind /dev "$fs/dev"
mount --bind /dev/pts "$fs/dev/pts"

commit=$(git -C "$ROOT" rev-parse --short=12 HEAD)
mkdir -p "$fs/root/time-onnx"
git -C "$ROOT" archive --format=tar HEAD | tar -x -C "$fs/root/time-onnx"

inside() { # <command>: run in the fresh root as root, with a login-like environment
  chroot "$fs" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    bash -c "cd /root/time-onnx && $1"
}
before=$(inside 'command -v cargo rustc || echo "no cargo, no rustc"')
say "before: $before"

run() { # <name> <command>: times one README command, keeps its log
  local t=$SECONDS status=0
  say "running $2 (log: $WORK/$1.log)"
  inside "$2" >"$WORK/$1.log" 2>&1 || status=$?
  echo "$((SECONDS - t)) $status"
}
read -r t_demo s_demo < <(run demo scripts/demo.sh)
read -r t_test s_test < <(run test scripts/test.sh)
rust=$(inside 'cargo --version; rustc --version' | paste -sd ';' | sed 's/;/; /')

cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|avx2|avx512[a-z_0-9]*|avx_vnni|fma|amx[a-z_0-9]*)$' | paste -sd ' ')
doc=$ROOT/docs/fresh-machine.md
mkdir -p "$ROOT/docs"
{
  echo "# The quick start on a fresh Debian 12"
  echo
  echo "Recorded by \`sudo scripts/fresh-machine.sh\` on $(date -u +%Y-%m-%d), commit $commit: a"
  echo "debootstrap'ed bookworm root (sources: bookworm, bookworm-updates, bookworm-security), a"
  echo "\`git archive\` of the commit in /root/time-onnx, the two README commands run in it with"
  echo "chroot, as root. Host: $cpu, $(nproc) cores, flags: $flags."
  echo
  echo "Before: \`command -v cargo rustc\` → $before."
  echo "After: $rust."
  echo
  echo "| step | wall time | exit |"
  echo "|---|---|---|"
  echo "| debootstrap | ${t_boot} s | 0 |"
  echo "| \`scripts/demo.sh\` | ${t_demo} s | $s_demo |"
  echo "| \`scripts/test.sh\` | ${t_test} s | $s_test |"
  for name in demo test; do
    echo
    echo "Last lines of \`scripts/$name.sh\`:"
    echo
    echo '```'
    grep -v '^\s*$' "$WORK/$name.log" | tail -n 8
    echo '```'
  done
} >"$doc"
say "wrote $doc"
[ "$s_demo" = 0 ] && [ "$s_test" = 0 ]
