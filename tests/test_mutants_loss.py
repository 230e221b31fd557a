"""MGLLLoss behaviours that mutation testing (benchmarks/mutation.py) found untested.

Each test names the behaviour it pins; the expected values come from the pure-Python
formulas of ``tests/test_loss.py`` (``py_mgll``, ``official_reference``) with co-occurrence
matrices written out pair by pair here, never from ``mgll_train.loss`` itself:

* random batches whose Jaccard targets give rows of different sums (every earlier case had
  equal row sums wherever targets overlap, so normalising over the wrong axis went unseen);
* float32 inputs against the float64 formulas (a loss computed under autocast, in bf16, is off
  by 1e-3; one computed in float64 on float64 inputs cannot show that);
* a pair with a single commonly annotated label, both negative (two empty sets: 1);
* ``[B, D]`` text features and ``[B]`` text ids as G = 1;
* the messages of every argument error and warning, which name what is wrong;
* the official mode without text ids (identity targets), warning once, and silent otherwise;
* the same losses on CUDA (skipped on machines without a GPU).
"""

from __future__ import annotations

import argparse
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mgll_train.loss import (
    ClipLoss,
    MGLLLoss,
    OfficialMGLLLoss,
    create_loss,
    label_cooccurrence,
    text_ids_for,
)
from mgll_train.losses.common import global_logits, prepare_inputs
from tests.test_loss import official_reference, py_mgll

NAN = float("nan")
FAST = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def reference_targets(
    labels: list[list[float]] | None, ids: list[list[int]] | None, soft_target: str, g: int
) -> list[list[list[float]]]:
    """C_g pair by pair (DESIGN §7): Jaccard/overlap over commonly annotated labels for g = 0,
    text identity otherwise (the identity matrix without ids), diagonal 1."""
    b = len(labels) if labels is not None else len(ids[0])
    cs = []
    for gi in range(g):
        c = [[0.0] * b for _ in range(b)]
        for i in range(b):
            for j in range(b):
                if gi == 0 and soft_target != "exact" and labels is not None:
                    k_all = range(len(labels[i]))
                    common = [
                        k
                        for k in k_all
                        if not math.isnan(labels[i][k]) and not math.isnan(labels[j][k])
                    ]
                    pi = {k for k in common if labels[i][k] > 0}
                    pj = {k for k in common if labels[j][k] > 0}
                    if not common:
                        value = 0.0
                    elif not pi and not pj:
                        value = 1.0
                    else:
                        value = len(pi & pj) / len(pi | pj)
                    c[i][j] = value if soft_target == "jaccard" else float(value > 0)
                elif ids is not None:
                    c[i][j] = float(ids[gi][i] == ids[gi][j])
            c[i][i] = 1.0
        cs.append(c)
    return cs


@st.composite
def cases(draw: st.DrawFn) -> dict:
    """A batch of 3..6 rows, G 1..3, K 3..5 labels in {1, 0, -1, NaN}, ids from 3 words."""
    b, g, k = draw(st.integers(3, 6)), draw(st.integers(1, 3)), draw(st.integers(3, 5))
    row = st.lists(st.sampled_from([1.0, 1.0, 0.0, -1.0, NAN]), min_size=k, max_size=k)
    return {
        "labels": draw(st.lists(row, min_size=b, max_size=b)),
        "ids": draw(
            st.lists(st.lists(st.integers(0, 2), min_size=b, max_size=b), min_size=g, max_size=g)
        ),
        "with_ids": draw(st.booleans()),
        "seed": draw(st.integers(0, 10_000)),
        "scale": draw(st.floats(1.0, 30.0)),
        "bias": draw(st.floats(-8.0, 2.0)),
        "weights": tuple(draw(st.lists(st.floats(0.1, 2.0), min_size=3, max_size=3))),
        "soft_target": draw(st.sampled_from(["jaccard", "overlap", "exact"])),
        "graded": draw(st.booleans()),
    }


def _features(b: int, g: int, seed: int, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, 6, generator=gen, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(g, b, 6, generator=gen, dtype=torch.float64), dim=-1)
    return img.to(dtype), txt.to(dtype)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@FAST
@given(case=cases())
def test_mgll_matches_the_formulas_on_random_batches(case):
    labels, ids = case["labels"], case["ids"]
    b, g = len(labels), len(ids)
    img, txt = _features(b, g, case["seed"])
    loss_fn = MGLLLoss(
        soft_target=case["soft_target"],
        weights=case["weights"],
        pointwise_target="graded" if case["graded"] else "binary",
    )
    text_ids = torch.tensor(ids) if case["with_ids"] else None
    out = _quiet(
        loss_fn,
        img,
        txt,
        torch.tensor(case["scale"], dtype=torch.float64),
        torch.tensor(case["bias"], dtype=torch.float64),
        labels=torch.tensor(labels),
        text_ids=text_ids,
    )
    cs = reference_targets(labels, ids if case["with_ids"] else None, case["soft_target"], g)
    logits = [(case["scale"] * img @ txt[gi].T).tolist() for gi in range(g)]
    ref = py_mgll(logits, cs, case["bias"], case["weights"], case["graded"])
    for key in ("loss", "soft_contrastive", "pointwise", "kl"):
        assert out[key].dtype == torch.float64, key
        assert out[key].item() == pytest.approx(ref[key], rel=1e-10, abs=1e-12), key


def test_random_batches_include_rows_whose_targets_differ_in_sum():
    """The batches above can tell row- from column-normalisation: a Jaccard matrix with a
    positive pair whose two rows sum differently (1 + 1/2 against 1 + 1/2 + 1)."""
    labels = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    c = reference_targets(labels, None, "jaccard", 1)[0]
    assert c[0][1] > 0 and sum(c[0]) != sum(c[1])
    img, txt = _features(3, 1, 5)
    out = MGLLLoss(weights=(1, 0, 0))(img, txt, 10.0, None, torch.tensor(labels))
    ref = py_mgll([(10.0 * img @ txt[0].T).tolist()], [c], 0.0, (1, 0, 0))
    assert out["loss"].item() == pytest.approx(ref["loss"], rel=1e-12)
    transposed = [[c[i][j] / sum(c[k][j] for k in range(3)) for j in range(3)] for i in range(3)]
    assert transposed != [[v / sum(row) for v in row] for row in c]


@FAST
@given(case=cases(), mode=st.sampled_from(["clip", "mgll-official"]))
def test_clip_and_official_match_the_formulas_on_random_batches(case, mode):
    ids = case["ids"]
    b, g = len(ids[0]), len(ids)
    img, txt = _features(b, g, case["seed"])
    if mode == "mgll-official":
        img, txt = img.abs(), txt.abs()  # positive logits: the KL term is part of the loss
    scale = torch.tensor(case["scale"], dtype=torch.float64)
    out = MGLLLoss(mode=mode)(img, txt, scale, labels=None, text_ids=torch.tensor(ids))
    if mode == "clip":
        identity = reference_targets(None, [list(range(b))] * g, "exact", g)
        logits = [(case["scale"] * img @ txt[gi].T).tolist() for gi in range(g)]
        ref = py_mgll(logits, identity, 0.0, (1.0, 0.0, 0.0))["soft_contrastive"] / g
        assert out["loss"].item() == pytest.approx(ref, rel=1e-10)
    else:
        texts = [[f"text {v}" for v in row] for row in ids]
        ref, _ = official_reference(img, txt, case["scale"], texts)
        assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-10)


@pytest.mark.parametrize("mode", ["mgll", "clip", "mgll-official"])
def test_float32_inputs_are_computed_in_float32_not_under_autocast(mode):
    """Inside the loss autocast is off: the float32 result is the float64 formula's to 1e-5
    (bf16 matmuls, as an enabled autocast would run them, are off by about 1e-3)."""
    labels = [[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    ids = [[0, 1, 2, 3], [0, 0, 1, 2]]
    img64, txt64 = _features(4, 2, 11)
    if mode == "mgll-official":
        img64, txt64 = img64.abs(), txt64.abs()
    img, txt = img64.float(), txt64.float()
    out = MGLLLoss(mode=mode)(
        img, txt, torch.tensor(20.0), torch.tensor(-3.0), torch.tensor(labels), torch.tensor(ids)
    )
    assert out["loss"].dtype == torch.float32
    img_r, txt_r = img.double(), txt.double()  # the same float32 values, in float64
    logits = [(20.0 * img_r @ txt_r[gi].T).tolist() for gi in range(2)]
    if mode == "mgll":
        ref = py_mgll(logits, reference_targets(labels, ids, "jaccard", 2), -3.0)["loss"]
    elif mode == "clip":
        identity = reference_targets(None, [list(range(4))] * 2, "exact", 2)
        ref = py_mgll(logits, identity, 0.0, (1.0, 0.0, 0.0))["soft_contrastive"] / 2
    else:
        texts = [[str(v) for v in row] for row in ids]
        ref = official_reference(img_r, txt_r, 20.0, texts)[0].item()
    assert out["loss"].item() == pytest.approx(ref, rel=1e-5)


def test_ids_and_targets_keep_their_dtypes_even_when_empty_or_low_precision():
    """Text ids are int64 even for a batch without texts; co-occurrence comes in the dtype
    asked for, bf16 and fp16 included (the loss itself asks for float32 or float64)."""
    assert text_ids_for([[]]).dtype == torch.int64 and text_ids_for([[]]).shape == (1, 0)
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [NAN, NAN]])
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        for soft_target in ("jaccard", "overlap"):
            c = label_cooccurrence(labels, labels, soft_target, dtype)
            assert c.dtype == dtype, (dtype, soft_target)
            assert c.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]


def test_global_logits_bring_the_targets_unless_told_not_to():
    """On one process the global batch is the batch: its logits, and its labels and text ids
    unless ``with_targets=False`` (an objective with 1:1 targets needs neither)."""
    img, txt = _features(3, 2, 13)
    labels, ids = torch.eye(3), torch.tensor([[0, 1, 1], [2, 2, 3]])
    inputs = prepare_inputs(img, txt, 4.0, None, labels, ids)
    batch = global_logits(inputs, 0, 1, False, False)
    assert batch.labels is labels and batch.text_ids is ids
    assert (batch.rows, batch.n) == (slice(0, 3), 3)
    torch.testing.assert_close(batch.i2t, 4.0 * img @ txt.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(batch.t2i, batch.i2t.transpose(1, 2), rtol=0, atol=0)
    bare = global_logits(inputs, 0, 1, False, False, with_targets=False)
    assert bare.labels is None and bare.text_ids is None


def test_one_common_label_negative_in_both_rows_is_a_positive_pair():
    """Two rows whose only commonly annotated label is negative: two empty positive sets (1)."""
    labels = torch.tensor([[0.0, NAN, 1.0], [0.0, 1.0, NAN], [NAN, NAN, 0.0]])
    c = label_cooccurrence(labels, labels, "jaccard", torch.float64)
    assert c[0, 1].item() == 1.0 and c[1, 0].item() == 1.0
    # row 2 shares only label 2 with row 0 (positive there, negative here): 0
    assert c[0, 2].item() == 0.0
    # and none with row 1: no evidence, 0
    assert c[1, 2].item() == 0.0


def test_two_dimensional_text_features_and_one_dimensional_ids_are_one_granularity():
    img, txt = _features(5, 1, 3)
    ids = torch.tensor([[4, 4, 1, 2, 3]])
    labels = torch.tensor([[1.0, 0.0]] * 2 + [[0.0, 1.0]] * 3)
    for mode in ("mgll", "clip", "mgll-official"):
        loss_fn = MGLLLoss(mode=mode, soft_target="exact")
        flat = loss_fn(img, txt[0], 9.0, -2.0, labels, ids[0])
        full = loss_fn(img, txt, 9.0, -2.0, labels, ids)
        for key in flat:
            torch.testing.assert_close(flat[key], full[key], rtol=0, atol=0)
    # the 1-D ids are used: the duplicate pair (0, 1) changes the loss from identity targets
    distinct = MGLLLoss(soft_target="exact")(img, txt[0], 9.0, -2.0, labels, torch.arange(5))
    same = MGLLLoss(soft_target="exact")(img, txt[0], 9.0, -2.0, labels, ids[0])
    assert abs(distinct["loss"].item() - same["loss"].item()) > 1e-4


# ----------------------------------------------------------------------------- messages


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "siglip"}, "mode must be one of ('mgll', 'clip', 'mgll-official'), not 'siglip'"),
        ({"soft_target": "dice"}, "soft_target must be one of ('jaccard', 'overlap', 'exact')"),
        ({"pointwise_target": "soft"}, "pointwise_target must be one of ('binary', 'graded')"),
        ({"weights": (1.0, math.inf, 1.0)}, "weights must be three finite numbers, not (1.0, inf"),
        ({"rank": 3, "world_size": 2}, "invalid rank/world_size 3/2"),
    ],
)
def test_constructor_errors_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MGLLLoss(**kwargs)


def test_helper_errors_say_what_is_wrong():
    message = "^every granularity must have the same number of texts$"
    with pytest.raises(ValueError, match=message):
        text_ids_for([["a", "b"], ["c"]])
    message = "^" + re.escape("label_cooccurrence: soft_target must be jaccard|overlap, not x")
    with pytest.raises(ValueError, match=message + "$"):
        label_cooccurrence(torch.eye(2), torch.eye(2), "x")


def test_forward_shape_errors_name_the_shapes():
    img, txt = _features(4, 2, 1)
    loss_fn = MGLLLoss()
    cases = [
        (
            (img[None], txt),
            {},
            "image_features must be [B, D] and text_features [G, B, D]; "
            "got (1, 4, 6) and (2, 4, 6)",
        ),
        (
            (img[:3], txt),
            {},
            "image_features (3, 6) do not match text_features (2, 4, 6) (expected [4, 6])",
        ),
        ((img, txt), {"labels": torch.ones(5, 3)}, "labels must be [B=4, K], got (5, 3)"),
        ((img, txt), {"labels": torch.ones(4)}, "labels must be [B=4, K], got (4,)"),
        ((img, txt), {"text_ids": torch.zeros(3, 4).long()}, "text_ids must be [G=2, B=4], got"),
        (
            (img, txt),
            {"text_ids": torch.zeros(2, 4)},
            "text_ids must be an integer tensor (int64 hashes)",
        ),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            loss_fn(*args, 5.0, -1.0, **kwargs)


def test_missing_bias_error_says_how_to_fix_it():
    img, txt = _features(3, 1, 2)
    message = (
        "MGLLLoss(mode='mgll') needs logit_bias for the point-wise term (or weights with α2 = 0)"
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        MGLLLoss()(img, txt, 5.0, None, torch.eye(3))


def _caught(fn, *args, **kwargs) -> tuple[dict, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught]


def test_soft_target_without_labels_warns_and_uses_text_identity():
    img, txt = _features(4, 2, 6)
    ids = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 2]])
    loss_fn = MGLLLoss(soft_target="overlap")
    out, messages = _caught(loss_fn, img, txt, 6.0, -2.0, None, ids)
    assert messages == [
        "MGLLLoss: soft_target='overlap' without labels; the category granularity falls back "
        "to exact text identity"
    ]
    exact = MGLLLoss(soft_target="exact")(img, txt, 6.0, -2.0, None, ids)
    torch.testing.assert_close(out["loss"], exact["loss"], rtol=0, atol=0)
    _, again = _caught(loss_fn, img, txt, 6.0, -2.0, None, ids)
    assert again == []  # once per loss object


def test_missing_text_ids_warning_says_what_happens():
    img, txt = _features(4, 2, 7)
    _, messages = _caught(MGLLLoss(), img, txt, 6.0, -2.0, torch.eye(4))
    assert messages == [
        "MGLLLoss: text_ids not given; exact-text targets fall back to the identity matrix "
        "(identical texts in the batch are treated as negatives)"
    ]


@pytest.mark.parametrize("g", [1, 3])
def test_official_mode_without_text_ids_uses_identity_targets_and_warns_once(g):
    img, txt = _features(5, g, 8)
    loss_fn = MGLLLoss(mode="mgll-official")
    out, messages = _caught(loss_fn, img.abs(), txt.abs(), 10.0)
    assert messages == [
        "MGLLLoss: text_ids not given; exact-text targets fall back to the identity matrix"
    ]
    distinct = torch.arange(5).expand(g, 5)
    with_ids = MGLLLoss(mode="mgll-official")(img.abs(), txt.abs(), 10.0, text_ids=distinct)
    for key in out:
        torch.testing.assert_close(out[key], with_ids[key], rtol=0, atol=0)
    texts = [[f"t{i}" for i in range(5)]] * g
    ref, _ = official_reference(img.abs(), txt.abs(), 10.0, texts)
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-10)
    _, again = _caught(loss_fn, img, txt, 10.0)
    assert again == []


def test_official_mode_on_one_process_with_text_ids_is_silent():
    img, txt = _features(4, 2, 9)
    _, messages = _caught(
        MGLLLoss(mode="mgll-official"), img, txt, 10.0, text_ids=torch.zeros(2, 4).long()
    )
    assert messages == []


# ----------------------------------------------------------------------------- construction


def _fit_flags(loss: str) -> argparse.Namespace:
    """The loss flags of ``mgll-train fit`` as its parser leaves them, none at its default."""
    return argparse.Namespace(
        loss=loss,
        soft_target="overlap",
        loss_weights=(0.5, 2.0, 3.0),
        pointwise_target="graded",
        gather_with_grad=True,
        local_loss=True,
    )


def test_create_loss_passes_every_fit_flag_to_the_objective():
    mgll = create_loss(_fit_flags("mgll"), rank=1, world_size=2)
    assert type(mgll) is MGLLLoss
    assert (mgll.soft_target, mgll.weights, mgll.pointwise_target) == (
        "overlap",
        (0.5, 2.0, 3.0),
        "graded",
    )
    official = create_loss(_fit_flags("mgll-official"), rank=1, world_size=3)
    assert type(official) is OfficialMGLLLoss and official.weights == (0.5, 2.0, 3.0)
    clip = create_loss(_fit_flags("clip"), rank=2, world_size=3)
    assert type(clip) is ClipLoss
    for loss, (rank, world) in ((mgll, (1, 2)), (official, (1, 3)), (clip, (2, 3))):
        assert (loss.rank, loss.world_size) == (rank, world)
        assert loss.gather_with_grad is True and loss.local_loss is True


def test_the_parsers_loss_names_are_the_factorys_objectives():
    """`mgll-train fit` offers (without importing torch) exactly the objectives the factory
    builds, and the target choices the losses accept."""
    from mgll_train import choices
    from mgll_train.losses.factory import DENSE_LOSSES, LOSSES

    assert sorted(choices.LOSS_NAMES) == sorted(LOSSES)
    assert choices.DENSE_LOSS_NAMES == DENSE_LOSSES
    for soft_target in choices.SOFT_TARGETS:
        for pointwise_target in choices.POINTWISE_TARGETS:
            MGLLLoss(soft_target=soft_target, pointwise_target=pointwise_target)


def test_official_mode_through_mgll_loss_keeps_its_weights():
    """``MGLLLoss(mode="mgll-official", weights=...)`` weights the reference's terms."""
    img, txt = _features(4, 2, 12)
    ids = torch.tensor([[0, 1, 1, 2], [0, 1, 2, 3]])
    loss_fn = MGLLLoss(mode="mgll-official", weights=(2.0, 0.0, 0.5))
    assert type(loss_fn) is OfficialMGLLLoss and loss_fn.weights == (2.0, 0.0, 0.5)
    out = loss_fn(img.abs(), txt.abs(), 10.0, text_ids=ids)
    expected = 2.0 * out["soft_contrastive"] + 0.5 * out["kl"]
    torch.testing.assert_close(out["loss"], expected, rtol=1e-12, atol=0)
    assert out["kl"].item() > 0 and out["pointwise"].item() > 0


def test_a_subclass_of_mgll_loss_refuses_other_modes():
    """Only ``MGLLLoss`` itself turns ``mode=`` into another objective; a subclass (the way to
    add an objective) with another mode is an error naming the class and the mode."""

    class Tempered(MGLLLoss):
        name = "tempered"

    assert type(Tempered()) is Tempered
    with pytest.raises(ValueError, match=r"^Tempered has no mode 'clip'$"):
        Tempered(mode="clip")


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["mgll", "clip", "mgll-official"])
@pytest.mark.parametrize("with_ids", [True, False])
def test_cuda_inputs_give_the_cpu_loss(mode, with_ids):
    """Labels, ids, scale and bias given on the CPU are moved to the features' device."""
    img, txt = _features(5, 3, 10)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [NAN, 0.0], [0.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([[0, 1, 2, 3, 3], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]) if with_ids else None
    cpu = _quiet(MGLLLoss(mode=mode), img, txt, 7.0, -2.0, labels, ids)
    gpu = _quiet(MGLLLoss(mode=mode), img.cuda(), txt.cuda(), 7.0, -2.0, labels, ids)
    for key in cpu:
        assert gpu[key].device.type == "cuda"
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=1e-9, atol=1e-12)
