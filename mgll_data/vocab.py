"""Label vocabularies (`schemas/<domain>.yaml`): names, order, hierarchy and medical knowledge."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import yaml

from .resources import resource_dir


@dataclass(frozen=True)
class Label:
    """One canonical label and what the project knows about it."""

    name: str
    parent: str | None
    phrase: str
    synonyms: tuple[str, ...]
    mentions: tuple[str, ...]
    negative_phrases: tuple[str, ...]
    uncertain_phrases: tuple[str, ...]
    positive_prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    explanation: str
    # Its mentions are also mentions of its parent when mining text ("nodule" is a Lung Lesion
    # mention in CheXpert's sense), unlike children such as Edema under Lung Opacity.
    mentions_count_for_parent: bool = False


@dataclass(frozen=True)
class Vocabulary:
    """A domain's labels in the fixed order of the `labels` vector."""

    domain: str
    version: str
    labels: tuple[Label, ...]
    raw: dict[str, Any]

    @property
    def names(self) -> list[str]:
        return [label.name for label in self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def index(self, name: str) -> int:
        """Position of a canonical label name in the labels vector."""
        return self.names.index(name)

    def label(self, name: str) -> Label:
        return self.labels[self.index(name)]

    def mentions_for(self, name: str) -> tuple[str, ...]:
        """The phrases that mention `name` in text: its own and those of children whose
        mentions count for it (`mentions_count_for_parent`)."""
        phrases = list(self.label(name).mentions)
        for child in self.labels:
            if child.parent == name and child.mentions_count_for_parent:
                phrases += child.mentions
        return tuple(dict.fromkeys(phrases))

    def ancestors(self, name: str) -> list[str]:
        """Parents of `name`, nearest first (the hierarchy, for training/evaluation time)."""
        chain = []
        parent = self.label(name).parent
        while parent is not None:
            chain.append(parent)
            parent = self.label(parent).parent
        return chain


@cache
def load_vocabulary(domain: str) -> Vocabulary:
    """Load `schemas/<domain>.yaml` and check its hierarchy."""
    path = resource_dir("schemas") / f"{domain}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no vocabulary for domain {domain!r} (expected {path})")
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    labels = tuple(
        Label(
            name=entry["name"],
            parent=entry.get("parent"),
            phrase=entry["phrase"],
            synonyms=tuple(entry.get("synonyms") or ()),
            mentions=tuple(entry.get("mentions") or ()),
            negative_phrases=tuple(entry.get("negative_phrases") or ()),
            uncertain_phrases=tuple(entry.get("uncertain_phrases") or ()),
            positive_prompts=tuple(entry["prompts"]["positive"]),
            negative_prompts=tuple(entry["prompts"]["negative"]),
            explanation=" ".join(entry["explanation"].split()),
            mentions_count_for_parent=bool(entry.get("mentions_count_for_parent", False)),
        )
        for entry in raw["labels"]
    )
    vocab = Vocabulary(
        domain=raw["domain"], version=str(raw["vocab_version"]), labels=labels, raw=raw
    )
    names = set(vocab.names)
    if len(names) != len(labels):
        raise ValueError(f"{path}: duplicate label names")
    for label in labels:
        if label.parent is not None and label.parent not in names:
            raise ValueError(f"{path}: {label.name!r} has unknown parent {label.parent!r}")
        if label.mentions_count_for_parent and label.parent is None:
            raise ValueError(f"{path}: {label.name!r} counts mentions for a parent it lacks")
        if label.mentions_count_for_parent and vocab.label(label.parent).mentions_count_for_parent:
            # the labeler rolls mentions up one level; a chain would depend on label order
            raise ValueError(f"{path}: {label.name!r}: mentions_count_for_parent is one level only")
    return vocab
