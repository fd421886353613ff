"""Every taxonomy format: round trips, real V3Det files, and malformed input."""

from __future__ import annotations

import json

import pytest
from conftest import V3DET_CAT_INFO, V3DET_NAMES, columns_equal

from taxonomy import FORMATS, Node, Taxonomy, TaxonomyError, load_taxonomy, save_taxonomy
from taxonomy.formats.v3det import to_v3det


@pytest.mark.parametrize("name", ["t.json", "t.json.gz"])
def test_native_round_trip_keeps_everything(vehicles, tmp_path, name):
    path = tmp_path / name
    save_taxonomy(vehicles, path)
    back = load_taxonomy(path)
    assert back.ids == vehicles.ids  # storage order too
    columns_equal(vehicles, back)
    assert back.metadata == vehicles.metadata


def test_native_unknown_node_key_is_named(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps(
            {
                "format": "vastdet.taxonomy",
                "version": 1,
                "nodes": [{"id": "a", "name": "a", "parnets": []}],
            }
        )
    )
    with pytest.raises(TaxonomyError, match=r"'a' has unknown keys \['parnets'\]"):
        load_taxonomy(path)


def test_v3det_round_trip(vehicles, tmp_path):
    path = tmp_path / "tree.json"
    save_taxonomy(vehicles, path, "v3det")
    back = load_taxonomy(path)
    # v3det carries name_zh/desc_zh attributes only
    columns_equal(vehicles, back, ("name", "parents", "category_id", "synonyms", "description"))
    assert back.node("cat").attributes == {"name_zh": "猫"}


def test_v3det_writes_closures_and_keys(vehicles):
    doc = to_v3det(vehicles)
    assert doc["categoryid2treeid"]["5"] == "amph"
    assert sorted(doc["child2father"]["amph"]) == ["boat", "car"]
    assert sorted(doc["descendant2ancestor"]["amph"]) == ["boat", "car", "thing", "vehicle"]
    assert sorted(doc["ancestor2descendant"]["vehicle"]) == [
        "amph",
        "boat",
        "car",
        "sedan",
        "truck",
    ]
    assert doc["id2synonym_list"]["car"] == ["car", "auto", "automobile"]
    assert doc["id2name_zh"] == {"cat": "猫"}


def test_v3det_reads_father2child_alone():
    doc = {
        "id2name": {"r": "root", "a": "a"},
        "father2child": {"r": ["a"]},
        "categoryid2treeid": {"1": "a"},
    }
    tax = load_taxonomy_from(doc)
    assert tax.parents("a") == ["r"] and tax.category_id("a") == 1


def test_v3det_disagreeing_parent_lists_are_named():
    doc = {
        "id2name": {"r": "r", "s": "s", "a": "a"},
        "father2child": {"r": ["a"]},
        "child2father": {"a": ["s"]},
    }
    with pytest.raises(TaxonomyError, match="father2child lists 'a' under 'r'.*\\['s'\\]"):
        load_taxonomy_from(doc)


def load_taxonomy_from(doc):
    from taxonomy.formats.v3det import from_v3det

    return from_v3det(doc)


def test_coco_file_round_trip_is_exact(tmp_path):
    categories = [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 2, "name": "bicycle", "supercategory": "vehicle"},
        {"id": 3, "name": "car", "supercategory": "vehicle"},
        {"id": 90, "name": "toothbrush", "supercategory": "indoor", "freq": "f"},
    ]
    src = tmp_path / "instances.json"
    src.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    tax = load_taxonomy(src)
    assert tax.parents("category:2") == ["supercategory:vehicle"]
    assert tax.category_id("supercategory:vehicle") is None
    assert tax.name("supercategory:person") == "person"
    out = tmp_path / "cats.json"
    save_taxonomy(tax, out, "coco")
    assert json.loads(out.read_text())["categories"] == categories


def test_taxonomy_through_coco_keeps_node_ids_and_first_parent(vehicles, tmp_path):
    path = tmp_path / "c.json"
    save_taxonomy(vehicles, path, "coco")
    back = load_taxonomy(path)
    assert back.node_of_category(5) == "amph"
    assert back.name(back.parents("amph")[0]) == "car"  # COCO keeps one level: the first parent
    columns_equal(
        vehicles.restrict([3, 8]), back.restrict([3, 8]), ("name", "category_id", "description")
    )


def test_coco_category_without_name_is_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"categories": [{"id": 1, "name": "a"}, {"id": 2}]}))
    with pytest.raises(TaxonomyError, match="category #1 needs 'id' and 'name'"):
        load_taxonomy(path)


def test_cqdino_csv_round_trip(vehicles, tmp_path):
    path = tmp_path / "tree.csv"
    save_taxonomy(vehicles, path)
    back = load_taxonomy(path)
    expected = vehicles.restrict(vehicles.category_ids())  # the CSV holds categories only
    columns_equal(expected, back, ("name", "parents", "category_id", "description"))
    assert back.node("cat").attributes == {"name_zh": "猫"}
    rows = path.read_text().splitlines()
    assert rows[0].startswith("level,id,category_id,english_name")
    amph = next(r for r in rows if r.split(",")[1] == "amph")
    assert '"1,2,4"' in amph  # ancestor category ids


def test_cqdino_csv_errors_name_the_line(tmp_path):
    header = (
        "level,id,category_id,english_name,chinese_name,english_description,"
        "chinese_description,parent_id,direct_children,ancestor_category_ids\n"
    )
    path = tmp_path / "bad.csv"
    path.write_text(header + '0,a,1,a,,,,,"2",\n1,b,2,b,,,,x,,"1"\n')
    with pytest.raises(TaxonomyError, match=r"bad.csv:3: parent_id 'x'"):
        load_taxonomy(path)
    path.write_text(header + '0,a,1,a,,,,,"7",\n')
    with pytest.raises(TaxonomyError, match=r"bad.csv:2: direct child 7"):
        load_taxonomy(path)
    path.write_text("level,id\n0,a\n")
    with pytest.raises(TaxonomyError, match="expected the header"):
        load_taxonomy(path)


def test_real_v3det_name_list(tmp_path):
    tax = load_taxonomy(V3DET_NAMES)
    assert len(tax) == 13204 and tax.num_categories == 13204
    names = tax.category_names()
    assert names[1] == "ashtray" and names[2] == "cash machine"
    assert len(set(names.values())) == 13204
    out = tmp_path / "names.txt"
    save_taxonomy(tax, out)
    assert load_taxonomy(out).category_names() == names


def test_real_v3det_category_info_reads_descriptions_and_novel_flags():
    tax = load_taxonomy(V3DET_CAT_INFO)
    assert tax.num_categories == 13204
    ashtray = tax.node(tax.node_of_category(1))
    assert ashtray.description.startswith("A receptacle for the ash")
    novel = sum(tax.node(i).attributes.get("novel", False) for i in tax.ids)
    assert novel == 6495  # the open-vocabulary split stated in the data README


def test_name_list_cannot_hold_gaps(vehicles, tmp_path):
    with pytest.raises(TaxonomyError, match="ids run 1..3 over 2 categories.*exactly 1..2"):
        save_taxonomy(vehicles.restrict([1, 3]), tmp_path / "x.txt")


def test_name_list_empty_line_is_named(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("a\n\nc\n")
    with pytest.raises(TaxonomyError, match=r"names.txt:2: empty category name"):
        load_taxonomy(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_back_what_it_writes(fmt, tmp_path):
    flat = Taxonomy([Node(f"category:{i}", f"name {i}", category_id=i) for i in range(1, 6)])
    path = tmp_path / {"cqdino-csv": "t.csv", "names": "t.txt"}.get(fmt, "t.json")
    save_taxonomy(flat, path, fmt)
    back = load_taxonomy(path, fmt)
    assert back.category_names() == flat.category_names()
    assert {back.node_of_category(c) for c in range(1, 6)} == set(flat.ids)


def test_undetectable_json_and_bad_json_are_reported(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"hello": 1}')
    with pytest.raises(TaxonomyError, match="cannot tell the taxonomy format"):
        load_taxonomy(path)
    path.write_text('{"format": "vastdet.taxonomy", ')
    with pytest.raises(TaxonomyError, match="not valid JSON"):
        load_taxonomy(path)


def test_unknown_format_name_lists_the_choices(vehicles, tmp_path):
    with pytest.raises(ValueError, match="choose one of vastdet, v3det"):
        save_taxonomy(vehicles, tmp_path / "x.json", "yaml")


def test_writes_are_atomic(vehicles, tmp_path):
    path = tmp_path / "t.json"
    save_taxonomy(vehicles, path)
    before = path.read_text()
    broken = Taxonomy([Node("a", "a", category_id=2)])  # name list needs ids 1..C
    with pytest.raises(TaxonomyError):
        save_taxonomy(broken, path, "names")
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]
