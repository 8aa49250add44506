"""Model loading through the real loader: tiny DINOv3 folders, catalogue, errors, untrained weights."""

import json

import pytest
import torch
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

from treeseg_qgis.engine.core.errors import ModelUnavailableError
from treeseg_qgis.engine.core.models import (
    CATALOGUE,
    IMAGENET_MEAN,
    SAT493M_MEAN,
    SAT493M_STD,
    classify_hub_error,
    explain_load_failure,
    load_backbone,
    normalisation_for,
)


def test_local_folder_loads_through_automodel(tiny_model_dir):
    backbone = load_backbone(str(tiny_model_dir), device="cpu")
    assert not backbone.untrained
    assert backbone.model_id == str(tiny_model_dir)
    assert backbone.feature_dim == 64
    assert backbone.num_register_tokens == 4
    assert backbone.normalisation.mean == IMAGENET_MEAN
    tokens = backbone.model(pixel_values=torch.zeros(1, 3, 64, 48)).last_hidden_state
    assert tokens.shape == (1, 1 + 4 + (64 // 16) * (48 // 16), 64)


def test_catalogue_names_ids_and_normalisation():
    assert set(CATALOGUE) == {"small", "small+", "base", "large", "giant", "mega", "large-sat", "mega-sat"}
    assert CATALOGUE["small"].repo_ids == (
        "facebook/dinov3-vits16plus-pretrain-lvd1689m", "facebook/dinov3-vits16-pretrain-lvd1689m")
    assert CATALOGUE["giant"].repo_ids == ("facebook/dinov3-vith16plus-pretrain-lvd1689m",)
    assert CATALOGUE["mega-sat"].repo_ids == ("facebook/dinov3-vit7b16-pretrain-sat493m",)
    assert CATALOGUE["large-sat"].normalisation.mean == SAT493M_MEAN
    assert CATALOGUE["large-sat"].normalisation.std == SAT493M_STD
    assert CATALOGUE["base"].normalisation.mean == IMAGENET_MEAN
    assert normalisation_for("someone/dinov3-vitl16-pretrain-sat493m").mean == SAT493M_MEAN


def test_folder_normalisation_comes_from_its_preprocessor_config(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for item in tiny_model_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": list(SAT493M_MEAN), "image_std": list(SAT493M_STD)}))
    assert load_backbone(str(folder), device="cpu").normalisation.std == SAT493M_STD


def test_hub_id_offline_without_cache_names_the_page_and_login(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelUnavailableError) as caught:
        load_backbone("base", device="cpu")
    message = str(caught.value)
    assert "https://huggingface.co/facebook/dinov3-vitb16-pretrain-lvd1689m" in message
    assert "HF_TOKEN" in message and "offline" in message
    assert "Raster ▸ TreeSeg (DINOv3) ▸ Models… (Hugging Face token, Save token)" in message


def hub_response(status: int):
    """The HTTP response object huggingface_hub attaches to its errors."""
    import httpx2

    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))


def test_gated_error_message_says_accept_the_licence_and_log_in():
    error = OSError("You are trying to access a gated repo.")
    error.__cause__ = GatedRepoError("401 Client Error", response=hub_response(401))
    assert classify_hub_error(error) == "gated"
    forbidden = OSError("access refused")
    forbidden.__cause__ = HfHubHTTPError("403 Forbidden", response=hub_response(403))
    assert classify_hub_error(forbidden) == "gated"
    message = explain_load_failure("facebook/dinov3-vitl16-pretrain-sat493m", error)
    assert "https://huggingface.co/facebook/dinov3-vitl16-pretrain-sat493m" in message
    assert "licence" in message and "HF_TOKEN" in message and "401/403" in message


def test_offline_cache_miss_is_classified_offline():
    error = OSError("We couldn't connect")
    error.__cause__ = LocalEntryNotFoundError("not cached")
    assert classify_hub_error(error) == "offline"


def test_untrained_only_when_allowed_and_then_marked(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    backbone = load_backbone("small", device="cpu", allow_untrained=True)
    assert backbone.untrained
    assert backbone.describe()["weights"].startswith("untrained")
    assert backbone.model_id == "facebook/dinov3-vits16plus-pretrain-lvd1689m"
    config = backbone.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.use_gated_mlp) == (384, 12, True)


def test_untrained_unknown_id_is_refused():
    with pytest.raises(ModelUnavailableError, match="catalogue name"):
        load_backbone("someone/not-a-model", device="cpu", allow_untrained=True)


def test_folder_that_is_not_dinov3_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelUnavailableError, match="not a DINOv3"):
        load_backbone(str(tmp_path), device="cpu")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelUnavailableError, match="no config.json"):
        load_backbone(str(tmp_path), device="cpu")


def test_folder_with_pickled_weights_only_is_refused(tiny_model_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelUnavailableError, match="safetensors"):
        load_backbone(str(tmp_path), device="cpu")
