"""No absolute path leaves a run (issue 13 item 16): configs record store-relative paths, export cards carry
none, and an embedding of a checkpoint outside the store is named by a digest, not its folders."""

from __future__ import annotations

import json
from pathlib import Path

from ctssl_core.paths import in_store, scrub_paths


def test_in_store_is_relative_inside_and_the_name_only_outside(tmp_path):
    root = tmp_path / "store"
    assert in_store(root / "runs" / "r1" / "checkpoints" / "last.pt", root) == "runs/r1/checkpoints/last.pt"
    assert in_store(tmp_path / "jane_doe" / "last.pt", root) == "last.pt"
    got = scrub_paths({"store": str(root), "n": 3, "xs": [str(tmp_path / "a.pt"), "relative/b.pt"]}, root)
    assert got == {"store": ".", "n": 3, "xs": ["a.pt", "relative/b.pt"]}


def test_runs_and_export_cards_of_the_smoke_store_hold_no_absolute_path(smoke_store, tmp_path):
    from ctssl_core.export import export_run
    from ctssl_core.results import read

    runs = read.run_table(smoke_store)
    fts = runs[(runs.kind == "finetune") & runs.init.isin(["masked_region", "rotation"])]
    assert len(fts)
    for rid in fts.run_id:
        cfg = json.loads((Path(smoke_store) / "runs" / rid / "config.json").read_text())
        ck = (cfg.get("config") or cfg).get("init_checkpoint")
        assert ck and not Path(ck).is_absolute() and (Path(smoke_store) / ck).is_file(), ck
    pre = runs[(runs.kind == "pretrain") & (runs.status == "succeeded")].run_id.iloc[0]
    _, card = export_run(pre, tmp_path / "export", smoke_store)
    text = card.read_text()
    assert str(Path(smoke_store).resolve()) not in text and str(smoke_store) not in text
    assert str(tmp_path) not in text


def test_an_outside_checkpoint_is_embedded_under_a_digest_not_its_folder_names(smoke_store, tmp_path):
    import shutil

    from ctssl_core.embed import EmbedConfig, resolve_encoder
    from ctssl_core.results import read

    runs = read.run_table(smoke_store)
    pre = runs[(runs.kind == "pretrain") & (runs.status == "succeeded")].run_id.iloc[0]
    outside = tmp_path / "jane_doe_scans" / "ckpts" / "last.pt"
    outside.parent.mkdir(parents=True)
    shutil.copy(Path(smoke_store) / "runs" / pre / "checkpoints" / "last.pt", outside)
    tag = resolve_encoder(str(outside), smoke_store, EmbedConfig())[4]
    assert tag.startswith("ckpt-") and "jane" not in tag and "ckpts" not in tag


def test_the_suite_writes_no_cohort_or_store_into_the_checkouts_data_folder():
    """A test run must not leave cohorts in the user's data/ (CI found data/cohorts/smoke-* after the suite)."""
    from ctssl_core.paths import REPO_ROOT, data_root, default_cohort, default_store

    inside = (REPO_ROOT / "data").resolve()
    for p in (data_root(), default_cohort("smoke-x"), default_store()):
        assert not p.resolve().is_relative_to(inside), p
