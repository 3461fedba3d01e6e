"""The synthetic shapes dataset: deterministic files, a cache that is complete or absent, exact boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retinanet.data import synthetic
from retinanet.data.coco import CocoDataset
from retinanet.data.synthetic import CLASSES, make_shapes_dataset, render_image

SMALL = {"num_train": 6, "num_val": 3, "image_size": 64}


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", seed=1, **SMALL)
    b = make_shapes_dataset(tmp_path / "b", seed=1, **SMALL)
    c = make_shapes_dataset(tmp_path / "c", seed=2, **SMALL)
    files_a, files_c = _files(a.root), _files(c.root)
    assert len(files_a) == 6 + 3 + 3  # PNGs, two JSON files, the manifest
    assert files_a == _files(b.root)
    assert files_a[a.train_json.relative_to(a.root)] != files_c[c.train_json.relative_to(c.root)]
    assert files_a[a.val_images.relative_to(a.root) / "000000.png"] != files_c[c.val_images.relative_to(c.root) / "000000.png"]


def test_images_do_not_depend_on_the_split_sizes(tmp_path):
    small = make_shapes_dataset(tmp_path / "small", seed=0, num_train=2, num_val=1, image_size=64)
    large = make_shapes_dataset(tmp_path / "large", seed=0, num_train=4, num_val=2, image_size=64)
    for split in ("train", "val"):
        for png in (small.root / split).iterdir():
            assert png.read_bytes() == (large.root / split / png.name).read_bytes()


def test_an_existing_complete_dataset_is_reused(tmp_path, monkeypatch):
    first = make_shapes_dataset(tmp_path / "d", **SMALL)
    monkeypatch.setattr(synthetic, "_write_split", lambda *a, **k: pytest.fail("regenerated"))
    assert make_shapes_dataset(tmp_path / "d", **SMALL) == first


def test_default_directory_is_keyed_by_the_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a = make_shapes_dataset(seed=0, **SMALL)
    b = make_shapes_dataset(seed=1, **SMALL)
    assert a.root.parent == b.root.parent == tmp_path / "retinanet"
    assert a.root.name.startswith("shapes-") and a.root != b.root


def test_an_interrupted_run_leaves_no_dataset_and_the_next_run_completes(tmp_path, monkeypatch):
    write_split = synthetic._write_split

    def fail_on_val(folder, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        write_split(folder, split, *args)

    monkeypatch.setattr(synthetic, "_write_split", fail_on_val)
    with pytest.raises(KeyboardInterrupt):
        make_shapes_dataset(tmp_path / "d", **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its staging folder
    monkeypatch.setattr(synthetic, "_write_split", write_split)
    paths = make_shapes_dataset(tmp_path / "d", **SMALL)
    assert len(list(paths.val_images.iterdir())) == 3


def test_a_foreign_folder_is_never_overwritten(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a shapes dataset"):
        make_shapes_dataset(folder, **SMALL)
    make_shapes_dataset(tmp_path / "other", seed=0, **SMALL)
    with pytest.raises(ValueError, match="not a shapes dataset"):
        make_shapes_dataset(tmp_path / "other", seed=1, **SMALL)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_the_dataset_loads_cleanly_with_boxes_inside_the_images(tmp_path):
    paths = make_shapes_dataset(tmp_path / "d", num_train=20, num_val=5, image_size=96, seed=0)
    dataset = CocoDataset(paths.train_json, paths.train_images, check_images="decode")
    assert [c["name"] for c in dataset.categories] == list(CLASSES)
    assert dataset.label_to_category_id == [1, 2, 3, 4]
    counts = []
    for i in range(len(dataset)):
        image, target = dataset[i]
        assert image.shape == (3, 96, 96)
        boxes = target["boxes"]
        assert (boxes >= 0).all() and (boxes <= 96).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        assert ((target["labels"] >= 0) & (target["labels"] < 4)).all()
        counts.append(len(boxes))
    assert max(counts) > 1
    coco = json.loads(paths.train_json.read_text())
    for ann in coco["annotations"]:
        assert 0 < ann["area"] <= ann["bbox"][2] * ann["bbox"][3]


def test_boxes_are_tight_around_the_pixels():
    """On flat backgrounds (equal corner pixels) with one shape, the non-background pixels span the box exactly."""
    checked, empty, sides = 0, 0, []
    for i in range(200):
        image, objects = render_image(np.random.default_rng([9, i]), 96)
        empty += not objects
        sides += [min(x2 - x1, y2 - y1) for _, (x1, y1, x2, y2), _ in objects]
        corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]  # (4, 3)
        background = (image == corners[0]).all(axis=2)  # (H, W)
        # a flat background: the corners agree and most pixels share their color (no shape covers 4 corners)
        if len(objects) != 1 or not (corners == corners[0]).all() or background.mean() < 0.5:
            continue
        ys, xs = np.nonzero(~background)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == objects[0][1]
        assert objects[0][2] == len(xs)  # visible pixels
        checked += 1
    assert checked >= 3
    assert empty >= 1  # some images have no shapes
    assert min(sides) >= 10 and max(sides) >= 40  # from about 12 px to a large part of the image


# ----------------------------------------------------------------------------------------------
# parametrized generation: the demo's files unchanged, the dense variant (issue 23)

from retinanet.data.synthetic import DENSE, DEMO, ShapesParams, shapes_dataset_params  # noqa: E402


def _digest(root):
    import hashlib

    h = hashlib.sha256()
    for path, data in _files(root).items():
        h.update(str(path).encode())
        h.update(data)
    return h.hexdigest()


def test_the_default_parameters_give_the_files_they_gave_before(tmp_path):
    """The crop-based renderer (for the dense variant) draws the demo's images exactly as the whole-image
    one did: this digest of every file was computed with the generator at commit 96f1e1f, before it."""
    paths = make_shapes_dataset(tmp_path / "d", num_train=6, num_val=3, image_size=96, seed=1)
    assert _digest(paths.root) == "92e9af939a5953eb48367b3448b39ef3c48f868b7620013a3c465026c4bcb92e"
    assert make_shapes_dataset(tmp_path / "e", num_train=6, num_val=3, image_size=96, seed=1,
                               shapes=ShapesParams()).root.name == "e"
    assert _files(tmp_path / "e") == _files(paths.root)
    # the demo's cached dataset keeps its folder name (~/.cache/retinanet/shapes-3d73013508be)
    params = shapes_dataset_params(4000, 500, 192, 0)
    assert params == {"version": 2, "num_train": 4000, "num_val": 500, "image_size": 192, "seed": 0}
    assert hashlib_digest(params) == "3d73013508be"
    assert "shapes" in shapes_dataset_params(4000, 500, 384, 0, DENSE)


def hashlib_digest(params):
    import hashlib

    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


DENSE_SMALL = {"num_train": 2, "num_val": 1, "image_size": 384, "shapes": DENSE}


def test_the_dense_variant_is_deterministic_and_has_its_own_folder(tmp_path, monkeypatch):
    a = make_shapes_dataset(tmp_path / "a", seed=0, **DENSE_SMALL)
    b = make_shapes_dataset(tmp_path / "b", seed=0, **DENSE_SMALL)
    assert _files(a.root) == _files(b.root)
    assert json.loads((a.root / "manifest.json").read_text())["parameters"]["shapes"]["clutter"] == DENSE.clutter
    with pytest.raises(ValueError, match="not a shapes dataset"):  # same sizes, other shapes: not reused
        make_shapes_dataset(tmp_path / "a", seed=0, num_train=2, num_val=1, image_size=384)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    dense = make_shapes_dataset(seed=0, **DENSE_SMALL)
    demo = make_shapes_dataset(seed=0, num_train=2, num_val=1, image_size=384)
    assert dense.root != demo.root and _files(dense.root) == _files(a.root)


def test_dense_annotations_are_exact_and_within_the_bounds(tmp_path):
    from retinanet.ops.masks import decode_rles

    paths = make_shapes_dataset(tmp_path / "d", seed=3, **DENSE_SMALL)
    for json_path in (paths.train_json, paths.val_json):
        coco = json.loads(json_path.read_text())
        for image in coco["images"]:
            anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            # the requested count is uniform in [20, 60]; a shape that finds no place in 20 tries is left out
            assert DENSE.min_objects - 5 <= len(anns) <= DENSE.max_objects
            masks = decode_rles([a["segmentation"] for a in anns], 384, 384)  # (N, 384, 384)
            for ann, mask in zip(anns, masks):
                ys, xs = np.nonzero(mask)
                x, y, w, h = ann["bbox"]
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
                assert ann["area"] == len(xs)
                assert min(w, h) >= DENSE.min_object and max(w, h) <= DENSE.max_object
            assert masks.sum(axis=0).max() <= 1  # visible masks never overlap


def test_clutter_is_drawn_but_never_annotated():
    no_objects = dict(min_objects=0, max_objects=0, empty_fraction=0.0)
    plain, none = render_image(np.random.default_rng(5), 128, ShapesParams(**no_objects))
    cluttered, objects = render_image(np.random.default_rng(5), 128, ShapesParams(clutter=10, **no_objects))
    assert none == [] and objects == []
    changed = (plain != cluttered).any(axis=2).mean()
    assert 0.0 < changed < 0.5  # thin lines and outlines over the same background, not a new image


def test_dense_counts_and_sizes_over_many_images():
    """Counts in [20, 60] requested; few shapes are lost to the occlusion and color rules (small shapes on
    384 px: in the first 100 training images all 4231 requested were placed); sizes span 8 px shorter
    sides to 64 px longer sides."""
    placed, requested, sides = 0, 0, []
    for i in range(8):
        rng = np.random.default_rng([0, 0, i])
        _, objects = render_image(rng, 384, DENSE)
        # the same stream up to the count: background, clutter, empty draw, count
        again = np.random.default_rng([0, 0, i])
        synthetic._clutter(again, synthetic._background(again, 384), DENSE.clutter)
        again.random()
        count = int(again.integers(DENSE.min_objects, DENSE.max_objects + 1))
        assert len(objects) <= count
        placed, requested = placed + len(objects), requested + count
        sides += [(min(x2 - x1, y2 - y1), max(x2 - x1, y2 - y1)) for _, (x1, y1, x2, y2), _ in objects]
    assert placed >= 0.9 * requested
    sides = np.array(sides)
    assert sides[:, 0].min() == 8 and 40 <= sides[:, 1].max() <= 64


def test_bad_shape_parameters_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="bad shapes parameters for 384 px images"):
        make_shapes_dataset(tmp_path / "d", image_size=384, shapes=ShapesParams(min_objects=5, max_objects=2))
    with pytest.raises(ValueError, match="bad shapes parameters for 24 px images"):
        make_shapes_dataset(tmp_path / "d", image_size=24, shapes=DEMO)
    assert not (tmp_path / "d").exists()
