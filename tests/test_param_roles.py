"""Parameters describe themselves: a field added to SegmentationParams with the FEATURES and SURVEY roles joins
the feature-cache key and the survey check with no other edit (real GeoTIFFs, a real tiny DINOv3)."""

from dataclasses import field, make_dataclass

import pytest

from treeseg_qgis.engine.core.errors import InputError
from treeseg_qgis.engine.core.survey_model import SurveyModel
from treeseg_qgis.engine.pipeline import segment
from treeseg_qgis.engine.survey import fit_survey
from treeseg_qgis.params import Role, SegmentationParams

ParamsWithTexture = make_dataclass(
    "ParamsWithTexture",
    [("texture_radius", int, field(default=0, metadata={"role": Role.FEATURES | Role.SURVEY, "unit": "px",
                                                         "remembered": False}))],
    bases=(SegmentationParams,), frozen=True)
"""SegmentationParams with one more feature-affecting setting, declared the way every field is."""


@pytest.fixture
def params(tiny_model_dir, scene_tif, tmp_path):
    path, _ = scene_tif

    def build(**options):
        values = dict(input_path=str(path), output_dir=str(tmp_path / "out"), model=str(tiny_model_dir),
                      device="cpu", cache_dir=str(tmp_path / "cache"), tile_size=128, overlap=32, clusters=2)
        return ParamsWithTexture(**{**values, **options})

    return build


def test_a_new_feature_setting_changes_the_feature_cache_key(params, tmp_path):
    assert segment(params()).feature_cache.state == "miss"
    assert segment(params(output_dir=str(tmp_path / "again"))).feature_cache.state == "hit"
    changed = segment(params(output_dir=str(tmp_path / "textured"), texture_radius=3))
    assert changed.feature_cache.state == "miss" and changed.parameters.texture_radius == 3


def test_a_new_survey_setting_is_kept_by_the_cluster_model_and_checked(params, tmp_path):
    model = tmp_path / "survey.treeseg"
    fit_survey([params().input_path], params(input_path=""), model)
    assert SurveyModel.load(model).settings["texture_radius"] == 0
    assert segment(params(cluster_model=str(model))).cluster_model.path == str(model)
    with pytest.raises(InputError, match=r"texture_radius 3 \(the model: 0\)"):
        segment(params(cluster_model=str(model), texture_radius=3, output_dir=str(tmp_path / "textured")))
