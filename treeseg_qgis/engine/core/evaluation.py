"""Quality measures of a tree mask against reference data (numpy and scipy only, no torch).

- Pixel scores for the tree class: precision, recall, F1 and IoU. Conventions for
  empty sets: recall is None (undefined) when the reference has no trees; when
  nothing is predicted either, precision, F1 and IoU are 1; precision is 0 when
  something was predicted but none of it is right, or nothing was predicted while
  the reference has trees. Every recall below is None without reference objects.
- Crowns: predicted crowns are the 8-connected components of the tree mask of at
  least `min_pixels`; each is matched one-to-one to a reference object by the
  Hungarian method on IoU, and a pair counts when IoU ≥ 0.4.
- Box measures (references larger than crowns, e.g. bounding boxes), which do not
  depend on how the mask is split into crowns: **box recall** is the share of
  reference objects with at least 25 % of their area predicted; **in-box
  precision** the share of predicted pixels inside some object. Beside them, from
  the crowns: the **centroid box recall**, the share of objects that hold the
  centroid of a predicted crown (it moves with how the mask is split into crowns).
- Reference rule: per-pixel ExG with Otsu's threshold (`exg_otsu_mask`), the
  textbook colour baseline every table is read against.
- Clusters against a multi-class reference: clusters are matched one-to-one to
  classes (Hungarian, maximum overlap); then mIoU over the classes and pixel
  accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .trees import excess_green

MATCH_IOU = 0.4
MIN_CROWN_PIXELS = 20
BOX_AREA_SHARE = 0.25
OTSU_BINS = 1024


@dataclass(frozen=True)
class ReferenceObject:
    """One reference crown or box: its pixel mask inside the window rows × cols."""

    rows: slice
    cols: slice
    mask: np.ndarray

    @property
    def pixels(self) -> int:
        return int(self.mask.sum())


def pixel_scores(predicted: np.ndarray, reference: np.ndarray, valid: np.ndarray | None = None) -> dict:
    """Precision, recall, F1 and IoU of the tree class (boolean arrays of one shape)."""
    if valid is not None:
        predicted, reference = predicted & valid, reference & valid
    tp = int((predicted & reference).sum())
    fp = int((predicted & ~reference).sum())
    fn = int((~predicted & reference).sum())
    if tp + fp + fn == 0:
        return {"precision": 1.0, "recall": None, "f1": 1.0, "iou": 1.0, "tp": 0, "fp": 0, "fn": 0}
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn)
    return {"precision": precision, "recall": recall, "f1": f1, "iou": tp / (tp + fp + fn),
            "tp": tp, "fp": fp, "fn": fn}


def predicted_crowns(mask: np.ndarray, min_pixels: int = MIN_CROWN_PIXELS) -> tuple[np.ndarray, int]:
    """8-connected components of the mask with at least `min_pixels`: (labels, count), 0 = none."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return labels, 0
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    renumber = np.zeros(count + 1, dtype=labels.dtype)
    renumber[keep] = np.arange(1, int(keep.sum()) + 1)
    return renumber[labels], int(keep.sum())


def crown_scores(mask: np.ndarray, objects: list[ReferenceObject], min_pixels: int = MIN_CROWN_PIXELS,
                 match_iou: float = MATCH_IOU, crowns: np.ndarray | None = None) -> dict:
    """One-to-one crown matching (IoU ≥ match_iou) and the centroid box recall.

    Predicted crowns are `crowns` (instance ids, 0 = none) when given, else the
    connected components of the mask.
    """
    if crowns is None:
        labels, count = predicted_crowns(mask, min_pixels)
    else:
        ids, inverse = np.unique(crowns, return_inverse=True)
        labels = inverse.reshape(crowns.shape) if ids[0] == 0 else inverse.reshape(crowns.shape) + 1
        count = int(labels.max())
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    iou = np.zeros((len(objects), count))
    centroids = ndimage.center_of_mass(labels > 0, labels, range(1, count + 1)) if count else []
    boxes_hit = 0
    for index, item in enumerate(objects):
        window = labels[item.rows, item.cols]
        overlap = np.bincount(window[item.mask], minlength=count + 1)[1:]
        union = item.pixels + sizes[1:] - overlap
        iou[index] = np.divide(overlap, union, out=np.zeros(count), where=union > 0)
        boxes_hit += any(_inside(item, centroid) for centroid in centroids)
    matched = 0
    if objects and count:
        rows, cols = linear_sum_assignment(-iou)
        matched = int((iou[rows, cols] >= match_iou).sum())
    precision = matched / count if count else float(not objects)
    recall = matched / len(objects) if objects else None
    f1 = 2 * matched / (count + len(objects)) if count + len(objects) else 1.0
    return {
        "predicted_crowns": count,
        "reference_objects": len(objects),
        "matched": matched,
        "crown_precision": precision,
        "crown_recall": recall,
        "crown_f1": f1,
        "centroid_box_recall": boxes_hit / len(objects) if objects else None,
    }


def box_scores(mask: np.ndarray, objects: list[ReferenceObject], valid: np.ndarray | None = None,
               min_share: float = BOX_AREA_SHARE) -> dict:
    """Box recall by area, in-box precision and tree cover of a mask against reference objects."""
    if valid is not None:
        mask = mask & valid
    inside_any = union_mask(objects, mask.shape)
    found = sum(mask[item.rows, item.cols][item.mask].mean() >= min_share for item in objects if item.pixels)
    predicted = int(mask.sum())
    valid_pixels = int(valid.sum()) if valid is not None else mask.size
    return {
        "box_recall": found / len(objects) if objects else None,
        "in_box_precision": float((mask & inside_any).sum() / predicted) if predicted else 0.0,
        "tree_cover": predicted / valid_pixels if valid_pixels else 0.0,
    }


def otsu_threshold(values: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold of a 1-D sample: the cut between histogram bins that maximises the between-class variance."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)[:-1].astype(np.float64)
    above = counts.sum() - below
    sum_below = np.cumsum(counts * centres)[:-1]
    mean_below = np.divide(sum_below, below, out=np.zeros_like(below), where=below > 0)
    mean_above = np.divide((counts * centres).sum() - sum_below, above, out=np.zeros_like(above), where=above > 0)
    between = below * above * (mean_above - mean_below) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def exg_otsu_mask(rgb: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """The textbook colour rule: pixels whose ExG (2g − r − b on chromatic coordinates) is above Otsu's threshold."""
    exg = excess_green(rgb)
    threshold = otsu_threshold(exg[valid] if valid is not None else exg.ravel())
    mask = exg > threshold
    return mask & valid if valid is not None else mask


def _inside(item: ReferenceObject, centroid: tuple[float, float]) -> bool:
    row, col = int(centroid[0]), int(centroid[1])
    if not (item.rows.start <= row < item.rows.stop and item.cols.start <= col < item.cols.stop):
        return False
    return bool(item.mask[row - item.rows.start, col - item.cols.start])


def cluster_scores(clusters: np.ndarray, classes: np.ndarray, valid: np.ndarray | None = None) -> dict:
    """mIoU and pixel accuracy of cluster ids against class ids after one-to-one Hungarian matching."""
    if valid is None:
        valid = np.ones(clusters.shape, dtype=bool)
    predicted, truth = clusters[valid].astype(np.int64), classes[valid].astype(np.int64)
    cluster_ids, predicted = np.unique(predicted, return_inverse=True)
    class_ids, truth = np.unique(truth, return_inverse=True)
    confusion = np.zeros((len(cluster_ids), len(class_ids)), dtype=np.int64)
    np.add.at(confusion, (predicted, truth), 1)
    rows, cols = linear_sum_assignment(-confusion)
    mapping = dict(zip(rows.tolist(), cols.tolist()))
    ious = []
    for class_index in range(len(class_ids)):
        cluster_index = next((c for c, k in mapping.items() if k == class_index), None)
        if cluster_index is None:
            ious.append(0.0)
            continue
        tp = confusion[cluster_index, class_index]
        union = confusion[cluster_index].sum() + confusion[:, class_index].sum() - tp
        ious.append(tp / union if union else 0.0)
    correct = sum(confusion[r, c] for r, c in mapping.items())
    return {
        "miou": float(np.mean(ious)) if ious else 0.0,
        "pixel_accuracy": float(correct / max(confusion.sum(), 1)),
        "class_iou": {str(int(class_ids[i])): round(float(v), 4) for i, v in enumerate(ious)},
        "cluster_to_class": {str(int(cluster_ids[r])): int(class_ids[c]) for r, c in mapping.items()},
    }


def boxes_to_objects(boxes: list[tuple[float, float, float, float]], shape: tuple[int, int]) -> list[ReferenceObject]:
    """Pixel boxes (xmin, ymin, xmax, ymax; pixel-corner coordinates) as reference objects."""
    objects = []
    for xmin, ymin, xmax, ymax in boxes:
        r0, r1 = max(0, int(round(ymin))), min(shape[0], int(round(ymax)))
        c0, c1 = max(0, int(round(xmin))), min(shape[1], int(round(xmax)))
        if r1 > r0 and c1 > c0:
            objects.append(ReferenceObject(slice(r0, r1), slice(c0, c1), np.ones((r1 - r0, c1 - c0), bool)))
    return objects


def union_mask(objects: list[ReferenceObject], shape: tuple[int, int]) -> np.ndarray:
    """Pixels inside any reference object."""
    mask = np.zeros(shape, dtype=bool)
    for item in objects:
        mask[item.rows, item.cols] |= item.mask
    return mask
