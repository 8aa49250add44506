"""The one parameters object: standard library only, one set of allowed values, a JSON round trip."""

import json
import subprocess
import sys
from dataclasses import MISSING, FrozenInstanceError, fields, replace
from pathlib import Path

import pytest

from treeseg_qgis.outputs import OUTPUT_KINDS
from treeseg_qgis.params import (
    AUTO,
    CROWN_DEFAULTS,
    K_MAX,
    STRIDES,
    CrownOptions,
    OutputFiles,
    ParameterError,
    Role,
    SegmentationParams,
    names_with,
    parse_clusters,
    remembered_names,
)

REPO = Path(__file__).resolve().parents[1]


def test_the_params_module_loads_without_torch_numpy_or_qgis():
    check = ("import sys; import treeseg_qgis.params; "
             "print(sorted(m for m in ('torch', 'numpy', 'qgis', 'osgeo', 'PyQt5') if m in sys.modules))")
    output = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "[]"


def test_a_run_survives_the_trip_to_the_worker_as_json():
    params = SegmentationParams("in.tif", "out", stride=8, clusters=5, tree_clusters=(1, 3),
                                outputs=OutputFiles(clusters="/tmp/c.tif", polygons="/tmp/p.gpkg"))
    params.validate()
    again = SegmentationParams.from_json(json.loads(json.dumps(params.to_json())))
    assert again == params
    assert again.outputs.clusters == "/tmp/c.tif" and again.outputs.trees is None
    assert set(params.to_json()["outputs"]) == set(OUTPUT_KINDS)


@pytest.mark.parametrize("change, words", [
    ({"stride": 12}, "stride"), ({"stride": "16"}, "stride"), ({"clusters": 0}, "clusters"),
    ({"clusters": K_MAX + 1}, "clusters"), ({"clusters": None}, "clusters"), ({"device": "tpu"}, "device"),
    ({"precision": "fp8"}, "precision"), ({"k_min": 9, "k_max": 3}, "range"), ({"bands": (1, 2)}, "Bands"),
    ({"overlap": 8}, "overlap"), ({"min_tree_height_m": float("nan")}, "min_tree_height_m"),
    ({"method": "exg-otsu", "clusters": 4}, "ExG-Otsu"), ({"model": " "}, "model"), ({"output_dir": ""}, "output"),
])
def test_values_no_run_can_use_are_refused_with_what_is_allowed(change, words):
    params = SegmentationParams(**{"input_path": "in.tif", "output_dir": "out", **change})
    with pytest.raises(ParameterError, match=f"(?i){words}"):
        params.validate()


def test_automatic_clusters_have_one_spelling():
    assert parse_clusters("auto") == parse_clusters("") == parse_clusters(0) == parse_clusters(None) == AUTO
    assert parse_clusters("6") == 6
    assert SegmentationParams("in.tif", "out").fixed_clusters is None
    assert SegmentationParams("in.tif", "out", clusters=6).fixed_clusters == 6
    with pytest.raises(ParameterError):
        parse_clusters("many")


def test_unknown_names_from_another_version_are_refused():
    with pytest.raises(ParameterError, match="Unknown parameters: colour"):
        SegmentationParams.from_json({"input_path": "a", "output_dir": "b", "colour": 1})
    with pytest.raises(ParameterError, match="Unknown outputs: maps"):
        SegmentationParams.from_json({"input_path": "a", "output_dir": "b", "outputs": {"maps": "x"}})


def test_the_strides_are_defined_once():
    sources = [path for path in (REPO / "treeseg_qgis").rglob("*.py")
               if "(16, 8, 4)" in path.read_text() or '("16", "8", "4")' in path.read_text()]
    assert sources == [] and STRIDES == (16, 8, 4)


def test_every_field_declares_its_role_unit_and_default():
    for item in fields(SegmentationParams):
        assert isinstance(item.metadata.get("role"), Role) and item.metadata["role"], item.name
        assert isinstance(item.metadata.get("unit"), str) and isinstance(item.metadata.get("remembered"), bool)
        has_default = item.default is not MISSING or item.default_factory is not MISSING
        assert has_default or item.name in ("input_path", "output_dir"), item.name
    assert SegmentationParams.stride == STRIDES[0]
    assert SegmentationParams.crown_min_area_m2 == CROWN_DEFAULTS.min_area_m2


def test_what_the_roles_derive_names_every_field_of_that_role_once():
    features, model, survey = (names_with(role) for role in (Role.FEATURES, Role.MODEL, Role.SURVEY))
    assert {"method", "model", "stride", "tile_size", "precision", "seed"} <= set(features)
    assert set(survey) <= set(features) and "precision" not in survey  # a survey checks it via its extractor
    assert {"model", "model_revision", "device", "precision", "allow_untrained"} == set(model)
    assert "output_stem" not in features and "input_path" not in remembered_names()


def test_params_are_frozen_and_changed_by_copy():
    params = SegmentationParams("in.tif", "out")
    with pytest.raises(FrozenInstanceError):
        params.output_stem = "other"  # type: ignore[misc]
    assert replace(params, output_stem="other").output_stem == "other" and params.output_stem is None


def test_crown_options_cross_as_json_and_are_refused_when_unusable():
    options = CrownOptions(min_area_m2=1.5, smoothing_m=0.0)
    assert CrownOptions.from_json(json.loads(json.dumps(options.to_json()))) == options
    assert SegmentationParams("in.tif", "out", crown_min_area_m2=3.0).crown_options == replace(CROWN_DEFAULTS,
                                                                                              min_area_m2=3.0)
    for bad, words in (({"min_area_m2": -1}, "min_area_m2"), ({"max_crown_m": 0}, "max_crown_m"),
                       ({"smoothing_m": "0.2"}, "smoothing_m"), ({"radius": 1}, "Unknown crown options: radius")):
        with pytest.raises(ParameterError, match=words):
            CrownOptions.from_json(bad)
