import math

import pytest
import torch
from PIL import Image

from retinanet.analysis import focal_curve, loss_of_xt, plot_loss_curves


def test_figure1_fl_at_pt_09_is_100x_below_ce():
    # sec. 3.2: with gamma = 2, p_t = 0.9 gives 100x lower loss than CE, p_t ~ 0.968 about 1000x
    p = torch.tensor([0.9, 0.968], dtype=torch.float64)
    ratio = focal_curve(p, 0.0) / focal_curve(p, 2.0)
    assert ratio[0].item() == pytest.approx(100.0, rel=1e-9)
    assert ratio[1].item() == pytest.approx(1 / 0.032 ** 2, rel=1e-9)  # 976.6, "~1000x"
    assert focal_curve(torch.tensor([0.5]), 0.0).item() == pytest.approx(math.log(2))


def test_figure4_derivatives_are_eqs_9_to_11():
    x_t = torch.tensor([-3.0, 0.0, 2.0], dtype=torch.float64)
    p_t = torch.sigmoid(x_t)
    _, d_ce = loss_of_xt(x_t, "ce")
    assert torch.allclose(d_ce, p_t - 1)  # eq. 9 with y = 1
    _, d_fl = loss_of_xt(x_t, "focal", gamma=2.0)
    assert torch.allclose(d_fl, (1 - p_t) ** 2 * (2 * p_t * torch.log(p_t) + p_t - 1))  # eq. 10
    _, d_fls = loss_of_xt(x_t, "fl_star", gamma=4.0, beta=0.0)
    assert torch.allclose(d_fls, torch.sigmoid(4 * x_t) - 1)  # eq. 11: p*_t - 1
    with pytest.raises(ValueError):
        loss_of_xt(x_t, "hinge")


def test_plot_files(tmp_path):
    paths = plot_loss_curves(str(tmp_path / "figs"))
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["figure1_ce_vs_fl.png", "figure3_4_losses_and_derivatives.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] >= 400


def test_normalized_loss_cdf_by_hand():
    from retinanet.analysis import normalized_loss_cdf

    x, y = normalized_loss_cdf(torch.tensor([1.0, 3.0, 0.0, 4.0]))
    assert x.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert y.tolist() == [0.0, 0.125, 0.5, 1.0]  # sorted 0, 1, 3, 4 over a total of 8


def test_larger_gamma_concentrates_negative_loss_on_hard_examples():
    from retinanet.analysis import loss_cdfs

    neg = torch.linspace(-8, 1, 1000)[:, None]  # mostly easy negatives, a few hard ones
    cdfs = loss_cdfs(torch.zeros(1, 1), torch.ones(1, 1), neg, gammas=(0.0, 2.0))
    share = {g: 1 - c["negative"][1][799].item() for g, c in cdfs.items()}  # loss in the hardest 20%
    assert share[2.0] > 0.95 > 0.8 > share[0.0]  # 0.97 vs 0.78 here


def test_score_by_iou_and_share_above_by_hand():
    from retinanet.analysis import mean_score_by_iou, share_above

    scores = torch.tensor([0.9, 0.7, 0.5, 0.2, 0.4])
    ious = torch.tensor([0.97, 1.0, 0.52, 0.1, 0.56])
    rows = {round(lo, 2): (m, c) for lo, hi, m, c in mean_score_by_iou(scores, ious)}
    assert rows[0.95] == (pytest.approx(0.8), 2)  # 0.97 and 1.0 (the last bin includes 1.0)
    assert rows[0.5] == (pytest.approx(0.5), 1) and rows[0.55] == (pytest.approx(0.4), 1) and rows[0.6] == (None, 0)
    assert share_above(ious, (0.5, 0.9)) == [(0.5, 0.8), (0.9, 0.4)]


def test_detection_ious_match_class_and_skip_crowd():
    from retinanet.analysis import detection_ious

    class FakeModel:
        def eval(self):
            return self

        def __call__(self, images):
            return [{"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]]),
                     "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([0, 1, 0])}]

    target = {"boxes": torch.tensor([[0.0, 0, 10, 5], [50, 50, 60, 60]]), "labels": torch.tensor([0, 0]),
              "iscrowd": torch.tensor([False, True])}
    scores, ious = detection_ious(FakeModel(), [(torch.zeros(3, 64, 64), target)])
    # det 0: class 0 vs gt 0: IoU 0.5; det 1: class 1, no gt of its class: 0; det 2: only a crowd box: 0
    assert ious.tolist() == [0.5, 0.0, 0.0] and scores.tolist() == pytest.approx([0.9, 0.8, 0.7])


def test_analyze_cli_on_a_tiny_checkpoint(tmp_path):
    import json

    from conftest import tiny_config
    from retinanet.checkpoint import make_checkpoint, save_atomic
    from retinanet.cli import main
    from retinanet.data.synthetic import make_shapes_dataset
    from retinanet.modeling import build_model

    paths = make_shapes_dataset(str(tmp_path / "shapes"), num_train=2, num_val=3, image_size=64, seed=0)
    cfg = tiny_config(num_classes=4)
    model = build_model(cfg)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate("abcd")]
    save_atomic(make_checkpoint(model, cfg, cats), str(tmp_path / "m.pt"))
    common = ["--checkpoint", str(tmp_path / "m.pt"), "--json", str(paths.val_json), "--images", str(paths.val_images)]
    assert main(["analyze", "loss-cdf", "--output", str(tmp_path / "a"), *common]) == 0
    data = json.loads((tmp_path / "a" / "figure6_loss_cdf.json").read_text())
    shares = data["hardest_20_percent_share_of_loss"]
    assert set(shares) == {"0", "0.5", "1", "2"} and all(0 < v["negative"] <= 1 for v in shares.values())
    second = ["--checkpoint", str(tmp_path / "m.pt"), "--label", "a", "--label", "b"]
    assert main(["analyze", "iou", "--output", str(tmp_path / "b"), *common, *second]) == 0
    iou = json.loads((tmp_path / "b" / "iou_figures.json").read_text())
    assert [m["label"] for m in iou["models"]] == ["a", "b"]
    first = iou["models"][0]
    assert len(first["mean_score_by_iou"]) == 10 and set(first["share_at_or_above_iou"]) == {"0.5", "0.6", "0.7", "0.8", "0.9"}
    assert first["detections"] == sum(r["count"] for r in first["mean_score_by_iou"])  # every detection in one bin
    assert iou["models"][1]["mean_score_by_iou"] == first["mean_score_by_iou"]  # same checkpoint, same figures
    assert main(["analyze", "iou", "--output", str(tmp_path / "d"), *common, "--label", "x", "--label", "y"]) == 1
    for png in (tmp_path / "a" / "figure6_loss_cdf.png", tmp_path / "b" / "iou_figures.png"):
        with Image.open(png) as im:
            assert im.format == "PNG"
    assert main(["analyze", "iou", "--output", str(tmp_path / "c")]) == 1  # needs --checkpoint, --json, --images
