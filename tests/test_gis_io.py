"""GDAL input/output: reading windows, writing label rasters, polygons and the preview."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from osgeo import gdal, ogr, osr

from treeseg_qgis.engine.core.errors import Cancelled, InputError, OutputError
from treeseg_qgis.engine.gis.polygons import polygonize_clusters
from treeseg_qgis.engine.gis.preview import TITLE_COLOUR, write_preview
from treeseg_qgis.engine.gis.raster import GdalRasterSource, RasterGrid
from treeseg_qgis.engine.gis.writers import TREE_COLOUR, LabelRasterWriter

gdal.UseExceptions()
ogr.UseExceptions()
osr.UseExceptions()

UTM_GEOTRANSFORM = (500000.0, 0.1, 0.0, 4000000.0, 0.0, -0.1)
DEGREE = 1e-5
WGS84_GEOTRANSFORM = (-80.0, DEGREE, 0.0, 30.0 + 30 * DEGREE, 0.0, -DEGREE)


def wkt(epsg: int) -> str:
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    return srs.ExportToWkt()


def make_raster(
    path,
    bands: np.ndarray,
    data_type: int = gdal.GDT_Byte,
    epsg: int | None = 32617,
    geotransform=UTM_GEOTRANSFORM,
    nodata: float | None = None,
    options: tuple[str, ...] = (),
) -> str:
    """Write a GeoTIFF from a (bands, rows, columns) array; return its path."""
    count, rows, columns = bands.shape
    dataset = gdal.GetDriverByName("GTiff").Create(
        str(path), columns, rows, count, data_type, options=list(options)
    )
    dataset.SetGeoTransform(geotransform)
    if epsg is not None:
        dataset.SetProjection(wkt(epsg))
    for index in range(count):
        band = dataset.GetRasterBand(index + 1)
        if nodata is not None:
            band.SetNoDataValue(nodata)
        band.WriteArray(bands[index])
    dataset = None
    return str(path)


def two_squares() -> np.ndarray:
    """Labels on nodata: cluster 1 is 10x10 pixels, cluster 2 is 6x8, cluster 0 is 3x3."""
    labels = np.full((30, 40), 255, dtype=np.uint8)
    labels[5:15, 5:15] = 1
    labels[20:26, 25:33] = 2
    labels[0:3, 36:39] = 0
    return labels


def polygons_of(gpkg_path: str) -> list[tuple[int, int, float | None]]:
    dataset = ogr.Open(gpkg_path)
    layer = dataset.GetLayer(0)
    rows = [(f.GetField("cluster"), f.GetField("is_tree"), f.GetField("area_m2")) for f in layer]
    return sorted(rows)


def ellipsoid_rectangle_area(lon_span: float, lat_south: float, lat_north: float) -> float:
    """Area in m² of a lat/lon rectangle on the WGS84 ellipsoid (closed form)."""
    a = 6378137.0
    flattening = 1 / 298.257223563
    b = a * (1 - flattening)
    e = math.sqrt(flattening * (2 - flattening))

    def zone(latitude: float) -> float:
        s = math.sin(math.radians(latitude))
        return b * b * (s / (2 * (1 - e * e * s * s)) + math.log((1 + e * s) / (1 - e * s)) / (4 * e))

    return math.radians(lon_span) * (zone(lat_north) - zone(lat_south))


# Reading


def test_byte_rgb_is_value_over_255(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=(3, 20, 30), dtype=np.uint8)
    path = make_raster(tmp_path / "rgb.tif", data)
    with GdalRasterSource(path) as source:
        assert (source.width, source.height) == (30, 20)
        assert source.grid.geotransform == UTM_GEOTRANSFORM and source.grid.shape == (20, 30)
        assert source.grid.crs_wkt
        rgb, valid = source.read(5, 4, 10, 8)
        assert source.read_valid(5, 4, 10, 8).shape == (8, 10) and source.read_valid(5, 4, 10, 8).all()
        assert "255" in source.scaling
    expected = np.moveaxis(data[:, 4:12, 5:15], 0, -1).astype(np.float32) / 255
    assert rgb.dtype == np.float32 and rgb.shape == (8, 10, 3)
    np.testing.assert_array_equal(rgb, expected)
    assert valid.all()


def test_uint16_percentile_stretch_is_the_same_in_every_window(tmp_path):
    band = np.arange(100 * 100, dtype=np.uint16).reshape(100, 100)
    data = np.stack([band, band // 2, band // 4])
    path = make_raster(tmp_path / "u16.tif", data, gdal.GDT_UInt16)
    with GdalRasterSource(path) as source:
        first, _ = source.read(0, 0, 60, 60)
        second, _ = source.read(40, 40, 60, 60)
        assert "percentile" in source.scaling
    np.testing.assert_array_equal(first[40:60, 40:60], second[0:20, 0:20])
    lo, hi = np.percentile(band.astype(np.float64), [2, 98])
    expected = np.clip((band[:60, :60] - lo) / (hi - lo), 0, 1).astype(np.float32)
    np.testing.assert_allclose(first[..., 0], expected, atol=1e-6)
    assert first.min() == 0.0 and second.max() == 1.0


def test_nodata_pixels_are_invalid_and_grey(tmp_path):
    data = np.full((3, 10, 10), 100, dtype=np.uint8)
    data[1, 2, 3] = 0
    path = make_raster(tmp_path / "nodata.tif", data, nodata=0)
    with GdalRasterSource(path) as source:
        rgb, valid = source.read(0, 0, 10, 10)
        np.testing.assert_array_equal(source.read_valid(1, 1, 6, 5), valid[1:6, 1:7])
    assert not valid[2, 3]
    assert valid.sum() == 99
    np.testing.assert_array_equal(rgb[2, 3], [0.5, 0.5, 0.5])


def test_alpha_zero_is_invalid(tmp_path):
    data = np.full((4, 10, 10), 200, dtype=np.uint8)
    data[3, :, :5] = 0
    path = make_raster(tmp_path / "rgba.tif", data, options=("ALPHA=YES",))
    with GdalRasterSource(path) as source:
        assert source.bands == (1, 2, 3)
        _, valid = source.read(0, 0, 10, 10)
        np.testing.assert_array_equal(source.read_valid(0, 0, 10, 10), valid)
    assert not valid[:, :5].any()
    assert valid[:, 5:].all()


def test_float_nan_is_invalid_and_never_in_rgb(tmp_path):
    data = np.linspace(0, 1, 3 * 16 * 16, dtype=np.float32).reshape(3, 16, 16)
    data[0, 4, 4] = np.nan
    data[2, 7, 1] = np.inf
    path = make_raster(tmp_path / "float.tif", data, gdal.GDT_Float32)
    with GdalRasterSource(path) as source:
        rgb, valid = source.read(0, 0, 16, 16)
        np.testing.assert_array_equal(source.read_valid(0, 0, 16, 16), valid)
    assert not valid[4, 4] and not valid[7, 1]
    assert valid.sum() == 16 * 16 - 2
    assert np.isfinite(rgb).all()
    assert rgb.min() >= 0 and rgb.max() <= 1


def test_single_band_is_read_as_grey(tmp_path):
    data = np.arange(64, dtype=np.uint8).reshape(1, 8, 8)
    path = make_raster(tmp_path / "grey.tif", data)
    with GdalRasterSource(path) as source:
        assert source.bands == (1, 1, 1)
        rgb, _ = source.read(0, 0, 8, 8)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 1])
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    np.testing.assert_array_equal(rgb[..., 0], data[0] / np.float32(255))


def test_band_out_of_range_names_the_band_count(tmp_path):
    path = make_raster(tmp_path / "rgb.tif", np.zeros((3, 4, 4), dtype=np.uint8))
    with pytest.raises(InputError, match="(?i)band 4 does not exist: the raster has 3 bands"):
        GdalRasterSource(path, bands=(1, 2, 4))


def test_missing_path_names_the_path(tmp_path):
    missing = str(tmp_path / "no_such.tif")
    with pytest.raises(InputError, match="no_such.tif"):
        GdalRasterSource(missing)


# Writing


def write_labels(folder, labels: np.ndarray, crs_wkt: str, geotransform) -> tuple[str, str]:
    clusters = str(folder / "clusters.tif")
    trees = str(folder / "trees.tif")
    with LabelRasterWriter(
        clusters,
        trees,
        RasterGrid(labels.shape[1], labels.shape[0], geotransform, crs_wkt),
        n_clusters=3,
        tree_clusters=[1],
        metadata={"TREESEG_WEIGHTS": "untrained"},
    ) as writer:
        tree_mask = np.where(labels == 255, 255, labels == 1).astype(np.uint8)
        writer.write(0, 0, labels[:, :20], tree_mask[:, :20])
        writer.write(20, 0, labels[:, 20:], tree_mask[:, 20:])
    return clusters, trees


def test_writer_outputs_match_the_grid_and_carry_palette_and_metadata(tmp_path):
    labels = two_squares()
    clusters, trees = write_labels(tmp_path, labels, wkt(32617), UTM_GEOTRANSFORM)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["clusters.tif", "clusters.tif.aux.xml", "trees.tif", "trees.tif.aux.xml"]
    )
    for path in (clusters, trees):
        dataset = gdal.Open(path)
        band = dataset.GetRasterBand(1)
        assert dataset.GetGeoTransform() == UTM_GEOTRANSFORM
        assert dataset.GetSpatialRef().IsSame(osr.SpatialReference(wkt(32617)))
        assert band.DataType == gdal.GDT_Byte
        assert band.GetNoDataValue() == 255
        assert band.GetColorInterpretation() == gdal.GCI_PaletteIndex
        assert band.GetColorTable().GetColorEntry(255)[3] == 0
        assert dataset.GetMetadataItem("TREESEG_WEIGHTS") == "untrained"
    cluster_dataset = gdal.Open(clusters)
    cluster_band = cluster_dataset.GetRasterBand(1)
    np.testing.assert_array_equal(cluster_band.ReadAsArray(), labels)
    cluster_dataset.GetMetadata()  # GDAL 3.6's GTiff reads category names from .aux.xml lazily
    assert cluster_band.GetCategoryNames()[:3] == ["Cluster 0", "Cluster 1 — tree", "Cluster 2"]
    red, green, blue, _ = cluster_band.GetColorTable().GetColorEntry(1)
    assert green > red and green > blue
    tree_dataset = gdal.Open(trees)
    tree_dataset.GetMetadata()
    tree_band = tree_dataset.GetRasterBand(1)
    assert tree_band.GetColorTable().GetColorEntry(1) == (34, 139, 34, 255)
    assert tree_band.GetCategoryNames()[:2] == ["not tree", "tree"]
    assert (tree_band.ReadAsArray() == 1).sum() == 100


def test_writer_without_crs_and_unwritten_windows_are_nodata(tmp_path):
    clusters = str(tmp_path / "c.tif")
    with LabelRasterWriter(
        clusters, str(tmp_path / "t.tif"), RasterGrid(16, 16, (0, 1, 0, 0, 0, -1), ""), 2, [], {}
    ) as writer:
        writer.write(0, 0, np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))
    dataset = gdal.Open(clusters)
    assert dataset.GetSpatialRef() is None
    values = dataset.GetRasterBand(1).ReadAsArray()
    assert (values == 0).sum() == 16 and (values == 255).sum() == 16 * 16 - 16


def test_writer_abort_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with LabelRasterWriter(
            str(tmp_path / "c.tif"), str(tmp_path / "t.tif"), RasterGrid(8, 8, (0, 1, 0, 0, 0, -1), ""), 2, [0], {}
        ) as writer:
            writer.write(0, 0, np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    writer.abort()


def test_writer_reports_a_missing_folder(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        LabelRasterWriter(
            str(tmp_path / "nope" / "c.tif"),
            str(tmp_path / "t.tif"),
            RasterGrid(8, 8, (0, 1, 0, 0, 0, -1), ""),
            2,
            [0],
            {},
        )
    assert os.listdir(tmp_path) == []


# Polygons


def test_polygons_in_a_projected_crs_have_exact_areas(tmp_path):
    clusters, _ = write_labels(tmp_path, two_squares(), wkt(32617), UTM_GEOTRANSFORM)
    gpkg = str(tmp_path / "polygons.gpkg")
    steps: list[float] = []
    count = polygonize_clusters(
        clusters, gpkg, [1], "crowns", progress=steps.append, description="treeseg test run"
    )
    assert count == 3
    rows = polygons_of(gpkg)
    assert [row[:2] for row in rows] == [(0, 0), (1, 1), (2, 0)]
    assert [row[2] for row in rows] == pytest.approx([0.09, 1.0, 0.48], rel=1e-9)
    assert steps[-1] == 1.0 and all(0 <= step <= 1 for step in steps)
    dataset = ogr.Open(gpkg)
    layer = dataset.GetLayer(0)
    assert layer.GetName() == "crowns"
    assert layer.GetGeomType() == ogr.wkbPolygon
    assert layer.GetSpatialRef().IsSame(osr.SpatialReference(wkt(32617)))
    is_tree = layer.GetLayerDefn().GetFieldDefn(layer.GetLayerDefn().GetFieldIndex("is_tree"))
    assert is_tree.GetSubType() == ogr.OFSTBoolean
    assert layer.GetMetadataItem("DESCRIPTION") == "treeseg test run"
    assert not any(name.startswith("polygons.partial") for name in os.listdir(tmp_path))


def test_polygons_in_feet_have_areas_in_square_metres_and_no_tree_clusters_mean_false(tmp_path):
    feet = (300000.0, 1.0, 0.0, 100000.0, 0.0, -1.0)
    clusters, _ = write_labels(tmp_path, two_squares(), wkt(2263), feet)
    gpkg = str(tmp_path / "polygons.gpkg")
    assert polygonize_clusters(clusters, gpkg, [], "regions") == 3
    rows = polygons_of(gpkg)
    assert [row[1] for row in rows] == [0, 0, 0]
    feet_in_metres = osr.SpatialReference(wkt(2263)).GetLinearUnits()
    assert [row[2] for row in rows] == pytest.approx([v / 0.01 * feet_in_metres**2 for v in (0.09, 1.0, 0.48)])


def test_polygons_in_wgs84_have_geodesic_areas(tmp_path):
    clusters, _ = write_labels(tmp_path, two_squares(), wkt(4326), WGS84_GEOTRANSFORM)
    gpkg = str(tmp_path / "polygons.gpkg")
    assert polygonize_clusters(clusters, gpkg, [1], "crowns") == 3
    top = WGS84_GEOTRANSFORM[3]
    expected = {
        1: ellipsoid_rectangle_area(10 * DEGREE, top - 15 * DEGREE, top - 5 * DEGREE),
        2: ellipsoid_rectangle_area(8 * DEGREE, top - 26 * DEGREE, top - 20 * DEGREE),
    }
    areas = {cluster: area for cluster, _, area in polygons_of(gpkg)}
    for cluster, area in expected.items():
        assert areas[cluster] == pytest.approx(area, rel=0.01)


def test_polygons_without_crs_have_null_areas(tmp_path):
    clusters, _ = write_labels(tmp_path, two_squares(), "", (0, 1, 0, 0, 0, -1))
    gpkg = str(tmp_path / "polygons.gpkg")
    assert polygonize_clusters(clusters, gpkg, [1], "crowns") == 3
    assert all(area is None for _, _, area in polygons_of(gpkg))
    dataset = ogr.Open(gpkg)
    srs = dataset.GetLayer(0).GetSpatialRef()
    # GDAL 3.6's GeoPackage driver records a layer without CRS as "Undefined geographic SRS".
    assert srs is None or srs.GetName().startswith("Undefined")


def test_cancelled_polygonize_leaves_no_geopackage(tmp_path):
    clusters, _ = write_labels(tmp_path, two_squares(), wkt(32617), UTM_GEOTRANSFORM)
    with pytest.raises(Cancelled):
        polygonize_clusters(
            clusters, str(tmp_path / "polygons.gpkg"), [1], "crowns", is_cancelled=lambda: True
        )
    assert not any(name.endswith(".gpkg") or "partial" in name for name in os.listdir(tmp_path))


# Preview


def test_preview_has_three_panels_side_by_side(tmp_path):
    labels = two_squares()
    image = make_raster(tmp_path / "image.tif", np.stack([labels * 40] * 3).astype(np.uint8))
    clusters, trees = write_labels(tmp_path, labels, wkt(32617), UTM_GEOTRANSFORM)
    png = str(tmp_path / "preview.png")
    with GdalRasterSource(image) as source:
        write_preview(source, clusters, trees, png, "tiny model — UNTRAINED WEIGHTS", max_size=64)
    preview = gdal.Open(png)
    aspect = preview.RasterXSize / preview.RasterYSize
    assert preview.RasterXSize >= 3 * 64
    assert 1.5 < aspect < 3 * 40 / 30
    pixels = preview.ReadAsArray()[:3].transpose(1, 2, 0).reshape(-1, 3)
    colours = {tuple(int(value) for value in colour) for colour in np.unique(pixels, axis=0)}
    assert TREE_COLOUR[:3] in colours and TITLE_COLOUR in colours  # the trees drawn, the title written
    assert not any("partial" in name for name in os.listdir(tmp_path))


@pytest.mark.parametrize("curve", [{2: 152000.0, 3: 90000.0, 4: 61000.0, 5: 52000.0, 6: 47000.0, 7: 43000.0},
                                   {2: 0.8, 3: 0.5}, {2: 7.0, 3: 7.0}], ids=["survey-like", "two-ks", "flat"])
def test_the_elbow_plot_draws_the_curve_and_rings_the_chosen_k(tmp_path, curve):
    """The PNG the panel shows: its size in inches at its dpi, the curve's colour, the chosen K's ring and its
    legend, whatever the curve's range (a flat curve included)."""
    from PIL import Image

    from treeseg_qgis.engine.gis.preview import ELBOW_DPI, ELBOW_INCHES, write_elbow_plot

    png = tmp_path / "elbow.png"
    write_elbow_plot(curve, 3, str(png))
    image = Image.open(png).convert("RGB")
    assert image.size == (round(ELBOW_INCHES[0] * ELBOW_DPI), round(ELBOW_INCHES[1] * ELBOW_DPI))
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20)}
    assert {(0x45, 0x5A, 0x64), (0x2E, 0x7D, 0x32)} <= colours
    assert not any("partial" in name for name in os.listdir(tmp_path))


def patchwork(height: int, width: int, seed: int, noise_share: float = 0.1) -> np.ndarray:
    """Three clusters in blocks of 3 pixels with single-pixel noise (corner touches, holes, long regions),
    a nodata hole, a cluster-0 frame joining every strip, and a U that only closes across a seam."""
    rng = np.random.default_rng(seed)
    labels = np.kron(rng.integers(0, 3, (height // 3 + 1, width // 3 + 1)), np.ones((3, 3), int))[:height, :width]
    noise = rng.random((height, width)) < noise_share
    labels[noise] = rng.integers(0, 3, int(noise.sum()))
    labels[:, :2] = labels[:, -2:] = labels[:2, :] = 0
    labels[20:26, 10:30] = 255
    labels[8:14, 40:52] = 2
    labels[8:11, 43:49] = 1
    return labels.astype(np.uint8)


def regions_of(gpkg_path: str) -> tuple[dict[int, list[float]], bool]:
    """The sorted polygon areas of each cluster, and whether every polygon is a valid geometry."""
    dataset = ogr.Open(gpkg_path)
    areas: dict[int, list[float]] = {}
    valid = True
    for feature in dataset.GetLayer(0):
        geometry = feature.GetGeometryRef()
        valid = valid and geometry.IsValid()
        areas.setdefault(feature.GetField("cluster"), []).append(round(geometry.GetArea(), 6))
    return {cluster: sorted(values) for cluster, values in areas.items()}, valid


@pytest.mark.parametrize(("seed", "noise_share"), [(1, 0.1), (2, 0.1), (3, 0.4)])
def test_polygons_made_in_strips_are_the_regions_of_one_pass(tmp_path, seed, noise_share):
    labels = patchwork(47, 60, seed, noise_share)
    clusters, _ = write_labels(tmp_path, labels, wkt(32617), UTM_GEOTRANSFORM)
    one_pass, strips = str(tmp_path / "one_pass.gpkg"), str(tmp_path / "strips.gpkg")
    steps: list[float] = []
    count = polygonize_clusters(clusters, one_pass, [1], "regions")
    assert polygonize_clusters(clusters, strips, [1], "regions", progress=steps.append, strip_pixels=60 * 5) == count
    expected, _ = regions_of(one_pass)
    found, valid = regions_of(strips)
    assert found == expected
    assert valid
    assert sum(map(sum, found.values())) == pytest.approx(int((labels != 255).sum()) * 0.01)
    assert steps == sorted(steps) and steps[-1] == 1.0
    frame_area = max(expected[0])
    assert frame_area > 0.5 * 0.01 * 2 * (47 + 60)


def test_polygons_of_a_rotated_raster_are_made_in_one_pass(tmp_path):
    rotated = (500000.0, 0.1, 0.02, 4000000.0, 0.02, -0.1)
    clusters, _ = write_labels(tmp_path, patchwork(47, 60, 4), wkt(32617), rotated)
    one_pass, strips = str(tmp_path / "one_pass.gpkg"), str(tmp_path / "strips.gpkg")
    assert polygonize_clusters(clusters, strips, [1], "regions", strip_pixels=60 * 5) == \
        polygonize_clusters(clusters, one_pass, [1], "regions")
    assert regions_of(strips) == regions_of(one_pass)


def test_polygonize_cancelled_between_strips_leaves_no_geopackage(tmp_path):
    clusters, _ = write_labels(tmp_path, patchwork(47, 60, 5), wkt(32617), UTM_GEOTRANSFORM)
    steps: list[float] = []
    with pytest.raises(Cancelled):
        polygonize_clusters(clusters, str(tmp_path / "polygons.gpkg"), [1], "regions", progress=steps.append,
                            is_cancelled=lambda: len(steps) > 3, strip_pixels=60 * 5)
    assert not any(name.endswith(".gpkg") or "partial" in name for name in os.listdir(tmp_path))
