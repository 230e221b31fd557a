"""Token-level features of an open_clip model: patch and word tokens, last-block attention.

open_clip runs attention with ``need_weights=False`` (scaled-dot-product attention), so the
attention of the last block is recomputed here from that block's input, captured by a forward
pre-hook: ``softmax(q kᵀ / √d_head + mask)``, averaged over heads. The image tower gives the
[CLS] → patch row; the text tower (causal, pooled at the end-of-text token) gives the
end-of-text row, the analogue of a BERT [CLS] row. Sub-word pieces are grouped into words with
the BPE tokenizer's ``</w>`` end-of-word mark. Token losses (``--loss mgca``, ``g2d``) read
these; see docs/architecture.md ("The loss").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

__all__ = [
    "ImageTokens",
    "TextTokens",
    "TokenBatch",
    "TokenCapture",
    "TokenPlan",
    "WordVocabulary",
    "block_attention",
    "clipped_importance",
    "join_texts",
    "pool_words",
]


@dataclass
class ImageTokens:
    """Patch tokens of a ViT image tower and its last block's [CLS] → patch attention."""

    patches: torch.Tensor  # [B, P, W] after ln_post, as open_clip's output_tokens
    attention: torch.Tensor  # [B, P] heads averaged, no gradient
    grid: tuple[int, int]  # patch rows and columns (P = rows * columns)

    @property
    def weights(self) -> torch.Tensor:
        """Patch importance: the attention clipped to its 10th–90th percentile, sum 1."""
        return clipped_importance(self.attention, torch.ones_like(self.attention, dtype=torch.bool))


@dataclass
class TextTokens:
    """Word-level features of a text tower: pieces pooled per word, with their importance."""

    tokens: torch.Tensor  # [B, L, W] piece tokens after ln_final
    word_index: torch.Tensor  # [B, L] the word of each piece, -1 for SOT/EOT/padding
    words: torch.Tensor  # [B, T, W] mean of each word's pieces (T = L: zero rows are padding)
    word_mask: torch.Tensor  # [B, T] bool, True for a word
    attention: torch.Tensor  # [B, T] end-of-text attention summed over each word's pieces

    @property
    def weights(self) -> torch.Tensor:
        """Word importance: clipped to the 10th–90th percentile of the row, sum 1, padding 0."""
        return clipped_importance(self.attention, self.word_mask)


# ----------------------------------------------------------------------------- attention


def block_attention(
    block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The self-attention probabilities of an open_clip ``ResidualAttentionBlock`` on its input
    ``x`` ``[B, N, W]`` (batch first), averaged over heads: ``[B, N, N]``."""
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
        raise UserError(
            "token losses: the last transformer block has no nn.MultiheadAttention with a packed "
            "in-projection; expected an open_clip ViT / text transformer block"
        )
    b, n, width = x.shape
    heads = attn.num_heads
    y = block.ln_1(x)
    bias = attn.in_proj_bias
    q = F.linear(y, attn.in_proj_weight[:width], None if bias is None else bias[:width])
    k = F.linear(
        y, attn.in_proj_weight[width : 2 * width], None if bias is None else bias[width : 2 * width]
    )
    q = q.view(b, n, heads, -1).transpose(1, 2)
    k = k.view(b, n, heads, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        if attn_mask.dim() == 3:  # [B * heads, N, N], as nn.MultiheadAttention takes it
            attn_mask = attn_mask.view(b, heads, n, n)
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    return scores.softmax(-1).mean(1)


class _LastBlock:
    """Captures a transformer's output and its last block's input and attention mask."""

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer = transformer
        self.block = transformer.resblocks[-1]
        self.input: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        pre = self.block.register_forward_pre_hook(self._before, with_kwargs=True)
        post = self.transformer.register_forward_hook(self._after)
        try:
            yield
        finally:
            pre.remove()
            post.remove()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Called as blk(x, attn_mask=m), or blk(x, None, None, m) under gradient checkpointing.
        self.input = self._batch_first(args[0] if args else kwargs["q_x"])
        self.mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.output = self._batch_first(output[0] if isinstance(output, tuple) else output)

    def _batch_first(self, x: torch.Tensor) -> torch.Tensor:
        return x if getattr(self.transformer, "batch_first", True) else x.transpose(0, 1)

    def attention(self) -> torch.Tensor:
        if self.input is None:
            raise RuntimeError("the tower has not run inside TokenCapture")
        with torch.no_grad():
            return block_attention(self.block, self.input.detach(), self.mask)


# ----------------------------------------------------------------------------- words


class WordVocabulary:
    """Which BPE pieces end a word (``</w>``), and the special tokens, of a tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        decoder = getattr(tokenizer, "decoder", None)
        if not isinstance(decoder, dict) or not hasattr(tokenizer, "eot_token_id"):
            raise UserError(
                f"token losses need open_clip's BPE tokenizer (pieces marked '</w>'), not "
                f"{type(tokenizer).__name__}"
            )
        ends = torch.zeros(max(decoder) + 1, dtype=torch.bool)
        for index, piece in decoder.items():
            ends[index] = piece.endswith("</w>")
        self.ends = ends
        self.sot = int(tokenizer.sot_token_id)
        self.eot = int(tokenizer.eot_token_id)

    def word_index(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]``: the word each piece belongs to (0, 1, ...), -1 for SOT, EOT, padding.

        A word is a run of pieces up to one that ends with ``</w>``; a word cut by truncation
        (no ``</w>`` before EOT) is still a word.
        """
        positions = torch.arange(ids.shape[1], device=ids.device)
        eot_at = (ids == self.eot).int().argmax(1, keepdim=True)
        content = (positions > 0) & (positions < eot_at)
        ends = self.ends.to(ids.device)[ids.clamp(0, len(self.ends) - 1)] & content
        ended_before = ends.long().cumsum(1) - ends.long()
        return torch.where(content, ended_before, torch.full_like(ids, -1))

    def eot_position(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B]``: where each row's end-of-text token is (open_clip pools there)."""
        return (ids == self.eot).int().argmax(1)


def pool_words(
    tokens: torch.Tensor, word_index: torch.Tensor, attention: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per word: the mean of its piece tokens ``[B, L, W]``, a mask ``[B, L]`` and the sum of its
    pieces' ``attention`` ``[B, L]`` (word slots beyond a row's words are zero)."""
    b, length, width = tokens.shape
    valid = word_index >= 0
    slot = (torch.arange(b, device=tokens.device)[:, None] * length + word_index.clamp_min(0))[
        valid
    ]
    flat = tokens.new_zeros(b * length, width).index_add(0, slot, tokens[valid])
    counts = tokens.new_zeros(b * length).index_add(
        0, slot, torch.ones_like(slot, dtype=tokens.dtype)
    )
    weight = attention.new_zeros(b * length).index_add(0, slot, attention[valid])
    words = (flat / counts.clamp_min(1)[:, None]).view(b, length, width)
    return words, (counts > 0).view(b, length), weight.view(b, length)


def clipped_importance(raw: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row of ``raw`` clipped to the 10th–90th percentile of its masked entries and
    normalised to sum 1; masked-out entries are 0 (a row with nothing in it is all 0)."""
    values = raw.masked_fill(~mask, float("nan")).float()
    low = torch.nanquantile(values, 0.1, dim=1, keepdim=True)
    high = torch.nanquantile(values, 0.9, dim=1, keepdim=True)
    clipped = torch.where(mask, torch.minimum(torch.maximum(values, low), high), 0.0)
    clipped = torch.nan_to_num(clipped)
    return (clipped / clipped.sum(1, keepdim=True).clamp_min(1e-12)).to(raw.dtype)


def join_texts(ids: torch.Tensor, vocab: WordVocabulary) -> torch.Tensor:
    """Token ids ``[G, B, L]`` of G texts per sample joined into one text ``[B, L]``: SOT, each
    text's pieces in order, EOT, cut to the context length as open_clip's tokenizer cuts
    (the BPE of ``"a b"`` is the BPE of ``a`` followed by that of ``b``)."""
    g, b, length = ids.shape
    out = torch.zeros(b, length, dtype=ids.dtype, device=ids.device)
    eot = vocab.eot_position(ids.reshape(g * b, length)).view(g, b).tolist()
    for i in range(b):
        pieces = torch.cat([ids[j, i, 1 : eot[j][i]] for j in range(g)])[: length - 2]
        out[i, 0] = vocab.sot
        out[i, 1 : 1 + len(pieces)] = pieces
        out[i, 1 + len(pieces)] = vocab.eot
    return out


# ----------------------------------------------------------------------------- capture


class TokenCapture:
    """Token-level features of one open_clip model, captured while its towers run.

    Usage::

        capture = TokenCapture(clip, tokenizer)
        with capture.running():
            img = clip.encode_image(images)
            txt = clip.encode_text(ids)
        image_tokens = capture.image_tokens()
        text_tokens = capture.text_tokens(ids)
    """

    def __init__(self, clip: nn.Module, tokenizer: Any | None = None) -> None:
        visual = getattr(clip, "visual", None)
        if not hasattr(getattr(visual, "transformer", None), "resblocks"):
            raise UserError(
                f"token losses need a ViT image tower; {type(visual).__name__} has no "
                "transformer blocks"
            )
        if getattr(visual, "attn_pool", None) is not None:
            raise UserError("token losses need a ViT pooled by its class token, not attn_pool")
        text = getattr(clip, "text", clip)  # CustomTextCLIP keeps the tower in .text
        if not hasattr(getattr(text, "transformer", None), "resblocks"):
            raise UserError("token losses need open_clip's own text transformer")
        self.visual = visual
        self.text = text
        self.vocab = WordVocabulary(tokenizer) if tokenizer is not None else None
        self._image = _LastBlock(visual.transformer)
        self._text = _LastBlock(text.transformer)

    @contextlib.contextmanager
    def running(self, image: bool = True, text: bool = True) -> Iterator[None]:
        """Hook the towers asked for while the block runs."""
        with contextlib.ExitStack() as stack:
            if image:
                stack.enter_context(self._image.hooked())
            if text:
                stack.enter_context(self._text.hooked())
            yield

    def image_tokens(self) -> ImageTokens:
        """The patch tokens and [CLS] → patch attention of the last image batch."""
        out = self._image.output
        if out is None:
            raise RuntimeError("the image tower has not run inside TokenCapture.running()")
        if getattr(self.visual, "final_ln_after_pool", False):
            patches = out[:, 1:]
        else:
            patches = self.visual.ln_post(out)[:, 1:]
        grid = tuple(int(s) for s in self.visual.grid_size)
        attention = self._image.attention()[:, 0, 1:]
        return ImageTokens(patches=patches, attention=attention, grid=grid)  # type: ignore[arg-type]

    def text_tokens(self, ids: torch.Tensor) -> TextTokens:
        """Word features and importance of the last text batch ``ids`` ``[B, L]``."""
        if self.vocab is None:
            raise RuntimeError("TokenCapture needs the tokenizer for text tokens")
        out = self._text.output
        if out is None:
            raise RuntimeError("the text tower has not run inside TokenCapture.running()")
        tokens = self.text.ln_final(out)
        eot = self.vocab.eot_position(ids)
        rows = torch.arange(ids.shape[0], device=ids.device)
        eot_row = self._text.attention()[rows, eot]  # [B, L]
        word_index = self.vocab.word_index(ids)
        words, mask, attention = pool_words(tokens, word_index, eot_row)
        return TextTokens(
            tokens=tokens, word_index=word_index, words=words, word_mask=mask, attention=attention
        )


@dataclass
class TokenBatch:
    """What a token loss's heads receive: the captured tokens of one forward."""

    image: ImageTokens | None
    text: TextTokens | None
    image_size: tuple[int, int]  # input height and width (a dense decoder's output size)


@dataclass
class TokenPlan:
    """What :class:`~mgll_train.model.FeatureModel` must capture for a token loss.

    ``heads(image_features, text_features, tokens: TokenBatch) -> dict`` runs inside the
    model's forward; ``report_rows`` (indices into the granularities) are joined into one
    report text per sample, or ``()`` to encode every granularity as usual.
    """

    capture: TokenCapture
    heads: nn.Module
    image: bool = True
    text: bool = True
    report_rows: tuple[int, ...] = ()
