import json
import math
from pathlib import Path

import pytest

from retinanet.ablate import aggregate, expand_sweep, format_table, run_sweep
from retinanet.config import ConfigError
from retinanet.engine import NonFiniteLossError

ROOT = Path(__file__).resolve().parent.parent

SWEEP = """
name: tiny
title: "A tiny sweep"
profiles:
  small: {base: demo, overrides: {train.iterations: 7}}
seeds: [0, 1]
metrics: [AP, AP50]
settings:
  - {name: "gamma=0", overrides: {loss.gamma: 0, loss.alpha: 0.75}}
  - {name: "gamma=2", overrides: {loss.gamma: 2.0}}
  - {name: "bad", overrides: {loss.gamma: 5.0}}
"""


@pytest.fixture
def sweep(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(SWEEP)
    return str(p)


def test_expansion_builds_every_config(sweep):
    runs = expand_sweep(sweep)
    assert [r["run_id"] for r in runs] == ["gamma=0-seed0", "gamma=0-seed1", "gamma=2-seed0", "gamma=2-seed1",
                                           "bad-seed0", "bad-seed1"]
    first = runs[0]["config"]
    assert first.loss.gamma == 0.0 and first.loss.alpha == 0.75 and first.train.seed == 0
    assert first.train.iterations == 7 and first.model.backbone == "resnet18"  # the demo base + profile override
    assert runs[3]["config"].train.seed == 1 and runs[3]["config"].loss.alpha == 0.25
    assert [r["seed"] for r in expand_sweep(sweep, seeds=[5])] == [5, 5, 5]
    assert [r["run_id"] for r in expand_sweep(sweep, seeds=[1], only=["bad", "gamma=0"])] == ["gamma=0-seed1", "bad-seed1"]
    with pytest.raises(ConfigError, match="no setting named 'gamma=3'"):
        expand_sweep(sweep, only=["gamma=3"])


def test_a_bad_key_fails_at_start_naming_the_setting(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text(SWEEP.replace("loss.gamma: 5.0", "loss.gama: 5.0"))
    with pytest.raises(ConfigError, match="setting 'bad'.*did you mean 'loss.gamma'"):
        expand_sweep(str(p))
    with pytest.raises(ConfigError, match="no profile 'paper'"):
        expand_sweep(str(tmp_path / "typo.yaml"), profile="paper")


def test_shipped_sweeps_expand():
    for name, count in [("table1a_alpha_ce", 8), ("table1b_gamma", 7), ("table1c_anchors", 7), ("table1d_ohem", 7),
                        ("table2_fl_star", 4), ("iou_table2_components", 4), ("iou_table3_eta", 6),
                        ("iou_table4_lambda", 5)]:
        for profile in ("small", "paper"):
            runs = expand_sweep(name, profile=profile)
            assert len(runs) == 3 * count, name
    schedules = expand_sweep("one_vs_two_stage_schedules")  # issue 23: Table 3 at 1x, 2x, 4x
    assert len(schedules) == 3 * 8
    for r in schedules:
        train = r["config"].train
        multiple = {"1x": 1, "2x": 2, "4x": 4, "8x": 8}[r["setting"][-2:]]
        assert train.iterations == 500 * multiple, r["run_id"]
        assert [s / train.iterations for s in train.lr_steps] == [0.8, 0.94], r["run_id"]  # the 1x fractions
        assert train.eval_every * 5 == train.iterations and train.warmup_iters == 50
        assert r["config"].model.arch == ("faster_rcnn" if "Faster" in r["setting"] else "retinanet")
        assert r["config"].loss.iou_balanced_cls is False  # the paper's plain focal loss, as one_vs_two_stage
    # issue 23 §3: the levers against the gap, each one change from the schedules sweep's 2x RetinaNet,
    # which is the levers' first setting exactly (so `--reuse` of that sweep's output skips it)
    from retinanet.config import config_to_dict

    levers = {r["setting"]: r["config"] for r in expand_sweep("one_vs_two_stage_levers", seeds=[0])}
    base = levers.pop("RetinaNet (FL) 2x")
    two_x = expand_sweep("one_vs_two_stage_schedules", seeds=[0], only=["RetinaNet (FL) 2x"])[0]["config"]
    assert config_to_dict(base) == config_to_dict(two_x)
    changed = {name: {f"{section}.{k}" for section in ("model", "loss", "train")
                      for k, v in config_to_dict(cfg)[section].items() if config_to_dict(base)[section][k] != v}
               for name, cfg in levers.items()}
    assert changed == {"IoU-b loc": {"loss.iou_balanced_loc"},
                       "IoU-b cls+loc": {"loss.iou_balanced_cls", "loss.iou_balanced_loc"},
                       "GIoU": {"loss.box"}, "4 head convs": {"model.head_convs"},
                       "P2-P6": {"model.min_level", "model.anchor_sizes"},
                       "all levers": {"loss.iou_balanced_cls", "loss.iou_balanced_loc", "loss.box", "model.head_convs",
                                      "model.min_level", "model.anchor_sizes"}}
    assert levers["P2-P6"].model.anchor_sizes == expand_sweep("one_vs_two_stage", seeds=[0])[1]["config"].model.anchor_sizes
    anchors = {r["setting"]: r["config"] for r in expand_sweep("table1c_anchors")}
    assert len(anchors["1 scale(s), 1 ratio(s)"].model.anchor_scales) == 1
    assert anchors["4 scale(s), 3 ratio(s)"].model.anchor_scales[1] == pytest.approx(2 ** 0.25)


def test_runs_resume_record_failures_and_divergence(sweep, tmp_path):
    calls = []

    def fake_train(cfg, run_dir):
        calls.append((cfg.loss.gamma, cfg.train.seed))
        if cfg.loss.gamma == 5.0 and cfg.train.seed == 0:
            raise NonFiniteLossError("iteration 3: cls nan, box 0.1")
        if cfg.loss.gamma == 5.0:
            raise RuntimeError("out of memory")
        return {"AP": 0.1 * (1 + cfg.loss.gamma) + 0.01 * cfg.train.seed, "AP50": 0.5, "per_category": {"a": 1}}

    out = tmp_path / "out"
    result = run_sweep(sweep, str(out), train_fn=fake_train, log=lambda *a: None)
    assert len(calls) == 6
    status = {r["run_id"]: r["status"] for r in result["runs"]}
    assert status == {"gamma=0-seed0": "ok", "gamma=0-seed1": "ok", "gamma=2-seed0": "ok", "gamma=2-seed1": "ok",
                      "bad-seed0": "diverged", "bad-seed1": "failed"}
    assert "iteration 3" in json.loads((out / "runs" / "bad-seed0" / "result.json").read_text())["error"]
    # restart: finished and diverged runs are skipped, the failed one is tried again
    calls.clear()
    run_sweep(sweep, str(out), train_fn=fake_train, log=lambda *a: None)
    assert calls == [(5.0, 1)]
    md = (out / "results.md").read_text()
    # AP 0.30, 0.31: mean 30.5, std 0.707; paired with gamma=0 (0.10, 0.11): +20.0 twice
    assert "| gamma=2 | 30.5 ± 0.7 | 50.0 ± 0.0 | +20.0 ± 0.0 | 2/2 ok |" in md
    assert "| gamma=0 | 10.5 ± 0.7 | 50.0 ± 0.0 | (base) | 2/2 ok |" in md
    assert "| bad | — | — | — | 0/2 ok, 1 diverged, 1 failed |" in md
    assert "bad-seed1: failed: RuntimeError: out of memory" in md
    assert "Profile `small`." in md
    run_sweep(sweep, str(out), train_fn=fake_train, extra_overrides=["train.lr=0.01"], log=lambda *a: None)
    assert "Profile `small`, with `train.lr=0.01`." in (out / "results.md").read_text()


def test_identical_configs_are_reused_from_other_sweeps(sweep, tmp_path):
    calls = []

    def fake_train(cfg, run_dir):
        calls.append((cfg.loss.gamma, cfg.train.seed))
        return {"AP": 0.1 * cfg.loss.gamma + 0.01 * cfg.train.seed}

    first = tmp_path / "first"
    run_sweep(sweep, str(first), train_fn=fake_train, log=lambda *a: None)
    calls.clear()
    other = tmp_path / "other.yaml"  # one setting equal to "gamma=2" under another name, one new
    other.write_text(SWEEP.replace('name: "gamma=2"', 'name: "FL"').replace("loss.gamma: 5.0", "loss.gamma: 1.0"))
    result = run_sweep(str(other), str(tmp_path / "second"), train_fn=fake_train, reuse=[str(first)], log=lambda *a: None)
    assert calls == [(1.0, 0), (1.0, 1)]  # "gamma=0" and "FL" were copied, only gamma=1 trained
    fl = [r for r in result["runs"] if r["setting"] == "FL"]
    assert [r["metrics"]["AP"] for r in fl] == [pytest.approx(0.2), pytest.approx(0.21)]
    assert fl[0]["reused_from"].endswith("gamma=2-seed0/result.json")
    # a different seed list is a different config: nothing to copy
    calls.clear()
    run_sweep(sweep, str(tmp_path / "third"), train_fn=fake_train, seeds=[7], reuse=[str(first)], log=lambda *a: None)
    assert len(calls) == 3
    # a run recorded before a config key existed (its result.json without it) is still the same config: the key's
    # default is what it meant; a changed value of a recorded key is not
    for path in (first / "runs").glob("*/result.json"):
        record = json.loads(path.read_text())
        del record["config"]["model"]["segprop_fpn_labels"]
        if "gamma=0" in path.parent.name:
            record["config"]["train"]["lr"] *= 2
        path.write_text(json.dumps(record))
    calls.clear()
    run_sweep(sweep, str(tmp_path / "fourth"), train_fn=fake_train, reuse=[str(first)], log=lambda *a: None)
    assert sorted(calls) == [(0.0, 0), (0.0, 1)]


def test_aggregate_by_hand():
    recs = [{"setting": "a", "status": "ok", "metrics": {"AP": 0.2}}, {"setting": "a", "status": "ok", "metrics": {"AP": 0.4}},
            {"setting": "b", "status": "ok", "metrics": {"AP": 0.3}}, {"setting": "b", "status": None}]
    recs[0]["seed"], recs[1]["seed"], recs[2]["seed"], recs[3]["seed"] = 0, 1, 1, 0
    rows = aggregate(recs, ["a", "b"], ["AP"])
    assert rows[0]["mean"]["AP"] == pytest.approx(0.3) and rows[0]["std"]["AP"] == pytest.approx(math.sqrt(0.02))
    assert rows[1]["std"]["AP"] == 0.0 and rows[1]["pending"] == 1
    assert rows[1]["paired"] == {"metric": "AP", "mean": pytest.approx(-0.1), "std": 0.0, "seeds": 1}  # 0.3 - 0.4, seed 1
    assert format_table(rows, ["AP"]).splitlines()[3] == "| b | 30.0 | -10.0 | 1/2 ok, 1 pending |"
    recs += [{"setting": "c", "seed": 0, "status": "ok", "metrics": {"AP": 0.5}},
             {"setting": "c", "seed": 1, "status": "ok", "metrics": {"AP": 0.5}}]
    c = aggregate(recs, ["a", "b", "c"], ["AP"])[2]["paired"]  # differences 0.3 and 0.1
    assert c["mean"] == pytest.approx(0.2) and c["std"] == pytest.approx(math.sqrt(0.02)) and c["seeds"] == 2


def test_end_to_end_with_the_engine(tmp_path):
    from retinanet.commands.ablate import shapes_preparer

    p = tmp_path / "e2e.yaml"
    p.write_text("""
name: e2e
profiles:
  small:
    base: demo
    overrides: {train.iterations: 2, train.warmup_iters: 1, train.lr_steps: [], train.amp: none, train.eval_every: 0,
                data.batch_size: 2, model.backbone_width: 8, model.fpn_channels: 16, model.head_channels: 16}
seeds: [0]
settings:
  - {name: "FL", overrides: {}}
  - {name: "FL*", overrides: {loss.cls: fl_star}}
""")
    lines = []
    out = tmp_path / "out"
    result = run_sweep(str(p), str(out), prepare=shapes_preparer(str(tmp_path / "shapes"), 8, 4, 64), log=lines.append,
                       extra_overrides=[])
    for row in result["settings"]:
        assert row["ok"] == 1 and 0.0 <= row["mean"]["AP"] <= 1.0
    assert (out / "runs" / "FL-seed0" / "config.yaml").is_file()
    lines.clear()
    run_sweep(str(p), str(out), log=lines.append)
    assert len(lines) == 2 and all("skipped" in line for line in lines)


def test_a_setting_may_carry_its_own_base_per_profile():
    runs = expand_sweep("one_vs_two_stage", seeds=[0])
    first, second = (r["config"] for r in runs)
    assert (first.model.arch, first.model.min_level, first.model.anchor_sizes) == ("retinanet", 3, [16, 32, 64, 128])
    assert (second.model.arch, second.model.min_level, second.model.p6_from) == ("faster_rcnn", 2, "pool")
    for cfg in (first, second):  # the profile's overrides apply to both bases; the schedule is the same
        assert cfg.train.eval_every == 0 and cfg.loss.iou_balanced_cls is False
        assert (cfg.model.backbone, cfg.model.backbone_width, cfg.model.min_size) == ("resnet18", 16, 192)
        assert (cfg.train.iterations, cfg.train.lr, cfg.train.lr_steps) == (500, 0.002, [400, 470])
    paper = [r["config"] for r in expand_sweep("one_vs_two_stage", profile="paper", seeds=[0])]
    assert [c.model.arch for c in paper] == ["retinanet", "faster_rcnn"]
    assert paper[1].train.base_lr == 0.02 and paper[1].train.lr_steps == [60000]  # thesis sec. 4.5.2


def test_tables_show_ap_in_points_and_times_as_they_are():
    rows = aggregate([{"setting": "a", "seed": 0, "status": "ok", "metrics": {"AP": 0.5, "ms_per_image": 12.5}}],
                     ["a"], ["AP", "ms_per_image"])
    table = format_table(rows, ["AP", "ms_per_image"])
    assert "| a | 50.0 | 12.5 |" in table
    metrics = {"AR@100": 0.5, "AUC": 0.25, "box_AR@1000": 0.75, "ms_per_image": 12.5}
    rows = aggregate([{"setting": "a", "seed": 0, "status": "ok", "metrics": metrics}], ["a"], list(metrics))
    assert "| a | 50.0 | 25.0 | 75.0 | 12.5 |" in format_table(rows, list(metrics))  # proposal recall too


def test_a_setting_may_start_from_an_earlier_settings_run(tmp_path):
    path = tmp_path / "stages.yaml"
    path.write_text("""
name: stages
profiles:
  small: {base: demo, overrides: {}}
seeds: [0, 1]
settings:
  - {name: first}
  - {name: second, init_from: first}
""")
    runs = expand_sweep(str(path))
    assert [r.get("init_from") for r in runs] == [None, None, "first-seed0", "first-seed1"]
    calls = []

    def fake_train(cfg, run_dir, weights=None):
        calls.append((run_dir.rsplit("/", 1)[-1], weights))
        if "first" in run_dir and cfg.train.seed == 0:
            (tmp_path / "out" / "runs" / "first-seed0" / "final.pt").write_bytes(b"weights")
        return {"AP": 0.5}

    result = run_sweep(str(path), str(tmp_path / "out"), train_fn=fake_train, log=lambda *a: None)
    assert calls == [("first-seed0", None), ("first-seed1", None),
                     ("second-seed0", str(tmp_path / "out" / "runs" / "first-seed0" / "final.pt"))]
    failed = json.loads((tmp_path / "out" / "runs" / "second-seed1" / "result.json").read_text())
    assert failed["status"] == "failed" and "first-seed1, which this run starts from" in failed["error"]
    assert result is not None
    path.write_text(path.read_text().replace("init_from: first", "init_from: third"))
    with pytest.raises(ConfigError, match="starts from 'third', which is not a setting before it"):
        expand_sweep(str(path))


def test_schedule_curves_reads_each_evaluation_with_its_training_seconds(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("schedule_curves", ROOT / "tools" / "schedule_curves.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    metrics = tmp_path / "metrics.jsonl"
    records = [{"iteration": 10, "loss": 1.0, "time_s": 5.0},
               {"iteration": 20, "val": {"AP": 0.25, "AP50": 0.5}, "time_s": 30.0, "train_s": 10.0},
               {"iteration": 30, "loss": 0.5, "time_s": 35.0},
               {"iteration": 40, "val": {"AP": 0.5, "AP50": None}, "time_s": 60.0, "train_s": 20.0}]
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert tool.run_curve(metrics) == [(20, 10.0, 0.25), (40, 20.0, 0.5)]
    assert tool.run_curve(metrics, "AP50") == [(20, 10.0, 0.5)]  # a None value is no point
    assert tool.split_setting("RetinaNet (FL) 2x") == ("RetinaNet (FL)", "2x")
    assert tool.split_setting("FPN Faster R-CNN") == ("FPN Faster R-CNN", "1x")
    # the mean over seeds at the iterations every seed evaluated, lowest and highest; seconds from one seed
    runs = [("R", "1x", 0, [(100, 10.0, 0.2), (200, 20.0, 0.4)]),
            ("R", "1x", 1, [(100, 30.0, 0.4), (200, 40.0, 0.5), (300, 50.0, 0.9)]),
            ("F", "2x", 0, [(200, 5.0, 0.7)])]
    assert tool.mean_curves(runs) == [("R", "1x", [0, 1], [(100, 20.0, pytest.approx(0.3), 0.2, 0.4),
                                                            (200, 30.0, pytest.approx(0.45), 0.4, 0.5)]),
                                      ("F", "2x", [0], [(200, 5.0, 0.7, 0.7, 0.7)])]
    assert [r[1] for r in tool.mean_curves(runs, seconds_seed=0)[0][3]] == [10.0, 20.0]


DENSE_SWEEP = """
name: dense
profiles:
  small:
    base: demo
    dataset: {variant: dense, num_train: 2, num_val: 1}
    overrides: {train.iterations: 3, model.min_size: 384, model.max_size: 384}
seeds: [0]
settings:
  - {name: "FL", overrides: {}}
  - name: mine
    overrides: {data.train_json: a.json, data.train_images: a, data.val_json: b.json, data.val_images: b}
"""


def test_a_profile_names_its_generated_dataset_and_the_preparer_makes_it(tmp_path):
    from dataclasses import asdict

    from retinanet.commands.ablate import shapes_preparer
    from retinanet.data.synthetic import DENSE

    p = tmp_path / "dense.yaml"
    p.write_text(DENSE_SWEEP)
    spec = {"variant": "dense", "num_train": 2, "num_val": 1, "image_size": 384, "seed": 0}
    assert [r["dataset"] for r in expand_sweep(str(p))] == [spec, spec]
    assert all("dataset" not in r for r in expand_sweep("one_vs_two_stage", seeds=[0]))  # none named: as before
    make = shapes_preparer(str(tmp_path / "shapes"))
    calls, trained = [], {}

    def prepare(cfg, *dataset):
        calls.append(dataset)
        make(cfg, *dataset)

    def train_fn(cfg, run_dir):
        trained[Path(run_dir).name] = (cfg.data.train_json, cfg.data.val_images)
        return {"AP": 0.5}

    run_sweep(str(p), str(tmp_path / "out"), prepare=prepare, train_fn=train_fn, log=lambda line: None)
    assert calls == [(spec,), (spec,)]
    shapes = tmp_path / "shapes"
    assert trained == {"FL-seed0": (str(shapes / "train.json"), str(shapes / "val")), "mine-seed0": ("a.json", "b")}
    manifest = json.loads((shapes / "manifest.json").read_text())["parameters"]
    assert manifest == {"version": 2, "num_train": 2, "num_val": 1, "image_size": 384, "seed": 0,
                        "shapes": asdict(DENSE)}
    assert len(json.loads((shapes / "train.json").read_text())["images"]) == 2


@pytest.mark.parametrize("dataset, message", [
    ("{variant: sparse}", "unknown variant 'sparse' \\(variants: demo, dense\\)"),
    ("{variant: dense, num_trian: 5}", "unknown key\\(s\\) num_trian"),
    ("{variant: dense, num_train: -1}", "num_train must be an integer >= 1, got -1"),
    ("{variant: dense, image_size: 16}", "bad shapes parameters for 16 px images"),
    ("dense", "dataset must be a mapping"),
])
def test_a_bad_dataset_spec_is_a_one_line_error_naming_the_sweep(tmp_path, dataset, message):
    p = tmp_path / "bad.yaml"
    p.write_text(DENSE_SWEEP.replace("{variant: dense, num_train: 2, num_val: 1}", dataset))
    with pytest.raises(ConfigError, match=message) as e:
        expand_sweep(str(p))
    assert str(e.value).startswith(f"{p}: profile 'small': ") and "\n" not in str(e.value)


def test_the_dense_sweep_expands_with_anchors_sized_to_its_objects():
    runs = expand_sweep("one_vs_two_stage_dense")  # issue 23 sec. 2: Table 3 on the dense shapes
    assert len(runs) == 3 * 4
    for r in runs:
        cfg, retina = r["config"], "RetinaNet" in r["setting"]
        assert r["dataset"] == {"variant": "dense", "num_train": 2000, "num_val": 250, "image_size": 384, "seed": 0}
        assert (cfg.model.min_size, cfg.model.max_size, cfg.data.batch_size) == (384, 384, 8)
        train = cfg.train
        assert train.iterations == {"1x": 500, "2x": 1000}[r["setting"][-2:]], r["run_id"]
        assert [s / train.iterations for s in train.lr_steps] == [0.8, 0.94]
        assert train.eval_every * 5 == train.iterations
        assert cfg.loss.iou_balanced_cls is False and cfg.model.detections_per_image >= 60  # up to 60 objects
        assert cfg.model.arch == ("retinanet" if retina else "faster_rcnn")
        if retina:  # P2-P5 from 8 px: the 8 px objects need the stride-4 grid (sweep header: 99.1% covered)
            assert (cfg.model.min_level, cfg.model.max_level, cfg.model.anchor_sizes) == (2, 5, [8, 16, 32, 64])
            assert len(cfg.model.anchor_scales) == 3 and len(cfg.model.anchor_ratios) == 3
        else:  # P2-P6, 3 scales below each level's size: 10-16 px anchors on P2 (RPN coverage 27% -> 55%)
            assert (cfg.model.min_level, cfg.model.max_level) == (2, 6)
            assert min(cfg.model.anchor_sizes) * min(cfg.model.anchor_scales) == pytest.approx(10.08)
            assert len(cfg.model.anchor_scales) == 3 and len(cfg.model.anchor_ratios) == 3
            assert cfg.model.rpn_post_nms_top_n[1] >= 5 * 60  # proposals: several per object at 60 objects
