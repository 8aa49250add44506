"""The typed run record (run_record.py): a real run's record file and result read back, round trips, and damaged
or hand-edited records refused in one line."""

import json
import sys

import pytest

from treeseg_qgis import protocol
from treeseg_qgis.engine.core.examples import Example
from treeseg_qgis.engine.pipeline import segment, teach
from treeseg_qgis.params import SegmentationParams
from treeseg_qgis.qgis_side.engine_client import EngineClient, EngineError
from treeseg_qgis.run_record import ClassesRecord, RecordError, RunRecord, TeachRecord, taught_record

from .conftest import disc_scene, write_geotiff


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """One real run on the tiny model with automatic K and crowns: its returned record (typed) and its record
    file."""
    folder = tmp_path_factory.mktemp("record")
    image, _ = disc_scene(160, 160, [(40, 40), (110, 100)], 24)
    path = write_geotiff(folder / "scene.tif", image)
    record = segment(SegmentationParams(str(path), str(folder / "out"), model=str(tiny_model_dir), device="cpu",
                                        crowns=True, tile_size=128, overlap=32))
    return record, (folder / "out" / "scene_run.json").read_text()


def test_a_real_run_gives_a_record_the_qgis_side_reads(run):
    returned, text = run
    record = RunRecord.from_json(text)
    assert record == returned and RunRecord.from_dict(returned.to_dict()) == returned
    assert record.clusters.automatic and record.clusters.k == len(record.clusters.mean_exg)
    assert 0.0 <= record.trees.tree_cover <= 1.0
    assert record.crowns is not None and "crowns" in record.outputs
    assert record.feature_cache.state in ("hit", "miss", "off")
    assert record.model.untrained is False and record.model.details  # the backbone's other facts are kept
    assert record.parameters.crowns is True and record.total_seconds > 0


def test_a_record_survives_a_round_trip_with_every_key(run):
    returned, text = run
    record = RunRecord.from_json(text)
    assert json.loads(record.to_json()) == json.loads(text) == json.loads(json.dumps(returned.to_dict()))
    assert RunRecord.from_json(record.to_json()) == record


def test_a_damaged_record_file_is_refused_in_one_line(run):
    _, text = run
    for damaged in (text[: len(text) // 2], "", "[1, 2]", "null"):
        with pytest.raises(RecordError) as refused:
            RunRecord.from_json(damaged)
        assert "\n" not in str(refused.value) and str(refused.value).startswith("Not a treeseg run record")


@pytest.mark.parametrize("edit, field", [
    (lambda data: data.pop("clusters"), "clusters is missing"),
    (lambda data: data["trees"].pop("tree_cover"), "trees.tree_cover is missing"),
    (lambda data: data["clusters"].update(k="four"), 'clusters.k is "four", not a whole number'),
    (lambda data: data["model"].update(untrained="no"), 'model.untrained is "no", not true or false'),
    (lambda data: data["outputs"].update(clusters=3), "outputs.clusters is 3, not text"),
    (lambda data: data["parameters"].update(stride=5), "parameters: Unknown stride 5"),
    (lambda data: data["parameters"].update(colour="red"), "Unknown parameters: colour"),
])
def test_a_hand_edited_record_is_refused_naming_the_field(run, edit, field):
    returned, _ = run
    data = returned.to_dict()
    edit(data)
    with pytest.raises(RecordError) as refused:
        RunRecord.from_dict(data)
    assert field in str(refused.value) and "\n" not in str(refused.value)


def test_another_versions_record_says_which_version_wrote_it(run):
    returned, _ = run
    data = {**returned.to_dict(), "treeseg_version": "0.0.1"}
    del data["tiles"]
    with pytest.raises(RecordError, match=r"written by treeseg 0\.0\.1, this is .*: tiles is missing"):
        RunRecord.from_dict(data)


def test_unknown_keys_are_ignored_and_the_models_own_facts_kept(run):
    returned, _ = run
    data = {**returned.to_dict(), "added_by_a_newer_engine": 1}
    data["model"]["new_fact"] = "kept"
    record = RunRecord.from_dict(data)
    assert "added_by_a_newer_engine" not in record.to_dict()
    assert record.model.details["new_fact"] == "kept" and record.to_dict()["model"]["new_fact"] == "kept"


def test_teach_records_of_one_and_several_classes_round_trip(tiny_model_dir, run, tmp_path):
    returned, _ = run
    params = SegmentationParams(returned.input.path, str(tmp_path), model=str(tiny_model_dir), device="cpu",
                                tile_size=128, overlap=32)
    one = teach(params, [Example(40, 40, True), Example(110, 100, True), Example(140, 20, False),
                         Example(20, 140, False)])
    several = teach(params, [Example(40, 40, label="crown"), Example(110, 100, label="crown"),
                             Example(140, 20, label="ground"), Example(20, 140, label="ground")])
    for data, kind in ((one, TeachRecord), (several, ClassesRecord)):
        record = taught_record(data)
        assert isinstance(record, kind) and record.to_dict() == json.loads(json.dumps(data))
        assert taught_record(json.loads(open(record.outputs["teach_record"]).read())) == record
    assert taught_record(one).class_name == "tree" and taught_record(several).classes == ["crown", "ground"]
    with pytest.raises(RecordError, match="Not a treeseg teach record: class is missing"):
        taught_record({key: value for key, value in one.items() if key != "class"})


OTHER_VERSIONS_WORKER = """import json, sys
print(json.dumps({"type": "hello", "protocol": %d, "pid": 0}), flush=True)
for line in sys.stdin:
    if json.loads(line).get("command") == "segment":
        print(json.dumps({"type": "result", "record": json.load(open(sys.argv[1]))}), flush=True)
"""
"""A worker speaking this protocol whose run record lacks a field, as another treeseg version's could."""


def test_a_workers_record_lacking_a_field_is_one_protocol_error(run, tiny_model_dir, tmp_path):
    returned, _ = run
    answer = tmp_path / "answer.json"
    answer.write_text(json.dumps({key: value for key, value in returned.to_dict().items() if key != "clusters"}))
    script = tmp_path / "worker.py"
    script.write_text(OTHER_VERSIONS_WORKER % protocol.PROTOCOL_VERSION)
    python = tmp_path / "engine-python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "{answer}"\n')
    python.chmod(0o755)
    client = EngineClient(str(python))
    try:
        with pytest.raises(EngineError) as refused:
            client.segment(SegmentationParams(returned.input.path, str(tmp_path / "out"),
                                              model=str(tiny_model_dir), device="cpu"))
    finally:
        client.close()
    assert refused.value.kind == protocol.ErrorKind.PROTOCOL
    assert str(refused.value) == "Not a treeseg run record: clusters is missing."
