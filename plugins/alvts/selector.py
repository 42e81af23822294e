"""ALVTS's selector as pure tensor code: low-rank projections and the importance score.

No model knowledge here: the method (``method.py``) takes a layer's weights, norms and rotary
tables from the model adapter and hands tensors to these functions.

* :func:`low_rank` - ``W ~ U V`` from a truncated SVD, ``U = U_R S_R^1/2`` and ``V = S_R^1/2 V_R^T``.
* :class:`FoldedQueryKey` - a layer's low-rank q and k with the rotary rotation's fixed linear part
  (``rotate_half``) and the logit scale folded into the up-projections, laid out head-major: the
  rotated queries and keys come out of two small products and two in-place passes each, in the layout
  the score's products read, with no copy in between.
* :func:`importance` - ``S(i) = S_V2V(i) * S_T2V(i)``: the mean attention visual token ``i``
  receives from the visual tokens, times the mean it receives from the prompt's text tokens, with
  the layer's causal softmax over all keys, averaged over heads. A chunk of query rows at a time,
  each against the keys up to its last row only (so no (rows x keys) matrix larger than ``chunk x keys``
  per head ever exists, and the causal half is never computed).
* ``score_kernel.c`` - the same score in one compiled pass per (sample, head) on the CPU, from the
  folded factors (:meth:`FoldedQueryKey.importance`) or from given queries and keys: the logits of a
  few rows at a time never leave the cache. The torch loop above stays the reference it is tested equal
  to, and runs wherever the kernel cannot (GPU, autograd, a dispatch mode, no C compiler).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenpress.core.native import load_kernel
from tokenpress.core.select import host_loop_allowed


@dataclass
class LowRank:
    """``y = up @ (down @ x) + bias``: a rank-``R`` stand-in for a linear layer ``y = W x + b``."""

    down: torch.Tensor  # (R, in)
    up: torch.Tensor  # (out, R)
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(torch.matmul(x, self.down.transpose(0, 1)), self.up.transpose(0, 1))
        return y if self.bias is None else y + self.bias

    def to(self, reference: torch.Tensor) -> LowRank:
        """The same factors on ``reference``'s device and dtype."""
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=reference.device, dtype=reference.dtype)

        return LowRank(cast(self.down), cast(self.up), cast(self.bias))

    def parameters(self) -> list[torch.Tensor]:
        return [self.down, self.up]


def low_rank(weight: torch.Tensor, bias: torch.Tensor | None, rank: int) -> LowRank:
    """The truncated SVD of ``weight`` (out x in) at ``rank``, split evenly: ``U_R S^1/2`` and ``S^1/2 V_R^T``.

    At ``rank = min(out, in)`` it reproduces ``weight`` up to float32 rounding.
    """
    matrix = weight.detach().to(torch.float32)
    rank = max(1, min(rank, *matrix.shape))
    left, singular, right = torch.linalg.svd(matrix, full_matrices=False)
    root = singular[:rank].sqrt()
    up = left[:, :rank] * root
    down = root.unsqueeze(1) * right[:rank]
    return LowRank(down.contiguous(), up.contiguous(), None if bias is None else bias.detach().to(torch.float32))


#: ``turn(x)``: the fixed linear part ``T`` of a rotary rotation ``x * cos + T(x) * sin`` (``rotate_half``
#: in every transformers decoder), on x of layout (B, N, H, d).
Turn = Callable[[torch.Tensor], torch.Tensor]


def rotation_is_linear(rotate: Callable[..., torch.Tensor], turn: Turn, heads: int, head_dim: int) -> bool:
    """Whether ``rotate(x, cos, sin)`` equals ``x * cos + turn(x) * sin`` (checked on random values), the
    form :class:`FoldedQueryKey` folds. An adapter whose rotation differs keeps the unfolded path."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, heads, head_dim, generator=generator, dtype=torch.float64)
    cos, sin = (torch.randn(1, 3, head_dim, generator=generator, dtype=torch.float64) for _ in range(2))
    expected = x * cos.unsqueeze(2) + turn(x) * sin.unsqueeze(2)
    return torch.allclose(rotate(x, cos, sin), expected, rtol=1e-12, atol=1e-12)


@dataclass
class FoldedQueryKey:
    """A layer's low-rank (q, k) with each up-projection split per head into its plain part and its turned
    copy ``T up``, so that ``rotate(up @ v) = (up @ v) * cos + (T up @ v) * sin`` is two small products
    and two in-place passes; the logit scale is folded into the queries. Float32 throughout: the score
    is computed in float32 anyway."""

    down: torch.Tensor  # (Rq + Rk, D): the q and k down-projections, one product for both
    q_up: torch.Tensor  # (2, H, Rq, d): [up, T up] per head, times the scale
    k_up: torch.Tensor  # (2, H, Rk, d): the same for the keys, repeated for grouped-query heads
    q_bias: torch.Tensor | None  # (2, H, 1, d)
    k_bias: torch.Tensor | None  # (2, H, 1, d)

    @classmethod
    def fold(cls, q: LowRank, k: LowRank, turn: Turn, heads: int, kv_heads: int, head_dim: int,
             scaling: float) -> FoldedQueryKey:
        """Fold ``turn`` and ``scaling`` into ``q`` (``heads`` x ``head_dim`` wide) and ``k`` (``kv_heads``)."""
        def split(up: torch.Tensor, count: int) -> torch.Tensor:  # (count * d, R) -> (2, heads, R, d)
            rank = up.shape[-1]
            plain = up.float().transpose(0, 1).reshape(1, rank, count, head_dim)
            halves = torch.cat([plain, turn(plain)]).permute(0, 2, 1, 3)  # (2, count, R, d)
            return halves.repeat_interleave(heads // count, 1).contiguous()

        def split_bias(bias: torch.Tensor | None, count: int) -> torch.Tensor | None:  # -> (2, heads, 1, d)
            return None if bias is None else split(bias.unsqueeze(-1), count)  # a bias is a rank-1 column

        q_bias = split_bias(q.bias, heads)
        return cls(
            down=torch.cat([q.down, k.down]).float().contiguous(),
            q_up=split(q.up, heads) * scaling,
            k_up=split(k.up, kv_heads),
            q_bias=None if q_bias is None else q_bias * scaling,
            k_bias=split_bias(k.bias, kv_heads),
        )

    @property
    def q_rank(self) -> int:
        """Rq: the first Rq rows of :attr:`down` are the queries'."""
        return self.q_up.shape[2]

    def to(self, device: torch.device) -> FoldedQueryKey:
        """The same factors on ``device``."""
        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return FoldedQueryKey(moved(self.down), moved(self.q_up), moved(self.k_up),
                              moved(self.q_bias), moved(self.k_bias))

    @torch.no_grad()
    def __call__(self, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled rotated queries (B, H, N, d), contiguous, and rotated keys transposed (B, H, d, N), a view
        of a contiguous (B, H, N, d), both float32, from the normed hidden states (B, N, D) and the rotary
        tables (B, N, d).

        Each stream is written once and rotated in place: fresh (B, H, N, d) temporaries cost more here
        than the products themselves (page faults on CPU). No graph is kept, even when the model runs
        with autograd on: the folded selector only feeds a discrete choice (calibration differentiates
        through the unfolded path)."""
        cos, sin = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
        low = torch.matmul(normed.float(), self.down.transpose(0, 1)).unsqueeze(1)  # (B, 1, N, Rq + Rk)
        rotated, turned = [], None
        for factors, up, bias in ((low[..., :self.q_rank], self.q_up, self.q_bias),
                                  (low[..., self.q_rank:], self.k_up, self.k_bias)):
            stream = torch.matmul(factors, up[0])
            turned = torch.matmul(factors, up[1], out=turned)  # one scratch for both streams' turned halves
            if bias is not None:
                stream.add_(bias[0])
                turned.add_(bias[1])
            rotated.append(stream.mul_(cos).addcmul_(turned, sin))
        return rotated[0], rotated[1].transpose(-1, -2)

    @torch.no_grad()
    def importance(self, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, valid: torch.Tensor,
                   visual: torch.Tensor, text: torch.Tensor, chunk: int = 64,
                   combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                   native: bool = True) -> torch.Tensor:
        """:func:`importance` of this layer's folded (q, k), from the normed hidden states and rotary
        tables as :meth:`__call__` takes them.

        On the CPU the compiled kernel (``score_kernel.c``) makes each head's queries and keys in cache
        and scores them there, where it can run; else (``native=False``, a GPU, a dispatch mode watching)
        :meth:`__call__` then :func:`scaled_importance`, the reference it is tested equal to."""
        kernel = _score_kernel("folded_totals") if native and host_loop_allowed(normed) else None
        if kernel is None:
            scaled, keys = self(normed, cos, sin)
            return scaled_importance(scaled, keys, valid, visual, text, chunk, combine, native)
        batch, length, _ = normed.shape
        heads, dim = self.q_up.shape[1], self.q_up.shape[-1]
        visual, text, weights = _rows(valid, visual, text)
        low = torch.matmul(normed.float(), self.down.transpose(0, 1))  # (B, N, Rq + Rk)
        cos, sin = (t.float().expand(batch, length, dim).contiguous() for t in (cos, sin))
        totals = low.new_zeros(batch, heads, 2, length)
        _run_kernel(kernel, low, self.q_up, self.k_up, self.q_bias, self.k_bias, cos, sin, *_row_weights(weights),
                    totals, batch, heads, length, dim, self.q_rank, self.k_up.shape[2])
        return _score(totals.sum(1), visual, text, heads, combine)


def block_causal_pairs(length: int, chunk: int) -> int:
    """Query-key pairs :func:`importance` scores on ``length`` slots, ``chunk`` rows at a time: each block
    of rows against the keys up to its last row (the diagonal block whole, masked after)."""
    return sum(min(chunk, length - start) * min(start + chunk, length) for start in range(0, length, chunk))


def importance(
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor,
    visual: torch.Tensor,
    text: torch.Tensor,
    scaling: float,
    chunk: int = 64,
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    native: bool = True,
) -> torch.Tensor:
    """``S_V2V * S_T2V`` of every slot, (B, N) float32; zero outside the real visual slots.

    ``query`` (B, H, N, d) and ``key`` (B, H, N, d) are rotated (keys repeated for grouped-query
    attention); ``valid``, ``visual``, ``text`` (B, N) mark real slots (left-packed: a sample's real slots
    come first), visual slots and the text rows whose attention counts for ``S_T2V``. A row attends
    causally (slot order) to real keys. ``combine(v2v, t2v)`` replaces the product (for ablations).
    ``native=False`` keeps the torch loop where the compiled kernel would run (:func:`scaled_importance`).

    Every slot is a query row, weighted (visual, text) or 0; ``chunk`` rows at a time, each block of rows
    against the keys up to its last row only (causality: the keys after it are never computed), the mask
    needed on the block's own diagonal alone. Memory: ``chunk x N`` per head; work: half the rows x keys
    products a full matrix would take.
    """
    # contiguous once: the rotated (B, N, H, d) views would otherwise be copied by every chunk's product
    scaled = (query.float() * scaling).contiguous()
    keys = key.float().transpose(-1, -2).contiguous()  # (B, H, d, N)
    return scaled_importance(scaled, keys, valid, visual, text, chunk, combine, native)


def scaled_importance(
    scaled: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    visual: torch.Tensor,
    text: torch.Tensor,
    chunk: int = 64,
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    native: bool = True,
) -> torch.Tensor:
    """:func:`importance` from queries already scaled, (B, H, N, d) contiguous, and keys already
    transposed, (B, H, d, N) (contiguous or a transposed view), both float32: what
    :class:`FoldedQueryKey` returns.

    On the CPU the totals come from the compiled kernel (``score_kernel.c``) where it can run
    (:func:`tokenpress.core.native.load_kernel`), outside autograd and any torch dispatch mode;
    ``native=False`` runs the torch loop, the reference it is tested equal to."""
    visual, text, weights = _rows(valid, visual, text)
    differentiable = torch.is_grad_enabled() and (scaled.requires_grad or keys.requires_grad)
    native = native and not differentiable and scaled.dtype == keys.dtype == torch.float32
    kernel = _score_kernel("block_causal_totals") if native and host_loop_allowed(scaled) else None
    if kernel is not None:
        totals = _kernel_totals(kernel, scaled, keys, weights)
    else:
        totals = _block_totals(scaled, keys, weights, chunk, differentiable)
    return _score(totals, visual, text, scaled.shape[1], combine)


def _rows(valid: torch.Tensor, visual: torch.Tensor,
          text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real visual and text rows, (B, N) bool each, and their (B, 2, N) float weights: which rows
    count for S_V2V and which for S_T2V."""
    visual, text = visual & valid, text & valid & ~visual
    return visual, text, torch.stack([visual, text], 1).float()


def _score(totals: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, heads: int,
           combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """S from the (B, 2, N) weighted totals summed over ``heads``: each sum's mean over heads and rows."""
    totals /= heads
    v2v = totals[:, 0] / visual.sum(-1, keepdim=True).clamp_min(1)
    t2v = totals[:, 1] / text.sum(-1, keepdim=True).clamp_min(1)
    score = combine(v2v, t2v) if combine is not None else v2v * t2v
    return score * visual


#: The C signatures of ``score_kernel.c``'s entry points (pointers, then sizes, then the thread count).
_KERNEL_ARGUMENTS = {"block_causal_totals": (5, 4), "folded_totals": (10, 6)}


@functools.cache
def _score_kernel(name: str) -> Callable[..., int] | None:
    """``score_kernel.c``'s entry point ``name``, compiled for this machine; None where it cannot run."""
    library = load_kernel(Path(__file__).with_name("score_kernel.c"))
    if library is None:
        return None
    pointers, sizes = _KERNEL_ARGUMENTS[name]
    kernel = getattr(library, name)
    kernel.restype = ctypes.c_int
    kernel.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int64] * sizes + [ctypes.c_int]
    return kernel


def _run_kernel(kernel: Callable[..., int], *arguments: torch.Tensor | int | None) -> None:
    """Call ``kernel`` with tensors passed as their data pointers (None as NULL), then the thread count."""
    pointers = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in arguments]
    if kernel(*pointers, torch.get_num_threads()) != 0:
        raise MemoryError("ALVTS's score kernel could not allocate its scratch rows")


def _row_weights(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's form of the (B, 2, N) row weights: each row's weight and the sum it counts for (0:
    S_V2V, 1: S_T2V); a row counts for one of them at most."""
    return weights.sum(1).contiguous(), weights[:, 1].to(torch.uint8).contiguous()


def _kernel_totals(kernel: Callable[..., int], scaled: torch.Tensor, keys: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """The (B, 2, N) weighted attention totals, summed over heads, from ``score_kernel.c``."""
    batch, heads, length, dim = scaled.shape
    totals = scaled.new_zeros(batch, heads, 2, length)
    # keys (B, H, d, N) contiguous: a transposed view is copied once
    _run_kernel(kernel, scaled.contiguous(), keys.contiguous(), *_row_weights(weights), totals,
                batch * heads, heads, length, dim)
    return totals.sum(1)


def _block_totals(scaled: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, chunk: int,
                  differentiable: bool) -> torch.Tensor:
    """The (B, 2, N) weighted attention totals, summed over heads, by chunks of rows in torch."""
    batch, heads, length, _ = scaled.shape
    # each block's row weights repeated per head, in its probabilities' (head, row) order: (B, 2, blocks, H, c)
    blocks = -(-length // chunk)
    block_weights = torch.nn.functional.pad(weights, (0, blocks * chunk - length)).view(
        batch, 2, blocks, 1, chunk).expand(batch, 2, blocks, heads, chunk).contiguous()
    # -inf on a block's future keys, added to its diagonal block: one vectorised pass (a broadcast
    # boolean masked_fill_ takes several times longer)
    future = torch.full((chunk, chunk), -torch.inf, device=scaled.device).triu(1)
    totals = torch.zeros(batch, 2, length, dtype=torch.float32, device=scaled.device)
    # every block's logits and probabilities in one buffer, written in place: a fresh tensor per block
    # and per step costs more in page faults than its product and softmax take (measured on CPU).
    # Calibration differentiates through the score: there each block gets its own tensors.
    workspace = None if differentiable else torch.empty(
        batch * heads * min(chunk, length) * length, dtype=torch.float32, device=scaled.device)
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        rows = stop - start
        out = None if workspace is None else workspace[:batch * heads * rows * stop].view(batch, heads, rows, stop)
        logits = torch.matmul(scaled[:, :, start:stop], keys[..., :stop], out=out)  # (B, H, c, stop)
        logits[..., start:stop].add_(future[:rows, :rows])
        probs = torch.softmax(logits, dim=-1, out=out).view(batch, heads * rows, stop)
        # the weighted sum over the block's rows and every head in one product: (B, 2, H*c) @ (B, H*c, stop)
        row_weights = block_weights[:, :, start // chunk, :, :rows].reshape(batch, 2, heads * rows)
        totals[..., :stop] += torch.bmm(row_weights, probs)
    return totals


def coverage_curve(scores: torch.Tensor, candidates: torch.Tensor, points: int = 101) -> torch.Tensor:
    """For each sample, the share of the total score held by its best ``f`` candidates, at ``points``
    fractions ``f`` from 0 to 1: (B, points). What ``budget: adaptive`` learns from."""
    fractions = torch.linspace(0, 1, points, device=scores.device)
    curves = []
    for row, mask in zip(scores, candidates, strict=True):
        values = torch.sort(row[mask].float(), descending=True).values
        total = values.sum().clamp_min(1e-30)
        cumulative = torch.cat([values.new_zeros(1), torch.cumsum(values, 0) / total])
        taken = torch.round(fractions * values.numel()).long()
        curves.append(cumulative[taken])
    return torch.stack(curves)
