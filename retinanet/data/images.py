"""Image files -> RGB uint8 arrays, as a person viewing the file sees them.

Pillow decodes; this module settles what Pillow leaves to the caller, so that every image reaches
the detector as (H, W, 3) uint8 RGB and annotations mean the same pixels a viewer shows:

- EXIF orientation is applied (`ImageOps.exif_transpose`): height, width and boxes refer to the
  displayed image. Orientations 5-8 swap height and width.
- Modes: RGB as is; grayscale (L, 1) repeated to three channels; palette (P, PA) through its colors
  (P with transparency goes through RGBA, as Pillow asks); CMYK by Pillow's conversion; alpha (LA, RGBA,
  PA) is dropped, keeping the color channels as stored (no compositing onto a background).
- 16-bit grayscale (I;16, I;16B, I;16L, I;16N, and I, which Pillow uses for 16-bit PNG and TIFF) is scaled
  over its full range, value / 257 rounded (65535 -> 255, 32896 -> 128). Pillow's own convert("L")
  saturates every value above 255 to white. I-mode values outside 0..65535 are an error.
  16-bit RGB files are reduced to 8 bits by Pillow's decoder (high byte, floor(value / 256)) before
  this module sees them: at most 1 below value / 257 rounded, never saturated.
- 32-bit float images (F) have no defined range and are an error.
- A truncated or undecodable file is an `ImageError` naming the file; so is a file the system
  cannot read (an I/O error, a permission), flagged `io_error` (not a property of its content). Pillow's global
  `ImageFile.LOAD_TRUNCATED_IMAGES` is left at its default (False).

Files are opened read-only; nothing is ever written to them.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

PathLike = Union[str, "os.PathLike[str]"]

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# EXIF orientations that transpose the image (rotate by 90 or 270 degrees, possibly mirrored)
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


class ImageError(ValueError):
    """An image file that cannot be used; the message is "<where>: <reason>".

    where: the file, followed by its image id where that is known.
    io_error: the file could not be read (an I/O error, a permission): true of this attempt, not of
    the file's content, unlike a decode error (truncated, corrupt, unsupported), which a file of the
    same size and mtime repeats.
    `ImageError(message)` with one argument also works: DataLoader workers re-raise it that way.
    """

    def __init__(self, where: PathLike, reason: str = "", io_error: bool = False):
        super().__init__(f"{where}: {reason}" if reason else str(where))
        self.where, self.reason, self.io_error = str(where), reason, io_error


def _unusable(path: PathLike, error: Exception) -> ImageError:
    """The ImageError for what opening or decoding `path` raised. An OSError with an errno comes from
    the operating system (EIO, EACCES, ...): Pillow's decode errors are OSErrors without one."""
    if isinstance(error, FileNotFoundError):
        return ImageError(path, "image file not found")
    if isinstance(error, OSError) and error.errno is not None:
        return ImageError(path, f"cannot read the file: {error.strerror or error}", io_error=True)
    return ImageError(path, f"cannot read image: {error}")


def load_image(path: PathLike) -> np.ndarray:
    """Decode an image file fully -> (H, W, 3) uint8 RGB array of the displayed (EXIF-oriented) image."""
    try:
        with Image.open(path) as img:
            img.load()  # decode every pixel here, so a truncated file fails inside this try
            img = ImageOps.exif_transpose(img)
            return to_rgb_array(img, path)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _unusable(path, e) from None


def displayed_size(path: PathLike) -> tuple:
    """(height, width) of the displayed image, from the file's header only (no pixel decoding).

    Reads the EXIF orientation that the header holds. A PNG whose eXIf chunk follows the pixel data
    (rare) shows its orientation only to a full decode; `load_image` always applies it.
    """
    try:
        with Image.open(path) as img:
            if img.format == "PNG":
                # PngImageFile.getexif() decodes the whole image to look for a late eXIf chunk;
                # the base method reads only what the header already gave.
                exif = Image.Image.getexif(img)
            else:
                exif = img.getexif()
            width, height = img.size
            orientation = exif.get(ExifTags.Base.Orientation, 1)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _unusable(path, e) from None
    if orientation in SWAPPING_ORIENTATIONS:
        return width, height
    return height, width


def to_rgb_array(img: Image.Image, path: PathLike = "<image>") -> np.ndarray:
    """A decoded Pillow image in any supported mode -> (H, W, 3) uint8 RGB (rules in the module docstring)."""
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64)  # (H, W); I;16B arrives big-endian, astype makes it native
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageError(path, f"{mode} image has values outside 0..65535 "
                                   f"({values.min()}..{values.max()}); only 16-bit data is supported")
        # round(v / 257) = floor((2v + 257) / 514); 2v + 257 is odd, so there are no halves to break
        gray = ((2 * values + 257) // 514).astype(np.uint8)  # (H, W)
        return np.repeat(gray[:, :, None], 3, axis=2)  # (H, W, 3)
    if mode == "F":
        raise ImageError(path, "32-bit float images (mode F) have no defined range; convert the file to 8 or 16 bits")
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow applies palette transparency only on the way to RGBA
    try:
        rgb = img.convert("RGB")  # L, 1, P, PA, LA, RGBA (alpha dropped), CMYK, YCbCr, ...
    except ValueError:
        raise ImageError(path, f"unsupported image mode {mode}") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def to_chw(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) uint8, a view of the array's memory (channels last)."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1], the model's input format."""
    return to_chw(array).to(torch.float32).div_(255.0)
