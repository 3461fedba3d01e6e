"""ops/postprocess.py's shared steps: each image's best k items, split per image."""

import torch

from retinanet.ops.postprocess import segment_rank, top_per_image


def test_top_per_image_by_hand():
    image = torch.tensor([0, 1, 0, 0, 1, 0])
    scores = torch.tensor([0.125, 0.875, 0.5, 0.5, 0.25, 0.375])
    out = top_per_image(image, scores, 2, 3, {"scores": scores, "index": torch.arange(6)})
    assert [list(d) for d in out] == [["scores", "index"]] * 3
    assert out[0]["index"].tolist() == [2, 3]  # 0.5, 0.5 (equal scores: input order), then 0.375 is cut
    assert out[1]["index"].tolist() == [1, 4] and out[1]["scores"].tolist() == [0.875, 0.25]
    assert out[2]["index"].shape == (0,) and out[2]["scores"].shape == (0,)  # an image with nothing


def test_top_per_image_equals_the_copies_it_replaced():
    """ops/postprocess.py and roi_heads.py each ranked, cut and split with their own lines; the same tensors."""
    g = torch.Generator().manual_seed(0)
    n, b, k = 700, 4, 50
    image = torch.randint(0, b - 1, (n,), generator=g)  # image 3 has nothing
    scores = torch.randint(0, 40, (n,), generator=g).float() / 40  # many equal scores
    boxes, labels = torch.rand(n, 4, generator=g), torch.randint(0, 5, (n,), generator=g)
    keep = torch.randperm(n, generator=g)[:600]  # e.g. NMS survivors
    order, rank = segment_rank(image[keep], scores[keep])
    old_keep = keep[order[rank < k]]
    counts = torch.bincount(image[old_keep], minlength=b).tolist()
    old = [{"boxes": bx, "scores": sc, "labels": lb} for bx, sc, lb in
           zip(boxes[old_keep].split(counts), scores[old_keep].split(counts), labels[old_keep].split(counts))]
    new = top_per_image(image[keep], scores[keep], k, b, {"boxes": boxes[keep], "scores": scores[keep],
                                                          "labels": labels[keep]})
    assert len(new) == b and [len(d["scores"]) for d in new] == [k, k, k, 0]
    for a, o in zip(new, old):
        assert list(a) == list(o) and all(torch.equal(a[key], o[key]) for key in o)
