"""Where results land and what re-runs do, in the real QGIS window (under Xvfb): Processing runs with a nested
result group selected in Layers, a batch row with a blank optional output, repeats, another K and two teach runs
(tests/desktop/result_groups.py drives them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import REPO
from .test_engine_desktop import QGIS_TIMEOUT, display, pytestmark  # noqa: F401 - the Xvfb fixture, the skip

ENGINE_PYTHON_ENV = "TREESEG_ENGINE_PYTHON"


def test_processing_results_in_the_real_window_land_at_the_top_and_reruns_replace_or_switch_off(
        tmp_path, display, scene_tif, tiny_model_dir):  # noqa: F811
    path, _ = scene_tif
    result = tmp_path / "tree.json"
    env = dict(os.environ, DISPLAY=display, HOME=str(tmp_path / "home"), TREESEG_REPO=str(REPO),
               TREESEG_OUT=str(result), TREESEG_INPUT=str(path), TREESEG_MODEL=str(tiny_model_dir),
               HF_HUB_OFFLINE="1", **{ENGINE_PYTHON_ENV: sys.executable})
    env.pop("QT_QPA_PLATFORM", None)

    qgis = subprocess.run(["qgis.bin", "--nologo", "--noversioncheck", "--profiles-path", str(tmp_path / "profiles"),
                           "--code", str(REPO / "tests" / "desktop" / "result_groups.py")],
                          env=env, capture_output=True, text=True, timeout=3 * QGIS_TIMEOUT)

    assert result.is_file(), qgis.stdout[-2000:] + qgis.stderr[-2000:]
    found = json.loads(result.read_text())
    assert "exception" not in found, found.get("exception")
    base = f"scene — {tiny_model_dir.name}, stride 16"
    batch_top = found["after_batch"]["children"]
    assert batch_top[0]["group"] == base and batch_top[0]["checked"]  # at the top, not in the selected group
    site = next(child for child in batch_top if child.get("group") == "Site")
    assert site["children"] == []  # the nested result of the same settings was replaced
    top = found["tree"]["children"]
    assert [child.get("group", child.get("layer")) for child in top] == [
        "scene — taught by example", f"{base}, K=3", base, "scene", "Site"]
    assert [child["checked"] for child in top[:3]] == [True, False, False]
    assert [len(child["children"]) for child in top[:3]] == [2, 3, 3]
    assert found["errors"] == []
    assert found["layers"] == 1 + 1 + 3 + 3 + 2  # the raster, the examples, two runs, one teach
