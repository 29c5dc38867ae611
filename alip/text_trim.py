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
- "buckets": all texts of the step sorted by length into `buckets` groups of equal count, each
             cut to its own longest text; features go back in the original order.

Lengths are rounded up to a multiple of `ROUND` so that `torch.compile` sees at most
77 / 8 = 10 shapes per call site instead of one per distinct length (no recompilation storm).

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


def encode_trimmed(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Normalised features of `tokens` [B, 77], computed only up to the longest text (rounded)."""
    context = tokens.shape[1]
    length = rounded_length(int(text_lengths(tokens).max()), context)  # one host sync per call
    return encode_text_prefix(clip, tokens[:, :length])


def encode_buckets(clip: nn.Module, tokens: torch.Tensor, buckets: int) -> torch.Tensor:
    """Normalised features of `tokens` [N, 77]: sorted by length into `buckets` equal groups."""
    lengths = text_lengths(tokens)
    order = torch.argsort(lengths)
    parts = [encode_trimmed(clip, tokens[idx]) for idx in order.tensor_split(min(buckets, len(order)))]
    sorted_features = torch.cat(parts)  # [N, D] in length order
    return sorted_features[torch.argsort(order)]  # back to the input order (differentiable gather)


def encode_texts(
    clip: nn.Module, sources: Sequence[torch.Tensor], mode: TrimMode = "off", buckets: int = 4
) -> list[torch.Tensor]:
    """Normalised features of each token batch in `sources` (raw text, caption, ...), in order."""
    sizes = [s.shape[0] for s in sources]
    if mode == "batch":
        return [encode_trimmed(clip, s) for s in sources]
    tokens = torch.cat(list(sources))  # one tower call for all sources
    if mode == "buckets":
        features = encode_buckets(clip, tokens, buckets)
    else:
        features = clip.encode_text(tokens, normalize=True)
    return list(features.split(sizes))
