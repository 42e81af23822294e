"""PruMerge / PruMerge+ against an independent reference written from the published algorithm (the
LLaVA-PruMerge reference code's steps, one kept token at a time), on fixed tensors and on a tiny
LLaVA-1.5 through the stage itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tokenpress
from tokenpress.core.select import topk_mask
from tokenpress.core.tokens import pack_index
from tokenpress.testing import llava_batch, sample_prompts
from tokenpress.testing.models import tiny_llava
from tokenpress_plugins.prumerge.merge import merge_neighbours, outlier_share, rest_token, spatial_samples


def reference(cls_attn: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, plus: bool,
              neighbours: int = 32) -> tuple[list[int], dict[int, torch.Tensor], torch.Tensor]:
    """One image: (kept patch indices in the reference's order, kept patch -> its merged feature, the
    extra token). ``cls_attn`` (N,), ``keys`` (N, C) and ``features`` (N, D) over the patches."""
    n = cls_attn.shape[0]
    values = cls_attn.to(torch.float32).numpy().flatten()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    ratio = len(np.where(values > q3 + 1.5 * (q3 - q1))[0]) / len(values)
    idx = torch.topk(cls_attn, max(1, int(n * ratio))).indices.tolist()
    if plus:
        step = int(1 / max(ratio, 1 / n))
        idx += [x for x in range(0, n - 1, max(1, int(step / 3))) if x not in idx]
    rest = [p for p in range(n) if p not in idx]
    unit = F.normalize(keys, p=2, dim=-1)
    merged = {}
    for position, i in enumerate(idx):
        others = idx[:position] + idx[position + 1:] + rest
        similarity = torch.stack([unit[i] @ unit[j] for j in others])
        nearest = [others[j] for j in torch.topk(similarity, min(neighbours, len(others))).indices.tolist()]
        merged[i] = features[i] + sum(cls_attn[j] * features[j] for j in nearest)
    extra = sum(cls_attn[j] * features[j] for j in rest) if rest else torch.zeros_like(features[0])
    return idx, merged, extra


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=generator)
    logits[torch.randperm(n, generator=generator)[:5]] += 4.0  # a few outliers, as CLIP's CLS attention has
    return (torch.softmax(logits, 0), torch.randn(n, 16, generator=generator),
            torch.randn(n, 12, generator=generator))


def ours(cls_attn: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, valid: torch.Tensor,
         plus: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    counts, share = outlier_share(cls_attn, valid)
    keep = topk_mask(cls_attn, valid, counts)
    if plus:
        keep = keep | spatial_samples(share, valid)
    kept, picked = pack_index(keep)
    merged = merge_neighbours(features, keys, cls_attn, valid, kept, picked, 32)
    return keep, kept, merged, rest_token(features, cls_attn, valid & ~keep)


@pytest.mark.parametrize("plus", [False, True])
def test_the_same_kept_set_and_merged_features_as_the_reference(plus):
    """Two rows of different lengths in one batch (a padded row), each against the reference alone."""
    rows = [synthetic(64, 0), synthetic(49, 1)]
    batch = {name: torch.zeros(2, 64, *shape) for name, shape in (("cls", ()), ("keys", (16,)), ("x", (12,)))}
    valid = torch.zeros(2, 64, dtype=torch.bool)
    for r, (cls_attn, keys, features) in enumerate(rows):
        n = cls_attn.shape[0]
        batch["cls"][r, :n], batch["keys"][r, :n], batch["x"][r, :n], valid[r, :n] = cls_attn, keys, features, True
    keep, kept, merged, extra = ours(batch["cls"], batch["keys"], batch["x"], valid, plus)
    for r, (cls_attn, keys, features) in enumerate(rows):
        idx, expected, expected_extra = reference(cls_attn, keys, features, plus)
        assert sorted(idx) == torch.nonzero(keep[r]).flatten().tolist()  # the same set (ours in raster order)
        assert len(idx) > 5 if plus else len(idx) >= 5  # the planted outliers are found (and samples added)
        for slot, patch in enumerate(kept[r, : len(idx)].tolist()):
            torch.testing.assert_close(merged[r, slot], expected[patch])
        torch.testing.assert_close(extra[r], expected_extra)


@pytest.mark.parametrize("plus", [False, True])
@torch.no_grad()
def test_the_stage_on_a_model_equals_the_reference_from_its_own_layers(recorded_tokens, plus):
    """The reference reads what the published code hooks: the last encoder layer's q_proj/k_proj
    outputs on its normed input, and the penultimate layer's output as the features."""
    model = tiny_llava("sdpa", image_size=64)
    batch = llava_batch(model, sample_prompts(2))
    stack = {"name": "p", "stages": [{"method": "prumerge", "params": {"plus": plus}},
                                     {"method": "test-record-tokens"}]}
    with tokenpress.compress(model, stack):
        model(**batch)
    tokens = recorded_tokens[0]
    tower = model.model.vision_tower
    hidden = tower(batch["pixel_values"], output_hidden_states=True).hidden_states
    block = getattr(tower, "vision_model", tower).encoder.layers[-1]
    normed = block.layer_norm1(hidden[-2])
    query, key = block.self_attn.q_proj(normed), block.self_attn.k_proj(normed)
    width = query.shape[-1]
    for image in range(batch["pixel_values"].shape[0]):
        cls_attn = torch.softmax(query[image, :1] @ key[image].T * width ** -0.5, -1)[0, 1:]
        idx, expected, extra = reference(cls_attn, key[image, 1:], hidden[-2][image, 1:], plus)
        kept = sorted(idx)
        assert tokens.counts()[image] == len(kept) + 1  # the kept patches and the rest token
        assert tokens.grid_index[image, : len(kept)].tolist() == kept  # each at its own patch's position
        for slot, patch in enumerate(kept):
            torch.testing.assert_close(tokens.embeddings[image, slot], expected[patch], rtol=1e-4, atol=1e-5)
        last = int(torch.nonzero(tokens.valid[image]).max())
        torch.testing.assert_close(tokens.embeddings[image, last], extra, rtol=1e-4, atol=1e-5)


def test_prumerge_after_a_selection_is_refused_in_one_sentence():
    model = tiny_llava("sdpa")
    stack = {"name": "p", "stages": [{"method": "random", "params": {"keep_ratio": 0.5}}, {"method": "prumerge"}]}
    with pytest.raises(tokenpress.StackError, match=r"stages\[1\] \(prumerge\) cannot run after stages\[0\] "
                                                   r"\(random\): prumerge reads encoder signals"):
        tokenpress.compress(model, stack)
    assert tokenpress.attached_handle(model) is None and "forward" not in model.model.__dict__
