"""The PNGs of a run: the preview (input image, clusters and trees side by side) and the elbow plot of automatic K,
drawn with Pillow: matplotlib's import and figures took about 1 s of every run (docs/BENCHMARKS.md)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ...atomic import atomic_file
from ..core.errors import OutputError, cannot_write
from .raster import GdalRasterSource, open_read_only
from .writers import NODATA, TREE_COLOUR

PANEL_INCHES = 4.0
MIN_PANEL_PIXELS = 400
"""A panel's longest side in pixels at the least (a smaller raster is shown enlarged, pixels as squares)."""
TITLE_POINTS, PANEL_TITLE_POINTS = 11, 9
TITLE_COLOUR = (139, 0, 0)
DIM = 0.45
ELBOW_INCHES = (2.6, 2.0)
"""The elbow plot's size: the panel shows it about 260 px wide, so a point there is about a point on the screen."""
ELBOW_DPI = 200
ELBOW_POINTS = 8.5
PNG_OPTIONS = {"compress_level": 1}
"""zlib's fastest level: the same pixels, files about 5 % larger, encoded 2-4x faster (docs/BENCHMARKS.md)."""


def _decimated_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    factor = max(width / max_size, height / max_size, 1.0)
    return max(1, round(width / factor)), max(1, round(height / factor))


def _read_band(path: str, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Band 1 of `path` resampled to width x height, and its colour table as RGBA 0..1."""
    dataset = open_read_only(path, "the raster to preview", "Run the segmentation again.", OutputError)
    band = dataset.GetRasterBand(1)
    values = band.ReadAsArray(buf_xsize=width, buf_ysize=height)
    lookup = np.zeros((256, 4), dtype=np.float32)
    table = band.GetColorTable()
    if table is not None:
        for index in range(min(table.GetCount(), 256)):
            lookup[index] = np.array(table.GetColorEntry(index), dtype=np.float32) / 255.0
    return values, lookup


def write_preview(
    source: GdalRasterSource,
    clusters_path: str,
    trees_path: str,
    png_path: str,
    title: str,
    max_size: int = 1024,
) -> None:
    """Write a PNG with the input image, the clusters and the trees, each at most max_size, under the title."""
    width, height = _decimated_size(source.width, source.height, max_size)
    image, valid = source.read_decimated(width, height)
    clusters, cluster_lookup = _read_band(clusters_path, width, height)
    trees, _ = _read_band(trees_path, width, height)

    colours = cluster_lookup[clusters]
    cluster_image = colours[..., :3] * colours[..., 3:] + (1.0 - colours[..., 3:])  # on white, as nodata shows
    tree_image = image * DIM
    tree_image[trees == 1] = np.array(TREE_COLOUR[:3], dtype=np.float32) / 255.0
    tree_image[~valid & (trees == NODATA)] = 0.5 * DIM

    longest = max(width, height)
    pixels_per_point = max(longest, MIN_PANEL_PIXELS) / PANEL_INCHES / 72
    scale = max(longest, MIN_PANEL_PIXELS) / longest
    panel = (max(1, round(width * scale)), max(1, round(height * scale)))
    margin = max(2, round(panel[0] * 0.015))
    title_font = _font(round(TITLE_POINTS * pixels_per_point), bold=True)
    panel_font = _font(round(PANEL_TITLE_POINTS * pixels_per_point), bold=False)
    canvas_width = 3 * (panel[0] + 2 * margin)
    lines = _wrapped(title, title_font, canvas_width - 2 * margin)
    line_height = _text_height(title_font) * 1.2
    panel_title_top = margin + round(len(lines) * line_height) + margin
    panels_top = panel_title_top + round(_text_height(panel_font) * 1.4)
    canvas = Image.new("RGB", (canvas_width, panels_top + panel[1] + margin), "white")
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((canvas_width / 2, margin + index * line_height), line, fill=TITLE_COLOUR, font=title_font,
                  anchor="ma")
    for index, (name, picture) in enumerate((("Input", image), ("Clusters", cluster_image), ("Trees", tree_image))):
        left = index * (panel[0] + 2 * margin) + margin
        draw.text((left + panel[0] / 2, panel_title_top), name, fill="black", font=panel_font, anchor="ma")
        pixels = Image.fromarray(np.clip(picture * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")
        canvas.paste(pixels.resize(panel, Image.NEAREST) if scale > 1 else pixels, (left, panels_top))
    with cannot_write(f"the preview '{png_path}'"), atomic_file(png_path) as partial:
        canvas.save(partial, format="PNG", **PNG_OPTIONS)


@functools.lru_cache(maxsize=8)
def _font(size: int, bold: bool) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans at `size` pixels: the system's (Pillow looks in the platform's font folders), else the one
    matplotlib carries, else Pillow's small built-in font."""
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    candidates = [name]
    matplotlib = importlib.util.find_spec("matplotlib")  # found, not imported
    if matplotlib is not None and matplotlib.submodule_search_locations:
        candidates.append(str(Path(matplotlib.submodule_search_locations[0], "mpl-data", "fonts", "ttf", name)))
    for candidate in candidates:
        try:
            return ImageFont.truetype(candidate, max(size, 6))
        except OSError:
            continue
    return ImageFont.load_default()


def _text_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    top, bottom = font.getbbox("Ag")[1::2]
    return bottom - top


def _wrapped(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: float) -> list[str]:
    """`text` in lines at most `width` pixels wide, broken between words (a longer word keeps its own line)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines or [""]


def write_elbow_plot(inertia_curve: dict[int, float], chosen: int, png_path: str) -> None:
    """The inertia curve of the automatic K search (log scale) with the chosen K marked, as a PNG drawn for the
    panel: its texts keep their size in points at the width the panel shows it (`ELBOW_INCHES` wide, at `ELBOW_DPI`
    so the file itself is sharp)."""
    ks = sorted(inertia_curve)
    logs = np.log10([max(inertia_curve[k], 1e-12) for k in ks])
    points = ELBOW_DPI / 72
    font = _font(round(ELBOW_POINTS * points), bold=False)
    text, gap = _text_height(font), round(4 * points)
    ticks = _log_ticks(float(logs.min()), float(logs.max()))
    low, high = min(logs.min(), min(ticks)), max(logs.max(), max(ticks))
    low, high = (low - 0.05 * (high - low), high + 0.05 * (high - low)) if high > low else (low - 0.5, high + 0.5)
    labels = [_tick_label(10 ** tick) for tick in ticks]
    size = (round(ELBOW_INCHES[0] * ELBOW_DPI), round(ELBOW_INCHES[1] * ELBOW_DPI))
    axis_label = _text_image("inertia (log)", font).rotate(90, expand=True)
    left = gap + axis_label.width + gap + max(round(font.getlength(label)) for label in labels) + 2 * gap
    box = (left, gap + text + gap, size[0] - 2 * gap, size[1] - 2 * (text + gap) - 2 * gap)
    span = max(ks[-1] - ks[0], 1)

    def place(k: int, log: float) -> tuple[float, float]:
        x = box[0] + (box[2] - box[0]) * (0.5 if len(ks) == 1 else 0.05 + 0.9 * (k - ks[0]) / span)
        return x, box[3] - (box[3] - box[1]) * (log - low) / (high - low)

    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    draw.text(((box[0] + box[2]) / 2, gap), "Elbow of the inertia curve", fill="black", font=font, anchor="ma")
    for tick, label in zip(ticks, labels):
        y = place(ks[0], tick)[1]
        draw.line((box[0] - gap, y, box[0], y), fill="black", width=2)
        draw.text((box[0] - 2 * gap, y), label, fill="black", font=font, anchor="rm")
    for k in ks:
        x = place(k, low)[0]
        draw.line((x, box[3], x, box[3] + gap), fill="black", width=2)
        draw.text((x, box[3] + 2 * gap), str(k), fill="black", font=font, anchor="ma")
    draw.text(((box[0] + box[2]) / 2, size[1] - gap), "number of clusters K", fill="black", font=font, anchor="md")
    canvas.paste(axis_label, (gap, round((box[1] + box[3] - axis_label.height) / 2)))
    draw.rectangle(box, outline="black", width=2)
    line = [place(k, log) for k, log in zip(ks, logs)]
    draw.line(line, fill="#455a64", width=round(1.5 * points), joint="curve")
    for x, y in line:
        _ring(draw, x, y, 2.5 * points, fill="#455a64")
    marked = line[ks.index(chosen)]
    _ring(draw, *marked, 5 * points, outline="#2e7d32", width=round(2 * points))
    legend = f"K = {chosen}"
    legend_left = box[2] - gap - round(font.getlength(legend)) - round(14 * points)
    _ring(draw, legend_left + 5 * points, box[1] + gap + text / 2 + 2, 5 * points, outline="#2e7d32",
          width=round(2 * points))
    draw.text((box[2] - gap, box[1] + gap), legend, fill="black", font=font, anchor="ra")
    with cannot_write(png_path), atomic_file(png_path) as partial:
        canvas.save(partial, format="PNG", **PNG_OPTIONS)


def _text_image(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> Image.Image:
    """`text` in black on white, cut to its ink (to be rotated)."""
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    image = Image.new("RGB", (right - left + 2, bottom - top + 2), "white")
    ImageDraw.Draw(image).text((1 - left, 1 - top), text, fill="black", font=font)
    return image


def _ring(draw: ImageDraw.ImageDraw, x: float, y: float, radius: float, **style: object) -> None:
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), **style)


def _log_ticks(low: float, high: float) -> list[float]:
    """log10 of the tick values: the powers of ten between `low` and `high` (log10), with 2 and 5 times them
    where fewer than two powers fall inside; at least the two ends."""
    for steps in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 5, 7)):
        ticks = [np.log10(step) + power for power in range(int(np.floor(low)), int(np.ceil(high)) + 1)
                 for step in steps if low - 1e-9 <= np.log10(step) + power <= high + 1e-9]
        if len(ticks) >= 2:
            return ticks
    return [low, high] if high > low else [low]


def _tick_label(value: float) -> str:
    """A tick's value, short: 0.5, 20, 5000, 3e4, 1.5e5, 2e-3."""
    if 0.01 <= value < 1e4:
        return f"{value:.3g}"
    power = int(np.floor(np.log10(value)))
    return f"{round(value / 10 ** power, 1):g}e{power}"
