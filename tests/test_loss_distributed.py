"""MGLLLoss under torch.distributed (gloo, CPU, 2 and 3 processes) against one process.

A fixed global batch of N = 12 samples (labels with NaN/-1, all-NaN and all-negative rows,
label sets and texts duplicated across ranks) is encoded by a tiny shared "model" (two linear
maps + L2 normalisation, a learnable log-scale and bias). Every rank holds an equal slice, runs
the loss for every configuration, backpropagates, averages the parameter gradients over ranks as
DDP does (all_reduce SUM / world_size) and saves the results; the test process compares them with
the single-process computation on the concatenated batch.

What holds (L = single-process loss on the global batch, x_r = rank r's local features,
θ = encoder parameters, s/b = logit scale/bias, W = world size, L_r = rank r's loss):

============================  =====================  ===================  ==================
configuration                 loss                   grad of x_r on r     DDP-averaged grads
============================  =====================  ===================  ==================
gather_with_grad, global      L_r = L                W · dL/dx_r          θ, s, b: = single
gather_with_grad, local_loss  mean_r L_r = L         W · dL/dx_r          θ, s, b: = single
no grad gather, global        L_r = L                dL/dx_r              θ: single / W;
                                                                          s, b: = single
no grad gather, local_loss    mean_r L_r = L         dL_r/dx_r, other     θ: (1/W) Σ_r dL_r/dθ
                                                     slices constant      (same rule); s, b: =
                                                                          single
============================  =====================  ===================  ==================

With ``local_loss`` each L_r is also checked on its own against an independent per-row
decomposition of the loss (written here from the formulas): L_r = mean over rank r's rows.
``clip`` is also checked against open_clip's ``ClipLoss`` with the same flags, and
``mgll-official`` against one process on the rank's local slice (it never gathers).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mgll_train.loss import MGLLLoss, text_ids_for

N, D_IN, D, G, K = 12, 10, 8, 3, 5
NAN = float("nan")
LABEL_NAMES = ["Atelectasis", "Cardiomegaly", "Edema", "Effusion", "Mass"]
PARAM_NAMES = ("w_img", "w_txt", "log_scale", "bias")
WEIGHTS = (0.8, 1.2, 1.5)

CONFIGS: list[dict] = []
for _gwg in (True, False):
    for _local in (False, True):
        for _st in ("jaccard", "overlap", "exact"):
            CONFIGS.append(
                dict(
                    mode="mgll",
                    soft_target=_st,
                    pointwise_target="binary",
                    gather_with_grad=_gwg,
                    local_loss=_local,
                )
            )
        CONFIGS.append(
            dict(
                mode="clip",
                soft_target="jaccard",
                pointwise_target="binary",
                gather_with_grad=_gwg,
                local_loss=_local,
            )
        )
    CONFIGS.append(
        dict(
            mode="mgll",
            soft_target="jaccard",
            pointwise_target="graded",
            gather_with_grad=_gwg,
            local_loss=True,
        )
    )
CONFIGS.append(
    dict(
        mode="mgll-official",
        soft_target="exact",
        pointwise_target="binary",
        gather_with_grad=False,
        local_loss=False,
    )
)


def _key(cfg: dict) -> str:
    return "/".join(f"{k}={v}" for k, v in sorted(cfg.items()))


# ----------------------------------------------------------------------------- the global batch


def _category(row: torch.Tensor) -> str:
    pos = [n for n, v in zip(LABEL_NAMES, row.tolist(), strict=True) if v == 1]
    unc = [n for n, v in zip(LABEL_NAMES, row.tolist(), strict=True) if v == -1]
    if pos:
        return ", ".join(pos)
    return "Possible " + ", ".join(unc) if unc else "No Finding"


def make_global_batch() -> dict:
    gen = torch.Generator().manual_seed(2024)
    x_img = torch.randn(N, D_IN, generator=gen, dtype=torch.float64)
    x_txt = torch.randn(G, N, D_IN, generator=gen, dtype=torch.float64)
    u = torch.rand(N, K, generator=gen)
    labels = torch.where(
        u < 0.35, 1.0, torch.where(u < 0.75, 0.0, torch.where(u < 0.87, -1.0, NAN))
    )
    # slices: W=2 -> 0-5 | 6-11; W=3 -> 0-3 | 4-7 | 8-11. Duplicates across ranks:
    labels[7] = labels[1]
    labels[10] = labels[4]
    labels[5] = NAN  # nothing annotated
    labels[2] = 0.0  # no positives ...
    labels[11] = 0.0  # ... on two ranks: two empty sets -> 1
    labels[11, 4] = NAN
    descriptions = [
        "No acute process.",
        "Effusion.",
        "No acute process.",
        "Edema.",
        "Cardiomegaly.",
        "No acute process.",
        "Effusion.",
        "Pneumonia.",
        "No acute process.",
        "Edema.",
        "Atelectasis.",
        "Mass.",
    ]
    explanations = [f"explanation {i}" for i in range(N)]
    explanations[9] = explanations[3]
    texts = [[_category(r) for r in labels], descriptions, explanations]
    return {
        "x_img": x_img,
        "x_txt": x_txt,
        "labels": labels,
        "texts": texts,
        "text_ids": text_ids_for(texts),
        "w_img": torch.randn(D_IN, D, generator=gen, dtype=torch.float64),
        "w_txt": torch.randn(D_IN, D, generator=gen, dtype=torch.float64),
        "log_scale": torch.tensor(math.log(8.0), dtype=torch.float64),
        "bias": torch.tensor(-2.0, dtype=torch.float64),
    }


def _params(batch: dict) -> dict[str, torch.Tensor]:
    return {n: batch[n].clone().requires_grad_() for n in PARAM_NAMES}


def _encode(params: dict, x_img: torch.Tensor, x_txt: torch.Tensor):
    img = F.normalize(x_img @ params["w_img"], dim=-1)
    txt = F.normalize(x_txt @ params["w_txt"], dim=-1)
    return img, txt


def _make_loss(cfg: dict, rank: int = 0, world_size: int = 1) -> MGLLLoss:
    return MGLLLoss(
        mode=cfg["mode"],
        soft_target=cfg["soft_target"],
        weights=WEIGHTS,
        pointwise_target=cfg["pointwise_target"],
        rank=rank,
        world_size=world_size,
        gather_with_grad=cfg["gather_with_grad"],
        local_loss=cfg["local_loss"],
    )


# ----------------------------------------------------------------------------- the worker


def _join_group(rank: int, world_size: int, store: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)


def _worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    _join_group(rank, world_size, store)
    from open_clip.loss import ClipLoss

    batch = make_global_batch()
    b = N // world_size
    sl = slice(rank * b, (rank + 1) * b)
    results = {}
    for cfg in CONFIGS:
        params = _params(batch)
        img, txt = _encode(params, batch["x_img"][sl], batch["x_txt"][:, sl])
        img.retain_grad()
        txt.retain_grad()
        out = _make_loss(cfg, rank, world_size)(
            img,
            txt,
            params["log_scale"].exp(),
            params["bias"],
            batch["labels"][sl],
            batch["text_ids"][:, sl],
        )
        out["loss"].backward()
        avg = {}
        for name, p in params.items():
            grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # as DDP: sum over ranks / W
            avg[name] = grad / world_size
        res = {
            "out": {k: v.detach() for k, v in out.items()},
            "grad_img": img.grad.clone(),
            "grad_txt": txt.grad.clone(),
            "avg": avg,
        }
        if cfg["mode"] == "clip":
            clip = ClipLoss(
                local_loss=cfg["local_loss"],
                gather_with_grad=cfg["gather_with_grad"],
                rank=rank,
                world_size=world_size,
            )
            with torch.no_grad():
                scale = params["log_scale"].exp()
                res["open_clip"] = sum(clip(img, txt[g], scale) for g in range(G)) / G
        results[_key(cfg)] = res
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _run(
    world_size: int, tmp: Path, timeout_s: float = 120.0, worker: Callable | None = None
) -> list[dict]:
    ctx = mp.start_processes(
        worker or _worker,
        args=(world_size, str(tmp / "store"), str(tmp)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"distributed workers (world_size={world_size}) timed out")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


# ----------------------------------------------------------------------------- references


def reference_cooccurrence(labels: torch.Tensor, ids: torch.Tensor, soft_target: str):
    """C_g [G, N, N] written out pair by pair from the formulas in mgll_train.losses.mgll."""
    n = labels.shape[0]
    c = torch.zeros(G, n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if soft_target == "exact":
                c[0, i, j] = float(ids[0, i] == ids[0, j])
            else:
                common = [
                    k
                    for k in range(K)
                    if not math.isnan(labels[i, k]) and not math.isnan(labels[j, k])
                ]
                pi = {k for k in common if labels[i, k] > 0}
                pj = {k for k in common if labels[j, k] > 0}
                if not common:
                    val = 0.0
                elif not pi and not pj:
                    val = 1.0
                else:
                    val = len(pi & pj) / len(pi | pj)
                c[0, i, j] = val if soft_target == "jaccard" else float(val > 0)
            for g in range(1, G):
                c[g, i, j] = float(ids[g, i] == ids[g, j])
        c[:, i, i] = 1.0
    return c


def reference_row_losses(img, txt, scale, bias, c, cfg) -> torch.Tensor:
    """Per-row contributions r_i with loss = mean_i r_i; rank r's local loss = mean over its rows.

    Row i carries image i's image→text CE, point-wise row and KL row, and text i's
    text→image CE (its targets: row i of rownorm(Cᵀ)).
    """
    a1, a2, a3 = WEIGHTS
    rows = torch.zeros(img.shape[0], dtype=torch.float64)
    probs = []
    for g in range(G):
        lg = scale * img @ txt[g].T
        if cfg["mode"] == "clip":
            rows = rows + 0.5 * (-lg.log_softmax(1).diagonal() - lg.T.log_softmax(1).diagonal()) / G
            continue
        ct = c[g].T
        ce_i = -(c[g] / c[g].sum(1, keepdim=True) * lg.log_softmax(1)).sum(1)
        ce_t = -(ct / ct.sum(1, keepdim=True) * lg.T.log_softmax(1)).sum(1)
        y = c[g] if cfg["pointwise_target"] == "graded" else (c[g] > 0).double()
        bce = F.binary_cross_entropy_with_logits(lg + bias, y, reduction="none").mean(1)
        rows = rows + a1 * 0.5 * (ce_i + ce_t) + a2 * bce
        probs.append(lg.softmax(1))
    if probs:
        p = torch.stack(probs)
        m = p.mean(0)
        rows = rows + a3 * (p * (p.log() - m.log())).sum((0, 2))
    return rows


def _single(cfg: dict, batch: dict) -> dict:
    """One process on the concatenated batch: loss, feature and parameter gradients."""
    params = _params(batch)
    img, txt = _encode(params, batch["x_img"], batch["x_txt"])
    out = _make_loss(cfg)(
        img, txt, params["log_scale"].exp(), params["bias"], batch["labels"], batch["text_ids"]
    )
    grads = torch.autograd.grad(out["loss"], [img, txt, *params.values()], allow_unused=True)
    grads = [
        torch.zeros_like(t) if gr is None else gr
        for gr, t in zip(grads, [img, txt, *params.values()], strict=True)
    ]
    return {
        "out": {k: v.detach() for k, v in out.items()},
        "grad_img": grads[0],
        "grad_txt": grads[1],
        "params": dict(zip(PARAM_NAMES, grads[2:], strict=True)),
    }


def _local_reference(cfg: dict, batch: dict, world_size: int) -> list[dict]:
    """Per rank: L_r and its gradients with every other rank's features held constant."""
    b = N // world_size
    res = []
    for rank in range(world_size):
        params = _params(batch)
        img, txt = _encode(params, batch["x_img"], batch["x_txt"])
        s, e = rank * b, (rank + 1) * b
        img_r = torch.cat([img[:s].detach(), img[s:e], img[e:].detach()])
        txt_r = torch.cat([txt[:, :s].detach(), txt[:, s:e], txt[:, e:].detach()], dim=1)
        c = reference_cooccurrence(batch["labels"], batch["text_ids"], cfg["soft_target"])
        rows = reference_row_losses(img_r, txt_r, params["log_scale"].exp(), params["bias"], c, cfg)
        loss_r = rows[s:e].mean()
        inputs = [img, txt, *params.values()]
        grads = torch.autograd.grad(loss_r, inputs, allow_unused=True)
        grads = [
            torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, inputs, strict=True)
        ]
        res.append(
            {
                "loss": loss_r.detach(),
                "grad_img": grads[0][s:e],
                "grad_txt": grads[1][:, s:e],
                "params": dict(zip(PARAM_NAMES, grads[2:], strict=True)),
            }
        )
    return res


# ----------------------------------------------------------------------------- tests

TOL = {"rtol": 1e-9, "atol": 1e-11}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def runs(request, tmp_path_factory):
    world_size = request.param
    results = _run(world_size, tmp_path_factory.mktemp(f"dist{world_size}"))
    return world_size, results, make_global_batch()


def _non_official(cfg: dict) -> bool:
    return cfg["mode"] != "mgll-official"


def test_global_batch_has_cross_rank_structure():
    batch = make_global_batch()
    c = reference_cooccurrence(batch["labels"], batch["text_ids"], "jaccard")
    for world_size in (2, 3):
        b = N // world_size
        owner = torch.arange(N) // b
        cross = owner[:, None] != owner[None, :]
        for g in range(G):
            assert (c[g][cross] > 0).any(), (world_size, g)  # cross-rank positives in every g
    assert ((c[0] > 0) & (c[0] < 1)).any()  # partial Jaccard credit
    assert torch.isnan(batch["labels"]).any() and (batch["labels"] == -1).any()


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if _non_official(c)], ids=_key)
def test_row_reference_matches_single_process(cfg):
    """The independent per-row reference used below agrees with MGLLLoss on one process."""
    batch = make_global_batch()
    params = _params(batch)
    img, txt = _encode(params, batch["x_img"], batch["x_txt"])
    c = reference_cooccurrence(batch["labels"], batch["text_ids"], cfg["soft_target"])
    ref = reference_row_losses(img, txt, params["log_scale"].exp(), params["bias"], c, cfg).mean()
    torch.testing.assert_close(_single(cfg, batch)["out"]["loss"], ref.detach(), **TOL)


def test_loss_equals_single_process(runs):
    world_size, results, batch = runs
    for cfg in filter(_non_official, CONFIGS):
        key = _key(cfg)
        single = _single(cfg, batch)["out"]
        for term in ("loss", "soft_contrastive", "pointwise", "kl"):
            per_rank = torch.stack([r[key]["out"][term] for r in results])
            if cfg["local_loss"]:
                torch.testing.assert_close(per_rank.mean(), single[term], **TOL, msg=key + term)
            else:
                for v in per_rank:
                    torch.testing.assert_close(v, single[term], **TOL, msg=key + term)
        if cfg["local_loss"]:
            # each rank's loss is the mean over its own rows (not just the mean over ranks)
            local_ref = _local_reference(cfg, batch, world_size)
            for r in range(world_size):
                torch.testing.assert_close(
                    results[r][key]["out"]["loss"], local_ref[r]["loss"], **TOL, msg=key
                )
            losses = torch.stack([r[key]["out"]["loss"] for r in results])
            assert losses.std() > 1e-6  # the local losses really differ between ranks


def test_clip_mode_equals_open_clip_distributed(runs):
    _, results, _ = runs
    for cfg in CONFIGS:
        if cfg["mode"] == "clip":
            for r in results:
                torch.testing.assert_close(
                    r[_key(cfg)]["out"]["loss"], r[_key(cfg)]["open_clip"], **TOL
                )


def test_gradients_with_gather_with_grad_equal_single_process(runs):
    world_size, results, batch = runs
    b = N // world_size
    for cfg in CONFIGS:
        if not (_non_official(cfg) and cfg["gather_with_grad"]):
            continue
        key = _key(cfg)
        single = _single(cfg, batch)
        for name in PARAM_NAMES:
            if cfg["mode"] == "clip" and name == "bias":
                continue
            assert single["params"][name].abs().max() > 1e-6, (key, name)
            # every rank holds the same DDP-averaged gradient, equal to one process's
            for r in results:
                torch.testing.assert_close(
                    r[key]["avg"][name], single["params"][name], **TOL, msg=f"{key} {name}"
                )
        for rank, r in enumerate(results):
            sl = slice(rank * b, (rank + 1) * b)
            # the autograd all_gather sums all ranks' contributions: W x the true gradient
            torch.testing.assert_close(
                r[key]["grad_img"] / world_size, single["grad_img"][sl], **TOL, msg=key
            )
            torch.testing.assert_close(
                r[key]["grad_txt"] / world_size, single["grad_txt"][:, sl], **TOL, msg=key
            )


def test_gradients_without_gather_with_grad_reach_the_local_slice(runs):
    world_size, results, batch = runs
    b = N // world_size
    for cfg in CONFIGS:
        if not _non_official(cfg) or cfg["gather_with_grad"]:
            continue
        key = _key(cfg)
        single = _single(cfg, batch)
        local_ref = _local_reference(cfg, batch, world_size) if cfg["local_loss"] else None
        for rank, r in enumerate(results):
            sl = slice(rank * b, (rank + 1) * b)
            if local_ref is None:
                # rank r's loss is the global loss with x_r the only live slice: dL/dx_r exactly
                exp_img, exp_txt = single["grad_img"][sl], single["grad_txt"][:, sl]
            else:
                exp_img, exp_txt = local_ref[rank]["grad_img"], local_ref[rank]["grad_txt"]
            assert exp_img.abs().max() > 1e-6
            torch.testing.assert_close(r[key]["grad_img"], exp_img, **TOL, msg=key)
            torch.testing.assert_close(r[key]["grad_txt"], exp_txt, **TOL, msg=key)
        for name in PARAM_NAMES:
            if cfg["mode"] == "clip" and name == "bias":
                continue
            if name in ("log_scale", "bias"):
                expected = single["params"][name]  # not gathered: exact after averaging
            elif local_ref is None:
                expected = single["params"][name] / world_size
            else:
                expected = sum(lr["params"][name] for lr in local_ref) / world_size
            for r in results:
                torch.testing.assert_close(
                    r[key]["avg"][name], expected, **TOL, msg=f"{key} {name}"
                )


def test_official_mode_uses_the_local_batch_only(runs):
    world_size, results, batch = runs
    cfg = next(c for c in CONFIGS if c["mode"] == "mgll-official")
    b = N // world_size
    for rank, r in enumerate(results):
        sl = slice(rank * b, (rank + 1) * b)
        params = _params(batch)
        img, txt = _encode(params, batch["x_img"][sl], batch["x_txt"][:, sl])
        local = _make_loss(cfg)(
            img, txt, params["log_scale"].exp(), None, None, batch["text_ids"][:, sl]
        )
        torch.testing.assert_close(r[_key(cfg)]["out"]["loss"], local["loss"].detach(), **TOL)
    global_loss = _single(cfg, batch)["out"]["loss"]
    assert abs(results[0][_key(cfg)]["out"]["loss"] - global_loss) > 1e-6


# ----------------------------------------------------------------------------- token objectives
#
# MGCA (--loss mgca) and MGLL + G2D (--dense-loss g2d) on 2 gloo processes against one process
# on the concatenated batch, with gather_with_grad (the exact-gradient setting). The heads'
# outputs are made here by a tiny encoder of linear maps, as the features above.
#
# What is equal: the instance (global contrastive) term on every rank without local_loss, and
# its mean over ranks with it; the Sinkhorn codes of each rank's rows (their normalisation is
# all-reduced, so they are the single-process codes of the global batch); the DDP-averaged
# parameter gradients of the whole loss. What is not: the token, prototype and dense terms are
# means over each rank's own samples, so a rank's value differs from the global one (their mean
# over ranks is equal and checked). In training, the heads' BatchNorm statistics are also
# per rank (not synchronised), which no test here can make equal: these tests feed the loss
# directly.

TOKEN_PARAMS = ("w_img", "w_txt", "w_patch", "w_word", "protos", "w_pix", "log_scale", "bias")
N_PATCH, N_WORD, N_PROTO = 5, 6, 7
TOKEN_CONFIGS = [
    {"loss": "mgca", "local_loss": False},
    {"loss": "mgca", "local_loss": True},
    {"loss": "mgll+g2d", "local_loss": False},
]


def _token_key(cfg: dict) -> str:
    return f"{cfg['loss']}/local_loss={cfg['local_loss']}"


def make_token_batch() -> dict:
    gen = torch.Generator().manual_seed(7)
    batch = make_global_batch()
    counts = torch.tensor([6, 3, 1, 4, 6, 2, 5, 1, 3, 6, 4, 2])  # words per report
    weights = torch.rand(N, N_WORD, generator=gen, dtype=torch.float64)
    weights = weights * (torch.arange(N_WORD)[None] < counts[:, None])
    patch_weights = torch.rand(N, N_PATCH, generator=gen, dtype=torch.float64)
    batch.update(
        x_patch=torch.randn(N, N_PATCH, D_IN, generator=gen, dtype=torch.float64),
        x_word=torch.randn(N, N_WORD, D_IN, generator=gen, dtype=torch.float64),
        x_pix=torch.randn(N, 16, D_IN, generator=gen, dtype=torch.float64),
        word_mask=torch.arange(N_WORD)[None] < counts[:, None],
        word_weights=weights / weights.sum(1, keepdim=True),
        patch_weights=patch_weights / patch_weights.sum(1, keepdim=True),
        mask_target=(torch.rand(N, 1, 4, 4, generator=gen) > 0.7).double(),
        w_patch=torch.randn(D_IN, D, generator=gen, dtype=torch.float64),
        w_word=torch.randn(D_IN, D, generator=gen, dtype=torch.float64),
        protos=torch.randn(N_PROTO, D, generator=gen, dtype=torch.float64),
        w_pix=torch.randn(D_IN, generator=gen, dtype=torch.float64),
    )
    return batch


def _token_forward(cfg: dict, batch: dict, sl: slice, rank: int = 0, world_size: int = 1):
    """The loss, its gradients (parameter name -> grad) and the image Sinkhorn codes."""
    from mgll_train.losses import G2DLoss, MGCALoss
    from mgll_train.losses.mgca import sinkhorn

    params = {n: batch[n].clone().requires_grad_() for n in TOKEN_PARAMS}
    dist_opts = dict(rank=rank, world_size=world_size, gather_with_grad=True)
    img, txt = _encode(params, batch["x_img"][sl], batch["x_txt"][:, sl])
    scale = params["log_scale"].exp()
    if cfg["loss"] == "mgca":
        mask = batch["word_mask"][sl]
        protos = F.normalize(params["protos"], dim=1)
        dense = {
            "image_global": img,
            "text_global": txt[1],
            "image_prototypes": img @ protos.T,
            "text_prototypes": txt[1] @ protos.T,
            "patches": F.normalize(batch["x_patch"][sl] @ params["w_patch"], dim=-1),
            "patch_weights": batch["patch_weights"][sl],
            "words": F.normalize(batch["x_word"][sl] @ params["w_word"], dim=-1) * mask[..., None],
            "word_weights": batch["word_weights"][sl],
            "word_mask": mask,
        }
        loss = MGCALoss(local_loss=cfg["local_loss"], **dist_opts)
        out = loss(img, txt[1:2], scale, dense=dense)
        codes = sinkhorn(dense["image_prototypes"].detach(), world_size=world_size)
    else:
        logits = (batch["x_pix"][sl] @ params["w_pix"]).view(-1, 1, 4, 4)
        dense = {"mask_logits": logits, "mask_target": batch["mask_target"][sl]}
        global_loss = MGLLLoss(weights=WEIGHTS, local_loss=cfg["local_loss"], **dist_opts)
        loss = G2DLoss(global_objective=global_loss, start_step=0, report=(), **dist_opts)
        out = loss(
            img, txt, scale, params["bias"], batch["labels"][sl], batch["text_ids"][:, sl],
            dense=dense,
        )  # fmt: skip
        codes = None
    grads = torch.autograd.grad(out["loss"], list(params.values()), allow_unused=True)
    grads = {
        n: torch.zeros_like(p) if g is None else g
        for (n, p), g in zip(params.items(), grads, strict=True)
    }
    return {k: v.detach() for k, v in out.items()}, grads, codes


def _token_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    _join_group(rank, world_size, store)
    batch = make_token_batch()
    b = N // world_size
    sl = slice(rank * b, (rank + 1) * b)
    results = {}
    for cfg in TOKEN_CONFIGS:
        out, grads, codes = _token_forward(cfg, batch, sl, rank, world_size)
        for grad in grads.values():
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # as DDP: sum over ranks / W
            grad /= world_size
        results[_token_key(cfg)] = {"out": out, "avg": grads, "codes": codes}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def token_runs(tmp_path_factory):
    return _run(2, tmp_path_factory.mktemp("dist-token"), worker=_token_worker)


@pytest.mark.parametrize("cfg", TOKEN_CONFIGS, ids=_token_key)
def test_token_losses_equal_single_process(token_runs, cfg):
    """Each loss and its DDP-averaged gradients on 2 ranks against one process.

    Equal: the instance term (per rank without local_loss, on average with it), the Sinkhorn
    codes, the averaged parameter gradients. Not equal per rank, by construction: the token,
    prototype and dense terms (means over a rank's own samples; their mean over ranks is
    checked), and, in training, the heads' BatchNorm statistics (per rank, not tested here).
    """
    key = _token_key(cfg)
    batch = make_token_batch()
    single, single_grads, single_codes = _token_forward(cfg, batch, slice(0, N))
    per_rank = [r[key]["out"] for r in token_runs]
    for term in ("loss", "token", "prototype", "dense"):  # per-rank means: equal on average
        if term in single:
            mean = torch.stack([o[term] for o in per_rank]).mean()
            torch.testing.assert_close(mean, single[term], **TOL, msg=f"{key} {term}")
            assert abs(per_rank[0][term] - per_rank[1][term]) > 1e-6, (key, term)
    if cfg["loss"] == "mgca":
        instance = torch.stack([o["instance"] for o in per_rank])
        if cfg["local_loss"]:
            torch.testing.assert_close(instance.mean(), single["instance"], **TOL)
        else:
            for value in instance:
                torch.testing.assert_close(value, single["instance"], **TOL)
        codes = torch.cat([r[key]["codes"] for r in token_runs])
        torch.testing.assert_close(codes, single_codes, **TOL, msg=key)
    for name, grad in single_grads.items():
        for r in token_runs:
            torch.testing.assert_close(r[key]["avg"][name], grad, **TOL, msg=f"{key} {name}")
    used = ("w_patch", "w_word", "protos") if cfg["loss"] == "mgca" else ("w_pix", "bias")
    assert all(single_grads[n].abs().max() > 1e-6 for n in used), key
