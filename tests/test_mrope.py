"""papo.models.mrope: host-side, vectorised rope and vision indices equal to transformers' loops."""

import pytest
import torch
from model_fixtures import mixed_batch, tiny_policy
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

from papo.models.mrope import VisionInputs, mrope_positions


def _random_layout(gen, rows=6, merge=2):
    """Token types, mask and grids for rows of text and 0-3 images each, left-padded, with mask holes."""
    types, grids = [], []
    for _ in range(rows):
        row = []
        for _ in range(int(torch.randint(0, 4, (1,), generator=gen))):
            t, h, w = 1, merge * int(torch.randint(1, 6, (1,), generator=gen)), merge * int(torch.randint(1, 6, (1,), generator=gen))
            row += [0] * int(torch.randint(1, 5, (1,), generator=gen)) + [1] * (t * h * w // merge**2)
            grids.append([t, h, w])
        row += [0] * int(torch.randint(2, 6, (1,), generator=gen))  # the hole below lands on text
        types.append(row)
    L = max(map(len, types)) + 3
    tt = torch.zeros(rows, L, dtype=torch.long)
    mask = torch.zeros(rows, L, dtype=torch.long)
    for i, row in enumerate(types):
        tt[i, L - len(row):] = torch.tensor(row)
        mask[i, L - len(row):] = 1
    mask[0, -2] = 0  # a hole inside a row: transformers skips it like padding
    tt[0, -2] = 0
    return tt, mask, torch.tensor(grids, dtype=torch.long).view(-1, 3)


@pytest.fixture(scope="module")
def qwen25():
    return tiny_policy().model.model


@pytest.fixture(scope="module")
def qwen2():
    from transformers import Qwen2VLConfig, Qwen2VLModel

    cfg = Qwen2VLConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6]}),
                        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2))
    return Qwen2VLModel(cfg).eval()


@pytest.mark.parametrize("family", ["qwen25", "qwen2"])
@pytest.mark.parametrize("seed", range(4))
def test_rope_positions_equal_get_rope_index(family, seed, request):
    model = request.getfixturevalue(family)
    tt, mask, grids = _random_layout(torch.Generator().manual_seed(seed))
    ids = torch.zeros_like(tt)
    for use_mask in (True, False):
        m = mask if use_mask else None
        ref_pos, ref_delta = model.get_rope_index(ids, tt, grids if len(grids) else None, attention_mask=m)
        pos, delta = mrope_positions(tt, m, grids, model.config.vision_config.spatial_merge_size)
        assert torch.equal(pos, ref_pos) and torch.equal(delta, ref_delta)


def test_rope_positions_of_a_real_processor_batch(qwen25):
    policy = tiny_policy()
    _, prompts, images = mixed_batch(policy)  # two image sizes, left padding
    b = policy.encode(prompts, images).inputs
    ref = qwen25.get_rope_index(b["input_ids"], b["mm_token_type_ids"], b["image_grid_thw"], attention_mask=b["attention_mask"])
    got = mrope_positions(b["mm_token_type_ids"], b["attention_mask"], b["image_grid_thw"], 2)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_text_only_rows_count_from_zero_and_videos_defer_to_transformers():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos, delta = mrope_positions(torch.zeros(2, 5, dtype=torch.long), mask, None, 2)
    assert pos[0, 0].tolist() == [0, 0, 0, 1, 2] and pos[0, 1].tolist() == [0, 1, 2, 3, 4] and delta.tolist() == [[0], [0]]
    assert mrope_positions(torch.tensor([[0, 2, 2]]), None, None, 2) is None


def test_image_runs_must_match_their_grids():
    tt = torch.tensor([[0, 1, 1, 1, 0]])  # 3 image tokens, but a 1x4x4 grid merges to 4
    with pytest.raises(ValueError, match="does not match its image grid"):
        mrope_positions(tt, None, torch.tensor([[1, 4, 4]]), 2)
    with pytest.raises(ValueError, match="1 image token runs but 2 image grids"):
        mrope_positions(tt, None, torch.tensor([[1, 2, 2], [1, 2, 2]]), 2)


@pytest.mark.parametrize("family", ["qwen25", "qwen2"])
def test_vision_inputs_equal_the_towers_own_indices(family, request):
    visual = request.getfixturevalue(family).visual
    grids = torch.tensor([[1, 16, 16], [1, 10, 14], [1, 16, 16], [2, 8, 6], [1, 34, 18]])  # repeats, odd windows, t=2
    kw = VisionInputs(visual)(grids, "cpu")
    merge = visual.spatial_merge_size
    assert torch.equal(kw["image_position_ids"], get_vision_position_ids(grids, merge))
    cu, _ = get_vision_attention_seqlens(grids, visual.config)
    assert torch.equal(kw["image_cu_seqlens"], cu) and kw["image_max_seqlen"] == int((cu[1:] - cu[:-1]).max())
    if family == "qwen25":
        window, cu_window = get_vision_window_index(grids, merge, visual.window_size, visual.patch_size)
        assert torch.equal(kw["image_window_index"], window) and torch.equal(kw["image_cu_window_seqlens"], cu_window)
        assert kw["image_max_window_seqlen"] == int((cu_window[1:] - cu_window[:-1]).max())
    else:
        assert "image_window_index" not in kw


def test_precomputed_vision_inputs_give_the_same_image_features(qwen25):
    policy = tiny_policy()
    _, prompts, images = mixed_batch(policy)
    b = policy.encode(prompts, images).inputs
    with torch.no_grad():
        ref = qwen25.get_image_features(b["pixel_values"], b["image_grid_thw"]).pooler_output
        got = qwen25.get_image_features(b["pixel_values"], b["image_grid_thw"], **VisionInputs(qwen25.visual)(b["image_grid_thw"], "cpu")).pooler_output
    assert all(torch.equal(x, y) for x, y in zip(ref, got))
