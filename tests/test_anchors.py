import math

import torch

from retinanet.ops.anchors import AnchorGenerator, cell_anchors
from retinanet.modeling import build_model

from conftest import tiny_config


def test_cell_anchors_one_location_by_hand():
    # size 32, scales {1, 2}, ratios {0.5, 1, 2} (h/w): area 32^2: w = 32/sqrt(r), h = 32*sqrt(r)
    cells = cell_anchors(32.0, [1.0, 2.0], [0.5, 1.0, 2.0])
    s = math.sqrt(2.0)
    expected = torch.tensor([
        [-16 * s, -8 * s, 16 * s, 8 * s],  # scale 1, ratio 1:2 (wide): w 45.25, h 22.63
        [-16, -16, 16, 16],
        [-8 * s, -16 * s, 8 * s, 16 * s],
        [-32 * s, -16 * s, 32 * s, 16 * s],  # scale 2
        [-32, -32, 32, 32],
        [-16 * s, -32 * s, 16 * s, 32 * s],
    ])
    assert torch.allclose(cells, expected)
    w, h = cells[:, 2] - cells[:, 0], cells[:, 3] - cells[:, 1]
    assert torch.allclose(w * h, torch.tensor([32.0 ** 2] * 3 + [64.0 ** 2] * 3))


def test_paper_anchor_sizes_on_p3():
    # sec. 4: areas 32^2 on P3 with octave scales 2^0, 2^(1/3), 2^(2/3): side lengths 32, 40.3, 50.8
    cells = cell_anchors(32.0, [1.0, 2 ** (1 / 3), 2 ** (2 / 3)], [0.5, 1.0, 2.0])
    sides = (cells[1::3, 2] - cells[1::3, 0])  # the square anchors
    assert torch.allclose(sides, torch.tensor([32.0, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)]))


def test_torchvision_style_cells():
    # torchvision: sizes (32, int(32*2^(1/3)) = 40, int(32*2^(2/3)) = 50), ratio-major, rounded
    cells = cell_anchors(32.0, [1.0, 2 ** (1 / 3), 2 ** (2 / 3)], [0.5, 1.0, 2.0], style="torchvision")
    # ratio 0.5: h_ratio = sqrt(.5), w_ratio = 1/sqrt(.5); size 32: w = 45.25, h = 22.63 -> /2 rounded
    assert cells[0].tolist() == [-23.0, -11.0, 23.0, 11.0]
    assert cells[1].tolist() == [-28.0, -14.0, 28.0, 14.0]  # size 40: w 56.57, h 28.28
    assert cells[3].tolist() == [-16.0, -16.0, 16.0, 16.0]  # ratio 1, size 32
    assert cells[4].tolist() == [-20.0, -20.0, 20.0, 20.0]  # ratio 1, size 40
    assert cells[5].tolist() == [-25.0, -25.0, 25.0, 25.0]  # ratio 1, size 50


def test_grid_positions_and_order():
    gen = AnchorGenerator([32.0], [1.0], [1.0], [8])
    a = gen([(2, 3)], (16, 24), "cpu")[0]
    # location-major: (row 0, col 0), (0, 1), (0, 2), (1, 0), ...; centres at (j*8, i*8)
    centres = (a[:, :2] + a[:, 2:]) / 2
    assert centres.tolist() == [[0, 0], [8, 0], [16, 0], [0, 8], [8, 8], [16, 8]]
    gen_off = AnchorGenerator([32.0], [1.0], [1.0], [8], offset=0.5)
    c = gen_off([(1, 2)], (8, 16), "cpu")[0]
    assert ((c[:, :2] + c[:, 2:]) / 2).tolist() == [[4, 4], [12, 4]]


def test_grid_is_cached():
    gen = AnchorGenerator([32.0, 64.0], [1.0], [1.0], [8, 16])
    assert gen([(4, 4), (2, 2)], (32, 32), "cpu")[0] is gen([(4, 4), (2, 2)], (32, 32), "cpu")[0]


def test_anchor_count_800x1067():
    # Padded to 800x1088; P3..P7 grids 100x136, 50x68, 25x34, 13x17, 7x9 -> 18134 locations x 9 = 163206
    model = build_model(tiny_config(min_size=800, max_size=1333)).eval()
    pre = model.preprocess([torch.zeros(3, 800, 1067)], resize=True)
    batch, sizes = pre.tensor, pre.image_sizes
    assert tuple(batch.shape[-2:]) == (800, 1088) and sizes == [(800, 1067)]
    with torch.no_grad():
        _, _, anchors, level_sizes = model.forward_features(batch)
    assert level_sizes == [100 * 136 * 9, 50 * 68 * 9, 25 * 34 * 9, 13 * 17 * 9, 7 * 9 * 9]
    assert anchors.shape == (163206, 4)
