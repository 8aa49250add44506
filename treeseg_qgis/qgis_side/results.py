"""Adds the outputs of one run to the QGIS project as a styled layer group.

QGIS side only (no torch): the run record of the engine names the files; the
cluster raster keeps the colours and names its writer gave it and is
semi-transparent so the orthophoto shows through, the tree mask shows trees in
green, the polygons outline trees in green and the rest in grey; the optional
crowns are gold outlines, the feature image an RGB composite and the canopy
height a green ramp in metres. Click-to-teach results (similarity and taught
trees) go into a group of their own, replacing the previous ones. Layers keep
the CRS of their files, which is the input's. Processing outputs get the same
names, styles and group through `OutputStyler`, a layer post-processor.

Runs that applied a survey's cluster model go into one survey group (found again by the model's file and
PCA id, kept as custom properties of the group), one sub-group per raster; their cluster layers share one
legend (labels from the model: id, tree or not, ExG) and one style, which the group keeps for later rasters
and which follows a restyle of any of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Union

from osgeo import gdal
from qgis.core import (
    QgsBasicNumericFormat,
    QgsColorRampLegendNodeSettings,
    QgsColorRampShader,
    QgsFillSymbol,
    QgsGradientColorRamp,
    QgsGradientStop,
    QgsLayerTree,
    QgsLayerTreeGroup,
    QgsLayerTreeLayer,
    QgsLayerTreeNode,
    QgsMapLayer,
    QgsMapLayerLegendUtils,
    QgsMapLayerStyle,
    QgsMessageLog,
    QgsMultiBandColorRenderer,
    QgsPalettedRasterRenderer,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsProject,
    QgsRasterLayer,
    QgsRasterShader,
    QgsRuleBasedRenderer,
    QgsSingleBandPseudoColorRenderer,
    QgsVectorLayer,
)
from qgis.PyQt import sip
from qgis.PyQt.QtGui import QColor

from ..outputs import UNTRAINED_TAG
from ..run_record import ClassesRecord, CrownsRecord, RunRecord, TaughtRecord, TeachRecord

gdal.UseExceptions()

LOG_TAG = "TreeSeg"
TREE_GREEN = QColor(34, 139, 34)
TREE_OUTLINE = {"style": "no", "color": "0,200,0,255", "outline_color": "0,200,0,255", "outline_width": "0.5"}
OTHER_OUTLINE = {"style": "no", "outline_color": "150,150,150,160", "outline_width": "0.2"}
OVERLAY_OPACITY = 0.55
"""Opacity of the cluster, tree-mask and similarity rasters: the orthophoto stays visible under them."""
CROWN_OUTLINE = {"style": "no", "outline_color": "255,215,0,255", "outline_width": "0.5"}
HEIGHT_RAMP = (QColor(247, 252, 245), QColor(199, 233, 192), QColor(116, 196, 118), QColor(35, 139, 69),
               QColor(0, 68, 27))
SIMILARITY_RAMP = (QColor(68, 1, 84), QColor(59, 82, 139), QColor(33, 145, 140), QColor(94, 201, 98),
                   QColor(253, 231, 37))
SURVEY_MODEL = "treeseg/survey_model"
SURVEY_PROJECTION = "treeseg/survey_projection"
SURVEY_STYLE = "treeseg/survey_cluster_style"
"""Custom properties of a survey group: the cluster model's file and PCA id (what finds the group again), and
the style (QML) its cluster layers share."""
RESULT_INPUT = "treeseg/result_input"
RESULT_KIND = "treeseg/result_kind"
RESULT_SETTINGS = "treeseg/result_settings"
"""Custom properties of a result group: the input layer's name, 'run' or 'teach: <class>', and the run's settings
(JSON) — what finds the older results of the same input when a new one comes."""
NOT_SETTINGS = frozenset({"input_path", "output_dir", "output_stem", "outputs", "use_cache", "cache_dir",
                          "cache_max_mb", "batch_size"})
"""Parameters that change where and how fast a run writes, not what it finds."""
NAMED_SETTINGS = frozenset({"model", "stride"})
"""Settings the group name always shows."""
SURVEY_CLUSTERS = "treeseg/survey_clusters"
"""Custom property of a cluster layer that shares its survey's style."""
SHARING_STYLE = "treeseg_sharing_style"
"""Qt property of a survey's cluster layer whose restyles reach the others (not saved with the project)."""


ResultRecord = Union[RunRecord, TaughtRecord]
"""The record of a job whose outputs make a result group: a run or a teach."""
OutputsRecord = Union[RunRecord, TaughtRecord, CrownsRecord]
"""The record of a job whose outputs Processing loads and styles."""


class ResultLayerError(RuntimeError):
    """An output file of the run could not be opened as a layer."""


def model_label(record: RunRecord) -> str:
    """The model as the user chose it: a catalogue name, or the last part of an id or folder."""
    requested = record.requested_model or record.model.model_id
    return Path(requested.rstrip("/\\")).name or requested


def group_name(record: RunRecord, input_name: str, differences: str = "") -> str:
    """E.g. 'OSBS_029 — base, stride 16' (with `differences`: 'OSBS_029 — base, stride 16, K=4'), with
    ' — UNTRAINED' when the weights were random."""
    name = f"{input_name} — {model_label(record)}, stride {record.stride}{differences}"
    return f"{name} — {UNTRAINED_TAG}" if record.model.untrained else name


def run_settings(record: ResultRecord) -> dict[str, Any]:
    """What a run of `record` was asked to find: its parameters but the paths and speed knobs (a teach: none), as
    JSON has them (lists, not tuples: equal to the settings a result group keeps)."""
    if not isinstance(record, RunRecord):
        return {}
    parameters = json.loads(json.dumps(record.parameters.to_json()))
    return {key: value for key, value in parameters.items() if key not in NOT_SETTINGS}


SETTING_WORDS = {"crowns": "tree crowns", "feature_preview": "feature image"}
"""A setting's words in a group name where its field's name is not what the panel and Processing call it."""


def setting_text(key: str, value: Any) -> str:
    """One setting as a group name shows it: 'K=4', 'automatic K', 'tree crowns', 'no feature image',
    'overlap 64'."""
    if key == "clusters":
        return "automatic K" if value == "auto" else f"K={value}"
    words = SETTING_WORDS.get(key, key.replace("_", " "))
    if isinstance(value, bool) or value is None:
        return words if value else f"no {words}"
    if isinstance(value, list):
        value = ",".join(str(item) for item in value)
    return f"{words} {value}"


def settings_difference(settings: dict[str, Any], others: Sequence[dict[str, Any]]) -> str:
    """', K=4, overlap 64': this run's value of each setting (but those the name always shows) that differs
    from one of `others`; '' when none does."""
    keys = sorted({key for other in others for key in settings.keys() | other.keys()
                   if key not in NAMED_SETTINGS and settings.get(key) != other.get(key)})
    return "".join(f", {setting_text(key, settings.get(key))}" for key in keys)


RUN_OUTPUT_ORDER = ("crowns", "polygons", "trees", "clusters", "features", "height")
"""The order of a run's layers in its group, top first."""
TEACH_OUTPUT_ORDER = ("taught_trees", "similarity")
CLASSES_OUTPUT_ORDER = ("classes",)
"""The layer the panel's teach of several classes adds (its probabilities and polygons stay files beside it)."""
CLASSES_LOADED_ORDER = ("class_polygons", "classes", "class_probabilities")
"""The order of the class outputs Processing loads, top first."""
BAND_LEGENDS = {"similarity": "Score (1: like the examples)", "height": "Height above ground"}
"""The first legend line of the single-band ramps, instead of QGIS's 'Band 1 (Gray)'."""
HIDDEN_OUTPUTS = frozenset({"trees", "features", "height", "class_probabilities"})
"""Outputs added unchecked: the polygons and clusters already show the trees; the rest are extras."""
VECTOR_OUTPUTS = frozenset({"crowns", "polygons", "class_polygons"})


def layer_names(record: OutputsRecord) -> dict[str, str]:
    """The layer name of each output kind of a run, teach or crowns `record` (for the panel and Processing
    alike)."""
    names = {"polygons": "Tree polygons", "features": "Feature image (PCA RGB)",
             "similarity": "Tree similarity (0–1)", "height": "Canopy height (m)"}
    if isinstance(record, RunRecord):
        names["trees"] = f"Tree mask ({100 * record.trees.tree_cover:.1f} % cover)"
        names["clusters"] = f"Clusters (K={record.clusters.k})"
        if record.model.height_model is not None and record.model.height_model.untrained:
            names["height"] = f"Canopy height (m) — {UNTRAINED_TAG}"
    if isinstance(record, (RunRecord, CrownsRecord)) and record.crowns is not None:
        names["crowns"] = f"Tree crowns ({record.crowns})"
    if isinstance(record, ClassesRecord):
        names["classes"] = f"Taught classes ({', '.join(record.classes)})"
        names["class_probabilities"] = "Class probabilities (0–1, a band per class)"
        names["class_polygons"] = f"Class polygons ({record.polygons})"
    if isinstance(record, TeachRecord):
        taught = record.class_name or "tree"
        taught_name = "Taught trees" if taught == "tree" else f"Taught: {taught}"
        names["taught_trees"] = (f"{taught_name} (score ≥ {record.threshold:.2f}, "
                                 f"{100 * record.tree_cover:.1f} % cover)")
        names["similarity"] = f"{taught.capitalize()} similarity (0–1)"
    return names


def open_output(path: str, kind: str, name: str) -> QgsMapLayer:
    """The output file `path` of `kind` as a valid layer called `name`, or ResultLayerError."""
    if kind in VECTOR_OUTPUTS:
        return _open(QgsVectorLayer(path, name, "ogr"))
    return _open(QgsRasterLayer(path, name, "gdal"))


def label_band_legend(node: QgsLayerTreeLayer, kind: str) -> None:
    """Name the first legend line of an output of `kind` drawn as a single-band ramp (BAND_LEGENDS) in its layer
    tree node, as Layer Properties ▸ Legend would (kept with the project)."""
    if kind in BAND_LEGENDS:
        QgsMapLayerLegendUtils.setLegendNodeUserLabel(node, 0, BAND_LEGENDS[kind])
        if node.layer() is not None:
            # The Layers panel built the node's legend when the layer arrived: make every view read it again.
            node.layer().legendChanged.emit()


def survey_class_names(record: RunRecord) -> list[str]:
    """The cluster legend of a run that applied a cluster model, e.g. 'Cluster 2 — tree (ExG 0.21)': id, tree
    rule and ExG all come from the model, so every raster of the survey gets the same labels."""
    trees = set(record.trees.clusters)
    return [f"Cluster {cluster}{' — tree' if cluster in trees else ''} (ExG {exg:.2f})"
            for cluster, exg in enumerate(record.clusters.mean_exg)]


def style_output(layer: QgsMapLayer, kind: str, record: OutputsRecord) -> None:
    """The style of output `kind` of `record`, as the panel shows it."""
    if kind == "clusters" and isinstance(record, RunRecord):
        style_clusters(layer, record.clusters.k, survey_class_names(record) if record.cluster_model else None)
    elif kind == "classes" and isinstance(record, ClassesRecord):
        style_classes(layer, record)
    elif kind in STYLES:
        STYLES[kind](layer)


def add_result_layers(record: RunRecord, input_name: str,
                      project: QgsProject | None = None) -> QgsLayerTreeGroup:
    """Load the outputs of `record` into a new group at the top of the layer tree (place_result_group): crowns
    (when made), polygons, tree mask (hidden), clusters, then the feature image and canopy height (when made,
    hidden); raises ResultLayerError (and adds nothing) when a file cannot be opened."""
    project = project or QgsProject.instance()
    outputs = record.outputs
    names = layer_names(record)
    kinds = [kind for kind in RUN_OUTPUT_ORDER if kind in outputs]
    layers = [open_output(outputs[kind], kind, names[kind]) for kind in kinds]
    group = QgsLayerTreeGroup(group_name(record, input_name))
    survey = survey_group(record, project)
    place_result_group(group, record, input_name, run_result(record), project, survey)
    for kind, layer in zip(kinds, layers):
        style_output(layer, kind, record)
        project.addMapLayer(layer, False)
        node = group.addLayer(layer)
        node.setItemVisibilityChecked(kind not in HIDDEN_OUTPUTS)
        label_band_legend(node, kind)
    if survey is not None and "clusters" in kinds:
        join_survey(layers[kinds.index("clusters")], survey)
    group.setExpanded(False)
    group.setExpanded(True)
    return group


def survey_group(record: OutputsRecord, project: QgsProject) -> QgsLayerTreeGroup | None:
    """The group of the survey whose cluster model `record` applied (a run's, or a teach's on its features): the one
    an earlier run with the same model (file and PCA) made, anywhere in the layer tree, else a new one at the top,
    e.g. 'Survey · site.treeseg'; None for a job without a cluster model."""
    model = getattr(record, "cluster_model", None)
    if model is None:
        return None
    path, projection = str(Path(model.path).resolve()), model.projection
    root = project.layerTreeRoot()
    for group in root.findGroups(True):
        if (group.customProperty(SURVEY_MODEL), group.customProperty(SURVEY_PROJECTION)) == (path, projection):
            return group
    group = root.insertGroup(0, f"Survey · {Path(path).name}")
    group.setCustomProperty(SURVEY_MODEL, path)
    group.setCustomProperty(SURVEY_PROJECTION, projection)
    return group


RUN_RESULT = "run"
SURVEY_RESULT = "survey run"


def run_result(record: RunRecord) -> str:
    """The result kind of a run `record`: SURVEY_RESULT when it applied a cluster model, else RUN_RESULT."""
    return SURVEY_RESULT if record.cluster_model else RUN_RESULT


def teach_result(record: TaughtRecord) -> str:
    """The result kind of a teach `record`: 'teach: <class>' (several: 'teach: <class> / <class>…')."""
    if isinstance(record, ClassesRecord):
        return f"teach: {' / '.join(record.classes)}"
    return f"teach: {record.class_name or 'tree'}"


def _output_files(record: ResultRecord) -> set[str]:
    """The files a run record names as its outputs."""
    return {str(Path(path)) for path in record.outputs.values() if path}


def _layer_file(layer: QgsMapLayer) -> str:
    """The file a file-based layer reads (its source without '|layername=…')."""
    return str(Path(layer.source().split("|")[0]))


def place_result_group(group: QgsLayerTreeGroup, record: ResultRecord, input_name: str, result: str,
                       project: QgsProject, parent: QgsLayerTreeGroup | None = None) -> None:
    """Put a new result group at the top of `parent` (a survey group; default the top of the layer tree, never
    inside another result), shown with every group above it, and settle the older results of the same input:
    they are switched off; one of the same kind (`result`: run_result or teach_result) with the same
    settings is replaced (removed with its layers; an older teach of the same class always is); with others of
    that kind left, a run's group name says how its settings differ."""
    settings = run_settings(record)
    group.setCustomProperty(RESULT_INPUT, input_name)
    group.setCustomProperty(RESULT_KIND, result)
    group.setCustomProperty(RESULT_SETTINGS, json.dumps(settings, sort_keys=True, default=str))
    older = [other for other in result_groups(project, input_name) if other is not group]
    same_kind = [other for other in older if other.customProperty(RESULT_KIND) == result]
    replaced = [other for other in same_kind
                if result.startswith("teach") or other.customProperty(RESULT_SETTINGS) == group.customProperty(
                    RESULT_SETTINGS)]
    top = parent or project.layerTreeRoot()
    own = _output_files(record)
    for other in replaced:
        for node in other.findLayers():
            # QGIS 3.44 adds a Processing run's layers at the insertion point, which may be the replaced group:
            # this run's own layers leave it first (their post-processors then move them into `group`).
            if node.layer() is not None and _layer_file(node.layer()) in own:
                top.insertChildNode(0, node.clone())
                node.parent().removeChildNode(node)
        project.removeMapLayers([node.layerId() for node in other.findLayers()])
        if other.parent() is not None:
            other.parent().removeChildNode(other)
    for other in older:
        if other not in replaced:
            other.setItemVisibilityChecked(False)
    kept = [json.loads(other.customProperty(RESULT_SETTINGS) or "{}") for other in same_kind if other not in replaced]
    if not result.startswith("teach") and kept:
        group.setName(group_name(record, input_name, settings_difference(settings, kept)))
    top.insertChildNode(0, group)
    _show_with_parents(group)


def _show_with_parents(node: QgsLayerTreeNode | None) -> None:
    """Switch `node` on and every group it is in, up to the root."""
    while node is not None:
        node.setItemVisibilityChecked(True)
        node = node.parent()


def result_input_name(layer: QgsMapLayer, project: QgsProject) -> str | None:
    """The name of the input layer whose result `layer` is (it sits in a result group); None for other layers."""
    node = project.layerTreeRoot().findLayer(layer.id())
    parent = node.parent() if node is not None else None
    while parent is not None:
        if parent.customProperty(RESULT_INPUT):
            return str(parent.customProperty(RESULT_INPUT))
        parent = parent.parent()
    return None


def orthophotos(project: QgsProject, name: str | None = None) -> list[QgsRasterLayer]:
    """The rasters of the layer tree that are no TreeSeg result (named `name` when given), top first."""
    return [node.layer() for node in project.layerTreeRoot().findLayers()
            if isinstance(node.layer(), QgsRasterLayer) and (name is None or node.layer().name() == name)
            and result_input_name(node.layer(), project) is None]


def orthophoto_for(active: QgsMapLayer | None, project: QgsProject) -> QgsRasterLayer | None:
    """The raster a run reads unless told otherwise: `active` (the layer selected in Layers) when it is a raster
    and no result, the input of a result selected there, else the topmost raster file that is no result."""
    input_name = result_input_name(active, project) if active is not None else None
    if input_name is None and isinstance(active, QgsRasterLayer):
        return active
    if input_name is not None and (named := orthophotos(project, input_name)):
        return named[0]
    return next((layer for layer in orthophotos(project) if layer.providerType() == "gdal"), None)


def result_groups(project: QgsProject, input_name: str) -> list[QgsLayerTreeGroup]:
    """The result groups of `input_name` anywhere in the layer tree, top first."""
    return [group for group in project.layerTreeRoot().findGroups(True)
            if group.customProperty(RESULT_INPUT) == input_name]


def join_survey(layer: QgsRasterLayer, survey: QgsLayerTreeGroup) -> None:
    """Give a cluster layer the style its survey group keeps (the first layer's own style becomes it); from now
    on a restyle of any cluster layer of the survey (also of one a reopened project brought back) reaches the
    others."""
    kept = survey.customProperty(SURVEY_STYLE)
    if kept:
        QgsMapLayerStyle(kept).writeToLayer(layer)
    else:
        survey.setCustomProperty(SURVEY_STYLE, _style_qml(layer))
    layer.setCustomProperty(SURVEY_CLUSTERS, True)
    for member in (node.layer() for node in survey.findLayers()):
        if member is not None and member.customProperty(SURVEY_CLUSTERS) and not member.property(SHARING_STYLE):
            member.setProperty(SHARING_STYLE, True)
            member.styleChanged.connect(partial(share_survey_style, member))


_receiving: set[str] = set()
"""Ids of the cluster layers being given their survey's style right now: they do not pass it on again."""


def share_survey_style(layer: QgsRasterLayer) -> None:
    """Copy the style of `layer` to the other cluster layers of the survey group it sits in (if it still does)
    and keep it there for the survey's later rasters."""
    if layer.id() in _receiving or layer.project() is None:
        return
    node = layer.project().layerTreeRoot().findLayer(layer.id())
    survey = node.parent() if node is not None else None
    while survey is not None and survey.customProperty(SURVEY_PROJECTION) is None:
        survey = survey.parent()
    if survey is None:
        return
    qml = _style_qml(layer)
    survey.setCustomProperty(SURVEY_STYLE, qml)
    for other in (found.layer() for found in survey.findLayers()):
        if other is not None and other.id() != layer.id() and other.customProperty(SURVEY_CLUSTERS):
            _receiving.add(other.id())
            try:
                QgsMapLayerStyle(qml).writeToLayer(other)
                other.triggerRepaint()
            finally:
                _receiving.discard(other.id())


def _style_qml(layer: QgsMapLayer) -> str:
    style = QgsMapLayerStyle()
    style.readFromLayer(layer)
    return style.xmlData()


def teach_group_name(record: TaughtRecord, input_name: str) -> str:
    """E.g. 'OSBS_029 — taught by example', with ' — UNTRAINED' when the weights were random."""
    name = f"{input_name} — taught by example"
    return f"{name} — {UNTRAINED_TAG}" if record.model.untrained else name


def add_teach_layers(record: TaughtRecord, input_name: str, project: QgsProject | None = None,
                     replacing: Sequence[str] = ()) -> list[QgsMapLayer]:
    """Load the taught mask (trees, or the record's class) and the similarity of a teach `record` (of several
    classes: the class raster, in the classes' colours and names); they take
    the place of the layers whose ids are in `replacing` (removed from the project) or else go into a new group
    at the top (place_result_group: an older teach of the class on the same input is replaced). Returns the new
    layers; raises ResultLayerError (and changes nothing) when a file cannot be opened."""
    project = project or QgsProject.instance()
    outputs = record.outputs
    names = layer_names(record)
    kinds = CLASSES_OUTPUT_ORDER if isinstance(record, ClassesRecord) else TEACH_OUTPUT_ORDER
    layers = [open_output(outputs[kind], kind, names[kind]) for kind in kinds]
    if isinstance(record, ClassesRecord):
        style_classes(layers[0], record)
    else:
        style_tree_mask(layers[0])
        style_similarity(layers[1])
    root = project.layerTreeRoot()
    previous = [node for node in (root.findLayer(layer_id) for layer_id in replacing) if node is not None]
    group = previous[0].parent() if previous else None
    if group is None:
        group = QgsLayerTreeGroup(teach_group_name(record, input_name))
        place_result_group(group, record, input_name, teach_result(record), project, survey_group(record, project))
    elif group.parent() is not None:
        group.setName(teach_group_name(record, input_name))
    project.removeMapLayers([node.layerId() for node in previous])
    for position, (kind, layer) in enumerate(zip(kinds, layers)):
        project.addMapLayer(layer, False)
        label_band_legend(group.insertLayer(position, layer), kind)
    if not previous:
        group.setExpanded(False)
        group.setExpanded(True)
    return layers


@dataclass
class OutputGroup:
    """The layer group of one Processing run of `record` on the layer `input_name`, made when its first output is
    loaded; `order` ranks the kinds, `result` is the result kind (run_result, teach_result)."""

    name: str
    order: tuple[str, ...]
    record: ResultRecord
    input_name: str
    result: str = RUN_RESULT
    node: QgsLayerTreeGroup | None = None
    kinds: dict[str, str] = field(default_factory=dict)
    """Layer id → output kind of the layers already moved in."""

    @classmethod
    def for_run(cls, record: RunRecord, input_name: str) -> OutputGroup:
        return cls(group_name(record, input_name), RUN_OUTPUT_ORDER, record, input_name, run_result(record))

    @classmethod
    def for_teach(cls, record: TaughtRecord, input_name: str) -> OutputGroup:
        order = CLASSES_LOADED_ORDER if isinstance(record, ClassesRecord) else TEACH_OUTPUT_ORDER
        return cls(teach_group_name(record, input_name), order, record, input_name, teach_result(record))

    def take(self, layer: QgsMapLayer, kind: str, project: QgsProject,
             parent: QgsLayerTreeGroup | None = None) -> None:
        """Move `layer`'s tree node into the group, at its kind's place; hidden when HIDDEN_OUTPUTS says so. The
        group is made at the top of `parent` (a survey group; default: the top of the layer tree, wherever
        QGIS put the layer) by place_result_group.

        QGIS may already have put the node into the group (the desktop adds layers at the current group), so
        the place is found among the other nodes; the copy goes in before the node leaves, since a layer whose
        last node leaves the tree leaves the project."""
        node = project.layerTreeRoot().findLayer(layer.id())
        if node is None or node.parent() is None:
            return
        if self.node is None or sip.isdeleted(self.node):
            root = project.layerTreeRoot()
            if node.parent().parent() is not None:  # out of a result group place_result_group may remove
                moved = node.clone()
                root.insertChildNode(0, moved)
                node.parent().removeChildNode(node)
                node = moved
            self.node = QgsLayerTreeGroup(self.name)
            place_result_group(self.node, self.record, self.input_name, self.result, project, parent)
            self.kinds.clear()
        children = self.node.children()
        others = [child for child in children if not (QgsLayerTree.isLayer(child) and child.layerId() == layer.id())]
        before = sum(1 for child in others if self._rank(child) < self.order.index(kind))
        moved = node.clone()
        moved.setItemVisibilityChecked(kind not in HIDDEN_OUTPUTS)
        label_band_legend(moved, kind)
        self.node.insertChildNode(children.index(others[before]) if before < len(others) else len(children), moved)
        node.parent().removeChildNode(node)
        self.kinds[layer.id()] = kind

    def _rank(self, node: QgsLayerTreeNode) -> int:
        """The place of a node's output kind in `order`; other nodes go last."""
        kind = self.kinds.get(node.layerId()) if QgsLayerTree.isLayer(node) else None
        return self.order.index(kind) if kind is not None else len(self.order)

    def place(self, layer: QgsMapLayer, kind: str, project: QgsProject) -> None:
        """Take a loaded output (`take`), the group made in the survey's group of the record where it has one;
        the survey's clusters joined to its legend."""
        survey = survey_group(self.record, project)
        self.take(layer, kind, project, survey)
        if survey is not None and kind == "clusters":
            join_survey(layer, survey)


@dataclass(frozen=True)
class PlaceBeside:
    """Where an output of no result group goes: just above the layer of id `layer_id` (place_beside)."""

    layer_id: str | None

    def place(self, layer: QgsMapLayer, kind: str, project: QgsProject) -> None:
        place_beside(layer, self.layer_id, project)


class OutputStyler(QgsProcessingLayerPostProcessorInterface):
    """Gives a Processing output layer the panel's name and style once QGIS has loaded it, and its place: in its
    result group, or beside a layer."""

    _alive: list[OutputStyler] = []
    """QGIS does not own post-processors: each is kept here so that it outlives the algorithm that made it."""

    def __init__(self, kind: str, record: OutputsRecord, placement: OutputGroup | PlaceBeside) -> None:
        super().__init__()
        self.kind = kind
        self.record = record
        self.placement = placement

    @classmethod
    def create(cls, kind: str, record: OutputsRecord, placement: OutputGroup | PlaceBeside) -> OutputStyler:
        styler = cls(kind, record, placement)
        cls._alive.append(styler)
        return styler

    def postProcessLayer(self, layer: QgsMapLayer, context: QgsProcessingContext,  # noqa: N802 - QGIS override
                         feedback: QgsProcessingFeedback) -> None:
        style_output(layer, self.kind, self.record)
        self.placement.place(layer, self.kind, context.project() or QgsProject.instance())


def place_beside(layer: QgsMapLayer, beside: str | None, project: QgsProject) -> None:
    """Move a lone output layer just above the layer `beside` (its input; in that layer's group), or, where that
    layer is not in the tree, to the top of the tree: never into whichever group happened to be selected."""
    root = project.layerTreeRoot()
    node = root.findLayer(layer.id())
    if node is None or node.parent() is None:
        return
    anchor = root.findLayer(beside) if beside else None
    parent, index = root, 0
    if anchor is not None and anchor.parent() is not None:
        parent = anchor.parent()
        index = next(position for position, child in enumerate(parent.children())
                     if QgsLayerTree.isLayer(child) and child.layerId() == beside)
    moved = node.clone()
    moved.setItemVisibilityChecked(True)
    parent.insertChildNode(index, moved)
    node.parent().removeChildNode(node)
    _show_with_parents(parent)


def style_loaded_outputs(context: QgsProcessingContext, record: OutputsRecord, group: OutputGroup | None,
                         suffix: str = "", beside: str | None = None) -> None:
    """Name, style and group the outputs of `record` that the toolbox will load (in the dialog, batch or
    modeler); the names end with `suffix`. Without a group they go beside the layer of id `beside`
    (place_beside)."""
    names = layer_names(record)
    placement = group if group is not None else PlaceBeside(beside)
    for kind, path in record.outputs.items():
        if kind in names and context.willLoadLayerOnCompletion(path):
            details = context.layerToLoadOnCompletionDetails(path)
            details.name = names[kind] + suffix
            details.forceName = True
            details.setPostProcessor(OutputStyler.create(kind, record, placement))


def style_classes(layer: QgsRasterLayer, record: ClassesRecord) -> None:
    """A class raster: paletted in the file's colours and category names, 0 unsure (transparent), then the
    classes."""
    style_clusters(layer, len(record.classes) + 1)


def style_clusters(layer: QgsRasterLayer, k: int, labels: Sequence[str] | None = None) -> None:
    """Paletted: the colours the engine wrote into the file for ids 0..k-1, labelled with `labels` or else the
    category names in the file."""
    dataset = gdal.Open(layer.source())
    band = dataset.GetRasterBand(1)
    table = band.GetColorTable()
    colours = [QColor(*table.GetColorEntry(cluster)) if table is not None else QColor() for cluster in range(k)]
    names = list(labels or band.GetCategoryNames() or [])
    dataset = None
    classes = [
        QgsPalettedRasterRenderer.Class(
            cluster, colour, names[cluster] if cluster < len(names) and names[cluster] else f"Cluster {cluster}")
        for cluster, colour in enumerate(colours)
    ]
    _paletted_overlay(layer, classes)


def style_tree_mask(layer: QgsRasterLayer) -> None:
    """Paletted and semi-transparent: 1 green 'tree', 0 transparent 'not tree'."""
    classes = [
        QgsPalettedRasterRenderer.Class(1, TREE_GREEN, "tree"),
        QgsPalettedRasterRenderer.Class(0, QColor(0, 0, 0, 0), "not tree"),
    ]
    _paletted_overlay(layer, classes)


def _paletted_overlay(layer: QgsRasterLayer, classes: list[QgsPalettedRasterRenderer.Class]) -> None:
    """Band 1 drawn with `classes`, semi-transparent over the image."""
    layer.setRenderer(QgsPalettedRasterRenderer(layer.dataProvider(), 1, classes))
    layer.setOpacity(OVERLAY_OPACITY)
    layer.triggerRepaint()


def style_polygons(layer: QgsVectorLayer) -> None:
    """Rule-based on is_tree, outlines only so the image shows: trees green, the rest faint grey."""
    root = QgsRuleBasedRenderer.Rule(None)
    root.appendChild(QgsRuleBasedRenderer.Rule(QgsFillSymbol.createSimple(TREE_OUTLINE),
                                               filterExp='"is_tree"', label="tree"))
    root.appendChild(QgsRuleBasedRenderer.Rule(QgsFillSymbol.createSimple(OTHER_OUTLINE),
                                               label="not tree", elseRule=True))
    layer.setRenderer(QgsRuleBasedRenderer(root))
    layer.triggerRepaint()


def style_crowns(layer: QgsVectorLayer) -> None:
    """Gold outlines, no fill: each crown stands out over the orthophoto and the tree polygons."""
    layer.renderer().setSymbol(QgsFillSymbol.createSimple(CROWN_OUTLINE))
    layer.triggerRepaint()


def style_feature_image(layer: QgsRasterLayer) -> None:
    """RGB from bands 1, 2, 3 as written (the engine already scaled the components to 1..255)."""
    layer.setRenderer(QgsMultiBandColorRenderer(layer.dataProvider(), 1, 2, 3))
    layer.triggerRepaint()


def style_height(layer: QgsRasterLayer) -> None:
    """Pseudocolour from pale (0 m) to dark green (the highest canopy), labelled in metres."""
    dataset = gdal.Open(layer.source())
    highest = max(float(dataset.GetRasterBand(1).ComputeRasterMinMax(True)[1]), 1.0)
    dataset = None
    _pseudocolour(layer, 0.0, highest, HEIGHT_RAMP, decimals=1, suffix=" m")


def style_similarity(layer: QgsRasterLayer) -> None:
    """Pseudocolour over the score range 0..1, from unlike (dark) to like the tree examples (yellow);
    semi-transparent."""
    _pseudocolour(layer, 0.0, 1.0, SIMILARITY_RAMP, decimals=2)
    layer.setOpacity(OVERLAY_OPACITY)


STYLES: dict[str, Callable[[Any], None]] = {
    "trees": style_tree_mask, "taught_trees": style_tree_mask, "polygons": style_polygons, "crowns": style_crowns,
    "features": style_feature_image, "height": style_height, "similarity": style_similarity}
"""The style of each output kind but the clusters (their legend comes from the run record)."""


def _pseudocolour(layer: QgsRasterLayer, low: float, high: float, colours: Sequence[QColor], decimals: int,
                  suffix: str = "") -> None:
    """A continuous single-band ramp through `colours` spread evenly from `low` to `high`; values in the
    legend and the class labels with `decimals` and `suffix` (a unit)."""
    stops = [low + (high - low) * index / (len(colours) - 1) for index in range(len(colours))]
    items = [QgsColorRampShader.ColorRampItem(value, colour, f"{value:.{decimals}f}{suffix}")
             for value, colour in zip(stops, colours)]
    number_format = QgsBasicNumericFormat()
    number_format.setNumberDecimalPlaces(decimals)
    legend = QgsColorRampLegendNodeSettings()
    legend.setNumericFormat(number_format)
    legend.setSuffix(suffix)
    ramp = QgsColorRampShader(low, high)
    ramp.setLegendSettings(legend)
    inner_stops = [QgsGradientStop(index / (len(colours) - 1), colour) for index, colour in enumerate(colours)][1:-1]
    ramp.setSourceColorRamp(QgsGradientColorRamp(colours[0], colours[-1], False, inner_stops))
    ramp.setColorRampItemList(items)
    shader = QgsRasterShader(low, high)
    shader.setRasterShaderFunction(ramp)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), 1, shader)
    renderer.setClassificationMin(low)
    renderer.setClassificationMax(high)
    layer.setRenderer(renderer)
    layer.triggerRepaint()


def _open(layer: QgsMapLayer) -> QgsMapLayer:
    if not layer.isValid():
        raise ResultLayerError(f"Cannot open the output {layer.source()} as a layer.")
    if not layer.crs().isValid():
        QgsMessageLog.logMessage(f"{layer.source()} has no coordinate reference system.", LOG_TAG)
    return layer
