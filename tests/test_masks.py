"""Instance masks (retinanet/ops/masks.py): COCO segmentations decoded to known masks, mask boxes, IoU,
and a mask and its box through resize and flip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retinanet.data.transforms import RandomHorizontalFlip, ResizeShortestSide
from retinanet.ops.masks import (decode_rles, encode_masks, flip_masks, mask_iou, masks_to_boxes, resize_masks,
                                 segmentation_to_rle)

# The 6x6 mask used below: rows 1-3, columns 2-4 (a 3x3 square), plus pixel (row 5, column 0).
SQUARE = np.zeros((6, 6), dtype=np.uint8)
SQUARE[1:4, 2:5] = 1


def test_polygon_decodes_to_the_pixels_it_covers():
    # The square's outline on pixel edges: x 2..5, y 1..4 covers columns 2-4 and rows 1-3.
    rle = segmentation_to_rle([[2, 1, 5, 1, 5, 4, 2, 4]], 6, 6)
    np.testing.assert_array_equal(decode_rles([rle], 6, 6)[0], SQUARE)


def test_two_polygons_of_one_instance_are_merged():
    rle = segmentation_to_rle([[2, 1, 5, 1, 5, 4, 2, 4], [0, 5, 1, 5, 1, 6, 0, 6]], 6, 6)
    expected = SQUARE.copy()
    expected[5, 0] = 1
    np.testing.assert_array_equal(decode_rles([rle], 6, 6)[0], expected)


def test_uncompressed_and_compressed_rle_decode_to_the_known_mask():
    # Column-major runs: column 0: 6 zeros, column 1: 6 zeros, columns 2-4: 1 zero, 3 ones, 2 zeros, column 5: 6.
    counts = [6 + 6 + 1, 3, 2 + 1, 3, 2 + 1, 3, 2 + 6]
    assert sum(counts) == 36
    uncompressed = segmentation_to_rle({"size": [6, 6], "counts": counts}, 6, 6)
    np.testing.assert_array_equal(decode_rles([uncompressed], 6, 6)[0], SQUARE)
    compressed = {"size": [6, 6], "counts": uncompressed["counts"].decode()}  # str counts, as in a JSON file
    np.testing.assert_array_equal(decode_rles([segmentation_to_rle(compressed, 6, 6)], 6, 6)[0], SQUARE)


def test_encode_then_decode_is_the_identity_and_json_ready():
    masks = np.stack([SQUARE, 1 - SQUARE, np.zeros_like(SQUARE)])  # (3, 6, 6), one empty
    rles = encode_masks(torch.from_numpy(masks).bool())
    assert all(isinstance(r["counts"], str) and r["size"] == [6, 6] for r in rles)
    np.testing.assert_array_equal(decode_rles([segmentation_to_rle(r, 6, 6) for r in rles], 6, 6), masks)
    assert decode_rles([], 4, 5).shape == (0, 4, 5) and encode_masks(np.zeros((0, 4, 5))) == []


def test_masks_to_boxes_are_the_pixel_edges():
    masks = torch.from_numpy(np.stack([SQUARE, np.zeros_like(SQUARE)]))
    masks[0, 5, 0] = 1
    assert masks_to_boxes(masks).tolist() == [[0.0, 1.0, 5.0, 6.0], [0.0, 0.0, 0.0, 0.0]]  # empty: zeros
    assert masks_to_boxes(torch.zeros((0, 3, 3), dtype=torch.uint8)).shape == (0, 4)


def test_mask_iou_of_hand_made_masks():
    a = torch.from_numpy(SQUARE)[None]  # 9 pixels
    b = torch.zeros(2, 6, 6, dtype=torch.uint8)
    b[0, 2:4, 3:6] = 1  # 6 pixels, 4 of them in a: IoU 4 / (9 + 6 - 4) = 4/11
    # b[1] empty: IoU 0
    assert mask_iou(a, b)[0].tolist() == pytest.approx([4 / 11, 0.0])
    from pycocotools import mask as mask_api  # the reference: pycocotools' RLE IoU

    rle = lambda m: mask_api.encode(np.asfortranarray(m.numpy()))  # noqa: E731
    assert mask_api.iou([rle(a[0])], [rle(b[0])], [0])[0, 0] == pytest.approx(4 / 11)


def test_flip_moves_mask_and_box_together():
    masks = torch.from_numpy(SQUARE)[None]
    target = {"boxes": masks_to_boxes(masks), "masks": masks}
    image, flipped = RandomHorizontalFlip(1.0)(torch.zeros(3, 6, 6), target)
    # columns 2-4 of 6 -> columns 1-3: box x from (2, 5) to (6 - 5, 6 - 2) = (1, 4)
    assert flipped["boxes"].tolist() == [[1.0, 1.0, 4.0, 4.0]]
    assert torch.equal(masks_to_boxes(flipped["masks"]), flipped["boxes"])
    assert torch.equal(flipped["masks"], flip_masks(masks)) and flipped["masks"][0, 1, 1] == 1


def test_resize_moves_mask_and_box_together():
    masks = torch.from_numpy(SQUARE)[None]
    target = {"boxes": masks_to_boxes(masks), "masks": masks}
    image, resized = ResizeShortestSide([12], 100)(torch.zeros(3, 6, 6), target)
    assert image.shape == (3, 12, 12) and resized["masks"].shape == (1, 12, 12)
    assert resized["boxes"].tolist() == [[4.0, 2.0, 10.0, 8.0]]  # x 2 -> 4
    assert torch.equal(masks_to_boxes(resized["masks"]), resized["boxes"])  # x2 exactly: every pixel doubled
    assert int(resized["masks"].sum()) == 4 * 9 and resized["masks"].dtype == torch.uint8
    # a non-integer scale: the mask's box stays within a pixel of the scaled box
    image, resized = ResizeShortestSide([9], 100)(torch.zeros(3, 6, 6), target)
    assert (masks_to_boxes(resized["masks"]) - resized["boxes"]).abs().max() <= 1.0
    assert resize_masks(torch.zeros(0, 6, 6, dtype=torch.uint8), 9, 9).shape == (0, 9, 9)
