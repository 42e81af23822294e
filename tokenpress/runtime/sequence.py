"""The packed token sequence that enters the decoder layers, and the attention masks over it.

Each sample's real tokens sit at the left of its row, in order (text, visual, text...), with
padding at the right; ``valid`` marks the real ones. Causality is therefore slot order, whatever
padding side the caller used, and positions are carried explicitly (``positions``, R x B x N, R = 1
for 1-D RoPE, 3 for M-RoPE), so survivors of a compression keep the positions they had.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from dataclasses import replace as dc_replace

import torch

from tokenpress.core.tokens import pack_index


@dataclass(frozen=True)
class Sequence:
    """Hidden states of the tokens alive before a decoder layer, with what each token is."""

    hidden: torch.Tensor  # (B, N, D)
    positions: torch.Tensor  # (R, B, N) long
    valid: torch.Tensor  # (B, N) bool
    is_visual: torch.Tensor  # (B, N) bool
    is_prompt: torch.Tensor  # (B, N) bool: prompt text or visual (False for pads and generated text)
    column: torch.Tensor  # (B, N) long: input column the token came from (first placeholder column + rank for visual)
    slot_id: torch.Tensor  # (B, N) long: slot in the layer-0 sequence, a stable identity across layers
    visual_id: torch.Tensor  # (B, N) long: image * slots + token slot in the TokenState, -1 for text
    # Host numbers, known without reading the tensors: the layer-0 length (every slot_id is below
    # it), and each row's real tokens and real visual tokens.
    slot_count: int
    lengths: tuple[int, ...]
    visual_lengths: tuple[int, ...]
    #: (B, N) float: how many original patches each visual token stands for (1 for text); None: all 1.
    size: torch.Tensor | None = None
    #: (B, N) long: the image (its index in the batch) each token laid out in an image's placeholders belongs
    #: to, -1 for text (Gemma 3's image tokens attend among themselves, per image); None: not laid out.
    block: torch.Tensor | None = None
    #: Per-token values a family carries beside the hidden states, (B, N, D') each, following every pack and
    #: merge (weighted like the hidden states): Qwen3-VL's DeepStack features still to be added.
    extra: dict[str, torch.Tensor] | None = None

    def sizes(self) -> torch.Tensor:
        """(B, N) float: :attr:`size`, or ones where it is not kept."""
        if self.size is None:
            return torch.ones(self.valid.shape, dtype=torch.float32, device=self.valid.device)
        return self.size.float()

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def length(self) -> int:
        return self.hidden.shape[1]

    @property
    def padded(self) -> bool:
        """Whether any row holds padding slots (a host number: no device read)."""
        return any(length != self.length for length in self.lengths)

    def visual_counts(self) -> torch.Tensor:
        """Real visual tokens per sample, (B,)."""
        return (self.is_visual & self.valid).sum(-1)

    def last_prompt_index(self) -> torch.Tensor:
        """Slot of each sample's last prompt *text* token, (B,) (the query FastV-style methods use)."""
        text = self.valid & self.is_prompt & ~self.is_visual
        slots = torch.arange(self.length, device=text.device).expand_as(text)
        return torch.where(text, slots, -1).max(-1).values.clamp_min(0)

    def pack(self, mask: torch.Tensor) -> tuple[Sequence, torch.Tensor, torch.Tensor]:
        """Keep the slots where ``mask`` holds (and valid), left-packed in order.

        Returns the new sequence and the (index, valid) of the picks into this one. The new row counts
        are read once (the new width is a shape: a host sync on CUDA, one per pack).
        """
        mask = mask & self.valid
        lengths, visual_lengths = torch.stack([mask.sum(-1), (mask & self.is_visual).sum(-1)]).tolist()
        index, picked = pack_index(mask, width=max(lengths, default=0))
        gathered: dict = {"lengths": tuple(lengths), "visual_lengths": tuple(visual_lengths)}
        def rows(value: torch.Tensor) -> torch.Tensor:
            return torch.gather(value, 1, index.unsqueeze(-1).expand(-1, -1, value.shape[-1]))

        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in gathered:
                continue
            if f.name == "extra" and value is not None:
                gathered[f.name] = {name: rows(values) for name, values in value.items()}
            elif not isinstance(value, torch.Tensor):
                gathered[f.name] = value
            elif f.name == "hidden":
                gathered[f.name] = rows(value)
            elif f.name == "positions":
                gathered[f.name] = torch.gather(value, 2, index.unsqueeze(0).expand(value.shape[0], -1, -1))
            else:
                gathered[f.name] = torch.gather(value, 1, index)
        gathered["valid"] = picked
        return Sequence(**gathered), index, picked

    def merge(self, group: torch.Tensor, weight: torch.Tensor | None, groups: int) -> tuple[Sequence, torch.Tensor,
                                                                                               torch.Tensor]:
        """Replace visual tokens by weighted means of them (a :class:`~tokenpress.Merge` decision):
        ``group`` (B, N) puts a visual token in merged token g >= 0 of its row, keeps it (-1) or drops it
        (-2); ``weight`` (B, N) weighs it in its group (default: its size); ``groups`` bounds g.

        A merged token takes the slot, position, column and identity of its first member (the earliest
        slot) and stands for all of them: its size is the sum of theirs. Returns the packed sequence
        and, like :meth:`pack`, the (index, valid) of the picks into this one."""
        batch, length, _ = self.hidden.shape
        device = self.hidden.device
        visual = self.is_visual & self.valid
        member = visual & (group >= 0)
        slot = torch.where(member, group, groups)  # a dump group for everything else
        sizes = self.sizes()
        weight = (sizes if weight is None else weight.float()) * member
        slots = torch.arange(length, device=device).expand(batch, -1)
        first = first_members(member, slot, groups)
        totals = torch.zeros(batch, groups + 1, dtype=torch.float32, device=device).scatter_add_(1, slot, weight)
        merged_size = torch.zeros(batch, groups + 1, dtype=torch.float32, device=device).scatter_add_(
            1, slot, sizes * member)
        leads = member & (torch.gather(first, 1, slot) == slots)

        def merged(values: torch.Tensor) -> torch.Tensor:
            """``values`` (B, N, D') with each group's first member replaced by the group's weighted mean."""
            width = values.shape[-1]
            sums = torch.zeros(batch, groups + 1, width, dtype=torch.float32, device=device)
            sums.scatter_add_(1, slot.unsqueeze(-1).expand(-1, -1, width), values.float() * weight.unsqueeze(-1))
            mean = (sums / totals.clamp_min(1e-12).unsqueeze(-1)).to(values.dtype)
            return torch.where(leads.unsqueeze(-1), torch.gather(mean, 1, slot.unsqueeze(-1).expand(-1, -1, width)),
                               values)

        size = torch.where(leads, torch.gather(merged_size, 1, slot), sizes)
        extra = None if self.extra is None else {name: merged(values) for name, values in self.extra.items()}
        keep = self.valid & ~(visual & (group == -2)) & (~member | leads)
        return dc_replace(self, hidden=merged(self.hidden), size=size, extra=extra).pack(keep)

    def scatter_hidden(self, index: torch.Tensor, picked: torch.Tensor, hidden: torch.Tensor) -> Sequence:
        """Put ``hidden`` (B, K, D) back at the slots ``index`` (B, K) it was packed from."""
        batch, length, dim = self.hidden.shape
        target = torch.where(picked, index, length)  # padding picks go to a dump slot
        out = torch.cat([self.hidden, self.hidden.new_zeros(batch, 1, dim)], dim=1)
        out.scatter_(1, target.unsqueeze(-1).expand(-1, -1, dim), hidden)  # in place: out is this call's own
        return dc_replace(self, hidden=out[:, :length])

    def with_hidden(self, hidden: torch.Tensor) -> Sequence:
        return dc_replace(self, hidden=hidden)

    def with_positions(self, positions: torch.Tensor) -> Sequence:
        return dc_replace(self, positions=positions)

    def with_extra(self, **values: torch.Tensor) -> Sequence:
        """This sequence with per-token values (B, N, D') carried beside the hidden states (see :attr:`extra`)."""
        return dc_replace(self, extra={**(self.extra or {}), **values})


def next_positions(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Position the next text token takes in each row: one past the largest real position, (B,)."""
    masked = torch.where(valid.unsqueeze(0), positions, torch.iinfo(positions.dtype).min)
    return masked.amax(dim=(0, 2)) + 1


def allowed_keys(key_valid: torch.Tensor, num_new: int) -> torch.Tensor:
    """(B, n, S) bool: which keys each of the ``num_new`` last slots may attend to (causal + real keys)."""
    total = key_valid.shape[1]
    device = key_valid.device
    query_slot = torch.arange(total - num_new, total, device=device).unsqueeze(1)
    key_slot = torch.arange(total, device=device).unsqueeze(0)
    return key_valid.unsqueeze(1) & (key_slot <= query_slot).unsqueeze(0)


def attention_mask_for(
    implementation: str, key_valid: torch.Tensor, num_new: int, dtype: torch.dtype, padded: bool | None = None
) -> torch.Tensor | None:
    """The mask a decoder layer gets, in the form its attention implementation expects (None: causal).

    ``padded``: whether ``key_valid`` has a false entry, when the host knows (else it is read: a host sync).
    """
    if implementation.startswith("flash"):
        # FlashAttention unpads by a 2-D key mask and aligns causality bottom-right, which is
        # exactly slot order here (new tokens are the last slots).
        return key_valid.long()
    if padded is None and implementation == "sdpa":
        padded = not bool(key_valid.all())
    if implementation == "sdpa" and num_new in (1, key_valid.shape[1]) and not padded:
        # No padding, and either a whole prefill or one new token: plain causal attention, left to
        # SDPA's is_causal so that its flash and memory-efficient kernels stay eligible (they refuse
        # an explicit mask). A chunk after a cached prefix keeps the mask: is_causal aligns top-left.
        return None
    allowed = allowed_keys(key_valid, num_new).unsqueeze(1)
    if implementation == "sdpa":
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def first_members(member: torch.Tensor, slot: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, groups + 1): the earliest slot among each merge group's members (``member`` (B, N) bool,
    ``slot`` (B, N) the group of each slot, ``groups`` the dump group of non-members); N where a group
    has none. A merged token sits where its first member was."""
    length = member.shape[1]
    slots = torch.arange(length, device=member.device).expand_as(member)
    first = torch.full((member.shape[0], groups + 1), length, dtype=torch.long, device=member.device)
    return first.scatter_reduce_(1, slot, torch.where(member, slots, length), reduce="amin")
