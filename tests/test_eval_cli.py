"""`retinanet eval`: the JSON it writes, its PNGs, and its errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from coco_eval_cases import make_edge_case_set, pycocotools_reference, write_json
from PIL import Image

from retinanet import evaluate
from retinanet.cli import main

DOCUMENTED_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
                   "AP60", "AP70", "AP80", "AP90", "per_category"}


@pytest.fixture()
def files(tmp_path):
    gt, results = make_edge_case_set(seed=1, num_images=20)
    return tmp_path, write_json(tmp_path / "gt.json", gt), write_json(tmp_path / "dt.json", results)


def test_writes_documented_json_and_pngs(files, capsys):
    tmp, gt_path, dt_path = files
    out, plots = tmp / "out" / "metrics.json", tmp / "plots"
    rc = main(["eval", "--gt", gt_path, "--results", dt_path, "--output", str(out), "--plots", str(plots),
               "--plots-per-category"])
    assert rc == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) == DOCUMENTED_KEYS
    ref = pycocotools_reference(gt_path, dt_path)
    for key, value in zip(evaluate.STAT_KEYS, ref.stats):
        assert metrics[key] == pytest.approx(value, abs=1e-6)
    assert set(metrics["per_category"]) == {"class1", "class3", "class7", "class12", "class90"}
    assert metrics["per_category"]["class12"] is None  # no ground truth: null, not -1
    assert all(0 <= v <= 1 for k, v in metrics.items() if k != "per_category")

    # 5 categories -> a 3x2 grid of 200 px panels.
    expected_sizes = {"pr_curves.png": (600, 450), "ap_by_size.png": (600, 400), "pr_per_category.png": (600, 400)}
    assert {p.name for p in plots.iterdir()} == set(expected_sizes)
    for name, size in expected_sizes.items():
        with Image.open(plots / name) as im:
            assert im.format == "PNG" and im.size == size
            im.verify()

    printed = capsys.readouterr().out
    assert f"maxDets=100 ] = {metrics['AP']:.3f}" in printed
    assert "class90" in printed and "Per-category AP" in printed


def test_without_output_or_plots_writes_nothing(files, capsys):
    tmp, gt_path, dt_path = files
    assert main(["eval", "--gt", gt_path, "--results", dt_path, "--backend", "pycocotools"]) == 0
    assert sorted(p.name for p in tmp.iterdir()) == ["dt.json", "gt.json"]
    assert "Average Precision" in capsys.readouterr().out


def test_empty_results_file_gives_zero(files):
    tmp, gt_path, _ = files
    empty = write_json(tmp / "empty.json", [])
    assert main(["eval", "--gt", gt_path, "--results", empty, "--output", str(tmp / "m.json")]) == 0
    assert json.loads((tmp / "m.json").read_text())["AP"] == 0


def test_unknown_image_ids_fail_cleanly(files, capsys):
    tmp, gt_path, _ = files
    bad = write_json(tmp / "bad.json", [{"image_id": 123456, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}])
    assert main(["eval", "--gt", gt_path, "--results", bad, "--output", str(tmp / "m.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{bad}: 1 image ids are absent from {gt_path}: [123456]" in err
    assert not (tmp / "m.json").exists()


def test_nan_box_names_the_result(files, capsys):
    tmp, gt_path, dt_path = files
    results = json.loads((tmp / "dt.json").read_text())
    results[5]["bbox"][2] = math.nan
    (tmp / "nan.json").write_text(json.dumps(results))  # written as the token NaN
    assert main(["eval", "--gt", gt_path, "--results", str(tmp / "nan.json")]) == 1
    assert "nan.json: result 5: 'bbox' is not finite" in capsys.readouterr().err


def test_malformed_file_is_named(files, capsys):
    tmp, gt_path, _ = files
    (tmp / "cut.json").write_text('[{"image_id": 7, "bbox"')
    assert main(["eval", "--gt", gt_path, "--results", str(tmp / "cut.json")]) == 1
    assert "cut.json: not a valid JSON file" in capsys.readouterr().err


def test_refuses_to_overwrite_an_input(files, capsys):
    tmp, gt_path, dt_path = files
    before = (tmp / "gt.json").read_bytes()
    assert main(["eval", "--gt", gt_path, "--results", dt_path, "--output", gt_path]) == 1
    assert "refusing to overwrite the input file" in capsys.readouterr().err
    assert (tmp / "gt.json").read_bytes() == before


def test_missing_backend_says_what_to_install(files, capsys, monkeypatch):
    _, gt_path, dt_path = files
    monkeypatch.setitem(evaluate.BACKENDS, "faster-coco-eval", ("not_a_module_here", "faster-coco-eval"))
    assert main(["eval", "--gt", gt_path, "--results", dt_path, "--backend", "faster-coco-eval"]) == 1
    assert "pip install faster-coco-eval" in capsys.readouterr().err


def test_per_category_plots_need_a_folder(files, capsys):
    _, gt_path, dt_path = files
    assert main(["eval", "--gt", gt_path, "--results", dt_path, "--plots-per-category"]) == 1
    assert "--plots-per-category needs --plots DIR" in capsys.readouterr().err


def test_output_paths_of_the_wrong_kind_fail_before_evaluating(files, capsys):
    tmp, gt_path, dt_path = files
    assert main(["eval", "--gt", gt_path, "--results", dt_path, "--output", str(tmp)]) == 1
    assert "is a folder" in capsys.readouterr().err
    assert main(["eval", "--gt", gt_path, "--results", dt_path, "--plots", dt_path]) == 1
    assert "is a file; give a folder" in capsys.readouterr().err


def test_eval_path_does_not_import_torch():
    # Importing torch costs ~1.6 s, most of the 2 s budget for 500k detections: the CLI parser,
    # every command module's register() and the evaluation code must not import it at module level.
    code = ("import sys; from retinanet.cli import build_parser; build_parser(); "
            "import retinanet.evaluate, retinanet.plots, retinanet.commands.eval; "
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"


def test_report_results_takes_in_memory_results(tmp_path, capsys):
    # The entry point for a mode that runs a model first and has the results list in memory.
    from retinanet.commands.eval import report_results

    gt, results = make_edge_case_set(seed=2, num_images=10)
    out = tmp_path / "m.json"
    metrics = report_results(gt, results, backend="hotcoco", output=str(out))
    assert json.loads(out.read_text()) == metrics == evaluate.evaluate_coco(gt, results)
    assert "Per-category AP" in capsys.readouterr().out
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    with pytest.raises(ValueError, match="refusing to overwrite the input file"):
        report_results(gt, results, backend="hotcoco", output=str(checkpoint), protect=[checkpoint])
    assert checkpoint.read_bytes() == b"weights"


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    from retinanet.atomic import atomic_write

    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("half of the new")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind
    with atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new"


def test_eval_checkpoint_runs_the_model_over_a_dataset(tmp_path):
    import torch

    from conftest import tiny_config
    from retinanet.checkpoint import load_model, make_checkpoint, save_atomic
    from retinanet.data.coco import CocoDataset
    from retinanet.data.synthetic import make_shapes_dataset
    from retinanet.evaluate import detections_to_coco_results, evaluate_coco
    from retinanet.modeling import build_model

    paths = make_shapes_dataset(str(tmp_path / "shapes"), num_train=2, num_val=5, image_size=64, seed=1)
    cfg = tiny_config(num_classes=4, score_thresh=0.0)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(["rectangle", "ellipse", "triangle", "cross"])]
    save_atomic(make_checkpoint(build_model(cfg), cfg, cats), str(tmp_path / "m.pt"))
    out, saved = tmp_path / "metrics.json", tmp_path / "dt.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--json", str(paths.val_json), "--images",
                 str(paths.val_images), "--save-results", str(saved), "--output", str(out), "--batch-size", "2",
                 "--workers", "0", "--device", "cpu"]) == 0
    metrics = json.loads(out.read_text())
    results = json.loads(saved.read_text())
    # the same as running the model image by image and evaluating its results
    model, _, _ = load_model(str(tmp_path / "m.pt"))
    dataset = CocoDataset(paths.val_json, paths.val_images)
    expected = []
    with torch.no_grad():
        for i in range(len(dataset)):
            image, target = dataset[i]
            expected += detections_to_coco_results(model([image]), [target["image_id"]], [c["id"] for c in cats])
    assert len(results) == len(expected) == 5 * 100
    assert [r["image_id"] for r in results] == [r["image_id"] for r in expected]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(results, expected)) < 1e-5
    assert metrics["AP"] == pytest.approx(evaluate_coco(str(paths.val_json), results)["AP"], abs=1e-9)
    assert main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--json", str(paths.val_json)]) == 1  # no --images


def test_eval_checkpoint_with_tta_equals_tta_detections(tmp_path, capsys):
    """`eval --checkpoint --tta --tta-scales 1 1.5` gives exactly `tta_detections` on the same batches of the
    same images (bitwise: one computation; a batch of one would pad and round otherwise); without
    --tta-scales the default scales; --tta without --checkpoint fails."""
    import torch

    from conftest import tiny_config
    from retinanet.checkpoint import load_model, make_checkpoint, save_atomic
    from retinanet.data.coco import CocoDataset
    from retinanet.data.synthetic import make_shapes_dataset
    from retinanet.evaluate import detections_to_coco_results
    from retinanet.modeling import build_model
    from retinanet.tta import tta_detections

    paths = make_shapes_dataset(str(tmp_path / "shapes"), num_train=2, num_val=3, image_size=64, seed=1)
    cfg = tiny_config(num_classes=4, score_thresh=0.0)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(["rectangle", "ellipse", "triangle", "cross"])]
    save_atomic(make_checkpoint(build_model(cfg), cfg, cats), str(tmp_path / "m.pt"))
    model, _, _ = load_model(str(tmp_path / "m.pt"))
    dataset = CocoDataset(paths.val_json, paths.val_images)
    base = ["eval", "--checkpoint", str(tmp_path / "m.pt"), "--json", str(paths.val_json), "--images",
            str(paths.val_images), "--batch-size", "2", "--workers", "0", "--device", "cpu"]
    for extra, scales in ((["--tta-scales", "1", "1.5"], (1.0, 1.5)), ([], (0.75, 1.0, 1.25))):
        saved = tmp_path / f"dt{len(scales)}.json"
        assert main(base + ["--tta", *extra, "--save-results", str(saved)]) == 0
        assert f"with TTA at scales {list(scales)} x flip" in capsys.readouterr().err
        results = json.loads(saved.read_text())
        expected = []
        with torch.no_grad():
            for batch in ([0, 1], [2]):  # --batch-size 2, in the dataset's order
                images, targets = zip(*(dataset[i] for i in batch))
                expected += detections_to_coco_results(tta_detections(model, list(images), scales=scales),
                                                       [t["image_id"] for t in targets], [c["id"] for c in cats])
        assert len(results) == len(expected) == 3 * 100
        assert results == expected
    # plain eval differs from TTA: the merged passes change the detections
    plain = tmp_path / "plain.json"
    assert main(base + ["--save-results", str(plain)]) == 0
    assert json.loads(plain.read_text()) != json.loads((tmp_path / "dt3.json").read_text())
    assert main(base + ["--tta-scales", "1"]) == 1  # --tta-scales without --tta
    assert main(["eval", "--gt", str(paths.val_json), "--results", str(plain), "--tta"]) == 1


def test_eval_tta_refuses_a_segment_proposal_checkpoint(tmp_path, capsys):
    """TTA merges boxes, not masks: `eval --tta` on a proposal model is refused in one line, as `Predictor`
    refuses it (before: the masks were dropped and --iou-type segm said the model predicts none)."""
    from conftest import tiny_deepmask_config
    from retinanet.checkpoint import make_checkpoint, save_atomic
    from retinanet.data.synthetic import make_shapes_dataset
    from retinanet.modeling import build_model

    paths = make_shapes_dataset(str(tmp_path / "shapes"), num_train=1, num_val=1, image_size=64, seed=1)
    cfg = tiny_deepmask_config()
    save_atomic(make_checkpoint(build_model(cfg), cfg, [{"id": 1, "name": "object"}]), str(tmp_path / "dm.pt"))
    assert main(["eval", "--checkpoint", str(tmp_path / "dm.pt"), "--json", str(paths.val_json), "--images",
                 str(paths.val_images), "--proposals", "--iou-type", "segm", "--tta", "--device", "cpu",
                 "--workers", "0", "--save-results", str(tmp_path / "dt.json")]) == 1
    err = capsys.readouterr().err
    assert err == ("error: --tta: test-time augmentation merges boxes, not masks: it does not apply to segment "
                   f"proposals ({tmp_path / 'dm.pt'}: model.arch deepmask)\n")
    assert not (tmp_path / "dt.json").exists()
