"""Stage `index`: layouts, validation of every image, duplicates, seeded stratified splits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from stages import index
from stages.lib.cli import UserError
from tests.conftest import distinct_color, image_bytes, make_image_tree, write_image


def run_index(root: Path) -> tuple[pd.DataFrame, dict]:
    index.main()
    table = pd.read_csv(root / "data/index.csv", keep_default_na=False)
    return table, json.loads((root / "metrics/index/summary.json").read_text())


def skipped_reasons(summary: dict) -> dict[str, str]:
    return {entry["path"]: entry["reason"] for entry in summary["skipped_files"]}


def split_counts(table: pd.DataFrame) -> dict[tuple[str, str], int]:
    return table.groupby(["split", "class"]).size().to_dict()


def test_predefined_train_val_val_becomes_test(project):
    root = project()
    raw = root / "data/raw/archive_top"
    n = make_image_tree(raw / "train", {"ants": 10, "bees": 10})
    make_image_tree(raw / "val", {"ants": 4, "bees": 5}, start=n)
    table, summary = run_index(root)
    assert list(table.columns) == ["path", "class", "label", "split", "sha256", "width", "height"]
    assert split_counts(table) == {
        ("test", "ants"): 4, ("test", "bees"): 5,
        ("train", "ants"): 8, ("train", "bees"): 8,
        ("val", "ants"): 2, ("val", "bees"): 2,
    }
    # The archive's val folder is exactly the test split: model selection never sees it.
    assert set(table.loc[table.split == "test", "path"]) == {
        p.relative_to(root / "data/raw").as_posix() for p in (raw / "val").rglob("*.png")
    }
    assert summary["layout"] == "predefined"
    assert summary["counts"]["test"] == {"ants": 4, "bees": 5, "total": 9}
    assert json.loads((root / "data/classes.json").read_text()) == ["ants", "bees"]
    assert dict(zip(table["class"], table["label"])) == {"ants": 0, "bees": 1}
    assert (table.width == 24).all() and (table.height == 16).all()


@pytest.mark.parametrize("names", [("Training", "Valid", "Test"), ("train", "validation", "testing")])
def test_predefined_three_splits_are_respected(project, names):
    root = project()
    raw = root / "data/raw"
    n = make_image_tree(raw / names[0], {"a": 5, "b": 5})
    n = make_image_tree(raw / names[1], {"a": 2, "b": 2}, start=n)
    make_image_tree(raw / names[2], {"a": 3, "b": 3}, start=n)
    table, _ = run_index(root)
    for folder, split in zip(names, ("train", "val", "test")):
        assert set(table.loc[table.path.str.startswith(folder + "/"), "split"]) == {split}


def test_predefined_train_and_test_carves_val_from_train(project):
    root = project(index={"val_fraction": 0.25})
    n = make_image_tree(root / "data/raw/train", {"a": 8, "b": 8})
    make_image_tree(root / "data/raw/test", {"a": 2, "b": 2}, start=n)
    table, _ = run_index(root)
    assert split_counts(table) == {("test", "a"): 2, ("test", "b"): 2, ("train", "a"): 6,
                                   ("train", "b"): 6, ("val", "a"): 2, ("val", "b"): 2}


def test_flat_layout_is_split_by_ratios_within_one_image_per_class(project):
    root = project()
    sizes = {"c1": 7, "c2": 10, "c3": 13, "c4": 23}
    make_image_tree(root / "data/raw/my photos", sizes)
    table, summary = run_index(root)
    assert summary["layout"] == "flat"
    counts = split_counts(table)
    for name, n in sizes.items():
        for split, ratio in zip(("train", "val", "test"), (0.6, 0.2, 0.2)):
            assert abs(counts[(split, name)] - n * ratio) <= 1, (name, split)
        assert sum(counts[(s, name)] for s in ("train", "val", "test")) == n


def test_adding_images_moves_at_most_one_existing_image_per_cut_and_added_image():
    from stages.lib.splits import stratified_split

    def splits(count: int) -> dict[str, str]:
        keys = [f"image-{i}" for i in range(count)]
        names = ["a" if i % 3 else "b" for i in range(count)]
        return dict(zip(keys, stratified_split(names, (0.6, 0.2, 0.2), ("train", "val", "test"), 42, keys)))

    before, after = splits(1000), splits(1010)  # 1% more
    moved = [key for key in before if before[key] != after[key]]
    assert len(moved) <= 2 * 10  # two cuts, ten images added
    assert splits(1000) == before


def test_same_seed_same_bytes_other_seed_other_shuffle(project):
    root = project()
    make_image_tree(root / "data/raw", {"a": 12, "b": 12})
    index.main()
    first = (root / "data/index.csv").read_bytes()
    index.main()
    assert (root / "data/index.csv").read_bytes() == first
    project(index={"seed": 7})
    index.main()
    other = (root / "data/index.csv").read_bytes()
    assert other != first
    assert sorted(other.splitlines()[1:]) != sorted(first.splitlines()[1:])  # another split, not just order


def test_bad_images_are_skipped_with_their_reason(project):
    root = project(index={"max_pixels": 1_000_000})
    raw = root / "data/raw"
    make_image_tree(raw, {"a": 5, "b": 5})
    good_jpeg = image_bytes(size=(64, 64))
    (raw / "a/truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (raw / "a/notes.jpg").write_text("this is not an image")
    (raw / "a/empty.png").write_bytes(b"")
    write_image(raw / "b/bomb.png", size=(1200, 1000), fmt="PNG")
    (raw / "b/readme.txt").write_text("hello")
    table, summary = run_index(root)
    reasons = skipped_reasons(summary)
    assert reasons["a/truncated.jpg"].startswith("corrupt or truncated image")
    assert reasons["a/notes.jpg"] == "not an image"
    assert reasons["a/empty.png"] == "empty file"
    assert reasons["b/bomb.png"] == "decompression bomb: 1200x1000 pixels is over index.max_pixels (1000000)"
    assert reasons["b/readme.txt"] == "unsupported file type '.txt'"
    assert summary["skipped"] == 5 and len(table) == 10
    assert not set(reasons) & set(table.path)


def test_names_extensions_and_litter(project):
    root = project()
    raw = root / "data/raw"
    make_image_tree(raw, {"a": 4, "b": 4})
    write_image(raw / "a/Überfall mit Leerzeichen, und Komma.JPG", color=(1, 2, 3))
    write_image(raw / "a/deep/nested/photo.Jpeg", color=(4, 5, 6))
    write_image(raw / "b/picture.webp", color=(7, 8, 9), fmt="WEBP")
    write_image(raw / "b/picture.bmp", color=(10, 11, 12), fmt="BMP")
    write_image(raw / "b/picture.GIF", color=(13, 14, 15), fmt="GIF")
    for litter in ("__MACOSX/a/._x.jpg", "a/.DS_Store", "b/Thumbs.db", "a/.hidden.jpg"):
        (raw / litter).parent.mkdir(parents=True, exist_ok=True)
        (raw / litter).write_bytes(b"litter")
    table, summary = run_index(root)
    assert summary["skipped"] == 0
    assert {"a/Überfall mit Leerzeichen, und Komma.JPG", "a/deep/nested/photo.Jpeg", "b/picture.webp",
            "b/picture.bmp", "b/picture.GIF"} <= set(table.path)
    assert len(table) == 13 and summary["classes"] == 2


def test_duplicates_across_split_folders_keep_the_held_out_copy(project):
    root = project()
    raw = root / "data/raw"
    n = make_image_tree(raw / "train", {"a": 10, "b": 10})
    make_image_tree(raw / "val", {"a": 3, "b": 3}, start=n)
    copy = (raw / "train/a/img_0000.png").read_bytes()
    (raw / "val/a/copy_of_train.png").write_bytes(copy)
    (raw / "train/a/second_copy.png").write_bytes(copy)
    table, summary = run_index(root)
    reasons = skipped_reasons(summary)
    assert reasons["train/a/img_0000.png"] == "duplicate of val/a/copy_of_train.png"
    assert reasons["train/a/second_copy.png"] == "duplicate of val/a/copy_of_train.png"
    assert table.loc[table.path == "val/a/copy_of_train.png", "split"].item() == "test"
    assert table.groupby("sha256")["split"].nunique().max() == 1
    assert table.sha256.is_unique


def test_identical_files_under_two_classes_are_a_label_conflict(project):
    root = project()
    raw = root / "data/raw"
    make_image_tree(raw, {"a": 5, "b": 5})
    (raw / "b/same_as_a.png").write_bytes((raw / "a/img_0000.png").read_bytes())
    table, summary = run_index(root)
    reasons = skipped_reasons(summary)
    assert reasons["a/img_0000.png"].startswith("label conflict: identical files under classes ['a', 'b']")
    assert reasons["b/same_as_a.png"] == reasons["a/img_0000.png"]
    assert len(table) == 9


def test_no_content_hash_in_two_splits_with_many_duplicates(project):
    root = project()
    raw = root / "data/raw"
    make_image_tree(raw, {"a": 15, "b": 15})
    for i in range(10):
        write_image(raw / "a" / f"dup_{i}.png", color=distinct_color(i % 3), fmt="PNG")
    table, _ = run_index(root)
    assert table.sha256.is_unique


def test_error_no_class_folders(project):
    root = project()
    write_image(root / "data/raw/lonely.jpg")
    with pytest.raises(UserError, match="no class folders found"):
        index.main()


def test_error_single_class(project):
    root = project()
    make_image_tree(root / "data/raw/top/only", {"cats": 5})
    with pytest.raises(UserError, match=r"only one class folder \('cats'\); a classifier needs at least two"):
        index.main()


def test_error_too_few_images(project):
    root = project()
    make_image_tree(root / "data/raw", {"a": 10, "b": 2})
    with pytest.raises(UserError, match=r"class 'b' has 2 usable images, too few to split into train/val/test"):
        index.main()


def test_error_split_folders_with_different_classes(project):
    root = project()
    n = make_image_tree(root / "data/raw/train", {"a": 5, "b": 5})
    make_image_tree(root / "data/raw/val", {"a": 2, "c": 2}, start=n)
    with pytest.raises(UserError, match=r"val: class folders \['a', 'c'\] differ from train's \['a', 'b'\]"):
        index.main()


def test_error_class_without_usable_images(project):
    root = project()
    make_image_tree(root / "data/raw", {"a": 5, "b": 5})
    (root / "data/raw/c").mkdir()
    (root / "data/raw/c/broken.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"class folder 'c' has no usable images"):
        index.main()
    assert not (root / "data/index.csv").exists()


def test_parallel_and_serial_validation_agree(project):
    root = project(index={"workers": 1})
    make_image_tree(root / "data/raw", {"a": 6, "b": 6})
    (root / "data/raw/a/bad.jpg").write_bytes(b"junk")
    index.main()
    serial = (root / "data/index.csv").read_bytes(), (root / "metrics/index/summary.json").read_bytes()
    project(index={"workers": 2})
    index.main()
    assert ((root / "data/index.csv").read_bytes(), (root / "metrics/index/summary.json").read_bytes()) == serial


def test_a_read_only_data_folder_is_one_line_naming_the_output(tiny_project):
    import os
    import re
    import shutil
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT

    root = tiny_project(run_features=False)
    before = (root / "data/index.csv").read_bytes()
    command = [sys.executable, "-m", "stages", "index"]
    if shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"]).returncode == 0:
        # A private mount namespace: data/ is read-only for this process alone, even for root.
        script = 'mount --bind data data && mount -o remount,bind,ro data && exec "$@"'
        command = ["unshare", "-rm", "sh", "-c", script, "sh", *command]
    elif os.geteuid() != 0:
        (root / "data").chmod(0o555)
    else:
        pytest.skip("as root without unshare, no folder is read-only")
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    (root / "data").chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.fullmatch(r"error: data/index.csv: cannot write it in data/ "
                        r"\((Read-only file system|Permission denied)\); "
                        r"make that folder writable, or run where it is", result.stderr.strip()), result.stderr
    assert (root / "data/index.csv").read_bytes() == before


def test_skipped_files_are_summarised_by_kind_in_the_log(project, caplog):
    root = project()
    raw = root / "data/raw"
    make_image_tree(raw, {"a": 12, "b": 12})
    for i in range(40):  # forty copies of three images
        write_image(raw / "a" / f"copy_{i:02d}.png", color=distinct_color(i % 3), fmt="PNG")
    for i in range(2):
        (raw / "b" / f"broken_{i}.jpg").write_bytes(b"not an image")
    caplog.set_level("INFO")
    _, summary = run_index(root)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3, warnings  # one line per kind and a pointer to the full list
    assert warnings[0].startswith("40 skipped, duplicate: a/copy_03.png (duplicate of a/copy_00.png); ")
    assert warnings[0].endswith("; and 37 more")
    assert warnings[1] == "2 skipped, not an image: b/broken_0.jpg (not an image); b/broken_1.jpg (not an image)"
    assert warnings[2] == "every skipped file and its reason: metrics/index/summary.json (skipped_files)"
    assert summary["skipped"] == 42 and len(summary["skipped_files"]) == 42


def test_imbalance_is_recorded_and_warned_about(project, caplog):
    root = project()
    make_image_tree(root / "data/raw", {"many": 40, "few": 10})
    caplog.set_level("INFO")
    _, summary = run_index(root)
    assert summary["imbalance_ratio"] == 4.0
    assert any("classes are imbalanced: many has 40 images, few 10 (4.0x)" in r.getMessage() for r in caplog.records)
    import shutil

    shutil.rmtree(root / "data/raw")
    make_image_tree(root / "data/raw", {"many": 29, "few": 10}, start=100)
    caplog.clear()
    _, summary = run_index(root)
    assert summary["imbalance_ratio"] == 2.9 and "imbalanced" not in caplog.text


def test_the_dataset_picture_is_drawn(project):
    root = project()
    make_image_tree(root / "data/raw", {"a": 12, "b": 5})
    run_index(root)
    picture = root / "metrics/index/dataset.png"
    assert picture.read_bytes().startswith(b"\x89PNG") and picture.stat().st_size > 10_000


def test_a_train_only_layout_is_split_by_the_flat_ratios(project, caplog):
    root = project()
    make_image_tree(root / "data/raw/dataset/images/train", {"cat": 10, "dog": 10})
    caplog.set_level("INFO")
    table, summary = run_index(root)
    assert summary["layout"] == "train-only"
    assert ("found dataset/images/train/ with classes cat, dog but no val or test folder: val and test are carved "
            "from it by index.split_ratios") in caplog.text
    assert table.groupby("split").size().to_dict() == {"test": 4, "train": 12, "val": 4}
    assert table.path.str.startswith("dataset/images/train/").all()


def test_split_folders_without_a_train_folder_are_named(project):
    root = project()
    make_image_tree(root / "data/raw/val", {"cat": 3, "dog": 3})
    make_image_tree(root / "data/raw/test", {"cat": 3, "dog": 3}, start=50)
    with pytest.raises(UserError, match=r"found split folders \['test', 'val'\] but no train folder; add one"):
        index.main()


def test_split_folders_deeper_than_a_side_folder_are_found(project, caplog):
    root = project()
    (root / "data/raw/docs").mkdir(parents=True)
    (root / "data/raw/docs/README.txt").write_text("about the data")
    make_image_tree(root / "data/raw/dataset/images/train", {"cat": 8, "dog": 8})
    make_image_tree(root / "data/raw/dataset/images/test", {"cat": 3, "dog": 3}, start=50)
    caplog.set_level("INFO")
    table, summary = run_index(root)
    assert "found the split folders in dataset/images/" in caplog.text
    assert summary["layout"] == "predefined" and summary["classes"] == 2
    assert table.groupby("split").size().to_dict() == {"test": 6, "train": 12, "val": 4}


def test_class_folders_may_hold_folders_of_their_own(project):
    root = project()
    make_image_tree(root / "data/raw/photos/cat/2019", {"": 6})
    make_image_tree(root / "data/raw/photos/dog/holiday", {"": 6}, start=20)
    make_image_tree(root / "data/raw/photos/dog", {"": 1}, start=40)
    table, summary = run_index(root)
    assert summary["layout"] == "flat" and sorted(table["class"].unique()) == ["cat", "dog"]
    assert len(table) == 13


def test_ambiguous_layouts_list_what_was_found(project):
    root = project()
    make_image_tree(root / "data/raw/batch1", {"cat": 4, "dog": 4})
    make_image_tree(root / "data/raw/batch2", {"cat": 4, "dog": 4}, start=20)
    with pytest.raises(UserError, match=r"^\./: the folders batch1, batch2 each hold the folders cat, dog, so the "
                                        r"classes could be either; if the first are splits, name them train, val and "
                                        r"test"):
        index.main()
    make_image_tree(root / "data/raw/masks/train", {"cat": 4, "dog": 4}, start=40)
    make_image_tree(root / "data/raw/images/train", {"cat": 4, "dog": 4}, start=60)
    with pytest.raises(UserError, match=r"split folders in several places: images/, masks/; point data.url at one"):
        index.main()


# --- labels from a CSV ------------------------------------------------------------------------


def write_labelled_images(root: Path, rows: list[tuple[str, str]], header="filename,label", extra=None) -> None:
    """images/NAME.png for each (name, label), and labels.csv listing them with `header`."""
    lines = [header]
    for i, (name, label) in enumerate(rows):
        write_image(root / "data/raw/kaggle/images" / f"{name}.png", color=distinct_color(i), fmt="PNG")
        lines.append(",".join([f"images/{name}.png", label] + ([extra(i)] if extra else [])))
    (root / "data/raw/kaggle/labels.csv").write_text("\n".join(lines) + "\n")


def test_labels_from_a_csv_with_detected_columns(project, caplog):
    root = project(index={"labels": "labels.csv"})
    write_labelled_images(root, [(f"im{i:02d}", "cat" if i % 2 else "dog") for i in range(20)])
    write_image(root / "data/raw/kaggle/images/unlisted.png", color=(1, 2, 3), fmt="PNG")
    with (root / "data/raw/kaggle/labels.csv").open("a") as csv:
        csv.write("images/missing.png,cat\nimages/im00.png,dog\nimages/im01.png,dog\n")
    caplog.set_level("INFO")
    table, summary = run_index(root)
    assert "labels from kaggle/labels.csv: paths in 'filename', labels in 'label'" in caplog.text
    assert summary["layout"] == "csv" and summary["classes"] == 2 and summary["not_in_labels"] == 1
    assert "1 images under data/raw/ are not in labels.csv and were left out" in caplog.text
    assert table.groupby("split").size().to_dict() == {"test": 4, "train": 11, "val": 4}  # im01 left out
    reasons = skipped_reasons(summary)
    assert reasons["images/missing.png"] == "listed in labels.csv (row 22) but not found"
    assert reasons["kaggle/images/im00.png"] == "listed again in labels.csv (row 23)"
    assert reasons["kaggle/images/im01.png"] == "label conflict: labels.csv gives it the labels ['cat', 'dog']"
    assert set(table["path"]) <= {f"kaggle/images/im{i:02d}.png" for i in range(20)}


def test_a_csv_split_column_and_named_columns(project):
    split = lambda i: ["train", "training", "Valid", "test"][i % 4]  # noqa: E731
    root = project(index={"labels": "kaggle/labels.csv", "path_column": "file", "label_column": "species"})
    write_labelled_images(root, [(f"im{i:02d}", "cat" if i < 12 else "dog") for i in range(24)],
                          header="file,species,subset", extra=split)
    table, summary = run_index(root)
    assert summary["layout"] == "csv with splits"
    expected = {f"kaggle/images/im{i:02d}.png": {"training": "train", "Valid": "val"}.get(split(i), split(i))
                for i in range(24)}
    assert dict(zip(table["path"], table["split"])) == expected


def test_a_csv_of_bare_ids_and_a_semicolon_separator(project):
    root = project(index={"labels": "labels.csv"})
    write_labelled_images(root, [(f"id{i}", "ab"[i % 2]) for i in range(10)])
    ids = ["image_id;target"] + [f"id{i};{'ab'[i % 2]}" for i in range(10)]
    (root / "data/raw/kaggle/labels.csv").write_text("\n".join(ids) + "\n")
    table, summary = run_index(root)
    assert len(table) == 10 and summary["skipped"] == 0


@pytest.mark.parametrize("params, csv_text, message", [
    ({"labels": "nope.csv"}, "filename,label\n", r"index.labels: no file named nope.csv under data/raw/ \(CSV files "
                                                  r"there: kaggle/labels.csv\); fix index.labels"),
    ({"labels": "labels.csv"}, "filename,class,label\nimages/im0.png,a,a\n", r"columns class, label could each be the "
                                                                             r"label; set index.label_column"),
    ({"labels": "labels.csv", "label_column": "kind"}, "filename,label\n",
     r"index.label_column: labels.csv has no column 'kind' \(its columns: filename, label\)"),
    ({"labels": "labels.csv"}, "filename,label,split\nimages/im0.png,a,holdout\n", r"row 2: split 'holdout' is not "
                                                                                   r"train, val or test"),
    ({"labels": "labels.csv"}, "a,b,c\nimages/im0.png,x,y\n", r"cannot tell which column holds the labels \(columns: "
                                                              r"a, b, c\); set index.label_column"),
])
def test_csv_problems_are_one_line_naming_the_fix(project, params, csv_text, message):
    root = project(index=params)
    write_labelled_images(root, [("im0", "a"), ("im1", "b")])
    (root / "data/raw/kaggle/labels.csv").write_text(csv_text)
    with pytest.raises(UserError, match=message):
        index.main()


# --- groups kept in one split -------------------------------------------------------------------


def test_group_by_keeps_each_group_in_one_split_stratified_as_far_as_groups_allow(project):
    root = project(index={"group_by": r"patient(\d+)_"})
    for patient in range(30):
        label = "sick" if patient % 3 == 0 else "well"
        for shot in range(1 + patient % 4):
            write_image(root / f"data/raw/{label}/patient{patient}_{shot}.png",
                        color=distinct_color(patient * 10 + shot), fmt="PNG")
    table, _ = run_index(root)
    table["patient"] = table["path"].str.extract(r"patient(\d+)_")[0]
    assert (table.groupby("patient")["split"].nunique() == 1).all()
    shares = table.groupby("split").size() / len(table)
    assert shares.round(1).to_dict() == {"test": 0.2, "train": 0.6, "val": 0.2}
    assert set(table.loc[table["split"] == "test", "class"]) == {"sick", "well"}
    # Without groups, the same patient lands in several splits.
    root = project(index={"group_by": None})
    table, _ = run_index(root)
    table["patient"] = table["path"].str.extract(r"patient(\d+)_")[0]
    assert (table.groupby("patient")["split"].nunique() > 1).any()


def test_group_by_carves_val_from_train_by_groups_and_names_a_pattern_too_coarse(project, caplog):
    root = project(index={"group_by": r"^[^/]+/[^/]+/(\w)"})
    make_image_tree(root / "data/raw/train", {"cat": 12, "dog": 12})
    make_image_tree(root / "data/raw/test", {"cat": 3, "dog": 3}, start=50)
    with pytest.raises(UserError, match=r"index.group_by makes 1 group\(s\) of these images, too few to fill the val "
                                        r"split; use a pattern that makes more"):
        run_index(root)  # every name starts with 'i': one group
    assert "1 groups of index.group_by have images in more than one of the given split folders" in caplog.text
    root = project(index={"group_by": r"img_(\d{3})"})  # ten images a group
    table, _ = run_index(root)
    trained = table[table["split"].isin(["train", "val"])].copy()
    trained["group"] = trained["path"].str.extract(r"img_(\d{3})")[0]
    assert (trained.groupby("group")["split"].nunique() == 1).all() and set(trained["split"]) == {"train", "val"}
    assert (table.loc[table["path"].str.startswith("test/"), "split"] == "test").all()


def test_an_invalid_group_pattern_is_a_param_error(project):
    from stages.lib.params import load_params

    project(index={"group_by": "patient(("})
    with pytest.raises(UserError, match=r"index.group_by: Value error, not a valid regular expression"):
        load_params()


def test_a_labels_csv_without_a_header_row_is_read_as_data(project, caplog):
    root = project(index={"labels": "labels.csv"})
    write_labelled_images(root, [(f"im{i:02d}", "cat" if i % 2 else "dog") for i in range(20)])
    csv_file = root / "data/raw/kaggle/labels.csv"
    csv_file.write_text("\n".join(csv_file.read_text().splitlines()[1:]) + "\n")  # the header row gone
    caplog.set_level("INFO")
    table, summary = run_index(root)
    assert "labels.csv has no header row: its first line is read as data" in caplog.text
    assert len(table) == 20 and summary["skipped"] == 0  # the first row's image is in, not "not in labels.csv"
    assert "kaggle/images/im00.png" in set(table["path"])


def test_group_by_reports_its_groups_and_refuses_a_pattern_that_groups_nothing(project, caplog):
    root = project(index={"group_by": r"patient(\d+)_"})
    for patient in range(30):
        for shot in range(2):
            write_image(root / f"data/raw/{'sick' if patient % 3 == 0 else 'well'}/patient{patient}_{shot}.png",
                        color=distinct_color(patient * 10 + shot), fmt="PNG")
    caplog.set_level("INFO")
    _, summary = run_index(root)
    assert summary["group_by"] == {"pattern": r"patient(\d+)_", "grouped_files": 60, "groups": 30}
    assert "index.group_by: 60 of 60 files in 30 groups, each kept in one split" in caplog.text
    project(index={"group_by": r"subject(\d+)_"})  # the user's belief: subjects are kept together
    with pytest.raises(UserError, match=r"^index.group_by 'subject\(\\d\+\)_' matches none of the 60 paths "
                                        r"\(e.g. sick/patient0_0.png\); fix the pattern"):
        index.main()


def test_integer_labels_are_classes_in_numeric_order(project):
    root = project(index={"labels": "labels.csv"})
    write_labelled_images(root, [(f"im{i:03d}", str(i % 12)) for i in range(72)])
    table, _ = run_index(root)
    classes = json.loads((root / "data/classes.json").read_text())
    assert classes == [str(i) for i in range(12)]  # not 0, 1, 10, 11, 2, ...
    assert (table["label"] == table["class"].astype(int)).all()
    # Folders named by numbers too
    root = project(index={"labels": None})
    shutil.rmtree(root / "data/raw")
    make_image_tree(root / "data/raw/digits", {str(i): 5 for i in (10, 9, 1, 0)}, start=100)
    run_index(root)
    assert json.loads((root / "data/classes.json").read_text()) == ["0", "1", "9", "10"]


def test_a_rerun_decodes_only_new_contents_and_indexes_as_a_fresh_run(project, monkeypatch):
    import stages.lib.images as images

    root = project()
    n = make_image_tree(root / "data/raw", {"a": 12, "b": 12})
    write_image(root / "data/raw/a/broken.jpg").write_bytes(b"\xff\xd8 not really")
    decoded = []
    real = images.upright_rgb
    monkeypatch.setattr(images, "upright_rgb", lambda image: decoded.append(1) or real(image))
    index.main()
    assert len(decoded) == 24
    # Three new images, one changed in place: only they are decoded.
    make_image_tree(root / "data/raw", {"a": 2, "b": 1}, start=n)
    write_image(root / "data/raw/b/img_0012.png", color=(1, 2, 3), fmt="PNG")
    decoded.clear()
    table, summary = run_index(root)
    assert len(decoded) == 4
    assert summary["skipped_files"] == [{"path": "a/broken.jpg", "reason": "not an image"}]  # known, still reported
    cache = json.loads((root / "data/cache/images.json").read_text())
    assert len(cache["images"]) == 28  # 27 images and the broken file; the changed image's old content is gone
    incremental = (root / "data/index.csv").read_bytes()
    (root / "data/cache/images.json").unlink()
    decoded.clear()
    index.main()
    assert len(decoded) == 27 and (root / "data/index.csv").read_bytes() == incremental
    # Another index.max_pixels may decide otherwise: the cache is not used.
    project(index={"max_pixels": 10**7})
    decoded.clear()
    index.main()
    assert len(decoded) == 27


DAMAGES = ("truncated", "not json", "a list", "an entry edited", "an entry added")


def damaged(text: str, damage: str) -> str:
    cache = json.loads(text)
    first = next(iter(cache["images"]))
    if damage == "truncated":
        return text[:40]
    if damage == "not json":
        return "\x00" * 64
    if damage == "a list":
        return "[1, 2]"
    if damage == "an entry edited":  # a plausible width, by hand
        cache["images"][first][0] += 1
    else:
        cache["images"]["0" * 64] = [10, 10, ""]
    return json.dumps(cache)


def test_a_damaged_decode_cache_is_named_and_rebuilt(project, monkeypatch, caplog):
    import stages.lib.images as images

    root = project()
    make_image_tree(root / "data/raw", {"a": 6, "b": 6})
    index.main()
    fresh = (root / "data/index.csv").read_bytes()
    path = root / "data/cache/images.json"
    text = path.read_text()
    decoded = []
    real = images.upright_rgb
    monkeypatch.setattr(images, "upright_rgb", lambda image: decoded.append(1) or real(image))
    for damage in DAMAGES:
        path.write_text(damaged(text, damage))
        decoded.clear()
        caplog.clear()
        with caplog.at_level("WARNING"):
            index.main()
        said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(said) == 1 and said[0].startswith("data/cache/images.json: damaged (") and said[0].endswith(
            "): rebuilt, every image decoded again"), (damage, said)
        assert len(decoded) == 12 and (root / "data/index.csv").read_bytes() == fresh, damage
        assert path.read_text() == text, damage  # rebuilt as the first run wrote it
