#!/usr/bin/env bash
# Runs a command in a Debian 12 root that carries QGIS 3.40 LTR (bookworm-backports), beside the
# system's QGIS 3.22, with this repository bind-mounted at /repo:
#   scripts/qgis340.sh python -m pytest -q  # the suite on QGIS 3.40
#   scripts/qgis340.sh python -c '...'    # any command; python is the root's engine venv
# The root is made once with debootstrap (2 to 13 minutes here, by load; about 4 GB) in $TREESEG_QGIS340_ROOT
# (default /var/cache/treeseg-qgis340) and reused afterwards; its venv is /opt/treeseg-venv there.
# Runs itself with sudo when not root (debootstrap, chroot, mounts). The mounts live in a private mount
# namespace, so they disappear with the command. The host's pip configuration, local wheels
# (torch==2.13.0 CPU) and CA bundle are mounted in, so pip finds the same files as on the host.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${TREESEG_QGIS340_ROOT:-/var/cache/treeseg-qgis340}
MIRROR=${TREESEG_DEBIAN_MIRROR:-http://deb.debian.org/debian}
VENV=/opt/treeseg-venv
READY=$ROOT/.treeseg-root-ready
QGIS_PACKAGES="python3-qgis qgis-providers qgis"
# fonts-open-sans: QGIS 3.40 otherwise tries to download Open Sans at start and shows that it failed.
BASE_PACKAGES="python3-venv python3-matplotlib xvfb xauth make git ca-certificates fonts-open-sans"

if [ "$(id -u)" -ne 0 ]; then
    echo "qgis340: debootstrap, chroot and mounts need root: running with sudo" >&2
    exec sudo --preserve-env=TREESEG_QGIS340_ROOT,TREESEG_DEBIAN_MIRROR,QT_QPA_PLATFORM,DISPLAY "$0" "$@"
fi

# Host folders that pip's configuration points at (local wheels and simple indexes), mounted read-only.
PIP_FOLDERS=()
for folder in /etc/xdg/pip /opt/wheels /opt/pypi /opt/pypi-more; do
    [ -d "$folder" ] && PIP_FOLDERS+=("$folder")
done

in_root() {
    # Runs "$@" inside the root with /proc, /dev, /sys, the repository and pip's folders mounted.
    unshare --mount --propagation private bash -s "$ROOT" "$REPO" "${PIP_FOLDERS[@]}" -- "$@" <<'EOF'
set -euo pipefail
root=$1 repo=$2; shift 2
folders=()
while [ "$1" != "--" ]; do folders+=("$1"); shift; done
shift
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --rbind /sys "$root/sys"
mount -t tmpfs tmpfs "$root/tmp"
mkdir -p "$root/repo" && mount --bind "$repo" "$root/repo"
for folder in "${folders[@]}"; do
    mkdir -p "$root$folder" && mount --bind -o ro "$folder" "$root$folder"
done
# The host's CA bundle for pip (PIP_CERT below): it reaches the registries as on the host, proxy included.
mkdir -p "$root/etc/ssl" && touch "$root/etc/ssl/host-ca-certificates.crt"
mount --bind -o ro /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/host-ca-certificates.crt"
[ -f /root/.config/pip/pip.conf ] && mkdir -p "$root/root/.config/pip" && cp /root/.config/pip/pip.conf "$root/root/.config/pip/"
cp /etc/resolv.conf "$root/etc/resolv.conf"
exec chroot "$root" /usr/bin/env -i HOME=/root PATH=/opt/treeseg-venv/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=/etc/ssl/host-ca-certificates.crt LANG=C.UTF-8 TERM=dumb HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
    QT_QPA_PLATFORM="${QT_QPA_PLATFORM:-offscreen}" ${DISPLAY:+DISPLAY=$DISPLAY} \
    bash -c 'cd /repo && exec "$@"' bash "$@"
EOF
}

install_packages() {
    in_root bash -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends $BASE_PACKAGES >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends -t bookworm-backports $QGIS_PACKAGES >/dev/null && apt-get clean"
    echo "$BASE_PACKAGES $QGIS_PACKAGES" >"$READY"
}

DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
if [ ! -f "$READY" ]; then
    started=$(date +%s)
    echo "qgis340: making the QGIS 3.40 root in $ROOT (debootstrap and apt, several minutes, once)" >&2
    # Ubuntu's debootstrap does not carry Debian's archive key: debian-archive-keyring does (Ubuntu universe).
    if ! command -v debootstrap >/dev/null || [ ! -f "$DEBIAN_KEYRING" ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            debootstrap debian-archive-keyring >/dev/null
    fi
    rm -rf "$ROOT" && mkdir -p "$ROOT"
    debootstrap --variant=minbase --keyring="$DEBIAN_KEYRING" bookworm "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 \
        || { echo "qgis340: debootstrap failed; see $ROOT.debootstrap.log" >&2; exit 1; }
    cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $MIRROR bookworm-backports main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    install_packages
    in_root python3 -c "import qgis.core; print('qgis340: QGIS', qgis.core.Qgis.QGIS_VERSION)"
    echo "qgis340: root made in $(( $(date +%s) - started )) s" >&2
elif [ "$(cat "$READY")" != "$BASE_PACKAGES $QGIS_PACKAGES" ]; then
    echo "qgis340: installing the packages added to the root's list" >&2
    install_packages
fi

# The engine venv inside the root: the root's Python with QGIS's packages, and the pinned requirements.
if [ ! -f "$ROOT$VENV/.setup-stamp" ] || [ "$REPO/requirements.txt" -nt "$ROOT$VENV/.setup-stamp" ]; then
    echo "qgis340: installing the Python requirements into the root's $VENV" >&2
    in_root bash -c "set -e; [ -x $VENV/bin/python ] || /usr/bin/python3 -m venv --system-site-packages $VENV
        /usr/bin/python3 -c 'import numpy, scipy; print(f\"numpy=={numpy.__version__}\nscipy=={scipy.__version__}\")' > $VENV/qgis-constraints.txt
        $VENV/bin/pip install --quiet --disable-pip-version-check -r requirements.txt -c $VENV/qgis-constraints.txt
        touch $VENV/.setup-stamp"
fi

[ $# -eq 0 ] && exit 0
in_root "$@"
