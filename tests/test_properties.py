"""Property-based tests (hypothesis) of the MGLL loss, the hash splits and the PNG encoder.

* ``MGLLLoss`` (every mode): a joint permutation of the batch (images, texts, labels, text ids
  permuted together) leaves every loss term unchanged and permutes the feature gradients the
  same way; splitting the batch over 2 or 3 real gloo ranks (one persistent pool of worker
  processes, every configuration of ``gather_with_grad``/``local_loss``) gives the
  single-process loss and gradients; the loss and its gradients stay finite at logit scales
  from 1e-4 to 1e4, biases of ±100, bf16/fp32/fp64 features, degenerate (identical, antipodal)
  features and all-zero / all-positive / all-uncertain / all-NaN labels.
* ``mgll_data.sources.splits`` (and the sources' wrappers around it): a key's split depends on
  the key and salt only (not on which other keys are split, nor in which order, nor on the
  process or its ``PYTHONHASHSEED``), and the three splits nest as the fractions grow.
* The project has no mask or RLE encoder/decoder of its own (DICOM RLE is pydicom's codec); its
  one encoder is ``mgll_data.png.encode_png`` (zlib's RLE strategy inside PNG): any uint8 grey
  or RGB array survives the round trip through Pillow's independent PNG decoder, bit-exact.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import queue
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from mgll_data.imaging.png import encode_png
from mgll_data.sources.splits import hash_fraction, hash_split
from mgll_train.loss import MGLLLoss

NAN = float("nan")
LABEL_VALUES = (1.0, 0.0, -1.0, NAN)
TERMS = ("loss", "soft_contrastive", "pointwise", "kl")
TOL = {"rtol": 1e-9, "atol": 1e-11}
REPO = Path(__file__).resolve().parents[1]

# Few examples: every property runs in well under ten seconds on one shared core.
FAST = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ----------------------------------------------------------------------------- strategies


@st.composite
def loss_configs(draw: st.DrawFn, modes: tuple[str, ...] = ("mgll", "clip", "mgll-official")):
    """Keyword arguments of ``MGLLLoss`` (mode, targets, weights)."""
    return {
        "mode": draw(st.sampled_from(modes)),
        "soft_target": draw(st.sampled_from(("jaccard", "overlap", "exact"))),
        "pointwise_target": draw(st.sampled_from(("binary", "graded"))),
        "weights": tuple(draw(st.lists(st.floats(0.1, 2.0), min_size=3, max_size=3))),
    }


@st.composite
def batches(draw: st.DrawFn, sizes: st.SearchStrategy[int] | None = None) -> dict[str, Any]:
    """A batch: float64 features, labels in {1, 0, -1, NaN}, text ids with duplicates."""
    b = draw(sizes if sizes is not None else st.integers(2, 6))
    g = draw(st.integers(1, 3))
    k = draw(st.integers(1, 4))
    d = 5
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    positive = draw(st.booleans())  # official mode: all logits > 0 keeps its KL term active
    img = torch.randn(b, d, generator=gen, dtype=torch.float64)
    txt = torch.randn(g, b, d, generator=gen, dtype=torch.float64)
    if positive:
        img, txt = img.abs(), txt.abs()
    labels = torch.tensor(
        draw(
            st.lists(
                st.lists(st.sampled_from(LABEL_VALUES), min_size=k, max_size=k),
                min_size=b,
                max_size=b,
            )
        ),
        dtype=torch.float32,
    )
    # ids from a 3-word vocabulary: identical texts (positives) are common
    ids = torch.tensor(
        draw(st.lists(st.lists(st.integers(0, 2), min_size=b, max_size=b), min_size=g, max_size=g)),
        dtype=torch.int64,
    )
    return {
        "img": F.normalize(img, dim=-1),
        "txt": F.normalize(txt, dim=-1),
        "labels": labels,
        "ids": ids,
        "scale": draw(st.floats(1.0, 100.0)),
        "bias": draw(st.floats(-10.0, 10.0)),
    }


def _loss_and_grads(
    loss_fn: MGLLLoss, batch: dict[str, Any], messages: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Loss terms and the gradients of the loss w.r.t. image/text features, scale and bias;
    the warnings the call gave are appended to `messages` (if given)."""
    img = batch["img"].clone().requires_grad_()
    txt = batch["txt"].clone().requires_grad_()
    scale = torch.tensor(batch["scale"], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(batch["bias"], dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = loss_fn(img, txt, scale, bias, batch["labels"], batch["ids"])
    if messages is not None:
        messages.extend(str(w.message) for w in caught)
    inputs = [img, txt, scale, bias]
    grads = torch.autograd.grad(out["loss"], inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, inputs, strict=True)]
    return {k: v.detach() for k, v in out.items()}, grads


# ----------------------------------------------------------------------------- permutation


@FAST
@given(batch=batches(), cfg=loss_configs(), data=st.data())
def test_loss_is_invariant_under_a_joint_permutation_of_the_batch(batch, cfg, data):
    b = batch["img"].shape[0]
    perm = torch.tensor(data.draw(st.permutations(range(b))))
    loss_fn = MGLLLoss(**cfg)
    out, grads = _loss_and_grads(loss_fn, batch)
    permuted = dict(
        batch,
        img=batch["img"][perm],
        txt=batch["txt"][:, perm],
        labels=batch["labels"][perm],
        ids=batch["ids"][:, perm],
    )
    out_p, grads_p = _loss_and_grads(loss_fn, permuted)
    for term in TERMS:
        assert torch.isfinite(out[term]), term
        torch.testing.assert_close(out_p[term], out[term], **TOL, msg=term)
    torch.testing.assert_close(grads_p[0], grads[0][perm], **TOL)
    torch.testing.assert_close(grads_p[1], grads[1][:, perm], **TOL)
    torch.testing.assert_close(grads_p[2], grads[2], **TOL)  # scale
    torch.testing.assert_close(grads_p[3], grads[3], **TOL)  # bias


def test_permutation_property_detects_a_row_dependent_target():
    """The property has teeth: the same texts and labels attached to the wrong images change
    the loss (so an implementation that ignored the pairing would fail the test above)."""
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 5, generator=gen, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(2, 4, 5, generator=gen, dtype=torch.float64), dim=-1)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [NAN, 1.0]])
    ids = torch.tensor([[0, 1, 2, 2], [0, 0, 1, 2]])
    perm = torch.tensor([1, 2, 3, 0])
    loss_fn = MGLLLoss()
    a = loss_fn(img, txt, 10.0, -2.0, labels, ids)["loss"]
    b = loss_fn(img[perm], txt, 10.0, -2.0, labels, ids)["loss"]  # images only: pairing broken
    assert abs(a.item() - b.item()) > 1e-3


# ----------------------------------------------------------------------------- rank splits


def _rank_worker(rank: int, tasks: Any, results: Any) -> None:
    """One persistent gloo rank: (re)joins a process group on "init", computes on "loss"."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    while True:
        msg = tasks.get()
        if msg is None:
            if dist.is_initialized():
                dist.destroy_process_group()
            break
        try:
            if msg[0] == "init":
                _, world, store = msg
                if dist.is_initialized():
                    dist.destroy_process_group()
                if rank < world:
                    dist.init_process_group(
                        "gloo", init_method=f"file://{store}", rank=rank, world_size=world
                    )
                results.put((rank, "ready"))
                continue
            _, world, cfg, arrays = msg
            b = arrays["img"].shape[0] // world
            sl = slice(rank * b, (rank + 1) * b)
            local = {
                "img": torch.from_numpy(arrays["img"][sl]),
                "txt": torch.from_numpy(arrays["txt"][:, sl]),
                "labels": torch.from_numpy(arrays["labels"][sl]),
                "ids": None if arrays["ids"] is None else torch.from_numpy(arrays["ids"][:, sl]),
                "scale": arrays["scale"],
                "bias": arrays["bias"],
            }
            loss_fn = MGLLLoss(**cfg, rank=rank, world_size=world)
            messages: list[str] = []
            out, grads = _loss_and_grads(loss_fn, local, messages)
            result = {
                "out": {k: v.numpy() for k, v in out.items()},
                "grads": [gr.numpy() for gr in grads[:2]],
                "warnings": messages,
            }
            results.put((rank, result))
        except Exception as err:  # reported to the test process, which fails with it
            results.put((rank, f"error: {type(err).__name__}: {err}"))


class RankPool:
    """Three spawned processes that act as the ranks of a 2- or 3-process gloo group."""

    def __init__(self, tmp: Path, size: int = 3) -> None:
        ctx = mp.get_context("spawn")
        self.tmp = tmp
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(size)]
        self.procs = [
            ctx.Process(target=_rank_worker, args=(r, self.tasks[r], self.results), daemon=True)
            for r in range(size)
        ]
        for p in self.procs:
            p.start()
        self.world = 0
        self.inits = 0
        self.broken = ""

    def _collect(self, count: int, timeout_s: float) -> dict[int, Any]:
        """`count` answers; a silent or failing rank fails the test and breaks the pool (its
        ranks may be stuck in a collective), so later calls fail at once instead of waiting."""
        if self.broken:
            pytest.fail(f"the rank pool is unusable after: {self.broken}")
        got = {}
        for _ in range(count):
            try:
                rank, value = self.results.get(timeout=timeout_s)
            except queue.Empty:
                self.broken = f"a rank worker did not answer within {timeout_s:.0f} s"
                pytest.fail(self.broken)
            if isinstance(value, str) and value.startswith("error"):
                self.broken = f"rank {rank}: {value}"
                pytest.fail(self.broken)
            got[rank] = value
        return got

    def use(self, world: int) -> None:
        """Make ranks 0..world-1 one process group (a fresh file store per group)."""
        if world == self.world:
            return
        self.inits += 1
        store = self.tmp / f"store-{self.inits}"
        for q in self.tasks:
            q.put(("init", world, str(store)))
        self._collect(len(self.tasks), 300)  # spawned interpreters importing torch
        self.world = world

    def run(self, cfg: dict, batch: dict[str, Any]) -> list[dict]:
        """Every rank's output for its slice of the global ``batch``."""
        arrays = {
            "img": batch["img"].numpy(),
            "txt": batch["txt"].numpy(),
            "labels": batch["labels"].numpy(),
            "ids": None if batch["ids"] is None else batch["ids"].numpy(),
            "scale": batch["scale"],
            "bias": batch["bias"],
        }
        if not self.broken:
            for r in range(self.world):
                self.tasks[r].put(("loss", self.world, cfg, arrays))
        got = self._collect(self.world, 30)  # milliseconds of work: longer is a hang
        return [got[r] for r in range(self.world)]

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=2)  # they leave the group and exit; torch's shutdown can be slow
            if p.is_alive():
                p.terminate()  # e.g. stuck in a collective whose peer failed
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


@pytest.fixture(scope="module")
def rank_pool(tmp_path_factory):
    pool = RankPool(tmp_path_factory.mktemp("rank-pool"))
    yield pool
    pool.close()


_OFFICIAL_DDP = (
    "MGLLLoss(mode='mgll-official') uses the local batch only (no gather), as the reference "
    "code does; targets and loss ignore the other ranks"
)


@pytest.mark.parametrize("world", [2, 3])
@settings(FAST, max_examples=20)
@given(
    batch=batches(sizes=st.integers(1, 3).map(lambda b: b * 6)),
    cfg=loss_configs(),
    flags=st.sampled_from(["default", "gwg", "local", "gwg+local", "none"]),
    with_ids=st.booleans(),
)
def test_loss_is_equal_across_a_split_into_ranks(rank_pool, world, batch, cfg, flags, with_ids):
    """N in {6, 12, 18} split over `world` real ranks against one process on all N rows.

    "default" leaves gather_with_grad and local_loss unset (both False by default)."""
    rank_pool.use(world)
    gather_with_grad, local_loss = "gwg" in flags, "local" in flags
    if flags != "default":
        cfg = dict(cfg, gather_with_grad=gather_with_grad, local_loss=local_loss)
    if not with_ids:
        batch = dict(batch, ids=None)
    ranks = rank_pool.run(cfg, batch)
    n = batch["img"].shape[0]
    b = n // world
    if cfg["mode"] == "mgll-official":
        # never gathers (and says so once): each rank's loss is one process's loss on its slice
        for r, res in enumerate(ranks):
            assert res["warnings"].count(_OFFICIAL_DDP) == 1
            sl = slice(r * b, (r + 1) * b)
            part = dict(
                batch,
                img=batch["img"][sl],
                txt=batch["txt"][:, sl],
                labels=batch["labels"][sl],
                ids=None if batch["ids"] is None else batch["ids"][:, sl],
            )
            single, grads = _loss_and_grads(MGLLLoss(**cfg), part)
            for term in TERMS:
                torch.testing.assert_close(torch.from_numpy(res["out"][term]), single[term], **TOL)
            torch.testing.assert_close(torch.from_numpy(res["grads"][0]), grads[0], **TOL)
        return
    if with_ids:
        assert all(res["warnings"] == [] for res in ranks)  # labels and ids given: silent
    single, grads = _loss_and_grads(MGLLLoss(**cfg), batch)
    for term in TERMS:
        per_rank = torch.stack([torch.from_numpy(r["out"][term]) for r in ranks])
        if local_loss:
            torch.testing.assert_close(per_rank.mean(), single[term], **TOL, msg=term)
        else:
            for value in per_rank:
                torch.testing.assert_close(value, single[term], **TOL, msg=term)
    if local_loss and not gather_with_grad:
        return  # rank r's gradient is that of its own loss only (see test_loss_distributed)
    factor = world if gather_with_grad else 1  # the autograd all_gather sums W equal losses
    for r, res in enumerate(ranks):
        sl = slice(r * b, (r + 1) * b)
        grad_img, grad_txt = (torch.from_numpy(gr) / factor for gr in res["grads"])
        torch.testing.assert_close(grad_img, grads[0][sl], **TOL)
        torch.testing.assert_close(grad_txt, grads[1][:, sl], **TOL)


# ----------------------------------------------------------------------------- finiteness


_LABEL_KINDS = ("zero", "positive", "uncertain", "nan", "mixed")
_FEATURE_KINDS = ("random", "identical", "antipodal", "matched")


def _labels(kind: str, b: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Label matrices of one kind: all 0, all 1, all -1, all NaN, or a random mix."""
    if kind == "mixed":
        idx = torch.randint(0, len(LABEL_VALUES), (b, k), generator=gen)
        return torch.tensor(LABEL_VALUES)[idx]
    value = {"zero": 0.0, "positive": 1.0, "uncertain": -1.0, "nan": NAN}[kind]
    return torch.full((b, k), value)


def _extreme_features(kind: str, b: int, g: int, d: int, gen: torch.Generator):
    """Unit features whose logits are random, all +scale, all -scale, or ±scale on the diagonal."""
    rand = F.normalize(torch.randn(b, d, generator=gen), dim=-1)
    one = F.normalize(torch.ones(d), dim=0).expand(b, d)
    if kind == "random":
        return rand, F.normalize(torch.randn(g, b, d, generator=gen), dim=-1)
    if kind == "identical":
        return one, one.expand(g, b, d)
    if kind == "antipodal":
        return one, -one.expand(g, b, d)
    return rand, torch.stack([rand if gi % 2 == 0 else -rand for gi in range(g)])


@settings(FAST, max_examples=40)
@given(
    cfg=loss_configs(),
    b=st.integers(1, 6),
    g=st.integers(1, 3),
    log10_scale=st.one_of(st.sampled_from([-4.0, 4.0]), st.floats(-4.0, 4.0)),
    bias=st.floats(-100.0, 100.0),
    label_kind=st.sampled_from(_LABEL_KINDS),
    feature_kind=st.sampled_from(_FEATURE_KINDS),
    dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float64]),
    seed=st.integers(0, 1000),
)
def test_loss_and_gradients_are_finite_at_extreme_scales_and_labels(
    cfg, b, g, log10_scale, bias, label_kind, feature_kind, dtype, seed
):
    gen = torch.Generator().manual_seed(seed)
    img, txt = _extreme_features(feature_kind, b, g, 8, gen)
    img = img.to(dtype).requires_grad_()
    txt = txt.to(dtype).requires_grad_()
    log_scale = torch.tensor(log10_scale * math.log(10.0), requires_grad=True)
    bias_t = torch.tensor(bias, requires_grad=True)
    labels = _labels(label_kind, b, 3, gen)
    ids = torch.randint(0, 2, (g, b), generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = MGLLLoss(**cfg)(img, txt, log_scale.exp(), bias_t, labels, ids)
    for term in TERMS:
        assert torch.isfinite(out[term]), (term, out)
    assert out["loss"].dtype == torch.promote_types(dtype, torch.float32)
    if cfg["mode"] == "mgll-official":
        # The reference's KL takes log of raw logits; its gradient m / L is unbounded as a
        # logit approaches 0, so only the loss is promised finite in that mode.
        return
    grads = torch.autograd.grad(out["loss"], (img, txt, log_scale, bias_t), allow_unused=True)
    for name, grad in zip(("img", "txt", "scale", "bias"), grads, strict=True):
        if grad is not None:
            assert torch.isfinite(grad.float()).all(), name


# ----------------------------------------------------------------------------- splits

KEYS = st.text(min_size=0, max_size=12)
SALTS = st.text(min_size=0, max_size=8)
FRACTION = st.floats(0.0, 1.0)


def _fraction_reference(key: str, salt: str) -> float:
    """SHA-256 of "salt:key", first 8 bytes as a big-endian fraction (read via hex here)."""
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:16], 16) / 2**64


@settings(FAST, max_examples=60)
@given(keys=st.lists(KEYS, max_size=30), salt=SALTS, data=st.data())
def test_hash_split_depends_on_the_key_only_not_on_order_or_company(keys, salt, data):
    splits = [hash_split(k, salt, 0.2, 0.1) for k in keys]
    shuffled = data.draw(st.permutations(range(len(keys))))
    again = {keys[i]: hash_split(keys[i], salt, 0.2, 0.1) for i in shuffled}
    assert [again[k] for k in keys] == splits
    # splitting a subset (another build's `--limit`) assigns the same splits
    subset = data.draw(st.lists(st.sampled_from(keys), unique=True)) if keys else []
    assert all(hash_split(k, salt, 0.2, 0.1) == again[k] for k in subset)
    for k in keys:
        u = hash_fraction(k, salt)
        assert 0.0 <= u < 1.0 and u == _fraction_reference(k, salt)


@settings(FAST, max_examples=100)
@given(key=KEYS, salt=SALTS, v=FRACTION, t=FRACTION, dv=FRACTION, dt=FRACTION)
def test_hash_split_nests_as_fractions_grow(key, salt, v, t, dv, dt):
    # imported here, not at the top: the spawned rank workers import this module
    from mgll_data.sources.chestxray14 import in_validation

    v, t = v / 2, t / 2  # v + t <= 1
    u = _fraction_reference(key, salt)
    split = hash_split(key, salt, v, t)
    assert split == ("test" if u < t else "validation" if u < t + v else "train")
    # more test share: a test key stays test
    if split == "test":
        assert hash_split(key, salt, v, t + dt / 2) == "test"
    # more validation share (test fixed): only train keys can move, and only to validation
    grown = hash_split(key, salt, v + dv / 2, t)
    assert grown == split or (split == "train" and grown == "validation")
    # the ChestX-ray14 wrapper is the same function of (key, salt, fraction)
    assert in_validation(key, v, salt) == (hash_split(key, salt, v, 0.0) == "validation")


def test_hash_splits_are_the_same_in_another_process_and_hash_seed():
    """A fresh interpreter with a fixed PYTHONHASHSEED (this one's is random) assigns the same
    splits: the split never depends on Python's salted hash()."""
    keys = [f"patient-{i}" for i in range(300)] + ["", "Émile", "00000001", "1", "a:b"]
    here = {k: hash_split(k, "salt", 0.1, 0.2) for k in keys}
    code = (
        "import json, sys\n"
        "from mgll_data.sources.splits import hash_split\n"
        "keys = json.load(sys.stdin)\n"
        "print(json.dumps({k: hash_split(k, 'salt', 0.1, 0.2) for k in keys}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(keys),
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONHASHSEED="12345"),
        cwd=REPO,
        check=True,
    )
    assert json.loads(proc.stdout) == here
    # and the 300 keys are really spread over the three splits
    assert set(here.values()) == {"train", "validation", "test"}


# ----------------------------------------------------------------------------- PNG round trip


@settings(FAST, max_examples=60)
@given(
    pixels=hnp.arrays(
        np.uint8,
        st.one_of(
            hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24),
            st.tuples(st.integers(1, 24), st.integers(1, 24), st.just(3)),
        ),
    )
)
def test_png_round_trips_through_pillow(pixels):
    data = encode_png(pixels)
    assert data == encode_png(pixels.copy())  # deterministic bytes
    image = Image.open(io.BytesIO(data))
    assert image.mode == ("L" if pixels.ndim == 2 else "RGB")
    image.load()  # decodes every chunk (and checks their CRCs)
    np.testing.assert_array_equal(np.asarray(image), pixels)


@settings(FAST, max_examples=20)
@given(pixels=hnp.arrays(np.uint8, st.tuples(st.integers(2, 16), st.integers(2, 16))))
def test_png_of_a_non_contiguous_view_equals_its_copy(pixels):
    view = pixels[::-1, ::2]  # negative and strided: the encoder must not read raw memory
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(view)))), view)
