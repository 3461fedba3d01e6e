"""The papers' analysis figures, as data (pure functions) and as PNGs.

Focal Loss paper: Figure 1 (CE vs FL over p_t), Figures 3 and 4 (CE, FL, FL* over x_t and their
derivatives). The checkpoint-based figures (Figure 6, the loss CDF, and the IoU-balanced paper's
Figures 2 and 3) are computed by `retinanet analyze` from a trained model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .losses import fl_star_loss, sigmoid_focal_loss

FIGURE1_GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
# Figures 3 and 4: CE, FL with gamma 2, and FL* at the two settings of Table 2
FIGURE3_LOSSES = (("CE", "ce", {}), ("FL, gamma=2", "focal", {"gamma": 2.0}),
                  ("FL*, gamma=2, beta=1", "fl_star", {"gamma": 2.0, "beta": 1.0}),
                  ("FL*, gamma=4, beta=0", "fl_star", {"gamma": 4.0, "beta": 0.0}))


def focal_curve(p_t: torch.Tensor, gamma: float) -> torch.Tensor:
    """FL(p_t) = -(1 - p_t)^gamma log(p_t) (eq. 4, no alpha); gamma = 0 is CE (Figure 1)."""
    x_t = torch.logit(p_t.double())  # p_t = sigmoid(x_t)
    return sigmoid_focal_loss(x_t, torch.ones_like(x_t), alpha=-1, gamma=gamma)


def loss_of_xt(x_t: torch.Tensor, kind: str, **params) -> tuple:
    """(loss, d loss / d x_t) at the foreground target y = 1, where x = x_t (Figures 3 and 4)."""
    x = x_t.double().clone().requires_grad_(True)
    y = torch.ones_like(x)
    if kind == "ce":
        loss = sigmoid_focal_loss(x, y, alpha=-1, gamma=0.0)
    elif kind == "focal":
        loss = sigmoid_focal_loss(x, y, alpha=-1, gamma=params.get("gamma", 2.0))
    elif kind == "fl_star":
        loss = fl_star_loss(x, y, gamma=params.get("gamma", 2.0), beta=params.get("beta", 1.0))
    else:
        raise ValueError(f"unknown loss '{kind}' (expected ce, focal or fl_star)")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(output_dir: str) -> list:
    """Write figure1_ce_vs_fl.png and figure3_4_losses_and_derivatives.png into output_dir."""
    from .atomic import atomic_write

    plt = _pyplot()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    p_t = torch.linspace(0.001, 0.999, 500, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=80)
    for gamma in FIGURE1_GAMMAS:
        ax.plot(p_t, focal_curve(p_t, gamma), label=f"gamma = {gamma:g}")
    ax.set(xlabel="probability of ground truth class (p_t)", ylabel="loss", ylim=(0, 5),
           title="Figure 1: focal loss -(1 - p_t)^gamma log(p_t)")
    ax.axvspan(0.6, 1.0, color="0.92")
    ax.text(0.62, 4.2, "well-classified\nexamples", fontsize=9)
    ax.legend()
    written.append(_save(fig, out / "figure1_ce_vs_fl.png", atomic_write, plt))

    x_t = torch.linspace(-10, 10, 500, dtype=torch.float64)
    fig, (ax_loss, ax_grad) = plt.subplots(1, 2, figsize=(10, 4), dpi=80)
    for name, kind, params in FIGURE3_LOSSES:
        loss, grad = loss_of_xt(x_t, kind, **params)
        ax_loss.plot(x_t, loss, label=name)
        ax_grad.plot(x_t, grad, label=name)
    ax_loss.set(xlabel="x_t", ylabel="loss", ylim=(0, 5), title="Figure 3: loss as a function of x_t")
    ax_grad.set(xlabel="x_t", ylabel="d loss / d x_t", ylim=(-1.3, 0.1), title="Figure 4: derivatives (eqs. 9-11)")
    ax_loss.legend(), ax_grad.legend()
    written.append(_save(fig, out / "figure3_4_losses_and_derivatives.png", atomic_write, plt))
    return written


def _save(fig, path: Path, atomic_write, plt) -> str:
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return str(path)
