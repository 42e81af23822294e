"""LLaVA-OneVision (``transformers.LlavaOnevisionForConditionalGeneration``): a SigLIP tower (no class token,
no pre-layernorm; the features are ``hidden_states[vision_feature_layer]``, before ``post_layernorm``), the
2-layer MLP projector, a Qwen2 decoder.

Rows. An image alone in its prompt (anyres) becomes **two TokenState rows**, as on LLaVA-NeXT: its base tile
(the whole image at the encoder's size, an s x s grid, no newline) and its crops stitched into one grid and
unpadded to the image's aspect ratio (H x W), every row of which ends with the learned ``image_newline``.
An image of a multi-image prompt (``batch_num_images``) is one tile: one row, one newline after it. A video
is one row of its frames (t x s x s) and one newline after it. Rows come in the order of the images, then the
videos.

What the model does after its projector (in LLM space), the adapter's :meth:`project` does after the MLP, to
the current grid of a row that still holds every cell of it:

* ``anyres_max_N``: a high-resolution grid of more than 1.1^2 x N tiles' worth of tokens is resized
  bilinearly to ``(int(H // ratio), int(W // ratio))``, ``ratio = sqrt(H * W / (N * s^2))``; positions and
  newlines follow the resized grid. A grid a stage shrank (pooling before the projector) is resized only if
  it is still over that size, as the model's rule says;
* a video's frames are pooled bilinearly to ``ceil(h / 2) x ceil(w / 2)``.

A row a stage has already reduced by a selection or a merge is **not** resized or pooled (an interpolation
needs the whole grid): its kept tokens keep the cells of the grid before the projector. When that leaves an
image more tokens than the prompt holds placeholders for (the model's resized grid is smaller), the prefill
refuses in one sentence: select after the projector, or keep fewer. A stage that replaces the projector
(``pixel_unshuffle``, ``ldp``, ``qformer``) replaces the resize and the pooling too.

Newlines after compression: a high-resolution row that keeps at least one token keeps its newline (after its
last kept token); a row that keeps none loses it; a multi-image tile and a video always end with theirs.
Decoder-layer stages see newlines as visual tokens. With ``positions: original`` every token sits where it
sits in the layout of its row's current grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from typing import Any

import torch
from torch import nn

from tokenpress.core.errors import CompressionError, UnsupportedModelError
from tokenpress.core.signals import Signal
from tokenpress.core.tokens import TokenState
from tokenpress.families.clip import ClipTower, clip_encode_inside, clip_signals
from tokenpress.families.llava_onevision.costs import (
    LlavaOnevisionCosts,
    anyres_max,
    image_tiles,
    pooled_frame,
    resized_grid,
    unpadded_grid,
)
from tokenpress.runtime.adapter import ImageLayout, ImageSpan, ModelAdapter, ProjectorMLP, summary_positions
from tokenpress.runtime.encoder import InsideEncoder

#: Row kinds: an anyres image's base tile and high-resolution grid, a multi-image prompt's tile, a video.
BASE, HIGH, TILE, VIDEO = "base", "high", "tile", "video"


@dataclass(frozen=True)
class Medium:
    """One image or video of a batch, as the adapter lays it out."""

    kind: str  # "anyres", "tile" or "video"
    index: int  # among the batch's images, then its videos (its ImageSpan.image)
    runs: tuple[int, ...]  # its encoder runs (tiles, frames) among every run, images' first
    rows: tuple[int, ...]  # its TokenState rows
    placeholders: int  # the placeholder tokens the model gives it
    size: tuple[int, int] | None = None  # an image's original (height, width)


@dataclass(frozen=True)
class RowPlan:
    """How a TokenState row is made of encoder runs: each cell of its grid (raster order) is patch
    ``cells % P`` of run ``runs[cells // P]`` (P patches per run)."""

    kind: str
    runs: tuple[int, ...]
    cells: torch.Tensor
    grid: tuple[int, int, int]


class LlavaOnevisionAdapter(ClipTower, ModelAdapter):
    """Adapter for ``LlavaOnevisionForConditionalGeneration`` (anyres images, multi-image prompts, videos)."""

    family = "llava-onevision"
    signals = ("keys", "attention_received")  # per tile or frame, laid out on each row as the features are
    no_signals_because = ("its SigLIP tower has no class token; a method may ask for the attention each patch "
                          "receives instead: ClsAttention(class_free='received')")
    cost_model = LlavaOnevisionCosts
    test_family = "tokenpress.families.llava_onevision.testbed:LLAVA_ONEVISION"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) == "llava_onevision" and hasattr(
            model, "model")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        if config.vision_feature_select_strategy != "full":
            raise UnsupportedModelError(
                "the llava-onevision adapter needs vision_feature_select_strategy='full' (SigLIP has no class "
                f"token to drop), this model has {config.vision_feature_select_strategy!r}")
        if getattr(model.model, "image_newline", None) is None:
            raise UnsupportedModelError("the llava-onevision adapter needs a model with an image_newline embedding")
        self.max_tiles = anyres_max(config.vision_aspect_ratio)
        vision = config.vision_config
        self.side = vision.image_size // vision.patch_size
        sliding = [index for index, kind in enumerate(getattr(self.text_config, "layer_types", None) or [])
                   if kind != "full_attention"]
        if sliding:
            raise UnsupportedModelError(f"the llava-onevision adapter runs full-attention decoder layers only; layer "
                                        f"{sliding[0]} of this model attends through a sliding window")

    def placeholder_ids(self) -> tuple[int, ...]:
        config = self.model.config
        return (config.image_token_id, config.video_token_id)

    def encoder_width(self) -> int:
        return int(self.model.model.multi_modal_projector.linear_1.in_features)

    def encoder_heads(self) -> int:
        return int(self.model.config.vision_config.num_attention_heads)

    def projector_mlp(self) -> ProjectorMLP | None:
        projector = self.model.model.multi_modal_projector
        first, act, second = (getattr(projector, name, None) for name in ("linear_1", "act", "linear_2"))
        if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear) and act is not None):
            return None
        return ProjectorMLP(first, act, second)

    # --- the batch's media ------------------------------------------------------------------------

    def plan(self, inputs: dict[str, Any]) -> tuple[list[Medium], torch.Tensor | None, torch.Tensor | None]:
        """The batch's images then videos, and the pixels of every image tile and of every video frame
        (runs, 3, S, S), in the order the model encodes them."""
        config = self.model.config
        side = self.side
        media: list[Medium] = []
        run = row = 0
        tiles_in = frames_in = None
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            if inputs.get("image_sizes") is None:
                raise CompressionError("LLaVA-OneVision needs image_sizes next to pixel_values")
            sizes = [(int(h), int(w)) for h, w in inputs["image_sizes"].tolist()]
            per_sample = inputs.get("batch_num_images")
            counts = None if per_sample is None else [int(n) for n in per_sample.tolist()]
            try:
                tiles = image_tiles(config, sizes, counts)
            except ValueError as exc:
                raise CompressionError(str(exc)) from None
            if pixel_values.dim() == 5:  # (images, tiles, 3, S, S), zero-padded to the most tiles
                pixel_values = torch.cat([chunk[:count] for chunk, count in zip(pixel_values, tiles, strict=True)])
            anyres = [True] * len(sizes) if counts is None else [n == 1 for n in counts for _ in range(n)]
            for index, (size, count, whole) in enumerate(zip(sizes, tiles, anyres, strict=True)):
                runs = tuple(range(run, run + count))
                run += count
                if whole:
                    _, _, height, width = unpadded_grid(size, config)
                    height, width = resized_grid(height, width, side, self.max_tiles)
                    media.append(Medium("anyres", index, runs, (row, row + 1), side * side + height * (width + 1),
                                        size))
                    row += 2
                else:
                    media.append(Medium("tile", index, runs, (row,), side * side + 1, size))
                    row += 1
            tiles_in = pixel_values
        videos = inputs.get("pixel_values_videos")
        if videos is not None:
            count, frames = int(videos.shape[0]), int(videos.shape[1])
            height, width = pooled_frame(side, side)
            for _ in range(count):
                runs = tuple(range(run, run + frames))
                run += frames
                media.append(Medium("video", len(media), runs, (row,), frames * height * width + 1))
                row += 1
            frames_in = videos.flatten(0, 1)
        return media, tiles_in, frames_in

    def row_plans(self, media: list[Medium]) -> list[RowPlan]:
        """Each TokenState row's cells as patches of the encoder runs."""
        side, patches = self.side, self.side * self.side
        plans: list[RowPlan] = []
        for medium in media:
            if medium.kind == "anyres":
                plans.append(RowPlan(BASE, medium.runs[:1], torch.arange(patches), (1, side, side)))
                (_, crops_wide), kept, height, width = unpadded_grid(medium.size, self.model.config)
                wide = crops_wide * side
                crop = (kept // wide // side) * crops_wide + (kept % wide) // side
                patch = (kept // wide % side) * side + kept % side
                plans.append(RowPlan(HIGH, medium.runs[1:], crop * patches + patch, (1, height, width)))
            elif medium.kind == "tile":
                plans.append(RowPlan(TILE, medium.runs, torch.arange(patches), (1, side, side)))
            else:
                frames = len(medium.runs)
                plans.append(RowPlan(VIDEO, medium.runs, torch.arange(frames * patches), (frames, side, side)))
        return plans

    # --- pre-LLM ----------------------------------------------------------------------------------

    def encode_images(self, inputs: dict[str, Any], requests: list[Signal],
                      inside: InsideEncoder | None = None) -> tuple[TokenState, dict[Signal, torch.Tensor]]:
        media, tiles_in, frames_in = self.plan(inputs)
        if not media:
            raise CompressionError("LLaVA-OneVision needs pixel_values or pixel_values_videos")
        plans = self.row_plans(media)
        grid = (1, self.side, self.side)
        run_images = [medium.index for medium in media for _ in medium.runs]
        self.media = {"media": media, "rows": [plan.kind for plan in plans]}
        groups = [pixels for pixels in (tiles_in, frames_in) if pixels is not None]
        if inside is not None:
            # one run block by block over every tile and frame: each stage sees them all in one call
            pixels = torch.cat(groups) if len(groups) > 1 else groups[0]
            tiles, found, run = clip_encode_inside(self.vision_tower, pixels, self.feature_blocks(), grid, run_images,
                                                   requests, inside, class_token=False)
            self.media["encoder_run"] = run
            return assemble_rows(tiles, found, plans)
        layer = self.model.config.vision_feature_layer
        features, signals = [], []
        for pixels in groups:  # the model encodes its images and its videos in separate calls
            hidden_states = self.vision_tower(pixels, output_hidden_states=True, return_dict=True).hidden_states
            features.append(hidden_states[layer] if isinstance(layer, int)
                            else torch.cat([hidden_states[index] for index in layer], dim=-1))
            signals.append(clip_signals(self._encoder_layers(), hidden_states, requests, class_token=False))
        tiles = TokenState.from_dense(torch.cat(features), grid)
        found = {request: torch.cat([values[request] for values in signals]) for request in signals[0]}
        return assemble_rows(tiles, found, plans)

    def project(self, tokens: TokenState) -> TokenState:
        """The MLP on every token, then what the model does in LLM space to a row that still holds its whole
        grid: the anyres_max resize of a high-resolution grid, the 2x2 bilinear pooling of a video's frames."""
        projector = self.model.model.multi_modal_projector
        projected = tokens.to_space(projector(tokens.embeddings), "llm")
        kinds = self.media.get("rows")
        if kinds is None or len(kinds) != tokens.num_images:
            raise CompressionError("LLaVA-OneVision projects the rows of its own encode_images only")
        grids = projected.grid_sizes()
        targets: dict[int, tuple[int, int]] = {}
        for row, kind in enumerate(kinds):
            frames, height, width = grids[row]
            if kind not in (HIGH, VIDEO) or frames * height * width == 0:
                continue
            target = (resized_grid(height, width, self.side, self.max_tiles) if kind == HIGH
                      else pooled_frame(height, width))
            if target != (height, width):
                targets[row] = target
        if not targets:
            return projected
        counts = projected.counts_on_host()
        whole = {row: target for row, target in targets.items() if counts[row] == math.prod(grids[row])}
        return resize_rows(projected, whole) if whole else projected

    # --- layout -----------------------------------------------------------------------------------

    def image_spans(self, input_ids: torch.Tensor, valid: torch.Tensor, tokens: TokenState) -> list[ImageSpan]:
        """Images first (in order), then videos: each kind has its own placeholder id."""
        media: list[Medium] = self.media.get("media") or []
        config = self.model.config
        spans: list[ImageSpan] = []
        for videos, token_id in ((False, config.image_token_id), (True, config.video_token_id)):
            group = [medium for medium in media if (medium.kind == "video") == videos]
            if not group:
                if bool(((input_ids == token_id) & valid).any()):
                    what = "videos" if videos else "images"
                    raise CompressionError(f"the prompt has placeholders for {what} that were not given")
                continue
            lengths = TokenState.from_dense(tokens.embeddings.new_zeros(len(group), 1, 1),
                                            [(1, 1, medium.placeholders) for medium in group])
            for span in self._spans_for(input_ids, valid, lengths, token_id):
                medium = group[span.image]
                spans.append(ImageSpan(span.sample, span.start, span.length, medium.index, medium.rows))
        return spans

    def extra_embeddings(self) -> torch.Tensor:
        return self.model.model.image_newline.unsqueeze(0)

    def layout_image(self, span: ImageSpan, tokens: TokenState, start: int, compact: bool) -> ImageLayout:
        kinds = self.media["rows"]
        sources, positions, end = _grid_layout(tokens, span.rows[0], start)
        if kinds[span.rows[0]] == BASE:
            high, high_positions, end = _newline_rows_layout(tokens, span.rows[1], end)
            sources, positions = sources + high, positions + high_positions
        else:  # a multi-image tile or a video: one newline after it
            sources.append(-1)
            positions.append(end)
            end += 1
        if len(sources) > span.length:
            raise CompressionError(
                f"image {span.image} lays out {len(sources)} tokens but the prompt holds {span.length} placeholders "
                "for it: LLaVA-OneVision resizes a high-resolution grid (or pools a video's frames) after its "
                "projector only while the row holds every token, and a stage before the projector kept more "
                "tokens than the resized grid has; select at the projector or later, or keep fewer")
        if compact:
            return ImageLayout(sources, [list(range(start, start + len(sources)))], start + len(sources))
        return ImageLayout(sources, [positions], end)

    # --- viz ----------------------------------------------------------------------------------------

    def encoder_pixels(self, inputs: dict[str, Any], image: int) -> torch.Tensor:
        """Image ``image``'s first tile (an anyres image's base tile), or a video's first frame."""
        media, tiles_in, frames_in = self.plan(inputs)
        medium = media[image]
        if medium.kind == "video":
            images = sum(len(m.runs) for m in media if m.kind != "video")
            return frames_in[medium.runs[0] - images]
        return tiles_in[medium.runs[0]]

    def view_size(self, inputs: dict[str, Any], image: int) -> tuple[int, int]:
        """An anyres image's base tile squeezes the whole image into a square: viz shows it at the image's
        own proportions (a multi-image tile is the image padded to a square, a frame is what it is)."""
        medium = self.plan(inputs)[0][image]
        if medium.kind == "anyres":
            return medium.size
        return super().view_size(inputs, image)


def assemble_rows(tiles: TokenState, found: dict[Signal, torch.Tensor],
                  plans: list[RowPlan]) -> tuple[TokenState, dict[Signal, torch.Tensor]]:
    """Encoder runs (one TokenState row per tile or frame, after any stage inside the encoder) -> the adapter's
    rows (:class:`RowPlan`): the runs' tokens side by side on the row's grid. A token's cell is the first cell
    of the row it stands for, its size the number of the row's cells it stands for; a token that stands for
    none (an anyres crop's padding only) is dropped. Signals follow their tokens."""
    device = tiles.embeddings.device
    slots, patches = tiles.num_slots, tiles.owner.shape[1]
    built: list[tuple[torch.Tensor, ...]] = []  # embeddings, grid_index, size, owner of each row
    picks: list[tuple[list[int], torch.Tensor]] = []  # its runs and the candidates (run * slots + slot) taken
    counts: list[int] = []
    for plan in plans:
        runs = list(plan.runs)
        cells = plan.cells.to(device)
        local, patch = cells // patches, cells % patches
        run_owner = tiles.owner[runs][local, patch]  # each cell's slot in its run (-1: dropped)
        owner = torch.where(run_owner >= 0, local * slots + run_owner, -1)
        candidates = len(runs) * slots
        dump = torch.where(owner >= 0, owner, candidates)
        index = torch.arange(cells.numel(), device=device)
        first = torch.full((candidates + 1,), cells.numel(), dtype=torch.long, device=device)
        first.scatter_reduce_(0, dump, index, reduce="amin")
        size = torch.zeros(candidates + 1, device=device).scatter_add_(0, dump, torch.ones_like(index,
                                                                                                 dtype=torch.float))
        count = int((size[:candidates] > 0).sum())
        taken = torch.argsort(first[:candidates], stable=True)[:count]
        new_slot = torch.full((candidates + 1,), -1, dtype=torch.long, device=device)
        new_slot[taken] = torch.arange(count, device=device)
        embeddings = tiles.embeddings[runs].reshape(candidates, -1)
        built.append((embeddings[taken], first[taken], size[taken], new_slot[dump]))
        picks.append((runs, taken))
        counts.append(count)
    width = max(counts)
    owners = max(row[3].shape[0] for row in built)
    grids = [plan.grid for plan in plans]
    state = TokenState(
        embeddings=torch.stack([_pad(row[0], width, 0) for row in built]),
        valid=torch.arange(width, device=device).unsqueeze(0) < torch.tensor(counts, device=device).unsqueeze(1),
        grid_index=torch.stack([_pad(row[1], width, 0) for row in built]),
        size=torch.stack([_pad(row[2], width, 0) for row in built]),
        owner=torch.stack([_pad(row[3], owners, -1) for row in built]),
        grid=torch.tensor(grids, device=device),
        original_grid=torch.tensor(grids, device=device),
        image_to_sample=torch.arange(len(plans), device=device),
        known_grid=tuple(grids), known_counts=tuple(counts),
        known_dense=all(count == math.prod(grid) for count, grid in zip(counts, grids, strict=True)),
    )
    signals = {}
    for request, value in found.items():
        rows = [value[runs].reshape(len(runs) * slots, *value.shape[2:])[taken] for runs, taken in picks]
        signals[request] = torch.stack([_pad(row, width, 0) for row in rows])
    return state, signals


def resize_rows(tokens: TokenState, targets: dict[int, tuple[int, int]]) -> TokenState:
    """Rows ``targets`` (each holding its whole grid) resized bilinearly, every frame of each, to the target
    (height, width) the way the model resizes in LLM space; the others untouched. A token of the new grid
    stands for the old cells whose centres fall in it (sizes and provenance follow)."""
    device, dim = tokens.embeddings.device, tokens.embeddings.shape[-1]
    grids = tokens.grid_sizes()
    changed: dict[int, tuple[torch.Tensor, ...]] = {}
    for row, (new_height, new_width) in targets.items():
        frames, height, width = grids[row]
        cells, out_cells = frames * height * width, frames * new_height * new_width
        valid = tokens.valid[row]
        cell = torch.where(valid, tokens.grid_index[row].clamp(0, cells - 1), cells)
        dense = tokens.embeddings.new_zeros(cells + 1, dim)
        dense[cell] = tokens.embeddings[row]
        stacked = dense[:cells].view(frames, height, width, dim).permute(0, 3, 1, 2).contiguous()
        resized = nn.functional.interpolate(stacked, size=(new_height, new_width), mode="bilinear")
        resized = resized.permute(0, 2, 3, 1).reshape(out_cells, dim)
        rows = (torch.arange(height, device=device) * 2 + 1) * new_height // (2 * height)
        cols = (torch.arange(width, device=device) * 2 + 1) * new_width // (2 * width)
        frame = torch.arange(frames, device=device) * new_height * new_width
        moved = (frame.view(-1, 1, 1) + rows.view(1, -1, 1) * new_width + cols.view(1, 1, -1)).flatten()
        moved = torch.cat([moved, moved.new_full((1,), out_cells)])  # the dump cell stays the dump
        target = moved[cell]  # each slot's new cell (padding: out_cells)
        size = torch.zeros(out_cells + 1, device=device).scatter_add_(0, target, tokens.size[row] * valid)
        owner = tokens.owner[row]
        owner = torch.where(owner >= 0, target[owner.clamp_min(0)], owner)
        changed[row] = (resized, size[:out_cells], owner, (frames, new_height, new_width))
    width = max([tokens.num_slots] + [value[0].shape[0] for value in changed.values()])
    embeddings = _pad_slots(tokens.embeddings, width, 0)
    valid = _pad_slots(tokens.valid, width, False)
    grid_index = _pad_slots(tokens.grid_index, width, 0)
    size = _pad_slots(tokens.size, width, 0)
    owner, grid = tokens.owner.clone(), tokens.grid.clone()
    known_grid = list(grids)
    known_counts = None if tokens.known_counts is None else list(tokens.known_counts)
    for row, (resized, row_size, row_owner, row_grid) in changed.items():
        count = resized.shape[0]
        embeddings[row] = _pad(resized, width, 0)
        valid[row] = torch.arange(width, device=device) < count
        grid_index[row] = torch.arange(width, device=device)
        size[row] = _pad(row_size, width, 0)
        owner[row] = row_owner
        grid[row] = torch.tensor(row_grid, device=device)
        known_grid[row] = row_grid
        if known_counts is not None:
            known_counts[row] = count
    return dc_replace(tokens, embeddings=embeddings, valid=valid, grid_index=grid_index, size=size, owner=owner,
                      grid=grid, known_grid=tuple(known_grid),
                      known_counts=None if known_counts is None else tuple(known_counts))


def _pad(value: torch.Tensor, length: int, fill: float) -> torch.Tensor:
    """``value`` padded along its first dimension to ``length`` with ``fill``."""
    shape = (length - value.shape[0], *value.shape[1:])
    return torch.cat([value, value.new_full(shape, fill)])


def _pad_slots(value: torch.Tensor, length: int, fill: float) -> torch.Tensor:
    """(I, N, ...) padded along N to ``length`` with ``fill`` (a copy)."""
    shape = (value.shape[0], length - value.shape[1], *value.shape[2:])
    return torch.cat([value, value.new_full(shape, fill)], dim=1)


def _grid_layout(tokens: TokenState, row: int, start: int) -> tuple[list[int], list[int], int]:
    """A row's kept tokens (bank sources) at ``start`` + their cell, summary tokens after the grid, and the
    position after them."""
    picks = torch.nonzero(tokens.valid[row]).flatten()
    cells = int(tokens.grid[row].prod())
    index = tokens.grid_index[row, picks]
    after, end = summary_positions(index, start + cells)
    positions = torch.where(index >= 0, index + start, after).tolist()
    return (row * tokens.num_slots + picks).tolist(), positions, end


def _newline_rows_layout(tokens: TokenState, row: int, start: int) -> tuple[list[int], list[int], int]:
    """A high-resolution row laid out from ``start``: its kept tokens in raster order, each grid row that keeps
    a token ending with the newline (extra embedding 0) at the position its newline has in the full layout,
    summary tokens after the grid; and the position after it all."""
    _, height, width = (int(v) for v in tokens.grid[row])
    valid = tokens.valid[row]
    kept = torch.nonzero(valid & (tokens.grid_index[row] >= 0)).flatten()
    summary = torch.nonzero(valid & (tokens.grid_index[row] < 0)).flatten().tolist()
    cells = tokens.grid_index[row, kept]
    order = torch.argsort(cells, stable=True)
    kept, cells = kept[order].tolist(), cells[order].tolist()
    sources: list[int] = []
    positions: list[int] = []
    for i, (slot, cell) in enumerate(zip(kept, cells, strict=True)):
        line, column = divmod(cell, width)
        sources.append(row * tokens.num_slots + slot)
        positions.append(start + line * (width + 1) + column)
        if i + 1 == len(cells) or cells[i + 1] // width != line:  # the last kept token of its grid row
            sources.append(-1)
            positions.append(start + line * (width + 1) + width)
    end = start + height * (width + 1)
    sources += [row * tokens.num_slots + slot for slot in summary]
    positions += list(range(end, end + len(summary)))
    return sources, positions, end + len(summary)
