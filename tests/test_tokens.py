"""TokenState operations against plain-Python references."""

from __future__ import annotations

import torch

from tokenpress import TokenState, keep_count, keep_counts_on_host
from tokenpress.core.select import topk_mask
from tokenpress.core.tokens import pack_index, window_cells
from tokenpress_plugins.pool.grid import pool_grid


def make_state(images: int = 3, side: int = 4, dim: int = 5, seed: int = 0) -> TokenState:
    generator = torch.Generator().manual_seed(seed)
    return TokenState.from_dense(torch.randn(images, side * side, dim, generator=generator), (1, side, side))


def test_keep_preserves_order_and_tracks_positions_per_image():
    state = make_state()
    generator = torch.Generator().manual_seed(1)
    mask = torch.rand(3, 16, generator=generator) > 0.5
    kept = state.keep(mask)
    for image in range(3):
        picks = [j for j in range(16) if mask[image, j]]
        count = len(picks)
        assert kept.counts()[image] == count
        assert kept.grid_index[image, :count].tolist() == picks
        assert torch.equal(kept.embeddings[image, :count], state.embeddings[image, picks])
        assert not kept.valid[image, count:].any()
        for slot, patch in enumerate(picks):
            assert kept.source[image, slot].nonzero().flatten().tolist() == [patch]


def test_merge_averages_by_size_and_unions_provenance():
    state = make_state(images=1, side=2, dim=3)
    first = state.merge(torch.tensor([[0, 0, 1, 2]]), 3)  # tokens 0 and 1 merge
    assert first.size[0].tolist() == [2.0, 1.0, 1.0]
    second = first.merge(torch.tensor([[0, 1, 0]]), 2)  # merged token (size 2) with token 3 (size 1)
    expected = (state.embeddings[0, 0] + state.embeddings[0, 1] + state.embeddings[0, 3]) / 3
    torch.testing.assert_close(second.embeddings[0, 0], expected)
    assert second.size[0].tolist() == [3.0, 1.0]
    assert second.source[0, 0].nonzero().flatten().tolist() == [0, 1, 3]
    assert second.grid_index[0].tolist() == [0, 2]  # a merged token takes its first member's position


def test_merge_drops_tokens_assigned_minus_one():
    state = make_state(images=1, side=2)
    merged = state.merge(torch.tensor([[0, -1, 1, -1]]), 2)
    torch.testing.assert_close(merged.embeddings[0], state.embeddings[0, [0, 2]])
    assert merged.size.sum() == 2


def test_replace_with_a_new_grid_keeps_provenance():
    state = make_state(images=2, side=4)
    pooled = pool_grid(torch.stack([state.dense_grid(i)[0] for i in range(2)]), 2, "avg")
    new = state.replace(pooled.reshape(2, 4, -1), grid=(1, 2, 2), assign=window_cells(4, 4, 2).expand(2, -1))
    assert new.is_dense() and new.grid[0].tolist() == [1, 2, 2]
    assert new.size[0].tolist() == [4.0, 4.0, 4.0, 4.0]
    assert new.source[0, 1].nonzero().flatten().tolist() == [2, 3, 6, 7]


def test_pack_index_and_topk_mask_match_python():
    generator = torch.Generator().manual_seed(2)
    scores = torch.rand(4, 10, generator=generator)
    candidates = torch.rand(4, 10, generator=generator) > 0.3
    counts = torch.tensor([1, 3, 0, 10])
    mask = topk_mask(scores, candidates, counts)
    for row in range(4):
        ranked = sorted((j for j in range(10) if candidates[row, j]), key=lambda j: -scores[row, j].item())
        assert set(mask[row].nonzero().flatten().tolist()) == set(ranked[: counts[row]])
    index, valid = pack_index(candidates)
    for row in range(4):
        assert index[row][valid[row]].tolist() == candidates[row].nonzero().flatten().tolist()


def test_keep_count_rounds_and_keeps_at_least_one():
    assert keep_count(torch.tensor([576, 576, 3]), 0.5).tolist() == [288, 288, 2]
    assert keep_count(torch.tensor([576]), 0.11).tolist() == [63]
    assert keep_count(torch.tensor([4]), 0.01).tolist() == [1]


def test_pool_bilinear_is_llava_onevisions_interpolation():
    """``pool`` with ``mode: bilinear`` and kernel 2 is LLaVA-OneVision's own ``apply_pooling`` (its
    video-frame pooling, ceil(h / 2) x ceil(w / 2), bilinear, corners not aligned), called here from
    transformers on the same features, on an even and an odd grid."""
    from types import SimpleNamespace

    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    for side in (6, 7):
        features = torch.randn(3, side * side, 5, generator=torch.Generator().manual_seed(side))
        owner = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=side * 14,
                                                                                     patch_size=14)))
        expected = LlavaOnevisionModel.apply_pooling(owner, features)
        ours = pool_grid(features.view(3, side, side, 5), 2, "bilinear").reshape(3, -1, 5)
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_keep_counts_on_host_is_keep_count_on_python_ints() -> None:
    """The host rule must round exactly like the tensor rule (half to even, at least one), or a method's
    promised widths would disagree with what it keeps."""
    counts = list(range(0, 700))
    for ratio in (0.5, 0.25, 0.11, 1 / 9, 0.125, 0.333, 1.0, 0.001):
        assert keep_counts_on_host(counts, ratio) == keep_count(torch.tensor(counts), ratio).tolist()


def test_the_host_knows_grids_and_counts_after_the_encoder_and_a_regrid() -> None:
    """What grid_sizes() and counts_on_host() answer without a device read equals the tensors."""
    tokens = TokenState.from_dense(torch.randn(2, 36, 4), [(1, 6, 6), (1, 4, 6)])
    assert tokens.known_grid == ((1, 6, 6), (1, 4, 6)) and tokens.known_dense
    pooled = tokens.regrid(lambda grid: torch.nn.functional.avg_pool2d(
        grid.permute(0, 3, 1, 2), 2, ceil_mode=True).permute(0, 2, 3, 1), 2)
    assert pooled.known_grid is not None and pooled.known_dense
    assert pooled.grid_sizes() == [tuple(row) for row in pooled.grid.tolist()] == [(1, 3, 3), (1, 2, 3)]
    assert pooled.counts_on_host() == pooled.counts().tolist() == [9, 6]
    kept = pooled.keep(pooled.valid, counts=[9, 6])
    assert kept.counts_on_host() == [9, 6] and not kept.known_dense and kept.is_dense()  # read, still right
    dropped = pooled.keep(torch.arange(9).expand(2, -1) < 4)
    assert dropped.known_counts is None and dropped.counts_on_host() == [4, 4] and not dropped.is_dense()
