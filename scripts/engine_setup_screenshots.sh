#!/bin/bash
# docs/img/engine-*.png from the real QGIS desktop under Xvfb: a fresh profile, a decoy python3 first on PATH
# (pyenv's shim when there is one), the packaged plugin; then the same profile after a version bump.
# Usage: scripts/engine_setup_screenshots.sh [DISPLAY]   (needs qgis, xvfb; builds one real engine, ~1 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
SCREEN=${1:-:81}
WORK=output/engine-screenshots
rm -rf "$WORK" && mkdir -p "$WORK/plugins" "$WORK/plugins-upgraded" "$WORK/decoy"
make -s package >/dev/null
ZIP=$(ls dist/treeseg_qgis-*.zip)
/usr/bin/python3 -m zipfile -e "$ZIP" "$WORK/plugins"
/usr/bin/python3 -m zipfile -e "$ZIP" "$WORK/plugins-upgraded"
sed -i 's/^version=.*/version=9.9.9/' "$WORK/plugins-upgraded/treeseg_qgis/metadata.txt"
if [ -x "$HOME/.pyenv/shims/python3" ]; then DECOY="$HOME/.pyenv/shims"; else
  printf '#!/bin/sh\nexec /usr/bin/python3 -S "$@"\n' > "$WORK/decoy/python3"; chmod +x "$WORK/decoy/python3"
  DECOY="$PWD/$WORK/decoy"; fi
if ! xdpyinfo -display "$SCREEN" >/dev/null 2>&1; then
  Xvfb "$SCREEN" -screen 0 1600x1000x24 -nolisten tcp >/dev/null 2>&1 & XVFB=$!; trap 'kill $XVFB' EXIT; sleep 1
fi
for scenario in build upgrade; do
  plugins=$WORK/plugins; [ $scenario = upgrade ] && plugins=$WORK/plugins-upgraded
  env -u TREESEG_ENGINE_PYTHON -u QT_QPA_PLATFORM DISPLAY="$SCREEN" PATH="$DECOY:$PATH" HOME="$PWD/$WORK/home" \
    PYENV_ROOT="${PYENV_ROOT:-$HOME/.pyenv}" \
    HF_HUB_OFFLINE=1 QGIS_PLUGINPATH="$PWD/$plugins" TREESEG_REPO="$PWD" TREESEG_SCENARIO=$scenario \
    TREESEG_OUT="$PWD/$WORK/$scenario.json" TREESEG_RUN_OUTPUT="$PWD/$WORK/run" \
    qgis.bin --nologo --noversioncheck --profiles-path "$PWD/$WORK/profiles" \
    --code scripts/engine_setup_screenshots.py >"$WORK/$scenario.log" 2>&1 || true
  cat "$WORK/$scenario.json"
done
