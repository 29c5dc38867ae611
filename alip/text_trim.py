"""Length-aware text encoding: the text tower computes each text only up to its end token.

ALIP runs the text tower twice per sample (raw text and caption), about 57% of a ViT-B/32
forward at 77 tokens, yet real texts are short: synthetic captions are 8-20 tokens. Under the
causal mask, position i attends only to positions <= i, and CLIP pools the end token (the
highest id in the row, found by argmax). So the positions after a text's end token change
nothing that is pooled: cutting the token rows to their longest text gives *exactly* the same
features and gradients, only cheaper.

Modes (`model.text_trim`):
- "off":     every text at the full context (77), raw text and caption in one tower call;
- "batch":   each source (raw text, caption) in its own call, cut to its own longest text;
- "buckets": all texts of the step sorted by length into at most `buckets` runs, each cut to its
             own longest text, the cut points chosen to compute the fewest tokens; features go
             back in the original order.

Lengths are rounded up to a multiple of `ROUND` so that `torch.compile` sees at most
77 / 8 = 10 shapes per call site instead of one per distinct length (no recompilation storm).
The planning itself (`encode_trimmed`, `encode_buckets`: lengths read on the host, bucket cut
points) runs outside dynamo (`torch.compiler.disable`): traced, it would guard on the raw lengths
and recompile nearly every step. With trimming on, `BiPathCLIP.compile` therefore compiles the
towers (`clip.visual`, `clip.transformer`), which the planning calls at the rounded lengths.

open_clip's `CLIP.encode_text` adds the full positional embedding and mask, so it only takes
77-token rows; `encode_text_prefix` is the same computation with both sliced to the row length
(open_clip's own `TextTransformer` slices them the same way). Models whose text pooling is not
argmax, or that have no causal mask, are not trimmed (`supports_trim`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

TrimMode = Literal["off", "batch", "buckets"]
ROUND = 8  # lengths are rounded up to a multiple of this (torch.compile: few distinct shapes)


def supports_trim(clip: nn.Module) -> bool:
    """True for open_clip `CLIP` models with a causal text mask and argmax (end-token) pooling."""
    return (
        all(hasattr(clip, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final"))
        and getattr(clip, "attn_mask", None) is not None
        and getattr(clip, "text_pool_type", None) == "argmax"
    )


def text_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """[B] tokens up to and including the end token: argmax + 1, the position CLIP pools."""
    return tokens.argmax(dim=-1) + 1


def rounded_length(longest: int, context: int) -> int:
    return min(context, math.ceil(max(longest, 1) / ROUND) * ROUND)


def encode_text_prefix(clip: nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """`clip.encode_text` for rows of L <= context tokens; at the full context it *is* encode_text."""
    length = tokens.shape[1]
    if length == clip.positional_embedding.shape[0]:
        return clip.encode_text(tokens, normalize=normalize)
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast_dtype)  # [B, L, W]
    x = x + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
    x = clip.ln_final(x)
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    projection = clip.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
    return F.normalize(x, dim=-1) if normalize else x


TextCalls = list[tuple[int, int]]  # the tower calls of a step: (texts, tokens computed per text)


@torch.compiler.disable  # host-side planning: see the module docstring
def encode_trimmed(clip: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, TextCalls]:
    """Normalised features of `tokens` [B, 77], computed only up to the longest text (rounded)."""
    context = tokens.shape[1]
    length = rounded_length(int(text_lengths(tokens).max()), context)  # one host sync per call
    return encode_text_prefix(clip, tokens[:, :length]), [(tokens.shape[0], length)]


def bucket_sizes(sorted_lengths: Sequence[int], buckets: int, context: int) -> list[int]:
    """Split texts sorted by length into at most `buckets` runs that cost the fewest tokens.

    Each run is computed at its longest (rounded) length, so a run costs count x length tokens.
    Equal-count runs waste much when a few texts are long (15% of web texts fill all 77 tokens):
    instead, a small dynamic programme picks the cut points among the <= 77 / ROUND distinct
    rounded lengths. Returns the run sizes, in order.
    """
    values: list[int] = []  # distinct rounded lengths, ascending
    counts: list[int] = []
    for n in sorted_lengths:
        r = rounded_length(n, context)
        if values and values[-1] == r:
            counts[-1] += 1
        else:
            values.append(r)
            counts.append(1)
    m, k = len(values), min(buckets, len(values))
    prefix = [0]
    for c in counts:
        prefix.append(prefix[-1] + c)
    # best[j][i]: least tokens for the first i distinct lengths in j runs; cut[j][i]: where the last run starts
    inf = float("inf")
    best = [[inf] * (m + 1) for _ in range(k + 1)]
    cut = [[0] * (m + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for j in range(1, k + 1):
        for i in range(1, m + 1):
            for s in range(j - 1, i):
                cost = best[j - 1][s] + (prefix[i] - prefix[s]) * values[i - 1]
                if cost < best[j][i]:
                    best[j][i], cut[j][i] = cost, s
    j = min(range(1, k + 1), key=lambda r: best[r][m])
    sizes, i = [], m
    while i > 0:
        s = cut[j][i]
        sizes.append(prefix[i] - prefix[s])
        i, j = s, j - 1
    return sizes[::-1]


@torch.compiler.disable  # host-side planning: see the module docstring
def encode_buckets(clip: nn.Module, tokens: torch.Tensor, buckets: int) -> tuple[torch.Tensor, TextCalls]:
    """Normalised features of `tokens` [N, 77], in runs of similar length (see `bucket_sizes`)."""
    context = tokens.shape[1]
    lengths = text_lengths(tokens)
    order = torch.argsort(lengths)
    sorted_lengths = lengths[order].tolist()  # the one host sync of the call
    parts, calls, start = [], [], 0
    for size in bucket_sizes(sorted_lengths, buckets, context):
        length = rounded_length(sorted_lengths[start + size - 1], context)
        parts.append(encode_text_prefix(clip, tokens[order[start : start + size], :length]))
        calls.append((size, length))
        start += size
    sorted_features = torch.cat(parts)  # [N, D] in length order
    return sorted_features[torch.argsort(order)], calls  # back to the input order (differentiable gather)


def encode_texts(
    clip: nn.Module, sources: Sequence[torch.Tensor], mode: TrimMode = "off", buckets: int = 4
) -> tuple[list[torch.Tensor], TextCalls]:
    """Normalised features of each token batch in `sources` (raw text, caption, ...), in order,
    and the tower calls made (for the FLOP count of alip.flops)."""
    sizes = [s.shape[0] for s in sources]
    if mode == "batch":
        results = [encode_trimmed(clip, s) for s in sources]
        return [f for f, _ in results], [call for _, calls in results for call in calls]
    tokens = torch.cat(list(sources))  # one tower call for all sources
    if mode == "buckets":
        features, calls = encode_buckets(clip, tokens, buckets)
    else:
        features, calls = clip.encode_text(tokens, normalize=True), [(tokens.shape[0], tokens.shape[1])]
    return list(features.split(sizes)), calls
