"""MGLLLoss on small hand-computed cases (single process, CPU)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from mgll_train.loss import (
    MGLLLoss,
    label_cooccurrence,
    text_cooccurrence,
    text_hash,
    text_ids_for,
)

NAN = float("nan")

# ----------------------------------------------------------------------------- fixtures

# Five images, four labels (1 positive, 0 negative, -1 uncertain, NaN not annotated).
LABELS = torch.tensor(
    [
        [1, 0, 0, NAN],  # P={0}
        [1, 1, 1, 0],  # P={0,1,2}
        [NAN, NAN, NAN, NAN],  # nothing annotated
        [0, 0, -1, 0],  # P={} (-1 is annotated, not positive)
        [0, NAN, 0, 0],  # P={}
    ]
)
# Jaccard over the labels annotated in both rows:
#   (0,1): common {0,1,2}: {0} vs {0,1,2} -> 1/3     (0,3): common {0,1,2}: {0} vs {} -> 0
#   (0,4): common {0,2}: {0} vs {} -> 0                (1,3): {0,1,2} vs {} -> 0
#   (1,4): common {0,2,3}: {0,2} vs {} -> 0            (3,4): common {0,2,3}: {} vs {} -> 1
#   row 2 has no label in common with anyone -> 0 (diagonal 1)
C_JACCARD = [
    [1, 1 / 3, 0, 0, 0],
    [1 / 3, 1, 0, 0, 0],
    [0, 0, 1, 0, 0],
    [0, 0, 0, 1, 1],
    [0, 0, 0, 1, 1],
]
C_OVERLAP = [[1.0 if v > 0 else 0.0 for v in row] for row in C_JACCARD]
TEXTS = [
    ["Lesion", "Lesion, Effusion, Edema", "No Finding", "Possible Edema", "Possible Edema"],
    ["No acute process.", "Effusion.", "No acute process.", "No acute process.", "Other."],
    ["e0", "e1", "e2", "e3", "e4"],
]
C_EXACT_0 = [
    [1, 0, 0, 0, 0],
    [0, 1, 0, 0, 0],
    [0, 0, 1, 0, 0],
    [0, 0, 0, 1, 1],
    [0, 0, 0, 1, 1],
]
C_TEXT_1 = [
    [1, 0, 1, 1, 0],
    [0, 1, 0, 0, 0],
    [1, 0, 1, 1, 0],
    [1, 0, 1, 1, 0],
    [0, 0, 0, 0, 1],
]
C_IDENTITY = [[1.0 if i == j else 0.0 for j in range(5)] for i in range(5)]


def _features(b: int, g: int, d: int, seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=gen, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(g, b, d, generator=gen, dtype=dtype), dim=-1)
    return img, txt


# ------------------------------------------------------------------- pure-Python reference


def _lse(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _bce(x: float, y: float) -> float:
    return max(x, 0.0) - x * y + math.log1p(math.exp(-abs(x)))


def py_mgll(logits, cs, bias, weights=(1.0, 1.0, 1.0), graded=False):
    """The MGLL formulas (losses/mgll.py) with Python floats: logits[g][i][j], cs[g][i][j] (C_g)."""
    g_n, b = len(logits), len(logits[0])
    soft = pw = 0.0
    for g in range(g_n):
        lg, c = logits[g], cs[g]
        ce_i = ce_t = 0.0
        for i in range(b):
            row, lrow = lg[i], _lse(lg[i])
            rsum = sum(c[i])
            ce_i -= sum(c[i][j] / rsum * (row[j] - lrow) for j in range(b))
            col = [lg[k][i] for k in range(b)]  # text i against all images
            lcol, csum = _lse(col), sum(c[k][i] for k in range(b))  # rownorm(Cᵀ)
            ce_t -= sum(c[k][i] / csum * (col[k] - lcol) for k in range(b))
        soft += 0.5 * (ce_i / b + ce_t / b)
        for i in range(b):
            for j in range(b):
                y = c[i][j] if graded else (1.0 if c[i][j] > 0 else 0.0)
                pw += _bce(lg[i][j] + bias, y) / b**2
    kl = 0.0
    if g_n > 1:
        for i in range(b):
            ps = []
            for g in range(g_n):
                lrow = _lse(logits[g][i])
                ps.append([math.exp(x - lrow) for x in logits[g][i]])
            m = [sum(p[j] for p in ps) / g_n for j in range(b)]
            kl += sum(p[j] * math.log(p[j] / m[j]) for p in ps for j in range(b)) / b
    a1, a2, a3 = weights
    return {
        "loss": a1 * soft + a2 * pw + a3 * kl,
        "soft_contrastive": soft,
        "pointwise": pw,
        "kl": kl,
    }


def _logits_py(img, txt, scale):
    return [(scale * img @ txt[g].T).tolist() for g in range(txt.shape[0])]


# ----------------------------------------------------------------------------- text ids


def test_text_hash_is_stable_63_bit():
    # Pinned: blake2b(digest_size=8) little-endian, masked to 63 bits.
    assert text_hash("No Finding") == 6610865397658588827
    for t in ["", "No Finding", "no finding", "Épanchement pleural", "x" * 10_000]:
        h = text_hash(t)
        assert 0 <= h < 2**63
        assert h == text_hash(str(t))
    assert text_hash("No Finding") != text_hash("No Finding ")


def test_text_ids_for_shape_and_identity():
    ids = text_ids_for(TEXTS)
    assert ids.dtype == torch.int64 and ids.shape == (3, 5)
    assert (ids >= 0).all()
    assert ids[1, 0] == ids[1, 2] == ids[1, 3] and ids[1, 0] != ids[1, 1]
    assert ids[0, 3] == ids[0, 4] == text_hash("Possible Edema")
    with pytest.raises(ValueError):
        text_ids_for([["a", "b"], ["c"]])


# ----------------------------------------------------------------------------- co-occurrence


def test_label_cooccurrence_hand_computed_jaccard_and_overlap():
    c = label_cooccurrence(LABELS, LABELS, "jaccard", torch.float64)
    expected = torch.tensor(C_JACCARD, dtype=torch.float64)
    expected[2, 2] = 0.0  # the function does not force the diagonal; the loss does
    torch.testing.assert_close(c, expected)
    assert torch.equal(c, c.T)
    o = label_cooccurrence(LABELS, LABELS, "overlap", torch.float64)
    expected_o = torch.tensor(C_OVERLAP, dtype=torch.float64)
    expected_o[2, 2] = 0.0
    torch.testing.assert_close(o, expected_o)


def test_label_cooccurrence_three_rows_nan_and_uncertain():
    labels = torch.tensor([[1, 1, 0, 0], [1, 0, 1, NAN], [NAN, 1, -1, 0]])
    c = label_cooccurrence(labels, labels)
    # (0,1): common {0,1,2}: {0,1} vs {0,2} -> 1/3; (0,2): common {1,2,3}: {1} vs {1} -> 1;
    # (1,2): common {1,2}: {2} vs {} -> 0 (the -1 is not positive, label 0 not common).
    expected = torch.tensor([[1, 1 / 3, 1], [1 / 3, 1, 0], [1, 0, 1]])
    torch.testing.assert_close(c, expected)
    # rectangular: rows 1..2 against all
    torch.testing.assert_close(label_cooccurrence(labels[1:], labels), expected[1:])


def test_text_cooccurrence_exact_identity():
    ids = text_ids_for(TEXTS)
    torch.testing.assert_close(text_cooccurrence(ids[1], ids[1]), torch.tensor(C_TEXT_1).float())
    torch.testing.assert_close(text_cooccurrence(ids[0], ids[0]), torch.tensor(C_EXACT_0).float())


# ----------------------------------------------------------------------------- the mgll loss


def test_mgll_tiny_case_by_hand():
    """B=2, G=1: L = [[2, 0], [0, 2]], C = [[1, .5], [.5, 1]], bias -1."""
    img = torch.eye(2, dtype=torch.float64)
    txt = torch.eye(2, dtype=torch.float64)[None]
    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # Jaccard 1/2
    scale, bias = torch.tensor(2.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    out = MGLLLoss()(img, txt, scale, bias, labels=labels)
    lse = math.log(math.exp(2) + 1)
    soft = lse - 4 / 3  # -(2/3 (2 - lse) + 1/3 (0 - lse)) in every row and both directions
    sp = math.log1p
    pw = (2 * sp(math.exp(-1)) + 2 * sp(math.exp(1))) / 4  # Y = 1 everywhere, x = ±1
    assert out["soft_contrastive"].item() == pytest.approx(soft, rel=1e-12)
    assert out["pointwise"].item() == pytest.approx(pw, rel=1e-12)
    assert out["kl"].item() == 0.0
    assert out["loss"].item() == pytest.approx(soft + pw, rel=1e-12)
    graded = MGLLLoss(pointwise_target="graded")(img, txt, scale, bias, labels=labels)
    # BCE(x, y) = softplus(x) - x y: diagonal x=1,y=1; off-diagonal x=-1, y=.5
    pw_g = (2 * (sp(math.exp(1)) - 1) + 2 * (sp(math.exp(-1)) + 0.5)) / 4
    assert graded["pointwise"].item() == pytest.approx(pw_g, rel=1e-12)


@pytest.mark.parametrize(
    "soft_target,c0", [("jaccard", C_JACCARD), ("overlap", C_OVERLAP), ("exact", C_EXACT_0)]
)
@pytest.mark.parametrize("graded", [False, True])
def test_mgll_matches_python_reference(soft_target, c0, graded):
    img, txt = _features(5, 3, 6, seed=1)
    scale, bias = 7.5, -2.0
    loss_fn = MGLLLoss(
        soft_target=soft_target,
        weights=(0.7, 1.3, 0.9),
        pointwise_target="graded" if graded else "binary",
    )
    out = loss_fn(
        img,
        txt,
        torch.tensor(scale, dtype=torch.float64),
        torch.tensor(bias),
        labels=LABELS,
        text_ids=text_ids_for(TEXTS),
    )
    ref = py_mgll(
        _logits_py(img, txt, scale), [c0, C_TEXT_1, C_IDENTITY], bias, (0.7, 1.3, 0.9), graded
    )
    for key in ("loss", "soft_contrastive", "pointwise", "kl"):
        assert out[key].item() == pytest.approx(ref[key], rel=1e-10, abs=1e-12), key
    assert ref["kl"] > 0


def test_output_keys_dtype_and_weights():
    img, txt = _features(5, 3, 6, seed=2, dtype=torch.float32)
    ids = text_ids_for(TEXTS)
    base = MGLLLoss()(img, txt, torch.tensor(10.0), torch.tensor(-5.0), LABELS, ids)
    assert set(base) == {"loss", "soft_contrastive", "pointwise", "kl"}
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in base.values())
    w = MGLLLoss(weights=(0.5, 2.0, 3.0))(
        img, txt, torch.tensor(10.0), torch.tensor(-5.0), LABELS, ids
    )
    expected = 0.5 * base["soft_contrastive"] + 2 * base["pointwise"] + 3 * base["kl"]
    torch.testing.assert_close(w["loss"], expected)
    assert all(v > 0 for v in base.values())


def test_finer_granularities_use_text_identity():
    """Identical descriptions are positives: moving granularity 1 to distinct texts changes it."""
    img, txt = _features(5, 2, 6, seed=3)
    ids = text_ids_for(TEXTS[:2])
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    out = MGLLLoss()(img, txt, scale, bias, LABELS, ids)
    ref = py_mgll(_logits_py(img, txt, 5.0), [C_JACCARD, C_TEXT_1], -1.0)
    ref_identity = py_mgll(_logits_py(img, txt, 5.0), [C_JACCARD, C_IDENTITY], -1.0)
    assert out["loss"].item() == pytest.approx(ref["loss"], rel=1e-10)
    assert abs(ref["loss"] - ref_identity["loss"]) > 1e-3


def test_missing_text_ids_warns_once_and_uses_identity():
    img, txt = _features(5, 3, 6, seed=4)
    loss_fn = MGLLLoss()
    scale, bias = torch.tensor(4.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = loss_fn(img, txt, scale, bias, LABELS)
        loss_fn(img, txt, scale, bias, LABELS)
    assert len([w for w in caught if "text_ids" in str(w.message)]) == 1
    ref = py_mgll(_logits_py(img, txt, 4.0), [C_JACCARD, C_IDENTITY, C_IDENTITY], -3.0)
    assert out["loss"].item() == pytest.approx(ref["loss"], rel=1e-10)


def test_bias_required_in_mgll_mode():
    img, txt = _features(4, 2, 6, seed=5)
    labels = torch.eye(4)
    ids = text_ids_for([["a", "b", "c", "d"]] * 2)
    with pytest.raises(ValueError, match="logit_bias"):
        MGLLLoss()(img, txt, torch.tensor(10.0), None, labels, ids)
    # not needed when the point-wise weight is 0
    out = MGLLLoss(weights=(1, 0, 1))(img, txt, torch.tensor(10.0), None, labels, ids)
    assert out["pointwise"].item() == 0.0 and torch.isfinite(out["loss"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "x"},
        {"soft_target": "dice"},
        {"weights": (1, 1)},
        {"pointwise_target": "x"},
        {"rank": 2, "world_size": 2},
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        MGLLLoss(**kwargs)


def test_shape_validation():
    img, txt = _features(4, 2, 6, seed=5)
    with pytest.raises(ValueError):
        MGLLLoss()(img[:3], txt, torch.tensor(1.0), torch.tensor(0.0))
    with pytest.raises(ValueError):
        MGLLLoss()(img, txt, torch.tensor(1.0), torch.tensor(0.0), text_ids=torch.zeros(1, 4))


# ----------------------------------------------------------------------------- clip relations


def test_clip_mode_equals_open_clip_cliploss():
    img, txt = _features(8, 3, 16, seed=6)
    img.requires_grad_()
    txt.requires_grad_()
    scale = torch.tensor(14.3, dtype=torch.float64)
    ours = MGLLLoss(mode="clip")(img, txt, scale)
    assert ours["pointwise"].item() == 0.0 and ours["kl"].item() == 0.0
    (g_img, g_txt) = torch.autograd.grad(ours["loss"], (img, txt))
    theirs = sum(ClipLoss()(img, txt[g], scale) for g in range(3)) / 3
    (t_img, t_txt) = torch.autograd.grad(theirs, (img, txt))
    torch.testing.assert_close(ours["loss"], theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_img, t_img, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_txt, t_txt, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("soft_target", ["jaccard", "overlap", "exact"])
def test_mgll_equals_clip_with_disjoint_labels_g1(soft_target):
    img, txt = _features(6, 1, 8, seed=7)
    img.requires_grad_()
    labels = torch.eye(6)  # pairwise disjoint label sets
    labels[0, 1:] = NAN  # NaN does not create overlaps
    ids = text_ids_for([[f"text {i}" for i in range(6)]])
    scale = torch.tensor(20.0, dtype=torch.float64)
    mgll = MGLLLoss(soft_target=soft_target, weights=(1, 0, 0))(img, txt, scale, None, labels, ids)
    clip = MGLLLoss(mode="clip")(img, txt, scale)
    torch.testing.assert_close(mgll["loss"], clip["loss"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(mgll["loss"], img)[0], torch.autograd.grad(clip["loss"], img)[0]
    )
    # soft term alone equals CLIP's for every weight setting
    full = MGLLLoss(soft_target=soft_target)(img, txt, scale, torch.tensor(-10.0), labels, ids)
    torch.testing.assert_close(full["soft_contrastive"], clip["loss"])
    # ... and a shared label changes it
    labels[2, 3] = 1.0
    ids_dup = text_ids_for([["t0", "t1", "t2", "t2", "t4", "t5"]])  # rows 2 and 3 identical
    shared = MGLLLoss(soft_target=soft_target)(
        img, txt, scale, torch.tensor(-10.0), labels, ids_dup
    )
    assert abs(shared["soft_contrastive"].item() - clip["loss"].item()) > 1e-4


# ----------------------------------------------------------------------------- KL


def test_kl_zero_for_identical_granularities_and_positive_otherwise():
    img, txt = _features(6, 3, 8, seed=8)
    same = txt[:1].expand(3, -1, -1).clone()
    loss_fn = MGLLLoss()
    args = (torch.tensor(30.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64))
    ids = text_ids_for([[str(i) for i in range(6)]] * 3)
    out_same = loss_fn(img, same, *args, labels=torch.eye(6), text_ids=ids)
    assert abs(out_same["kl"].item()) < 1e-12
    out_diff = loss_fn(img, txt, *args, labels=torch.eye(6), text_ids=ids)
    assert out_diff["kl"].item() > 1e-3
    single = loss_fn(img, txt[:1], *args, labels=torch.eye(6), text_ids=ids[:1])
    assert single["kl"].item() == 0.0


# ----------------------------------------------------------------------------- gradients


def test_gradients_reach_scale_and_bias():
    img, txt = _features(5, 3, 6, seed=9)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    out = MGLLLoss()(img, txt, scale.exp(), bias, LABELS, text_ids_for(TEXTS))
    g_scale, g_bias = torch.autograd.grad(out["loss"], (scale, bias))
    assert torch.isfinite(g_scale) and g_scale.abs() > 1e-6
    assert torch.isfinite(g_bias) and g_bias.abs() > 1e-6


@pytest.mark.parametrize("mode", ["mgll", "clip", "mgll-official"])
def test_gradcheck(mode):
    img, txt = _features(4, 2, 5, seed=10)
    if mode == "mgll-official":
        img, txt = img.abs() * 2, txt.abs() * 2  # positive logits: the KL term is active
    img.requires_grad_()
    txt.requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    labels = LABELS[:4]
    ids = text_ids_for([t[:4] for t in TEXTS[:2]])
    loss_fn = MGLLLoss(mode=mode)

    def f(i, t, s, b):
        return loss_fn(i, t, s, b, labels, ids)["loss"]

    assert torch.autograd.gradcheck(f, (img, txt, scale, bias))


# ----------------------------------------------------------------------------- numerics


def _extreme_cases(b: int = 8, g: int = 3, d: int = 16):
    gen = torch.Generator().manual_seed(11)
    rand = F.normalize(torch.randn(b, d, generator=gen), dim=-1)
    rand_t = F.normalize(torch.randn(g, b, d, generator=gen), dim=-1)
    one = F.normalize(torch.ones(d), dim=0)
    same = one.expand(b, d)
    yield "random", rand, rand_t
    yield "all-identical", same, same.expand(g, b, d)  # every logit = +scale
    yield "antipodal", same, -same.expand(g, b, d)  # every logit = -scale
    yield "matched", rand, torch.stack([rand, -rand, rand])  # diagonal ±scale


@pytest.mark.parametrize("mode", ["mgll", "clip", "mgll-official"])
@pytest.mark.parametrize("bias", [-10.0, 60.0])
def test_finite_at_scale_100_bf16_extreme_inputs(mode, bias):
    b, g = 8, 3
    labels_sets = [
        torch.full((b, 5), NAN),  # all-NaN rows
        torch.ones(b, 5),  # everybody shares everything
        -torch.ones(b, 5),  # all uncertain
    ]
    id_sets = [torch.zeros(g, b, dtype=torch.int64), text_ids_for([[str(i) for i in range(b)]] * g)]
    loss_fn = MGLLLoss(mode=mode)
    for name, img, txt in _extreme_cases(b, g):
        for labels in labels_sets:
            for ids in id_sets:
                img_l = img.to(torch.bfloat16).requires_grad_()
                txt_l = txt.to(torch.bfloat16).requires_grad_()
                raw = torch.tensor(math.log(100.0), requires_grad=True)
                bias_t = torch.tensor(bias, requires_grad=True)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = loss_fn(img_l, txt_l, raw.exp(), bias_t, labels, ids)
                assert all(torch.isfinite(v) for v in out.values()), (name, out)
                assert out["loss"].dtype == torch.float32
                out["loss"].backward()
                for t in (img_l, txt_l, raw):
                    assert torch.isfinite(t.grad.float()).all(), name
                if mode == "mgll":
                    assert torch.isfinite(bias_t.grad)


def test_autocast_does_not_change_the_result():
    img, txt = _features(5, 3, 6, seed=12, dtype=torch.float32)
    args = (torch.tensor(50.0), torch.tensor(-10.0), LABELS, text_ids_for(TEXTS))
    ref = MGLLLoss()(img, txt, *args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = MGLLLoss()(img, txt, *args)
    for key in ref:
        assert under[key].dtype == torch.float32
        torch.testing.assert_close(under[key], ref[key], rtol=1e-6, atol=1e-6)
    # bf16 inputs are upcast, not computed in bf16: equal to the fp32 loss on the rounded inputs
    bf = MGLLLoss()(img.bfloat16(), txt.bfloat16(), *args)
    ref_bf = MGLLLoss()(img.bfloat16().float(), txt.bfloat16().float(), *args)
    torch.testing.assert_close(bf["loss"], ref_bf["loss"], rtol=0, atol=0)


def test_local_loss_single_process_is_the_global_loss():
    img, txt = _features(5, 3, 6, seed=13)
    args = (
        torch.tensor(10.0, dtype=torch.float64),
        torch.tensor(-4.0, dtype=torch.float64),
        LABELS,
        text_ids_for(TEXTS),
    )
    a = MGLLLoss(local_loss=True, gather_with_grad=True)(img, txt, *args)
    b = MGLLLoss()(img, txt, *args)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=0, atol=0)


# ----------------------------------------------------------------------------- mgll-official


def official_reference(img, txt, scale, texts):
    """The reference code's arithmetic, written out directly (float64, loops over granularities).

    loss = Σ_g [ BCEWithLogits(L, Y) + ¼ (CE(L, Y) + CE(Lᵀ, Y)) ]
           + 0.5 · (1/G) Σ_g Σ_ij M_ij (log M_ij − log L_g,ij) / B     (only when finite)
    with L_g = scale · v u_gᵀ (raw features), Y_ij = [t_i == t_j] / #{k : t_k == t_i}.
    """
    g_n, b = len(texts), len(texts[0])
    logits = [scale * img @ txt[g].T for g in range(g_n)]
    total = torch.zeros((), dtype=torch.float64)
    for g in range(g_n):
        y = torch.zeros(b, b, dtype=torch.float64)
        for i in range(b):
            matches = [j for j in range(b) if texts[g][j] == texts[g][i]]
            for j in matches:
                y[i, j] = 1.0 / len(matches)
        x = logits[g]
        # log σ(x) and log(1 − σ(x)) = log σ(−x), written stably
        bce = -(y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x)).mean()
        ce1 = -(y * (x - torch.logsumexp(x, dim=1, keepdim=True))).sum() / b
        xt = x.T
        ce2 = -(y * (xt - torch.logsumexp(xt, dim=1, keepdim=True))).sum() / b
        total = total + bce + 0.25 * (ce1 + ce2)
    m = sum(logits) / g_n
    kl = sum((m * (torch.log(m) - torch.log(lg))).sum() / b for lg in logits) / g_n
    if torch.isfinite(kl):
        total = total + 0.5 * kl
    return total, kl


@pytest.mark.parametrize("positive", [True, False])
def test_mgll_official_matches_direct_recomputation(positive):
    gen = torch.Generator().manual_seed(1234)
    b, d = 6, 10
    # unnormalised projected features, as the reference uses them
    img = torch.randn(b, d, generator=gen, dtype=torch.float64) * 0.4
    txt = torch.randn(2, b, d, generator=gen, dtype=torch.float64) * 0.4
    if positive:
        img, txt = img.abs(), txt.abs()
    texts = [
        [
            "Abnormal, Mild NPDR",
            "Normal",
            "Normal",
            "Abnormal, Severe NPDR",
            "Normal",
            "Abnormal, Mild NPDR",
        ],
        ["desc a", "desc b", "desc c", "desc a", "desc d", "desc e"],
    ]
    scale = math.exp(math.log(1 / 0.07))
    out = MGLLLoss(mode="mgll-official")(
        img,
        txt,
        torch.tensor(scale, dtype=torch.float64),
        labels=None,
        text_ids=text_ids_for(texts),
    )
    ref, kl = official_reference(img, txt, scale, texts)
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-10)
    if positive:
        assert torch.isfinite(kl) and kl.item() > 1e-6
        assert out["kl"].item() == pytest.approx(0.5 * kl.item(), rel=1e-10)
    else:
        assert not torch.isfinite(kl)  # a negative logit: the reference skips the KL term
        assert out["kl"].item() == 0.0
    torch.testing.assert_close(out["loss"], out["soft_contrastive"] + out["pointwise"] + out["kl"])


def test_mgll_official_ignores_soft_target_and_labels():
    img, txt = _features(5, 3, 6, seed=14)
    ids = text_ids_for(TEXTS)
    a = MGLLLoss(mode="mgll-official", soft_target="jaccard")(
        img, txt, torch.tensor(10.0), labels=LABELS, text_ids=ids
    )
    b = MGLLLoss(mode="mgll-official", soft_target="exact")(
        img, txt, torch.tensor(10.0), text_ids=ids
    )
    torch.testing.assert_close(a["loss"], b["loss"], rtol=0, atol=0)
    c = MGLLLoss(mode="mgll-official")(
        img, txt, torch.tensor(10.0), text_ids=text_ids_for([[str(i) for i in range(5)]] * 3)
    )
    assert abs(a["loss"].item() - c["loss"].item()) > 1e-4  # duplicates matter
