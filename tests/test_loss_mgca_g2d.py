"""MGCA and G2D (``--loss mgca``, ``--loss g2d``, ``--dense-loss g2d``) against references here.

The references are written sample by sample and word by word from the methods' formulas
(mgll_train/losses/mgca.py and g2d.py say which); the flag tests parse real `fit` flags and
check the loss the factory builds against those references; the fit tests train the shipped
``mgll-tiny`` on a small demo build through the CLI's `main` and resume it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mgll_train.cli import main as train_main
from mgll_train.config import add_fit_arguments, parse_fit_args
from mgll_train.errors import UserError
from mgll_train.losses import G2DLoss, MGCALoss, MGLLLoss, create_loss
from mgll_train.losses.g2d import attention_pseudo_mask, dice_bce
from mgll_train.losses.mgca import sinkhorn
from mgll_train.model import FeatureModel, create_model
from tests.conftest import small_demo_build

B, T, P, C, K = 4, 6, 5, 8, 7


def fit_args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_fit_arguments(parser)
    return parse_fit_args(parser, ["--train-data", "unused", *flags])


def make_dense(seed: int = 0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """A batch of MGCA head outputs: unit vectors, padded words, weights that sum to 1."""
    g = torch.Generator().manual_seed(seed)
    counts = [6, 3, 1, 4]  # words per report (one report of a single word)
    word_mask = torch.arange(T)[None, :] < torch.tensor(counts)[:, None]
    word_weights = torch.rand(B, T, generator=g, dtype=dtype) * word_mask
    patch_weights = torch.rand(B, P, generator=g, dtype=dtype)
    protos = F.normalize(torch.randn(K, C, generator=g, dtype=dtype), dim=1)
    image = F.normalize(torch.randn(B, C, generator=g, dtype=dtype), dim=1)
    text = F.normalize(torch.randn(B, C, generator=g, dtype=dtype), dim=1)
    words = (
        F.normalize(torch.randn(B, T, C, generator=g, dtype=dtype), dim=-1) * word_mask[..., None]
    )
    return {
        "image_global": image,
        "text_global": text,
        "image_prototypes": image @ protos.T,
        "text_prototypes": text @ protos.T,
        "patches": F.normalize(torch.randn(B, P, C, generator=g, dtype=dtype), dim=-1),
        "patch_weights": patch_weights / patch_weights.sum(1, keepdim=True),
        "words": words,
        "word_weights": word_weights / word_weights.sum(1, keepdim=True),
        "word_mask": word_mask,
    }


# ----------------------------------------------------------------------------- references


def ref_instance(image, text, t):
    logits = image @ text.T / t
    n = image.shape[0]
    i2t = sum(-logits[i].log_softmax(0)[i] for i in range(n)) / n
    t2i = sum(-logits[:, i].log_softmax(0)[i] for i in range(n)) / n
    return 0.5 * (i2t + t2i)


def ref_token_direction(queries, keys, q_valid, k_valid, weights, t):
    """Per sample: every valid query attends over the valid keys; the attended features are
    contrasted with the sample's valid queries, both directions, weighted per query."""
    total = 0.0
    for b in range(queries.shape[0]):
        qi = [i for i in range(queries.shape[1]) if q_valid[b][i]]
        kj = [j for j in range(keys.shape[1]) if k_valid[b][j]]
        keys_b = keys[b, kj]
        attended = []
        for i in qi:
            a = (keys_b @ queries[b, i] / t).softmax(0)
            attended.append(F.normalize(a @ keys_b, dim=0))
        s = torch.stack([queries[b, i] for i in qi]) @ torch.stack(attended).T / t
        for n, i in enumerate(qi):
            ce = 0.5 * (-s[n].log_softmax(0)[n] - s[:, n].log_softmax(0)[n])
            total = total + weights[b, i] * ce
    return total / queries.shape[0]


def ref_sinkhorn(scores, eps=0.05, iterations=3):
    """SwAV's Sinkhorn–Knopp, written with explicit loops over prototypes and samples (the
    codes are targets: no gradient)."""
    q = torch.exp(scores.detach() / eps).T.clone()
    n_k, n_b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        for k in range(n_k):
            q[k] = q[k] / q[k].sum() / n_k
        for b in range(n_b):
            q[:, b] = q[:, b] / q[:, b].sum() / n_b
    return (q * n_b).T


def ref_mgca(dense, weights=(1, 1, 1), temps=(0.07, 0.1, 0.2)):
    image, text = dense["image_global"], dense["text_global"]
    inst = ref_instance(image, text, temps[0])
    all_patches = torch.ones(B, P, dtype=torch.bool)
    words = ref_token_direction(
        dense["words"], dense["patches"], dense["word_mask"], all_patches,
        dense["word_weights"], temps[1],
    )  # fmt: skip
    patches = ref_token_direction(
        dense["patches"], dense["words"], all_patches, dense["word_mask"],
        dense["patch_weights"], temps[1],
    )  # fmt: skip
    token = 0.5 * (words + patches)
    si, st = dense["image_prototypes"], dense["text_prototypes"]
    qi, qt = ref_sinkhorn(si), ref_sinkhorn(st)
    proto = 0.5 * (
        -(qi * (st / temps[2]).log_softmax(1)).sum(1).mean()
        - (qt * (si / temps[2]).log_softmax(1)).sum(1).mean()
    )
    total = weights[0] * inst + weights[1] * token + weights[2] * proto
    return {"loss": total, "instance": inst, "token": token, "prototype": proto}


def _run_mgca(loss: MGCALoss, dense: dict) -> dict:
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    return loss(dense["image_global"], dense["text_global"][None], scale, dense=dense)


# ----------------------------------------------------------------------------- MGCA


def test_mgca_terms_equal_the_written_out_reference():
    dense = make_dense()
    out = _run_mgca(MGCALoss(), dense)
    ref = ref_mgca(dense)
    for key in ("loss", "instance", "token", "prototype"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-9, atol=1e-12, msg=key)
    assert out["soft_contrastive"] == out["instance"]


def test_mgca_gradients_equal_the_reference():
    dense = make_dense(seed=1)
    live = {k: v.clone().requires_grad_() for k, v in dense.items() if v.is_floating_point()}
    out = _run_mgca(MGCALoss(), {**dense, **live})
    grads = torch.autograd.grad(out["loss"], list(live.values()))
    live_ref = {k: v.clone().requires_grad_() for k, v in dense.items() if v.is_floating_point()}
    ref = ref_mgca({**dense, **live_ref})["loss"]
    ref_grads = torch.autograd.grad(ref, list(live_ref.values()), allow_unused=True)
    for name, got, want in zip(live, grads, ref_grads, strict=True):
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10, msg=name)
    assert grads[list(live).index("words")].abs().sum() > 0


def test_padding_words_do_not_change_the_token_term():
    dense = make_dense(seed=2)
    noisy = dict(dense)
    noise = torch.randn(B, T, C, dtype=torch.float64)
    noisy["words"] = torch.where(dense["word_mask"][..., None], dense["words"], noise)
    a, b = _run_mgca(MGCALoss(), dense), _run_mgca(MGCALoss(), noisy)
    torch.testing.assert_close(a["token"], b["token"], rtol=1e-12, atol=1e-12)


def test_a_report_without_words_adds_no_token_loss():
    dense = make_dense(seed=4)
    dense["word_mask"] = dense["word_mask"].clone()
    dense["word_mask"][2] = False
    dense["words"] = dense["words"] * dense["word_mask"][..., None]
    dense["word_weights"] = dense["word_weights"] * dense["word_mask"]
    keep = torch.tensor([0, 1, 3])
    rest = {k: v[keep] for k, v in dense.items()}
    a, b = _run_mgca(MGCALoss(), dense), _run_mgca(MGCALoss(), rest)
    # the mean over 4 samples of which one adds 0 = 3/4 of the mean over the other 3
    torch.testing.assert_close(a["token"], 0.75 * b["token"], rtol=1e-12, atol=1e-12)
    assert a["token"] > 0


def test_sinkhorn_equals_loops_and_balances_prototypes():
    # Seeded: how fast the balancing converges depends on the scores (at eps 0.05 a peaked
    # draw needs more than 200 iterations), and the test must not depend on the test order.
    generator = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(6, 4, dtype=torch.float64, generator=generator), dim=1)
    codes = sinkhorn(scores)
    torch.testing.assert_close(codes, ref_sinkhorn(scores), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(codes.sum(1), torch.ones(6, dtype=torch.float64))
    balanced = sinkhorn(scores, iterations=200)
    torch.testing.assert_close(balanced.sum(0), torch.full((4,), 6 / 4, dtype=torch.float64))


@pytest.fixture(scope="module")
def tiny():
    bundle = create_model("mgll-tiny", init_logit_bias=None)
    return bundle.model, bundle.tokenizer


@pytest.mark.wires("mgll-train fit", "--mgca-freeze-prototype-epochs")
def test_prototypes_get_no_gradient_while_frozen(tiny):
    for freeze, epoch, trained in ((2, 1, False), (1, 1, True), (1, 0, False)):
        args = fit_args("--loss", "mgca", "--mgca-prototypes", "9",
                        "--mgca-freeze-prototype-epochs", str(freeze))  # fmt: skip
        loss = create_loss(args)
        clip, tokenizer = tiny
        plan = loss.token_plan(clip, tokenizer, args.granularities)
        loss.set_position(epoch, 0)
        model, out, ids, _ = _mgca_forward_with(loss, plan, tiny)
        loss(out["image_features"], out["text_features"], out["logit_scale"], dense=out["dense"])[
            "loss"
        ].backward()
        grad = model.heads.prototypes.weight.grad
        assert (grad.abs().sum() > 0) == trained, (freeze, epoch)
        clip.zero_grad(set_to_none=True)


def _mgca_forward_with(loss, plan, tiny):
    clip, tokenizer = tiny
    model = FeatureModel(clip, True, plan)
    texts = [["Cardiomegaly", "Edema"], ["Enlarged heart.", "Edema."], ["Big heart.", "Wet."]]
    ids = torch.stack([tokenizer(t) for t in texts])
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return model, model(images, ids), ids, images


@pytest.mark.parametrize("flags", [("--loss", "mgca"), ("--loss", "mgll", "--dense-loss", "g2d")])
def test_token_losses_run_under_bf16_autocast(tiny, flags):
    loss = create_loss(fit_args(*flags, "--mgca-prototypes", "9", "--g2d-start-step", "0"))
    plan = loss.token_plan(*tiny, ("category", "description", "explanation"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, out, ids, _ = _mgca_forward_with(loss, plan, tiny)
        bias = torch.tensor(-10.0)  # the fixture's model has no learnable bias
        value = loss(
            out["image_features"], out["text_features"], out["logit_scale"], bias,
            torch.ones(2, 3), text_ids=torch.arange(6).view(3, 2), dense=out["dense"],
        )["loss"]  # fmt: skip
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in plan.heads.parameters() if p.grad is not None)
    tiny[0].zero_grad(set_to_none=True)


@pytest.mark.wires("mgll-train fit", "--mgca-prototypes")
def test_prototype_count_sizes_the_prototype_layer(tiny):
    loss = create_loss(fit_args("--loss", "mgca", "--mgca-prototypes", "11"))
    plan = loss.token_plan(*tiny, ("category", "description", "explanation"))
    assert plan.heads.prototypes.weight.shape == (11, 128)
    _, out, _, _ = _mgca_forward_with(loss, plan, tiny)
    assert out["dense"]["image_prototypes"].shape == (2, 11)


@pytest.mark.wires("mgll-train fit", "--mgca-weights", "--mgca-temperatures")
@pytest.mark.parametrize(
    "flags,weights,temps",
    [
        (("--mgca-weights", "2,0.5,3"), (2, 0.5, 3), (0.07, 0.1, 0.2)),
        (("--mgca-temperatures", "0.5,0.3,0.9"), (1, 1, 1), (0.5, 0.3, 0.9)),
    ],
)
def test_mgca_weight_and_temperature_flags(flags, weights, temps):
    dense = make_dense(seed=3)
    out = _run_mgca(create_loss(fit_args("--loss", "mgca", *flags)), dense)
    torch.testing.assert_close(out["loss"], ref_mgca(dense, weights, temps)["loss"])
    assert not torch.isclose(out["loss"], ref_mgca(dense)["loss"])


@pytest.mark.wires("mgll-train fit", "--report-text")
def test_report_text_picks_the_joined_granularities(tiny):
    clip, tokenizer = tiny
    for report, rows in (("description+explanation", (1, 2)), ("explanation", (2,))):
        loss = create_loss(fit_args("--loss", "mgca", "--report-text", report))
        plan = loss.token_plan(clip, tokenizer, ("category", "description", "explanation"))
        assert plan.report_rows == rows
        model, out, ids, _ = _mgca_forward_with(loss, plan, tiny)
        texts = [["Enlarged heart. Big heart.", "Edema. Wet."], ["Big heart.", "Wet."]]
        expected = clip.encode_text(tokenizer(texts[0] if len(rows) == 2 else texts[1]), True)
        torch.testing.assert_close(out["text_features"][0], expected, rtol=1e-5, atol=1e-6)
    loss = create_loss(fit_args("--loss", "mgca", "--report-text", "explanation"))
    with pytest.raises(UserError, match="lacks explanation"):
        loss.token_plan(clip, tokenizer, ("category", "description"))


# ----------------------------------------------------------------------------- G2D


def test_pseudo_mask_marks_the_top_patches_at_input_size():
    attention = torch.arange(1.0, 17.0).flip(0)[None]  # patch 0 highest, 1 next, ...
    mask = attention_pseudo_mask(attention, (4, 4), (64, 64))
    # 85th percentile of 16 values each repeated 256 times: the 14th smallest; above it the
    # two largest, patches 0 and 1: rows 0-15, columns 0-31.
    expected = torch.zeros(1, 1, 64, 64)
    expected[..., :16, :32] = 1
    assert torch.equal(mask, expected)


def test_dice_bce_by_hand():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :2] = 1  # 4 of 16 pixels
    value = dice_bce(torch.zeros(1, 1, 4, 4), target)
    dice = (2 * 0.5 * 4 + 1) / (0.5 * 16 + 4 + 1)
    assert math.isclose(float(value), (1 - dice) + 0.2 * math.log(2), rel_tol=1e-6)


def _g2d_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(B, C, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(3, B, C, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, 2, (B, 5), generator=g).double()
    dense = {
        "mask_logits": torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64),
        "mask_target": (torch.rand(B, 1, 8, 8, generator=g) > 0.8).double(),
    }
    return image, text, labels, dense


@pytest.mark.wires("mgll-train fit", "--dense-loss", "--g2d-start-step")
def test_dense_loss_adds_g2d_to_mgll_from_its_start_step():
    image, text, labels, dense = _g2d_inputs()
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    loss = create_loss(fit_args("--loss", "mgll", "--dense-loss", "g2d", "--g2d-start-step", "5"))
    assert isinstance(loss, G2DLoss) and isinstance(loss.global_objective, MGLLLoss)
    ids = torch.arange(3 * B).view(3, B)
    mgll = MGLLLoss()(image, text, scale, bias, labels, ids)["loss"]
    term = dice_bce(dense["mask_logits"], dense["mask_target"])
    loss.set_position(0, 4)
    torch.testing.assert_close(
        loss(image, text, scale, bias, labels, ids, dense=dense)["loss"], mgll
    )
    loss.set_position(0, 5)
    out = loss(image, text, scale, bias, labels, ids, dense=dense)
    torch.testing.assert_close(out["loss"], mgll + term)
    torch.testing.assert_close(out["dense"], term)


def test_g2d_is_clip_plus_the_dense_term():
    image, text, _, dense = _g2d_inputs(seed=1)
    loss = create_loss(fit_args("--loss", "g2d", "--g2d-start-step", "0"))
    report = text[:1]
    out = loss(image, report, torch.tensor(1 / 0.07, dtype=torch.float64), dense=dense)
    logits = image @ report[0].T / 0.07
    clip = 0.5 * (
        F.cross_entropy(logits, torch.arange(B)) + F.cross_entropy(logits.T, torch.arange(B))
    )
    torch.testing.assert_close(
        out["loss"], clip + dice_bce(dense["mask_logits"], dense["mask_target"])
    )


def test_g2d_heads_predict_a_mask_at_input_size(tiny):
    clip, tokenizer = tiny
    loss = create_loss(fit_args("--loss", "clip", "--dense-loss", "g2d"))
    plan = loss.token_plan(clip, tokenizer, ("category", "description", "explanation"))
    assert plan.report_rows == () and not plan.text
    _, out, _, _ = _mgca_forward_with(loss, plan, tiny)
    assert out["text_features"].shape[0] == 3  # the usual granularities
    assert out["dense"]["mask_logits"].shape == (2, 1, 64, 64)
    target = out["dense"]["mask_target"]
    assert not target.requires_grad
    # each image's own 85th percentile: 2 of 16 patches -> 1/8 of the pixels
    assert target.mean((1, 2, 3)).tolist() == [0.125, 0.125]


def test_dense_loss_refuses_mgca():
    with pytest.raises(UserError, match="mgca"):
        create_loss(fit_args("--loss", "mgca", "--dense-loss", "g2d"))


# ----------------------------------------------------------------------------- fit


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory) -> Path:
    return small_demo_build(tmp_path_factory.mktemp("mgca-demo"))


def _fit(data: Path, logs: Path, name: str, steps: int, *extra: str) -> None:
    train_main([
        "fit", "--train-data", str(data), "--model", "mgll-tiny", "--batch-size", "4",
        "--workers", "0", "--device", "cpu", "--logs", str(logs), "--name", name,
        "--max-steps", str(steps), "--report-to", "none", "--no-progress",
        "--log-every-n-steps", "1", "--mgca-prototypes", "16", *extra,
    ])  # fmt: skip


@pytest.mark.parametrize(
    "flags",
    [
        ("--loss", "mgca", "--mgca-freeze-prototype-epochs", "0"),
        ("--loss", "g2d", "--g2d-start-step", "1"),
        ("--loss", "mgll", "--dense-loss", "g2d", "--g2d-start-step", "1"),
    ],
    ids=["mgca", "g2d", "mgll+g2d"],
)
def test_fit_trains_and_resumes_exactly(demo_build, tmp_path, flags):
    """Two steps then a resumed third step give the weights and heads of three steps."""
    _fit(demo_build, tmp_path, "whole", 3, *flags)
    _fit(demo_build, tmp_path, "split", 2, *flags)
    _fit(demo_build, tmp_path, "split", 3, "--resume", "latest", *flags)
    lines = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").open()]
    records = [line["train"] for line in lines if "train" in line]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records)
    for r in records:
        if "mgca" in flags:
            parts = r["instance"] + r["token"] + r["prototype"]
        else:  # the global terms, and the dense term from the second step (start step 1) on
            parts = r["soft_contrastive"] + r["pointwise"] + r["kl"]
            parts += r["dense"] if r["step"] >= 2 else 0.0
            assert r["dense"] > 0
        assert math.isclose(r["loss"], parts, rel_tol=1e-5), r
    whole = torch.load(tmp_path / "whole/checkpoints/step_3.pt", weights_only=True)
    split = torch.load(tmp_path / "split/checkpoints/step_3.pt", weights_only=True)
    assert whole["heads"] and whole["heads"].keys() == split["heads"].keys()
    for part in ("state_dict", "heads"):
        for key, value in whole[part].items():
            torch.testing.assert_close(split[part][key], value, msg=f"{part} {key}")
    first = torch.load(tmp_path / "split/checkpoints/step_2.pt", weights_only=True)
    changed = [k for k, v in whole["heads"].items() if not torch.equal(v, first["heads"][k])]
    assert changed  # the heads are trained (and so their restoring matters)


def test_mgca_fit_under_torchrun_with_two_processes(demo_build, tmp_path):
    """DDP needs a gradient for every parameter each step: MGCA leaves the model's logit scale
    and (while frozen) the prototypes out of its loss, so it ties them in with weight 0; a second
    step fails without that."""
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--standalone", "-m", "mgll_train", "--",  # "--": --logs is not torchrun's
            "fit", "--train-data", str(demo_build), "--model", "mgll-tiny", "--batch-size", "2",
            "--workers", "0", "--device", "cpu", "--logs", str(tmp_path), "--name", "ddp",
            "--max-steps", "2", "--report-to", "none", "--no-progress", "--log-every-n-steps",
            "1", "--mgca-prototypes", "16", "--gather-with-grad", "--loss", "mgca",
        ],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").open()]
    losses = [line["train"]["loss"] for line in lines if "train" in line]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
