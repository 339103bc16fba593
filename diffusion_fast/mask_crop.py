"""Inpainting's ``padding_mask_crop`` ("inpaint only masked"), as diffusers' image processor does it: the rectangle
around the mask, padded and widened to the output's aspect ratio, is cut from the image and mask and resized to the
output size (filling the short side with stretched edge rows or columns); the pipeline inpaints that, and the result
is pasted back into the original image, the original kept wherever the mask is not white.

PIL images only, as in diffusers (the pipelines refuse other inputs with this option).
"""
from __future__ import annotations

import numpy as np


def _check_image(name, value):
    import PIL.Image

    if not isinstance(value, PIL.Image.Image):
        raise TypeError(f"{name} must be a PIL image, got {type(value).__name__}")


def crop_region(mask, width: int, height: int, pad: int = 0):
    """(x1, y1, x2, y2): the smallest box holding every non-zero pixel of ``mask`` (made grayscale), ``pad`` pixels
    wider each way within the image, then grown about its centre to the aspect ratio of ``width`` x ``height`` and
    shifted back inside the image; diffusers' get_crop_region, including its int truncations."""
    _check_image("mask", mask)
    array = np.array(mask.convert("L"))
    h, w = array.shape
    cols, rows = np.flatnonzero(array.any(axis=0)), np.flatnonzero(array.any(axis=1))
    # (an all-black mask: the whole image, as diffusers' scans from both sides give)
    left, right = (int(cols[0]), w - 1 - int(cols[-1])) if cols.size else (w, w)
    top, bottom = (int(rows[0]), h - 1 - int(rows[-1])) if rows.size else (h, h)
    x1, y1 = int(max(left - pad, 0)), int(max(top - pad, 0))
    x2, y2 = int(min(w - right + pad, w)), int(min(h - bottom + pad, h))
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _widen(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), mask.height)
    else:
        x1, x2 = _widen(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), mask.width)
    return x1, y1, x2, y2


def _widen(lo, hi, grow, limit):
    """[lo, hi) grown by ``grow`` about its centre, then moved back inside [0, limit] (diffusers' order of steps)."""
    lo, hi = lo - grow // 2, hi + grow - grow // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def resize_fill(image, width: int, height: int):
    """``image`` resized (Lanczos) to fit inside ``width`` x ``height`` keeping its aspect ratio, centred on an RGB
    canvas, the bands left at the short side filled with its first and last row (or column) stretched: diffusers'
    resize mode "fill"."""
    import PIL.Image

    _check_image("image", image)
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=PIL.Image.LANCZOS)
    canvas = PIL.Image.new("RGB", (width, height))
    canvas.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            canvas.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            canvas.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                         box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            canvas.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            canvas.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                         box=(fill + src_w, 0))
    return canvas


def _resize_crop(image, width: int, height: int):
    """``image`` resized (Lanczos) to cover ``width`` x ``height`` keeping its aspect ratio, centred on an RGB canvas
    of that size (the overhang cut): diffusers' resize mode "crop"."""
    import PIL.Image

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=PIL.Image.LANCZOS)
    canvas = PIL.Image.new("RGB", (width, height))
    canvas.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return canvas


def cropped_inputs(image, mask, width: int, height: int, pad: int):
    """(image, mask, crop box): the box around the mask cut from both and resized to the output size, as diffusers'
    image and mask processors take them with ``crops_coords`` and resize mode "fill"."""
    _check_image("image", image)
    box = crop_region(mask, width, height, pad)
    return resize_fill(image.crop(box), width, height), resize_fill(mask.crop(box), width, height), box


def paste_back(mask, original, image, box):
    """The inpainted crop ``image`` resized into ``box`` of ``original``, with the original kept (alpha-composited
    over it) where the mask is not white: diffusers' apply_overlay."""
    import PIL.Image
    from PIL import ImageOps

    for name, value in (("mask", mask), ("original", original), ("image", image)):
        _check_image(name, value)
    width, height = original.width, original.height
    kept = PIL.Image.new("RGBa", (width, height))
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    kept = kept.convert("RGBA")
    x, y, x2, y2 = box
    canvas = PIL.Image.new("RGBA", (width, height))
    canvas.paste(_resize_crop(image, x2 - x, y2 - y), (x, y))
    canvas = canvas.convert("RGB").convert("RGBA")
    canvas.alpha_composite(kept)
    return canvas.convert("RGB")
