#!/usr/bin/env bash
# Installs what treeseg-qgis needs, idempotently: Debian's QGIS (Python bindings, and
# the desktop package for qgis_process),
# then .venv (QGIS's /usr/bin/python3 with --system-site-packages) with the pinned
# requirements. numpy and scipy stay at QGIS's versions (a pip constraint), so
# QGIS's own numpy and GDAL bindings keep working.
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PYTHON=/usr/bin/python3
VENV=.venv
STAMP=$VENV/.setup-stamp

if ! "$SYSTEM_PYTHON" -c "import qgis.core, osgeo.gdal" >/dev/null 2>&1 || [ ! -x /usr/bin/qgis_process.bin ] || ! command -v Xvfb >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: QGIS's Python bindings are missing and this system has no apt-get." >&2
        echo "setup: install QGIS 3.22 or newer with its Python bindings (python3-qgis)," >&2
        echo "setup: then run make again." >&2
        exit 1
    fi
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        SUDO=sudo
        echo "setup: installing QGIS with sudo (you may be asked for your password)" >&2
    fi
    echo "setup: installing Debian's QGIS packages (about a minute)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        python3-qgis qgis-providers qgis xvfb python3-venv python3-matplotlib >/dev/null
fi

# Real Qt6 for tests/test_qt6_real.py (QGIS 4 is Qt6-only and not packaged here): PyQt6 alone, in its own venv.
QT6_VENV=.venv-qt6
if ! "$QT6_VENV/bin/python" -c "import PyQt6.QtWidgets" >/dev/null 2>&1; then
    echo "setup: creating $QT6_VENV with PyQt6 (real Qt6 for the QGIS 4 checks, about 300 MB)" >&2
    "$SYSTEM_PYTHON" -m venv --clear "$QT6_VENV"
    "$QT6_VENV/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: PyQt6==6.11.0
fi

if [ -f "$STAMP" ] && [ "$STAMP" -nt requirements.txt ] && [ -x "$VENV/bin/python" ]; then
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV from $SYSTEM_PYTHON" >&2
    "$SYSTEM_PYTHON" -m venv --system-site-packages "$VENV"
fi
CONSTRAINTS=$VENV/qgis-constraints.txt
"$SYSTEM_PYTHON" -c 'import numpy, scipy; print(f"numpy=={numpy.__version__}\nscipy=={scipy.__version__}")' > "$CONSTRAINTS"
echo "setup: installing the Python requirements into $VENV (about a minute the first time)" >&2
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r requirements.txt -c "$CONSTRAINTS"
touch "$STAMP"
