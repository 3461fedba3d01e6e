"""tools/speed_accuracy.py: its AP at a size is `retinanet eval`'s AP of the checkpoint at that size,
its table has a row per (checkpoint, size), and user mistakes are one-line errors before any work."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from retinanet.cli import main as cli

TOOL = Path(__file__).resolve().parents[1] / "tools" / "speed_accuracy.py"
CATS = [{"id": i + 1, "name": n} for i, n in enumerate(["rectangle", "ellipse", "triangle", "cross"])]


def _tool():
    spec = importlib.util.spec_from_file_location("speed_accuracy", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny shapes dataset (4 val images, 64 px) and two tiny checkpoints (RetinaNet, Faster R-CNN) at
    min_size 128, max_size 192, keeping every detection (score_thresh 0), trained a few steps on two of
    the images (at 128 px, the size the model resizes them to) so that the AP is above 0 and depends on
    the input size."""
    import torch
    import torch.nn.functional as F

    from conftest import tiny_config, train_steps
    from retinanet.checkpoint import make_checkpoint, save_atomic
    from retinanet.data.coco import CocoDataset
    from retinanet.data.synthetic import make_shapes_dataset
    from retinanet.modeling import build_model

    tmp = tmp_path_factory.mktemp("speed")
    paths = make_shapes_dataset(str(tmp / "shapes"), num_train=1, num_val=4, image_size=64, seed=1)
    two_stage = {"arch": "faster_rcnn", "min_level": 2, "max_level": 6, "p6_from": "pool",
                 "anchor_sizes": [8.0, 16.0, 32.0, 64.0, 128.0], "anchor_scales": [1.0], "roi_head_dim": 32,
                 "rpn_pre_nms_top_n": [200, 100], "rpn_post_nms_top_n": [100, 50]}
    images, targets = zip(*(CocoDataset(paths.val_json, paths.val_images)[i] for i in range(2)))
    images = [F.interpolate(i[None], scale_factor=2.0, mode="bilinear", align_corners=False)[0] for i in images]
    targets = [{**t, "boxes": t["boxes"] * 2} for t in targets]
    checkpoints = {}
    for arch in ("retinanet", "faster_rcnn"):
        torch.manual_seed(0)
        cfg = tiny_config(num_classes=4, score_thresh=0.0, **(two_stage if arch == "faster_rcnn" else {}))
        model = build_model(cfg)
        train_steps(model.train(), images, targets, steps=8, lr=0.02)
        save_atomic(make_checkpoint(model.eval(), cfg, CATS), str(tmp / f"{arch}.pt"))
        checkpoints[arch] = tmp / f"{arch}.pt"
    return tmp, paths, checkpoints


def _eval_ap(tmp, paths, checkpoint: Path, size=None) -> float:
    """`retinanet eval --checkpoint`'s AP, batch 1; with `size`, of a copy of the checkpoint whose config
    says model.min_size = size and max_size scaled with it (the model built at that size)."""
    from retinanet.checkpoint import load_checkpoint, save_atomic

    if size is not None:
        ckpt = load_checkpoint(str(checkpoint))
        m = ckpt["config"]["model"]
        m["min_size"], m["max_size"] = size, round(m["max_size"] * size / m["min_size"])
        checkpoint = tmp / f"{checkpoint.stem}_at{size}.pt"
        save_atomic(ckpt, str(checkpoint))
    out = tmp / f"{checkpoint.stem}_metrics.json"
    out.unlink(missing_ok=True)
    assert cli(["eval", "--checkpoint", str(checkpoint), "--json", str(paths.val_json), "--images",
                str(paths.val_images), "--output", str(out), "--batch-size", "1", "--workers", "0",
                "--device", "cpu"]) == 0
    return json.loads(out.read_text())["AP"]


def test_ap_equals_eval_at_own_and_other_sizes(setup, capsys):
    tmp, paths, checkpoints = setup
    out = tmp / "out"
    argv = ["--checkpoint", f"RetinaNet={checkpoints['retinanet']}", "--checkpoint",
            f"Faster R-CNN={checkpoints['faster_rcnn']}", "--sizes", "128", "96", "--json", str(paths.val_json),
            "--images", str(paths.val_images), "--output", str(out), "--warmup", "1"]
    assert _tool().main(argv) == 0
    report = json.loads((out / "speed_accuracy.json").read_text())
    rows = report["rows"]
    assert [(r["name"], r["size"]) for r in rows] == [("RetinaNet", 128), ("RetinaNet", 96),
                                                      ("Faster R-CNN", 128), ("Faster R-CNN", 96)]
    assert all(r["images"] == 4 and r["ms_per_image"] > 0 and r["trained_size"] == 128 for r in rows)
    assert [r["max_size"] for r in rows] == [192, 144, 192, 144]
    for r in rows:
        arch = "retinanet" if r["name"] == "RetinaNet" else "faster_rcnn"
        expected = _eval_ap(tmp, paths, checkpoints[arch], None if r["size"] == 128 else r["size"])
        assert r["AP"] == pytest.approx(expected, abs=1e-9), r
    # the size matters: otherwise the check above would not tell an override from none
    assert rows[0]["AP"] != rows[1]["AP"] and rows[2]["AP"] != rows[3]["AP"]
    with Image.open(out / "speed_accuracy.png") as im:
        assert im.format == "PNG" and im.size[0] >= 300
    capsys.readouterr()
    # its own output may be written again; a folder with other files may not
    assert _tool().main(argv[:6] + argv[7:]) == 0  # one size this time
    assert len(json.loads((out / "speed_accuracy.json").read_text())["rows"]) == 2
    (out / "notes.txt").write_text("mine")
    assert _tool().main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to write into a folder with other files (notes.txt)" in err
    assert (out / "notes.txt").read_text() == "mine"


def test_max_images_scores_those_images_only(setup):
    """--max-images 2: the AP of the first two images' detections against those two images' ground truth."""
    from retinanet.evaluate import evaluate_coco, ground_truth_subset

    tmp, paths, checkpoints = setup
    saved = tmp / "dt_sub.json"
    saved.unlink(missing_ok=True)
    assert cli(["eval", "--checkpoint", str(checkpoints["retinanet"]), "--json", str(paths.val_json), "--images",
                str(paths.val_images), "--save-results", str(saved), "--batch-size", "1", "--workers", "0",
                "--device", "cpu"]) == 0
    results = json.loads(saved.read_text())
    first_two = json.loads(Path(paths.val_json).read_text())["images"][:2]
    ids = {i["id"] for i in first_two}
    expected = evaluate_coco(ground_truth_subset(str(paths.val_json), ids),
                             [r for r in results if r["image_id"] in ids])["AP"]
    rows = _tool().speed_accuracy([("R", str(checkpoints["retinanet"]))], [128], str(paths.val_json),
                                  str(paths.val_images), max_images=2, warmup=0, log=lambda _: None)
    assert len(rows) == 1 and rows[0]["images"] == 2
    assert rows[0]["AP"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("problem", ["missing_checkpoint", "missing_json", "bad_size", "same_name", "not_a_checkpoint"])
def test_bad_input_is_one_line(setup, capsys, problem):
    tmp, paths, checkpoints = setup
    ckpt = [f"A={checkpoints['retinanet']}"]
    sizes, json_path = ["128"], str(paths.val_json)
    if problem == "missing_checkpoint":
        ckpt = [f"A={tmp / 'nope.pt'}"]
    elif problem == "missing_json":
        json_path = str(tmp / "nope.json")
    elif problem == "bad_size":
        sizes = ["0", "128"]
    elif problem == "same_name":
        ckpt = ckpt * 2
    else:
        (tmp / "text.pt").write_text("not a checkpoint")
        ckpt = [f"A={tmp / 'text.pt'}"]
    argv = [a for c in ckpt for a in ("--checkpoint", c)] + ["--sizes", *sizes, "--json", json_path,
                                                               "--images", str(paths.val_images),
                                                               "--output", str(tmp / f"bad_{problem}")]
    assert _tool().main(argv) == 1
    err = capsys.readouterr().err.strip()
    expected = {"missing_checkpoint": "--checkpoint", "missing_json": "--json", "bad_size": "--sizes must be positive",
                "same_name": "the same name", "not_a_checkpoint": "text.pt: not a readable checkpoint"}[problem]
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err
    if problem.startswith("missing"):
        assert "nope" in err and "not found" in err
    assert not (tmp / f"bad_{problem}").exists()
