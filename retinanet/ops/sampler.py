"""Balanced sampling of anchors / RoIs for a minibatch (Faster R-CNN sec. 3.1.3; Fast R-CNN sec. 2.3).

Labels: -1 ignore, 0 negative (background), >= 1 positive (a class + 1 for the RoI heads).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def sample_balanced(labels: Tensor, num_per_image: int, positive_fraction: float,
                    generator: Optional[torch.Generator] = None) -> Tensor:
    """Pick, in each image, at most int(num_per_image * positive_fraction) positives at random and
    fill the rest of num_per_image with random negatives (fewer of either if there are not enough),
    as torchvision's BalancedPositiveNegativeSampler: missing negatives are not replaced by positives.

    labels (B, N) int in {-1, 0, >= 1} -> (B, N) bool, True for the sampled items. Batched over
    images: a random order per row, stably sorted by kind; an item's rank among the items of its kind
    decides whether it is taken.

    Example: labels [[1, 1, 1, 0, 0, 0, 0, -1]], num 4, fraction 0.25 -> 1 positive, 3 negatives.
    """
    b, n = labels.shape
    pos, neg = labels >= 1, labels == 0
    num_pos = pos.sum(dim=1).clamp(max=int(num_per_image * positive_fraction))  # (B,)
    num_neg = torch.minimum(neg.sum(dim=1), num_per_image - num_pos)  # (B,)
    # positives first, then negatives, then ignored; random order within each kind (two stable sorts)
    kind = (~pos).to(torch.int64) + (~pos & ~neg).to(torch.int64)  # 0 positive, 1 negative, 2 ignored
    order = torch.argsort(torch.rand(b, n, generator=generator, device=labels.device), dim=1)  # (B, N)
    order = order.gather(1, torch.argsort(kind.gather(1, order), dim=1, stable=True))
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=labels.device).expand(b, n))
    rank_in_kind = torch.where(pos, rank, rank - pos.sum(dim=1, keepdim=True))
    return (pos & (rank_in_kind < num_pos[:, None])) | (neg & (rank_in_kind < num_neg[:, None]))
