#!/usr/bin/env bash
# Checks out the upstream research code (luccahuguet/tree-seg-unsuper) with its dinov3 submodule at
# pinned commits and gives it its own virtual environment, for scripts/bench_upstream.py.
# UPSTREAM_GIT and DINOV3_GIT may name local mirrors instead of GitHub; UPSTREAM_DIR is where it goes.
set -euo pipefail
cd "$(dirname "$0")/.."
UPSTREAM_GIT=${UPSTREAM_GIT:-https://github.com/luccahuguet/tree-seg-unsuper}
DINOV3_GIT=${DINOV3_GIT:-https://github.com/facebookresearch/dinov3}
UPSTREAM_DIR=${UPSTREAM_DIR:-output/bench/upstream}
UPSTREAM_COMMIT=124a6704f9b63319216337c37d6ea5df76f42792   # 2025-12-09, "Fix results sort alias handling"
DINOV3_COMMIT=54694f7627fd815f62a5dcc82944ffa6153bbb76     # the submodule commit upstream pins

if [ ! -d "$UPSTREAM_DIR/src/.git" ]; then
  rm -rf "$UPSTREAM_DIR/src"
  git clone --quiet --no-checkout "$UPSTREAM_GIT" "$UPSTREAM_DIR/src"
fi
git -C "$UPSTREAM_DIR/src" -c advice.detachedHead=false checkout --quiet "$UPSTREAM_COMMIT"
if [ ! -d "$UPSTREAM_DIR/src/dinov3/.git" ]; then
  rm -rf "$UPSTREAM_DIR/src/dinov3"
  git clone --quiet --no-checkout "$DINOV3_GIT" "$UPSTREAM_DIR/src/dinov3"
fi
git -C "$UPSTREAM_DIR/src/dinov3" -c advice.detachedHead=false checkout --quiet "$DINOV3_COMMIT"

if [ ! -x "$UPSTREAM_DIR/venv/bin/python" ]; then
  /usr/bin/python3 -m venv "$UPSTREAM_DIR/venv"
fi
PIP="$UPSTREAM_DIR/venv/bin/pip"
# The same torch build as the product's engine (a CPU wheel); torchvision without its own torch pin.
"$PIP" install --quiet torch==2.13.0
"$PIP" install --quiet --no-deps torchvision==0.28.0
# Upstream's uv.lock versions where they exist for this Python (3.11), with numpy 1.26 rather than its 2.2:
# under numpy 2's promotion rules its overlay (`(1 - alpha) * image` on uint8) overflows and fails the run.
# opencv-contrib gives its SLIC refinement (cv2.ximgproc); without it upstream skips that step.
"$PIP" install --quiet numpy==1.26.4 scipy==1.15.3 scikit-learn==1.7.0 scikit-image==0.25.2 matplotlib==3.10.3 \
  pillow==11.2.1 opencv-contrib-python-headless==4.10.0.84 typer rich python-dotenv pyyaml safetensors \
  huggingface_hub termcolor torchmetrics omegaconf ftfy regex
echo "upstream ready: $UPSTREAM_DIR (tree-seg-unsuper $UPSTREAM_COMMIT, dinov3 $DINOV3_COMMIT)"
