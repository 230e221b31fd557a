"""Token counting, open_clip's truncation with a flag, and sentence sampling for long texts.

A text is *truncated* when its token count (with start/end tokens) exceeds the context length;
each sample carries a flag per granularity so the trainer can log the rate
(`TruncationStats` in `dataset.py`). With `text_sampling="sentences"` a long text is replaced
by a random subset of its sentences, kept in order, that fits; it is truncated only when no
sentence fits on its own.

Token ids are cached by text: category and impression texts repeat across thousands of images,
and open_clip's BPE with ftfy costs far more than a dictionary lookup
(`benchmarks/tokenize_cache.py` measures the difference).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")

DEFAULT_CACHE_SIZE = 65_536  # texts; a few MB of ids, more than the distinct texts of most builds


def split_sentences(text: str) -> list[str]:
    """Sentences of a text (split after ``. ! ? ;`` followed by whitespace)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


class TextTokenizer:
    """An open_clip tokenizer with token counting, truncation flags and sentence sampling."""

    def __init__(
        self,
        tokenizer: Callable[..., torch.Tensor],
        context_length: int | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ):
        self.tokenizer = tokenizer
        self.context_length = int(context_length or tokenizer.context_length)
        self._simple = (
            hasattr(tokenizer, "encode")
            and hasattr(tokenizer, "sot_token_id")
            and getattr(tokenizer, "reduction_fn", None) is None
        )
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        # Loader workers start with an empty cache: copying it to every worker costs more than
        # refilling it.
        return {**self.__dict__, "_cache": OrderedDict()}

    def _ids(self, text: str) -> tuple[int, ...] | None:
        """Token ids with start/end tokens (SimpleTokenizer only), cached by text (LRU)."""
        if not self._simple:
            return None
        ids = self._cache.get(text)
        if ids is not None:
            self._cache.move_to_end(text)
            return ids
        tok = self.tokenizer
        ids = (tok.sot_token_id, *tok.encode(text), tok.eot_token_id)
        if self.cache_size > 0:
            self._cache[text] = ids
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return ids

    def count(self, text: str) -> int:
        """Number of tokens of ``text`` including the start/end tokens."""
        ids = self._ids(text)
        if ids is not None:
            return len(ids)
        inner = getattr(self.tokenizer, "tokenizer", None)
        if inner is not None and callable(inner):  # HFTokenizer
            return len(inner(text)["input_ids"])
        tokens = self.tokenizer([text], context_length=4096)
        return int((tokens != 0).sum())

    def tokenize(self, text: str) -> tuple[torch.Tensor, bool]:
        """``([L] long tokens, truncated)`` with L the context length (open_clip's cutting)."""
        ids = self._ids(text)
        if ids is None:
            truncated = self.count(text) > self.context_length
            return self.tokenizer([text], context_length=self.context_length)[0], truncated
        truncated = len(ids) > self.context_length
        if truncated:
            ids = (*ids[: self.context_length - 1], self.tokenizer.eot_token_id)
        out = torch.zeros(self.context_length, dtype=torch.long)
        out[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out, truncated

    def sample_sentences(self, text: str, rng: np.random.Generator) -> str:
        """A random subset of ``text``'s sentences, in order, that fits the context length.

        Texts that already fit are returned unchanged. Sentences are visited in random order and
        kept while they fit (counting tokens of the joined result); if none fits on its own, the
        first visited sentence is returned (it will be truncated).
        """
        if self.count(text) <= self.context_length:
            return text
        sentences = split_sentences(text)
        if len(sentences) <= 1:
            return text
        chosen: list[int] = []
        for i in rng.permutation(len(sentences)):
            trial = sorted([*chosen, int(i)])
            if self.count(" ".join(sentences[j] for j in trial)) <= self.context_length:
                chosen = trial
        if not chosen:
            chosen = [int(rng.integers(len(sentences)))]
        return " ".join(sentences[j] for j in chosen)
