"""Reading RGB windows from any GDAL raster, scaled to 0..1, with a validity mask."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from osgeo import gdal

from ...outputs import raster_geotransform
from ..core.errors import InputError, TreesegError

DEFAULT_BANDS = (1, 2, 3)
STATISTICS_SIZE = 1024
LOW_PERCENTILE = 2.0
HIGH_PERCENTILE = 98.0
INVALID_FILL = 0.5


def open_read_only(path: str, what: str, advice: str = "", refusal: type[TreesegError] = InputError,
                   kind: int = gdal.OF_RASTER) -> gdal.Dataset:
    """The GDAL dataset at `path` (a raster, or `kind` gdal.OF_VECTOR), read-only; where GDAL cannot open it,
    `refusal` of one line: "Cannot open {what} '{path}': {GDAL's reason}. {advice}"."""
    try:
        return gdal.OpenEx(path, kind | gdal.OF_VERBOSE_ERROR)
    except RuntimeError as error:
        raise refusal(f"Cannot open {what} '{path}': {error}. {advice}".strip()) from error


def open_raster(path: str) -> gdal.Dataset:
    """The GDAL dataset of a raster with at least one band, read-only; an InputError of one line otherwise."""
    dataset = open_read_only(path, "the raster", "Check that the file exists and is a raster GDAL can read.")
    if dataset.RasterCount == 0:
        raise InputError(
            f"'{path}' contains no raster bands. "
            "Choose a raster file (for a container, one of its subdatasets)."
        )
    return dataset


@dataclass(frozen=True)
class RasterGrid:
    """A raster's pixel grid: its size, GDAL geotransform and CRS (WKT; '' when it has none)."""

    width: int
    height: int
    geotransform: tuple[float, ...]
    crs_wkt: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @classmethod
    def of(cls, dataset: gdal.Dataset) -> RasterGrid:
        """The dataset's grid; one without a geotransform is on the grid QGIS draws it on."""
        return cls(dataset.RasterXSize, dataset.RasterYSize, raster_geotransform(dataset),
                   dataset.GetProjection() or "")

    def create(self, driver: str, path: str, bands: int, data_type: int, options: Sequence[str] = ()) -> gdal.Dataset:
        """A new dataset on this grid (`driver`: GTiff, MEM…); GDAL's RuntimeError when it cannot be created."""
        dataset = gdal.GetDriverByName(driver).Create(path, self.width, self.height, bands, data_type,
                                                      options=list(options))
        dataset.SetGeoTransform([float(value) for value in self.geotransform])
        if self.crs_wkt:
            dataset.SetProjection(self.crs_wkt)
        return dataset


class GdalRasterSource:
    """Reads RGB windows from any GDAL raster, scaled to 0..1, with a validity mask.

    Bands are 1-based. Three bands give R, G and B; a single band number is a grey
    image repeated into three channels. A raster with fewer than three bands read
    with the default bands (1, 2, 3) is read as grey from band 1.

    A pixel is valid when the GDAL mask band of every selected band says so (this
    covers nodata values, alpha bands and per-dataset masks) and its values are
    finite. Invalid pixels are mid-grey (0.5) in the returned image.

    Scaling: a Byte band is divided by 255. Any other data type gets a linear
    stretch from its 2nd to its 98th percentile, clipped to 0..1. The percentiles
    are computed once, when the raster is opened, from a decimated read of the
    whole band (at most 1024 x 1024 samples, valid pixels only), so every window
    is scaled the same way. `value_ranges` (a survey's limits, band number → (lo, hi)) replaces a non-Byte
    band's own percentiles, so every raster of a survey maps a value to the same input; `clipped` then
    holds, per such band, the share of the valid sample lying outside those limits (clipped to 0..1).

    One instance must not be shared between threads (GDAL datasets are not).
    """

    def __init__(self, path: str, bands: Sequence[int] = DEFAULT_BANDS,
                 value_ranges: Mapping[int, tuple[float, float]] | None = None) -> None:
        self.path = path
        self._dataset = dataset = open_raster(path)
        self.files: list[str] = list(dataset.GetFileList() or [path])
        self.grid = RasterGrid.of(dataset)
        self.width, self.height = self.grid.width, self.grid.height
        self.bands: tuple[int, int, int] = self._resolve_bands(bands, dataset.RasterCount)
        self.clipped: dict[int, float] = {}
        self._ranges = {number: self._value_range(number, value_ranges or {}) for number in set(self.bands)}
        self.scaling: str = self._describe_scaling()
        self._always_valid = all(self._always_valid_band(number) for number in set(self.bands))

    def _resolve_bands(self, bands: Sequence[int], band_count: int) -> tuple[int, int, int]:
        bands = tuple(int(number) for number in bands)
        if bands == DEFAULT_BANDS and band_count < 3:
            bands = (1,)
        if len(bands) == 1:
            bands = bands * 3
        if len(bands) != 3:
            raise InputError(f"Give three band numbers (red, green, blue) or one (grey), not {len(bands)}.")
        for number in bands:
            if not 1 <= number <= band_count:
                raise InputError(
                    f"Band {number} does not exist: the raster has {band_count} "
                    f"band{'s' if band_count != 1 else ''}. Choose band numbers from 1 "
                    f"to {band_count}."
                )
            if gdal.DataTypeIsComplex(self._dataset.GetRasterBand(number).DataType):
                raise InputError(
                    f"Band {number} of '{self.path}' holds complex numbers; choose bands with real values."
                )
        return bands

    @property
    def stretched_bands(self) -> list[int]:
        """The selected bands scaled by a percentile stretch (not Byte), each once."""
        return [number for number in dict.fromkeys(self.bands) if self._ranges[number] is not None]

    def _always_valid_band(self, number: int) -> bool:
        """No nodata, mask or alpha, and an integer type (so no NaN)."""
        band = self._dataset.GetRasterBand(number)
        integer = band.DataType not in (gdal.GDT_Float32, gdal.GDT_Float64)
        return integer and bool(band.GetMaskFlags() & gdal.GMF_ALL_VALID)

    def _value_range(self, number: int, survey_ranges: Mapping[int, tuple[float, float]]
                     ) -> tuple[float, float] | None:
        """(lo, hi) of the percentile stretch (the survey's when given), or None for a Byte band (value / 255)."""
        if self._dataset.GetRasterBand(number).DataType == gdal.GDT_Byte:
            return None
        samples = self.value_sample(number)
        if number in survey_ranges:
            lo, hi = survey_ranges[number]
            outside = np.count_nonzero((samples < lo) | (samples > hi))
            self.clipped[number] = outside / samples.size if samples.size else 0.0
            return float(lo), float(hi)
        return stretch_limits(samples)

    def value_sample(self, number: int) -> np.ndarray:
        """The band's valid values from a decimated read of the whole band (at most 1024 x 1024), float64."""
        band = self._dataset.GetRasterBand(number)
        factor = max(self.width / STATISTICS_SIZE, self.height / STATISTICS_SIZE, 1.0)
        buf_width = max(1, round(self.width / factor))
        buf_height = max(1, round(self.height / factor))
        values = band.ReadAsArray(buf_xsize=buf_width, buf_ysize=buf_height)
        mask = band.GetMaskBand().ReadAsArray(buf_xsize=buf_width, buf_ysize=buf_height)
        return values[(mask > 0) & np.isfinite(values)].astype(np.float64)

    def _describe_scaling(self) -> str:
        parts = []
        for number in dict.fromkeys(self.bands):
            value_range = self._ranges[number]
            if value_range is None:
                parts.append(f"band {number}: Byte / 255")
            else:
                lo, hi = value_range
                parts.append(
                    f"band {number}: {'survey ' if number in self.clipped else ''}{LOW_PERCENTILE:g}-"
                    f"{HIGH_PERCENTILE:g} % percentile stretch [{lo:.6g}, {hi:.6g}]"
                )
        return "; ".join(parts)

    def _scale(self, values: np.ndarray, number: int) -> np.ndarray:
        value_range = self._ranges[number]
        if value_range is None:
            return values.astype(np.float32) / np.float32(255.0)
        lo, hi = value_range
        scaled = (values.astype(np.float64) - lo) / (hi - lo)
        return np.clip(scaled, 0.0, 1.0).astype(np.float32)

    def _read_scaled(self, read_options: dict) -> tuple[np.ndarray, np.ndarray]:
        channels: dict[int, np.ndarray] = {}
        valid: np.ndarray | None = None
        for number in dict.fromkeys(self.bands):
            band = self._dataset.GetRasterBand(number)
            try:
                values = band.ReadAsArray(**read_options)
                band_valid = np.isfinite(values)
                if not band.GetMaskFlags() & gdal.GMF_ALL_VALID:
                    band_valid &= band.GetMaskBand().ReadAsArray(**read_options) > 0
            except RuntimeError as error:
                raise InputError(
                    f"Cannot read band {number} of '{self.path}': {error}. The file may be truncated or "
                    "corrupt: check it with gdalinfo -checksum, or export it again."
                ) from error
            valid = band_valid if valid is None else valid & band_valid
            channels[number] = self._scale(values, number)
        rgb = np.stack([channels[number] for number in self.bands], axis=-1)
        rgb[~valid] = INVALID_FILL
        return rgb, valid

    def read(self, x: int, y: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Read a window inside the raster: (rgb float32 (h, w, 3) in 0..1, valid bool (h, w))."""
        return self._read_scaled(dict(xoff=x, yoff=y, win_xsize=width, win_ysize=height))

    def read_valid(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """The valid mask of a window; without reading pixels when no band can hold invalid values."""
        if self._always_valid:
            return np.ones((height, width), dtype=bool)
        return self.read(x, y, width, height)[1]

    def read_decimated(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Read the whole raster resampled (nearest) to width x height, scaled like `read`."""
        return self._read_scaled(dict(buf_xsize=width, buf_ysize=height))

    def close(self) -> None:
        """Release the dataset."""
        self._dataset = None

    def __enter__(self) -> GdalRasterSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def stretch_limits(samples: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """The 2nd and 98th percentiles of `samples` (linear interpolation; (0, 1) when empty, hi > lo).

    With `weights` a sample counts in proportion to its weight (equal weights give numpy's percentiles).
    """
    if samples.size == 0:
        return 0.0, 1.0
    if weights is None:
        lo, hi = np.percentile(samples, [LOW_PERCENTILE, HIGH_PERCENTILE])
    else:
        order = np.argsort(samples, kind="stable")
        ordered, ordered_weights = samples[order], weights[order]
        before = np.cumsum(ordered_weights) - ordered_weights
        span = before[-1] if before[-1] > 0 else 1.0
        lo, hi = np.interp([LOW_PERCENTILE / 100, HIGH_PERCENTILE / 100], before / span, ordered)
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def limit_block_cache(megabytes: int = 64) -> None:
    """Cap GDAL's block cache so memory does not grow with the raster (engine process only)."""
    gdal.SetCacheMax(megabytes * 1024 * 1024)


class HeightReader:
    """Reads windows of a single-band raster (the canopy height) as float32."""

    def __init__(self, path: str) -> None:
        self._dataset = gdal.Open(path, gdal.GA_ReadOnly)

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self._dataset.GetRasterBand(1).ReadAsArray(x, y, width, height).astype(np.float32)
