"""Summary tokens (tokens that stand for the whole image, without a grid cell) and the ``qformer``
method that makes them: bookkeeping, layout, and the unfitted module against the algorithm it
starts as (soft region pooling), written here from its definition."""

from __future__ import annotations

import math

import pytest
import torch

import tokenpress
from tokenpress import TokenState
from tokenpress.core.tokens import NO_CELL, SHARED
from tokenpress.testing.families import FAMILIES, prompts
from tokenpress_plugins.qformer.module import QFormerModule, query_homes


def qformer(queries: int = 4) -> dict:
    return {"name": "q", "stages": [{"method": "qformer", "params": {"queries": queries}}]}


def test_summary_tokens_share_the_patches_of_their_image():
    state = TokenState.from_dense(torch.randn(2, 6, 3), (1, 2, 3))
    kept = state.keep(torch.tensor([[True, False, True, True, False, True], [True] * 6]))
    summary = kept.summarize(torch.randn(2, 3, 5), space="llm")
    assert summary.grid_index.tolist() == [[NO_CELL] * 3] * 2
    assert summary.grid.tolist() == [[0, 0, 0]] * 2 and summary.space == "llm"
    assert summary.size.sum(-1).tolist() == pytest.approx([4.0, 6.0])  # each an equal share
    assert summary.owner.tolist() == [[SHARED, -1, SHARED, SHARED, -1, SHARED], [SHARED] * 6]
    assert summary.source[0].tolist() == [[True, False, True, True, False, True]] * 3
    one = summary.keep(torch.tensor([[True, False, False], [False] * 3]))
    assert one.owner.tolist() == [[SHARED, -1, SHARED, SHARED, -1, SHARED], [-1] * 6]  # image 1 kept none
    assert summary.patch_owner(torch.tensor([[False] * 3, [False, True, False]])).tolist() == [[-1] * 6, [SHARED] * 6]


def test_a_merge_of_summary_tokens_is_a_summary_token_and_a_mixed_merge_takes_the_cell():
    state = TokenState.from_dense(torch.randn(1, 4, 3), (1, 2, 2))
    summary = state.summarize(torch.randn(1, 2, 3))
    assert summary.merge(torch.tensor([[0, 0]]), 1).grid_index.tolist() == [[NO_CELL]]
    mixed = TokenState.from_dense(torch.randn(1, 3, 3), (1, 1, 3)).select(torch.tensor([[2, 1, 0]]))
    mixed = type(mixed)(**{**mixed.__dict__, "grid_index": torch.tensor([[NO_CELL, 1, 0]])})
    assert mixed.merge(torch.tensor([[0, 0, 1]]), 2).grid_index.tolist() == [[1, 0]]


def test_the_unfitted_module_is_soft_region_pooling():
    """Query k reads softmax_n(-s * |home_k - centre_n|^2) over the valid tokens (s = 1 / (2 sigma^2),
    sigma half a region), homes on a 3 x 3 grid for 9 queries; then the projector."""
    torch.manual_seed(0)
    width, side = 8, 6
    module = QFormerModule(torch.nn.Identity(), width, 9, heads=2, layers=2)
    tokens = torch.randn(2, side * side, width)
    valid = torch.ones(2, side * side, dtype=torch.bool)
    valid[1, 20:] = False
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    centres = torch.stack([(rows.flatten() + 0.5) / side, (cols.flatten() + 0.5) / side], -1).expand(2, -1, -1)
    out = module(tokens, valid, centres)

    sharpness = 1 / (2 * (0.5 / 3) ** 2)
    for image in range(2):
        for k in range(9):
            home = torch.tensor([(k // 3 + 0.5) / 3, (k % 3 + 0.5) / 3])
            weights = [math.exp(-sharpness * float(((home - centres[image, n]) ** 2).sum()))
                       if valid[image, n] else 0.0 for n in range(side * side)]
            expected = sum(w * tokens[image, n] for n, w in enumerate(weights)) / sum(weights)
            torch.testing.assert_close(out[image, k], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
@torch.no_grad()
def test_summary_tokens_are_laid_out_like_text_after_the_image(family):
    """The compressed prompt equals the model given the queries' outputs as input embeddings in place
    of the image's placeholders, at text positions (one after another, on every M-RoPE axis)."""
    spec = FAMILIES[family]
    model = spec.build("eager")
    batch = spec.batch(model, prompts(1), "left", 0)
    queries = 5
    with tokenpress.compress(model, qformer(queries)) as handle:
        actual = model(**batch).logits
        media = {key: value for key, value in batch.items() if key not in ("input_ids", "attention_mask")}
        encoded, _ = handle.adapter.encode_images(media, {})
        features = handle.entries[0].method.weights(encoded.embeddings, encoded.valid, encoded.cell_centres())
    ids = batch["input_ids"][0]
    placeholder = torch.isin(ids, torch.tensor(handle.adapter.placeholder_ids()))
    first, last = int(placeholder.nonzero()[0]), int(placeholder.nonzero()[-1])
    embeds = model.get_input_embeddings()(ids)
    inputs = torch.cat([embeds[:first], features[0], embeds[last + 1:]]).unsqueeze(0)
    expected = model(inputs_embeds=inputs).logits
    after = len(ids) - last - 1
    torch.testing.assert_close(actual[:, -after:], expected[:, -after:], rtol=1e-5, atol=1e-5)
    assert handle.records[0].tokens_out == [queries]


@torch.no_grad()
def test_llava_next_puts_each_tile_rows_queries_after_its_grid_without_newlines():
    spec = FAMILIES["llava-next"]
    model = spec.build("eager")
    batch = spec.batch(model, prompts(2), "left", 0)
    with tokenpress.compress(model, qformer(3)) as handle:
        model(**batch)
    assert handle.records[0].tokens_out == [6, 6]  # base tile row and high-resolution row: 3 each
    assert [counts for counts in handle.prefill_stats.layer_visual[0]] == [6, 6]


def test_a_heads_count_that_does_not_divide_the_width_is_refused_in_one_sentence():
    model = FAMILIES["llava"].build("eager")
    stack = {"name": "q", "stages": [{"method": "qformer", "params": {"heads": 7}}]}
    with pytest.raises(tokenpress.core.errors.TokenpressError, match=r"stages\[0\].*heads: 7 does not divide"):
        tokenpress.compress(model, stack)


def test_fitting_a_qformer_is_reproducible_and_moves_its_homes(tmp_path, checkpoint):
    """Two fits from one seed write byte-identical files; fitting changes the queries' homes."""
    from PIL import Image
    from safetensors.torch import load_file

    from tokenpress.runtime.loading import load_model_and_processor
    from tokenpress.tools.calibration import PromptedImage
    from tokenpress.tools.fit import fit

    generator = torch.Generator().manual_seed(0)

    def picture() -> Image.Image:
        return Image.fromarray(torch.randint(0, 255, (48, 48, 3), generator=generator, dtype=torch.uint8).numpy())

    train = [PromptedImage(picture(), f"w{5 + i} w{9 + i}") for i in range(4)]
    held = [PromptedImage(picture(), "w7 w8")]
    files = []
    for run in range(2):
        model, processor = load_model_and_processor(checkpoint)
        fit(model, processor, qformer(4), train, held, tmp_path / f"run{run}", steps=3, batch_size=2, lr=1e-2,
            seed=0, progress=False)
        files.append(tmp_path / f"run{run}" / "qformer-heads4-layers2-queries4.safetensors")
    assert files[0].read_bytes() == files[1].read_bytes()
    homes = load_file(str(files[0]))["homes"]
    assert not torch.equal(homes, query_homes(4)[0])


def test_a_projector_replacement_after_another_is_refused_in_one_sentence():
    family = FAMILIES["llava"]
    model = family.build("eager")
    batch = family.batch(model, prompts(1), "left", 0)
    stack = {"name": "twice", "stages": [{"method": "qformer", "params": {"queries": 4}},
                                         {"method": "ldp", "params": {"stride": 2}}]}
    with pytest.raises(tokenpress.StackError) as error:  # before any forward pass
        tokenpress.compress(model, stack)
    message = str(error.value)
    assert message.startswith("<dict>: stages[1] (ldp) cannot run after stages[0] (qformer): ldp replaces the "
                              "projector and needs tokens in encoder space")
    assert "\n" not in message and tokenpress.attached_handle(model) is None
    with torch.no_grad():
        assert model(**batch).logits.shape[0] == 1
