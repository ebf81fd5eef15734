"""Downstream tasks: the Task contract on a tiny encoder, scoring functions, nested label fractions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctssl_core import evaluate as ev
from ctssl_core.config import ConfigError
from ctssl_core.downstream import DOWNSTREAM, make_downstream
from ctssl_core.finetune import FinetuneConfig, fraction_subset
from ctssl_core.tasks import Task

torch.set_num_threads(1)


def _raw(B=4, H=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    nod = torch.zeros(B, 1, H, H)
    nod[0, 0, 10:14, 10:14] = 1.0
    return {
        "x": torch.rand(B, 1, H, H, generator=g),
        "pe": torch.tensor([1.0, 0.0, 0.0, 1.0])[:B],
        "nodule": nod,
        "age": torch.tensor([40.0, float("nan"), 60.0, 70.0])[:B],
        "sex": torch.tensor([1.0, 0.0, float("nan"), 1.0])[:B],
        "race": torch.tensor([0, 2, -1, 1])[:B],
    }


@pytest.mark.parametrize("name", sorted(DOWNSTREAM))
def test_every_task_trains_one_step_on_a_tiny_encoder(name):
    from ctssl_core.models import build_encoder

    task = make_downstream(name, **({"n_race": 3} if name == "demographics" else {}))
    assert isinstance(task, Task) and task.name == name and task.context == 1
    torch.manual_seed(0)
    enc = build_encoder("tiny")
    head = task.build_head(enc)
    raw = _raw()
    batch = task.make_batch(raw, torch.Generator().manual_seed(1))
    pred = task.forward(enc, head, batch)
    loss, parts = task.loss(pred, batch)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in list(enc.parameters()) + list(head.parameters()) if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    prob = task.predict(pred)
    assert prob.shape[0] == 4 and torch.isfinite(prob).all()
    if name == "nodule":
        assert prob.shape == (4, 32, 32) and prob.min() >= 0 and prob.max() <= 1
        assert prob.mean() < 0.1        # output bias starts at the foreground prior, not at p = 0.5


def test_pe_flip_keeps_labels_and_pos_weight_raises_positive_loss():
    task = make_downstream("pe")
    raw = _raw()
    b = task.make_batch(raw, torch.Generator().manual_seed(0))
    torch.testing.assert_close(b.targets, raw["pe"])
    flipped = [torch.equal(b.inputs[i], raw["x"][i].flip(-1)) for i in range(4)]
    kept = [torch.equal(b.inputs[i], raw["x"][i]) for i in range(4)]
    assert all(f or k for f, k in zip(flipped, kept))
    pred = torch.zeros(4)
    plain = task.loss(pred, b)[0]
    weighted = make_downstream("pe", pos_weight=10.0).loss(pred, b)[0]
    assert weighted.item() > plain.item()


def test_nodule_flip_moves_mask_with_image():
    task = make_downstream("nodule")
    raw = _raw()
    raw["x"][0] = raw["nodule"][0]                     # image == mask on sample 0
    for seed in range(4):
        b = task.make_batch(raw, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(b.inputs[0], b.targets[0])


def test_demographics_loss_ignores_missing_labels():
    task = make_downstream("demographics", n_race=3)
    raw = _raw()
    b = task.eval_batch(raw)
    pred = torch.zeros(4, 5, requires_grad=True)
    loss, parts = task.loss(pred, b)
    assert torch.isfinite(loss)
    loss.backward()
    # sample 2 has unknown sex and race: only its age term may produce a gradient
    assert pred.grad[2, 1] == 0 and torch.all(pred.grad[2, 2:] == 0) and pred.grad[2, 0] != 0
    assert pred.grad[1, 0] == 0                         # unknown age


def test_pe_scoring_matches_direct_metrics():
    rng = np.random.default_rng(0)
    n_pat, per = 12, 6
    patient = np.repeat(np.arange(n_pat), per)
    exam = patient + 100
    y = np.zeros(n_pat * per)
    y[(patient % 2 == 0) & (np.arange(n_pat * per) % per < 2)] = 1   # even patients have 2 PE slices
    prob = np.clip(0.3 * y + rng.random(y.size) * 0.7, 0, 1)
    out = {"prob": prob, "target": y, "exam": exam, "patient": patient, "order": np.tile(np.arange(per), n_pat)}
    m = make_downstream("pe").stat_fn(out)(np.arange(n_pat))
    assert m["slice_auroc_zstrat"] == pytest.approx(ev.stratified_auroc(y, prob, ev.position_strata(exam, out["order"])))
    assert m["slice_auroc"] == pytest.approx(ev.auroc(y, prob))
    assert m["auprc"] == pytest.approx(ev.auprc(y, prob))
    ids, es = ev.aggregate_exam(exam, prob, "topk", 3)
    _, el = ev.aggregate_exam(exam, y, "max")
    assert m["exam_auroc"] == pytest.approx(ev.auroc(el, es))
    assert m["rsna_wll"] == pytest.approx(ev.rsna_weighted_log_loss(
        exam, y, prob, {"negative_exam_for_pe": 1 - el}, {"negative_exam_for_pe": 1 - es}))
    # a patient drawn twice counts as two exams
    twice = make_downstream("pe").stat_fn(out)(np.array([0, 0, 1]))
    assert np.isfinite(twice["exam_auroc"]) and twice["exam_auroc"] == pytest.approx(
        ev.auroc([1, 1, 0], ev.aggregate_exam([0] * 6 + [1] * 6 + [2] * 6,
                                              np.r_[prob[:6], prob[:6], prob[6:12]], "topk", 3)[1]))


def test_nodule_and_demographics_scoring():
    H = 8
    target = np.zeros((4, H, H), bool)
    target[1:3, 2:4, 2:4] = True                       # one 3D nodule in series 0 (slices 1-2)
    pred = target.copy()
    pred[3, 0, 0] = True                               # a false positive pixel on slice 3
    out = {"prob": pred, "target": target, "exam": np.zeros(4, int), "order": np.arange(4),
           "patient": np.zeros(4, int)}
    m = make_downstream("nodule").stat_fn(out)(np.array([0]))
    assert m["nodule_dice"] == pytest.approx(1.0)
    assert m["dice"] == pytest.approx((1 + 1 + 0) / 3)   # slice 0 empty in both: not counted
    # demographics: per-patient mean of slice predictions
    prob = np.array([[40, 0.9, 0.8, 0.1, 0.1], [50, 0.7, 0.6, 0.2, 0.2],
                     [70, 0.1, 0.1, 0.8, 0.1], [60, 0.3, 0.1, 0.1, 0.8]], float)
    years = np.array([44, 44, 66, 55], float)
    task = make_downstream("demographics", n_race=3, age_mean=50.0, age_std=10.0)
    # targets arrive as the task's eval_batch makes them: age standardised
    tgt = np.stack([(years - 50.0) / 10.0, [1, 1, 0, 0], [0, 0, 1, 2]], 1)
    out = {"prob": prob, "target": tgt, "patient": np.array([0, 0, 1, 2])}
    d = task.stat_fn(out)(np.arange(3))
    assert d["age_mae"] == pytest.approx((1 + 4 + 5) / 3)
    assert d["sex_auroc"] == pytest.approx(1.0)
    assert d["race_auroc"] == pytest.approx(1.0)


def test_fraction_subsets_are_nested_and_inside_train():
    from ctssl_core.data.splits import make_splits

    keys = [f"p{i:03d}" for i in range(200)]
    split = make_splits(keys, seed=3)
    tr = np.array([i for i, k in enumerate(keys) if split[k] == "train"])
    others = {i for i, k in enumerate(keys) if split[k] != "train"}
    for seed in (0, 1):
        subsets = [set(fraction_subset(tr, f, seed).tolist()) for f in (0.01, 0.05, 0.25, 1.0)]
        for small, big in zip(subsets, subsets[1:]):
            assert small < big
        assert subsets[-1] == set(tr.tolist())
        assert not (subsets[-1] & others)
        assert len(subsets[1]) == int(np.ceil(0.05 * len(tr)))
    assert fraction_subset(tr, 0.05, 0) .tolist() != fraction_subset(tr, 0.05, 1).tolist()
    assert fraction_subset(tr, 0.25, 0).tolist() == fraction_subset(tr, 0.25, 0).tolist()
    assert len(fraction_subset(tr, 0.001, 0)) == 1
    with pytest.raises(ConfigError, match="no patients"):
        fraction_subset(np.array([], int), 0.5, 0)


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="fraction"):
        FinetuneConfig(fraction=0.0)
    with pytest.raises(ConfigError, match="unknown downstream task"):
        FinetuneConfig(task="liver")
    with pytest.raises(ConfigError, match="unknown downstream task"):
        make_downstream("liver")
    with pytest.raises(ConfigError, match="unknown config key"):
        make_downstream("pe", pos_wieght=3.0)


def test_nodule_crops_follow_the_mask_and_scoring_sees_whole_slices():
    task = make_downstream("nodule", crop=16, focus=1.0, hflip=False)
    raw = _raw(H=48)
    raw["x"][0] = raw["nodule"][0]                     # image == mask on sample 0 (the one with a nodule)
    b = task.make_batch(raw, torch.Generator().manual_seed(0))
    assert b.inputs.shape == (4, 1, 16, 16) and b.targets.shape == (4, 1, 16, 16)
    assert b.targets[0].sum().item() == 16             # the whole 4x4 nodule is inside the focused crop
    torch.testing.assert_close(b.inputs[0], b.targets[0])
    assert task.eval_batch(raw).inputs.shape == (4, 1, 48, 48)
    with pytest.raises(ConfigError, match="multiple of 16"):
        make_downstream("nodule", crop=20)
    with pytest.raises(ConfigError, match="focus"):
        make_downstream("nodule", crop=16, focus=2.0)


def test_pe_roi_is_the_central_square_in_training_and_scoring():
    task = make_downstream("pe", roi=16, hflip=False)
    raw = _raw(H=32)
    b = task.make_batch(raw, torch.Generator().manual_seed(0))
    torch.testing.assert_close(b.inputs, raw["x"][..., 8:24, 8:24])
    torch.testing.assert_close(task.eval_batch(raw).inputs, raw["x"][..., 8:24, 8:24])
    with pytest.raises(ConfigError, match="roi"):
        make_downstream("pe", roi=-1)


@pytest.mark.parametrize("pool", ["max", "avgmax"])
def test_pe_pooling_reads_the_deepest_map(pool):
    from ctssl_core import ops
    from ctssl_core.models import build_encoder

    torch.manual_seed(0)
    enc, task = build_encoder("tiny"), make_downstream("pe", pool=pool, hflip=False)
    head = task.build_head(enc)
    b = task.eval_batch(_raw(H=32))
    z = ops.global_pool(enc.forward_features(b.inputs)[-1], pool)
    torch.testing.assert_close(task.forward(enc, head, b), head(z).squeeze(1))
    assert head.embed_dim == enc.embed_dim * (2 if pool == "avgmax" else 1)
    with pytest.raises(ConfigError, match="pool"):
        make_downstream("pe", pool="median")


def test_quick_profile_pe_roi_holds_every_planted_embolus():
    """The quick profile scores PE on the central `roi` px: every defect pixel of its cohort must lie
    inside, or the ROI would hide positives (checked on the sampled geometry, no rendering)."""
    import math

    from ctssl_core.config import build, load_profile
    from ctssl_core.data import synth
    from ctssl_core.data.phantom import vessel_at

    prof = load_profile("quick")
    cfg = build(synth.SynthConfig, prof["synth"])
    roi = prof["downstream"]["pe"]["task_params"]["roi"]
    assert prof["ingest"]["size"] == cfg.image_size            # stored at the rendered size
    reach, n = 0.0, 0
    for i in range(cfg.n_patients):
        p = synth.sample_patient(cfg, i)
        c = (p.image_size - 1) / 2
        for d in p.pe_defects:
            for t in synth.slice_t(p):
                v = vessel_at(p, d["vessel"], float(t)) if d["t0"] <= t <= d["t1"] else None
                if v is None:
                    continue
                col = (v[0] + p.body_offset_mm[0]) / p.pixel_spacing_mm + c
                row = (v[1] + p.body_offset_mm[1]) / p.pixel_spacing_mm + c
                r = max(d["radius_mm"], v[2]) / p.pixel_spacing_mm    # the whole vessel, not just the clot
                reach = max(reach, max(abs(col - c), abs(row - c)) + r)
                n += 1
    assert n > 100
    assert reach < roi / 2, f"a defect reaches {reach:.1f} px from the centre; the ROI half-width is {roi / 2}"
    assert math.isfinite(reach)


def test_finetune_refuses_a_training_crop():
    from ctssl_core.finetune import finetune

    with pytest.raises(ConfigError, match="pretraining"):
        finetune(FinetuneConfig(task="pe", train={"crop": 16}), "/nonexistent-store")


def test_position_scores_learn_the_pe_rate_per_level_from_training_slices():
    from sklearn.metrics import roc_auc_score

    from ctssl_core.data.store import SliceStore
    from ctssl_core.finetune import position_scores

    # 6 series x 10 slices; PE only on slices 4-5 (the "artery level") of the positive series
    pe = [np.isin(np.arange(10), [4, 5]).astype(float) * (s % 2) for s in range(6)]
    store = SliceStore.from_arrays([np.zeros((10, 4, 4), np.int16)] * 6, pe=pe)
    train, test = np.arange(0, 40), np.arange(40, 60)
    sc = position_scores(store, train, test)
    y = np.concatenate(pe)[test]
    # level separates PE from every other level; the negative exam's slices 4-5 tie with the positives
    assert roc_auc_score(y, sc) == pytest.approx((16 + 2 * 0.5) / 18)
    assert sc[4] == pytest.approx((2 + 0.5) / (4 + 1))      # decile of slice 4: 2 PE of 4 training slices
    assert sc[0] == pytest.approx(0.5 / 5)                   # smoothed, never exactly 0
    # both exams of the test set get the same scores: exam-level ranking is impossible
    assert np.array_equal(sc[:10], sc[10:])


def _nodule_out():
    """Two patients: exam 0 (patient 0) with two nodules, one found at 0.9 and a 0.7 FP; exam 1 (patient 1)
    without a nodule and a 0.8 FP. Slices are given out of z order, as a loader may return them."""
    H = 8
    prob, tgt = np.zeros((7, H, H), np.float16), np.zeros((7, H, H), bool)
    tgt[0:2, 1:3, 1:3] = True                       # exam 0 nodule 1 (z 0-1)
    tgt[3, 5:7, 5:7] = True                         # exam 0 nodule 2 (z 3): missed
    prob[0:2, 1:3, 1:3] = 0.9                       # found, predicted exactly
    prob[2, 6, 0] = 0.7                             # FP
    prob[5, 0, 0] = 0.8                             # exam 1 FP
    order = np.array([0, 1, 2, 3, 0, 1, 2])
    perm = np.array([3, 0, 6, 2, 4, 1, 5])          # shuffled rows
    return {"prob": prob[perm], "target": tgt[perm], "order": order[perm],
            "exam": np.array([0, 0, 0, 0, 1, 1, 1])[perm], "patient": np.array([0, 0, 0, 0, 1, 1, 1])[perm]}


def test_nodule_lesion_metrics_froc_cpm_and_exam_dice():
    out = _nodule_out()
    task = make_downstream("nodule")
    assert task.headline == "cpm" and {"cpm", "lesion_sens_at_1fp", "exam_dice", "dice"} <= set(task.metric_fns())
    stat = task.stat_fn(out)
    m = stat(np.arange(2))
    # points: t=0.9 (0 FP, 1/2); t=0.8 (1/2 FP/scan, 1/2); t=0.7 (1 FP/scan, 1/2): sensitivity 1/2 everywhere
    assert m["cpm"] == pytest.approx(0.5) and m["lesion_sens_at_1fp"] == pytest.approx(0.5)
    # exam 0 volume: 8 + 1 (the 0.7 FP) predicted voxels, 8 + 4 true, 8 shared -> 16 / 21; exam 1 has no
    # nodule: left out (its FP counts in the FROC)
    assert m["exam_dice"] == pytest.approx(16 / 21)
    # patient 0 alone: one FP per scan from t=0.7; sensitivity 1/2 from t=0.9 on
    alone = stat(np.array([0, 0]))
    assert alone["cpm"] == pytest.approx(0.5) and alone["exam_dice"] == pytest.approx(16 / 21)
    nothing = stat(np.array([1, 1]))                # no nodule drawn: lesion metrics undefined, not 0
    assert np.isnan(nothing["cpm"]) and np.isnan(nothing["exam_dice"])
    # the vectorised bootstrap agrees with the per-draw statistic
    draws = np.array([[0, 1], [1, 1], [0, 0], [1, 0]])
    counts = np.stack([np.bincount(d, minlength=2) for d in draws]).astype(float)
    got = stat.batch(counts)
    for i, d in enumerate(draws):
        one = stat(d)
        for k, v in one.items():
            assert (np.isnan(v) and np.isnan(got[k][i])) or got[k][i] == pytest.approx(v), (k, d)


def test_nodule_cand_threshold_is_validated_and_moves_the_candidates():
    with pytest.raises(ConfigError, match="cand_threshold"):
        make_downstream("nodule", cand_threshold=0.0)
    out = _nodule_out()
    # above every score: no candidate at all -> sensitivity 0 (lesions exist), not nan
    assert make_downstream("nodule", cand_threshold=0.95).stat_fn(out)(np.arange(2))["cpm"] == 0.0


def test_nodule_scores_what_collect_outputs_produces():
    """Real pipeline: a store (``SliceStore.from_arrays``), an untrained tiny model, ``collect_outputs``,
    ``score_outputs``: the CPM equals the FROC of the exams' probability volumes rebuilt in z order."""
    from ctssl_core.data.store import SliceStore
    from ctssl_core.scoring import collect_outputs, point_metrics, score_outputs
    from ctssl_core.models import build_encoder

    rng = np.random.default_rng(0)
    imgs, masks = [], []
    for s in range(4):
        m = np.zeros((5, 32, 32), np.uint8)
        if s < 3:
            m[1:3, 8 + 4 * s:12 + 4 * s, 10:14] = 1
        imgs.append((rng.normal(0, 50, (5, 32, 32)) + 400.0 * m).astype(np.int16))
        masks.append(m)
    store = SliceStore.from_arrays(imgs, masks=masks)
    task = make_downstream("nodule", prior=0.0, hflip=False)   # p ~ 0.5: many candidates, not all-empty
    torch.manual_seed(0)
    enc = build_encoder("tiny")
    head = task.build_head(enc)
    out = collect_outputs(task, enc, head, store, np.arange(store.n_slices), 8, torch.device("cpu"))
    assert out["prob"].dtype == np.float16 and out["prob"].shape == (20, 32, 32)
    exams = []
    for s in range(4):
        rows = np.flatnonzero(out["exam"] == s)
        rows = rows[np.argsort(out["order"][rows])]
        assert np.array_equal(out["target"][rows], masks[s].astype(bool))
        exams.append(ev.exam_detections(out["prob"][rows], masks[s], task.cand_threshold))
    m = point_metrics(task, out)
    sens = ev.froc_batch(exams, np.ones((1, 4)))[0]
    # p ~ 0.54 everywhere: one blob per exam, a hit on each nodule exam, a false positive on the empty one
    assert [e.n_lesions for e in exams] == [1, 1, 1, 0] and [e.fp_scores.size for e in exams] == [0, 0, 0, 1]
    assert m["cpm"] == pytest.approx(sens.mean()) and m["lesion_sens_at_1fp"] == pytest.approx(sens[3])
    cis, reps = score_outputs(task, out, n_boot=30)
    for k in ("cpm", "lesion_sens_at_1fp", "exam_dice", "dice"):
        assert cis[k].value == pytest.approx(m[k]) and reps[k].shape == (30,)
        assert cis[k].n_boot > 0 and cis[k].low <= cis[k].high


def test_pe_position_baseline_scores_half_on_the_stratified_slice_auroc():
    """The real position baseline (``finetune.position_scores`` on a store) ranks slices by level: high plain
    slice AUROC, exactly 0.5 once pairs are compared within a z-decile only. Outputs without the slice order
    are refused with a message saying where it comes from."""
    from ctssl_core.data.store import SliceStore
    from ctssl_core.finetune import position_scores
    from ctssl_core.scoring import point_metrics, row_keys, score_outputs

    rng = np.random.default_rng(5)
    pe = [((np.arange(20) >= 8) & (np.arange(20) <= 11) & (rng.random(20) < 0.7)).astype(float) * (s % 2)
          for s in range(16)]
    store = SliceStore.from_arrays([np.zeros((20, 4, 4), np.int16)] * 16, pe=pe)
    train, test = np.arange(0, 160), np.arange(160, 320)
    out = {"slice_id": test, "prob": position_scores(store, train, test), "target": np.concatenate(pe)[test],
           **row_keys(store, test)}
    m = point_metrics(make_downstream("pe"), out)
    assert m["slice_auroc"] > 0.75
    assert m["slice_auroc_zstrat"] == pytest.approx(0.5)
    cis, reps = score_outputs(make_downstream("pe"), out, n_boot=20)
    assert cis["slice_auroc_zstrat"].n_boot > 0 and np.allclose(reps["slice_auroc_zstrat"][~np.isnan(reps["slice_auroc_zstrat"])], 0.5)
    del out["order"]
    with pytest.raises(ValueError, match="row_keys"):
        make_downstream("pe").stat_fn(out)
