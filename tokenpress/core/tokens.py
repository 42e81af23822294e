"""The token state: the visual tokens of a batch as they travel through the pre-LLM stages.

Every image of the batch is one row. Images may hold different numbers of tokens after a stage
(ragged batches); rows are padded and ``valid`` marks the real tokens. Each token carries

* ``grid_index`` - its cell in the image's *current* grid (raster order over ``grid`` = t, h, w);
  this is what positions are computed from (RoPE index, or M-RoPE's t/h/w). ``-1``
  (:data:`NO_CELL`) marks a *summary token*, one that stands for the whole image rather than a
  place in it (a Q-Former's query outputs, :meth:`TokenState.summarize`): it is laid out after the
  image's grid, one position after another, like text,
* ``size`` - how many original patches it stands for (ToMe's size, used for weighted merges),

and every original patch has an owner (``owner``, images x patches: linear bookkeeping): the slot of
the token that stands for it, ``-1`` when it was dropped, :data:`SHARED` when the image's summary
tokens stand for it together. ``source`` (tokens x patches) is derived from it for reports.

Methods never edit these fields by hand: they call :meth:`TokenState.select`, :meth:`keep`,
:meth:`merge` or :meth:`replace`, so the bookkeeping is written once, here. All operations are pure
(they return a new state) and work on whole batches without Python loops over tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from typing import Literal

import torch

Space = Literal["encoder", "llm"]

#: ``grid_index`` of a token that stands for the whole image and has no cell of its grid.
NO_CELL = -1
#: ``owner`` of a patch that the image's summary tokens stand for together.
SHARED = -2


@dataclass(frozen=True)
class TokenState:
    """Visual tokens of a batch of images, with positions, sizes and provenance."""

    embeddings: torch.Tensor  # (I, N, D)
    valid: torch.Tensor  # (I, N) bool
    grid_index: torch.Tensor  # (I, N) long, cell in the current grid (NO_CELL: a summary token)
    size: torch.Tensor  # (I, N) float, number of original patches merged into the token
    owner: torch.Tensor  # (I, P) long, slot standing for each original patch (-1 dropped, SHARED)
    grid: torch.Tensor  # (I, 3) long, current (t, h, w); (0, 0, 0) once only summary tokens remain
    original_grid: torch.Tensor  # (I, 3) long, (t, h, w) of the encoder output
    image_to_sample: torch.Tensor  # (I,) long, batch row each image belongs to
    space: Space = "encoder"
    # What the host already knows, so that reading it never waits for the device (None / False:
    # not known, read from the tensors when asked): every image's (t, h, w), its real token count,
    # and whether every image holds its whole grid in raster order.
    known_grid: tuple[tuple[int, int, int], ...] | None = None
    known_counts: tuple[int, ...] | None = None
    known_dense: bool = False

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_dense(
        cls,
        embeddings: torch.Tensor,
        grid: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
        image_to_sample: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> TokenState:
        """Build the state of full patch grids: token ``j`` of image ``i`` is cell ``j`` of its grid.

        ``embeddings`` is (I, N, D); ``grid`` one (t, h, w) for all images, or one per image (Python
        ints, known to the host from then on, or an (I, 3) tensor). Images with fewer cells than N are
        padded; ``valid`` then marks the real cells.
        """
        num_images, num_tokens, _ = embeddings.shape
        device = embeddings.device
        known = None if isinstance(grid, torch.Tensor) else _host_grid(grid, num_images)
        grid = _as_grid(grid, num_images, device)
        cells = grid.prod(-1)
        arange = torch.arange(num_tokens, device=device)
        dense = valid is None  # a given ``valid`` may leave cells out
        if dense:
            valid = arange.unsqueeze(0) < cells.unsqueeze(1)
        if image_to_sample is None:
            image_to_sample = torch.arange(num_images, device=device)
        slots = arange.expand(num_images, -1)
        return cls(
            embeddings=embeddings,
            valid=valid.clone(),
            grid_index=slots.clone(),
            size=valid.to(torch.float32),
            owner=torch.where(valid, slots, -1),
            grid=grid,
            original_grid=grid.clone(),
            image_to_sample=image_to_sample.to(device),
            known_grid=known,
            known_counts=tuple(t * h * w for t, h, w in known) if known is not None and dense else None,
            known_dense=dense,
        )

    # --- views ----------------------------------------------------------------------------------

    @property
    def num_images(self) -> int:
        return self.embeddings.shape[0]

    @property
    def num_slots(self) -> int:
        return self.embeddings.shape[1]

    def counts(self) -> torch.Tensor:
        """Number of real tokens per image, (I,) long."""
        return self.valid.sum(-1)

    @property
    def has_cell(self) -> torch.Tensor:
        """(I, N) bool: real tokens that sit in a cell of their image's grid (not summary tokens)."""
        return self.valid & (self.grid_index >= 0)

    @property
    def source(self) -> torch.Tensor:
        """(I, N, P) bool: the original patches each token stands for (derived from ``owner``;
        quadratic, for tests and reports, never used by the core)."""
        slots = torch.arange(self.num_slots, device=self.owner.device).view(1, -1, 1)
        owner = self.owner.unsqueeze(1)
        shared = (owner == SHARED) & (self.valid & (self.grid_index == NO_CELL)).unsqueeze(-1)
        return ((owner == slots) | shared) & self.valid.unsqueeze(-1)

    def patch_owner(self, present: torch.Tensor | None = None) -> torch.Tensor:
        """(I, P) long: each original patch's token, -1 when dropped, :data:`SHARED` for summary
        tokens; ``present`` (I, N) limits the owners to the tokens still present (a decoder layer's)."""
        if present is None:
            return self.owner
        alive = present & self.valid
        has_summary = (alive & (self.grid_index == NO_CELL)).any(-1, keepdim=True)
        kept = torch.gather(alive, 1, self.owner.clamp_min(0)) & (self.owner >= 0)
        return torch.where(kept, self.owner, torch.where((self.owner == SHARED) & has_summary, SHARED, -1))

    def is_dense(self, image: int | None = None) -> bool:
        """True when every image (or image ``image``) holds its whole current grid, in raster order."""
        if self.known_dense:
            return True
        images = range(self.num_images) if image is None else [image]
        arange = torch.arange(self.num_slots, device=self.grid_index.device)
        for i in images:
            cells = int(self.grid[i].prod())
            if cells > self.num_slots or not bool(self.valid[i, :cells].all()) or bool(self.valid[i, cells:].any()):
                return False
            if not bool((self.grid_index[i, :cells] == arange[:cells]).all()):
                return False
        return True

    def cell_centres(self) -> torch.Tensor:
        """(I, N, 2) float: each token's cell centre in its frame, (row, column) scaled to [0, 1];
        summary tokens sit at the centre (0.5, 0.5). For methods that read the image's layout
        (a Q-Former's locality), with no host sync."""
        height, width = self.grid[:, 1:2].clamp_min(1), self.grid[:, 2:3].clamp_min(1)
        within = self.grid_index.clamp_min(0) % (height * width)
        centres = torch.stack([(within // width + 0.5) / height, (within % width + 0.5) / width], dim=-1)
        return torch.where((self.grid_index < 0).unsqueeze(-1), torch.full_like(centres, 0.5), centres)

    def grid_sizes(self) -> list[tuple[int, int, int]]:
        """Every image's current ``(t, h, w)`` as Python ints, for methods whose output shapes depend
        on the grids: known to the host after the encoder and every re-gridding (a read of ``grid``,
        a host sync on CUDA, only when a method built a state from a grid tensor)."""
        if self.known_grid is not None:
            return list(self.known_grid)
        return [(t, h, w) for t, h, w in self.grid.tolist()]

    def counts_on_host(self) -> list[int]:
        """:meth:`counts` as Python ints, for methods whose output width depends on them: known to the
        host after the encoder, a re-gridding, a summary or a :meth:`keep` given its ``counts`` (else
        a read, a host sync on CUDA)."""
        if self.known_counts is not None:
            return list(self.known_counts)
        return self.counts().tolist()

    def dense_grid(self, image: int) -> torch.Tensor:
        """Image ``image``'s embeddings as (t, h, w, D); it must hold its whole grid (no selection yet)."""
        if not self.is_dense(image):
            raise ValueError("this operation needs every image's full patch grid (place it before any selection)")
        t, h, w = self.grid_sizes()[image]
        return self.embeddings[image, : t * h * w].reshape(t, h, w, -1)

    # --- operations -----------------------------------------------------------------------------

    def select(self, index: torch.Tensor, valid: torch.Tensor | None = None) -> TokenState:
        """Keep the tokens at ``index`` (I, K) of each image, in that order.

        ``valid`` (I, K) marks which of the K picks are real (for ragged keeps); picks of padding
        slots stay invalid whatever it says.
        """
        gathered_valid = torch.gather(self.valid, 1, index)
        if valid is not None:
            gathered_valid = gathered_valid & valid
        dim = self.embeddings.shape[-1]
        grid_index = torch.gather(self.grid_index, 1, index)
        # each old slot's new slot (-1: not kept); invalid picks go to a dump column
        new_slot = torch.full((self.num_images, self.num_slots + 1), -1, dtype=torch.long, device=index.device)
        picks = torch.arange(index.shape[1], device=index.device).expand_as(index)
        new_slot.scatter_(1, torch.where(gathered_valid, index, self.num_slots), picks)
        owner = torch.where(self.owner >= 0, torch.gather(new_slot, 1, self.owner.clamp_min(0)), self.owner)
        has_summary = (gathered_valid & (grid_index == NO_CELL)).any(-1, keepdim=True)
        owner = torch.where((owner == SHARED) & ~has_summary, -1, owner)
        return dc_replace(
            self,
            embeddings=torch.gather(self.embeddings, 1, index.unsqueeze(-1).expand(-1, -1, dim)),
            valid=gathered_valid,
            grid_index=grid_index,
            size=torch.gather(self.size, 1, index) * gathered_valid,
            owner=owner,
            known_counts=None,
            known_dense=False,
        )

    def keep(self, mask: torch.Tensor, counts: Sequence[int] | None = None) -> TokenState:
        """Keep the tokens where ``mask`` (I, N) is true, preserving their order; rows may differ in count.

        ``counts``, what ``mask`` keeps of each image as Python ints (a fixed-count method knows them:
        :meth:`counts_on_host`), sizes the result without reading ``mask`` (a host sync on CUDA).
        """
        mask = mask & self.valid
        if counts is None:
            index, valid = pack_index(mask)
            return self.select(index, valid)
        index, valid = pack_index(mask, width=max(counts, default=0))
        return dc_replace(self.select(index, valid), known_counts=tuple(int(count) for count in counts))

    def merge(
        self,
        assign: torch.Tensor,
        num_out: int,
        grid: torch.Tensor | Sequence[int] | Sequence[Sequence[int]] | None = None,
        counts: Sequence[int] | None = None,
    ) -> TokenState:
        """Merge tokens: token j of image i goes to output slot ``assign[i, j]`` (-1 drops it).

        Embeddings are averaged weighted by ``size``; sizes add up; provenance is the union. A merged
        token takes the smallest ``grid_index`` of its members with a cell (its position; a merge of
        summary tokens only is a summary token), unless a new ``grid`` is given: then slot k is cell k
        of that grid (a re-gridding such as pooling). ``counts``, each image's output count as Python
        ints when the method knows them, keeps them known to the host (see :meth:`counts_on_host`).
        """
        num_images, _, dim = self.embeddings.shape
        device = self.embeddings.device
        weight = (self.size * self.valid).to(self.embeddings.dtype)
        live = self.valid & (assign >= 0)
        slot = torch.where(live, assign, torch.full_like(assign, num_out))  # dump slot for dropped tokens
        sums = torch.zeros(num_images, num_out + 1, dim, dtype=self.embeddings.dtype, device=device)
        sums.scatter_add_(1, slot.unsqueeze(-1).expand(-1, -1, dim), self.embeddings * weight.unsqueeze(-1))
        sizes = torch.zeros(num_images, num_out + 1, dtype=torch.float32, device=device)
        sizes.scatter_add_(1, slot, (self.size * live).float())
        out_valid = torch.zeros(num_images, num_out + 1, dtype=torch.bool, device=device)
        out_valid.scatter_(1, slot, live)
        out_valid = out_valid[:, :num_out]
        sizes = sizes[:, :num_out]
        embeddings = sums[:, :num_out] / sizes.clamp_min(1e-12).unsqueeze(-1).to(sums.dtype)
        new_slot = torch.where(slot < num_out, slot, -1)
        owner = torch.where(self.owner >= 0, torch.gather(new_slot, 1, self.owner.clamp_min(0)), self.owner)
        if grid is None:
            big = torch.iinfo(torch.long).max
            first = torch.full((num_images, num_out + 1), big, dtype=torch.long, device=device)
            first.scatter_reduce_(1, slot, torch.where(live & (self.grid_index >= 0), self.grid_index, big),
                                  reduce="amin")
            first = first[:, :num_out]
            grid_index = torch.where(out_valid, torch.where(first == big, NO_CELL, first), 0)
            new_grid, known_grid = self.grid, self.known_grid
        else:
            known_grid = None if isinstance(grid, torch.Tensor) else _host_grid(grid, num_images)
            new_grid = _as_grid(grid, num_images, device)
            grid_index = torch.arange(num_out, device=device).expand(num_images, -1).clone()
        return dc_replace(
            self,
            embeddings=embeddings,
            valid=out_valid,
            grid_index=grid_index,
            size=sizes,
            owner=owner,
            grid=new_grid,
            known_grid=known_grid,
            known_counts=None if counts is None else tuple(int(count) for count in counts),
            known_dense=False,
        )

    def replace(
        self,
        embeddings: torch.Tensor,
        *,
        space: Space | None = None,
        grid: torch.Tensor | Sequence[int] | Sequence[Sequence[int]] | None = None,
        assign: torch.Tensor | None = None,
    ) -> TokenState:
        """Swap in new embeddings.

        With the same number of slots and no ``grid``, tokens keep their positions and provenance
        (for example after a projector). With a new ``grid`` the output is that dense grid, and
        ``assign`` (I, N) says which output cell each old token went to, for sizes and provenance.
        """
        if grid is None:
            if embeddings.shape[:2] != self.embeddings.shape[:2]:
                raise ValueError("replace() with a different token count needs the new grid and an assign map")
            return dc_replace(self, embeddings=embeddings, space=space or self.space)
        if assign is None:
            raise ValueError("replace() with a new grid needs `assign`, the output cell of every old token")
        num_out = embeddings.shape[1]
        regridded = self.merge(assign, num_out, grid=grid)
        cells = regridded.grid.prod(-1)
        valid = torch.arange(num_out, device=cells.device).unsqueeze(0) < cells.unsqueeze(1)
        known = regridded.known_grid
        return dc_replace(regridded, embeddings=embeddings, valid=valid, space=space or self.space,
                          known_counts=None if known is None else tuple(t * h * w for t, h, w in known),
                          known_dense=known is not None)

    def summarize(self, embeddings: torch.Tensor, *, space: Space | None = None) -> TokenState:
        """Replace every image's tokens by ``embeddings`` (I, K, D): K summary tokens that stand for
        the whole image together (no grid cell each, see :data:`NO_CELL`), such as a Q-Former's
        query outputs. Each carries an equal share of the image's size; every patch the image still
        covered is owned by its summary tokens together (:data:`SHARED`)."""
        num_images, count = embeddings.shape[:2]
        if num_images != self.num_images:
            raise ValueError(f"summarize(): {num_images} rows of embeddings for {self.num_images} images")
        device = embeddings.device
        valid = torch.ones(num_images, count, dtype=torch.bool, device=device)
        share = (self.size * self.valid).sum(-1, keepdim=True) / max(count, 1)
        return dc_replace(
            self, embeddings=embeddings, valid=valid,
            grid_index=torch.full((num_images, count), NO_CELL, dtype=torch.long, device=device),
            size=share.expand(-1, count).to(torch.float32).clone(),
            owner=torch.where(self.owner != -1, SHARED, -1),
            grid=torch.zeros_like(self.grid), space=space or self.space,
            known_grid=((0, 0, 0),) * num_images, known_counts=(count,) * num_images, known_dense=False,
        )

    def regrid(self, transform: Callable[[torch.Tensor], torch.Tensor], window: int,
               space: Space | None = None) -> TokenState:
        """Map every image's patch grid through ``transform`` to a coarser grid, one window to a cell.

        ``transform`` takes (G, h, w, D) grids (each frame of each image of one grid size, batched)
        and returns (G, ceil(h / window), ceil(w / window), D'); the token at (y, x) of the output
        stands for the input cells of window (y, x). Sizes and provenance follow; images of
        different sizes are transformed in groups of equal grids. What pooling, pixel-unshuffle and
        strided convolutions are made of.
        """
        device = self.embeddings.device
        sizes = self.grid_sizes()
        groups: dict[tuple[int, int, int], list[int]] = {}
        for image, size in enumerate(sizes):
            groups.setdefault(size, []).append(image)
        out_grids = list(sizes)
        rows: dict[int, torch.Tensor] = {}
        assign = torch.full(self.valid.shape, -1, dtype=torch.long, device=device)
        for (frames, height, width), images in groups.items():
            grid = torch.stack([self.dense_grid(i) for i in images])  # (G, t, h, w, D)
            out = transform(grid.reshape(-1, height, width, grid.shape[-1]))
            out_height, out_width = out.shape[1:3]
            if (out_height, out_width) != (-(-height // window), -(-width // window)):
                raise ValueError(f"regrid: a {height}x{width} grid with window {window} must become "
                                 f"{-(-height // window)}x{-(-width // window)}, got {out_height}x{out_width}")
            out = out.reshape(len(images), frames * out_height * out_width, out.shape[-1])
            cells = window_cells(height, width, window, device).repeat(frames) + (
                torch.arange(frames, device=device).repeat_interleave(height * width) * out_height * out_width)
            for row, image in enumerate(images):
                rows[image] = out[row]
                assign[image, : cells.numel()] = cells
                out_grids[image] = (frames, out_height, out_width)
        width = max(row.shape[0] for row in rows.values())
        embeddings = torch.stack([torch.nn.functional.pad(rows[i], (0, 0, 0, width - rows[i].shape[0]))
                                  for i in range(self.num_images)])
        return self.replace(embeddings, space=space, grid=out_grids, assign=assign)

    def to_space(self, embeddings: torch.Tensor, space: Space) -> TokenState:
        """Same tokens, new embeddings in another space (used by the projector)."""
        return dc_replace(self, embeddings=embeddings, space=space)


def patch_owner(source: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """(I, P) long: for each original patch of an (I, N, P) provenance map, the first token that
    covers it, or -1 (``present`` (I, N) limits it to the tokens still present). The core keeps
    owners directly (:meth:`TokenState.patch_owner`); this reads a map such as ``source``."""
    if present is not None:
        source = source & present.unsqueeze(-1)
    owner = source.to(torch.uint8).argmax(1)  # a byte per entry: no float copy of the (I, N, P) map
    return torch.where(source.any(1), owner, torch.full_like(owner, -1))


def window_cells(height: int, width: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(h * w,) output cell of each input cell of an h x w grid cut into ``window`` x ``window``
    windows (a partial window at the edge is a cell too), raster order."""
    out_width = -(-width // window)
    rows = torch.arange(height, device=device) // window
    cols = torch.arange(width, device=device) // window
    return (rows.unsqueeze(1) * out_width + cols.unsqueeze(0)).flatten()


def pack_index(mask: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the true entries of each row of ``mask`` (R, N), packed to the left, in order.

    Returns (index, valid), both (R, K) with K = ``width``, at least the largest row count (default:
    that count, read from ``mask``: a host sync on CUDA); padding picks index 0.
    """
    counts = mask.sum(-1)
    if width is None:
        width = int(counts.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(valid, order, 0), valid


def _host_grid(grid: Sequence[int] | Sequence[Sequence[int]], num_images: int) -> tuple[tuple[int, int, int], ...]:
    """One (t, h, w) for every image, or one per image, as Python ints."""
    rows = list(grid)
    if rows and not isinstance(rows[0], Sequence):
        rows = [rows] * num_images
    return tuple((int(t), int(h), int(w)) for t, h, w in rows)


def _as_grid(grid: torch.Tensor | Sequence[int] | Sequence[Sequence[int]], num_images: int,
             device: torch.device) -> torch.Tensor:
    """One (t, h, w) for every image, or one per image (a tensor or nested sequence), as an (I, 3) tensor."""
    grid = torch.as_tensor(grid, dtype=torch.long, device=device)
    if grid.dim() == 1:
        grid = grid.expand(num_images, 3).clone()
    return grid


def keep_count(count: torch.Tensor | int, keep_ratio: float) -> torch.Tensor:
    """How many tokens a method with ``keep_ratio`` keeps out of ``count``: round, at least one."""
    count = torch.as_tensor(count)
    return torch.clamp(torch.round(count.double() * keep_ratio).long(), min=1)


def keep_counts_on_host(counts: Sequence[int], keep_ratio: float) -> list[int]:
    """:func:`keep_count` of Python ints, computed on the host (the same rounding: half to even)."""
    return [max(1, round(count * keep_ratio)) for count in counts]
