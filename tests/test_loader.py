"""SliceBatcher: shapes/dtypes, windowing, next-slice pairs, seeded order, resume position, sharding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from _fit_fakes import ArrayStore, make_arrays, make_store
from ctssl_core.config import ConfigError
from ctssl_core.data.loader import SliceBatcher
from ctssl_core.ops import window

torch.set_num_threads(1)


@pytest.fixture(params=["array", "store"])
def store(request):
    arrays = make_arrays(n_series=3, n_slices=10, size=32)
    pe = [np.arange(10) % 2 for _ in range(3)]
    if request.param == "array":
        return ArrayStore(arrays, pe=pe)
    return make_store(arrays, pe=pe)


def hu_of(raw):
    """Identity pixel (0, 0) back to HU via the inverse of the default window."""
    return torch.round(raw["x"][:, :, 0, 0] * 350 - 125).long()  # (B, S)


def take(batcher, n):
    return list(itertools.islice(iter(batcher), n))


def test_single_slice_batch_shapes_dtypes_and_window(store):
    b = SliceBatcher(store, None, batch_size=4, label_keys=("pe",), seed=0, wants_hu=True)
    raw = take(b, 1)[0]
    assert raw["x"].shape == (4, 1, 32, 32) and raw["x"].dtype == torch.float32
    assert raw["hu"].dtype == torch.int16 and raw["hu"].shape == (4, 1, 32, 32)
    assert raw["pe"].shape == (4,) and raw["pe"].dtype == torch.float32
    assert raw["slice_id"].dtype == torch.int64 and raw["patient_idx"].dtype == torch.int64
    assert 0.0 <= float(raw["x"].min()) and float(raw["x"].max()) <= 1.0
    # window: level 50 width 350 -> x = (hu + 125) / 350 clipped
    expect = ((raw["hu"].float() + 125) / 350).clamp(0, 1)
    assert torch.allclose(raw["x"], expect, atol=1e-6)
    ids = raw["slice_id"].numpy()
    assert np.array_equal(raw["pe"].numpy(), (ids % 10 % 2).astype(np.float32))
    assert np.array_equal(raw["patient_idx"].numpy(), ids // 10)


def test_window_clips_to_unit_range():
    hu = torch.tensor([[-1000, -125, 50, 225, 3000]], dtype=torch.int16)
    assert torch.allclose(window(hu), torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))


@pytest.mark.parametrize("gap", [1, 3])
def test_next_slice_pairs_same_series_right_gap(store, gap):
    b = SliceBatcher(store, None, batch_size=5, context=2, gap=gap, seed=1)
    seen = set()
    for raw in take(b, 8):
        assert raw["x"].shape == (5, 2, 32, 32)
        h = hu_of(raw)  # (B, 2): 100*series + idx
        assert torch.equal(h[:, 1] - h[:, 0], torch.full((5,), gap))
        assert torch.equal(h[:, 0] // 100, h[:, 1] // 100)  # same series
        seen.update(raw["slice_id"].tolist())
    # never a slice without a partner n+gap
    assert all(i % 10 + gap < 10 for i in seen)


def test_order_is_deterministic_by_seed_and_epochs_are_permutations(store):
    ids = lambda seed: [r["slice_id"].tolist() for r in take(SliceBatcher(store, None, 6, seed=seed), 10)]  # noqa: E731
    a, a2, c = ids(3), ids(3), ids(4)
    assert a == a2 and a != c
    epoch0 = sorted(itertools.chain(*a[:5]))  # 30 slices / 6 = 5 batches per epoch
    assert epoch0 == list(range(30))
    assert a[:5] != a[5:10]  # a new permutation each epoch


def test_resume_position_continues_exact_sequence(store):
    full = [r["slice_id"].tolist() for r in take(SliceBatcher(store, None, 4, seed=7), 12)]
    first = SliceBatcher(store, None, 4, seed=7)
    it = iter(first)
    got = [next(it)["slice_id"].tolist() for _ in range(9)]  # crosses the epoch boundary (7 per epoch)
    state = first.state_dict()
    it.close()
    assert state["epoch"] == 1 and state["position"] == 2
    second = SliceBatcher(store, None, 4, seed=7)
    second.load_state_dict(state)
    got += [r["slice_id"].tolist() for r in take(second, 3)]
    assert got == full


def test_resume_with_other_seed_is_refused(store):
    b = SliceBatcher(store, None, 4, seed=1)
    with pytest.raises(ConfigError, match="same seed"):
        b.load_state_dict({"epoch": 0, "position": 1, "seed": 2})


def test_sharding_two_ranks_cover_the_combined_batch(store):
    one = take(SliceBatcher(store, None, 6, seed=5), 4)
    r0 = take(SliceBatcher(store, None, 3, seed=5, rank=0, world_size=2), 4)
    r1 = take(SliceBatcher(store, None, 3, seed=5, rank=1, world_size=2), 4)
    for a, b0, b1 in zip(one, r0, r1):
        assert sorted(a["slice_id"].tolist()) == sorted(b0["slice_id"].tolist() + b1["slice_id"].tolist())


def test_resize_on_device_and_subset_ids(store):
    subset = np.arange(10, 20)
    b = SliceBatcher(store, subset, 5, image_size=16, seed=0, label_keys=("nodule",))
    raw = take(b, 2)
    for r in raw:
        assert r["x"].shape == (5, 1, 16, 16)
        assert r["nodule"].shape == (5, 1, 16, 16) and r["nodule"].dtype == torch.float32
        assert set(r["slice_id"].tolist()) <= set(subset.tolist())


@pytest.mark.parametrize("size", [16, 48])  # shrink and enlarge
def test_loader_resizes_with_ops_resize(store, size):
    """One model-input resize: the loader's pixels are ops.resize's, bit for bit. Shrinking they are
    also the values the loader's own antialiased interpolate gave; enlarging, they differ from those
    by float rounding only (antialias changes nothing but the kernel's arithmetic there)."""
    from ctssl_core import ops

    full = take(SliceBatcher(store, None, 4, seed=2), 1)[0]["x"]                  # (4, 1, 32, 32)
    got = take(SliceBatcher(store, None, 4, seed=2, image_size=size), 1)[0]["x"]  # same slices, resized
    assert torch.equal(got, ops.resize(full, size))
    old = torch.nn.functional.interpolate(full, size=(size, size), mode="bilinear", align_corners=False,
                                          antialias=True)
    if size < 32:
        assert torch.equal(got, old)
    else:
        torch.testing.assert_close(got, old, rtol=0, atol=1e-6)


def test_random_crops_are_windows_of_the_slice_shared_by_pair_and_mask(store):
    """A crop is a true sub-square of the whole slice, the same square for both slices of a
    next-slice pair and for the mask, varies across batches, and repeats on resume."""
    whole = SliceBatcher(store, None, 4, context=2, seed=3, label_keys=("nodule",))
    cropped = SliceBatcher(store, None, 4, context=2, seed=3, label_keys=("nodule",), crop=12)
    tops, cs = set(), take(cropped, 3)
    for w, c in zip(take(whole, 3), cs):
        assert c["x"].shape == (4, 2, 12, 12) and c["nodule"].shape == (4, 1, 12, 12)
        assert torch.equal(w["slice_id"], c["slice_id"])
        for i in range(4):
            full, sub = w["x"][i], c["x"][i]                       # (2, 32, 32), (2, 12, 12)
            hits = [(t, l) for t in range(21) for l in range(21) if torch.equal(full[:, t:t + 12, l:l + 12], sub)]
            assert hits, "the crop is not a window of its slice pair"
            t, l = hits[0]
            tops.add(t)
            assert torch.equal(w["nodule"][i, :, t:t + 12, l:l + 12], c["nodule"][i])
    assert len(tops) > 1
    again = SliceBatcher(store, None, 4, context=2, seed=3, label_keys=("nodule",), crop=12)
    again.load_state_dict({"epoch": 0, "position": 2, "seed": 3})
    assert torch.equal(take(again, 1)[0]["x"], cs[2]["x"])
    with pytest.raises(ConfigError, match="does not fit"):
        SliceBatcher(store, None, 4, crop=40)
    assert SliceBatcher(store, None, 4, crop=32).crop == 0          # whole-slice crop = no crop


def test_no_prefetch_gives_same_batches(store):
    a = take(SliceBatcher(store, None, 4, seed=2, prefetch=False), 5)
    b = take(SliceBatcher(store, None, 4, seed=2, prefetch=True), 5)
    for x, y in zip(a, b):
        assert torch.equal(x["x"], y["x"])


def test_bad_inputs_say_what_to_do(store):
    with pytest.raises(ConfigError, match="lower batch_size"):
        SliceBatcher(store, None, 64)
    with pytest.raises(ConfigError, match="partner 9 slices later"):
        SliceBatcher(store, None, 4, context=2, gap=9)
    with pytest.raises(ConfigError, match="batch_size"):
        SliceBatcher(store, None, 0)
    with pytest.raises(ConfigError, match="context"):
        SliceBatcher(store, None, 2, context=3)
    with pytest.raises(ConfigError, match="label"):
        SliceBatcher(store, None, 2, label_keys=("nodule_volume",))


def test_non_dense_store_ids_map_to_the_right_slices():
    from ctssl_core.data.store import SliceStore

    arrays = make_arrays(n_series=2, n_slices=8, size=16)
    store = SliceStore(arrays, slice_ids=np.arange(16, dtype=np.int64) + 1000)
    b = SliceBatcher(store, np.arange(1004, 1012), 4, context=2, gap=2, seed=0, prefetch=False)
    for raw in take(b, 3):
        ids = raw["slice_id"].numpy()
        assert set(ids) <= {1004, 1005, 1008, 1009, 1010, 1011}  # series 0 idx 6, 7 have no slice n+2
        h = hu_of(raw)
        assert torch.equal(h[:, 0], torch.from_numpy(100 * ((ids - 1000) // 8) + (ids - 1000) % 8))
    with pytest.raises(ConfigError, match="not in the store"):
        SliceBatcher(store, np.array([5]), 1)
