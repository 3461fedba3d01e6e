"""Balanced positive/negative sampling: counts worked out by hand."""

import torch

from retinanet.ops.sampler import sample_balanced


def labels_of(num_pos, num_neg, num_ignored=0, n=None):
    row = torch.tensor([1] * num_pos + [0] * num_neg + [-1] * num_ignored)
    return row[torch.randperm(row.numel())]


def counts(labels, mask):
    return [(int((mask[i] & (labels[i] >= 1)).sum()), int((mask[i] & (labels[i] == 0)).sum()))
            for i in range(labels.shape[0])]


def test_counts_per_image():
    labels = torch.stack([
        labels_of(10, 100, 10),  # enough of both: 32 * 0.25 = 8 positives, 24 negatives
        labels_of(3, 107, 10),   # too few positives: all 3, then 29 negatives fill the batch
        labels_of(30, 5, 85),    # too few negatives: 8 positives, all 5 negatives (no refill with positives)
        labels_of(0, 110, 10),   # an image with no boxes: 32 negatives
        labels_of(0, 0, 120),    # everything ignored: nothing
    ])
    mask = sample_balanced(labels, 32, 0.25)
    assert counts(labels, mask) == [(8, 24), (3, 29), (8, 5), (0, 32), (0, 0)]
    assert not (mask & (labels < 0)).any()


def test_fraction_rounds_down_and_labels_above_one_are_positive():
    labels = torch.tensor([[3, 2, 1, 5, 0, 0, 0, 0, 0, 0]])  # class + 1 labels, as the RoI heads use
    mask = sample_balanced(labels, 5, 0.5)  # int(2.5) = 2 positives, 3 negatives
    assert counts(labels, mask) == [(2, 3)]
    mask = sample_balanced(labels, 100, 0.5)  # asks for more than there is: everything
    assert mask.all()


def test_random_choice_and_generator():
    labels = labels_of(50, 50)[None].repeat(2, 1)
    a = sample_balanced(labels, 20, 0.5, torch.Generator().manual_seed(0))
    b = sample_balanced(labels, 20, 0.5, torch.Generator().manual_seed(0))
    c = sample_balanced(labels, 20, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # the two images draw independently
    # every positive is chosen about equally often (10 of 50 each time: 0.2)
    freq = torch.stack([sample_balanced(labels[:1], 20, 0.5)[0] for _ in range(400)]).float().mean(0)
    pos = labels[0] >= 1
    assert freq[pos].min() > 0.1 and freq[pos].max() < 0.3


def test_no_items():
    assert sample_balanced(torch.zeros(2, 0, dtype=torch.int64), 8, 0.5).shape == (2, 0)
