"""diffusion_fast.mask_crop (inpainting's padding_mask_crop) against diffusers' VaeImageProcessor, pixel for pixel:
the crop box, the "fill" resize and the overlay, on random masks, image sizes, output sizes and paddings."""
import numpy as np
import PIL.Image
import pytest

from diffusion_fast import mask_crop


def _cases(n=120, seed=0):
    """(mask, image, output width, output height, pad): boxes of every shape and place (at an edge, the whole image,
    a single pixel), every 17th mask empty, images of odd sizes and outputs of other aspect ratios."""
    rng = np.random.default_rng(seed)
    for trial in range(n):
        h, w = (int(v) for v in rng.integers(8, 80, 2))
        mask = np.zeros((h, w), np.uint8)
        if trial % 17:
            y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
            mask[y0:y0 + int(rng.integers(1, h)), x0:x0 + int(rng.integers(1, w))] = int(rng.integers(1, 256))
        image = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        width, height = (int(v) for v in rng.choice([48, 64, 72, 96, 128], 2))
        yield PIL.Image.fromarray(mask), image, width, height, int(rng.integers(0, 20))


def test_crop_region_fill_and_overlay_are_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    processor, overlaid = VaeImageProcessor(vae_scale_factor=8), 0
    rng = np.random.default_rng(1)
    for mask, image, width, height, pad in _cases():
        box = mask_crop.crop_region(mask, width, height, pad)
        assert box == VaeImageProcessor.get_crop_region(mask, width, height, pad=pad)
        theirs = processor._resize_and_fill(image, width, height)
        assert np.array_equal(np.asarray(mask_crop.resize_fill(image, width, height)), np.asarray(theirs))
        if box[2] > box[0] and box[3] > box[1]:  # (an empty mask's box is degenerate in diffusers too)
            out = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            ours = mask_crop.paste_back(mask, image, out, box)
            assert np.array_equal(np.asarray(ours), np.asarray(processor.apply_overlay(mask, image, out, box)))
            overlaid += 1
    assert overlaid > 100


def test_inputs_that_are_not_images_are_named():
    image = PIL.Image.new("RGB", (16, 16))
    for call, name in ((lambda: mask_crop.crop_region(np.ones((4, 4)), 8, 8), "mask"),
                       (lambda: mask_crop.resize_fill("image.png", 8, 8), "image"),
                       (lambda: mask_crop.cropped_inputs(None, image, 8, 8, 0), "image"),
                       (lambda: mask_crop.paste_back(image, image, np.zeros((8, 8, 3)), (0, 0, 8, 8)), "image")):
        with pytest.raises(TypeError, match=f"{name} must be a PIL image"):
            call()


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_the_mask_mode_does_not_matter(mode):
    """A mask given as grayscale or RGB gives the same box and crop (made grayscale after the resize, as diffusers'
    mask processor does)."""
    mask = np.zeros((30, 40), np.uint8)
    mask[5:12, 20:33] = 255
    image = PIL.Image.fromarray(np.full((30, 40, 3), 90, np.uint8))
    base = mask_crop.cropped_inputs(image, PIL.Image.fromarray(mask), 64, 64, 3)
    other = mask_crop.cropped_inputs(image, PIL.Image.fromarray(mask).convert(mode), 64, 64, 3)
    assert base[2] == other[2] == (17, 0, 36, 19)  # 19x13 padded, grown to 19x19, moved down inside
    assert np.array_equal(np.asarray(base[1].convert("L")), np.asarray(other[1].convert("L")))
