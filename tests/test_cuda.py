"""GPU checks, skipped without CUDA: the training step never waits for the GPU, uint8 batches realized
on the GPU, fp16 with a gradient scaler, bf16, NMS and post-processing on the GPU against the CPU,
Predictor and evaluate_model on the GPU against the CPU, one-process nccl DDP, torch.compile against eager, and the
engine on the GPU against the CPU. `python benchmarks/gpu.py` runs this file and reports the outcome.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retinanet.data.loader import batch_to_device
from retinanet.data.transforms import PendingImage
from retinanet.modeling import build_model
from retinanet.ops.nms import batched_nms, native_batched_nms, reference_nms

from conftest import tiny_config, train_steps
from detection_match import assert_same_detections

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture
def fp32_on_the_gpu():
    """Full fp32 on the GPU for the comparisons with the CPU, and the global state put back afterwards.

    cuDNN convolutions use TF32 by default (10-bit mantissa: relative error ~5e-4 per product), which
    moves scores by far more than the comparisons' 1e-4: with TF32 rounding emulated, only 37/100 and
    25/100 detections matched. With TF32 off the GPU differs from the CPU by summation order only. The
    legacy flags are used for both cuDNN and cuBLAS (setting cuDNN's through one API and reading it
    through the other raises). The engine's `train.deterministic` sets torch-wide state too
    (deterministic algorithms, cudnn.benchmark, CUBLAS_WORKSPACE_CONFIG), which the tests after it must
    not inherit."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark,
         torch.backends.cudnn.deterministic) = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
        if saved[6] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[6]


def _rect_image(h, w, boxes):
    img = torch.full((3, h, w), 0.5)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        img[i % 3, int(y0):int(y1), int(x0):int(x1)] = 1.0
    return img


def _batch(device="cpu"):
    """Three 128x160 images: two boxes (one a crowd region), no box, two identical boxes."""
    boxes = [torch.tensor([[16.0, 16, 64, 64], [80, 70, 120, 120]]), torch.zeros(0, 4),
             torch.tensor([[40.0, 20, 100, 50], [40, 20, 100, 50]])]
    images = [_rect_image(128, 160, b) for b in boxes]
    targets = [{"boxes": boxes[0], "labels": torch.tensor([0, 2]), "iscrowd": torch.tensor([False, True])},
               {"boxes": boxes[1], "labels": torch.zeros(0, dtype=torch.int64), "iscrowd": torch.zeros(0, dtype=bool)},
               {"boxes": boxes[2], "labels": torch.tensor([1, 1]), "iscrowd": torch.tensor([False, False])}]
    return batch_to_device(images, targets, torch.device(device))


def _model(**loss):
    torch.manual_seed(0)
    cfg = tiny_config()
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    return build_model(cfg).train()


# ----------------------------------------------------------------------------------------------
# no host synchronization


@pytest.mark.parametrize("loss", [{}, {"box": "giou"}, {"iou_balanced_loc": True}, {"iou_balanced_cls": True}])
def test_a_training_step_never_waits_for_the_gpu(loss):
    model = _model(**loss).to(CUDA)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, targets = _batch(CUDA)

    def step():
        losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        return losses

    step()  # warm-up: anchors cached, kernels and optimizer state created
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        losses = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(v) for v in losses.values())


def test_pinned_uint8_batch_is_realized_on_the_gpu_without_waiting():
    g = torch.Generator().manual_seed(0)
    raw = [torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8, generator=g).permute(2, 0, 1) for _ in range(3)]
    plain = [PendingImage(r).then("flip") for r in raw]  # exact operations only
    resized = [PendingImage(r).then("resize", 64, 90).then("crop", 3, 10, 64, (0.4, 0.5, 0.6)).then("flip")
               for r in raw]
    pinned = [p.pin_memory() for p in plain + resized]
    assert all(p.data.is_pinned() for p in pinned)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu, _ = batch_to_device(pinned, [{"boxes": torch.zeros(0, 4).pin_memory()}] * 6, CUDA)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    on_cpu = [p.realize() for p in plain + resized]  # the float path
    for gpu, cpu in zip(on_gpu[:3], on_cpu[:3]):
        assert torch.equal(gpu.cpu(), cpu)  # conversion, flip: exact
    for gpu, cpu in zip(on_gpu[3:], on_cpu[3:]):
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)  # bilinear on the GPU: rounding only


# ----------------------------------------------------------------------------------------------
# precision


def _first_losses(model, images, targets, dtype):
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        return {k: float(v) for k, v in model(images, targets).items()}


def test_fp16_with_a_grad_scaler_trains_like_fp32():
    model = _model().to(CUDA)
    images, targets = _batch(CUDA)
    fp32 = _first_losses(model, images, targets, None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    history = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.float16):
            losses = model(images, targets)
        history.append({k: float(v) for k, v in losses.items()})
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
    for name, value in fp32.items():
        assert history[0][name] == pytest.approx(value, rel=2e-2)
    totals = [sum(h.values()) for h in history]
    assert all(math.isfinite(v) for v in totals) and totals[-1] < totals[0]
    assert math.isfinite(scaler.get_scale()) and scaler.get_scale() > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_autocast_trains_like_fp32():
    model = _model().to(CUDA)
    images, targets = _batch(CUDA)
    fp32 = _first_losses(model, images, targets, None)
    bf16 = _first_losses(model, images, targets, torch.bfloat16)
    for name, value in fp32.items():
        assert bf16[name] == pytest.approx(value, rel=5e-2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    totals = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sum(model(images, targets).values())
        totals.append(float(loss))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert all(math.isfinite(v) for v in totals) and totals[-1] < totals[0]


# ----------------------------------------------------------------------------------------------
# NMS, post-processing, Predictor: the GPU against the CPU


def _random_boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 80], dim=1)
    return boxes, torch.rand(n, generator=g), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("n", [300, 5000])
def test_nms_on_the_gpu_keeps_the_cpus_boxes(n):
    """torchvision's kernel (when it imports) and ours, on the GPU, against ours on the CPU (and the
    textbook loop, for the small case)."""
    boxes, scores, groups = _random_boxes(n, n)
    expected = native_batched_nms(boxes, scores, groups, 0.5)
    if n <= 300:
        assert torch.equal(expected, reference_nms(boxes, scores, groups, 0.5))
    on_gpu = boxes.to(CUDA), scores.to(CUDA), groups.to(CUDA)
    assert torch.equal(batched_nms(*on_gpu, 0.5).cpu(), expected)
    assert torch.equal(native_batched_nms(*on_gpu, 0.5).cpu(), expected)
    assert len(expected) > n // 10


def test_postprocess_on_the_gpu_equals_the_cpu():
    model = _model().eval()
    g = torch.Generator().manual_seed(0)
    batch = model.preprocess([torch.rand(3, 128, 160, generator=g), torch.rand(3, 96, 128, generator=g)])
    with torch.no_grad():
        _, _, *anchors = model.network(batch.tensor)
    n = sum(a.shape[0] for a in anchors)
    cls_logits = torch.randn(2, n, model.num_classes, generator=g) * 2 - 3  # a few thousand scores > 0.05
    box_deltas = torch.randn(2, n, 4, generator=g) * 0.3
    cpu = model.postprocess((cls_logits, box_deltas, *anchors), batch)
    gpu_batch = type(batch)(batch.tensor.to(CUDA), batch.image_sizes, batch.original_sizes)
    gpu = model.to(CUDA).postprocess((cls_logits.to(CUDA), box_deltas.to(CUDA), *[a.to(CUDA) for a in anchors]),
                                     gpu_batch)
    for c, d in zip(cpu, gpu):
        assert len(c["scores"]) == model.detections_per_image  # the full 100: the comparison is not empty
        assert_same_detections(d, c, score_atol=1e-6, box_atol=1e-3)


def test_predictor_on_the_gpu_finds_the_cpus_detections(fp32_on_the_gpu):
    from retinanet.predict import Predictor

    model = _model().eval()
    with torch.no_grad():  # spread the random scores, so that detections pass the threshold
        model.head.cls_subnet.predictor.weight.mul_(200.0)
        model.head.cls_subnet.predictor.bias.fill_(-2.0)
    categories = [{"id": i + 1, "name": f"class {i}"} for i in range(model.num_classes)]
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(120, 150, 3), dtype=np.uint8), rng.integers(0, 256, size=(90, 200, 3),
                                                                                     dtype=np.uint8)]
    cpu = Predictor(copy.deepcopy(model), categories, device="cpu", score_threshold=0.2)(arrays)
    gpu = Predictor(copy.deepcopy(model), categories, device="cuda", score_threshold=0.2)(arrays)
    for c, d in zip(cpu, gpu):
        assert len(c.scores) >= 20  # enough detections for the comparison to mean something
        assert_same_detections(d, c, score_atol=1e-4, box_atol=0.05)  # one at the threshold may round either way


def test_evaluate_model_on_the_gpu_equals_the_cpu(tmp_path, monkeypatch, fp32_on_the_gpu):
    """Evaluation copies pinned uint8 images to the GPU, where the model's preprocess converts them:
    the CPU run's detections and metrics, up to float rounding."""
    import retinanet.evaluate
    from retinanet.data.coco import CocoDataset
    from retinanet.data.synthetic import make_shapes_dataset
    from retinanet.engine import DistEnv, evaluate_model

    shapes = make_shapes_dataset(str(tmp_path / "data"), num_train=1, num_val=4, image_size=64, seed=0)
    dataset = CocoDataset(shapes.val_json, shapes.val_images)
    model = _model().eval()
    with torch.no_grad():  # spread the random scores, so that detections pass the threshold
        model.head.cls_subnet.predictor.weight.mul_(200.0)
        model.head.cls_subnet.predictor.bias.fill_(-2.0)
    detections, metrics, original = {}, {}, retinanet.evaluate.detections_to_coco_results
    for device in ("cpu", "cuda"):
        seen = detections.setdefault(device, [])
        monkeypatch.setattr(retinanet.evaluate, "detections_to_coco_results",
                            lambda dets, ids, cats, seen=seen: seen.extend(dets) or original(dets, ids, cats))
        env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device(device))
        metrics[device] = evaluate_model(copy.deepcopy(model).to(device), dataset, env, batch_size=2)
    assert len(detections["cpu"]) == len(detections["cuda"]) == 4
    for c, d in zip(detections["cpu"], detections["cuda"]):
        assert len(c["scores"]) >= 20  # enough detections for the comparison to mean something
        assert_same_detections(d, c, score_atol=1e-4, box_atol=0.05)  # one at the threshold may round either way
    for key in ("AP", "AP50", "AP75"):
        assert metrics["cuda"][key] == pytest.approx(metrics["cpu"][key], abs=1e-3)


# ----------------------------------------------------------------------------------------------
# DDP, torch.compile, the engine


def test_one_process_nccl_ddp_equals_plain_training(tmp_path):
    import torch.distributed as dist

    images, targets = _batch(CUDA)
    plain = _model().to(CUDA)
    plain_history = train_steps(plain, images, targets, steps=3)
    # Bounded: the rendezvous and the collectives give up after 60 s (NCCL's watchdog then aborts the
    # process, and benchmarks/gpu.py names the test that was running) instead of hanging to the end of
    # the call on a lent GPU machine.
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(_model().to(CUDA), device_ids=[CUDA.index or 0])
        ddp_history = train_steps(ddp, images, targets, steps=3)  # the normalizer is all-reduced too
    finally:
        dist.destroy_process_group()
    assert ddp_history == pytest.approx(plain_history, rel=1e-6)
    for a, b in zip(plain.state_dict().values(), ddp.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_compiled_training_step_matches_eager():
    eager = _model().to(CUDA)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    images, targets = _batch(CUDA)
    results = []
    for model in (eager, compiled):
        losses = model(images, targets)
        sum(losses.values()).backward()
        results.append(({k: float(v) for k, v in losses.items()},
                        {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (eager_losses, eager_grads), (compiled_losses, compiled_grads) = results
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-3)  # fused reductions round differently
    assert eager_grads.keys() == compiled_grads.keys()
    for name in eager_grads:
        scale = float(eager_grads[name].abs().max())
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-3, atol=1e-3 * scale + 1e-8)


def test_the_engine_trains_on_the_gpu_as_on_the_cpu(tmp_path, fp32_on_the_gpu):
    """The GPU path (pinned uint8 images realized on the device, targets checked on the CPU, one
    sync per step) logs the CPU run's losses, up to float rounding."""
    from retinanet.data.synthetic import make_shapes_dataset
    from retinanet.engine import train

    shapes = make_shapes_dataset(str(tmp_path / "data"), num_train=8, num_val=2, image_size=64, seed=0)
    logged = {}
    for run, device in enumerate(("cpu", "cuda")):
        cfg = tiny_config(num_classes=4, backbone_norm="gn", head_convs=1, min_level=3, max_level=6,
                          anchor_sizes=[16.0, 32.0, 64.0, 128.0], min_size=64, max_size=64)
        d, t = cfg.data, cfg.train
        d.train_json, d.train_images = str(shapes.train_json), str(shapes.train_images)
        d.batch_size, d.num_workers, d.aspect_grouping, d.train_sizes, d.flip_prob = 4, 0, False, [48, 64], 0.5
        t.iterations, t.accumulate, t.device, t.log_every, t.checkpoint_every = 2, 2, device, 1, 2
        t.deterministic = True
        train(cfg, str(tmp_path / f"run{run}"), progress=False)
        metrics = (tmp_path / f"run{run}" / "metrics.jsonl").read_text().splitlines()
        logged[device] = [json.loads(line) for line in metrics]
    for cpu, gpu in zip(logged["cpu"], logged["cuda"]):
        for key in ("cls", "box"):
            assert gpu[key] == pytest.approx(cpu[key], rel=2e-3)


def test_bilinear_on_channels_last_uint8_views_is_what_the_float_path_computes():
    """The loader's uint8 data keeps the decoded array's channels-last strides; a resize of it on the
    GPU matches the CPU's resize of the same float image."""
    array = torch.randint(0, 256, (37, 53, 3), dtype=torch.uint8)
    image = PendingImage(array.permute(2, 0, 1))
    gpu = image.then("resize", 80, 100).realize(CUDA).cpu()
    cpu = F.interpolate(array.permute(2, 0, 1).float().div(255)[None], size=(80, 100), mode="bilinear",
                        align_corners=False)[0]
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-5)
