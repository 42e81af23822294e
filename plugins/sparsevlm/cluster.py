"""Density-peaks clustering of SparseVLM's recycled tokens, as pure tensor code (batched, padded rows).

The steps of the reference's ``cluster_and_merge`` (after TCFormer's DPC-kNN): distances scaled by
``1/sqrt(C)``; a token's density is ``exp(-mean squared distance to its k nearest)``, k being the number
of clusters and the token itself among them; its peak distance is the distance to the nearest denser
token (the largest distance of the set for the densest); the ``k`` tokens of largest
``density * peak distance`` are the centres, in that order; every token joins its nearest centre and
every centre its own cluster.

Ties are broken by position instead of the reference's random noise (1e-6 added to the densities):
of two tokens of equal density the earlier one counts as denser, equal scores pick the earlier token as
a centre first, and a token equally near two centres joins the earlier centre (the higher score).

Memory: one (M, M) matrix of distances per row plus its (M, k) nearest (``pairwise_scores``), all
other temporaries O(M) or O(k * M).
"""

from __future__ import annotations

import torch

from tokenpress_plugins.sparsevlm.select import compute_dtype


def _squared_norms(tokens: torch.Tensor) -> torch.Tensor:
    return (tokens * tokens).sum(-1)


def density_peaks(tokens: torch.Tensor, valid: torch.Tensor, clusters: torch.Tensor,
                  max_clusters: int) -> torch.Tensor:
    """Cluster each row's valid tokens into ``clusters[b]`` clusters (at most ``max_clusters``, at most
    its valid count). ``tokens`` (B, M, C), ``valid`` (B, M). Returns (B, M) long: the cluster of each
    valid token, numbered by centre score (0 = highest), and -1 for padding."""
    batch, width, channels = tokens.shape
    device = tokens.device
    tokens = tokens.to(compute_dtype(tokens.dtype))
    norms = _squared_norms(tokens)
    pair = valid.unsqueeze(-1) & valid.unsqueeze(-2)

    # pairwise distances, in place on one (B, M, M) product: |x|^2 + |y|^2 - 2 x.y, scaled by 1/sqrt(C)
    distance = torch.matmul(tokens, tokens.transpose(-1, -2))
    distance.mul_(-2.0).add_(norms.unsqueeze(-1)).add_(norms.unsqueeze(-2)).clamp_(min=0.0).sqrt_()
    distance.div_(channels ** 0.5)
    distance.diagonal(dim1=-2, dim2=-1).fill_(0.0)
    distance.masked_fill_(~pair, 0.0)
    largest = distance.amax(dim=(-1, -2))  # (B,): the peak distance of each row's densest token

    # density from the k nearest (the token itself included), k = the row's cluster count
    distance.masked_fill_(~valid.unsqueeze(-2), float("inf"))
    nearest = torch.topk(distance, max_clusters, dim=-1, largest=False).values  # (B, M, K), ascending
    among = torch.arange(max_clusters, device=device) < clusters.view(-1, 1, 1)
    squared = nearest.square_().masked_fill_(~among, 0.0).sum(-1)
    del nearest
    density = torch.exp(-squared / clusters.clamp_min(1).view(-1, 1).to(squared.dtype))
    density = torch.where(valid, density, float("-inf"))

    # strict order by density, earlier token first among equals: "denser" is "earlier in that order"
    order = torch.argsort(density, dim=-1, descending=True, stable=True)
    place = torch.empty_like(order).scatter_(1, order, torch.arange(width, device=device).expand(batch, -1))
    denser = (place.unsqueeze(-2) < place.unsqueeze(-1)) & valid.unsqueeze(-2)  # [i, j]: j is denser than i
    distance.masked_fill_(~denser, float("inf"))
    peak = torch.minimum(distance.amin(-1), largest.unsqueeze(-1))  # the densest: the largest distance
    del distance

    score = torch.where(valid, peak * density, float("-inf"))
    centres = torch.argsort(score, dim=-1, descending=True, stable=True)[:, :max_clusters]  # (B, K)
    real_centre = torch.arange(max_clusters, device=device).unsqueeze(0) < clusters.unsqueeze(-1)

    # every token to its nearest centre (squared distances order the same; scaling changes nothing)
    centre_tokens = torch.gather(tokens, 1, centres.unsqueeze(-1).expand(-1, -1, channels))
    to_centre = torch.matmul(centre_tokens, tokens.transpose(-1, -2))  # (B, K, M)
    to_centre.mul_(-2.0).add_(torch.gather(norms, 1, centres).unsqueeze(-1)).add_(norms.unsqueeze(-2))
    to_centre.masked_fill_(~real_centre.unsqueeze(-1), float("inf"))
    assignment = to_centre.argmin(dim=1)  # (B, M): the first nearest centre
    own = torch.where(real_centre, centres, width)  # each real centre joins its own cluster
    extended = torch.cat([assignment, assignment.new_zeros(batch, 1)], dim=1)
    extended.scatter_(1, own, torch.arange(max_clusters, device=device).expand(batch, -1))
    return torch.where(valid, extended[:, :width], -1)


def clustering_flops(width: int, clusters: int, channels: int) -> float:
    """FLOPs of :func:`density_peaks` on one row of ``width`` slots (as torch's FLOP counter counts them):
    the (M, M) distance product and the centres' (K, M) one."""
    return 2.0 * width * width * channels + 2.0 * clusters * width * channels
