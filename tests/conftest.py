"""Shared fixtures: a tiny real DINOv3 saved to disk, and synthetic GeoTIFFs written with GDAL."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="treeseg-test-cache-")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO = Path(__file__).resolve().parents[1]
UTM17N = 32617
SAMPLE_GEOTRANSFORM = (404211.9, 0.1, 0.0, 3285142.9, 0.0, -0.1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny DINOv3 ViT/16 saved in Hugging Face format."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    folder = tmp_path_factory.mktemp("tiny-dinov3")
    torch.manual_seed(0)
    config = DINOv3ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=128, patch_size=16, num_register_tokens=4)
    DINOv3ViTModel(config).save_pretrained(folder)
    return folder


def write_geotiff(path: Path, bands: np.ndarray, geotransform=SAMPLE_GEOTRANSFORM, epsg: int | None = UTM17N,
                  nodata: float | None = None) -> Path:
    """Write a (bands, rows, cols) array as a GeoTIFF with GDAL."""
    from osgeo import gdal, osr

    gdal.UseExceptions()
    types = {np.dtype("uint8"): gdal.GDT_Byte, np.dtype("uint16"): gdal.GDT_UInt16,
             np.dtype("float32"): gdal.GDT_Float32}
    count, rows, cols = bands.shape
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), cols, rows, count, types[bands.dtype])
    if geotransform is not None:
        dataset.SetGeoTransform(geotransform)
    if epsg is not None:
        srs = osr.SpatialReference()
        srs.ImportFromEPSG(epsg)
        dataset.SetProjection(srs.ExportToWkt())
    for index in range(count):
        band = dataset.GetRasterBand(index + 1)
        if nodata is not None:
            band.SetNoDataValue(nodata)
        band.WriteArray(bands[index])
    dataset.FlushCache()
    dataset = None
    return path


def wgs84_memory_layer(geometry_type: str, name: str, utm_geometries: list, values: list[dict[str, int | str]] = ()):
    """A QGIS memory layer in EPSG:4326 of `geometry_type` ("Point", "Polygon") holding `utm_geometries`
    (QgsGeometry in UTM 17N, transformed here); `values` gives each feature its integer (or text) fields."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsFeature, QgsProject, QgsVectorLayer

    fields = "".join(f"&field={field}:{'string' if isinstance(value, str) else 'integer'}"
                     for field, value in (values[0] if values else {}).items())
    layer = QgsVectorLayer(f"{geometry_type}?crs=EPSG:4326{fields}", name, "memory")
    to_wgs84 = QgsCoordinateTransform(QgsCoordinateReferenceSystem(f"EPSG:{UTM17N}"),
                                      QgsCoordinateReferenceSystem("EPSG:4326"), QgsProject.instance())
    for index, geometry in enumerate(utm_geometries):
        feature = QgsFeature(layer.fields())
        geometry.transform(to_wgs84)
        feature.setGeometry(geometry)
        for field, value in (values[index] if values else {}).items():
            feature[field] = value
        layer.dataProvider().addFeatures([feature])
    return layer


def disc_scene(rows: int, cols: int, centres, radius: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Green textured tree crowns on sandy soil: (3, rows, cols) uint8 and the crown mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    crowns = np.zeros((rows, cols), bool)
    for cy, cx in centres:
        crowns |= (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    soil = np.array([176, 150, 118], np.float32)
    foliage = np.array([52, 105, 48], np.float32)
    image = np.where(crowns[..., None], foliage, soil)
    image = image * (1 + 0.12 * rng.standard_normal((rows, cols, 1)))
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8).transpose(2, 0, 1), crowns


@pytest.fixture
def scene_tif(tmp_path) -> tuple[Path, np.ndarray]:
    """A 320 × 400 px orthophoto-like GeoTIFF with 5 crowns, and the true crown mask."""
    centres = [(70, 80), (90, 300), (220, 180), (250, 340), (240, 50)]
    image, crowns = disc_scene(320, 400, centres, radius=48)
    return write_geotiff(tmp_path / "scene.tif", image), crowns


@pytest.fixture
def layer_tree_view(qgis_iface, monkeypatch):
    """A real layer tree view of the project for the test window: QGIS 3.44's Processing adds the results of
    runAndLoadResults through the main window's view (3.22's does not use it)."""
    import qgis.utils
    from qgis.core import QgsLayerTreeModel, QgsProject
    from qgis.gui import QgsLayerTreeView

    view = QgsLayerTreeView()
    view.setModel(QgsLayerTreeModel(QgsProject.instance().layerTreeRoot()))
    monkeypatch.setattr(qgis.utils.iface or qgis_iface, "layerTreeView", lambda: view, raising=False)
    return view
