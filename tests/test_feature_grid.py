"""The feature grid: from an extractor or a complete store alike, seamless blending, the image's placement."""

import numpy as np

from treeseg_qgis.engine.core.feature_grid import FeatureGrid
from treeseg_qgis.engine.core.features import ColourFeatures
from treeseg_qgis.engine.core.store import FeatureStore, TileFeatures
from treeseg_qgis.engine.core.tiling import TileGrid, Window


def _two_tiles(stride: int = 16) -> FeatureGrid:
    """Two 128-px tiles side by side, overlapping by 32 px, on a 224 x 128 raster."""
    return FeatureGrid(TileGrid(224, 128, 128, 32), stride, 16)


def _constant_store(folder, grid: FeatureGrid, values: list[float]) -> FeatureStore:
    """Every cell of tile i holds the feature values[i]; all cells fully valid."""
    store = FeatureStore(folder)
    for tile, value in zip(grid.tiles.tiles(), values):
        shape = (tile.height // grid.stride, tile.width // grid.stride)
        store.put((tile.row, tile.col), TileFeatures(np.full(shape + (1,), value, np.float32),
                                                     np.ones(shape, np.float32), np.zeros(shape, np.float32)))
    return store


def test_a_complete_store_gives_back_the_grid_its_features_were_extracted_on(tmp_path):
    tiles = TileGrid(300, 200, 128, 32)
    extracted = FeatureGrid.of_extractor(tiles, ColourFeatures("rgb-kmeans", stride=4))
    assert (extracted.stride, extracted.cell_size) == (4, 4)
    store = FeatureStore(tmp_path)
    store.save_samples(np.zeros((3, 2)), np.zeros(3), {"method": "rgb-kmeans", **extracted.describe()})
    assert FeatureGrid.of_store(tiles, store) == extracted
    assert store.model() == {"method": "rgb-kmeans"}


def test_overlapping_tiles_blend_from_one_to_the_other_without_a_step(tmp_path):
    grid = _two_tiles()
    store = _constant_store(tmp_path, grid, [0.0, 1.0])
    features, valid = grid.blended(store, range(0, 8), range(0, 14))
    row = features[3, :, 0]
    assert np.allclose(valid, 1.0)
    assert row[0] == 0.0 and row[-1] == 1.0  # outside the overlap each tile alone
    # the two overlap cells: tent weights 3/4 and 1/4 (ramp of 2 cells) make a ramp, not a jump
    assert np.allclose(row[6:8], [0.25, 0.75])
    assert np.allclose(features[:, :, 0], row)  # the same across every row


def test_cell_window_covers_the_cells_around_every_pixel_of_a_block():
    grid = _two_tiles(stride=8)
    block = Window(40, 24, 20, 10)
    rows, cols, rows_at, cols_at = grid.cell_window(block)
    # pixel x sits at cell (x + 0.5 - 8) / 8 of the global grid
    assert np.allclose(cols_at + cols.start, (np.arange(40, 60) + 0.5 - 8) / 8)
    assert np.allclose(rows_at + rows.start, (np.arange(24, 34) + 0.5 - 8) / 8)
    assert cols_at.min() >= 0 and cols_at.max() <= len(cols) - 1
    assert rows_at.min() >= 0 and rows_at.max() <= len(rows) - 1


def test_each_feature_image_pixel_is_centred_on_its_cell():
    for stride in (16, 8, 4):
        image = _two_tiles(stride).image()
        assert image.rows == int(np.ceil((128 - 8) / stride)) and image.cols == int(np.ceil((224 - 8) / stride))
        for cell in (0, 3, image.cols - 1):
            assert image.offset + (cell + 0.5) * stride == cell * stride + 8


def test_model_window_holds_every_valid_pixel_on_the_crop_steps():
    """A tile with nodata or padding past the raster is cropped to its valid pixels, rounded out to quarter tiles:
    no valid pixel is left out; a tile whose pixels are all valid runs whole; none without. A raster of 700 × 600
    with tiles of 256 every 224 px: the last column's tiles (x = 448) hold 252 columns of it (rounded out: whole),
    the last row's (y = 448) 152 rows (rounded out to 192)."""
    grid = TileGrid(700, 600, tile_size=256, overlap=32)
    assert grid.crop_step == 64
    rng = np.random.default_rng(3)
    for tile in grid.tiles():
        inside = np.zeros((tile.height, tile.width), bool)
        inside[: grid.height - tile.y, : grid.width - tile.x] = True
        height = tile.height if tile.y + tile.height <= grid.height else 192
        assert grid.model_window(tile, inside) == Window(0, 0, tile.width, height)
        assert grid.model_window(tile, np.zeros_like(inside)) is None
        for _ in range(20):
            y0, x0 = rng.integers(0, tile.height), rng.integers(0, tile.width)
            valid = np.zeros_like(inside)
            valid[y0:y0 + rng.integers(1, 200), x0:x0 + rng.integers(1, 200)] = True
            valid &= inside
            window = grid.model_window(tile, valid)
            if not valid.any():
                assert window is None
                continue
            box = np.zeros_like(valid)
            box[window.y:window.y + window.height, window.x:window.x + window.width] = True
            assert not (valid & ~box).any()
            assert window.x % 64 == window.y % 64 == 0
            assert window.x + window.width <= tile.width and window.y + window.height <= tile.height
            assert window.width % 64 == 0 or window.x + window.width == tile.width
            assert window.height % 64 == 0 or window.y + window.height == tile.height
