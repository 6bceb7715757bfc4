import pytest
from PIL import Image

from papo.data.images import resize_to_pixel_bounds
from papo.data.sample import PAPO_FORMAT_SUFFIX, Sample, chat_content, format_prompt, strip_format_suffix


def test_papo_resize_rule_hand_computed():
    # 100 x 100 = 10,000 px < 200,704: factor sqrt(20.0704) = 4.48, but 100 * 4.48 is 447.999... in floating
    # point and the official rule truncates, so the result is 447 x 447 (just below min_pixels), as upstream
    assert resize_to_pixel_bounds(Image.new("RGB", (100, 100))).size == (447, 447)
    # 2000 x 1000 > 1,003,520: factor sqrt(0.50176) = 0.70835 -> int(1416.7), int(708.35)
    assert resize_to_pixel_bounds(Image.new("RGB", (2000, 1000))).size == (1416, 708)
    # inside the bounds: untouched
    assert resize_to_pixel_bounds(Image.new("RGB", (640, 480))).size == (640, 480)
    assert resize_to_pixel_bounds(Image.new("RGB", (448, 448)), 28 * 28, 224 * 224).size == (224, 224)
    with pytest.raises(ValueError, match="exceeds"):
        resize_to_pixel_bounds(Image.new("RGB", (8, 8)), 100, 10)


def test_sample_load_images_resizes_after_decoding():
    s = Sample("a", "<image>q", "1", [Image.new("RGB", (2000, 1000))])
    assert s.load_images()[0].size == (1416, 708)
    assert s.load_images(None, None)[0].size == (2000, 1000)


def test_prompt_format_and_chat_content():
    text = format_prompt("  <image>How many?  ")
    assert text == "<image>How many?\n\n" + PAPO_FORMAT_SUFFIX
    assert strip_format_suffix(text) == "<image>How many?"
    content = chat_content("<image>Compare <image> and say.", ["A", "B"])
    assert content == [{"type": "image", "image": "A"}, {"type": "text", "text": "Compare "},
                       {"type": "image", "image": "B"}, {"type": "text", "text": " and say."}]
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        chat_content("<image><image>", ["A"])
