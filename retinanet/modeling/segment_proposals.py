"""Class-agnostic segment proposals: DeepMask, SharpMask (thesis ch. 3) and FPN mask proposals (thesis sec. 4.6).

Every model here keeps the `Detector` contract (retinanet/modeling/detector.py) with one class,
"object": `postprocess` returns per image {"boxes" (the masks' boxes), "scores", "labels" (all 0),
"masks" (D masks in the original image's pixels, `ops.segprop.RLEMasks`: compressed run lengths,
decoded to (D, H, W) bool only when a caller asks)}, best first. `network` returns three tensors
(what ONNX exports): scores (B, K) logits, masks (B, K, m, m) logits over each window, windows
(B, K, 4) xyxy in the padded batch's pixels: the best K = top_n windows of each image whose centre
lies inside the image (the rest, if there are fewer, have score logit -1e4: probability 0).
`postprocess` keeps scores above the threshold, pastes the masks into the image (each into its
window, binarized at `mask_thresh`, 0.2 as DeepMask, thesis sec. 3.5) and applies NMS on the masks'
boxes only when `nms_thresh` < 1 (the released DeepMask code applies none).

- `DeepMask` (thesis sec. 3.4, "DeepMask-ours", head C): a ResNet cut after conv4 (C4, stride 16),
  a 1x1 reduction to F channels, one linear layer over the k x k window (k = W / 16) to a 512-d
  vector shared by the mask (m x m) and score branches. Trained on sampled image patches (window W
  plus `context` px each side, resampled with reflection, reflective padding in the trunk, sec.
  3.5); run convolutionally over an image pyramid at inference, each scaled image padded by W / 2 by
  reflection at its own edges (as far as its size allows, zeros beyond), whatever else is in the batch.
- `DeepMask` with refinement (`refine_k` > 0) is SharpMask (sec. 3.3): refinement modules R^i on
  C4, C3, C2 double the mask encoding's resolution three times (m = 8 k at stride 2). Two stages
  (sec. 3.3.3): the first `refine_after` optimizer steps train the feedforward model, after which it
  is frozen (eval mode, no gradient) and only the refinement is trained. Inference refines the top
  `top_n` windows.
- `FPNMaskProposals` (sec. 4.6, Fig. 4.4): the detectors' ResNet + FPN; on every level a small MLP
  on 5 x 5 windows (a k x k conv, ReLU, 1 x 1 convs to the score and a 14 x 14 mask), fully
  convolutional, and optionally a second MLP on 7 x 7 windows for half octaves; trained end to end
  on the full image, no image pyramid: by the FPN paper's appendix A (each object given to one level and
  MLP, a mask region 1.25 x its canonical object, sampled locations, mask loss x 10) or by DeepMask's
  window rules on every window (`labels`; see the class).

In training, crowd regions (iscrowd) are neither objects nor background, as for the detectors
(`ops.segprop.label_windows`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.boxes import scale_boxes
from ..ops.matcher import split_crowd
from ..ops.nms import batched_nms
from ..ops.sampler import sample_balanced
from ..ops.segprop import (assign_to_scales, crop_windows, extend_edges, grid_windows, label_locations, label_windows,
                           mask_targets, mlp_object_sizes, paste_masks, reflect_pad)
from ..ops.transform import default_image_sizes
from .backbone import FPN, ResNet
from .detector import Detector, ImageBatch

FILLER = -1e4  # the score logit of windows outside the image and of fillers: sigmoid 0, never above a threshold
TRUNK_STRIDE = 16  # DeepMask-ours: ResNet-50 cut after conv4 (thesis Table 3.1, P = 4)


class SegmentProposer(Detector):
    """What the three proposal models share: top-K selection, mask pasting, the labels of windows."""

    network_inputs = ("images", "image_sizes")
    output_names = ("scores", "masks", "windows")
    num_classes = 1
    class_agnostic_nms = True
    class_agnostic_proposals = True  # evaluated by proposal recall (retinanet.engine.evaluate_model)

    def __init__(self, *, object_ratio: float, shift: float, neg_shift: float, top_n: int, mask_thresh: float,
                 score_thresh: float, nms_thresh: float, detections_per_image: int, **preprocessing):
        super().__init__(**preprocessing)
        self.object_ratio, self.shift, self.neg_shift = object_ratio, shift, neg_shift
        self.top_n, self.mask_thresh = top_n, mask_thresh
        self.score_thresh, self.nms_thresh, self.detections_per_image = score_thresh, nms_thresh, detections_per_image

    @staticmethod
    def _top_windows(scores: Tensor, masks: Tensor, windows: Tensor, image_sizes: Tensor, top_n: int) -> tuple:
        """scores (B, N), masks (B, N, m, m), windows (N, 4) -> the best K = top_n windows per image, those whose
        centre is inside the image first: (scores (B, K), masks (B, K, m, m), windows (B, K, 4), index (B, K)).
        The others (and, where N < top_n, filler windows, index >= N) have score FILLER."""
        centre = (windows[:, :2] + windows[:, 2:]) / 2  # (N, 2) x, y
        sizes = image_sizes.to(windows.dtype)  # (B, 2) h, w
        inside = ((centre[None, :, 0] >= 0) & (centre[None, :, 0] < sizes[:, 1:2])
                  & (centre[None, :, 1] >= 0) & (centre[None, :, 1] < sizes[:, 0:1]))  # (B, N)
        ranked = torch.where(inside, scores, torch.full_like(scores, FILLER))
        # top_n filler windows, so that K = top_n whatever the image size (a fixed ONNX TopK)
        b, m = scores.shape[0], masks.shape[-1]
        ranked = torch.cat([ranked, ranked.new_full((b, top_n), FILLER)], dim=1)
        masks = torch.cat([masks, masks.new_zeros((b, top_n, m, m))], dim=1)
        windows = torch.cat([windows, windows.new_zeros((top_n, 4))])
        top, index = ranked.topk(top_n, dim=1)  # (B, K)
        picked = masks.gather(1, index[:, :, None, None].expand(-1, -1, m, m))  # (B, K, m, m)
        return top, picked, windows[index], index

    # ------------------------------------------------------------------ the Detector contract
    def postprocess(self, outputs: tuple, batch: ImageBatch, *, score_thresh: Optional[float] = None,
                    nms_thresh: Optional[float] = None, max_detections: Optional[int] = None,
                    class_agnostic: Optional[bool] = None, keep_classes: Optional[Tensor] = None) -> list:
        """Proposals in the original image's pixels (masks pasted at the original size, not resized, each into its
        window only, kept as RLEMasks)."""
        if keep_classes is not None and not bool(torch.as_tensor(keep_classes).all()):
            raise ValueError("segment proposals have one class, 'object': there is no class to leave out")
        return self._proposals(outputs, batch.image_sizes, batch.original_sizes,
                               score_thresh=self.score_thresh if score_thresh is None else float(score_thresh),
                               nms_thresh=self.nms_thresh if nms_thresh is None else float(nms_thresh),
                               max_detections=self.detections_per_image if max_detections is None
                               else int(max_detections))

    def postprocess_outputs(self, outputs: tuple, image_sizes: list, *, score_thresh: float, nms_thresh: float,
                            max_detections: int, class_agnostic: bool = True,
                            keep_classes: Optional[Tensor] = None) -> list:
        return self._proposals(outputs, image_sizes, image_sizes, score_thresh=score_thresh, nms_thresh=nms_thresh,
                               max_detections=max_detections)

    def _proposals(self, outputs: tuple, image_sizes: list, original_sizes: list, *, score_thresh: float,
                   nms_thresh: float, max_detections: int) -> list:
        scores, masks, windows = outputs
        out = []
        for i, ((h, w), (oh, ow)) in enumerate(zip(image_sizes, original_sizes)):
            prob = scores[i].float().sigmoid()  # (K,), best first
            keep = (prob > score_thresh).nonzero().flatten()[:max_detections]
            win = scale_boxes(windows[i, keep].float(), ow / w, oh / h)  # (D, 4) in original pixels
            pasted, boxes = paste_masks(masks[i, keep].float().sigmoid(), win, oh, ow, self.mask_thresh)
            nonempty = (boxes[:, 2] > boxes[:, 0]).nonzero().flatten()
            pasted, boxes, prob = pasted[nonempty], boxes[nonempty], prob[keep][nonempty]
            if nms_thresh < 1 and len(boxes):
                order = batched_nms(boxes, prob, torch.zeros_like(prob, dtype=torch.int64), nms_thresh)
                pasted, boxes, prob = pasted[order], boxes[order], prob[order]
            out.append({"boxes": boxes, "scores": prob, "labels": torch.zeros_like(prob, dtype=torch.int64),
                        "masks": pasted})
        return out


# ---------------------------------------------------------------------------------------- SharpMask
class RefinementModule(nn.Module):
    """R^i (thesis sec. 3.3, Fig. 3.1d): M^{i+1} = up2(relu(conv3x3([M^i, S^i]))), S^i = two 3x3 convs of F^i
    (to 64, then to k_s channels, each + ReLU; sec. 3.5.2). `skip` runs on whole feature maps (shared by
    overlapping windows); `forward` takes each window's crop of S^i."""

    def __init__(self, feature_channels: int, skip_channels: int, mask_channels: int, out_channels: int):
        super().__init__()
        self.skip = nn.Sequential(nn.Conv2d(feature_channels, 64, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(64, skip_channels, 3, padding=1), nn.ReLU(inplace=True))
        self.merge = nn.Conv2d(mask_channels + skip_channels, out_channels, 3, padding=1)

    def forward(self, mask_encoding: Tensor, skip: Tensor) -> Tensor:
        """mask_encoding (N, k_m, h, w), skip (N, k_s, h, w) -> (N, out_channels, 2h, 2w)."""
        merged = F.relu(self.merge(torch.cat([mask_encoding, skip], dim=1)))
        return F.interpolate(merged, scale_factor=2.0, mode="bilinear", align_corners=False)


def crop_grid(features: Tensor, image_index: Tensor, rows: Tensor, cols: Tensor, size: int) -> Tensor:
    """size x size crops of a feature map at integer positions: features (B, C, H, W), image_index, rows,
    cols (n,) (each crop's image and top-left cell) -> (n, C, size, size). One gather, no loop over crops."""
    offsets = torch.arange(size, device=features.device)
    r = (rows[:, None] + offsets)[:, :, None]  # (n, size, 1)
    c = (cols[:, None] + offsets)[:, None, :]  # (n, 1, size)
    return features.permute(0, 2, 3, 1)[image_index[:, None, None], r, c].permute(0, 3, 1, 2)  # (n, C, size, size)


class DeepMask(SegmentProposer):
    """DeepMask-ours (thesis sec. 3.4, head C) and, with `refine_k` > 0, SharpMask (sec. 3.3); see the module
    docstring for the outputs.

    trunk: a ResNet (its layer4 is not used); window W px (a multiple of 16); context: px of image
    around each training window (multiple of 16); features F; head_dim 512 (the shared vector); mask_size
    m (the coarse mask over the window); scales: the image pyramid; windows_per_image: training windows
    sampled per image (half around objects); refine_k: k of schedule (b) (k_m^i = k_s^i = k / 2^(i-1),
    sec. 3.5.2), 0 for DeepMask; refine_after: feedforward training steps before the refinement stage.

    Example:
        >>> model = build_model(load_config("retinanet/configs/segprop_deepmask_shapes.yaml")).eval()
        >>> model([torch.rand(3, 192, 192)])[0]["masks"].shape   # (D, 192, 192), D <= 1000: RLEMasks
    """

    def __init__(self, trunk: ResNet, *, window: int = 160, context: int = 16, features: int = 128,
                 head_dim: int = 512, mask_size: int = 56, scales=(1.0,), windows_per_image: int = 32,
                 refine_k: int = 0, refine_after: int = 0, scale_tol: float = 0.25, reflect: bool = True, **common):
        super().__init__(**common)
        if window % TRUNK_STRIDE or context % TRUNK_STRIDE:
            raise ValueError(f"window ({window}) and context ({context}) must be multiples of the trunk's stride "
                             f"{TRUNK_STRIDE}")
        self.trunk = trunk
        self.trunk.layer4 = nn.Identity()  # cut after conv4 (C4)
        if reflect:  # reflective padding at every convolution (thesis sec. 3.5)
            for m in self.trunk.modules():
                if isinstance(m, nn.Conv2d) and max(m.padding) > 0:
                    m.padding_mode = "reflect"
        self.window, self.context, self.mask_size = window, context, mask_size
        self.scales = tuple(float(s) for s in scales)
        self.windows_per_image, self.scale_tol = windows_per_image, scale_tol
        k = window // TRUNK_STRIDE
        c2, c3, c4 = trunk.out_channels[:3]
        self.reduce = nn.Conv2d(c4, features, 1)  # the 1x1 reduction to F (sec. 3.4.1)
        self.shared = nn.Conv2d(features, head_dim, k)  # one linear layer over the k x k window -> 512 (head C)
        self.mask_head = nn.Conv2d(head_dim, mask_size * mask_size, 1)
        self.score_head = nn.Sequential(nn.ReLU(), nn.Conv2d(head_dim, 2 * head_dim, 1), nn.ReLU(inplace=True),
                                        nn.Conv2d(2 * head_dim, 1, 1))
        self.refine_k, self.refine_after = refine_k, refine_after
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.int64))  # optimizer steps (on_optimizer_step)
        # Some parameters get no gradient in a step: the refinement in the first stage, the frozen feedforward model
        # in the second. DistributedDataParallel must then look for them (retinanet.engine.distributed_model).
        self.find_unused_parameters = bool(refine_k)
        if refine_k:
            km = [refine_k // 2 ** i for i in range(4)]  # k_m^1..k_m^4 (schedule b); k_s^i = k_m^i
            if km[3] < 1:
                raise ValueError(f"refine_k must be at least 8 (k / 2^3 channels at the last module), got {refine_k}")
            self.encoding = nn.Conv2d(head_dim, km[0] * k * k, 1)  # the linear layer that makes M^1 (sec. 3.3.3)
            self.refinement = nn.ModuleList(RefinementModule(f, km[i], km[i], km[i + 1])
                                            for i, f in enumerate((c4, c3, c2)))
            self.refined = nn.Conv2d(km[3], 1, 1)  # M^4 -> the mask logits, 8k x 8k over the window (stride 2)

    @property
    def refining(self) -> bool:
        """In the refinement training stage (SharpMask after `refine_after` feedforward steps)."""
        return bool(self.refine_k) and int(self.train_steps) >= self.refine_after

    def on_optimizer_step(self) -> None:
        """Count an optimizer step; the training loop calls this after each one. The stages are counted in optimizer
        steps, however many micro-batches (train.accumulate) each one sums."""
        self.train_steps += 1

    def _trunk(self, x: Tensor) -> list:
        t = self.trunk
        x = F.max_pool2d(F.relu(t.bn1(t.conv1(x))), 3, 2, 1)
        c2 = t.layer1(x)
        c3 = t.layer2(c2)
        return [c2, c3, t.layer3(c3)]  # strides 4, 8, 16

    def _head(self, c4: Tensor) -> tuple:
        """C4 (B, C, H, W) -> (vector (B, 512, H - k + 1, W - k + 1), scores (B, 1, ...), masks (B, m*m, ...))."""
        vector = self.shared(self.reduce(c4))
        return vector, self.score_head(vector), self.mask_head(vector)

    def _refine(self, vector: Tensor, crops: list) -> Tensor:
        """vector (n, 512) and each window's crops of the three skip maps -> (n, 8k, 8k) refined mask logits."""
        k = self.window // TRUNK_STRIDE
        km = self.encoding.out_channels // (k * k)  # k_m^1, named: n may be 0 (no positive window in the batch)
        m = self.encoding(vector[:, :, None, None]).reshape(vector.shape[0], km, k, k)  # M^1 (n, k_m^1, k, k)
        for module, skip in zip(self.refinement, crops):
            m = module(m, skip)
        return self.refined(m)[:, 0]

    # ------------------------------------------------------------------ inference
    def network(self, images: Tensor, image_sizes: Optional[Tensor] = None) -> tuple:
        image_sizes = default_image_sizes(images, image_sizes)
        pad = self.window // 2  # windows centred at 0, 16, 32, ... px of each scaled image
        scores, masks, windows, levels = [], [], [], []
        for scale in self.scales:
            # floor(size * scale) px; with the scale itself mapping coordinates, so that windows map back by 1 / scale.
            # Each image is resampled and padded on its own: its pixels and padding do not depend on the batch.
            x = images if scale == 1 else F.interpolate(extend_edges(images, image_sizes), scale_factor=scale,
                                                        mode="bilinear", align_corners=False,
                                                        recompute_scale_factor=False)
            sizes = (image_sizes.double() * scale).floor().clamp(min=1).long()  # (B, 2) each scaled image's h, w
            x = reflect_pad(x, sizes, pad, TRUNK_STRIDE)
            feats = self._trunk(x)
            vector, score, mask = self._head(feats[2])
            gh, gw = score.shape[-2:]
            scores.append(score.flatten(1))  # (B, gh * gw)
            masks.append(mask.flatten(2).transpose(1, 2).reshape(images.shape[0], gh * gw, self.mask_size,
                                                                  self.mask_size))
            win = grid_windows(gh, gw, stride=TRUNK_STRIDE, window=self.window, offset=pad, device=images.device)
            windows.append(win / scale)
            levels.append((feats, vector, gh, gw))
        top, picked, win, index = self._top_windows(torch.cat(scores, 1), torch.cat(masks, 1), torch.cat(windows),
                                                    image_sizes, self.top_n)
        if self.refine_k:
            picked = self._refine_top(levels, index)
        return top, picked, win

    def _refine_top(self, levels: list, index: Tensor) -> Tensor:
        """Refine the selected windows (index (B, K) into all scales' windows) -> (B, K, 8k, 8k) logits."""
        b, kk = index.shape
        k = self.window // TRUNK_STRIDE
        flat = index.flatten()  # (B * K,)
        image = torch.arange(b, device=index.device).repeat_interleave(kk)
        vector = None
        crops = [None, None, None]
        start = 0
        for feats, vec, gh, gw in levels:
            here = ((flat >= start) & (flat < start + gh * gw)).nonzero().flatten()  # selected windows of this scale
            cell = flat[here] - start
            row, col, img = cell // gw, cell % gw, image[here]
            v = vec.permute(0, 2, 3, 1)[img, row, col]  # (n, 512)
            if vector is None:
                vector = v.new_zeros((flat.shape[0], v.shape[1]))
            vector = vector.index_copy(0, here, v)
            for i, (module, f) in enumerate(zip(self.refinement, (feats[2], feats[1], feats[0]))):
                factor = 2 ** i  # C4, C3, C2: a window is k, 2k, 4k cells from cell (row, col) * factor
                crop = crop_grid(module.skip(f), img, row * factor, col * factor, k * factor)
                if crops[i] is None:
                    crops[i] = crop.new_zeros((flat.shape[0],) + crop.shape[1:])
                crops[i] = crops[i].index_copy(0, here, crop)
            start += gh * gw
        refined = self._refine(vector, crops)
        return refined.reshape(b, kk, refined.shape[-2], refined.shape[-1])

    # ------------------------------------------------------------------ training
    def sample_windows(self, targets: list, image_sizes: list, device) -> Tensor:
        """Training windows (B, n, 4) xyxy: half centred on objects (shift and scale jitter within the positive
        tolerance; crowd regions are not objects), half at random places and pyramid scales; n = windows_per_image."""
        n = self.windows_per_image
        half = n // 2
        lo, hi = math.log2(min(self.scales)), math.log2(max(self.scales))
        out = []
        for t, (h, w) in zip(targets, image_sizes):
            boxes = split_crowd(t, device)[0]  # (G, 4) the objects
            # random windows: side W / s at a random pyramid scale, centre anywhere in the image
            side = self.window / 2.0 ** (lo + (hi - lo) * torch.rand(n, device=device))
            centre = torch.rand(n, 2, device=device) * torch.tensor([w, h], device=device, dtype=torch.float32)
            if len(boxes):
                g = torch.randint(len(boxes), (half,), device=device)
                size = (boxes[g, 2:] - boxes[g, :2]).amax(1).clamp(min=1.0)
                side[:half] = size / (self.object_ratio * 2.0 ** ((2 * torch.rand(half, device=device) - 1)
                                                                   * self.scale_tol))
                jitter = (2 * torch.rand(half, 2, device=device) - 1) * self.shift * side[:half, None]
                centre[:half] = (boxes[g, :2] + boxes[g, 2:]) / 2 + jitter
            out.append(torch.cat([centre - side[:, None] / 2, centre + side[:, None] / 2], dim=1))
        return torch.stack(out)  # (B, n, 4)

    def losses(self, batch: ImageBatch, targets: list) -> dict:
        device = batch.tensor.device
        objects = [_objects(t, device) for t in targets]  # per image: objects' boxes and masks, crowd regions' boxes
        windows = self.sample_windows(targets, batch.image_sizes, device)  # (B, n, 4)
        labels, matched_masks = [], []
        for (boxes, masks, crowd), win in zip(objects, windows):
            lab, matched = label_windows(win, boxes, object_ratio=self.object_ratio, shift=self.shift,
                                         neg_shift=self.neg_shift, scale_tol=self.scale_tol, crowd_boxes=crowd)
            labels.append(lab)
            pos = (lab == 1).nonzero().flatten()
            matched_masks.append((masks[matched[pos]], win[pos]))
        labels = torch.cat(labels)  # (B * n,)
        grow = windows.new_tensor([-1.0, -1.0, 1.0, 1.0]) * (self.context / self.window)
        sides = (windows[..., 2:3] - windows[..., 0:1])  # (B, n, 1)
        patches = crop_windows(batch.tensor, windows + grow * sides, self.window + 2 * self.context, batch.image_sizes)
        c = self.context // TRUNK_STRIDE  # the window's output cell in the patch's output grid
        refining = self.refining
        for module in (self.trunk, self.reduce, self.shared, self.mask_head, self.score_head):
            module.train(self.training and not refining)
        with torch.set_grad_enabled(not refining):
            feats = self._trunk(patches)
            vector, score, mask = self._head(feats[2])
            vector, score, mask = vector[:, :, c, c], score[:, 0, c, c], mask[:, :, c, c]
            pos = labels == 1
            # one image's positives after another's: the order of `matched_masks`
            score_loss = F.binary_cross_entropy_with_logits(score[labels >= 0], labels[labels >= 0].float())
            target = self._mask_targets(matched_masks, self.mask_size)
            coarse = mask[pos].reshape(-1, self.mask_size, self.mask_size)
            mask_loss = _mean_bce(coarse, target)
        out = {"score": score_loss, "mask": mask_loss}
        if self.refine_k:
            if refining:
                k = self.window // TRUNK_STRIDE
                idx = pos.nonzero().flatten()
                crops = [crop_grid(module.skip(f[idx]), torch.arange(len(idx), device=device),
                                   torch.full_like(idx, c * 2 ** i), torch.full_like(idx, c * 2 ** i), k * 2 ** i)
                         for i, (module, f) in enumerate(zip(self.refinement, (feats[2], feats[1], feats[0])))]
                refined = self._refine(vector[idx], crops)
                out["refine"] = _mean_bce(refined, self._mask_targets(matched_masks, refined.shape[-1]))
            else:
                out["refine"] = score_loss.new_zeros(())
        return out

    @staticmethod
    def _mask_targets(matched_masks: list, size: int) -> Tensor:
        """[(object masks (P, H, W), windows (P, 4))] per image -> (sum P, size, size) targets."""
        parts = [mask_targets(m, win, size) for m, win in matched_masks]
        return torch.cat(parts) if parts else torch.zeros((0, size, size))


def _objects(target: dict, device) -> tuple:
    """One image's target -> (boxes (G, 4) float32 and masks (G, H, W) of its objects, boxes (C, 4) of its crowd
    regions (iscrowd), which are neither objects nor background), on `device`."""
    if "masks" not in target:
        raise ValueError("segment proposal models train on masks: set data.masks: true")
    boxes, _, crowd_boxes = split_crowd(target, device)
    masks = target["masks"]
    if "iscrowd" in target:
        masks = masks[~torch.as_tensor(target["iscrowd"], device=masks.device).reshape(-1).bool()]
    return boxes, masks.to(device), crowd_boxes


def _mean_bce(logits: Tensor, target: Tensor) -> Tensor:
    """Mean per-pixel binary cross entropy; 0 (with a gradient path) when there are no positives."""
    if logits.numel() == 0:
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


# ---------------------------------------------------------------------------------------- FPN
class MaskMLP(nn.Module):
    """The FPN mask proposals' small MLP on k x k windows (thesis sec. 4.6, Fig. 4.4), fully convolutional:
    a k x k conv (one fully connected layer over the window) to `hidden`, ReLU, then 1 x 1 convs to the
    objectness logit and the m x m mask logits. Shared by every pyramid level."""

    def __init__(self, channels: int, hidden: int, window: int, mask_size: int):
        super().__init__()
        self.window, self.mask_size = window, mask_size
        self.fc = nn.Conv2d(channels, hidden, window, padding=window // 2)
        self.score = nn.Conv2d(hidden, 1, 1)
        self.mask = nn.Conv2d(hidden, mask_size * mask_size, 1)

    def forward(self, x: Tensor) -> tuple:
        """x (B, C, H, W) -> (scores (B, H * W), masks (B, H * W, m, m)), row-major over the grid."""
        hidden = F.relu(self.fc(x))
        b, _, h, w = hidden.shape
        masks = self.mask(hidden).flatten(2).transpose(1, 2).reshape(b, h * w, self.mask_size, self.mask_size)
        return self.score(hidden).flatten(1), masks

    def at(self, x: Tensor, b: Tensor, i: Tensor, j: Tensor, with_mask: Tensor) -> tuple:
        """`forward`'s outputs at some locations only: x (B, C, H, W), locations (b, i, j) (K,) each (image, row,
        column), with_mask (K,) bool -> (scores (K,), masks (M, m, m) of the M locations where with_mask is True,
        in order). The k x k conv is the same dot product on the gathered k x k windows (zeros beyond the map,
        as its padding). Training by the appendix rules reads 128 sampled locations of an image's thousands."""
        k, m = self.window, self.mask_size
        steps = torch.arange(k, device=x.device)
        padded = F.pad(x, (k // 2,) * 4)
        # (K, k, k, C): advanced indices on either side of a slice put their dimensions first
        windows = padded[b[:, None, None], :, (i[:, None] + steps)[:, :, None], (j[:, None] + steps)[:, None, :]]
        hidden = F.relu(F.linear(windows.permute(0, 3, 1, 2).flatten(1), self.fc.weight.flatten(1), self.fc.bias))
        scores = F.linear(hidden, self.score.weight.flatten(1), self.score.bias).squeeze(1)
        masks = F.linear(hidden[with_mask], self.mask.weight.flatten(1), self.mask.bias)
        return scores, masks.unflatten(1, (m, m))


class FPNMaskProposals(SegmentProposer):
    """FPN segment proposals (thesis sec. 4.6): ResNet + FPN (P_min..P_max, d channels), a 5 x 5 MLP per level and
    optionally a 7 x 7 one (`mlp_windows` [5] or [5, 7]), labelled and trained by one of two rules (`labels`):

    - "appendix", the FPN paper's appendix A (arXiv 1612.03144): MLP j of n on the level of stride s expects
      objects of object_cells * s * 2^(j / n) px (8 cells: 32 px at P2, 45 px for the 7 x 7 MLP) and predicts the
      mask over a region (1 + padding) times that, centred on the location (40 px at P2: larger than the 5 x 5
      MLP's 20 px input); each object is given to the (level, MLP) of the nearest size in log space, whose
      locations within +-radius strides of its centre are positive for it; the others of that (level, MLP) are
      negative. Per image, batch_per_image locations are sampled (positive_fraction at most positive, negatives
      fill in, `ops.sampler.sample_balanced`); the score loss is over them, the mask loss over the sampled
      positives, weighted mask_weight.
    - "deepmask", DeepMask's rules on every location (what fpn_masks did before the appendix was found): the MLP
      with window k on level l sees k 2^l px, predicts its mask over that window and expects an object of
      object_ratio * k 2^l px; a window is positive within 2^(+-scale_tol) of that (scale_tol 1/2 for one MLP:
      levels are an octave apart; 1/4 for two, half octaves) and `shift`; every window labelled, positives
      and negatives weigh equally in the score loss.

    The windows that `network` returns are where each mask goes: the mask regions under the appendix's rules.
    """

    LABELS = ("appendix", "deepmask")

    def __init__(self, backbone: ResNet, fpn: FPN, *, mlp_windows=(5, 7), hidden: int = 512, mask_size: int = 14,
                 scale_tol: Optional[float] = None, labels: str = "appendix", object_cells: float = 8.0,
                 padding: float = 0.25, radius: float = 1.0, batch_per_image: int = 128,
                 positive_fraction: float = 0.25, mask_weight: float = 10.0, **common):
        super().__init__(**common)
        if labels not in self.LABELS:
            raise ValueError(f"labels must be one of {', '.join(self.LABELS)}, got {labels!r}")
        self.backbone, self.fpn = backbone, fpn
        channels = fpn.output[0].out_channels
        self.mlps = nn.ModuleList(MaskMLP(channels, hidden, k, mask_size) for k in mlp_windows)
        self.scale_tol = scale_tol if scale_tol is not None else 0.5 / len(self.mlps)
        self.labels, self.object_cells, self.padding, self.radius = labels, object_cells, padding, radius
        self.batch_per_image, self.positive_fraction, self.mask_weight = batch_per_image, positive_fraction, mask_weight

    @property
    def strides(self) -> list:
        return [2 ** level for level in range(self.fpn.min_level, self.fpn.max_level + 1)]

    def object_sizes(self) -> list:
        """The appendix rules' canonical object size (px) of every (level, MLP), in output order."""
        return mlp_object_sizes(self.strides, len(self.mlps), self.object_cells)

    def windows_per_level(self, grid_sizes: list, device=None) -> list:
        """The windows (N_i, 4) of every (level, MLP) in output order: where each location's mask goes. Location (i, j)
        of a level of stride s is centred at ((j + 1/2) s, (i + 1/2) s), the centre of its MLP's k x k input. Its
        window is that input (k s px) under DeepMask's rules, the mask region ((1 + padding) x the canonical object)
        under the appendix's."""
        out = []
        sizes = iter(self.object_sizes())
        for stride, (h, w) in zip(self.strides, grid_sizes):
            for mlp in self.mlps:
                side = (1 + self.padding) * next(sizes) if self.labels == "appendix" else mlp.window * stride
                out.append(grid_windows(h, w, stride=stride, window=side, offset=side / 2 - stride / 2, device=device))
        return out

    def _dense(self, images: Tensor) -> tuple:
        feats = self.fpn(self.backbone(images))
        return self._dense_outputs(feats)

    def _dense_outputs(self, feats: list) -> tuple:
        scores, masks = [], []
        for f in feats:
            for mlp in self.mlps:
                s, m = mlp(f)
                scores.append(s)
                masks.append(m)
        grid_sizes = [tuple(f.shape[-2:]) for f in feats]
        windows = torch.cat(self.windows_per_level(grid_sizes, feats[0].device))
        return torch.cat(scores, 1), torch.cat(masks, 1), windows, grid_sizes  # (B, N), (B, N, m, m), (N, 4)

    def outputs_at(self, feats: list, b: Tensor, n: Tensor, with_mask: Tensor) -> tuple:
        """The dense outputs (`_dense_outputs`' scores[b, n] and masks[b, n]) at K locations only: b, n (K,) image
        and location (the index over every (level, MLP), as `windows_per_level`), with_mask (K,) bool -> (scores
        (K,), masks (M, m, m) of the locations where with_mask is True, in order). Every MLP runs, on no
        locations if none are its, so every parameter is in the graph (DDP)."""
        scores, masks, score_at, mask_at = [], [], [], []
        start = 0
        for f in feats:
            h, w = f.shape[-2:]
            for mlp in self.mlps:
                mine = ((n >= start) & (n < start + h * w)).nonzero().flatten()
                p = n[mine] - start
                s, m = mlp.at(f, b[mine], p // w, p % w, with_mask[mine])
                scores.append(s)
                masks.append(m)
                score_at.append(mine)
                mask_at.append(mine[with_mask[mine]])
                start += h * w
        return (torch.cat(scores)[torch.argsort(torch.cat(score_at))],
                torch.cat(masks)[torch.argsort(torch.cat(mask_at))])

    def network(self, images: Tensor, image_sizes: Optional[Tensor] = None) -> tuple:
        image_sizes = default_image_sizes(images, image_sizes)
        scores, masks, windows, _ = self._dense(images)
        top, picked, win, _ = self._top_windows(scores, masks, windows, image_sizes, self.top_n)
        return top, picked, win

    def losses(self, batch: ImageBatch, targets: list) -> dict:
        if self.labels == "appendix":
            return self._appendix_losses(self.fpn(self.backbone(batch.tensor)), targets)
        scores, masks, windows, grid_sizes = self._dense(batch.tensor)
        labels, pos_masks, pos_windows, pos_logits = [], [], [], []
        for i, t in enumerate(targets):
            boxes, object_masks, crowd = _objects(t, windows.device)
            lab, matched = label_windows(windows, boxes, object_ratio=self.object_ratio, shift=self.shift,
                                         neg_shift=self.neg_shift, scale_tol=self.scale_tol, crowd_boxes=crowd)
            labels.append(lab)
            pos = (lab == 1).nonzero().flatten()
            pos_masks.append(object_masks[matched[pos]])
            pos_windows.append(windows[pos])
            pos_logits.append(masks[i, pos])
        labels = torch.stack(labels)  # (B, N)
        pos, neg = labels == 1, labels == 0
        bce = F.binary_cross_entropy_with_logits(scores, pos.to(scores.dtype), reduction="none")
        # positives and negatives weigh equally (DeepMask samples them 50/50)
        score_loss = 0.5 * (bce[pos].sum() / pos.sum().clamp(min=1) + bce[neg].sum() / neg.sum().clamp(min=1))
        m = masks.shape[-1]
        target = torch.cat([mask_targets(pm, pw, m) for pm, pw in zip(pos_masks, pos_windows)])
        return {"score": score_loss, "mask": _mean_bce(torch.cat(pos_logits), target)}

    def label_locations(self, windows: Tensor, grid_sizes: list, target: dict) -> tuple:
        """The appendix rules' labels of one image's locations: windows (N, 4) (`windows_per_level`, concatenated) ->
        (labels (N,) in {1, 0, -1}, matched (N,) the positives' objects, object masks (G, H, W))."""
        device = windows.device
        counts = [h * w for h, w in grid_sizes for _ in self.mlps]
        block = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
        stride = torch.tensor([s for s in self.strides for _ in self.mlps], dtype=torch.float32, device=device)
        sizes = self.object_sizes()
        boxes, object_masks, crowd = _objects(target, device)
        labels, matched = label_locations((windows[:, :2] + windows[:, 2:]) / 2, block, self.radius * stride[block],
                                          boxes, assign_to_scales(boxes, sizes), crowd_boxes=crowd,
                                          crowd_block=assign_to_scales(crowd, sizes), windows=windows)
        return labels, matched, object_masks

    def _appendix_losses(self, feats: list, targets: list) -> dict:
        """The appendix rules' losses on the FPN's features: the MLPs run at the sampled locations only
        (`outputs_at`; the dense outputs' values there, tests/test_segment_proposals.py)."""
        grid_sizes = [tuple(f.shape[-2:]) for f in feats]
        windows = torch.cat(self.windows_per_level(grid_sizes, feats[0].device))
        labelled = [self.label_locations(windows, grid_sizes, t) for t in targets]
        labels = torch.stack([lab for lab, _, _ in labelled])  # (B, N)
        b, n = sample_balanced(labels, self.batch_per_image, self.positive_fraction).nonzero(as_tuple=True)
        positive = labels[b, n] == 1
        # negatives train the score only (appendix A, "as in DeepMask"); the sampled positives the mask too
        scores, masks = self.outputs_at(feats, b, n, positive)
        score_loss = _mean_bce(scores, positive.float())
        m = masks.shape[-1]
        target = []
        for i, (lab, matched, object_masks) in enumerate(labelled):
            pos = n[(b == i) & positive]
            target.append(mask_targets(object_masks[matched[pos]], windows[pos], m))
        mask_loss = _mean_bce(masks, torch.cat(target))
        return {"score": score_loss, "mask": self.mask_weight * mask_loss}
