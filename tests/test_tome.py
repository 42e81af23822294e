"""ToMe and FOLDER inside the vision encoder against independent references written from the
published algorithms (one image at a time, plain Python lists for the matching), on fixed tensors
and through a tiny LLaVA-1.5 whose encoder the reference runs block by block from the model's own
modules."""

from __future__ import annotations

import math

import pytest
import torch

import tokenpress
from tokenpress.core.matching import bipartite_assign
from tokenpress.core.signals import ClsAttention
from tokenpress.testing import llava_batch, sample_prompts
from tokenpress.testing.models import tiny_llava
from tokenpress_plugins.tome.schedule import inflected

# --- the published matching, one image at a time ------------------------------------------------------------


def reference_matching(metric: torch.Tensor, r: int, class_token: bool, keep_order: bool) -> list[list[int]]:
    """ToMe's bipartite soft matching over a whole sequence (the class token, when there is one, at index 0):
    the output tokens, each the list of input indices merged into it, in the output order.

    Alternate tokens into A (even indices) and B (odd); each A token's match is its most similar B token
    by cosine similarity; the class token never merges; the r A tokens with the most similar matches
    merge into them. ToMe's order: the unmerged A tokens in index order, then B. FOLDER's released code
    puts every survivor back at its index order instead."""
    count = metric.shape[0]
    r = min(r, (count - (1 if class_token else 0)) // 2)
    unit = [row / row.norm() for row in metric]
    a_index, b_index = list(range(0, count, 2)), list(range(1, count, 2))
    best, match = [], []
    for position, i in enumerate(a_index):
        scores = [float(unit[i] @ unit[j]) for j in b_index]
        if class_token and position == 0:
            scores = [-math.inf] * len(b_index)
        best.append(max(scores))
        match.append(scores.index(max(scores)))
    ranked = sorted(range(len(a_index)), key=lambda k: -best[k])  # Python's sort is stable: ties keep index order
    merged, unmerged = set(ranked[:r]), sorted(ranked[r:])
    groups = {a_index[k]: [a_index[k]] for k in unmerged}
    for j, b in enumerate(b_index):
        groups[b] = [b] + [a_index[k] for k in sorted(merged) if match[k] == j]
    if keep_order:
        return [groups[index] for index in sorted(groups)]
    return [groups[a_index[k]] for k in unmerged] + [groups[b] for b in b_index]


def merge_groups(values: torch.Tensor, size: torch.Tensor, groups: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """ToMe's merge_wavg: each output the size-weighted mean of its group; sizes add up."""
    merged = torch.stack([sum(values[i] * size[i] for i in group) / sum(size[i] for i in group) for group in groups])
    return merged, torch.stack([sum(size[i] for i in group) for group in groups])


def _groups_of(assign: torch.Tensor, offset: int) -> list[list[int]]:
    slots = int(assign.max()) + 1
    return [[int(i) + offset for i in torch.nonzero(assign == slot).flatten()] for slot in range(slots)]


@pytest.mark.parametrize("keep_order", [False, True])
@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_bipartite_assign_is_the_published_matching(seed: int, class_token: bool, keep_order: bool) -> None:
    """Two rows of different lengths in one batch, each against the reference alone: the same output
    tokens, made of the same inputs, in the same order."""
    generator = torch.Generator().manual_seed(seed)
    lengths, merges = [37, 24], [9, 12]
    metric = torch.randn(2, 37 + int(class_token), 8, generator=generator)
    valid = torch.zeros(2, 37, dtype=torch.bool)
    for row, length in enumerate(lengths):
        valid[row, :length] = True
    offset = int(class_token)  # the reference sees the class token at index 0, the state does not hold it
    assign = bipartite_assign(metric[:, offset:], valid, merges, class_token=class_token, keep_order=keep_order)
    for row, (length, r) in enumerate(zip(lengths, merges, strict=True)):
        expected = reference_matching(metric[row, : length + offset], r, class_token, keep_order)
        if class_token:
            assert expected[0] == [0]  # the class token never merges, and comes first
            expected = expected[1:]
        assert _groups_of(assign[row, :length], offset) == [sorted(group) for group in expected]
        assert (assign[row, length:] == -1).all()


# --- the published ToMe / FOLDER inside a CLIP encoder, from the model's own modules ---------------------------


def reference_encoder(model, pixels: torch.Tensor, merges: list[int], fold: bool,
                      blocks: int = 3) -> tuple[torch.Tensor, torch.Tensor, list]:
    """One image through the tower block by block as ToMe's patched blocks run: attention with
    log(size) added to every key's logits, then the matching on the keys averaged over heads (the class
    token protected), the size-weighted merge, then the MLP. ``fold`` (FOLDER) repeats the matching in
    a block until it has merged its count, merging the metric with the tokens, survivors in index
    order. Runs ``blocks`` blocks; returns their output, the sizes, and each token's patches (the class
    token first, as -1)."""
    tower = model.model.vision_tower
    vision = getattr(tower, "vision_model", tower)
    hidden = vision.pre_layrnorm(vision.embeddings(pixels[None]))[0]
    size = torch.ones(hidden.shape[0])
    groups = [[index] for index in range(hidden.shape[0])]
    for layer, r in zip(list(vision.encoder.layers)[:blocks], merges + [0] * blocks, strict=False):
        attention = layer.self_attn
        heads, width = attention.num_heads, hidden.shape[-1] // attention.num_heads
        normed = layer.layer_norm1(hidden)
        q, k, v = (proj(normed).view(-1, heads, width).transpose(0, 1)
                   for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
        logits = q @ k.transpose(-1, -2) * attention.scale + size.log()
        mixed = (torch.softmax(logits, -1) @ v).transpose(0, 1).reshape(hidden.shape)
        hidden = hidden + attention.out_proj(mixed)
        metric = k.mean(0)
        while r > 0:
            now = min(r, (hidden.shape[0] - 1) // 2)
            outputs = reference_matching(metric, now, class_token=True, keep_order=fold)
            metric, _ = merge_groups(metric, size, outputs)
            hidden, size = merge_groups(hidden, size, outputs)
            groups = [sum((groups[i] for i in output), []) for output in outputs]
            r = r - now if fold else 0
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return hidden, size, [sorted(index - 1 for index in group) for group in groups]


def _features_by_patches(tokens: tokenpress.TokenState, image: int) -> dict[tuple[int, ...], torch.Tensor]:
    owner = tokens.patch_owner()[image]
    slots = torch.nonzero(tokens.valid[image]).flatten().tolist()
    return {tuple(torch.nonzero(owner == slot).flatten().tolist()): tokens.embeddings[image, slot] for slot in slots}


@pytest.mark.parametrize(("method", "params", "merges", "fold"), [
    ("tome", {"r": 7}, [7, 7, 7], False),  # constant r over the three blocks that feed the features
    ("tome", {"r": 6, "inflection": -0.5}, inflected(6, -0.5, 3), False),  # ToMe's decreasing schedule
    ("folder", {"r": 30}, [0, 0, 30], True),  # all in the last block, more than half: folded
])
@torch.no_grad()
def test_merges_inside_the_encoder_equal_the_published_algorithm(recorded_tokens, method, params, merges,
                                                                 fold) -> None:
    model = tiny_llava("sdpa", encoder_layers=4)  # features from block 2's output: blocks 0-2 feed them
    batch = llava_batch(model, sample_prompts(2))
    stack = {"name": "m", "stages": [{"method": method, "params": params}, {"method": "test-record-tokens"}]}
    with tokenpress.compress(model, stack) as handle:
        model(**batch)
    tokens = recorded_tokens[0]
    assert [record.block for record in handle.records if record.method == method] == [
        block for block, r in enumerate(merges) if r or method == "tome"]
    for image in range(batch["pixel_values"].shape[0]):
        hidden, _, groups = reference_encoder(model, batch["pixel_values"][image], merges, fold)
        features, groups = hidden[1:], groups[1:]
        ours = _features_by_patches(tokens, image)
        assert sorted(ours) == sorted(tuple(group) for group in groups)  # the same partition of the patches
        for feature, group in zip(features, groups, strict=True):
            torch.testing.assert_close(ours[tuple(group)], feature, rtol=1e-4, atol=1e-5)
        cells = tokens.grid_index[image, tokens.valid[image]].tolist()
        assert cells == sorted(min(group) for group in groups)  # in raster order, at their first patch
        assert tokens.size[image, tokens.valid[image]].tolist() == [len(group) for group in sorted(
            groups, key=min)]


def test_r_zero_is_the_identity_and_never_biases_attention() -> None:
    model = tiny_llava("sdpa", encoder_layers=4)
    batch = llava_batch(model, sample_prompts(2))
    with torch.no_grad():
        expected = model(**batch).logits
        with tokenpress.compress(model, {"name": "z", "stages": [{"method": "tome", "params": {"r": 0}}]}):
            actual = model(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("stack", "error", "match"), [
    ({"method": "tome", "params": {"r": [1, 2]}}, tokenpress.StackError, "lists 2 values for 3 listed encoder blocks"),
    ({"method": "tome", "layers": [3], "params": {"r": 2}}, tokenpress.StackError,
     "encoder block 3 does not feed the features"),
    ({"method": "tome", "params": {"r": 2, "keep_ratio": 0.5}}, tokenpress.StackError, "either r"),
    ({"method": "folder", "params": {"inflection": 0.5, "keep_ratio": 0.5}}, tokenpress.StackError,
     "single number"),
])
def test_bad_stacks_are_one_sentence_and_leave_the_model_untouched(stack, error, match) -> None:
    model = tiny_llava("sdpa", encoder_layers=4)
    with pytest.raises(error, match=match) as info:
        tokenpress.compress(model, {"name": "bad", "stages": [stack]})
    assert "\n" not in str(info.value) and "forward" not in model.model.__dict__


class _ReadsCls(tokenpress.Method):
    name = "test-reads-cls"
    Config = tokenpress.MethodConfig
    points = ("post_encoder",)
    layer = 3
    seen: list = []

    def required_signals(self):
        return [ClsAttention(layer=_ReadsCls.layer)]

    @tokenpress.hookimpl
    def post_encoder(self, tokens, context):
        _ReadsCls.seen.append((tokens, context.signals[ClsAttention(layer=_ReadsCls.layer)]))
        return tokens


@torch.no_grad()
def test_a_signal_is_read_after_every_merge_and_laid_out_like_the_tokens(register_methods) -> None:
    """Signals are laid out like the final tokens: one read in layer 2 while ToMe merges in block 2 is
    refused; one read in layer 3 (after every merge) follows the merged tokens, sorted with them."""

    register_methods(_ReadsCls)
    model = tiny_llava("sdpa", encoder_layers=4)
    stages = [{"method": "tome", "params": {"r": 2}}, {"method": "test-reads-cls"}]
    _ReadsCls.layer = 2
    with pytest.raises(tokenpress.StackError, match="changes the tokens inside encoder block 2"):
        tokenpress.compress(model, {"name": "s", "stages": stages})
    _ReadsCls.layer = 3
    batch = llava_batch(model, sample_prompts(1))
    with tokenpress.compress(model, {"name": "s", "stages": stages}) as handle:
        model(**batch)
    assert [record.tokens_in for record in handle.records] == [[36], [34], [32], [30]]
    tokens, signal = _ReadsCls.seen[-1]
    hidden, size, groups = reference_encoder(model, batch["pixel_values"][0], [2, 2, 2], fold=False)
    tower = model.model.vision_tower
    block = getattr(tower, "vision_model", tower).encoder.layers[3]
    attention, normed = block.self_attn, block.layer_norm1(hidden)
    heads = attention.num_heads
    q = attention.q_proj(normed[:1]).view(1, heads, -1).transpose(0, 1)
    k = attention.k_proj(normed).view(-1, heads, q.shape[-1]).transpose(0, 1)
    expected = torch.softmax(q @ k.transpose(-1, -2) * attention.scale + size.log(), -1).mean(0)[0, 1:]
    by_patches = {tuple(group): value for group, value in zip(groups[1:], expected, strict=True)}
    owner = tokens.patch_owner()[0]
    for slot in range(30):
        patches = tuple(torch.nonzero(owner == slot).flatten().tolist())
        torch.testing.assert_close(signal[0, slot], by_patches[patches], rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_llava_next_tiles_merge_alone_then_stitch_and_unpad(recorded_tokens) -> None:
    """Each tile merges on its own; the crops' tokens are stitched and unpadded as the model does it:
    every unpadded patch has exactly one token, a token's patches lie in one crop, its cell is its first
    patch, its size the number of its patches. Padded (32x64) and unpadded (64x64) images in one batch."""
    from tokenpress.testing.families import FAMILIES, prompts

    spec = FAMILIES["llava-next"]
    model = spec.build("sdpa")
    batch = spec.mixed_batch(model, prompts(3))
    stack = {"name": "m", "stages": [{"method": "tome", "params": {"r": 5}}, {"method": "test-record-tokens"}]}
    with tokenpress.compress(model, stack):
        model(**batch)
    tokens = recorded_tokens[0]
    side = 4  # a 32-pixel tile of 8-pixel patches
    for row in range(tokens.num_images):
        _, height, width = tokens.original_grid[row].tolist()
        owner = tokens.owner[row, : height * width]
        slots = torch.nonzero(tokens.valid[row]).flatten()
        assert (owner >= 0).all() and set(owner.tolist()) == set(slots.tolist())
        cells = torch.arange(height * width)
        for slot in slots.tolist():
            patches = cells[owner == slot]
            assert tokens.grid_index[row, slot] == patches.min() and tokens.size[row, slot] == len(patches)
            if (height, width) == (2 * side, 2 * side):  # an unpadded 2x2 crop grid: merges stay in a crop
                assert len({(int(p) // width // side, int(p) % width // side) for p in patches}) == 1
        assert tokens.grid_index[row, slots].tolist() == sorted(tokens.grid_index[row, slots].tolist())


@torch.no_grad()
def test_tokens_kept_count_from_the_encoders_patches() -> None:
    """Reports and eval's 'tokens kept' start from the patches the encoder was given, not from what
    reached its output after merging inside it."""
    model = tiny_llava("sdpa", encoder_layers=4)
    batch = llava_batch(model, sample_prompts(2))
    with tokenpress.compress(model, {"name": "t", "stages": [{"method": "tome", "params": {"r": 6}}]}) as handle:
        model(**batch)
    assert handle.prefill_stats.visual_in == [36, 36]
    assert handle.prefill_stats.layer_visual[-1] == [18, 18]  # three blocks, six merges each


# --- after the encoder, on a family that runs no stage inside its encoder ------------------------------------


def reference_fold(features: torch.Tensor, metric: torch.Tensor, merges: int) -> tuple[torch.Tensor, list]:
    """The published matching repeated on what is left until ``merges`` tokens are merged (at most half a
    time), the metric merged with the tokens, survivors in index order: the merged features and each
    output's input indices."""
    size = torch.ones(features.shape[0])
    groups = [[index] for index in range(features.shape[0])]
    while merges > 0:
        now = min(merges, features.shape[0] // 2)
        outputs = reference_matching(metric, now, class_token=False, keep_order=True)
        metric, _ = merge_groups(metric, size, outputs)
        features, size = merge_groups(features, size, outputs)
        groups = [sum((groups[i] for i in output), []) for output in outputs]
        merges -= now
    return features, [sorted(group) for group in groups]


@pytest.mark.parametrize(("method", "params", "merged"), [
    ("tome", {"keep_ratio": 0.25}, 12),  # 16 units -> 4: three folded matchings
    ("folder", {"r": 3}, 6),  # r per encoder block, 2 blocks
])
@torch.no_grad()
def test_after_the_encoder_on_a_windowed_vit_equals_the_folded_published_matching(recorded_tokens, register_methods,
                                                                                    method, params, merged) -> None:
    """Qwen2.5-VL runs no stage inside its windowed encoder: ToMe and FOLDER merge once after it, on the last
    block's head-averaged keys, folded; the result equals the reference on the same features and keys."""
    from tokenpress.core.signals import EncoderKeys
    from tokenpress.testing.contract import tiny_model
    from tokenpress.testing.families import FAMILIES, prompts

    seen = []

    class RecordsKeys(tokenpress.Method):
        name = "test-records-keys"
        Config = tokenpress.MethodConfig
        points = ("post_encoder",)

        def required_signals(self):
            return [EncoderKeys(layer=-1, heads="mean")]

        @tokenpress.hookimpl
        def post_encoder(self, tokens, context):
            seen.append((tokens, context.signals[EncoderKeys(layer=-1, heads="mean")]))
            return tokens

    register_methods(RecordsKeys)
    model = tiny_model("qwen2.5-vl")
    batch = FAMILIES["qwen2.5-vl"].mixed_batch(model, prompts(2))
    with tokenpress.compress(model, {"name": "k", "stages": [{"method": "test-records-keys"}]}):
        model(**batch)
    before, metric = seen[0]
    stack = {"name": "m", "stages": [{"method": method, "params": params}, {"method": "test-record-tokens"}]}
    with tokenpress.compress(model, stack) as handle:
        model(**batch)
    assert handle.stack.stages[0].after_encoder and handle.records[0].stage.endswith("after the encoder)")
    after = recorded_tokens[0]
    for image in range(before.num_images):
        count = int(before.valid[image].sum())
        features, groups = reference_fold(before.embeddings[image, :count], metric[image, :count],
                                          min(merged, count - 1) if method == "folder" else
                                          count - max(1, round(count * 0.25)))
        ours = _features_by_patches(after, image)
        assert sorted(ours) == sorted(tuple(group) for group in groups)
        for feature, group in zip(features, groups, strict=True):
            torch.testing.assert_close(ours[tuple(group)], feature, rtol=1e-4, atol=1e-5)
