"""The time estimate before a run (treeseg_qgis/memory.py and the panel): every part of a run counted, and this
machine's measured speed used once a run has shown it. The estimate's accuracy lives in docs/BENCHMARKS.md
(scripts/bench_estimate.py), not in a timed test."""

from __future__ import annotations

import json

import pytest

from treeseg_qgis import memory

from .test_gui import add_raster, clean_settings, plugin, set_up_run, wait_until  # noqa: F401 - fixtures


def test_a_first_run_counts_the_engine_start_model_load_and_export_a_warm_one_only_the_work():
    cold = memory.estimate_run_time("small", 1000, 1000, engine_started=False, model_loaded=False, exported=False)
    warm = memory.estimate_run_time("small", 1000, 1000)
    fixed_k = memory.estimate_run_time("small", 1000, 1000, automatic_k=False)
    float32 = memory.estimate_run_time("small", 1000, 1000, precision="float32", model_loaded=False, exported=False)

    assert cold.engine_start == memory.ENGINE_START_SECONDS and cold.model_load > 0 and cold.export > 0
    assert (warm.engine_start, warm.model_load, warm.export) == (0, 0, 0)
    assert warm.features == cold.features and warm.outputs == cold.outputs
    assert fixed_k.clustering < warm.clustering and warm.outputs > memory.PREVIEW_SECONDS
    assert float32.export == 0 and float32.features > warm.features
    larger = memory.estimate_run_time("small", 6000, 6000)
    assert larger.features > 10 * warm.features and larger.outputs > 10 * (warm.outputs - memory.PREVIEW_SECONDS)
    assert memory.estimate_run_time("small", 1000, 1000, speed=2.0).total == pytest.approx(2 * warm.total)
    assert memory.estimate_run_time("small", 1000, 1000, device="cuda") is None


def test_more_cores_shorten_the_forward_but_not_gdals_one_thread_writing_and_polygonizing():
    """400 MP on 2 cores spent 130 s writing and polygonizing (docs/BENCHMARKS.md, where the time goes: 9.3 and
    121.0 s), on one thread: 16 cores do not make that 8 times shorter, as they may the forward."""
    two = memory.estimate_run_time("small", 20_000, 20_000, cores=2)
    sixteen = memory.estimate_run_time("small", 20_000, 20_000, cores=16)

    assert sixteen.features == pytest.approx(two.features / 8)
    assert two.outputs - memory.PREVIEW_SECONDS == pytest.approx(400 * 0.47)
    assert 130 <= sixteen.outputs - memory.PREVIEW_SECONDS < two.outputs - memory.PREVIEW_SECONDS


def test_the_engine_estimates_the_precision_the_forward_runs_in(tmp_path, capsys):
    """The estimate a run prints first, before the model loads: float32 is the longer forward, as int8 is the
    faster one (docs/BENCHMARKS.md: 137.6 against 54.6 s at 36 MP). The model is a ViT-S's config.json without
    weights, so each run stops where the weights load."""
    from osgeo import gdal
    from transformers import DINOv3ViTConfig

    from treeseg_qgis.engine.cli import main

    weightless = tmp_path / "vits-without-weights"
    DINOv3ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                    patch_size=16, num_register_tokens=4).save_pretrained(weightless)
    raster = gdal.GetDriverByName("GTiff").Create(str(tmp_path / "large.tif"), 6000, 6000, 3, gdal.GDT_Byte,
                                                  ["SPARSE_OK=YES"])
    raster.SetGeoTransform((500_000.0, 0.1, 0.0, 3_300_000.0, 0.0, -0.1))
    raster = None
    lines = {}
    for precision in ("int8", "float32"):
        assert main(["segment", str(tmp_path / "large.tif"), "--out", str(tmp_path / precision), "--model",
                     str(weightless), "--precision", precision, "--no-cache", "--clusters", "4"]) != 0
        lines[precision] = next(line for line in capsys.readouterr().err.splitlines() if "Estimate: " in line)
    expected = {precision: memory.tiles_and_time(str(weightless), 6000, 6000, precision=precision,
                                                 automatic_k=False) for precision in lines}
    assert all(expected[precision] in lines[precision] for precision in lines), lines
    assert expected["int8"] != expected["float32"]


def test_this_machines_speed_is_the_median_of_the_last_runs_kept_within_bounds():
    assert memory.speed_factor([]) == 1.0
    assert memory.speed_factor([1.5, 3.0, 2.0]) == 2.0
    assert memory.speed_factor([40.0]) == memory.SPEED_FACTOR_RANGE[1]
    assert memory.speed_factor([0.01, 0.02]) == memory.SPEED_FACTOR_RANGE[0]


def test_the_text_says_one_tile_and_what_the_first_run_adds():
    first = memory.tiles_and_time("small", 96, 96, engine_started=False, model_loaded=False, exported=False)
    assert first.startswith("1 tile, about ")
    assert "on the CPU with the engine start, the model load and its first int8 export (" in first
    assert memory.tiles_and_time("small", 2000, 2000).startswith("25 tiles, about ")
    assert " with " not in memory.tiles_and_time("small", 2000, 2000)
    assert memory.tiles_and_time("small", 96, 96, device="cuda") == "1 tile, time unknown on the CUDA device"


def run_from_the_panel(plugin, scene_tif, tiny_model_dir, tmp_path):  # noqa: F811
    """The scene run once from the dock's panel with the tiny model; the panel and its estimate before the run."""
    path, _ = scene_tif
    panel = plugin.dock.run_panel
    panel.layer_combo.setLayer(add_raster(path))
    set_up_run(panel, tiny_model_dir, tmp_path / "out")
    plugin.action.trigger()
    wait_until(lambda: panel.probe.info is not None)
    before = panel.memory_label.text()
    panel.run_button.click()
    wait_until(lambda: panel.task is None)
    return panel, before


def test_the_panel_estimate_drops_the_model_load_after_a_run_and_learns_this_machines_speed(
        plugin, scene_tif, tiny_model_dir, tmp_path):  # noqa: F811
    from qgis.core import QgsSettings

    from treeseg_qgis.qgis_side.gui.run_estimates import EXPORTED_SETTING, SPEED_SETTING

    panel, before = run_from_the_panel(plugin, scene_tif, tiny_model_dir, tmp_path)

    assert panel.stage_label.text().startswith("Done"), panel.stage_label.text()
    assert "1 tile, about " in before and "model load" in before
    after = panel.memory_label.text()
    assert "1 tile, about " in after and "model load" not in after and "export" not in after
    (measured,) = json.loads(QgsSettings().value(SPEED_SETTING, "[]", type=str))
    assert measured > 0
    int8 = panel.probe.info["precision"] == "int8"
    assert json.loads(QgsSettings().value(EXPORTED_SETTING, "[]", type=str)) == ([str(tiny_model_dir)] if int8 else [])


def test_the_learnt_speed_leaves_out_the_steps_the_estimate_does_not_count(
        plugin, scene_tif, tiny_model_dir, tmp_path):  # noqa: F811
    """A run with the canopy-height head (or crowns) is not learnt as a slow machine: their seconds, from the run
    record, are taken off the measured time before it is compared with the estimate."""
    import time

    from qgis.core import QgsSettings

    from treeseg_qgis.qgis_side.gui.run_estimates import SPEED_SETTING
    from treeseg_qgis.run_record import RunRecord

    panel, _ = run_from_the_panel(plugin, scene_tif, tiny_model_dir, tmp_path)
    assert panel.stage_label.text().startswith("Done"), panel.stage_label.text()
    record = json.loads(next((tmp_path / "out").glob("*_run.json")).read_text())

    def learnt(extra_seconds: dict) -> float:
        QgsSettings().setValue(SPEED_SETTING, "[]")
        panel.estimates._run_timing = (time.monotonic() - 100.0, {})
        panel.estimates.learn_from(RunRecord.from_dict({**record, "timings": {**record["timings"], **extra_seconds}}),
                                   panel.choice())
        (ratio,) = json.loads(QgsSettings().value(SPEED_SETTING, "[]", type=str))
        return ratio

    plain = learnt({})
    assert learnt({"canopy_height": 60.0}) == pytest.approx(plain * 0.4, rel=0.01)
    assert learnt({"canopy_height": 30.0, "crowns": 30.0}) == pytest.approx(plain * 0.4, rel=0.01)
