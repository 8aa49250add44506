"""Canopy height with a tiny CHMv2 saved to disk and loaded through the real loader."""

import numpy as np
import pytest
from osgeo import gdal

from treeseg_qgis.engine.core.canopy import HEIGHT_MODEL, load_height_model
from treeseg_qgis.engine.core.errors import ModelUnavailableError
from treeseg_qgis.engine.pipeline import segment
from treeseg_qgis.params import SegmentationParams


@pytest.fixture(scope="session")
def tiny_height_dir(tmp_path_factory):
    import torch
    from transformers import CHMv2Config, CHMv2ForDepthEstimation, DINOv3ViTConfig

    folder = tmp_path_factory.mktemp("tiny-chmv2")
    torch.manual_seed(0)
    backbone = DINOv3ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128,
                               patch_size=16, num_register_tokens=4, out_indices=[1, 2, 3, 4],
                               reshape_hidden_states=True, apply_layernorm=True, return_class_token=True)
    config = CHMv2Config(backbone_config=backbone, post_process_channels=[16, 32, 64, 128], fusion_hidden_size=32,
                         head_hidden_size=16, number_output_channels=32)
    CHMv2ForDepthEstimation(config).save_pretrained(folder)
    return folder


def band(path) -> np.ndarray:
    dataset = gdal.Open(path)
    return dataset.GetRasterBand(1).ReadAsArray()


def test_height_model_predicts_metres_per_pixel(tiny_height_dir):
    model = load_height_model(str(tiny_height_dir), device="cpu")
    heights = model.predict(np.random.default_rng(0).random((64, 96, 3)).astype(np.float32))
    assert heights.shape == (64, 96) and np.isfinite(heights).all()
    assert not model.untrained and model.describe()["model_id"] == str(tiny_height_dir)


def test_height_model_offline_names_the_page(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="huggingface.co/facebook/dinov3-vitl16-chmv2-dpt-head"):
        load_height_model(HEIGHT_MODEL, device="cpu")


def test_a_backbone_folder_is_not_a_height_model(tiny_model_dir):
    with pytest.raises(ModelUnavailableError, match="not a canopy-height model"):
        load_height_model(str(tiny_model_dir), device="cpu")


def test_height_raster_and_the_minimum_height_rule(tiny_model_dir, tiny_height_dir, scene_tif, tmp_path):
    path, _ = scene_tif

    def run(out, minimum):
        return segment(SegmentationParams(
            input_path=str(path), output_dir=str(tmp_path / out), model=str(tiny_model_dir), device="cpu",
            clusters=2, tile_size=128, overlap=32, height_model=str(tiny_height_dir), canopy_height=True,
            min_tree_height_m=minimum))

    free = run("free", None)
    heights = band(free.outputs["height"])
    source = gdal.Open(str(path))
    height_file = gdal.Open(free.outputs["height"])
    assert height_file.GetGeoTransform() == source.GetGeoTransform()
    assert heights.shape == (320, 400) and (heights >= 0).all()
    assert free.model.height_model.model_id == str(tiny_height_dir)
    cut = float(np.median(heights))
    limited = run("limited", cut)
    trees_free = band(free.outputs["trees"]) == 1
    trees_limited = band(limited.outputs["trees"]) == 1
    assert not (trees_limited & ~trees_free).any()
    assert not (trees_limited & (heights < cut)).any()
    assert limited.trees.tree_pixels == int(trees_limited.sum()) < free.trees.tree_pixels
    assert "canopy height ≥" in limited.trees.rule
