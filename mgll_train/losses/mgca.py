"""MGCA (``--loss mgca``): instance, token and prototype alignment of images and reports.

Multi-Granularity Cross-modal Alignment, on open_clip towers. The report is one text per sample
(``--report-text``, by default description and explanation joined: impression and findings).
Heads (trained with the model, not exported): a two-layer MLP with BatchNorm from the pooled
features to 128-d (global), the same per patch and per word (local), and K prototypes (a
bias-free linear layer on the normalised global embeddings, rows renormalised each step).

* **instance** (weight w1, temperature τ1 = 0.07): the symmetric contrastive loss of the global
  embeddings over the global batch (gathered as MGLL's features are).
* **token** (w2, τ2 = 0.1): each word attends over its image's patches with
  ``softmax(w·pᵀ/τ2)``; within each report, word t is contrasted with the attended patch
  features of all its words (cross-entropy against the diagonal, both directions, ``/τ2``), and
  the per-word losses are weighted by word importance (end-of-text attention of the text tower,
  clipped to the 10th–90th percentile, sum 1). Symmetrically each patch attends over the words,
  weighted by the [CLS] → patch attention. The token term is the mean of the two directions,
  averaged over this rank's samples.
* **prototype** (w3, τ3 = 0.2): Sinkhorn–Knopp codes (ε = 0.05, 3 iterations, normalised over
  the global batch) of each modality's prototype scores are the targets of the other's
  ``softmax(scores/τ3)``; the prototypes get no gradient during the first
  ``freeze_prototype_epochs`` epochs.

Returns ``soft_contrastive`` = the instance term and the three terms as ``instance``,
``token``, ``prototype``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mgll_train.tokens import TokenBatch

from .common import LossInputs, check_weights, global_logits, loss_terms
from .tokenwise import TokenObjective, mlp_head

__all__ = ["MGCAHeads", "MGCALoss", "cross_attention_alignment", "sinkhorn"]

_MASKED = -1e9  # a finite "minus infinity": an all-masked row stays finite (and weighted 0)


class MGCAHeads(nn.Module):
    """Global and local projection heads and the prototype layer of MGCA."""

    def __init__(
        self,
        embed_dim: int,
        image_width: int,
        text_width: int,
        dim: int = 128,
        prototypes: int = 500,
    ) -> None:
        super().__init__()
        self.image_global = mlp_head(embed_dim, dim)
        self.text_global = mlp_head(embed_dim, dim)
        self.image_local = mlp_head(image_width, dim)
        self.text_local = mlp_head(text_width, dim)
        self.prototypes = nn.Linear(dim, prototypes, bias=False)
        self.freeze_prototypes = False

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, tokens: TokenBatch
    ) -> dict[str, torch.Tensor]:
        """Normalised global and local embeddings, prototype scores, token weights."""
        assert tokens.image is not None and tokens.text is not None
        if self.training:  # unit-norm prototypes, so scores are cosines
            with torch.no_grad():
                self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        weight = self.prototypes.weight
        if self.freeze_prototypes:  # used (DDP needs every parameter) but given no gradient
            weight = weight.detach() + 0.0 * weight
        image_global = F.normalize(self.image_global(image_features), dim=-1)
        text_global = F.normalize(
            self.text_global(text_features.reshape(-1, text_features.shape[-1])), dim=-1
        )
        text = tokens.text
        local_words = self.text_local(text.words[text.word_mask])  # BatchNorm over real words
        words = local_words.new_zeros(*text.words.shape[:2], local_words.shape[-1])
        words[text.word_mask] = local_words
        patches = tokens.image.patches
        local = self.image_local(patches.reshape(-1, patches.shape[-1])).view(
            *patches.shape[:2], -1
        )
        return {
            "image_global": image_global,
            "text_global": text_global,
            "image_prototypes": image_global @ weight.T,
            "text_prototypes": text_global @ weight.T,
            "patches": F.normalize(local, dim=-1),
            "patch_weights": tokens.image.weights,
            "words": F.normalize(words, dim=-1),
            "word_weights": text.weights,
            "word_mask": text.word_mask,
        }


class MGCALoss(TokenObjective):
    """MGCA's three losses (``--loss mgca``); see the module docstring for the formulas.

    Args:
        weights: ``(w1, w2, w3)`` of the instance, token and prototype terms.
        temperatures: ``(τ1, τ2, τ3)`` of the same terms.
        prototypes: the number K of prototypes.
        freeze_prototype_epochs: epochs during which the prototypes are not trained.
        epsilon, sinkhorn_iterations: the Sinkhorn–Knopp smoothing and iterations.
        report: granularities joined into the report text.
        rank, world_size, gather_with_grad, local_loss: see :class:`MultiGranularLoss`.
    """

    name = "mgca"

    def __init__(
        self,
        weights: Sequence[float] = (1.0, 1.0, 1.0),
        temperatures: Sequence[float] = (0.07, 0.1, 0.2),
        prototypes: int = 500,
        freeze_prototype_epochs: int = 1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        report: Sequence[str] = ("description", "explanation"),
        rank: int = 0,
        world_size: int = 1,
        gather_with_grad: bool = False,
        local_loss: bool = False,
    ) -> None:
        super().__init__(
            report,
            rank=rank,
            world_size=world_size,
            gather_with_grad=gather_with_grad,
            local_loss=local_loss,
        )
        self.weights = check_weights(weights)
        temperatures = check_weights(temperatures)
        if min(temperatures) <= 0 or prototypes < 1 or freeze_prototype_epochs < 0:
            raise ValueError(
                "MGCA needs positive temperatures, at least one prototype and freeze epochs >= 0"
            )
        self.temperatures = temperatures
        self.prototype_count = prototypes
        self.freeze_prototype_epochs = freeze_prototype_epochs
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations

    @classmethod
    def from_args(cls, args: argparse.Namespace, rank: int, world_size: int) -> MGCALoss:
        """``--mgca-weights``, ``--mgca-temperatures``, ``--mgca-prototypes``,
        ``--mgca-freeze-prototype-epochs``, ``--report-text`` and the gather flags."""
        return cls(
            weights=args.mgca_weights,
            temperatures=args.mgca_temperatures,
            prototypes=args.mgca_prototypes,
            freeze_prototype_epochs=args.mgca_freeze_prototype_epochs,
            report=cls.report_from_args(args),
            **cls.distributed_options(args, rank, world_size),
        )

    def extra_repr(self) -> str:
        return (
            f"weights={self.weights}, temperatures={self.temperatures}, "
            f"prototypes={self.prototype_count}, report={self.report}, {super().extra_repr()}"
        )

    def make_heads(self, clip: nn.Module) -> MGCAHeads:
        text = getattr(clip, "text", clip)
        return MGCAHeads(
            embed_dim=int(clip.visual.output_dim),
            image_width=int(clip.visual.transformer.width),
            text_width=int(text.transformer.width),
            prototypes=self.prototype_count,
        )

    def set_position(self, epoch: int, step: int) -> None:
        super().set_position(epoch, step)
        if isinstance(self.heads, MGCAHeads):
            self.heads.freeze_prototypes = epoch < self.freeze_prototype_epochs

    def compute_dense(
        self, inputs: LossInputs, dense: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The three terms and their weighted sum."""
        t1, t2, t3 = self.temperatures
        w1, w2, w3 = self.weights
        instance = self.instance_term(inputs, dense["image_global"], dense["text_global"], t1)
        words = cross_attention_alignment(
            dense["words"], dense["patches"], dense["word_mask"], None, dense["word_weights"], t2
        )
        patches = cross_attention_alignment(
            dense["patches"], dense["words"], None, dense["word_mask"], dense["patch_weights"], t2
        )
        token = 0.5 * (words + patches)
        prototype = self.prototype_term(dense["image_prototypes"], dense["text_prototypes"], t3)
        # The model's logit scale is unused here; a zero term gives DDP its (zero) gradient.
        unused = 0.0 * inputs.logit_scale.to(inputs.dtype)
        loss = w1 * instance + w2 * token + w3 * prototype + unused
        zero = loss.new_zeros(())
        out = loss_terms(loss, instance, zero, zero)
        out.update(instance=instance.detach(), token=token.detach(), prototype=prototype.detach())
        return out

    def instance_term(
        self, inputs: LossInputs, image: torch.Tensor, text: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """The symmetric contrastive loss of the global embeddings, over the global batch."""
        batch = global_logits(
            LossInputs(
                image_features=image,
                text_features=text[None],
                logit_scale=image.new_tensor(1.0 / temperature),
                logit_bias=None,
                labels=None,
                text_ids=None,
                dtype=inputs.dtype,
            ),
            self.rank,
            self.world_size,
            self.gather_with_grad,
            self.local_loss,
            with_targets=False,
        )
        target = torch.arange(batch.rows.start, batch.rows.stop, device=image.device)
        return 0.5 * (F.cross_entropy(batch.i2t[0], target) + F.cross_entropy(batch.t2i[0], target))

    def prototype_term(
        self, image_scores: torch.Tensor, text_scores: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """Each modality's Sinkhorn codes as targets of the other's prototype softmax."""
        world = self.world_size
        image_codes = sinkhorn(image_scores, self.epsilon, self.sinkhorn_iterations, world)
        text_codes = sinkhorn(text_scores, self.epsilon, self.sinkhorn_iterations, world)
        image_to_text = -(image_codes * (text_scores / temperature).log_softmax(1)).sum(1).mean()
        text_to_image = -(text_codes * (image_scores / temperature).log_softmax(1)).sum(1).mean()
        return 0.5 * (image_to_text + text_to_image)


def cross_attention_alignment(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_mask: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    weights: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """One direction of MGCA's token alignment, the mean over samples.

    Each query ``[B, T, C]`` attends over its own sample's keys ``[B, P, C]``
    (``softmax(q·kᵀ/τ)``, masked keys excluded); the attended feature ``a_t`` (normalised) is
    compared with every query of the sample, ``S[t, u] = q_t·a_u / τ``; the loss of query t is
    ``½[CE(S[t, :], t) + CE(S[:, t], t)]`` over the sample's valid queries, weighted by
    ``weights`` (0 on masked queries); a sample without valid keys contributes 0.
    """
    b, t, _ = queries.shape
    scores = queries @ keys.transpose(1, 2) / temperature
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, :], _MASKED)
    attended = F.normalize(scores.softmax(-1) @ keys, dim=-1)
    sim = queries @ attended.transpose(1, 2) / temperature  # [B, T(query), T(attended)]
    if query_mask is None:
        query_mask = torch.ones(b, t, dtype=torch.bool, device=queries.device)
    pair_mask = query_mask[:, :, None] & query_mask[:, None, :]
    sim = sim.masked_fill(~pair_mask, _MASKED)
    ce_rows = -sim.log_softmax(2).diagonal(dim1=1, dim2=2)
    ce_cols = -sim.log_softmax(1).diagonal(dim1=1, dim2=2)
    per_query = torch.where(query_mask, 0.5 * (ce_rows + ce_cols), 0.0)
    if key_mask is not None:  # nothing to attend to (a report without words): no loss
        per_query = per_query * key_mask.any(1, keepdim=True)
    return (per_query * weights).sum(1).mean()


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3, world_size: int = 1
) -> torch.Tensor:
    """Sinkhorn–Knopp codes ``[B, K]`` of prototype scores ``[B, K]`` (SwAV): equal mass per
    prototype and per sample over the global batch; sums are all-reduced across ranks."""

    def all_sum(x: torch.Tensor) -> torch.Tensor:
        if world_size > 1:
            dist.all_reduce(x)
        return x

    top = scores.max().clone()
    if world_size > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    q = torch.exp((scores - top) / epsilon).T  # [K, B]; the shift cancels in the first division
    prototypes, total = q.shape[0], q.shape[1] * world_size
    q = q / all_sum(q.sum())
    for _ in range(iterations):
        q = q / all_sum(q.sum(1, keepdim=True)) / prototypes
        q = q / q.sum(0, keepdim=True) / total
    return (q * total).T
