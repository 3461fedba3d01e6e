"""Read every image of a dataset once before training: its header, or a full decode in parallel, cached.

A truncated JPEG or PNG has an intact header: only decoding every pixel finds it. `read_images`
decodes the files over a process pool, with a progress bar, and keeps each result in a cache file
keyed by the file's path, size and modification time (what the content decides: a size, a decode
error; never an I/O error such as EIO or EACCES, which says nothing about the content and is read
again next time), so that a dataset is decoded once and later
checks (`retinanet check-data`, every training start) read only the files that changed. As in
ultralytics' dataset scan (its `.cache` file beside the labels), the cache lives beside the
annotation file: `instances_train.json` -> `instances_train.cache`. Where that folder is not writable,
or a file of that name exists that is not such a cache (a user's file is never overwritten), it goes
to $XDG_CACHE_HOME/retinanet/image-checks/ (else ~/.cache/retinanet/image-checks/) instead.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..atomic import atomic_write
from .images import ImageError, PathLike, displayed_size, load_image

CACHE_FORMAT = "retinanet image checks"
# bump when what a decode checks changes, so that old results are not reused
# (2: I/O errors are no longer cached; a version-1 cache may hold one)
CACHE_VERSION = 2


@dataclass
class ImageResult:
    """What reading one file gave: the displayed (EXIF-oriented) size, or why it cannot be read."""

    height: Optional[int] = None
    width: Optional[int] = None
    error: Optional[str] = None  # None: readable; "image file not found"; "cannot read image: ..."
    io_error: bool = False  # the error came from reading the file (EIO, EACCES), not from its content


@dataclass
class ReadStats:
    """How `read_images` got its results: decoded now, or reused from `cache_file`."""

    decoded: int = 0
    cached: int = 0
    cache_file: Optional[str] = None  # where the results are kept; None when no cache was used or written
    cache_problem: Optional[str] = None  # why no cache could be written, if so


def _decode(path: str) -> ImageResult:
    """A full decode, exactly as training reads the file (`load_image`)."""
    try:
        height, width = load_image(path).shape[:2]
    except ImageError as e:
        return ImageResult(error=e.reason, io_error=e.io_error)
    return ImageResult(height, width)


def _header(path: str) -> ImageResult:
    try:
        height, width = displayed_size(path)
    except ImageError as e:
        return ImageResult(error=e.reason, io_error=e.io_error)
    return ImageResult(height, width)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _decode_all(paths: list, workers: int, progress: bool) -> list:
    """`_decode` of every path, in order: over a pool of `workers` processes when that is worth starting."""
    from tqdm import tqdm

    bar = dict(total=len(paths), desc="decoding images", unit="img", disable=not progress)
    if workers <= 1 or len(paths) < 2 * workers:
        return [_decode(p) for p in tqdm(paths, **bar)]
    # fork: the workers start at once, without importing the package again (forkserver and spawn would)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    chunk = max(1, min(64, len(paths) // (8 * workers)))
    with context.Pool(workers) as pool:
        return list(tqdm(pool.imap(_decode, paths, chunksize=chunk), **bar))


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/retinanet/image-checks, else ~/.cache/retinanet/image-checks."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retinanet" / "image-checks"


def cache_locations(json_path: PathLike) -> list:
    """Where the decode cache of the dataset described by `json_path` may be: beside it, then the cache folder."""
    json_path = Path(os.path.abspath(json_path))
    digest = hashlib.sha256(str(json_path).encode()).hexdigest()[:16]
    return [json_path.with_suffix(".cache"), default_cache_dir() / f"{json_path.stem}-{digest}.cache"]


def _load_cache(path: Path) -> Optional[dict]:
    """The entries of a cache file {abs path: [size, mtime_ns, height, width, error]}; None if `path`
    is absent or is not such a cache (then it may be a user's file, and is left alone)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("images"), dict):
        return None
    if data.get("version") != CACHE_VERSION:
        return {}  # ours, from another version: rewritten
    return data["images"]


def _write_cache(locations: list, json_path: PathLike, entries: dict) -> tuple:
    """Write `entries` to the first location that is free or already a cache; (path, None) or (None, why not)."""
    problems = []
    for path in locations:
        if path.exists() and _load_cache(path) is None:
            problems.append(f"{path} exists and is not a retinanet cache (left as it is)")
            continue
        try:
            with atomic_write(path, "w") as f:
                json.dump({"format": CACHE_FORMAT, "version": CACHE_VERSION, "annotations": str(json_path),
                           "images": entries}, f)
            return str(path), None
        except OSError as e:
            problems.append(f"{path}: {e.strerror or e}")
    return None, "; ".join(problems)


def read_images(files: list, *, decode: bool, json_path: Optional[PathLike] = None, workers: int = 0,
                progress: bool = False) -> tuple:
    """Read each file's header, or decode it fully; returns ([ImageResult per file], ReadStats).

    files: image paths. decode: False reads headers only (fast, no cache); True decodes every pixel,
    over `workers` processes (0: every core this process may use), reusing and updating the cache
    of the dataset `json_path` (None: no cache). A missing file is ImageResult(error="image file not found").
    """
    stats = ReadStats()
    results: list = [None] * len(files)
    keys = []  # (index, abs path, [size, mtime_ns]) of the files that exist
    for i, file in enumerate(files):
        path = os.path.abspath(file)
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            results[i] = ImageResult(error="image file not found")
            continue
        keys.append((i, path, [st.st_size, st.st_mtime_ns]))
    if not decode:
        from tqdm import tqdm

        for i, path, _ in tqdm(keys, desc="reading image headers", unit="img", disable=not progress):
            results[i] = _header(path)
        return results, stats

    locations = cache_locations(json_path) if json_path is not None else []
    cached: dict = {}
    for location in locations:
        found = _load_cache(location)
        if found:
            cached, stats.cache_file = found, str(location)
            break
    todo = []
    entries = {}
    for i, path, key in keys:
        entry = cached.get(path)
        if isinstance(entry, list) and len(entry) == 5 and entry[:2] == key:
            results[i] = ImageResult(*entry[2:])
            entries[path] = entry
        else:
            todo.append((i, path, key))
    stats.cached = len(keys) - len(todo)
    stats.decoded = len(todo)
    decoded = _decode_all([path for _, path, _ in todo], workers or available_cores(), progress)
    for (i, path, key), result in zip(todo, decoded):
        results[i] = result
        if not result.io_error:  # only what the content decides: a failed read is tried again next time
            entries[path] = key + [result.height, result.width, result.error]
    if locations and (todo or entries.keys() != cached.keys()):
        stats.cache_file, stats.cache_problem = _write_cache(locations, json_path, entries)
    return results, stats
