"""LLaVA-NeXT (``transformers.LlavaNextForConditionalGeneration``): any-resolution tiling.

An image becomes a base tile (the whole image at the encoder's size, an s x s grid) and crops
stitched into one high-resolution grid, unpadded to the image's aspect ratio (H x W), whose rows
each end with the learned ``image_newline`` token. tokenpress gives each image **two TokenState
rows**, with their own grids: the base tile and the high-resolution grid. Pre-LLM methods act on
each with its grid (pooling a 2x grid halves both of its sides).

Newlines after compression: they are not tokens of the state, the layout adds them back. After a
re-gridding stage (pooling) the high-resolution grid has new rows and each new row ends with a
newline. After a selection, a row that keeps at least one token keeps its newline (after its last
kept token); a row that keeps none loses it. Decoder-layer stages see newlines as visual tokens.
With ``positions: original`` everything keeps the position it has in the uncompressed layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from tokenpress.core.errors import CompressionError, UnsupportedModelError
from tokenpress.core.signals import Signal
from tokenpress.core.tokens import TokenState
from tokenpress.families.clip import clip_encode_inside, clip_signals
from tokenpress.families.llava.adapter import LlavaAdapter
from tokenpress.families.llava_next.costs import LlavaNextCosts
from tokenpress.runtime.adapter import ImageLayout, ImageSpan, summary_positions
from tokenpress.runtime.encoder import InsideEncoder


class LlavaNextAdapter(LlavaAdapter):
    """Adapter for ``LlavaNextForConditionalGeneration`` (spatial_unpad with image newlines)."""

    family = "llava-next"
    signals = ("cls_attention", "keys", "attention_received")  # per tile, stitched onto each row as the features are
    cost_model = LlavaNextCosts
    test_family = "tokenpress.families.llava_next.testbed:LLAVA_NEXT"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) == "llava_next" and hasattr(model, "model")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if getattr(model.model, "image_newline", None) is None:
            raise UnsupportedModelError("the llava-next adapter needs a model with an image_newline embedding")

    def encode_images(self, inputs: dict[str, Any], requests: list[Signal],
                      inside: InsideEncoder | None = None) -> tuple[TokenState, dict[Signal, torch.Tensor]]:
        config = self.model.config
        pixel_values, image_sizes = inputs["pixel_values"], inputs.get("image_sizes")
        if image_sizes is None:
            raise CompressionError("LLaVA-NeXT needs image_sizes next to pixel_values")
        tile_size = config.vision_config.image_size
        tiles_per_image = [image_size_to_num_patches(size, config.image_grid_pinpoints, tile_size)
                           for size in image_sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([tiles[:count] for tiles, count in zip(pixel_values, tiles_per_image,
                                                                             strict=True)])
        if inside is not None:
            side = tile_size // config.vision_config.patch_size
            row_images = [image for image, count in enumerate(tiles_per_image) for _ in range(count)]
            tiles, found, run = clip_encode_inside(self.vision_tower, pixel_values, self.feature_blocks(),
                                                   (1, side, side), row_images, requests, inside)
            self.media["encoder_run"] = run
            return self._stitch_tiles(tiles, found, tiles_per_image, image_sizes)
        outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layer = config.vision_feature_layer
        if isinstance(layer, int):
            features = outputs.hidden_states[layer][:, 1:]
        else:
            features = torch.cat([outputs.hidden_states[i][:, 1:] for i in layer], dim=-1)
        side = tile_size // config.vision_config.patch_size

        def stitch(per_tile: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
            """(tiles, side^2, D) per tile -> (rows, P, D): each image's base tile, then its crops stitched
            into one grid and unpadded (what LLaVA-NeXT does to its features), zero-padded to one width."""
            rows, grids = [], []
            for image, chunk in enumerate(torch.split(per_tile, tiles_per_image)):
                rows.append(chunk[0])
                grids.append((1, side, side))
                crops_high, crops_wide = get_anyres_image_grid_shape(image_sizes[image], config.image_grid_pinpoints,
                                                                     tile_size)
                stitched = chunk[1:].view(crops_high, crops_wide, side, side, -1).permute(4, 0, 2, 1, 3)
                stitched = stitched.flatten(1, 2).flatten(2, 3)
                stitched = unpad_image(stitched, image_sizes[image])  # (D, H, W)
                rows.append(stitched.flatten(1).transpose(0, 1))
                grids.append((1, stitched.shape[1], stitched.shape[2]))
            width = max(row.shape[0] for row in rows)
            return torch.stack([nn.functional.pad(row, (0, 0, 0, width - row.shape[0])) for row in rows]), grids

        embeddings, grids = stitch(features)
        found = {}
        for request, value in clip_signals(self._encoder_layers(), outputs.hidden_states, requests).items():
            flat = value.dim() == 2  # (tiles, patches): one number per patch
            stitched, _ = stitch(value.unsqueeze(-1) if flat else value)
            found[request] = stitched.squeeze(-1) if flat else stitched
        return TokenState.from_dense(embeddings, grids), found

    def _stitch_tiles(self, tiles: TokenState, found: dict[Signal, torch.Tensor], tiles_per_image: list[int],
                      image_sizes: Any) -> tuple[TokenState, dict[Signal, torch.Tensor]]:
        """Tile rows (after stages acted inside the encoder) -> each image's base-tile row and its
        high-resolution row: the crops' tokens side by side on the stitched grid, unpadded as the model
        unpads its features. A token's cell is the first unpadded patch it stands for, its size the number
        of unpadded patches; a token standing only for padding is dropped. Signals follow their tokens."""
        config = self.model.config
        tile_size, device = config.vision_config.image_size, tiles.embeddings.device
        side, slots = tile_size // config.vision_config.patch_size, tiles.num_slots
        rows: list[tuple[torch.Tensor, ...]] = []  # (embeddings, grid_index, size, owner) of one row
        grids: list[tuple[int, int, int]] = []
        picks: list[tuple[list[int], torch.Tensor | None]] = []  # per row: its tile rows, and their slots taken
        start = 0
        for image, count in enumerate(tiles_per_image):
            valid = tiles.valid[start]
            rows.append((tiles.embeddings[start][valid], tiles.grid_index[start][valid], tiles.size[start][valid],
                         tiles.owner[start]))
            grids.append((1, side, side))
            picks.append(([start], torch.nonzero(valid).flatten()))
            crops_high, crops_wide = get_anyres_image_grid_shape(image_sizes[image], config.image_grid_pinpoints,
                                                                 tile_size)
            wide = crops_wide * side
            stitched = torch.arange(crops_high * side * wide, device=device).view(1, crops_high * side, wide)
            kept = unpad_image(stitched, image_sizes[image])  # (1, H, W): the stitched patch of each unpadded one
            height, width = kept.shape[1:]
            kept = kept.flatten()
            crop = (kept // wide // side) * crops_wide + (kept % wide) // side
            patch = (kept // wide % side) * side + kept % side
            crop_rows = slice(start + 1, start + count)
            tile_owner = tiles.owner[crop_rows][crop, patch]  # each unpadded patch's slot in its crop's tile
            owner = torch.where(tile_owner >= 0, crop * slots + tile_owner, -1)
            candidates = (count - 1) * slots
            cells = torch.arange(kept.numel(), device=device)
            dump = torch.where(owner >= 0, owner, candidates)
            first = torch.full((candidates + 1,), kept.numel(), dtype=torch.long, device=device)
            first.scatter_reduce_(0, dump, cells, reduce="amin")
            size = torch.zeros(candidates + 1, device=device).scatter_add_(0, dump, torch.ones_like(cells,
                                                                                                      dtype=torch.float))
            order = torch.argsort(first[:candidates], stable=True)
            taken = order[: int((size[:candidates] > 0).sum())]
            new_slot = torch.full((candidates + 1,), -1, dtype=torch.long, device=device)
            new_slot[taken] = torch.arange(taken.numel(), device=device)
            embeddings = tiles.embeddings[crop_rows].reshape(candidates, -1)
            rows.append((embeddings[taken], first[taken], size[taken], new_slot[dump]))
            grids.append((1, height, width))
            picks.append((list(range(start + 1, start + count)), taken))
            start += count
        width = max(row[0].shape[0] for row in rows)
        patches = max(row[3].shape[0] for row in rows)

        def pad(value: torch.Tensor, length: int, fill: float) -> torch.Tensor:
            shape = (length - value.shape[0], *value.shape[1:])
            return torch.cat([value, value.new_full(shape, fill)])

        counts = [row[0].shape[0] for row in rows]
        state = TokenState(
            embeddings=torch.stack([pad(row[0], width, 0) for row in rows]),
            valid=torch.arange(width, device=device).unsqueeze(0) < torch.tensor(counts, device=device).unsqueeze(1),
            grid_index=torch.stack([pad(row[1], width, 0) for row in rows]),
            size=torch.stack([pad(row[2].float(), width, 0) for row in rows]),
            owner=torch.stack([pad(row[3], patches, -1) for row in rows]),
            grid=torch.tensor(grids, device=device),
            original_grid=torch.tensor(grids, device=device),
            image_to_sample=torch.arange(len(rows), device=device),
            known_grid=tuple(grids), known_counts=tuple(counts),
        )
        stitched_signals = {}
        for request, value in found.items():
            gathered = [value[tile_rows].reshape(len(tile_rows) * slots, *value.shape[2:])[taken]
                        for tile_rows, taken in picks]
            stitched_signals[request] = torch.stack([pad(row, width, 0) for row in gathered])
        return state, stitched_signals

    def encoder_pixels(self, inputs: dict[str, Any], image: int) -> torch.Tensor:
        """The base tile (the whole image, resized): row ``2 * image`` of the state."""
        pixel_values = inputs["pixel_values"]
        if pixel_values.dim() == 5:  # (images, tiles, 3, H, W), the base tile first
            return pixel_values[image, 0]
        config = self.model.config
        tiles = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                 for size in inputs["image_sizes"]]
        return pixel_values[sum(tiles[:image])]

    def view_size(self, inputs: dict[str, Any], image: int) -> tuple[int, int]:
        """The base tile squeezes the whole image into a square: viz shows it at the image's own proportions."""
        height, width = (int(side) for side in inputs["image_sizes"][image])
        return height, width

    def image_spans(self, input_ids: torch.Tensor, valid: torch.Tensor, tokens: TokenState) -> list[ImageSpan]:
        images = tokens.num_images // 2
        lengths = []
        for image in range(images):
            base = int(tokens.original_grid[2 * image].prod())
            _, height, width = (int(v) for v in tokens.original_grid[2 * image + 1])
            lengths.append(base + height * (width + 1))
        per_image = TokenState.from_dense(tokens.embeddings.new_zeros(images, 1, 1),
                                          [(1, 1, n) for n in lengths])
        spans = self._spans_for(input_ids, valid, per_image, self.image_token_id)
        return [ImageSpan(s.sample, s.start, s.length, s.image, (2 * s.image, 2 * s.image + 1)) for s in spans]

    def extra_embeddings(self) -> torch.Tensor:
        return self.model.model.image_newline.unsqueeze(0)

    def layout_image(self, span: ImageSpan, tokens: TokenState, start: int, compact: bool) -> ImageLayout:
        base_row, high_row = span.rows
        picks = torch.nonzero(tokens.valid[base_row]).flatten()
        sources = (base_row * tokens.num_slots + picks).tolist()
        base_cells = int(tokens.grid[base_row].prod())
        base_index = tokens.grid_index[base_row, picks]
        after, high_start = summary_positions(base_index, start + base_cells)  # summary tokens follow the grid
        positions = torch.where(base_index >= 0, base_index + start, after).tolist()

        _, height, width = (int(v) for v in tokens.grid[high_row])
        valid = tokens.valid[high_row]
        kept = torch.nonzero(valid & (tokens.grid_index[high_row] >= 0)).flatten()
        summary = torch.nonzero(valid & (tokens.grid_index[high_row] < 0)).flatten().tolist()
        cells = tokens.grid_index[high_row, kept]
        order = torch.argsort(cells, stable=True)
        kept, cells = kept[order].tolist(), cells[order].tolist()
        for i, (slot, cell) in enumerate(zip(kept, cells, strict=True)):
            row, col = divmod(cell, width)
            sources.append(high_row * tokens.num_slots + slot)
            positions.append(high_start + row * (width + 1) + col)
            if i + 1 == len(cells) or cells[i + 1] // width != row:  # last kept token of its row
                sources.append(-1)  # extra embedding 0: the image newline
                positions.append(high_start + row * (width + 1) + width)
        end = high_start + height * (width + 1)
        sources += [high_row * tokens.num_slots + slot for slot in summary]  # after the grid, no newlines
        positions += list(range(end, end + len(summary)))
        if compact:
            return ImageLayout(sources, [list(range(start, start + len(sources)))], start + len(sources))
        return ImageLayout(sources, [positions], end + len(summary))
