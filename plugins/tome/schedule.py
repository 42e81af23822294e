"""How many tokens each listed encoder block merges away: ToMe's ``r`` (constant, a list, or a
schedule with an inflection), or a keep ratio spread evenly over the blocks. Pure arithmetic on the
host: the count every block leaves is known before it runs (no device read, and a promise the
profiling contract and the FLOPs model can check)."""

from __future__ import annotations

from collections.abc import Sequence


def inflected(r: int, inflection: float, blocks: int) -> list[int]:
    """ToMe's schedule of one ``r`` over ``blocks`` blocks: linear from ``r * (1 - inflection)`` at the
    first to ``r * (1 + inflection)`` at the last (truncated to integers, as its reference does);
    inflection 0 is the constant schedule, a negative one decreases."""
    first = int(r * (1.0 - inflection))
    last = 2 * r - first
    if blocks == 1:
        return [first]
    step = (last - first) / (blocks - 1)
    return [int(first + step * index) for index in range(blocks)]


def block_merges(count: int, position: int, blocks: int, r: int | Sequence[int] | None, inflection: float,
                 keep_ratio: float | None) -> int:
    """Tokens a row of ``count`` tokens merges away in the ``position``-th of ``blocks`` listed blocks
    (before any cap on what one matching can merge). With ``keep_ratio`` every block keeps the same
    share, ``keep_ratio ** (1 / blocks)`` (rounded, at least one token), so about ``keep_ratio`` of
    the tokens are left after the last block."""
    if keep_ratio is not None:
        kept = max(1, round(count * keep_ratio ** (1.0 / blocks)))
        return max(0, count - kept)
    if isinstance(r, int):
        return inflected(r, inflection, blocks)[position]
    return int(r[position]) if r is not None else 0
