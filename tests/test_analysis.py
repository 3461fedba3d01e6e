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
