"""The training engine: LR schedule, exact resume, DDP == one process, NaN stop, atomic and broken checkpoints."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from retinanet.checkpoint import (checkpoint_name, latest_good_checkpoint, load_checkpoint, load_weights,
                                  make_checkpoint, save_atomic)
from retinanet.config import Config, save_config
from retinanet.engine import NonFiniteLossError, build_optimizer, get_lr, resolve_lr, train
from retinanet.modeling import RetinaNet, build_model

from conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """8 training and 4 validation images of 64 px, as PNG files plus COCO JSON."""
    from retinanet.data.synthetic import make_shapes_dataset

    return make_shapes_dataset(str(tmp_path_factory.mktemp("shapes") / "data"), num_train=8, num_val=4,
                               image_size=64, seed=0)


def train_config(shapes, *, val: bool = False, **train_overrides) -> Config:
    """A tiny model (GroupNorm: no per-process batch statistics) on the 64 px shapes, batch 4."""
    cfg = tiny_config(num_classes=4, backbone_norm="gn", head_convs=1, min_level=3, max_level=6,
                      anchor_sizes=[16.0, 32.0, 64.0, 128.0], min_size=64, max_size=64)
    d = cfg.data
    d.train_json, d.train_images = str(shapes.train_json), str(shapes.train_images)
    if val:
        d.val_json, d.val_images = str(shapes.val_json), str(shapes.val_images)
    d.batch_size, d.num_workers, d.aspect_grouping = 4, 0, False
    d.train_sizes, d.flip_prob = [48, 64], 0.5  # random scale and flip: resume must repeat them exactly
    t = cfg.train
    t.iterations, t.warmup_iters, t.lr_steps, t.base_lr = 4, 2, [3], 0.05
    t.checkpoint_every, t.log_every, t.seed, t.deterministic = 2, 1, 0, True
    t.device = "cpu"  # the comparisons below mean the same on a machine with a GPU
    for key, value in train_overrides.items():
        setattr(t, key, value)
    return cfg


def final_weights(folder: Path) -> dict:
    return load_checkpoint(str(folder / "final.pt"))["model"]


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=atol), (key, (a[key] - b[key]).abs().max())


# ----------------------------------------------------------------------------------------------
# learning rate


def test_get_lr_paper_schedule_exact_values():
    lr = dict(lr=0.01, warmup_iters=500, warmup_factor=1 / 3, steps=[60000, 80000], gamma=0.1)
    assert get_lr(0, **lr) == pytest.approx(0.01 / 3, rel=1e-12)  # warmup starts at 1/3
    assert get_lr(250, **lr) == pytest.approx(0.01 * (1 / 3 * 0.5 + 0.5), rel=1e-12)  # halfway: 2/3
    assert get_lr(500, **lr) == pytest.approx(0.01, rel=1e-12)
    assert get_lr(59999, **lr) == pytest.approx(0.01, rel=1e-12)
    assert get_lr(60000, **lr) == pytest.approx(0.001, rel=1e-12)  # sec. 4.1: / 10 at 60k
    assert get_lr(79999, **lr) == pytest.approx(0.001, rel=1e-12)
    assert get_lr(80000, **lr) == pytest.approx(0.0001, rel=1e-12)  # and at 80k
    assert get_lr(89999, **lr) == pytest.approx(0.0001, rel=1e-12)


def test_get_lr_warmup_applies_to_a_decayed_rate():
    assert get_lr(1, lr=1.0, warmup_iters=4, warmup_factor=0.0, steps=[0], gamma=0.5) == pytest.approx(0.5 * 0.25)


def test_linear_scaling_rule_unless_lr_is_given():
    cfg = Config()
    for batch, expected in ((16, 0.01), (8, 0.005), (64, 0.04), (2, 0.00125)):
        cfg.data.batch_size = batch
        assert resolve_lr(cfg) == pytest.approx(expected, rel=1e-12)
    cfg.train.lr = 0.003
    assert resolve_lr(cfg) == 0.003


# ----------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_gives_the_same_weights_as_training_straight(shapes, tmp_path, accumulate):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(train_config(shapes, accumulate=accumulate), str(straight), progress=False)
    train(train_config(shapes, accumulate=accumulate, iterations=2), str(resumed), progress=False)
    first_half = final_weights(resumed)
    assert load_checkpoint(str(resumed / checkpoint_name(2)))["data_position"]["micro_batches"] == 2 * accumulate
    train(train_config(shapes, accumulate=accumulate), str(resumed), resume="auto", progress=False)
    assert_same_weights(final_weights(straight), final_weights(resumed))
    assert not all(torch.equal(first_half[k], final_weights(resumed)[k]) for k in first_half)  # it did train on
    metrics = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in metrics] == [1, 2, 3, 4]  # no line twice


def test_auto_resume_falls_back_from_a_truncated_checkpoint(shapes, tmp_path):
    straight = tmp_path / "straight"
    train(train_config(shapes), str(straight), progress=False)
    assert sorted(p.name for p in straight.glob("checkpoint_*.pt")) == [checkpoint_name(2), checkpoint_name(4)]
    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed)
    newest = crashed / checkpoint_name(4)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (crashed / "final.pt").unlink()

    with pytest.raises(ValueError, match=f"{newest}: not a readable checkpoint"):
        load_checkpoint(str(newest))
    with pytest.warns(UserWarning, match=str(newest)):
        path, ckpt = latest_good_checkpoint(str(crashed))
    assert path.name == checkpoint_name(2) and ckpt["iteration"] == 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(train_config(shapes), str(crashed), resume="auto", progress=False)
    assert_same_weights(final_weights(straight), final_weights(crashed))


def test_resume_from_an_explicit_truncated_file_names_it(shapes, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 not a whole zip file")
    with pytest.raises(ValueError, match=f"{broken}: not a readable checkpoint"):
        train(train_config(shapes), str(tmp_path / "out"), resume=str(broken), progress=False)


@pytest.mark.parametrize("name", ["final.pt", "best.pt"])
def test_resume_from_a_weights_only_checkpoint_is_refused_pointing_to_weights(shapes, tmp_path, name):
    """final.pt and best.pt hold weights, no optimizer state, RNG or data position: resuming from one is
    refused with a one-line error naming the file and the two ways on (before: KeyError 'optimizer')."""
    run = tmp_path / "run"
    train(train_config(shapes, val=True, iterations=2, eval_every=2), str(run), progress=False)
    ckpt = run / name
    with pytest.raises(ValueError) as e:
        train(train_config(shapes, iterations=4), str(run), resume=str(ckpt), progress=False)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{ckpt}: weights only")
    assert f"--weights {ckpt}" in message and "--resume auto" in message
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == [checkpoint_name(2)]  # nothing trained or written


def test_evaluations_along_the_way_leave_training_unchanged(shapes, tmp_path):
    """A Faster R-CNN samples its anchors and RoIs from the global generator, and a DataLoader draws its base
    seed from it: evaluation restores the random state, so train.eval_every cannot change what is trained
    (before, a run evaluated every iteration trained other weights than one evaluated only at the end)."""
    from test_faster_rcnn import TWO_STAGE

    runs = {}
    for every in (0, 1):
        cfg = train_config(shapes, val=True, eval_every=every)
        for key, value in TWO_STAGE.items():
            setattr(cfg.model, key, value)
        runs[every] = tmp_path / f"every{every}"
        train(cfg, str(runs[every]), progress=False)
    records = [json.loads(line) for line in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "val" in r] == [1, 2, 3, 4]
    assert_same_weights(final_weights(runs[0]), final_weights(runs[1]))


def test_deterministic_training_restores_the_process_settings(shapes, tmp_path, monkeypatch):
    """train.deterministic turns on deterministic algorithms while training, and only then: the caller's
    settings (here off, with cuDNN benchmarking on) are back afterwards, also after a failed run."""
    import retinanet.engine as engine

    seen = []

    def recording_optimizer(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark))
        return build_optimizer(*args, **kwargs)

    monkeypatch.setattr(engine, "build_optimizer", recording_optimizer)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True
        train(train_config(shapes, iterations=1, deterministic=True), str(tmp_path / "a"), progress=False)
        assert seen == [(True, False)]
        assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == (False, True)
        with pytest.raises(ValueError, match="train.accumulate"):  # fails after the settings were made
            train(train_config(shapes, iterations=1, deterministic=True, accumulate=3), str(tmp_path / "b"),
                  progress=False)
        assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == (False, True)
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


# ----------------------------------------------------------------------------------------------
# distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process_on_the_combined_batch(shapes, tmp_path):
    cfg = train_config(shapes, iterations=3, deterministic=False)
    cfg.data.flip_prob, cfg.data.train_sizes = 0.0, []  # same-size images, no augmentation
    config_file = tmp_path / "config.yaml"
    save_config(cfg, str(config_file))
    single = tmp_path / "single"
    train(cfg, str(single), progress=False)

    ddp = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "retinanet", "train", str(config_file), "--output", str(ddp),
           "--device", "cpu", "--no-progress"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "on 2 process(es)" in result.stdout  # one line: only rank 0 prints
    assert result.stdout.count("training 3 iterations") == 1
    assert_same_weights(final_weights(single), final_weights(ddp), atol=1e-6)
    # only rank 0 wrote, and what it wrote matches: the same checkpoints and one metrics line per iteration
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    assert len((ddp / "metrics.jsonl").read_text().splitlines()) == 3
    rng = load_checkpoint(str(ddp / checkpoint_name(3)))["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # each process's own RNG state


# ----------------------------------------------------------------------------------------------
# non-finite loss


def test_nan_loss_stops_before_the_step_and_keeps_the_checkpoint(shapes, tmp_path, monkeypatch):
    calls, steps = [], []
    original_losses = RetinaNet.compute_losses

    def poisoned(self, *args, **kwargs):
        losses = original_losses(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # the third iteration (index 2)
            losses["box"] = losses["box"] * float("nan")
        return losses

    original_step = torch.optim.SGD.step

    def counted_step(self, *args, **kwargs):
        steps.append(1)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(RetinaNet, "compute_losses", poisoned)
    monkeypatch.setattr(torch.optim.SGD, "step", counted_step)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"iteration 2: non-finite loss \(cls=\d\.\d+, box=nan") as e:
        train(train_config(shapes), str(out), progress=False)
    assert "before the optimizer step" in str(e.value)
    assert len(steps) == 2  # iterations 0 and 1 stepped, iteration 2 did not
    assert sorted(p.name for p in out.glob("*.pt")) == [checkpoint_name(2)]
    ckpt = load_checkpoint(str(out / checkpoint_name(2)))
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert "nan" not in (out / "metrics.jsonl").read_text().lower()


# ----------------------------------------------------------------------------------------------
# checkpoint files


def test_a_crash_while_saving_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    old = make_checkpoint(build_model(tiny_config()), tiny_config(), [], iteration=1)
    save_atomic(old, str(path))
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the first bytes of a checkpoint")  # then the disk fills / the process dies
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        save_atomic(dict(old, iteration=2), str(path))
    assert path.read_bytes() == before
    assert load_checkpoint(str(path))["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_weights_with_another_class_count_reinitialize_the_classifier(tmp_path):
    source_cfg = tiny_config(num_classes=3)
    source = build_model(source_cfg)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)  # make every tensor differ from a fresh initialization
    path = tmp_path / "three_classes.pt"
    save_atomic(make_checkpoint(source, source_cfg, []), str(path))
    model = build_model(tiny_config(num_classes=5))
    report = load_weights(model, str(path))
    classifier = ["head.cls_subnet.predictor.bias", "head.cls_subnet.predictor.weight"]
    assert [s.split(":")[0] for s in sorted(report["skipped"])] == classifier
    assert "(27, 16, 3, 3) in" in " ".join(report["skipped"])  # 9 anchors x 3 classes in the file; 45 here
    assert report["missing"] == [] and report["unexpected"] == []
    own, src = model.state_dict(), source.state_dict()
    for key in own:
        if key in classifier:
            assert own[key].shape != src[key].shape
        else:
            assert torch.equal(own[key], src[key]), key
    prior = -math.log((1 - 0.01) / 0.01)  # sec. 4.1
    assert torch.allclose(own["head.cls_subnet.predictor.bias"], torch.full((45,), prior))


def test_optimizer_groups_and_kinds():
    cfg = tiny_config(backbone_norm="gn")
    model = build_model(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg)  # the paper: every parameter decays
    assert isinstance(optimizer, torch.optim.SGD) and len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["weight_decay"] == 1e-4
    assert len(optimizer.param_groups[0]["params"]) == len(trainable)

    cfg.train.decay_norm_bias, cfg.train.optimizer = False, "adamw"
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert no_decay["weight_decay"] == 0.0
    # conv weights decay; biases and GroupNorm weights (all the 1-D parameters here) do not
    assert all(p.dim() == 4 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)


# ----------------------------------------------------------------------------------------------
# validation


class _GroundTruthModel(torch.nn.Module):
    """Detects, on any image, exactly `boxes` (xyxy) with label 0 and score 0.9: perfect on an image
    whose ground truth they are."""

    def __init__(self, boxes):
        super().__init__()
        self.boxes = torch.tensor(boxes, dtype=torch.float32)  # (D, 4)

    def forward(self, images):
        n = len(self.boxes)
        return [{"boxes": self.boxes.clone(), "scores": torch.full((n,), 0.9), "labels": torch.zeros(n, dtype=torch.int64)}
                for _ in images]


def test_validation_left_without_unreadable_images_scores_only_the_images_evaluated(tmp_path):
    """data.skip_unreadable leaves a truncated image out of the validation set: its objects must not
    count as misses (before: AP 0.505, AR100 0.50 for perfect detections on the readable image)."""
    from PIL import Image

    from retinanet.data.loader import build_val_dataset
    from retinanet.engine import DistEnv, evaluate_model

    folder = tmp_path / "images"
    folder.mkdir()
    pixels = torch.randint(0, 256, (40, 48, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for name in ("good.png", "cut.png"):
        Image.fromarray(pixels.numpy()).save(folder / name)
    cut = folder / "cut.png"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # header intact, pixels cut
    boxes = [[4.0, 6.0, 20.0, 30.0], [24.0, 8.0, 44.0, 36.0]]  # xyxy, the same objects in both images
    gt = {"images": [{"id": 1, "file_name": "good.png", "height": 40, "width": 48},
                     {"id": 2, "file_name": "cut.png", "height": 40, "width": 48}],
          "annotations": [{"id": 10 * image_id + k, "image_id": image_id, "category_id": 7, "iscrowd": 0,
                           "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
                          for image_id in (1, 2) for k, (x1, y1, x2, y2) in enumerate(boxes)],
          "categories": [{"id": 7, "name": "thing"}]}
    (tmp_path / "val.json").write_text(json.dumps(gt))
    cfg = Config()
    cfg.data.val_json, cfg.data.val_images = str(tmp_path / "val.json"), str(folder)
    cfg.data.check_images, cfg.data.skip_unreadable = "decode", True
    dataset = build_val_dataset(cfg)
    assert dataset.image_ids == [1]
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    metrics = evaluate_model(_GroundTruthModel(boxes), dataset, env)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)
