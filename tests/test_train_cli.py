"""`retinanet train` end to end on a tiny generated COCO folder, config errors, output folder rules."""

import json
from pathlib import Path

import pytest
import yaml

from retinanet.checkpoint import checkpoint_name, load_checkpoint, load_model
from retinanet.cli import main

TINY = {
    "model": {"backbone": "resnet18", "backbone_width": 8, "backbone_norm": "gn", "frozen_stages": 0,
              "fpn_channels": 16, "head_channels": 16, "head_convs": 1, "min_level": 3, "max_level": 6,
              "anchor_sizes": [16, 32, 64, 128], "min_size": 64, "max_size": 64},
    "data": {"batch_size": 2, "num_workers": 0},
    "train": {"device": "cpu", "iterations": 3, "warmup_iters": 1, "checkpoint_every": 2, "log_every": 1,
              "eval_every": 2},
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from retinanet.data.synthetic import make_shapes_dataset

    return make_shapes_dataset(str(tmp_path_factory.mktemp("shapes") / "data"), num_train=6, num_val=3,
                               image_size=64, seed=1)


@pytest.fixture
def config_file(tmp_path, shapes):
    cfg = json.loads(json.dumps(TINY))
    cfg["data"].update(train_json=str(shapes.train_json), train_images=str(shapes.train_images),
                       val_json=str(shapes.val_json), val_images=str(shapes.val_images))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_writes_checkpoints_config_metrics_and_loss_curve_then_resumes(config_file, shapes, tmp_path, capsys):
    out = tmp_path / "run"
    # score_thresh 0: 100 detections per image, so that an untrained model's AP and AR are not all zero
    assert main(["train", str(config_file), "lr=0.02", "seed=3", "score_thresh=0.0", "--output", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "validation AP" in printed and "final.pt" in printed

    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.yaml", "metrics.jsonl", "loss_curve.png", "final.pt", "best.pt", checkpoint_name(2),
         checkpoint_name(3)])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["lr"] == 0.02 and saved["train"]["seed"] == 3  # overrides resolved and saved
    assert saved["model"]["num_classes"] == 4  # from the data's categories
    assert saved["data"]["train_json"] == str(shapes.train_json)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in losses] == [1, 2, 3]
    assert all(r["loss"] == pytest.approx(r["cls"] + r["box"]) and r["loss"] > 0 for r in losses)
    assert losses[0]["lr"] == pytest.approx(0.02 / 3)  # warmup from 1/3 (Detectron)
    evals = [r for r in records if "val" in r]
    assert [r["iteration"] for r in evals] == [2, 3]
    assert set(evals[-1]["val"]["per_category"]) == {"rectangle", "ellipse", "triangle", "cross"}
    # the last validation is final.pt's evaluation on the validation set, as `retinanet eval` computes it
    scored = tmp_path / "final_metrics.json"
    assert main(["eval", "--checkpoint", str(out / "final.pt"), "--json", str(shapes.val_json), "--images",
                 str(shapes.val_images), "--output", str(scored), "--workers", "0", "--device", "cpu"]) == 0
    again = json.loads(scored.read_text())
    assert {k: evals[-1]["val"][k] for k in again} == again and again["AR100"] > 0
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ckpt = load_checkpoint(str(out / checkpoint_name(3)))
    assert ckpt["format_version"] == 1 and ckpt["iteration"] == 3
    assert ckpt["data_position"] == {"micro_batches": 3, "seed": 3, "world_size": 1, "batch_size": 2}
    assert {"optimizer", "rng", "config", "categories", "best_ap"} <= set(ckpt)
    model, cfg, categories = load_model(str(out / "final.pt"))
    assert cfg.model.num_classes == 4 and [c["name"] for c in categories][0] == "rectangle"

    # Continue the same run for 2 more iterations: no config file, the run's own config.yaml.
    assert main(["train", "iterations=5", "--output", str(out), "--resume", "auto", "--no-progress"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint_*.pt")) == [checkpoint_name(4), checkpoint_name(5)]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5]


def test_unknown_key_on_the_command_line_suggests_the_closest(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(config_file), "iteratons=5", "--output", str(out)]) == 1
    assert "unknown config key 'iteratons' (did you mean 'train.iterations'?)" in capsys.readouterr().err
    assert not out.exists()  # nothing written


def test_unknown_key_in_the_file_suggests_the_closest(config_file, tmp_path, capsys):
    cfg = yaml.safe_load(config_file.read_text())
    cfg["train"]["warmup_iter"] = 10
    config_file.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(config_file), "--output", str(tmp_path / "run")]) == 1
    assert "unknown config key 'train.warmup_iter' (did you mean 'warmup_iters'?)" in capsys.readouterr().err


def test_refuses_an_output_folder_with_other_files(config_file, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert main(["train", str(config_file), "--output", str(out)]) == 1
    assert "already holds other files (notes.txt)" in capsys.readouterr().err
    assert main(["train", str(config_file), "--output", str(out), "--resume", "auto"]) == 1
    assert "not a training run" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"


def test_bad_data_is_reported_before_training(config_file, tmp_path, shapes, capsys):
    broken = json.loads(shapes.train_json.read_text())
    broken["annotations"][0]["category_id"] = 99
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps(broken))
    out = tmp_path / "run"
    assert main(["train", str(config_file), f"train_json={bad_json}", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(bad_json) in err and f"annotation id {broken['annotations'][0]['id']}" in err
    assert "unknown category id 99" in err
    assert not list(out.glob("*.pt"))


def _anchors_192(cfg):
    """All anchors of `cfg`'s model on a 192 px image, (N, 4) xyxy."""
    import torch

    from retinanet.modeling import build_model

    model = build_model(cfg)
    sizes = [(192 // 2 ** lvl, 192 // 2 ** lvl) for lvl in range(cfg.model.min_level, cfg.model.max_level + 1)]
    return torch.cat(model.anchor_generator(sizes, (192, 192), torch.device("cpu")))


def test_demo_anchors_can_match_the_smallest_shapes():
    import torch

    from retinanet.ops.boxes import box_iou
    from retinanet.commands.demo import DEMO_CONFIG
    from retinanet.config import Config, load_config

    # 12 px boxes (the smallest the shapes dataset draws) at every sub-stride offset
    corners = torch.tensor([[96.0 + dx, 96.0 + dy] for dx in range(8) for dy in range(8)])
    boxes = torch.cat([corners, corners + 12], dim=1)  # (64, 4)
    demo_best = box_iou(boxes, _anchors_192(load_config(str(DEMO_CONFIG)))).max(dim=1).values
    paper_best = box_iou(boxes, _anchors_192(Config())).max(dim=1).values
    assert demo_best.min() > 0.3  # worst case: a 16 px anchor 4 px off in x and y, IoU 100/300
    assert paper_best.max() < 0.15  # a 32 px anchor: at most 144/1024


def test_fit_schedule_keeps_the_fractions():
    from retinanet.commands.demo import fit_schedule
    from retinanet.config import Config

    cfg = Config()
    t = cfg.train
    t.iterations, t.lr_steps, t.warmup_iters, t.eval_every, t.checkpoint_every = 400, [320, 380], 50, 100, 100
    fit_schedule(cfg, seconds_per_iteration=0.5, minutes=1.5)  # 180 iterations
    assert (t.iterations, t.lr_steps, t.warmup_iters, t.eval_every, t.checkpoint_every) == (180, [144, 171], 22, 45, 45)


def _tiny_demo_dataset(monkeypatch) -> None:
    """8 training and 4 validation images of 64 px instead of the demo's 4000 + 500 of 192 px."""
    from retinanet.commands import demo

    monkeypatch.setattr(demo, "NUM_TRAIN", 8)
    monkeypatch.setattr(demo, "NUM_VAL", 4)
    monkeypatch.setattr(demo, "IMAGE_SIZE", 64)


def test_demo_end_to_end_on_a_tiny_dataset(tmp_path, monkeypatch, capsys):
    _tiny_demo_dataset(monkeypatch)
    out = tmp_path / "demo"
    tiny = ["backbone_width=8", "fpn_channels=16", "head_channels=64", "head_convs=1", "min_size=64", "max_size=64",
            "batch_size=4", "iterations=4", "warmup_iters=1", "lr_steps=[3]", "eval_every=2", "checkpoint_every=2",
            "threads=1"]  # one thread, as the rest of the suite (conftest)
    assert main(["demo", *tiny, "--output", str(out), "--data-dir", str(tmp_path / "shapes"), "--no-progress",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "held-out COCO AP" in printed and "seconds per training iteration: 1 thread(s)" in printed
    assert "device: cpu;" in printed and "iterations on cpu," in printed
    assert (out / "detections.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "demo_metrics.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert report["AP"] == [r for r in records if "val" in r][-1]["val"]["AP"]  # the held-out split's final AP
    assert report["iterations"] == 4 and report["num_val"] == 4
    assert report["device"] == "cpu" and report["threads"] == 1
    from retinanet.error_analysis import TIDE_MAIN, format_tide_line

    assert set(report["tide"]["dAP"]) == set(TIDE_MAIN)  # the held-out TIDE breakdown, stored and printed
    assert "  " + format_tide_line(report["tide"]) in printed
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["device"] == "cpu"
    assert sorted(p.name for p in (tmp_path / "shapes" / "val").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    assert main(["demo", *tiny, "--output", str(out), "--data-dir", str(tmp_path / "shapes")]) == 1  # never overwrites
    assert "already holds a training run" in capsys.readouterr().err


# Per model.arch, the overrides that make a shipped config tiny (64 px, a few small layers, 2 iterations);
# score_thresh 0 keeps 100 detections per image, so that an untrained detector's metrics are not all zero.
TINY_DEMO = {
    "retinanet": ["backbone=resnet18", "backbone_width=8", "fpn_channels=16", "head_channels=64", "head_convs=1",
                  "topk_candidates=100", "detections_per_image=100", "score_thresh=0.0"],
    "faster_rcnn": ["backbone=resnet18", "backbone_width=8", "fpn_channels=16", "roi_head_dim=32",
                    "score_thresh=0.0"],
    "deepmask": ["backbone_width=8", "segprop_window=32", "segprop_context=16", "segprop_features=8",
                 "segprop_head_dim=16", "segprop_mask_size=8", "segprop_scales=[-1.0,0.0,1.0]",
                 "segprop_windows_per_image=4"],
    "sharpmask": ["backbone_width=8", "segprop_window=32", "segprop_context=16", "segprop_features=8",
                  "segprop_head_dim=16", "segprop_mask_size=8", "segprop_scales=[-1.0,0.0,1.0]",
                  "segprop_windows_per_image=4", "segprop_refine_k=8", "segprop_refine_after=1"],
    "fpn_masks": ["backbone_width=8", "fpn_channels=8", "segprop_mlp_windows=[5,7]", "segprop_mlp_hidden=16",
                  "segprop_fpn_mask_size=6", "detections_per_image=100"],
}
SHIPPED_CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "retinanet" / "configs")
                         .glob("*.yaml"))
PROPOSAL_ARCHS = ("deepmask", "sharpmask", "fpn_masks")


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """One shapes folder for every demo below (the demo generates it once, then reuses it)."""
    return tmp_path_factory.mktemp("demo-shapes")


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_demo_runs_every_shipped_config(name, demo_data, tmp_path, monkeypatch, capsys):
    """`retinanet demo --config NAME` for every retinanet/configs/*.yaml, each model made tiny: it trains,
    draws, and reports the final model's held-out metrics, AP for detectors and segment AR for proposal
    models (before: segprop_* configs failed on metrics["AP"] after training)."""
    import torch

    from retinanet.commands.demo import DATA_SEED, demo_config
    from retinanet.config import load_config
    from retinanet.data.coco import CocoDataset
    from retinanet.data.synthetic import make_shapes_dataset
    from retinanet.engine import DistEnv, evaluate_model, headline_metrics

    _tiny_demo_dataset(monkeypatch)
    arch = load_config(str(demo_config(name))).model.arch
    tiny = TINY_DEMO[arch] + ["min_size=64", "max_size=64", "batch_size=2", "iterations=2", "warmup_iters=1",
                              "lr_steps=[1]", "eval_every=2", "checkpoint_every=2", "threads=1"]
    out = tmp_path / "demo"
    assert main(["demo", "--config", name, *tiny, "--output", str(out), "--data-dir", str(demo_data),
                 "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    model, cfg, categories = load_model(str(out / "final.pt"))
    assert cfg.model.arch == arch and " demo: 2 iterations on cpu" in printed
    assert [c["name"] for c in categories] == (["object"] if arch in PROPOSAL_ARCHS else
                                               ["rectangle", "ellipse", "triangle", "cross"])
    assert (out / "detections.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "demo_metrics.json").read_text())
    primary, shown = headline_metrics(report["metrics"])
    assert primary == ("AR@100" if arch in PROPOSAL_ARCHS else "AP")
    assert f"held-out COCO {shown[0]} {report[shown[0]]:.3f}" in printed
    # what it reports is the final model's evaluation on the held-out split, computed again here
    paths = make_shapes_dataset(str(demo_data), num_train=8, num_val=4, image_size=64, seed=DATA_SEED)  # reused
    again = evaluate_model(model, CocoDataset(paths.val_json, paths.val_images),
                           DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert {k: report[k] for k in shown} == {k: again[k] for k in shown}
    assert {k: v for k, v in report["metrics"].items() if k != "ms_per_image"} == \
           {k: v for k, v in again.items() if k != "ms_per_image"}


def test_demo_trains_on_the_gpu_when_there_is_one_unless_told_cpu(monkeypatch):
    import torch

    from retinanet.commands.demo import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device("auto") == torch.device("cuda")
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        choose_device("cuda")


def test_demo_refuses_a_missing_gpu_before_generating_data(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    assert main(["demo", "--output", str(tmp_path / "demo"), "--data-dir", str(tmp_path / "shapes"),
                 "--device", "cuda"]) == 1
    assert "no CUDA GPU is available" in capsys.readouterr().err
    assert not (tmp_path / "shapes").exists() and not (tmp_path / "demo").exists()


@pytest.fixture
def truncated_config(tmp_path):
    """A tiny config on 6 shapes images, of which image 2 is a truncated JPEG and image 4 a truncated PNG."""
    from PIL import Image

    from retinanet.data.synthetic import make_shapes_dataset

    paths = make_shapes_dataset(str(tmp_path / "data"), num_train=6, num_val=0, image_size=64, seed=1)
    data = json.loads(paths.train_json.read_text())
    jpeg = data["images"][1]
    with Image.open(paths.train_images / jpeg["file_name"]) as img:
        img.convert("RGB").save(paths.train_images / "cut.jpg", quality=95)
    jpeg["file_name"] = "cut.jpg"
    paths.train_json.write_text(json.dumps(data))
    for name in ("cut.jpg", data["images"][3]["file_name"]):
        file = paths.train_images / name
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    cfg = json.loads(json.dumps(TINY))
    cfg["train"].update(iterations=2, checkpoint_every=2, eval_every=0)
    cfg["data"].update(train_json=str(paths.train_json), train_images=str(paths.train_images))
    path = tmp_path / "truncated.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, paths, [(image["id"], paths.train_images / image["file_name"]) for image in
                         (data["images"][1], data["images"][3])]


def test_training_stops_at_start_up_listing_every_unreadable_image(truncated_config, tmp_path, capsys):
    config, _, cut = truncated_config
    out = tmp_path / "run"
    assert main(["train", str(config), "--output", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    for image_id, file in cut:
        assert f"{file} (image id {image_id}): cannot read image" in err
    assert "2 problem(s)" in err and "data.skip_unreadable: true" in err
    assert not out.exists() or not any(out.iterdir())  # stopped before training wrote anything


def test_skip_unreadable_trains_on_the_other_images(truncated_config, tmp_path, caplog):
    from retinanet.data.loader import build_train_dataset
    from retinanet.config import load_config

    config, paths, cut = truncated_config
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        assert main(["train", str(config), "data.skip_unreadable=true", "--output", str(out), "--no-progress"]) == 0
    warning = "\n".join(r.getMessage() for r in caplog.records if "skip_unreadable" in r.getMessage())
    assert "leaving out 2 unreadable image(s)" in warning
    for image_id, file in cut:
        assert f"{file} (image id {image_id}): cannot read image" in warning
    assert (out / "final.pt").is_file()
    dataset = build_train_dataset(load_config(str(config), ["data.skip_unreadable=true"]))
    assert len(dataset) == 4 and not {image_id for image_id, _ in cut} & set(dataset.image_ids)


def test_smoke_runs_a_model_of_another_arch(capsys):
    """`retinanet smoke --arch` builds the model of any model.arch from its shipped config (the proposal
    models at their 192 px), not only a RetinaNet."""
    assert main(["smoke", "--arch", "deepmask", "--backbone", "resnet18", "--size", "48", "64"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("DeepMask (resnet18), 1 class(es): 825,441 parameters; forward on one 48x64 image "
                              "(shorter side resized to 192 px)") and printed.rstrip().endswith(" masks")
