"""The loss options of LossConfig inside the model: each against its equation on hand-made anchors,
selection from the config and the command line, and a few training steps of a tiny model each."""

import io
import math

import pytest
import torch

from retinanet.ops.boxes import decode, encode, paired_iou
from retinanet.config import ConfigError, load_config
from retinanet.losses import sigmoid_focal_loss, smooth_l1_loss
from retinanet.ops.matcher import BACKGROUND, FOREGROUND, IGNORE
from retinanet.modeling import RetinaNetHead, build_model
from retinanet.ops.postprocess import postprocess

from conftest import tiny_config, train_steps
from test_model import _rect_image
from detection_match import assert_same_detections


# ---------------------------------------------------------------------------------------------- hand-made anchors

# One ground-truth box [0, 0, 10, 10] of class 1 and six anchors. IoU with it: 1, 81/119, 1/2 (fg),
# 50/150 (bg), 100/220 (ignored: between 0.4 and 0.5), 0 (bg).
ANCHORS = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 20],
                        [5, 0, 15, 10], [0, 0, 10, 22], [30, 30, 40, 40]])
LABELS = [FOREGROUND, FOREGROUND, FOREGROUND, BACKGROUND, IGNORE, BACKGROUND]
FG = [0, 1, 2]
TARGETS = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}]
# box deltas: anchor 0 off by less than beta = 0.11 in dx, more in dw; the others off by more
DELTAS = torch.tensor([[[0.05, -0.3, 0.2, 0.0], [-0.02, -0.05, 0.04, -0.07], [0.1, 0.6, -0.5, -0.9],
                        [0.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0]]])  # (1, 6, 4)


def _model(num_classes: int = 3, **loss):
    cfg = tiny_config(num_classes=num_classes)
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    return build_model(cfg)


def _inputs(num_logits: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cls_logits = (torch.randn(1, 6, num_logits, generator=g) * 2).requires_grad_()
    box_deltas = DELTAS.clone().requires_grad_()
    return cls_logits, box_deltas


def _regressed_iou() -> torch.Tensor:
    """IoU of the foreground anchors' regressed boxes with the ground-truth box, (3,)."""
    boxes = decode(ANCHORS[FG], DELTAS[0, FG])
    return paired_iou(boxes, TARGETS[0]["boxes"].expand(3, 4))


def test_hand_made_anchors_are_labelled_as_described():
    model = _model()
    labels, _, classes = model.assign_targets(ANCHORS, TARGETS)
    assert labels[0].tolist() == LABELS
    assert classes[0, FG].tolist() == [1, 1, 1]


def test_focal_ce_and_fl_star_in_the_model_are_their_formulas():
    """cls = sum over non-ignored anchors and classes / number of foreground anchors (3)."""
    cls_logits, box_deltas = _inputs()
    y = torch.zeros(6, 3)
    y[FG, 1] = 1.0
    valid = torch.tensor([lab != IGNORE for lab in LABELS])
    x = cls_logits.detach()[0]
    for loss_cfg, per_element in [
        ({"cls": "focal", "alpha": 0.25, "gamma": 2.0}, sigmoid_focal_loss(x, y, 0.25, 2.0)),
        ({"cls": "ce", "alpha": 0.75}, sigmoid_focal_loss(x, y, 0.75, 0.0)),
        ({"cls": "ce", "alpha": -1.0}, torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none")),
        ({"cls": "fl_star", "gamma": 4.0, "beta": 0.0}, -torch.nn.functional.logsigmoid(4 * x * (2 * y - 1)) / 4),
    ]:
        losses = _model(**loss_cfg).compute_losses(cls_logits, box_deltas, ANCHORS, TARGETS)
        assert losses["cls"].item() == pytest.approx(per_element[valid].sum().item() / 3, rel=1e-5), loss_cfg


def test_box_losses_in_the_model_are_their_formulas():
    cls_logits, box_deltas = _inputs()
    gt = TARGETS[0]["boxes"].expand(3, 4)
    d = DELTAS[0, FG] - encode(ANCHORS[FG], gt)
    for beta in (0.11, 0.0):  # smooth L1, and L1
        losses = _model(smooth_l1_beta=beta).compute_losses(cls_logits, box_deltas, ANCHORS, TARGETS)
        expected = torch.where(d.abs() < beta, 0.5 * d ** 2 / max(beta, 1e-12), d.abs() - 0.5 * beta).sum() / 3
        assert losses["box"].item() == pytest.approx(expected.item(), rel=1e-5)
    from retinanet.ops.boxes import paired_giou

    giou = _model(box="giou").compute_losses(cls_logits, box_deltas, ANCHORS, TARGETS)["box"]
    assert giou.item() == pytest.approx((1 - paired_giou(decode(ANCHORS[FG], DELTAS[0, FG]), gt)).sum().item() / 3, rel=1e-5)


# ---------------------------------------------------------------------------------------------- IoU-balanced cls

@pytest.mark.parametrize("cls", ["focal", "ce", "fl_star", "softmax_focal"])
def test_iou_balanced_classification_reweights_gradients_and_keeps_the_sum(cls):
    eta = 1.5
    num_logits = 4 if cls == "softmax_focal" else 3
    plain_model = _model(cls=cls)
    balanced_model = _model(cls=cls, iou_balanced_cls=True, eta=eta)
    cls_logits, box_deltas = _inputs(num_logits)
    plain = plain_model.compute_losses(cls_logits, box_deltas, ANCHORS, TARGETS)
    (plain_grad,) = torch.autograd.grad(plain["cls"], cls_logits)
    balanced = balanced_model.compute_losses(cls_logits, box_deltas, ANCHORS, TARGETS)
    balanced_grad, box_grad = torch.autograd.grad(balanced["cls"], [cls_logits, box_deltas], allow_unused=True)
    # eq. (2): the positives' (ground-truth-class) loss sum is unchanged, so is the whole loss
    assert balanced["cls"].item() == pytest.approx(plain["cls"].item(), rel=1e-5)
    # the weight is iou^eta * sum(L_gt) / sum(iou^eta L_gt), from the regressed boxes
    x = cls_logits.detach()[0]
    if cls == "softmax_focal":
        terms = torch.stack([-(torch.log_softmax(x[i], 0)[1]) * 0.25 * (1 - torch.softmax(x[i], 0)[1]) ** 2 for i in FG])
    elif cls == "fl_star":
        terms = -torch.nn.functional.logsigmoid(2.0 * x[FG, 1] + 1.0) / 2.0
    else:
        terms = sigmoid_focal_loss(x[FG, 1], torch.ones(3), 0.25, 0.0 if cls == "ce" else 2.0)
    iou = _regressed_iou()
    w = iou ** eta * terms.sum() / (iou ** eta * terms).sum()
    assert not torch.allclose(w, torch.ones(3), atol=0.05)  # the example does reweight
    # detached weights: per positive anchor, the weighted gradient is w times the plain one on the
    # ground-truth class; every other logit's gradient is unchanged; no gradient reaches the box deltas
    expected = plain_grad.clone()
    if cls == "softmax_focal":
        expected[0, FG] = plain_grad[0, FG] * w[:, None]  # the anchor's whole softmax loss is its gt term
    else:
        expected[0, FG, 1] = plain_grad[0, FG, 1] * w
    assert torch.allclose(balanced_grad, expected, rtol=1e-5, atol=1e-7)
    assert box_grad is None or torch.all(box_grad == 0)


def test_iou_balanced_classification_falls_back_to_one_when_every_iou_is_zero():
    far = torch.zeros(1, 6, 4)
    far[0, FG, 0] = 5.0  # every foreground box regressed 5 widths away: IoU 0
    cls_logits, _ = _inputs()
    plain = _model().compute_losses(cls_logits, far, ANCHORS, TARGETS)["cls"]
    (plain_grad,) = torch.autograd.grad(plain, cls_logits)
    balanced = _model(iou_balanced_cls=True).compute_losses(cls_logits, far, ANCHORS, TARGETS)["cls"]
    (balanced_grad,) = torch.autograd.grad(balanced, cls_logits)
    assert torch.allclose(balanced_grad, plain_grad)


# ---------------------------------------------------------------------------------------------- IoU-balanced loc

def test_iou_balanced_localization_gradient_matches_eq_6():
    lam, w_loc, beta = 1.5, 2.5, 0.11
    model = _model(iou_balanced_loc=True, loc_lambda=lam, w_loc=str(w_loc), smooth_l1_beta=beta)
    cls_logits, box_deltas = _inputs()
    box = model.compute_losses(cls_logits, box_deltas, ANCHORS, TARGETS)["box"]
    box.backward()
    d = DELTAS[0, FG] - encode(ANCHORS[FG], TARGETS[0]["boxes"].expand(3, 4))  # (3, 4)
    assert (d.abs() <= beta).any() and (d.abs() > beta).any()  # both branches of eq. (6)
    w = w_loc * _regressed_iou() ** lam  # eq. (4)
    # eq. (6): w d / delta where |d| <= delta, else w sign(d); / 3 foreground anchors
    expected = w[:, None] * torch.where(d.abs() <= beta, d / beta, torch.sign(d)) / 3
    assert torch.allclose(box_deltas.grad[0, FG], expected, rtol=1e-5, atol=1e-7)
    assert torch.all(box_deltas.grad[0, [3, 4, 5]] == 0)
    unweighted = smooth_l1_loss(DELTAS[0, FG], DELTAS[0, FG] - d, beta).sum(dim=1)
    assert box.item() == pytest.approx((w * unweighted).sum().item() / 3, rel=1e-5)


def test_eq_5_variant_keeps_the_localization_sum_and_reweights_gradients():
    cls_logits, box_deltas = _inputs()
    plain = _model().compute_losses(cls_logits, box_deltas, ANCHORS, TARGETS)["box"]
    (plain_grad,) = torch.autograd.grad(plain, box_deltas)
    normalized = _model(iou_balanced_loc=True, loc_normalize=True, loc_lambda=1.0)
    box = normalized.compute_losses(cls_logits, box_deltas, ANCHORS, TARGETS)["box"]
    (grad,) = torch.autograd.grad(box, box_deltas)
    assert box.item() == pytest.approx(plain.item(), rel=1e-5)
    d = DELTAS[0, FG] - encode(ANCHORS[FG], TARGETS[0]["boxes"].expand(3, 4))
    per_anchor = smooth_l1_loss(d, torch.zeros_like(d), 0.11).sum(dim=1)
    iou = _regressed_iou()
    w = iou * per_anchor.sum() / (iou * per_anchor).sum()  # eq. (5), lambda = 1
    assert torch.allclose(grad[0, FG], plain_grad[0, FG] * w[:, None], rtol=1e-5, atol=1e-7)


def test_w_loc_auto_is_measured_once_then_fixed_and_checkpointed():
    lam = 1.5
    model = _model(iou_balanced_loc=True, loc_lambda=lam, w_loc="auto")
    assert torch.isnan(model.w_loc)
    cls_logits, box_deltas = _inputs()
    plain = _model().compute_losses(cls_logits, box_deltas, ANCHORS, TARGETS)["box"]
    first = model.compute_losses(cls_logits, box_deltas, ANCHORS, TARGETS)["box"]
    # measured so that the first step's localization loss sum is unchanged
    assert first.item() == pytest.approx(plain.item(), rel=1e-5)
    d = DELTAS[0, FG] - encode(ANCHORS[FG], TARGETS[0]["boxes"].expand(3, 4))
    per_anchor = smooth_l1_loss(d, torch.zeros_like(d), 0.11).sum(dim=1)
    iou = _regressed_iou()
    measured = (per_anchor.sum() / (iou ** lam * per_anchor).sum()).item()
    assert model.w_loc.item() == pytest.approx(measured, rel=1e-5)
    # a later step with other deltas keeps it: loss = w_loc * sum(iou^lambda L) / 3
    later = DELTAS.clone()
    later[0, FG] *= 0.5
    box = model.compute_losses(cls_logits, later, ANCHORS, TARGETS)["box"]
    assert model.w_loc.item() == pytest.approx(measured, rel=1e-5)
    d2 = later[0, FG] - encode(ANCHORS[FG], TARGETS[0]["boxes"].expand(3, 4))
    iou2 = paired_iou(decode(ANCHORS[FG], later[0, FG]), TARGETS[0]["boxes"].expand(3, 4))
    expected = measured * (iou2 ** lam * smooth_l1_loss(d2, torch.zeros_like(d2), 0.11).sum(dim=1)).sum() / 3
    assert box.item() == pytest.approx(expected.item(), rel=1e-5)
    # saved in the state dict; a resumed model uses it without measuring again
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    resumed = _model(iou_balanced_loc=True, loc_lambda=lam, w_loc="auto")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.w_loc.item() == pytest.approx(measured, rel=1e-6)
    assert resumed.compute_losses(cls_logits, later, ANCHORS, TARGETS)["box"].item() == pytest.approx(box.item(), rel=1e-6)


def test_w_loc_auto_waits_for_a_step_with_positives():
    model = _model(iou_balanced_loc=True)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    cls_logits, box_deltas = _inputs()
    assert model.compute_losses(cls_logits, box_deltas, ANCHORS, empty)["box"].item() == 0.0
    assert torch.isnan(model.w_loc)
    model.compute_losses(cls_logits, box_deltas, ANCHORS, TARGETS)
    assert torch.isfinite(model.w_loc)


def test_fixed_w_loc_and_normalized_variant_add_no_buffer():
    assert "w_loc" not in _model(iou_balanced_loc=True, w_loc="3.049").state_dict()
    assert "w_loc" not in _model(iou_balanced_loc=True, loc_normalize=True).state_dict()
    assert "w_loc" not in _model().state_dict()


# ---------------------------------------------------------------------------------------------- OHEM in the model

def test_ohem_trains_on_the_kept_anchors_only():
    model = _model(cls="ohem", ohem_batch=12, ohem_nms=0.5, ohem_candidates=300)
    batch = model.preprocess([torch.rand(3, 96, 96), torch.rand(3, 96, 96)], resize=False).tensor
    with torch.no_grad():
        cls_logits, box_deltas, anchors, _ = model.forward_features(batch)
    cls_logits.requires_grad_()
    targets = [{"boxes": torch.tensor([[8.0, 8, 48, 48]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[20.0, 10, 80, 40], [50, 50, 90, 90]]), "labels": torch.tensor([1, 2])}]
    losses = model.compute_losses(cls_logits, box_deltas, anchors, targets)
    losses["cls"].backward()
    kept = cls_logits.grad.abs().sum(dim=2) > 0  # (B, N): anchors that got a gradient
    assert kept.sum(dim=1).tolist() == [12, 12]
    # cls = cross entropy summed over classes, averaged over the 24 kept anchors
    labels, gt_boxes, classes = model.assign_targets(anchors, targets)
    fg = labels == FOREGROUND
    y = torch.zeros_like(cls_logits)
    y[fg, classes[fg]] = 1.0
    ce = torch.nn.functional.binary_cross_entropy_with_logits(cls_logits.detach(), y, reduction="none").sum(dim=2)
    assert losses["cls"].item() == pytest.approx(ce[kept].sum().item() / 24, rel=1e-5)
    assert not (kept & (labels == IGNORE)).any()
    # the score: CE plus, for foreground anchors, the smooth L1 box loss
    score = ce.clone()
    d = box_deltas[fg] - encode(anchors[None].expand_as(gt_boxes)[fg], gt_boxes[fg])
    score[fg] += smooth_l1_loss(d, torch.zeros_like(d), 0.11).sum(dim=1)
    score = score.masked_fill(labels < 0, -math.inf)
    boxes = decode(anchors, box_deltas)  # (B, N, 4) the predicted boxes NMS compares
    for i in range(2):
        lowest_kept = score[i][kept[i]].min()
        assert score[i][kept[i]].max() == score[i].max()  # the hardest anchor is always kept
        # any anchor harder than a kept one was suppressed by a kept, harder anchor (IoU > 0.5)
        for j in torch.nonzero(~kept[i] & (score[i] > lowest_kept)).flatten().tolist():
            harder = kept[i] & (score[i] > score[i, j])
            assert (paired_iou(boxes[i][harder], boxes[i, j].expand(int(harder.sum()), 4)) > 0.5).any()


# ---------------------------------------------------------------------------------------------- softmax classifier

def test_softmax_head_starts_at_total_foreground_probability_pi():
    cfg = tiny_config(num_classes=5)
    cfg.loss.cls = "softmax_focal"
    model = build_model(cfg).eval()
    assert model.head.num_logits == 6
    batch = model.preprocess([torch.rand(3, 96, 96)], resize=False).tensor
    with torch.no_grad():
        cls_logits, *_ = model.forward_features(batch)
    assert cls_logits.shape[-1] == 6
    foreground = torch.softmax(cls_logits, dim=-1)[..., :5].sum(dim=-1)
    assert abs(foreground.mean().item() - 0.01) < 2e-4  # pi = 0.01
    assert (foreground - 0.01).abs().max().item() < 5e-3


def test_softmax_inference_scores_are_the_foreground_softmax_probabilities():
    g = torch.Generator().manual_seed(4)
    n = ANCHORS.shape[0] * 40
    anchors = ANCHORS.repeat(40, 1) + torch.arange(40).repeat_interleave(6)[:, None] * 3.0  # (240, 4)
    logits = torch.randn(2, n, 4, generator=g) * 2  # K = 3 classes + background
    deltas = torch.randn(2, n, 4, generator=g) * 0.1
    kwargs = dict(score_thresh=0.2, topk_candidates=50, nms_thresh=0.5, max_detections=30)
    soft = postprocess(logits, deltas, anchors, [n], [(200, 200)] * 2, classifier="softmax", **kwargs)
    probs = torch.softmax(logits, dim=-1)[..., :3]
    ref = postprocess(torch.logit(probs.double()).float(), deltas, anchors, [n], [(200, 200)] * 2, **kwargs)
    for s, r in zip(soft, ref):
        assert len(s["scores"]) > 5
        assert_same_detections(s, r, score_atol=1e-6, box_atol=1e-3)


def test_softmax_model_predicts_classes_in_range():
    cfg = tiny_config(num_classes=3)
    cfg.loss.cls = "softmax_focal"
    cfg.model.score_thresh = 0.0
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.head.cls_subnet.predictor.bias.normal_(0, 2)  # spread the scores out
        out = model([torch.rand(3, 100, 120)])[0]
    assert len(out["labels"]) == model.detections_per_image
    assert out["labels"].max() <= 2 and out["scores"].max() <= 1


def test_head_and_loss_must_agree():
    from retinanet.modeling import RetinaNet

    model = _model()
    head = RetinaNetHead(16, 9, 3, channels=16, num_convs=1, classifier="sigmoid")
    cfg = tiny_config().loss
    cfg.cls = "softmax_focal"
    with pytest.raises(ValueError, match="softmax classifier"):
        RetinaNet(model.backbone, model.fpn, head, model.anchor_generator, matcher=model.matcher, loss=cfg)


# ---------------------------------------------------------------------------------------------- config

def test_every_loss_option_is_selectable_from_the_command_line():
    cfg = load_config(overrides=["loss.cls=ohem", "loss.ohem_batch=256", "loss.ohem_nms=0.7", "loss.ohem_ratio=3",
                                 "loss.ohem_candidates=5000", "loss.box=giou", "loss.smooth_l1_beta=0",
                                 "loss.iou_balanced_loc=true", "loss.loc_lambda=1.8", "loss.w_loc=3.649",
                                 "loss.loc_normalize=false", "loss.alpha=-1", "loss.gamma=0", "loss.beta=0.5"])
    loss = cfg.loss
    assert (loss.cls, loss.ohem_batch, loss.ohem_nms, loss.ohem_ratio, loss.ohem_candidates) == ("ohem", 256, 0.7, 3, 5000)
    assert (loss.box, loss.smooth_l1_beta, loss.iou_balanced_loc, loss.loc_lambda) == ("giou", 0.0, True, 1.8)
    assert loss.w_loc_value() == pytest.approx(3.649) and (loss.alpha, loss.gamma, loss.beta) == (-1.0, 0.0, 0.5)
    cfg = load_config(overrides=["loss.cls=fl_star", "loss.iou_balanced_cls=true", "loss.eta=1.0", "loss.w_loc=auto"])
    assert (cfg.loss.cls, cfg.loss.iou_balanced_cls, cfg.loss.eta, cfg.loss.w_loc_value()) == ("fl_star", True, 1.0, None)


@pytest.mark.parametrize("override,message", [
    ("loss.cls=ohme", "unknown loss 'ohme' \\(did you mean 'ohem'\\?\\); choose one of focal, ce"),
    ("loss.box=gio", "unknown loss 'gio' \\(did you mean 'giou'\\?\\)"),
    ("loss.w_loc=automatic", "'auto' or a number"),
    ("loss.w_loc=-2", "positive"),
    ("loss.ohem_nms=1.5", "ohem_nms' must be in \\(0, 1\\]"),
    ("loss.gamma=-1", "gamma' must be at least 0"),
])
def test_invalid_loss_options_are_rejected_on_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_invalid_loss_options_are_rejected_at_build_time():
    for change, message in [({"cls": "focall"}, "did you mean 'focal'"),
                            ({"cls": "fl_star", "gamma": 0.0}, "FL\\* divides by gamma"),
                            ({"cls": "ohem", "iou_balanced_cls": True}, "does not apply to loss.cls=ohem")]:
        cfg = tiny_config()
        for key, value in change.items():
            setattr(cfg.loss, key, value)  # set after loading: build_model still checks
        with pytest.raises(ConfigError, match=message):
            build_model(cfg)


# ---------------------------------------------------------------------------------------------- training

OPTIONS = {
    "focal": {},
    "alpha_ce": {"cls": "ce", "alpha": 0.75},
    "ce": {"cls": "ce", "alpha": -1.0},
    "fl_star": {"cls": "fl_star", "gamma": 2.0, "beta": 1.0},
    "ohem": {"cls": "ohem", "ohem_batch": 16, "ohem_candidates": 300},
    "ohem_1_3": {"cls": "ohem", "ohem_batch": 16, "ohem_ratio": 3, "ohem_candidates": 300},
    "softmax_focal": {"cls": "softmax_focal"},
    "giou": {"box": "giou"},
    "l1": {"smooth_l1_beta": 0.0},
    "iou_balanced_cls": {"iou_balanced_cls": True},
    "iou_balanced_loc": {"iou_balanced_loc": True},
    "iou_balanced_loc_eq5": {"iou_balanced_loc": True, "loc_normalize": True},
    "iou_balanced_both_softmax": {"cls": "softmax_focal", "iou_balanced_cls": True, "iou_balanced_loc": True,
                                  "w_loc": "3.049"},
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_loss_option_trains_a_tiny_model(name):
    model = _model(**OPTIONS[name]).train()
    boxes = [torch.tensor([[8.0, 8, 48, 48], [50, 40, 90, 90]]), torch.tensor([[20.0, 10, 80, 40]])]
    images = [_rect_image(96, 96, b) for b in boxes]
    targets = [{"boxes": b, "labels": torch.arange(len(b))} for b in boxes]
    history = train_steps(model, images, targets, steps=10)
    assert all(math.isfinite(h) for h in history), history
    assert history[-1] < 0.98 * history[0], history
