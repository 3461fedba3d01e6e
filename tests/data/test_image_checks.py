"""Truncated images: found by `retinanet check-data` by default, decoded once (cached), and at training's start-up."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

from retinanet.cli import main
from retinanet.data import image_checks
from retinanet.data.validate import validate_coco

from .conftest import coco, image_record, save_image


def _truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])  # the header survives, the pixel data is cut


@pytest.fixture
def dataset(tmp_path):
    """ann.json over 4 good PNGs (ids 1-4), a truncated PNG (id 5) and a truncated JPEG (id 6), all 24 x 32."""
    folder = tmp_path / "images"
    noise = np.random.default_rng(0).integers(0, 256, size=(24, 32, 3))
    names = [f"good{i}.png" for i in range(1, 5)] + ["cut.png", "cut.jpg"]
    for name in names:
        save_image(folder / name, noise, **({"quality": 95} if name.endswith(".jpg") else {}))
    _truncate(folder / "cut.png")
    _truncate(folder / "cut.jpg")
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco([image_record(i + 1, n, 24, 32) for i, n in enumerate(names)], [])))
    return path, folder


def _check_data(path, folder, *extra):
    return main(["check-data", "--json", str(path), "--images", str(folder), *extra])


def test_check_data_decodes_by_default_and_quick_reads_headers_only(dataset, capsys):
    path, folder = dataset
    assert _check_data(path, folder, "--quick") == 0  # the headers are intact
    out = capsys.readouterr().out
    assert "0 errors" in out and "cut" not in out
    assert not path.with_suffix(".cache").exists()  # headers are not cached
    assert _check_data(path, folder) == 1
    out = capsys.readouterr().out
    assert f"error: {folder / 'cut.png'} (image id 5): cannot read image" in out
    assert f"error: {folder / 'cut.jpg'} (image id 6): cannot read image" in out
    assert "2 errors" in out and "images decoded: 6, taken from the cache: 0" in out
    assert "2 unreadable image(s)" in out and "data.skip_unreadable: true" in out


def test_second_check_takes_every_result_from_the_cache(dataset, monkeypatch, capsys):
    path, folder = dataset
    assert _check_data(path, folder) == 1
    first = capsys.readouterr().out
    cache = path.with_suffix(".cache")  # ann.json -> ann.cache, beside it
    entries = json.loads(cache.read_text())["images"]
    cut = folder / "cut.jpg"
    assert entries[str(cut)][:2] == [cut.stat().st_size, cut.stat().st_mtime_ns]  # keyed by path, size, mtime
    assert entries[str(cut)][2:4] == [None, None] and entries[str(cut)][4].startswith("cannot read image")
    assert entries[str(folder / "good1.png")][2:] == [24, 32, None]

    decoded = []

    def counting_decode(p):
        decoded.append(p)
        return real_decode(p)
    real_decode = image_checks._decode
    monkeypatch.setattr(image_checks, "_decode", counting_decode)
    assert _check_data(path, folder, "--workers", "1") == 1
    second = capsys.readouterr().out
    assert decoded == []
    assert "images decoded: 0, taken from the cache: 6" in second
    assert [line for line in first.splitlines() if line.startswith("error")] == \
           [line for line in second.splitlines() if line.startswith("error")]

    # a repaired file (new size and mtime) is decoded again, and only it
    save_image(cut, np.zeros((24, 32, 3)), quality=95)
    assert _check_data(path, folder, "--workers", "1") == 1
    assert decoded == [str(cut)]
    out = capsys.readouterr().out
    assert "images decoded: 1, taken from the cache: 5" in out and "1 errors" in out and "cut.jpg" not in out


def test_cache_never_overwrites_a_users_file(dataset, tmp_path, monkeypatch, capsys):
    path, folder = dataset
    mine = path.with_suffix(".cache")
    mine.write_text("my own notes")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _check_data(path, folder) == 1
    assert mine.read_text() == "my own notes"
    [elsewhere] = (tmp_path / "xdg" / "retinanet" / "image-checks").iterdir()
    assert f"cached in {elsewhere}" in capsys.readouterr().out
    assert _check_data(path, folder) == 1  # found there the second time
    assert "taken from the cache: 6" in capsys.readouterr().out and mine.read_text() == "my own notes"


def test_process_pool_gives_the_in_process_results(dataset):
    path, folder = dataset
    alone = validate_coco(path, folder, check_images="decode", workers=1, cache=False)
    pooled = validate_coco(path, folder, check_images="decode", workers=2, cache=False)  # 6 images: a pool of 2
    assert alone.errors == pooled.errors and len(pooled.errors) == 2
    assert [u["id"] for u in pooled.unreadable] == [5, 6]
    assert pooled.read_stats.decoded == 6 and pooled.read_stats.cache_file is None


def test_missing_file_is_an_error_but_not_unreadable(dataset):
    path, folder = dataset
    (folder / "good2.png").unlink()
    report = validate_coco(path, folder, check_images="decode", workers=1)
    assert f"{folder / 'good2.png'} (image id 2): image file not found" in report.errors
    assert [u["id"] for u in report.unreadable] == [5, 6]
    left_out = report.leave_out_unreadable()
    assert len(left_out) == 2 and "image id 5" in left_out[0] and "image id 6" in left_out[1]
    assert report.errors == [f"{folder / 'good2.png'} (image id 2): image file not found"]
    assert [i["id"] for i in report.images] == [1, 2, 3, 4] and set(report.annotations) == {1, 2, 3, 4}


@pytest.mark.parametrize("failure", [errno.EIO, errno.EACCES])
def test_a_read_error_is_reported_but_never_cached(dataset, monkeypatch, capsys, failure):
    """An I/O error (a flaky disk, a permission fixed later) says nothing about the file's content: the
    check reports it this time and reads the file again next time; a decode error is cached."""
    from PIL import Image

    path, folder = dataset
    flaky = folder / "good3.png"
    real_open = Image.open

    def failing_open(fp, *args, **kwargs):
        if str(fp) == str(flaky):
            raise OSError(failure, os.strerror(failure), str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", failing_open)
    assert _check_data(path, folder, "--workers", "1") == 1
    out = capsys.readouterr().out
    assert f"error: {flaky} (image id 3): cannot read the file: {os.strerror(failure)}" in out
    entries = json.loads(path.with_suffix(".cache").read_text())["images"]
    assert str(flaky) not in entries and entries[str(folder / "cut.png")][4].startswith("cannot read image")

    monkeypatch.setattr(Image, "open", real_open)  # the disk recovers, the permission is fixed
    assert _check_data(path, folder, "--workers", "1") == 1
    out = capsys.readouterr().out
    assert "images decoded: 1, taken from the cache: 5" in out and "good3" not in out and "2 errors" in out
