"""Every dashboard page under Streamlit's AppTest: content on a seeded store, messages on bad stores."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from ctssl_core.db import connect
from ctssl_core.paths import REPO_ROOT
from ctssl_core.results import read
from ctssl_core.results.seed import SPIKE_VALUE, SeedConfig, seed_old_schema_store, seed_store
from ctssl_core.schema import ensure_schema

PAGES = ["overview", "compare", "curves", "embeddings", "data"]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    return seed_store(tmp_path_factory.mktemp("pages"), SeedConfig(n_runs=14, n_steps=6000))


def open_page(store, page: str) -> AppTest:
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=60)
    at.session_state["ctssl_store"] = str(store)
    at.run()
    if page != "overview":
        at.switch_page(f"pages/{page}.py")
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _decode(v):
    """Plotly 6 ships numeric arrays as {"dtype", "bdata"(base64)}: turn them back into lists."""
    if isinstance(v, dict):
        if "bdata" in v and "dtype" in v:
            a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
            return a.reshape([int(n) for n in str(v["shape"]).split(",")]).tolist() if "shape" in v else a.tolist()
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def specs(at) -> list[dict]:
    """The plotly figures on the page, as the browser receives them."""
    return [_decode(json.loads(c.proto.spec)) for c in at.get("plotly_chart")]


def _same(shown: pd.DataFrame, want: pd.DataFrame) -> bool:
    return (list(shown.index) == list(want.index) and list(shown.columns) == list(want.columns)
            and (shown.to_numpy() == want.to_numpy()).all())


def texts(at) -> str:
    parts = [e.value for kind in ("markdown", "info", "warning", "error", "caption", "title", "subheader",
                                  "success") for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def test_a_page_batch_opens_the_store_once_and_is_cached_by_its_path(seeded, monkeypatch):
    """query_many's loader: one read.snapshot per batch, and a cache keyed by the store path string (a
    Snapshot lives for one batch only, so keying by it would never hit and would pin a closed connection)."""
    from pages.common import _load_many

    opened, real = [], read.connect
    monkeypatch.setattr(read, "connect", lambda db, *a, **kw: opened.append(str(db)) or real(db, *a, **kw))
    calls = ((read.store_info,), (read.run_table,), (read.derived, "speed_ratio"), (read.embeddings,))
    key = tuple((fn.__qualname__, *args) for fn, *args in calls)
    _load_many.clear()
    v = read.store_version(seeded.root)
    first = _load_many(str(seeded.root), v, key, calls)
    again = _load_many(str(seeded.root), v, key, calls)
    assert opened == [str(seeded.root / "ctssl.duckdb")]      # four queries, one connection; then a cache hit
    assert first[0].root == seeded.root and not isinstance(first[0].root, read.Snapshot)
    for got, want in zip(first[1:], (read.run_table(seeded.root), read.derived(seeded.root, "speed_ratio"),
                                     read.embeddings(seeded.root))):
        pd.testing.assert_frame_equal(got, want)
    for a, b in zip(first[1:], again[1:]):
        pd.testing.assert_frame_equal(a, b)
    _load_many.clear()


def test_overview_table_verdicts_and_dataset(seeded):
    at = open_page(seeded.root, "overview")
    df = at.dataframe[0].value
    table = read.headline_table(seeded.root)
    wide, best = read.pivot_headline(table)
    assert df.index[0] == "random" and list(df.index) == list(wide.index)
    assert df.loc["masked_region", "pe · slice_auroc"] == wide.loc["masked_region", "pe · slice_auroc"]
    assert best["pe · slice_auroc"] == "masked_region"
    t = texts(at)
    assert "dataset **synthetic**" in t and "bench-seed" in t
    for line in read.verdicts(table):
        assert line in t


def test_compare_curves_bars_speed_and_pairwise(seeded):
    at = open_page(seeded.root, "compare")
    s = specs(at)
    curves = read.fraction_curves(seeded.root, "pe", "slice_auroc")
    lines = {d["name"]: d for d in s[0]["data"] if d.get("mode") == "lines+markers"}
    assert set(lines) == set(curves.init)
    assert np.allclose(lines["masked_region"]["y"], curves[curves.init == "masked_region"].value)
    speed = [x for x in s if "speed ratio" in x["layout"]["title"]["text"]]
    assert speed and max(speed[0]["data"][0]["y"]) == pytest.approx(read.derived(seeded.root, "speed_ratio").value.max())
    pair = [x for x in s if "−" in x["layout"]["title"]["text"]]
    diff = read.pairwise(seeded.root, "pe", "slice_auroc", "denoise", "random")
    assert np.allclose(pair[0]["data"][0]["y"], diff["diff"])  # default A = first non-random init (denoise)
    at.selectbox(key="cmp_task_metric").select("nodule · dice").run()
    assert not at.exception
    assert specs(at)[0]["layout"]["title"]["text"] == "nodule: dice vs label fraction"
    at.selectbox(key="cmp_a").select("random").run()
    assert "Pick two different strategies." in texts(at)


def test_learning_curves_downsampled_with_spike_and_controls(seeded):
    at = open_page(seeded.root, "curves")
    assert "Still running" in texts(at)  # newest run is the running one and is selected by default
    at.multiselect(key="lc_runs").set_value([seeded.spike_run, seeded.run_ids[1]]).run()
    at.multiselect(key="lc_metrics").set_value(["train/loss"]).run()
    fig = specs(at)[0]
    traces = {d["legendgroup"]: d for d in fig["data"]}
    spike = traces[seeded.spike_run]
    assert max(len(d["x"]) for d in fig["data"]) <= 4000 < 6000
    assert max(spike["y"]) == SPIKE_VALUE and spike["x"][int(np.argmax(spike["y"]))] == seeded.spike_step
    assert "Checkpoint file missing" in texts(at) and seeded.run_ids[1] in texts(at)
    at.radio(key="lc_x").set_value("epoch").run()
    assert specs(at)[0]["layout"]["xaxis"]["title"]["text"] == "epoch"
    assert max(specs(at)[0]["data"][0]["x"]) <= 6000 / (6000 / 10)  # epochs, not steps
    at.checkbox(key="lc_log").check().run()
    assert specs(at)[0]["layout"]["yaxis"]["type"] == "log"
    at.multiselect(key="lc_init").set_value(["random"]).run()
    at.multiselect(key="lc_fraction").set_value([0.1]).run()
    assert set(at.multiselect(key="lc_runs").options) == set(
        read.run_table(seeded.root).query("init == 'random' and fraction == 0.1").run_id)


def test_learning_curves_one_panel_per_metric_colour_per_run_and_config_diff(smoke_store):
    """Issue 14 item 4: metrics no longer share one y axis labelled 'value'; colour follows the run."""
    runs = read.run_table(smoke_store)
    ft = runs[(runs.kind == "finetune") & (runs.task == "pe")].run_id.tolist()[:2]
    at = open_page(smoke_store, "curves")
    at.multiselect(key="lc_runs").set_value(ft).run()
    names = read.metric_names(smoke_store, ft)
    two = [n for n in names if "loss" in n][:1] + [n for n in names if "loss" not in n][:1]
    at.multiselect(key="lc_metrics").set_value(two).run()
    assert not at.exception
    fig = specs(at)[0]
    lay = fig["layout"]
    assert lay["yaxis"]["title"]["text"] == sorted(two)[0] and lay["yaxis2"]["title"]["text"] == sorted(two)[1]
    assert lay["xaxis2"]["matches"] == "x"
    colour = {}
    for d in fig["data"]:
        colour.setdefault(d["legendgroup"], set()).add(d["line"]["color"])
    assert set(colour) == set(ft) and all(len(c) == 1 for c in colour.values())      # one colour per run...
    assert len({next(iter(c)) for c in colour.values()}) == 2                          # ...different runs differ
    assert sum(d["showlegend"] for d in fig["data"]) == 2                              # each run once in the legend
    want = read.curves(smoke_store, ft, two, "step", 4000)
    for d in fig["data"]:
        name = sorted(two)[0 if d["yaxis"] == "y" else 1]
        w = want[(want.run_id == d["legendgroup"]) & (want.name == name)]
        assert np.allclose(d["y"], w.y)
    cfg = at.dataframe[-1].value if at.dataframe else None
    diff = read.run_configs(smoke_store, ft)
    assert cfg is not None and list(cfg.index) == diff[diff.differs].setting.tolist() and len(cfg)
    assert "store" not in " ".join(diff.setting)
    for setting, row in cfg.iterrows():
        assert row[ft[0]] != row[ft[1]]
    at.toggle(key="lc_cfg_diff").set_value(False).run()
    assert len(at.dataframe[-1].value) == len(diff) > len(cfg)


def test_embeddings_page_on_real_smoke_store(smoke_store):
    """Issue 14: the page read every benchmark-built store as an error (KeyError: 'row')."""
    at = open_page(smoke_store, "embeddings")
    assert not at.error, [e.value for e in at.error]
    emb = read.embeddings(smoke_store)
    shown = at.selectbox(key="emb_id").value
    keys = pd.read_parquet(smoke_store / emb.set_index("emb_id").loc[shown, "keys_path"])
    scatters = [x for x in specs(at) if x["layout"]["title"]["text"].startswith(("UMAP", "PCA"))]
    assert len(scatters) == 2 and "random init" in scatters[1]["layout"]["title"]["text"]
    assert {d["name"] for d in scatters[0]["data"]} == set(keys.race.dropna().astype(str))
    for eid in emb[emb.init != "random"].emb_id:  # every pretrained init's view (and its random-init pair) reads
        at.selectbox(key="emb_id").set_value(eid).run()
        assert not at.exception and not at.error, (eid, [e.value for e in at.error])
        assert len([x for x in specs(at) if x["layout"]["title"]["text"].startswith(("UMAP", "PCA"))]) == 2


def test_overview_and_compare_pick_one_of_two_benchmarks(two_benchmark_store):
    """Issue 14: two benchmarks in one store crashed the Overview (duplicate pivot entries)."""
    store = two_benchmark_store
    bench = read.benchmarks(store)
    latest = read.latest_finished(bench)
    other = next(b for b in bench.benchmark_id if b != latest)
    at = open_page(store, "overview")
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="benchmark_id").value == latest
    for bid in (latest, other):
        if bid != latest:
            at.selectbox(key="benchmark_id").set_value(bid).run()
        assert not at.exception and not at.error
        wide, _ = read.pivot_headline(read.key_endpoints(read.split_controls(read.headline_table(store, bid))[0]))
        assert any(_same(d.value, wide) for d in at.dataframe)
        assert f"Benchmark **{bid}**" in texts(at)
    at.switch_page("pages/compare.py")
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.selectbox(key="benchmark_id").value == other                    # the choice survives a page switch
    task, metric = at.selectbox(key="cmp_task_metric").value.split(" · ")
    curves = read.fraction_curves(store, task, metric, other)
    fig = next(x for x in specs(at) if x["layout"]["title"]["text"].endswith("vs label fraction"))
    lines = {d["name"]: d for d in fig["data"] if d.get("mode") == "lines+markers"}
    assert set(lines) == set(curves.init)
    for init, d in lines.items():
        assert np.allclose(d["y"], curves[curves.init == init].value)


def test_embeddings_scatter_pair_probes_and_caveat(seeded):
    at = open_page(seeded.root, "embeddings")
    s = specs(at)
    scatters = [x for x in s if x["layout"]["title"]["text"].startswith("UMAP")]
    assert len(scatters) == 2 and "random init" in scatters[1]["layout"]["title"]["text"]
    races = {d["name"] for d in scatters[0]["data"]}
    assert races == {"White", "Black", "Asian", "Other"}
    assert sum(len(d["x"]) for d in scatters[0]["data"]) == SeedConfig().n_embed_points
    t = texts(at)
    assert "not that a downstream model **uses** it" in t
    for sentence in read.bias_results(seeded.root, seeded.emb_ids[1], "probe").sentence:
        assert sentence in t
    at.selectbox(key="emb_color").select("age").run()
    age = [x for x in specs(at) if x["layout"]["title"]["text"].startswith("UMAP")][0]
    assert len(age["data"]) == 1 and "colorscale" in age["data"][0]["marker"]
    # UMAP and PCA side by side, for the encoder and (below) for its random-init reference
    titles = [x["layout"]["title"]["text"] for x in specs(at) if x["layout"]["title"]["text"].startswith(("UMAP", "PCA"))]
    assert [t.split(":")[0] for t in titles] == ["UMAP", "PCA", "UMAP", "PCA"]
    assert ["random init" in t for t in titles] == [False, False, True, True]
    assert "UMAP was not computed" not in texts(at)


def test_data_page_counts_viewer_and_errors(seeded):
    at = open_page(seeded.root, "data")
    metrics = {m.label: m.value for m in at.metric}
    cfg = SeedConfig()
    assert metrics["Patients"] == str(cfg.n_patients) and metrics["Slices"] == str(cfg.n_patients * cfg.slices_per_series)
    errors = at.dataframe[-1].value
    assert sorted(errors.reason) == ["not_dicom", "truncated"]
    hist = [x for x in specs(at) if x["layout"]["title"]["text"] == "sex"][0]
    assert sorted(hist["data"][0]["x"]) == ["F", "M"] and sum(hist["data"][0]["y"]) == cfg.n_patients
    at.radio(key="data_window").set_value("lung").run()
    assert not at.exception
    (image,) = at.get("image")
    caption = image.proto.imgs[0].caption
    assert "lung (L -600, W 1500)" in caption and ("PE present" in caption or "no PE" in caption)
    assert "patient_key" not in texts(at)


@pytest.mark.parametrize("kind", ["missing", "empty", "old"])
def test_every_page_explains_a_bad_store(kind, tmp_path):
    root = tmp_path / "store"
    if kind == "empty":
        with connect(root / "ctssl.duckdb") as con:
            ensure_schema(con)
    elif kind == "old":
        seed_old_schema_store(root)
    expect = {"missing": {p: "ctssl synth" for p in PAGES},
              "empty": {"overview": "ctssl benchmark", "compare": "ctssl benchmark", "curves": "ctssl pretrain",
                        "embeddings": "ctssl embed", "data": "ctssl ingest"},
              "old": {"overview": "older ctssl", "compare": "older ctssl", "curves": "older ctssl",
                      "embeddings": "ctssl embed", "data": "older ctssl"}}[kind]
    at = open_page(root, "overview")
    for page in PAGES:
        if page != "overview":  # one AppTest visiting every page, like a user clicking through
            at.switch_page(f"pages/{page}.py").run()
            assert not at.exception, (kind, page, [e.value for e in at.exception])
        assert expect[page] in texts(at) + " ".join(str(e.proto) for e in at.get("expandable")), (kind, page)


def test_deleted_projection_and_slice_files_warn_but_render(seeded, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(seeded.root, root)
    (root / "embeddings" / f"{seeded.emb_ids[0]}.umap.parquet").unlink()  # the random-init side
    for p in (root / "slices").glob("*.npy"):
        p.unlink()
    at = open_page(root, "embeddings")
    assert "re-run `ctssl embed --checkpoint" in texts(at)
    assert len([x for x in specs(at) if x["layout"]["title"]["text"].startswith("UMAP")]) == 1
    assert "linear probe" in texts(at)  # the rest of the page still renders
    at.switch_page("pages/data.py").run()
    assert not at.exception
    assert "re-run `ctssl ingest <folder>`" in texts(at) and at.dataframe[-1].value.shape[0] == 2


def test_dashboard_command_binds_localhost_and_rejects_bad_port(tmp_path, capsys):
    from ctssl_core.cli import main
    from ctssl_core.commands.dashboard import build_command

    cmd = build_command("app.py", 8600)
    assert cmd[cmd.index("--server.port") + 1] == "8600"
    i = cmd.index("--server.address")
    assert cmd[i + 1] == "127.0.0.1" and cmd[cmd.index("--browser.gatherUsageStats") + 1] == "false"
    assert cmd[cmd.index("--server.headless") + 1] == "true" and cmd[cmd.index("run") + 1] == "app.py"
    assert main(["dashboard", "--store", str(tmp_path), "--port", "70000"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err


def test_overview_shows_sensitivity_verdicts_controls_and_competence(smoke_store):
    """Issue 12 item 7: one screen says whether the study could have found a gain."""
    at = open_page(smoke_store, "overview")
    assert not at.error, [e.value for e in at.error]
    t = texts(at)
    sens = read.sensitivity(smoke_store)
    assert len(sens) and all(s in t for s in sens.sentence)
    assert {w.value for w in at.warning} >= set(sens[sens.sensitive == False].sentence)  # noqa: E712
    table = read.headline_table(smoke_store)
    strategies, controls = read.split_controls(table)
    frames = [d.value for d in at.dataframe]
    verd = read.strategy_verdicts(smoke_store)
    vframe = next(f for f in frames if f.index.name == "strategy" and set(f.index) == set(verd.init)
                  and all(c.split(" · ")[1].split(" vs ")[0] in set(verd.metric) for c in f.columns))
    assert set(verd.reference) == {"random init", "negative control"}      # the smoke profile runs both controls
    for r in verd.itertuples():
        want = f"{r.verdict}: {read.fmt_ci(r.delta, r.ci_low, r.ci_high)}"
        assert vframe.loc[r.init, f"{r.task} · {r.metric} vs {r.reference}"] == want
    assert "a gain there is a gain from features" in t
    main, _ = read.pivot_headline(read.key_endpoints(strategies))
    assert any(_same(f, main) for f in frames)
    assert "pe · twin_exam" in main.columns and "nodule · cpm" in main.columns
    assert not set(main.index) & {"positive_control", "negative_control"}           # controls listed apart...
    ctrl = next(f for f in frames if "positive_control" in f.index)
    assert list(ctrl.index) == ["random", "positive_control", "negative_control"]    # ...beside the reference
    assert "Controls (not strategies)" in t
    comp = read.competence(smoke_store)
    cframe = next(f for f in frames if "pretext_error" in f.columns)
    assert list(cframe.strategy) == list(comp.init)
    assert [s.startswith("⚠️") for s in cframe.status] == list(comp.flag)
    for init in comp[comp.flag].init:
        assert init in next(w.value for w in at.warning if "trivial baseline" in w.value)


def test_compare_forest_plot_equals_the_summaries_deltas(smoke_store):
    """Issue 14 item 3: the forest plot answers 'how much better than random init, and is it real?'."""
    import duckdb

    at = open_page(smoke_store, "compare")
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="cmp_task_metric").value == "pe · twin_exam"       # the shortcut-proof endpoint first
    con = duckdb.connect(str(smoke_store / "ctssl.duckdb"), read_only=True)
    try:
        want = con.execute("SELECT init, metric, value, ci_low, ci_high FROM summaries WHERE task = 'pe' "
                           "AND metric IN ('delta_twin_exam', 'verdict_twin_exam')").df()
    finally:
        con.close()
    fig = next(x for x in specs(at) if "minus random init" in x["layout"]["title"]["text"])
    traces = {d["name"]: d for d in fig["data"]}
    assert set(traces) == {"strategies", "controls (not strategies)"}
    shown = {}
    for d in fig["data"]:
        for label, x in zip(d["y"], d["x"]):
            shown[label] = x
    frac = {"delta_twin_exam": 100, "verdict_twin_exam": 50}                  # smoke: full and smallest fraction
    assert len(shown) == len(want)
    for r in want.itertuples():
        assert shown[f"{r.init}{' ⚠' if r.init in ('masked_region', 'rotation') else ''} @ {frac[r.metric]:g}%"] \
            == pytest.approx(r.value)
    ctrl = traces["controls (not strategies)"]
    assert all(label.startswith(("positive_control", "negative_control")) for label in ctrl["y"])
    assert not any(label.startswith(("positive_control", "negative_control")) for label in traces["strategies"]["y"])
    # highlight only where established: every row of this smoke run is unclear, so every marker is open grey
    f = read.forest(smoke_store, "pe", "twin_exam")
    assert (f.established == "").all()
    assert set(traces["strategies"]["marker"]["color"]) == {"#9e9e9e"}
    assert all(sym.endswith("-open") for sym in traces["strategies"]["marker"]["symbol"])
    # the verdict rows' bars are the benchmark's Bonferroni-adjusted CI, unchanged
    v = want[want.metric == "verdict_twin_exam"].set_index("init")
    s = traces["strategies"]
    for k, label in enumerate(s["y"]):
        if label.endswith("@ 50%"):
            init = label.split(" ")[0]
            assert s["x"][k] + s["error_x"]["array"][k] == pytest.approx(v.loc[init, "ci_high"])
            assert s["x"][k] - s["error_x"]["arrayminus"][k] == pytest.approx(v.loc[init, "ci_low"])
    assert any("insensitive" in w.value for w in at.warning)                  # the task's sensitivity verdict
    # label-fraction curve: one colour per init, bands only for the chosen inits (random + first strategy)
    curves = next(x for x in specs(at) if x["layout"]["title"]["text"].endswith("vs label fraction"))
    lines = {d["name"]: d["line"]["color"] for d in curves["data"] if d.get("mode") == "lines+markers"}
    assert len(set(lines.values())) == len(lines) and lines["random"] == "#7f7f7f"
    assert {d["legendgroup"] for d in curves["data"] if d.get("fill") == "toself"} == {"random", "masked_region"}
    at.multiselect(key="cmp_bands").set_value([]).run()
    curves = next(x for x in specs(at) if x["layout"]["title"]["text"].endswith("vs label fraction"))
    assert not [d for d in curves["data"] if d.get("fill") == "toself"]
    at.selectbox(key="cmp_task_metric").set_value("nodule · cpm").run()
    assert not at.exception
    fig = next(x for x in specs(at) if "minus random init" in x["layout"]["title"]["text"])
    assert fig["layout"]["title"]["text"] == "nodule: cpm minus random init (paired)"


def _dashboard_strings() -> list[tuple[str, str]]:
    """(file, text) of every string literal the dashboard can show (f-string parts included, docstrings not)."""
    import ast

    files = [*sorted((REPO_ROOT / "pages").glob("*.py")), REPO_ROOT / "app.py",
             REPO_ROOT / "ctssl_core" / "results" / "read.py"]
    out = []
    for f in files:
        tree = ast.parse(f.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        out += [(f.name, n.value) for n in ast.walk(tree)
                if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]
    return out


def test_every_command_the_pages_suggest_parses():
    """Issue 14 item 8: hints such as `ctssl embed --init random` or `ctssl bias` (no --emb) named no real command."""
    import re
    import shlex

    from ctssl_core.cli import build_parser

    parser = build_parser()

    def parses(cmd: str) -> bool:
        argv = shlex.split(cmd)
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit:
            return False
        return argv[0] == "ctssl" and args.command == argv[1]

    assert read.HINTS and all(parses(c) for c in read.HINTS.values()), \
        [c for c in read.HINTS.values() if not parses(c)]
    assert read.hint("bias", EMB_ID="emb-7") == "`ctssl bias --emb emb-7`" and parses("ctssl bias --emb emb-7")
    found = [(f, m) for f, s in _dashboard_strings() for m in re.findall(r"`(ctssl [^`]*)`", s)]
    assert [(f, m) for f, m in found if not parses(m)] == []
    # the checker rejects the old, wrong hints (so it would have caught them)
    for bad in ("ctssl embed --init random", "ctssl bias", "ctssl ingest", "ctssl finetune"):
        assert not parses(bad), bad


def test_sidebar_offers_only_the_configured_stores(smoke_store, tmp_path, monkeypatch):
    """Issue 13 item 17: the Store box took any path (read any store, create folders, start jobs anywhere)."""
    from ctssl_core.commands.dashboard import allowed_stores

    root = tmp_path / "stores"
    for name in ("a", "b"):
        with connect(root / name / "ctssl.duckdb") as con:
            ensure_schema(con)
    (root / "not_a_store").mkdir()
    (root / "link").symlink_to(smoke_store, target_is_directory=True)        # points out of the root
    env = {"CTSSL_STORE": str(smoke_store), "CTSSL_STORES_ROOT": str(root)}
    assert allowed_stores(env) == [str(smoke_store), str(root / "a"), str(root / "b")]
    assert allowed_stores({"CTSSL_STORE": str(smoke_store)}) == [str(smoke_store)]
    assert allowed_stores({"CTSSL_STORE": str(smoke_store), "CTSSL_STORES_ROOT": str(tmp_path / "nope")}) == \
        [str(smoke_store)]

    monkeypatch.setenv("CTSSL_STORE", str(smoke_store))
    monkeypatch.setenv("CTSSL_STORES_ROOT", str(root))
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception
    assert not at.sidebar.text_input                                          # no free path box any more
    box = at.sidebar.selectbox(key="ctssl_store_pick")
    assert box.options == allowed_stores(env) and box.value == str(smoke_store)
    assert "runs" in " ".join(c.value for c in at.sidebar.caption)          # the configured store is read
    box.select(str(root / "a")).run()
    assert not at.exception and at.session_state["ctssl_store"] == str(root / "a")
    assert "No benchmark results in this store yet" in texts(at)


def test_dashboard_warns_when_not_bound_to_loopback(tmp_path, monkeypatch, capsys):
    import subprocess

    from ctssl_core.cli import main
    from ctssl_core.commands.dashboard import exposure_warning

    for addr in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert exposure_warning(addr) is None, addr
    for addr in ("0.0.0.0", "192.168.1.5", "::", "myhost.example"):
        assert "not loopback" in exposure_warning(addr), addr
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: calls.append((cmd, kw["env"])) or 0)
    assert main(["dashboard", "--store", str(tmp_path), "--address", "0.0.0.0", "--stores-root", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "--address 0.0.0.0 is not loopback" in err and "SSH tunnel" in err
    cmd, env = calls[0]
    assert cmd[cmd.index("--server.address") + 1] == "0.0.0.0"
    assert env["CTSSL_STORE"] == str(tmp_path) and env["CTSSL_STORES_ROOT"] == str(tmp_path)
    assert main(["dashboard", "--store", str(tmp_path)]) == 0
    assert "not loopback" not in capsys.readouterr().err
    assert main(["dashboard", "--store", str(tmp_path), "--stores-root", str(tmp_path / "missing")]) == 2
    assert "--stores-root" in capsys.readouterr().err


def _qp(at, key: str) -> list:
    v = at.query_params[key]
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _open_link(store, page: str, params: dict) -> AppTest:
    """Open ``page`` the way a shared address does: page path + query parameters, fresh session."""
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=60)
    at.session_state["ctssl_store"] = str(store)
    for k, v in params.items():
        at.query_params[k] = v
    at.run()
    if page != "overview":
        at.switch_page(f"pages/{page}.py")
        for k, v in params.items():       # a page switch in AppTest starts from the page's own URL
            at.query_params[k] = v
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_deep_link_reproduces_the_compare_view(two_benchmark_store):
    """Issue 14 item 5: a view (benchmark, task · metric) is an address that can be shared."""
    store = two_benchmark_store
    bench = read.benchmarks(store)
    other = next(b for b in bench.benchmark_id if b != read.latest_finished(bench))
    at = open_page(store, "compare")
    at.selectbox(key="benchmark_id").set_value(other).run()
    at.selectbox(key="cmp_task_metric").set_value("nodule · cpm").run()
    assert _qp(at, "benchmark") == [other] and _qp(at, "metric") == ["nodule · cpm"]
    want = [x["layout"]["title"]["text"] for x in specs(at)]
    link = {k: _qp(at, k)[0] for k in at.query_params}
    again = _open_link(store, "compare", link)                                  # a fresh session from the link
    assert again.selectbox(key="benchmark_id").value == other
    assert again.selectbox(key="cmp_task_metric").value == "nodule · cpm"
    assert [x["layout"]["title"]["text"] for x in specs(again)] == want
    forest = next(x for x in specs(again) if "minus random init" in x["layout"]["title"]["text"])
    f = read.forest(store, "nodule", "cpm", other)
    assert sorted(v for d in forest["data"] for v in d["x"]) == pytest.approx(sorted(f.value))
    # a stale or foreign link falls back to the defaults, without an error
    bad = _open_link(store, "compare", {"benchmark": "bench-gone", "metric": "pe · nope"})
    assert not bad.error and bad.selectbox(key="benchmark_id").value == read.latest_finished(bench)
    assert bad.selectbox(key="cmp_task_metric").value == "pe · twin_exam"


def test_deep_link_reproduces_curves_and_embedding_views(smoke_store):
    runs = read.run_table(smoke_store)
    ft = runs[(runs.kind == "finetune") & (runs.task == "nodule")].run_id.tolist()[-2:]
    at = _open_link(smoke_store, "curves", {"run": ft, "x": "epoch"})          # repeated parameter: two runs
    assert at.multiselect(key="lc_runs").value == ft and at.radio(key="lc_x").value == "epoch"
    assert {d["legendgroup"] for d in specs(at)[0]["data"]} == set(ft)
    assert _qp(at, "run") == ft
    emb = read.embeddings(smoke_store)
    eid = emb[emb.init != "random"].emb_id.iloc[-1]
    view = _open_link(smoke_store, "embeddings", {"emb": eid, "color": "sex", "point": "2"})
    assert view.selectbox(key="emb_id").value == eid and view.selectbox(key="emb_color").value == "sex"
    assert view.number_input(key="emb_point").value == 2 and "point 2 ·" in view.get("image")[0].proto.imgs[0].caption
    scat = [x for x in specs(view) if x["layout"]["title"]["text"].startswith("PCA")]
    assert len(scat) == 2 and {d["name"] for d in scat[0]["data"]} <= {"F", "M", "unknown"}
    series = read.series_list(smoke_store).series_key.tolist()
    data = _open_link(smoke_store, "data", {"series": series[-1], "slice": "3"})
    assert data.selectbox(key="data_series").value == series[-1] and data.slider(key="data_idx").value == 3
    assert "slice 3 ·" in data.get("image")[0].proto.imgs[0].caption


def test_data_viewer_readable_series_jump_to_findings_and_custom_window(smoke_store):
    """Issue 14 item 7: series by readable name and dataset, jump to slices with findings, custom level/width."""
    series = read.series_list(smoke_store)
    assert series.label.str.match(r"#\d+ · synthetic · \d+ slices").all() and series.label.is_unique
    with_pe = series[series.n_pe > 0].iloc[0]
    at = open_page(smoke_store, "data")
    box = at.selectbox(key="data_series")
    assert box.format_func(box.value) == series.set_index("series_key").label[box.value]
    at.selectbox(key="data_series").set_value(with_pe.series_key).run()
    found = read.finding_slices(smoke_store, with_pe.series_key)
    assert len(found) == with_pe.n_pe + (found.nodule_px > 0).sum() - (found.pe & (found.nodule_px > 0)).sum()
    target = int(found[found.pe].idx.iloc[0])
    at.selectbox(key="data_jump").set_value(target).run()
    assert not at.exception and at.slider(key="data_idx").value == target
    caption = at.get("image")[0].proto.imgs[0].caption
    assert f"slice {target} ·" in caption and "PE present" in caption and with_pe.label in caption
    at.radio(key="data_window").set_value("custom").run()
    at.number_input(key="data_level").set_value(-500).run()
    at.number_input(key="data_width").set_value(1200).run()
    assert not at.exception
    assert "custom (L -500, W 1200)" in at.get("image")[0].proto.imgs[0].caption
    assert at.number_input(key="data_width").min == 1                      # a width of 0 cannot be entered


def test_embeddings_page_shows_the_bias_scorecard_of_the_benchmark(smoke_store):
    """Issue 15 item 4: the scorecard the smoke benchmark wrote (every encoder x planted/null attribute x test)
    is on the Embeddings & bias page, one cell per (encoder, attribute · test), counts as in the summaries."""
    card = read.bias_scorecard(smoke_store)
    assert len(card) and {"random", "masked_region", "rotation"} <= set(card.init)
    assert set(card.outcome) <= {"hit", "miss", "false positive", "correct null", "not run"} and "" not in set(card.outcome)
    assert (card.right.dropna() == card.outcome[card.right.notna()].isin(["hit", "correct null"])).all()
    at = open_page(smoke_store, "embeddings")
    assert not at.exception and not at.error, [e.value for e in at.error]
    t = texts(at)
    assert f"**{int(card.right.eq(True).sum())} of {int(card.right.notna().sum())}**" in t
    grid = next(d.value for d in at.dataframe if "control_group · probe" in d.value.columns)
    for r in card.itertuples():
        assert grid.loc[r.init, f"{r.attribute} · {r.analysis}"] == (r.outcome if r.right is not None else "not run")


def _scatters(at) -> list[dict]:
    return [x for x in specs(at) if x["layout"]["title"]["text"].startswith(("UMAP", "PCA"))]


def test_embeddings_colour_by_any_attribute_and_from_a_point_to_its_slice(attributes_store):
    """Issue 14 item 6 on a benchmark-built store whose demographics CSV brought extra columns: the colour-by
    list holds them (numeric on a scale, codes discrete, an empty one said), PCA alone is explained, and a
    point's row opens the slice it came from, windowed, named by readable series and slice index."""
    at = open_page(attributes_store, "embeddings")
    assert not at.error, [e.value for e in at.error]
    eid = at.selectbox(key="emb_id").value
    view = read.embedding_view(attributes_store, eid)
    pts = view["points"]["pca"]
    box = at.selectbox(key="emb_color")
    assert box.value == "race" and {"bmi (numeric)", "scanner_code (categorical)", "sex (empty)",
                                    "control_group (categorical)", "age (numeric)"} <= set(box.options)
    assert "UMAP was not computed" in texts(at) and len(_scatters(at)) == 2        # PCA: encoder | random init
    box.set_value("bmi").run()
    enc = _scatters(at)[0]["data"]
    assert len(enc) == 1 and "colorscale" in enc[0]["marker"]
    assert np.allclose(enc[0]["marker"]["color"], pd.to_numeric(pts.bmi))
    at.selectbox(key="emb_color").set_value("scanner_code").run()
    assert {d["name"] for d in _scatters(at)[0]["data"]} == {"1", "2", "3"}
    at.selectbox(key="emb_color").set_value("sex").run()
    assert "No point of this embedding has a value for **sex**" in texts(at)
    assert [d["name"] for d in _scatters(at)[0]["data"]] == ["points"]
    # from a point to its slice
    keys = pd.read_parquet(attributes_store / read.embeddings(attributes_store).set_index("emb_id").keys_path[eid])
    row = int(pts.row.iloc[len(pts) // 3])
    at.number_input(key="emb_point").set_value(row).run()
    assert not at.exception and not at.error
    ps = read.point_slice(attributes_store, eid, row)
    (image,) = at.get("image")
    caption = image.proto.imgs[0].caption
    assert f"point {row} · {ps.series_label} · slice {int(keys.idx[row])} of {ps.n_slices}" in caption
    assert "mediastinum (L 40, W 400)" in caption and ps.series_key == keys.series_key[row]
    assert f"`{ps.series_key}`" in texts(at) and "patient_key" not in texts(at)
    at.radio(key="emb_window").set_value("lung").run()
    assert "lung (L -600, W 1500)" in at.get("image")[0].proto.imgs[0].caption
    at.radio(key="emb_point_from").set_value("random init").run()                # the reference's points too
    assert not at.exception and f"point {at.number_input(key='emb_point').value} ·" in \
        at.get("image")[0].proto.imgs[0].caption
    assert at.query_params["point"] == str(at.number_input(key="emb_point").value)


def test_embeddings_link_with_an_unknown_attribute_says_so(attributes_store):
    at = _open_link(attributes_store, "embeddings", {"color": "smoker"})
    assert not at.exception and not at.error
    assert "have no attribute **smoker**" in texts(at) and "bmi" in texts(at)
    assert at.selectbox(key="emb_color").value == "race" and len(_scatters(at)) == 2


def test_a_running_runs_curve_grows_from_its_folder_before_any_merge(tmp_path):
    """The training process only writes its run folder; the Learning curves page must still show, and
    refresh, a live run's curve before the store has merged a single line (a cached answer keyed only by
    the store's files would stay stale)."""
    from ctssl_core.results import write
    from ctssl_core.results.runfolder import RunLogger

    rid = "pretrain-rotation-random-live"
    write.start_run(tmp_path, rid, "pretrain", "rotation", "random", "tiny", {})
    log = RunLogger(tmp_path, rid)
    for s in range(40):
        log({"step": s, "train/loss": 1.0 / (s + 1)})
    at = open_page(tmp_path, "curves")
    at.multiselect(key="lc_runs").set_value([rid]).run()
    at.multiselect(key="lc_metrics").set_value(["train/loss"]).run()
    assert not at.exception
    (trace,) = specs(at)[0]["data"]
    assert trace["x"] == list(range(40)) and np.allclose(trace["y"], [1.0 / (s + 1) for s in range(40)])
    for s in range(40, 55):                                   # the run goes on; still nothing merged
        log({"step": s, "train/loss": 1.0 / (s + 1)})
    at.run()
    (trace,) = specs(at)[0]["data"]
    assert trace["x"] == list(range(55))
    log.close()
    write.finish_run(tmp_path, rid, "succeeded")              # merged: the same curve from the store
    at.run()
    (trace,) = specs(at)[0]["data"]
    assert trace["x"] == list(range(55))
