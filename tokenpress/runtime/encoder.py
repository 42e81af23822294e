"""Running stages inside a vision encoder: what every family's encoder loop shares.

A ``post_encoder`` stage of a method that acts inside the encoder (``Method.encoder_blocks``) lists
encoder blocks in ``layers``. The adapter then runs the encoder block by block and, in each listed
block, calls the stages after the block's attention and before its MLP (where ToMe merges), with the
block's keys (:class:`~tokenpress.runtime.context.EncoderBlock`). Once a stage has changed the tokens, every
later block's attention adds ``log(size)`` to each key's logits (proportional attention: a merged
token counts as the patches it stands for) and never attends to padding. Nothing N x N is formed
beyond what the encoder's own attention backend forms.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from typing import Any, Protocol

import torch
from torch import nn

from tokenpress.core.tokens import TokenState
from tokenpress.runtime.context import EncoderBlock


class InsideEncoder(Protocol):
    """What an adapter's encoder loop calls in the blocks that have stages (built by the prefill)."""

    layers: frozenset[int]

    def __call__(self, block: EncoderBlock, tokens: TokenState) -> TokenState: ...


@dataclass
class EncoderRun:
    """Token counts of an encoder run block by block (device tensors, per encoder row, class token not
    counted): what the FLOPs model charges the encoder when stages acted inside it."""

    attention: list[torch.Tensor] = field(default_factory=list)  # per block: (rows,) tokens its attention saw
    mlp: list[torch.Tensor] = field(default_factory=list)  # per block: (rows,) tokens its MLP saw
    row_images: list[int] = field(default_factory=list)  # per encoder row: the image it belongs to


def size_bias(tokens: TokenState, dtype: torch.dtype, class_token: bool) -> torch.Tensor:
    """(I, 1, 1, [1 +] N) additive attention mask: ``log(size)`` of every real token (proportional
    attention), the most negative number for padding, 0 for the class token."""
    bias = torch.where(tokens.valid, tokens.size.clamp_min(1e-12).log(), torch.finfo(torch.float32).min)
    if class_token:
        bias = torch.cat([bias.new_zeros(tokens.num_images, 1), bias], dim=1)
    return bias.to(dtype).view(tokens.num_images, 1, 1, -1)


@contextlib.contextmanager
def captured_output(module: nn.Module, keep: Callable[[torch.Tensor], Any] | None = None) -> Iterator[list[Any]]:
    """Record ``module``'s forward outputs (``keep(output)`` when given) made by this thread inside the
    block: how an encoder loop reads a block's keys without computing them twice. A forward hook on this
    instance, removed on exit; calls of the module by other threads (one model may serve several) are
    not recorded."""
    outputs: list[Any] = []
    thread = threading.get_ident()

    def record(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        if threading.get_ident() == thread:
            outputs.append(output if keep is None else keep(output))

    handle = module.register_forward_hook(record)
    try:
        yield outputs
    finally:
        handle.remove()


def module_view(module: nn.Module, **children: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose named children are replaced, for one call: runs the model's own
    forward (its weights, its hooks, its transformers release's code) with a piece changed, while the
    model's module tree is never touched (another thread may be running it)."""
    view = copy.copy(module)
    view._modules = {**module._modules, **children}
    return view


def attention_received(query: torch.Tensor, key: torch.Tensor, scale: float, bias: torch.Tensor | None = None,
                       chunk: int = 256) -> torch.Tensor:
    """(I, N) float: the attention each of the N keys receives, averaged over the heads and the queries of
    its row: ``query`` (I, H, Q, d) and ``key`` (I, H, N, d) (rotary already applied where the encoder applies
    it; the queries may be a subset of the tokens), ``bias`` an additive mask broadcastable to (I, H, Q, N)
    (-inf or the dtype's minimum where a query does not see a key: other segments, padding). A block of
    ``chunk`` queries at a time: the memory is (I, H, chunk, N), never N x N. A query that sees
    no key contributes nothing."""
    images, heads, length, _ = query.shape
    received = query.new_zeros(images, heads, key.shape[2], dtype=torch.float32)
    counted = query.new_zeros(images, heads, 1, dtype=torch.float32)
    for start in range(0, length, chunk):
        rows = slice(start, min(start + chunk, length))
        logits = torch.matmul(query[:, :, rows].float(), key.float().transpose(-1, -2)) * scale
        if bias is not None:
            logits = logits + bias[..., rows, :].float()
        attends = torch.isfinite(logits).any(-1, keepdim=True) & (logits.amax(-1, keepdim=True) > -1e30)
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0) * attends
        received += weights.sum(dim=2)
        counted += attends.sum(dim=2)
    return (received / counted.clamp_min(1)).mean(dim=1)


def sort_by_cell(tokens: TokenState) -> tuple[TokenState, torch.Tensor]:
    """The tokens in raster order of their cells (summary tokens and padding last), and the (I, N)
    slot permutation applied (for laying signals out the same way). Merges inside the encoder leave
    tokens in the order their algorithm needs; the LLM reads them in the order of their positions."""
    big = torch.iinfo(torch.long).max
    key = torch.where(tokens.valid & (tokens.grid_index >= 0), tokens.grid_index,
                      torch.where(tokens.valid, big - 1, big))
    order = torch.argsort(key, dim=-1, stable=True)
    counts = tokens.known_counts
    return dc_replace(tokens.select(order), known_counts=counts), order


def gather_rows(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``values`` (I, N) or (I, N, C) with every row's slots permuted by ``order`` (I, N)."""
    index = order if values.dim() == 2 else order.unsqueeze(-1).expand(-1, -1, values.shape[-1])
    return torch.gather(values, 1, index)
