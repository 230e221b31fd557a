"""Token-level features of open_clip models (mgll_train/tokens.py), against references here.

Two real open_clip models with random weights: the shipped ``mgll-tiny`` and a ViT-B-16-shaped
model (ViT-B-16's widths, heads and patch size; two layers, 64 px) built from its config dict.
The references run the towers block by block and ask ``nn.MultiheadAttention`` itself for its
head-averaged attention weights (``need_weights=True``), a path open_clip never uses.
"""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch

from mgll_train.errors import UserError
from mgll_train.model import create_model
from mgll_train.tokens import (
    TokenCapture,
    WordVocabulary,
    clipped_importance,
    join_texts,
    pool_words,
)

SENTENCES = [
    "Mild cardiomegaly, no pleural effusions.",
    "The lungs are clear. No pneumothorax.",
    "Heart size normal",
]
# The words of each sentence as the BPE tokenizer sees them (lower case, punctuation apart).
WORDS = [
    ["mild", "cardiomegaly", ",", "no", "pleural", "effusions", "."],
    ["the", "lungs", "are", "clear", ".", "no", "pneumothorax", "."],
    ["heart", "size", "normal"],
]


def _vit_b16_small() -> torch.nn.Module:
    cfg = copy.deepcopy(open_clip.get_model_config("ViT-B-16"))
    cfg["vision_cfg"].update(layers=2, image_size=64)
    cfg["text_cfg"].update(layers=2)
    torch.manual_seed(0)
    return open_clip.model.CLIP(**cfg).eval()


@pytest.fixture(scope="module", params=["mgll-tiny", "vit-b16-small"])
def model(request):
    torch.manual_seed(0)
    if request.param == "mgll-tiny":
        clip = create_model("mgll-tiny").model.eval()
    else:
        clip = _vit_b16_small()
    tokenizer = open_clip.get_tokenizer("ViT-B-16")  # the same BPE tokenizer for both
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ids = tokenizer(SENTENCES, context_length=clip.context_length)
    return request.param, clip, tokenizer, images, ids


def _reference_last_attention(blocks, x, mask=None) -> torch.Tensor:
    """Run all but the last block, then ask the last block's MultiheadAttention for weights."""
    for block in blocks[:-1]:
        x = block(x, attn_mask=mask)
    last = blocks[-1]
    y = last.ln_1(x)
    _, weights = last.attn(y, y, y, need_weights=True, average_attn_weights=True, attn_mask=mask)
    return weights


def _captured(clip, tokenizer, images, ids):
    capture = TokenCapture(clip, tokenizer)
    with torch.no_grad(), capture.running():
        clip.encode_image(images)
        clip.encode_text(ids)
    return capture.image_tokens(), capture.text_tokens(ids)


def test_image_attention_and_patches_match_references(model):
    name, clip, tokenizer, images, ids = model
    image, _ = _captured(clip, tokenizer, images, ids)
    visual = clip.visual
    with torch.no_grad():
        ref = _reference_last_attention(visual.transformer.resblocks, visual._embeds(images))
        visual.output_tokens = True  # open_clip's own token output
        try:
            _, ref_tokens = visual(images)
        finally:
            visual.output_tokens = False
    assert image.grid == (4, 4) and image.attention.shape == (3, 16)
    torch.testing.assert_close(image.attention, ref[:, 0, 1:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(image.patches, ref_tokens, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(image.attention[0], image.attention[1])  # per image


def test_text_attention_is_the_end_of_text_row_summed_per_word(model):
    name, clip, tokenizer, images, ids = model
    _, text = _captured(clip, tokenizer, images, ids)
    with torch.no_grad():
        x = clip.token_embedding(ids) + clip.positional_embedding
        ref = _reference_last_attention(clip.transformer.resblocks, x, clip.attn_mask)
    decoder = tokenizer.decoder
    for row, words in enumerate(WORDS):
        eot = int(ids[row].argmax())
        assert text.word_mask[row].sum() == len(words)
        assert not text.word_mask[row, len(words) :].any()
        # pieces of word w: positions 1.. in order, a word ending at a piece with </w>
        position = 1
        for w, word in enumerate(words):
            pieces = []
            while not (pieces and pieces[-1].endswith("</w>")):
                pieces.append(decoder[int(ids[row, position])])
                position += 1
            assert "".join(pieces).replace("</w>", "") == word
            start = position - len(pieces)
            expected = ref[row, eot, start:position].sum()
            torch.testing.assert_close(text.attention[row, w], expected, rtol=1e-5, atol=1e-7)
            expected_word = text.tokens[row, start:position].mean(0)
            torch.testing.assert_close(text.words[row, w], expected_word)
        assert position == eot


def test_capture_works_under_gradient_checkpointing(model):
    name, clip, tokenizer, images, ids = model
    plain_image, plain_text = _captured(clip, tokenizer, images, ids)
    clip.set_grad_checkpointing(True)
    try:
        clip.train()  # checkpointing is only used in training mode
        capture = TokenCapture(clip, tokenizer)
        with capture.running():
            clip.encode_image(images).sum().backward()
            clip.encode_text(ids).sum().backward()
        image, text = capture.image_tokens(), capture.text_tokens(ids)
    finally:
        clip.set_grad_checkpointing(False)
        clip.eval()
        clip.zero_grad(set_to_none=True)
    torch.testing.assert_close(image.attention, plain_image.attention, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text.attention, plain_text.attention, rtol=1e-5, atol=1e-6)


def test_word_index_groups_bpe_pieces_into_words():
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    vocab = WordVocabulary(tokenizer)
    ids = tokenizer(["Mild cardiomegaly, no pleural effusions."])
    # <start> mild</w> cardi ome gal y</w> ,</w> no</w> ple ural</w> ef fu sions</w> .</w> <end>
    expected = [-1, 0, 1, 1, 1, 1, 2, 3, 4, 4, 5, 5, 5, 6, -1]
    assert vocab.word_index(ids)[0, : len(expected)].tolist() == expected
    assert (vocab.word_index(ids)[0, len(expected) :] == -1).all()  # padding


def test_a_word_cut_by_truncation_is_still_a_word():
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    vocab = WordVocabulary(tokenizer)
    # context 6: <start> mild</w> cardi ome gal <end> ("y</w>" is cut)
    ids = tokenizer(["Mild cardiomegaly"], context_length=6)
    assert vocab.word_index(ids)[0].tolist() == [-1, 0, 1, 1, 1, -1]


def test_clipped_importance_by_hand():
    raw = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3, 7.0], [0.2, 0.4, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 5 + [False], [True, True] + [False] * 4])
    # row 0: sorted 0.1 0.2 0.3 0.5 0.9; 10th percentile 0.1 + 0.4*0.1 = 0.14, 90th
    # 0.5 + 0.6*0.4 = 0.74; clipped 0.14 0.5 0.2 0.74 0.3 (sum 1.88); padding 0
    row0 = torch.tensor([0.14, 0.5, 0.2, 0.74, 0.3, 0.0]) / 1.88
    # row 1: 0.2 0.4 -> 10th 0.22, 90th 0.38 -> 0.22 0.38 (sum 0.6)
    row1 = torch.tensor([0.22, 0.38, 0, 0, 0, 0]) / 0.6
    torch.testing.assert_close(clipped_importance(raw, mask), torch.stack([row0, row1]))
    empty = clipped_importance(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool))
    assert empty.tolist() == [[0.0, 0.0, 0.0]]


def test_pool_words_by_hand():
    tokens = torch.arange(12.0).view(1, 6, 2)
    word_index = torch.tensor([[-1, 0, 0, 1, -1, -1]])
    attention = torch.tensor([[0.5, 0.1, 0.2, 0.3, 0.4, 0.0]])
    words, mask, weight = pool_words(tokens, word_index, attention)
    torch.testing.assert_close(words[0, :2], torch.tensor([[3.0, 4.0], [6.0, 7.0]]))
    assert (words[0, 2:] == 0).all()
    assert mask[0].tolist() == [True, True, False, False, False, False]
    torch.testing.assert_close(weight[0, :2], torch.tensor([0.3, 0.3]))


@pytest.mark.parametrize("context", [77, 12])
def test_joined_ids_equal_the_tokenized_joined_text(context):
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    vocab = WordVocabulary(tokenizer)
    first = ["Cardiomegaly.", "No acute process."]
    second = ["The heart is enlarged. Lungs are clear.", "Normal heart size."]
    ids = torch.stack([tokenizer(first, context), tokenizer(second, context)])
    joined = join_texts(ids, vocab)
    expected = tokenizer([f"{a} {b}" for a, b in zip(first, second, strict=True)], context)
    assert torch.equal(joined, expected)


def test_a_resnet_image_tower_is_refused_in_one_line():
    cfg = copy.deepcopy(open_clip.get_model_config("RN50"))
    cfg["vision_cfg"].update(layers=[1, 1, 1, 1], width=16, image_size=64)
    cfg["text_cfg"].update(layers=1, width=64, heads=1)
    clip = open_clip.model.CLIP(**cfg)
    with pytest.raises(UserError, match="need a ViT image tower; ModifiedResNet"):
        TokenCapture(clip, open_clip.get_tokenizer("RN50"))
