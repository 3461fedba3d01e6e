"""End-to-end check of `retinanet convert --from torchvision`: torchvision's own detections vs ours.

Needs a second Python environment where torchvision imports (the full PyPI torch build; CPU is
fine), e.g. `python -m venv /work/tvenv && /work/tvenv/bin/pip install torch torchvision`. Run from
the project's environment:

    python benchmarks/check_torchvision_parity.py --tv-python /work/tvenv/bin/python

1. In the torchvision environment (this file, `--torchvision-side`): build torchvision's RetinaNets
   with random weights in three variants, run them on two images, save weights and detections.
   - "stock": retinanet_resnet50_fpn(weights=None, weights_backbone=None), BatchNorm2d eps 1e-5,
     current key names.
   - "coco-like": built the way torchvision builds it when it loads its COCO weights
     (FrozenBatchNorm2d, then overwrite_eps(model, 0.0)), saved under the older key names that
     the published COCO file uses (head conv.{2j}, FPN inner_blocks.{i}).
   - "v2": retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None): BatchNorm2d eps 1e-5
     (as under its COCO weights), GroupNorm heads without conv biases, P6 from C5; saved as its
     published file is (current key names, with num_batches_tracked). Converted with no
     --arch and no --bn-eps: the architecture is detected from the keys.
   - "fasterrcnn": fasterrcnn_resnet50_fpn as torchvision builds it for its COCO weights
     (FrozenBatchNorm2d, overwrite_eps(model, 0.0)), current key names. Its RPN objectness and
     box classifier get spread-out random weights so that proposals and scores are not near ties.
   All get random BatchNorm statistics (and random GroupNorm affine parameters), and a
   classification bias that puts 200 to 400 scores per image above the 0.05 threshold (random
   heads rarely pass it otherwise).
   The images are 427 x 640 and 375 x 500 (resized by flooring: 800 x 1199 and 800 x 1066), batched
   into 800 x 1216, where torchvision's P6/P7 strides are 61/114 pixels high, not 64/128.
2. Here: `retinanet convert` each weights file, run `Predictor` (all 91 class slots, since
   torchvision does not leave any out) on the same image files in one batch, and compare: same
   labels in the same order, boxes within 0.5 px (v1) or 1e-3 px (v2), scores within 1e-4, and
   the parameter count of torchvision's weights metadata. Exit code 1 if not.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

SIZES = [(427, 640), (375, 500)]
# variant -> (torchvision architecture, BatchNorm eps to convert with (None: the converter's default),
#             max |box difference| in pixels)
VARIANTS = {"stock": ("retinanet_resnet50_fpn", 1e-5, 0.5), "coco-like": ("retinanet_resnet50_fpn", 0.0, 0.5),
            "v2": ("retinanet_resnet50_fpn_v2", None, 1e-3), "fasterrcnn": ("fasterrcnn_resnet50_fpn", None, 1e-3)}


def make_images(folder: Path) -> list:
    """Two deterministic pictures: a smooth background with filled shapes. -> PNG paths."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([127 + 80 * np.sin(xx / (31 + 7 * c) + yy / (53 - 5 * c) + c) for c in range(3)], axis=-1)
        img = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
        path = folder / f"image{i}_{h}x{w}.png"
        img.save(path)
        paths.append(path)
    return paths


def torchvision_side(workdir: Path) -> None:
    """Build torchvision's models, run them, save weights + detections (runs in the torchvision env)."""
    import numpy as np
    import torch
    import torchvision
    from PIL import Image
    from torchvision.models import resnet50
    from torchvision.models.detection import (FasterRCNN, FasterRCNN_ResNet50_FPN_Weights, RetinaNet,
                                              RetinaNet_ResNet50_FPN_V2_Weights, RetinaNet_ResNet50_FPN_Weights,
                                              retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2)
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    torch.manual_seed(0)
    images = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255
              for p in make_images(workdir)]
    report = {"torch": torch.__version__, "torchvision": torchvision.__version__,
              "categories": RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"],
              "num_params": {"retinanet_resnet50_fpn": RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["num_params"],
                             "retinanet_resnet50_fpn_v2": RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1.meta["num_params"],
                             "fasterrcnn_resnet50_fpn": FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["num_params"]},
              "variants": {}}
    for variant in VARIANTS:
        if variant == "stock":
            model = retinanet_resnet50_fpn(weights=None, weights_backbone=None)
        elif variant == "v2":
            model = retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None)
        elif variant == "fasterrcnn":  # what fasterrcnn_resnet50_fpn(weights=COCO_V1) builds before loading
            body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
            model = FasterRCNN(_resnet_fpn_extractor(body, 3), 91)
            overwrite_eps(model, 0.0)
        else:  # what retinanet_resnet50_fpn(weights=COCO_V1) builds before loading the file
            body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
            backbone = _resnet_fpn_extractor(body, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
            model = RetinaNet(backbone, 91)
            overwrite_eps(model, 0.0)
        model.eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
                    m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                    m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
                elif isinstance(m, torch.nn.GroupNorm):
                    m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
            if variant == "fasterrcnn":
                _spread_faster_rcnn(model)
                _save_and_run(model, variant, images, workdir, report)
                continue
            # 200 to 400 (anchor, class) scores per image above 0.05: under the per-level top-1000 and
            # the 300 cap, so float noise between torch versions cannot reorder what is kept.
            cls = model.head.classification_head.cls_logits
            cls.weight.normal_(std=0.03)
            cls.bias.zero_()
            batch, _ = model.transform(images)
            logits = model.head.classification_head(list(model.backbone(batch.tensors).values()))  # (B, N, K)
            top = logits.flatten().topk(400 * len(images)).values  # decreasing
            lo = 200 * len(images)
            gap = int((top[lo - 1:-1] - top[lo:]).argmax()) + lo  # threshold in the widest gap: float noise cannot cross it
            cls.bias.fill_(math.log(0.05 / 0.95) - float(top[gap - 1] + top[gap]) / 2)
        _save_and_run(model, variant, images, workdir, report)
    (workdir / "torchvision.json").write_text(json.dumps(report))


def _spread_faster_rcnn(model) -> None:
    """Random heads whose RPN objectness and class scores are spread out (few near ties), so that the
    proposals kept and the (box, class) scores above 0.05 do not depend on float noise."""
    import torch

    model.rpn.head.cls_logits.weight.normal_(std=0.3)
    model.roi_heads.box_predictor.cls_score.weight.normal_(std=0.05)
    model.roi_heads.box_predictor.cls_score.bias.copy_(torch.linspace(-3.0, 3.0, 91)[torch.randperm(91)])
    model.roi_heads.box_predictor.bbox_pred.weight.normal_(std=0.01)


def _save_and_run(model, variant: str, images: list, workdir: Path, report: dict) -> None:
    import torch

    state = model.state_dict()
    if variant == "coco-like":  # the published file's older names
        state = {_v1_name(k): v for k, v in state.items()}
    torch.save(state, workdir / f"{variant}.pth")
    with torch.no_grad():
        detections = model(images)
    report["variants"][variant] = [{k: v.tolist() for k, v in d.items()} for d in detections]
    print(f"torchvision {variant}: " + ", ".join(f"{len(d['scores'])} detections" for d in detections), flush=True)


def _v1_name(key: str) -> str:
    """torchvision's current key -> the older layout (before Conv2dNormActivation) it still loads."""
    import re

    key = re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.(weight|bias)$", r"\1.\2", key)
    m = re.fullmatch(r"(head\.(?:classification|regression)_head\.conv)\.(\d+)\.0\.(weight|bias)", key)
    return f"{m[1]}.{2 * int(m[2])}.{m[3]}" if m else key


def compare(workdir: Path) -> bool:
    """Convert, predict with our code, compare with torchvision.json. True when everything matches."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this file belongs to
    from retinanet.cli import main as cli
    from retinanet.convert import TORCHVISION_COCO_NAMES
    from retinanet.predict import Predictor

    tv = json.loads((workdir / "torchvision.json").read_text())
    print(f"torchvision {tv['torchvision']} (torch {tv['torch']}) vs retinanet")
    ok = tv["categories"] == TORCHVISION_COCO_NAMES
    print(f"category names equal torchvision's COCO_V1 meta: {ok}")
    images = sorted(workdir.glob("image*.png"))
    for variant, (arch, eps, box_tol) in VARIANTS.items():
        ckpt = workdir / f"{variant}.pt"
        eps_flag = [] if eps is None else ["--bn-eps", str(eps)]
        assert cli(["convert", "--from", "torchvision", str(workdir / f"{variant}.pth"), str(ckpt), *eps_flag]) == 0
        predictor = Predictor.from_checkpoint(str(ckpt), device="cpu", batch_size=len(images),
                                              classes=[c["id"] for c in Predictor.from_checkpoint(
                                                  str(ckpt), device="cpu").categories])  # every slot
        if sum(p.numel() for p in predictor.model.parameters()) != tv["num_params"][arch]:
            print(f"{variant}: parameter count differs from torchvision's {arch}")
            ok = False
        for path, ours, theirs in zip(images, predictor(images), tv["variants"][variant]):
            labels = np.array(theirs["labels"])
            boxes = np.array(theirs["boxes"], dtype=np.float32).reshape(-1, 4)
            scores = np.array(theirs["scores"], dtype=np.float32)
            same = len(ours) == len(labels) and np.array_equal(ours.category_ids, labels)  # torchvision's label = id
            line = f"  {variant:9s} {path.name}: {len(labels)} torchvision, {len(ours)} ours, labels {'identical' if same else 'DIFFER'}"
            if same and len(labels):
                box_diff = float(np.abs(ours.boxes - boxes).max())
                score_diff = float(np.abs(ours.scores - scores).max())
                same = box_diff <= box_tol and score_diff <= 1e-4
                line += f", max |box diff| {box_diff:.2e} px, max |score diff| {score_diff:.2e}"
            print(line + ("" if same else "  <-- MISMATCH"))
            ok = ok and same and len(labels) > 0
    print("PARITY OK" if ok else "PARITY FAILED")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tv-python", help="python of an environment where torchvision imports")
    parser.add_argument("--workdir", default="parity_work", help="folder for weights, images, outputs (default parity_work)")
    parser.add_argument("--torchvision-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.torchvision_side:
        torchvision_side(workdir)
        return 0
    if not args.tv_python:
        parser.error("--tv-python is required (the python of an environment with torchvision)")
    subprocess.run([args.tv_python, __file__, "--torchvision-side", "--workdir", str(workdir)], check=True)
    return 0 if compare(workdir) else 1


if __name__ == "__main__":
    sys.exit(main())
