#!/usr/bin/env bash
# Runs a command in a Debian root that carries another QGIS LTR beside the system's QGIS 3.22, with this
# repository bind-mounted at /repo:
#   scripts/qgis_root.sh 3.44 python -m pytest -q   # the suite on QGIS 3.44 LTR
#   scripts/qgis_root.sh 3.40 python -c '...'       # any command; python is the root's engine venv
# VERSION picks the Debian release and its backports suite:
#   3.40: Debian 12 (bookworm) + bookworm-backports; 3.44: Debian 13 (trixie) + trixie-backports.
# Each root is made once with debootstrap (minutes, by load; about 4 GB) in $TREESEG_QGIS<NNN>_ROOT
# (default /var/cache/treeseg-qgis<NNN>, e.g. 344) and reused afterwards; its venv is /opt/treeseg-venv there.
# Runs itself with sudo when not root (debootstrap, chroot, mounts). The mounts live in a private mount
# namespace, so they disappear with the command. The host's pip configuration, local wheels and CA bundle
# are mounted in, so pip finds the same files as on the host.
set -euo pipefail
VERSION=${1:-}
case "$VERSION" in
    3.40) SUITE=bookworm DEBIAN_PINS="" ;;
    # trixie has Python 3.13. PyPI's torch 2.13.0 for it is the CUDA build, whose CUDA wheels the registry
    # lacks, and scikit-image 0.24.0 has no 3.13 wheel: Debian's CPU torch 2.6 and scikit-image 0.25 stand in
    # (requirement name=Debian package; the pins are left out of pip's install and the Debian versions held).
    3.44) SUITE=trixie DEBIAN_PINS="torch=python3-torch scikit-image=python3-skimage" ;;
    *) echo "usage: scripts/qgis_root.sh 3.40|3.44 [COMMAND...]" >&2; exit 2 ;;
esac
shift
NAME=qgis${VERSION/./}
ROOT_VARIABLE=TREESEG_QGIS${VERSION/./}_ROOT
REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${!ROOT_VARIABLE:-/var/cache/treeseg-$NAME}
MIRROR=${TREESEG_DEBIAN_MIRROR:-http://deb.debian.org/debian}
VENV=/opt/treeseg-venv
READY=$ROOT/.treeseg-root-ready
QGIS_PACKAGES="python3-qgis qgis-providers qgis"
DEBIAN_PYTHON_PACKAGES=$(for pin in $DEBIAN_PINS; do printf ' %s' "${pin#*=}"; done)
# fonts-open-sans: QGIS otherwise tries to download Open Sans at start and shows that it failed.
BASE_PACKAGES="python3-venv python3-matplotlib xvfb xauth make git ca-certificates fonts-open-sans$DEBIAN_PYTHON_PACKAGES"

if [ "$(id -u)" -ne 0 ]; then
    echo "$NAME: debootstrap, chroot and mounts need root: running with sudo" >&2
    exec sudo --preserve-env="$ROOT_VARIABLE",TREESEG_DEBIAN_MIRROR,QT_QPA_PLATFORM,DISPLAY "$0" "$VERSION" "$@"
fi

# Host folders that pip's configuration points at (local wheels and simple indexes), mounted read-only.
PIP_FOLDERS=()
for folder in /etc/xdg/pip /opt/wheels /opt/pypi /opt/pypi-more; do
    [ -d "$folder" ] && PIP_FOLDERS+=("$folder")
done

# Inside: which root this is (tests that need the host skip on it).
export TREESEG_QGIS_ROOT_VERSION=$VERSION
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
# The repository's .venv is the host's (another Python): inside, that path is the root's venv.
# (made empty first: on the root's first making, apt runs in it before the venv exists)
if [ -d "$repo/.venv" ] && [ ! -L "$repo/.venv" ]; then
    mkdir -p "$root/opt/treeseg-venv" && mount --bind "$root/opt/treeseg-venv" "$root/repo/.venv"
fi
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
    TREESEG_QGIS_ROOT_VERSION="$TREESEG_QGIS_ROOT_VERSION" \
    bash -c 'cd /repo && exec "$@"' bash "$@"
EOF
}

install_packages() {
    in_root bash -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends $BASE_PACKAGES >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends -t $SUITE-backports $QGIS_PACKAGES >/dev/null && apt-get clean"
    echo "$BASE_PACKAGES $QGIS_PACKAGES" >"$READY"
}

DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
if [ ! -f "$READY" ]; then
    started=$(date +%s)
    echo "$NAME: making the QGIS $VERSION root ($SUITE) in $ROOT (debootstrap and apt, several minutes, once)" >&2
    # Ubuntu's debootstrap does not carry Debian's archive key: debian-archive-keyring does (Ubuntu universe).
    if ! command -v debootstrap >/dev/null || [ ! -f "$DEBIAN_KEYRING" ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            debootstrap debian-archive-keyring >/dev/null
    fi
    rm -rf "$ROOT" && mkdir -p "$ROOT"
    debootstrap --variant=minbase --keyring="$DEBIAN_KEYRING" "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 \
        || { echo "$NAME: debootstrap failed; see $ROOT.debootstrap.log" >&2; exit 1; }
    cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $MIRROR $SUITE-backports main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF
    install_packages
    echo "$NAME: root made in $(( $(date +%s) - started )) s" >&2
elif [ "$(cat "$READY")" != "$BASE_PACKAGES $QGIS_PACKAGES" ]; then
    echo "$NAME: installing the packages added to the root's list" >&2
    install_packages
fi
# The root must carry the QGIS it is named after (a backports suite that moved on is an error, not a pass).
in_root python3 -c "import sys, qgis.core; v = qgis.core.Qgis.QGIS_VERSION; print('$NAME: QGIS', v, file=sys.stderr)
sys.exit(0 if v.startswith('$VERSION.') else f'$NAME: this root has QGIS {v}, not $VERSION')"

# The engine venv inside the root: the root's Python with QGIS's packages, and the pinned requirements
# (held at QGIS's numpy and scipy; the DEBIAN_PINS packages come from Debian, at Debian's versions).
if [ ! -f "$ROOT$VENV/.setup-stamp" ] || [ "$REPO/requirements.txt" -nt "$ROOT$VENV/.setup-stamp" ] \
        || [ "$(cat "$ROOT$VENV/.setup-stamp")" != "$DEBIAN_PINS" ]; then
    echo "$NAME: installing the Python requirements into the root's $VENV" >&2
    modules="numpy scipy $(for pin in $DEBIAN_PINS; do printf '%s ' "${pin%%=*}"; done)"
    left_out=$(for pin in $DEBIAN_PINS; do printf '%s|' "${pin%%=*}"; done)
    in_root bash -c "set -e; [ -x $VENV/bin/python ] || /usr/bin/python3 -m venv --system-site-packages $VENV
        /usr/bin/python3 -c 'import importlib.metadata as m, sys
print(\"\n\".join(f\"{n}=={m.version(n)}\" for n in sys.argv[1:]))' $modules > $VENV/qgis-constraints.txt
        grep -v -E '^(${left_out%|})==' requirements.txt > $VENV/requirements.txt
        $VENV/bin/pip install --quiet --disable-pip-version-check -r $VENV/requirements.txt -c $VENV/qgis-constraints.txt
        echo -n '$DEBIAN_PINS' > $VENV/.setup-stamp"
fi

[ $# -eq 0 ] && exit 0
in_root "$@"
