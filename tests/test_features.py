"""Dense features: patch tokens only, and a stride-8 grid that is truly denser."""

import numpy as np
import pytest

from treeseg_qgis.engine.core.errors import InputError
from treeseg_qgis.engine.core.features import FeatureExtractor, pool_to_grid
from treeseg_qgis.engine.core.models import load_backbone


@pytest.fixture(scope="module")
def backbone(tiny_model_dir):
    return load_backbone(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def tile():
    rng = np.random.default_rng(1)
    return rng.random((64, 96, 3)).astype(np.float32)


def test_stride_16_grid_is_the_patch_grid_without_cls_and_registers(backbone, tile):
    features = FeatureExtractor(backbone, stride=16).extract(tile)
    assert features.shape == (4, 6, 64)
    assert np.allclose(np.linalg.norm(features, axis=-1), 1, atol=1e-5)


def test_stride_8_is_twice_as_dense_and_not_an_upsample(backbone, tile):
    coarse = FeatureExtractor(backbone, stride=16).extract(tile)
    dense = FeatureExtractor(backbone, stride=8).extract(tile)
    assert dense.shape == (8, 12, 64)
    # even cells are the unshifted pass: exactly the stride-16 grid
    assert np.allclose(dense[0::2, 0::2], coarse, atol=1e-4)
    # odd cells come from the image moved by 8 px: the patch grid of that copy
    moved = np.pad(tile[8:, 8:], ((0, 8), (0, 8), (0, 0)), mode="edge")
    assert np.allclose(dense[1::2, 1::2], FeatureExtractor(backbone, stride=16).extract(moved), atol=1e-4)
    # an upsample would put each odd cell at the mean of its neighbours; it is far from it
    between = (dense[0:-2:2, 0:-2:2] + dense[2::2, 2::2] + dense[0:-2:2, 2::2] + dense[2::2, 0:-2:2]) / 4
    gap = np.linalg.norm(dense[1:-1:2, 1:-1:2] - between, axis=-1)
    assert gap.mean() > 0.1


def test_stride_4_gives_sixteen_passes(backbone, tile):
    extractor = FeatureExtractor(backbone, stride=4, batch_size=5)
    assert len(extractor.shifts) == 16
    assert extractor.extract(tile).shape == (16, 24, 64)


def test_batch_size_does_not_change_features(backbone, tile):
    one = FeatureExtractor(backbone, stride=8, batch_size=1).extract(tile)
    four = FeatureExtractor(backbone, stride=8, batch_size=4).extract(tile)
    assert np.allclose(one, four, atol=1e-4)


@pytest.mark.parametrize("stride, batch_size, per_batch", [(16, 4, 4), (8, 8, 2), (8, 3, 1)])
def test_tiles_batched_together_get_the_features_each_gets_alone(backbone, tile, stride, batch_size, per_batch):
    tiles = [tile, tile[::-1].copy(), np.roll(tile, 16, axis=1)]
    extractor = FeatureExtractor(backbone, stride=stride, batch_size=batch_size)
    assert extractor.tiles_per_batch == per_batch
    together = extractor.extract_tiles(tiles)
    alone = FeatureExtractor(backbone, stride=stride, batch_size=1)
    assert len(together) == 3
    for rgb, features in zip(tiles, together):
        assert np.allclose(features, alone.extract(rgb), atol=1e-4)
    assert not np.allclose(together[0], together[1], atol=1e-2)


def test_unsupported_stride_is_refused(backbone):
    with pytest.raises(InputError, match="Stride 5"):
        FeatureExtractor(backbone, stride=5)


def test_pool_to_grid_averages_each_cells_patch():
    values = np.zeros((32, 32), np.float32)
    values[:16, :16] = 1
    assert np.allclose(pool_to_grid(values, 16), [[1, 0], [0, 0]])
    assert pool_to_grid(values, 8).shape == (4, 4)
    assert pool_to_grid(values, 8)[0, 1] == pytest.approx(0.5)
