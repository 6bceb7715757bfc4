import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from papo.data.images import to_rgb
from papo.data.masking import (
    MaskingConfig,
    PatchLayout,
    apply_cell_mask,
    blacken,
    blacken_pixel_patches,
    corrupt_images,
    draw_cell_mask,
    gaussian_noise,
    image_pair,
    image_views,
    is_patch_aligned,
    mask_rng,
    random_mask_pixel_values,
    random_patch_blackening,
    register_masking,
    saliency_patch_blackening,
)


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(1, 256, size=(h, w, 3), dtype=np.uint8))  # no pixel is black


def _black(img):
    return (np.asarray(img) == 0).all(-1)


def test_masked_fraction_is_about_p_and_cells_are_all_or_nothing():
    img = _image(560, 560)
    fractions = []
    for draw in range(20):
        out = random_patch_blackening(img, 0.6, mask_rng(0, "s", draw))
        black = _black(out)
        cells = black.reshape(40, 14, 40, 14)
        assert (cells.all(axis=(1, 3)) == cells.any(axis=(1, 3))).all()  # each 14x14 cell is wholly black or not
        fractions.append(black.mean())
    assert abs(np.mean(fractions) - 0.6) < 0.01
    assert out.size == img.size and out.mode == "RGB"


def test_unmasked_pixels_are_untouched():
    img = _image(70, 42)
    out = random_patch_blackening(img, 0.5, mask_rng(1, 2))
    black = _black(out)
    np.testing.assert_array_equal(np.asarray(out)[~black], np.asarray(img)[~black])


def test_border_cells_are_truncated():
    img = _image(30, 20)  # 3 x 2 cells of 14 px, the last column 2 px wide and last row 6 px high
    cell_mask = np.zeros((2, 3), dtype=bool)
    cell_mask[1, 2] = True
    black = _black(apply_cell_mask(img, cell_mask))
    expected = np.zeros((20, 30), dtype=bool)
    expected[14:20, 28:30] = True
    np.testing.assert_array_equal(black, expected)
    assert draw_cell_mask(20, 30, 0.5, np.random.default_rng(0)).shape == (2, 3)


def test_ratio_zero_and_one():
    img = _image(56, 56)
    np.testing.assert_array_equal(np.asarray(random_patch_blackening(img, 0.0)), np.asarray(img))
    assert _black(random_patch_blackening(img, 1.0)).all()
    assert _black(blacken(img)).all()
    with pytest.raises(ValueError, match="ratio"):
        random_patch_blackening(img, 1.5)


def test_reproducible_per_seed_sample_and_draw():
    img = _image(112, 84)
    a = random_patch_blackening(img, 0.6, mask_rng(7, "sample-3", 0))
    b = random_patch_blackening(img, 0.6, mask_rng(7, "sample-3", 0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for other in (mask_rng(8, "sample-3", 0), mask_rng(7, "sample-4", 0), mask_rng(7, "sample-3", 1), mask_rng(7, "sample-3", 0, 1)):
        assert not np.array_equal(_black(a), _black(random_patch_blackening(img, 0.6, other)))


def test_multi_image_prompt_gets_independent_masks():
    img = _image(112, 112)
    m1, m2 = corrupt_images([img, img], MaskingConfig(), seed=0, sample_id="x")
    assert not np.array_equal(_black(m1), _black(m2))
    again = corrupt_images([img, img], MaskingConfig(), seed=0, sample_id="x")
    np.testing.assert_array_equal(np.asarray(again[1]), np.asarray(m2))


def test_per_response_masks_differ_within_a_group_and_repeat_across_runs():
    """VPPO's masks: each rollout of a prompt its own, keyed by its index; PAPO's one mask per prompt keeps the
    keys it always had."""
    from papo.data.synthetic import make_sample

    sample = make_sample("count", "train", 0, 0, size=112)
    full, views = image_views(sample, MaskingConfig(ratio=0.5), seed=3, draw=7, responses=3)
    assert len(views) == 3 and all(len(v) == len(full) for v in views)
    blacks = [_black(v[0]) for v in views]
    assert not np.array_equal(blacks[0], blacks[1]) and not np.array_equal(blacks[1], blacks[2])
    _, again = image_views(sample, MaskingConfig(ratio=0.5), seed=3, draw=7, responses=3)
    for a, b in zip(views, again):
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    _, (shared,) = image_views(sample, MaskingConfig(ratio=0.5), seed=3, draw=7)
    before = corrupt_images(sample.load_images(None, None), MaskingConfig(ratio=0.5), 3, sample.id, 7)
    np.testing.assert_array_equal(np.asarray(shared[0]), np.asarray(before[0]))
    assert image_pair(sample, MaskingConfig(ratio=0.5), 3, 7)[1][0].tobytes() == shared[0].tobytes()


@pytest.mark.parametrize("mode", ["P", "RGBA", "L", "LA", "CMYK", "I;16"])
def test_any_pil_mode_is_decoded_to_rgb_first(mode):
    src = _image(42, 28).convert(mode) if mode != "I;16" else Image.fromarray(np.full((28, 42), 300, dtype=np.uint16))
    out = random_patch_blackening(src, 1.0)
    assert out.mode == "RGB" and out.size == (42, 28) and _black(out).all()
    kept = random_patch_blackening(src, 0.0)
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(src.convert("RGB")))


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_bytes_dict_path_and_array_inputs(tmp_path):
    img = _image(28, 28)
    path = tmp_path / "a.png"
    img.save(path)
    for src in ({"bytes": _png_bytes(img), "path": None}, {"bytes": None, "path": str(path)}, str(path), path,
                _png_bytes(img), np.asarray(img)):
        np.testing.assert_array_equal(np.asarray(to_rgb(src)), np.asarray(img))


def test_bad_images_give_clear_errors(tmp_path):
    data = _png_bytes(_image(56, 56))
    with pytest.raises(ValueError, match="row 3: undecodable image"):
        to_rgb({"bytes": data[: len(data) // 2]}, source="row 3")  # truncated
    with pytest.raises(ValueError, match="undecodable"):
        to_rgb(b"not an image at all")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        to_rgb(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="neither 'bytes' nor 'path'"):
        to_rgb({"bytes": None, "path": None})
    with pytest.raises(TypeError, match="cannot read an image from int"):
        to_rgb(3)


def test_gaussian_noise():
    img = Image.new("RGB", (56, 56), (128, 128, 128))
    a = gaussian_noise(img, 0.6, np.random.default_rng(0))
    b = gaussian_noise(img, 0.6, np.random.default_rng(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = np.asarray(a, dtype=np.float32) / 255
    assert a.size == img.size and 0.3 < x.std() < 0.5  # clipped N(0.5, 0.6^2) has std ~0.39


def test_saliency_hook_masks_most_salient_cells_first():
    img = _image(56, 28)  # 4 x 2 cells
    saliency = np.zeros((28, 56))
    saliency[14:, 42:] = 5.0  # bottom-right cell
    saliency[:14, :14] = 1.0  # top-left cell
    black = _black(saliency_patch_blackening(img, saliency, ratio=0.25))  # 2 of 8 cells
    expected = np.zeros((28, 56), dtype=bool)
    expected[14:, 42:] = expected[:14, :14] = True
    np.testing.assert_array_equal(black, expected)


def test_custom_strategy_registry():
    register_masking("left-half", lambda im, rng: apply_cell_mask(im, np.array([[True, False]]), cell=28))
    (out,) = corrupt_images([_image(56, 28)], MaskingConfig(strategy="left-half"), seed=0, sample_id=0)
    assert _black(out)[:, :28].all() and not _black(out)[:, 28:].any()
    register_masking("shrink", lambda im, rng: im.resize((14, 14)))
    with pytest.raises(ValueError, match="changed the image size"):
        corrupt_images([_image(56, 28)], MaskingConfig(strategy="shrink"), seed=0, sample_id=0)
    with pytest.raises(ValueError, match="unknown masking strategy 'semantic'"):
        MaskingConfig(strategy="semantic")


# ----------------------------------------------------------- fast path on the processor's pixel_values


def _processor(patch_size=14, **kw):
    # a fresh size dict: passing min/max_pixels would mutate the class default (tiny-vlm-recipe pitfall 3)
    return Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": 1024 * 1024},
                                    patch_size=patch_size, **kw)


@pytest.mark.parametrize("patch_size,sizes", [(14, [(84, 56), (56, 112)]), (16, [(64, 96)])])
def test_fast_path_equals_reprocessing_the_pixel_masked_image(patch_size, sizes):
    """Qwen2.5-VL (14-px patches, merge 2) and Qwen3-VL-style (16-px patches, mean/std 0.5)."""
    kw = {} if patch_size == 14 else {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    proc = _processor(patch_size, **kw)
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    batch = proc(images=images, return_tensors="pt")
    for img, thw in zip(images, batch["image_grid_thw"]):
        assert is_patch_aligned(img.size, thw, patch_size)

    layout = PatchLayout.from_image_processor(proc)
    rngs = lambda: [mask_rng(3, "row", 0, i) for i in range(len(images))]  # noqa: E731
    fast = random_mask_pixel_values(batch["pixel_values"], batch["image_grid_thw"], 0.6, rngs(), layout)
    pixel_masked = [random_patch_blackening(im, 0.6, rng, cell=patch_size) for im, rng in zip(images, rngs())]
    slow = proc(images=pixel_masked, return_tensors="pt")
    assert torch.equal(slow["image_grid_thw"], batch["image_grid_thw"])
    torch.testing.assert_close(fast, slow["pixel_values"], atol=1e-5, rtol=0)
    changed = (fast != batch["pixel_values"]).any(-1).float().mean()
    assert 0.4 < changed < 0.8  # about 60 % of the rows were blackened


def test_fast_path_row_order_with_single_patch_mask():
    proc = _processor()
    img = _image(56, 28)  # grid 2 x 4 patches
    batch = proc(images=[img], return_tensors="pt")
    cell_mask = np.zeros((2, 4), dtype=bool)
    cell_mask[1, 2] = True  # the patch in row 1, column 2 -> merged block 1, position (1, 0) -> row 4 + 2 = 6
    fast = blacken_pixel_patches(batch["pixel_values"], batch["image_grid_thw"], [cell_mask],
                                 PatchLayout.from_image_processor(proc))
    assert (fast != batch["pixel_values"]).any(-1).nonzero().flatten().tolist() == [6]
    slow = proc(images=[apply_cell_mask(img, cell_mask)], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_fast_path_detects_resized_images_and_bad_shapes():
    proc = Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56})
    img = _image(100, 100)  # not a multiple of 28, and above max_pixels: the processor resizes it
    batch = proc(images=[img], return_tensors="pt")
    assert not is_patch_aligned(img.size, batch["image_grid_thw"][0], 14)
    layout = PatchLayout.from_image_processor(proc)
    with pytest.raises(ValueError, match="does not match image grid"):
        blacken_pixel_patches(batch["pixel_values"], batch["image_grid_thw"], [np.zeros((3, 3), bool)], layout)
    with pytest.raises(ValueError, match="layout expects"):
        blacken_pixel_patches(batch["pixel_values"][:, :10], batch["image_grid_thw"], [np.zeros((4, 4), bool)], layout)


def test_noisy_rollout_schedule_and_noise_hand_computed():
    from papo.data.noising import diffusion_noise, noise_step_at

    # the authors' Geometry3K schedule over 60 steps: alpha_0 = 500, lambda = 30, gamma = 40
    # step 30: x = 30 * (30 - 40) / 60 = -5, keep = 1 - sigmoid(-5) = 0.99331 -> floor(496.65) = 496
    assert noise_step_at(30, 60) == 496
    assert noise_step_at(40, 60) == 250  # x = 0: keep 0.5
    assert noise_step_at(50, 60) == 3  # keep = 1 - sigmoid(5) = 0.00669
    # DVRP's schedule 500 * sigmoid(10 * (0.5 - t / T)): a mid step below 1 is a fraction of the run
    assert (noise_step_at(0, 100, 500, 10.0, 0.5), noise_step_at(50, 100, 500, 10.0, 0.5)) == (496, 250)
    flat = Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8))
    noisy = np.asarray(diffusion_noise(flat, 200, np.random.default_rng(0)), dtype=np.float64) / 255
    # step 200: sqrt(abar) = 0.99388, sqrt(1 - abar) = 0.11048; grey 128/255 = 0.50196 -> mean 0.49889, std 0.11048,
    # minus half a grey level on average from truncating to 8 bits; clipping at 0 and 1 is 4.5 std away
    assert abs(noisy.mean() - (0.49889 - 0.5 / 255)) < 0.005 and abs(noisy.std() - 0.11048) < 0.005
    small = np.asarray(diffusion_noise(flat, 0, np.random.default_rng(0)), dtype=np.float64)
    assert abs((small - 128).std() - 0.00473 * 255) < 0.3  # step 0: std 0.0047, about one grey level
