"""Zero-shot classification with the vocabulary's prompts.

Per label, the positive and negative prompts of the vocabulary (`schemas/<domain>.yaml`, the
domain from the dataset's `mgll` metadata) are embedded, normalised, averaged and re-normalised
(a prompt ensemble); an image's score is `cos(v, pos) − cos(v, neg)`, which ranks images exactly
as the softmax over the two does. Multi-class zero-shot (one finding per image, as CheXpert
5x200) takes the class whose positive ensemble is nearest: the argmax of the softmax over them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..data import MgllDataset
from ..data.tokenizer import TextTokenizer
from ..errors import UserError
from .features import Features, evaluating
from .flags import MIN_SUPPORT
from .metrics import multiclass_metrics, multilabel_auroc, single_class

# The vocabulary of a dataset whose `mgll` block names no domain.
DEFAULT_DOMAIN = "chest_xray"


def vocabulary_prompts(domain: str) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """``{label: (positive prompts, negative prompts)}`` of a domain's vocabulary."""
    from mgll_data.vocab import load_vocabulary  # lazily: only the prompts come from mgll_data

    vocab = load_vocabulary(domain)
    return {lab.name: (lab.positive_prompts, lab.negative_prompts) for lab in vocab.labels}


@torch.no_grad()
def prompt_embeddings(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], device: torch.device
) -> torch.Tensor:
    """The normalised mean of the normalised embeddings of ``prompts`` ([D])."""
    tok = TextTokenizer(tokenizer)
    tokens = torch.stack([tok.tokenize(p)[0] for p in prompts]).to(device)
    emb = model.encode_text(tokens, normalize=True).float().mean(dim=0)
    return emb / emb.norm()


def zeroshot_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    image_features: np.ndarray,
    label_names: Sequence[str],
    prompts: dict[str, tuple[Sequence[str], Sequence[str]]],
    device: torch.device,
) -> tuple[np.ndarray, list[bool]]:
    """``([N, K] scores, usable)``: cos(v, positive ensemble) − cos(v, negative ensemble)."""
    img = _unit_rows(image_features)
    scores = np.zeros((len(img), len(label_names)), dtype=np.float64)
    usable = []
    with evaluating(model):
        for j, name in enumerate(label_names):
            pos, neg = prompts.get(name, ((), ()))
            if not pos or not neg:
                usable.append(False)
                continue
            p = prompt_embeddings(model, tokenizer, pos, device).cpu()
            q = prompt_embeddings(model, tokenizer, neg, device).cpu()
            scores[:, j] = (img @ p - img @ q).double().numpy()
            usable.append(True)
    return scores, usable


def _unit_rows(image_features: np.ndarray) -> torch.Tensor:
    """The image features as a tensor, each row L2-normalised."""
    img = torch.from_numpy(image_features)
    return img / img.norm(dim=1, keepdim=True)


def zeroshot_block(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: MgllDataset,
    feats: Features,
    args: Any,
    device: torch.device,
) -> tuple[dict[str, Any], np.ndarray]:
    """``(the zeroshot block of metrics.json, [N, K] scores for the plots)``."""
    domain = dataset.records.metadata[0].get("domain", DEFAULT_DOMAIN)
    names = dataset.label_names
    scores, usable = zeroshot_scores(
        model, tokenizer, feats.image, names, vocabulary_prompts(domain), device
    )
    min_support = getattr(args, "min_support", MIN_SUPPORT)  # fit's evaluation has no flag
    block = multilabel_auroc(
        feats.labels, scores, names, args.bootstrap, args.seed, usable, min_support
    )
    block["domain"] = domain
    return block, scores


def multiclass_zeroshot_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    image_features: np.ndarray,
    classes: Sequence[str],
    prompts: dict[str, tuple[Sequence[str], Sequence[str]]],
    device: torch.device,
) -> np.ndarray:
    """``[N, C]`` cos(v, positive ensemble of each class); a class without prompts is an error."""
    missing = [c for c in classes if not prompts.get(c, ((), ()))[0]]
    if missing:
        raise UserError(f"the vocabulary has no positive prompts for {', '.join(missing)}")
    with evaluating(model):
        ensembles = [
            prompt_embeddings(model, tokenizer, prompts[c][0], device).cpu() for c in classes
        ]
    return (_unit_rows(image_features) @ torch.stack(ensembles).T).double().numpy()


def zeroshot_multiclass_block(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: MgllDataset,
    feats: Features,
    classes: Sequence[str],
    args: Any,
    device: torch.device,
) -> dict[str, Any]:
    """The ``zeroshot_multiclass`` block: accuracy and macro F1 of the argmax over ``classes``
    on the rows positive for exactly one of them (the others are counted, not scored)."""
    domain = dataset.records.metadata[0].get("domain", DEFAULT_DOMAIN)
    truth = single_class(feats.labels, dataset.label_names, classes)
    scores = multiclass_zeroshot_scores(
        model, tokenizer, feats.image, classes, vocabulary_prompts(domain), device
    )
    scored = truth >= 0
    block = multiclass_metrics(
        truth[scored], scores[scored].argmax(axis=1), classes, args.bootstrap, args.seed
    )
    return block | {"classes": list(classes), "left_out": int((~scored).sum())}
