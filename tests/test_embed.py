"""Embeddings and projections: extraction, pooling, sampling, store round trip, CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ctssl_core import embed
from ctssl_core.embed import EmbedConfig, EmbedError

torch.set_num_threads(1)


class _MeanEncoder(torch.nn.Module):
    """Deterministic stand-in encoder: embed = (mean, max) of the windowed slice."""

    windows = ((50.0, 350.0),)                            # the encoder contract: the view it was trained on

    def embed(self, x):                                   # (B, 1, H, W) -> (B, 2)
        return torch.stack([x.mean((1, 2, 3)), x.amax((1, 2, 3))], 1)


def test_embed_array_windows_batches_and_is_batch_invariant():
    vol = np.stack([np.full((8, 8), v, np.int16) for v in (-1000, -125, 50, 225, 1000)])   # (5, 8, 8)
    read = lambda ids: vol[ids]                           # noqa: E731
    E = embed.embed_array(_MeanEncoder(), read, np.arange(5), batch_size=2)
    assert E.dtype == np.float32 and E.shape == (5, 2)
    np.testing.assert_allclose(E[:, 0], [0, 0, 0.5, 1, 1], atol=1e-6)       # soft-tissue window -125..225
    np.testing.assert_array_equal(E, embed.embed_array(_MeanEncoder(), read, np.arange(5), batch_size=5))
    with pytest.raises(EmbedError, match="no slices"):
        embed.embed_array(_MeanEncoder(), read, np.arange(0))


def test_embed_array_with_registry_encoder():
    from ctssl_core.models import build_encoder

    torch.manual_seed(0)
    enc = build_encoder("tiny")
    vol = np.random.default_rng(0).integers(-1000, 1000, (6, 32, 32)).astype(np.int16)
    E = embed.embed_array(enc, lambda ids: vol[ids], np.arange(6), batch_size=4)
    assert E.shape == (6, enc.embed_dim) and np.isfinite(E).all()


def test_exam_table_pools_by_series():
    E = np.array([[1.0, 2], [3, 4], [10, 10]], np.float32)
    keys = pd.DataFrame({"slice_id": [0, 1, 2], "series_key": ["s1", "s1", "s2"], "patient_key": ["p1", "p1", "p2"],
                         "idx": [0, 1, 0], "pe": [1.0, 0.0, 0.0], "pe_exam": [1.0, 1.0, 0.0], "sex": ["F", "F", "M"]})
    V, K = embed.exam_table(E, keys)
    np.testing.assert_allclose(V, [[2, 3], [10, 10]])
    assert list(K["series_key"]) == ["s1", "s2"] and list(K["n_slices"]) == [2, 1]
    assert list(K["pe"]) == [1.0, 0.0] and list(K["sex"]) == ["F", "M"]


def test_stratified_sample_keeps_group_shares():
    keys = pd.DataFrame({"sex": ["F"] * 700 + ["M"] * 300, "race": (["A", "B"] * 500)})
    idx = embed.stratified_sample(keys, 100, seed=0)
    assert len(idx) == 100 and len(np.unique(idx)) == 100 and np.all(np.diff(idx) > 0)
    sub = keys.iloc[idx]
    assert (sub["sex"] == "F").sum() == 70 and (sub["race"] == "A").sum() == 50
    np.testing.assert_array_equal(embed.stratified_sample(keys, 5000), np.arange(1000))


def test_hu_features_see_tissues():
    hu = np.full((2, 16, 16), -1000, np.int16)
    hu[:, 4:12, 2:14] = -100                             # fat block, 12 px wide
    hu[1, 6:8, 6:8] = 300                                # cancellous bone
    f = embed.hu_features(hu)
    assert f.shape == (2, 6)
    assert f[0, 1] == pytest.approx(-100) and f[1, 2] == pytest.approx(300)
    assert f[0, 5] == pytest.approx(12 / 16)


def _save(store, emb_id="e1", n=60, level="slice", init="random"):
    rng = np.random.default_rng(0)
    E = rng.normal(size=(n, 8)).astype(np.float32)
    keys = pd.DataFrame({"slice_id": np.arange(n), "series_key": [f"s{i // 3}" for i in range(n)],
                         "patient_key": [f"p{i // 3}" for i in range(n)], "idx": np.arange(n) % 3,
                         "sex": rng.choice(["F", "M"], n), "race": rng.choice(["A", "B"], n), "age": rng.uniform(30, 80, n)})
    embed.save_embeddings(store, emb_id, E, keys, run_id=None, init=init, encoder="tiny", split="test", level=level)
    return E, keys


def test_embeddings_and_projections_round_trip(tmp_path):
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths

    E, keys = _save(tmp_path)
    E2, K2, row = embed.load_embeddings(tmp_path, "e1")
    np.testing.assert_array_equal(E, E2)
    pd.testing.assert_frame_equal(keys, K2)
    assert row["n"] == 60 and row["dim"] == 8 and row["level"] == "slice" and row["init"] == "random"
    rows = embed.compute_projections(tmp_path, "e1", EmbedConfig(umap=False, max_points=40))
    assert [r["method"] for r in rows] == ["pca"] and rows[0]["sampled"] and rows[0]["n_points"] == 40
    pts = embed.load_projection(tmp_path, "e1", "pca")
    assert len(pts) == 40 and {"x", "y", "sex", "patient_key"} <= set(pts.columns)
    # stored points are the PCA of the full fit, for the sampled rows
    from sklearn.decomposition import PCA

    ref = PCA(2, random_state=0).fit(E).transform(E[pts["row"].to_numpy()])
    np.testing.assert_allclose(np.abs(pts[["x", "y"]].to_numpy()), np.abs(ref), atol=1e-4)
    with connect(store_paths(tmp_path).db, read_only=True) as con:
        params = json.loads(con.execute("SELECT params FROM projections WHERE emb_id = 'e1'").fetchone()[0])
    assert "stratified" in params["sample"] and len(params["explained_variance_ratio"]) == 2
    # re-saving replaces the row and drops stale projections
    _save(tmp_path)
    with connect(store_paths(tmp_path).db, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 1
        assert con.execute("SELECT count(*) FROM projections").fetchone()[0] == 0


def test_missing_embeddings_say_what_to_do(tmp_path):
    _save(tmp_path)
    with pytest.raises(EmbedError, match="ctssl embed"):
        embed.load_embeddings(tmp_path, "nope")
    with pytest.raises(EmbedError, match="no umap projection"):
        embed.load_projection(tmp_path, "e1", "umap")
    with pytest.raises(EmbedError, match="differ"):
        embed.save_embeddings(tmp_path, "bad", np.zeros((3, 2), np.float32), pd.DataFrame({"a": [1]}), run_id=None,
                              init="random", encoder="tiny", split="test", level="slice")


def test_analyse_encoder_writes_bias_results_keyed_by_reference(tmp_path):
    from ctssl_core.bias import BiasConfig, analyse_encoder
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths

    _save(tmp_path, "rand", init="random")
    E, keys = _save(tmp_path, "enc", init="rotation")
    cfg = BiasConfig(n_boot=50, n_perm=50, probe_perm=5, n_modes=2, min_group=3)
    scores = pd.DataFrame({"patient_key": keys["patient_key"], "score": np.linspace(0, 1, 60), "label": np.arange(60) % 2})
    df = analyse_encoder(tmp_path, "enc", None, cfg, pe_scores=scores)       # reference found: the random one
    assert set(df["reference_emb_id"]) == {"rand"}
    df2 = analyse_encoder(tmp_path, "enc", "rand", cfg)                       # rerun replaces, never duplicates
    with connect(store_paths(tmp_path).db, read_only=True) as con:
        got = con.execute("SELECT analysis, count(*) FROM bias_results WHERE emb_id = 'enc' GROUP BY 1").fetchall()
    got = dict(got)
    assert got["probe"] == (df2["analysis"] == "probe").sum() and got["subgroup"] > 0 and got["subgroup_resampled"] > 0
    sex = df2[(df2.analysis == "probe") & (df2.attribute == "sex")].iloc[0]
    assert np.isfinite(sex["delta"]) and sex["sentence"].startswith("Sex ")


def test_run_embed_and_cli_end_to_end(store_copy, capsys):
    from ctssl_core.cli import main
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths

    rc = main(["embed", "--checkpoint", "random", "--encoder", "tiny", "--split", "all", "--store", str(store_copy),
               "--no-umap", "--set", "batch_size=16"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "exam embeddings: random-tiny-s0-all-exam" in out
    E, keys, row = embed.load_embeddings(store_copy, "random-tiny-s0-all-slice")
    with connect(store_paths(store_copy).db, read_only=True) as con:
        n_slices = con.execute("SELECT count(*) FROM slices").fetchone()[0]
        n_series = con.execute("SELECT count(*) FROM series").fetchone()[0]
    assert E.shape[0] == n_slices == len(keys) and row["encoder"] == "tiny"
    assert {"patient_key", "series_key", "slice_id", "age", "sex", "race", "control_group", "site", "pe"} <= set(keys.columns)
    assert not {c for c in keys.columns if "patientid" in c.lower().replace("_", "") or "name" in c.lower()}
    assert keys["sex"].notna().all() and keys["control_group"].notna().all()
    Ex, kx, _ = embed.load_embeddings(store_copy, "random-tiny-s0-all-exam")
    assert len(Ex) == n_series
    # bias on a missing embedding: clear message, exit 2, no traceback
    assert main(["bias", "--emb", "nope", "--store", str(store_copy)]) == 2
    assert "ctssl embed" in capsys.readouterr().err


def test_even_per_series_keeps_k_spread_slices():
    keys = pd.DataFrame({"slice_id": np.arange(13), "series_key": ["a"] * 10 + ["b"] * 3, "idx": list(range(10)) + [0, 1, 2]})
    sub = embed.even_per_series(keys, 4)
    assert list(sub.loc[sub.series_key == "a", "idx"]) == [0, 3, 6, 9]
    assert list(sub.loc[sub.series_key == "b", "idx"]) == [0, 1, 2]
    assert embed.even_per_series(keys, 0) is keys


@pytest.mark.parametrize("bad", [dict(split="holdout"), dict(batch_size=0), dict(windows=[[50, 0]]),
                                 dict(windows="nope")])
def test_embed_config_rejects_bad_values(bad):
    from ctssl_core.config import ConfigError, build

    with pytest.raises(ConfigError, match="embed\\."):
        build(EmbedConfig, bad)


def test_umap_too_few_points_is_a_clear_error():
    with pytest.raises(EmbedError, match="at least 5 points"):
        embed.project_umap(np.zeros((3, 8), np.float32))


def test_random_init_is_the_architecture_and_view_of_the_benchmarks_encoders(store_copy, capsys):
    """A smoke benchmark whose encoders are built with options (pretrain.encoder_params: width 0.5): the random
    init it embeds (and the dose-response re-embeds) with is the same architecture, with the same windows, as
    a strategy encoder that benchmark pretrains, not the registry default; and a bad option says so."""
    import torch

    from ctssl_core.plan import embed_config, make_plan
    from ctssl_core.config import ConfigError
    from ctssl_core.cli import main
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths

    params = "pretrain.encoder_params={width: 0.5}"
    plan = make_plan("smoke", overrides=[params])
    ecfg = embed_config(plan.config, plan.bench)
    assert ecfg.encoder_kwargs == {"width": 0.5} and ecfg.windows == plan.config["pretrain"]["windows"]
    assert main(["pretrain", "--store", str(store_copy), "--profile", "smoke", "--no-progress", "--task", "rotation",
                 "--set", params, "--set", "train.image_size=32", "--set", "train.batch_size=8",
                 "--set", "train.steps=2"]) == 0
    capsys.readouterr()
    with connect(store_paths(store_copy).db, read_only=True) as con:
        (rid,) = con.execute("SELECT run_id FROM runs WHERE kind = 'pretrain'").fetchone()
    pre, *_ = embed.resolve_encoder(rid, store_copy, ecfg)
    rnd, init, name, run_id, tag = embed.resolve_encoder("random", store_copy, ecfg)
    assert (init, name, run_id) == ("random", "tiny", None)
    assert {k: v.shape for k, v in rnd.state_dict().items()} == {k: v.shape for k, v in pre.state_dict().items()}
    assert rnd.windows == pre.windows and rnd.kwargs == pre.kwargs and rnd.embed_dim == pre.embed_dim
    x = torch.zeros(2, len(rnd.windows), 32, 32)
    assert rnd.embed(x).shape == pre.embed(x).shape
    # another architecture, another embedding id: the default random init's embeddings are not overwritten
    default = embed.resolve_encoder("random", store_copy, EmbedConfig(encoder="tiny", windows=ecfg.windows))
    assert default[4] == "random-tiny-s0" and tag.startswith("random-tiny-k") and tag.endswith("-s0")
    with pytest.raises(ConfigError, match="unknown option.*'depth'"):
        embed.resolve_encoder("random", store_copy, EmbedConfig(encoder="tiny", encoder_kwargs={"depth": 3}))
    with pytest.raises(EmbedError, match="set embed.windows"):
        embed.resolve_encoder("random", store_copy, EmbedConfig(encoder="tiny", encoder_kwargs={"windows": "paper"}))


def test_an_embedding_unit_records_its_rows_in_its_run_folder_only(store_copy, monkeypatch):
    """A benchmark's embedding unit (``record_run``) only reads the store: its embeddings and projections rows
    go to its run folder, and the merge puts them in the store as ``ctssl embed`` writes them directly."""
    import ctssl_core.db as db
    from ctssl_core.data.splits import get_or_create_splits
    from ctssl_core.results import runfolder as rf
    from ctssl_core.results import write as W

    cfg = EmbedConfig(split="all", encoder="tiny", umap=False, max_points=40)
    get_or_create_splits(store_copy, cfg.split_seed, cfg.split_fractions, pool=cfg.pool)   # the driver's part
    rf.record_start(store_copy, "embed-unit-1", "embed", "embed", "random", "tiny", {})
    real = db.connect

    def read_only(path, read_only=False, **k):
        assert read_only, "an embedding unit opened the store to write"
        return real(path, read_only=True, **k)

    monkeypatch.setattr(db, "connect", read_only)
    for mod in ("ctssl_core.results.store_api", "ctssl_core.data.catalog", "ctssl_core.data.store",
                "ctssl_core.data.splits"):
        if hasattr(__import__(mod, fromlist=["x"]), "connect"):
            monkeypatch.setattr(f"{mod}.connect", read_only)
    ids = embed.run_embed(store_copy, "random", cfg, record_run="embed-unit-1")
    rf.record_end(store_copy, "embed-unit-1", "succeeded")
    monkeypatch.undo()
    assert [r["emb_id"] for r in rf.read_rows(store_copy, "embed-unit-1", "embeddings")] == [ids["slice"], ids["exam"]]
    assert {(r["emb_id"], r["method"]) for r in rf.read_rows(store_copy, "embed-unit-1", "projections")} == {
        (ids["slice"], "pca"), (ids["exam"], "pca")}
    with pytest.raises(embed.EmbedError, match="no embeddings"):
        embed.load_embeddings(store_copy, ids["slice"])                  # not in the store before the merge
    W.merge_pending(store_copy)
    E, keys, row = embed.load_embeddings(store_copy, ids["slice"])
    assert row["emb_id"] == ids["slice"] and len(E) == len(keys) == row["n"]
    assert len(embed.load_projection(store_copy, ids["exam"], "pca")) > 0
