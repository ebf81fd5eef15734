"""Generic ingest: order, HU, geometry, every bad-input reason, idempotency, resume, no identifier leaks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_fixtures import ct_dataset, enhanced_ct, phantom, save, write_series
from pydicom.uid import generate_uid

from ctssl_core.config import ConfigError
from ctssl_core.data import ingest as ingest_mod
from ctssl_core.data.ingest import build as build_mod
from ctssl_core.data.ingest import headers as headers_mod
from ctssl_core.data.ingest import IngestConfig, find_files, ingest
from ctssl_core.db import connect
from ctssl_core.paths import store_paths

N = 32  # image and stored size: no resampling, so HU must round-trip exactly
SECRETS = ["PID-SECRET", "Secretname", "Secret General Hospital", "ACC-SECRET-77", "19600101"]


def build_messy_folder(root: Path) -> dict:
    """A folder mixing good series (shuffled, renamed, odd geometry) with one file of every bad kind."""
    rng = np.random.default_rng(0)
    exp: dict = {"uids": []}
    # A: shuffled + renamed (no extension), split over two folders, plus bad neighbours in the same series
    vol_a = phantom(12, N, N, seed=1)
    study_a, series_a = generate_uid(), generate_uid()
    tmp = root / "_a"
    paths = write_series(tmp, vol_a, study_uid=study_a, series_uid=series_a, patient_id="PID-SECRET-A", spacing_z=1.5)
    for i, p in enumerate(rng.permutation(len(paths))):
        dest = root / ("x" if i % 2 else "y") / f"{rng.integers(1 << 30):08x}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(paths[p], dest)
    shutil.copy(next((root / "x").iterdir()), root / "x" / "copy_of_slice")  # duplicate_sop
    common = dict(study_uid=study_a, series_uid=series_a, patient_id="PID-SECRET-A")
    save(ct_dataset(vol_a[0], image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), **common), root / "y" / "scout.dcm")
    save(ct_dataset(phantom(1, 16, 16)[0], position=(0, 0, 500.0), **common), root / "y" / "small.dcm")
    save(ct_dataset(vol_a[0], position=None, **common), root / "y" / "nopos.dcm")
    # B: same study, thicker and shorter -> not selected
    write_series(root / "b", phantom(4, N, N, seed=2), study_uid=study_a, patient_id="PID-SECRET-A", spacing_z=5.0)
    exp.update(vol_a=vol_a, study_a=study_a, series_a=series_a)
    # C: non-square pixels (rows 0.5 mm, cols 1.0 mm): 16 mm x 32 mm field -> 16 rows padded to 32
    vol_c = phantom(3, N, N, seed=3)
    write_series(root / "c", vol_c, pixel_spacing=(0.5, 1.0), patient_id="PID-SECRET-C")
    # D: row direction pointing to patient right (-x): stored flipped to the standard view
    vol_d = phantom(3, N, N, seed=4)
    write_series(root / "d", vol_d, orientation=(-1, 0, 0, 0, 1, 0), patient_id="PID-SECRET-D", syntax="explicit_be")
    # E: enhanced multi-frame, one file
    vol_e = phantom(5, N, N, seed=5)
    save(enhanced_ct(vol_e, patient_id="PID-SECRET-E"), root / "e" / "multiframe.dcm")
    # G: no positions anywhere -> InstanceNumber order (files named against it)
    vol_g = phantom(4, N, N, seed=6)
    gs, gst = generate_uid(), generate_uid()
    for k in range(4):
        save(ct_dataset(vol_g[k], position=None, instance_number=k + 1, series_uid=gs, study_uid=gst,
                        patient_id="PID-SECRET-G"), root / "g" / f"{9 - k}.dcm", "implicit_le")
    exp.update(vol_c=vol_c, vol_d=vol_d, vol_e=vol_e, vol_g=vol_g)
    # bad files, one per reason
    (root / "notes.txt").write_text("not dicom")
    good = save(ct_dataset(vol_a[0], patient_id="PID-SECRET-Z"), root / "z" / "full.dcm")
    (root / "z" / "truncated.dcm").write_bytes(good.read_bytes()[:-300])
    good.unlink()
    ds = ct_dataset(vol_a[0], patient_id="PID-SECRET-Z")
    del ds.PixelData
    save(ds, root / "z" / "nopixels.dcm")
    save(ct_dataset(vol_a[0], modality="MR", patient_id="PID-SECRET-Z"), root / "z" / "mr.dcm")
    nd = save(ct_dataset(vol_a[0], patient_id="PID-SECRET-Z"), root / "z" / "mpeg.dcm", "rle")
    ds = pydicom.dcmread(nd)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.save_as(nd, enforce_file_format=True)
    exp["errors"] = {"not_dicom": 1, "truncated": 1, "no_pixels": 1, "wrong_modality": 1, "no_decoder": 1,
                     "localizer": 1, "inconsistent_shape": 1, "duplicate_sop": 1, "missing_position": 1,
                     "series_not_selected": 4}
    exp["series"] = {"A": 12, "C": 3, "D": 3, "E": 5, "G": 4}
    return exp


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    src = root / "dicom"
    exp = build_messy_folder(src)
    summary = ingest(src, root / "store", IngestConfig(size=N, workers=2), progress=False)
    return src, root / "store", exp, summary


def _series_arrays(store: Path) -> list[tuple[int, np.ndarray]]:
    with connect(store_paths(store).db, read_only=True) as con:
        rows = con.execute("SELECT array_path, n_slices FROM series").fetchall()
    return [(n, np.load(store / p)) for p, n in rows]


def test_every_bad_kind_recorded_and_good_series_kept(messy):
    src, store, exp, summary = messy
    assert summary.errors_by_reason == exp["errors"]
    assert summary.series == len(exp["series"]) and summary.slices == sum(exp["series"].values())
    with connect(store_paths(store).db, read_only=True) as con:
        errs = dict(con.execute("SELECT reason, count(*) FROM ingest_errors GROUP BY reason").fetchall())
        details = [r[0] for r in con.execute("SELECT detail FROM ingest_errors").fetchall()]
        n_files = con.execute("SELECT count(*) FROM ingested_files").fetchone()[0]
        ok = con.execute("SELECT count(*) FROM ingested_files WHERE status = 'ok'").fetchone()[0]
    assert errs == exp["errors"]
    from ctssl_core.commands.ingest import list_errors

    named = dict(list_errors(src, store))  # catalog keys mapped back to paths under the user's folder
    assert named["notes.txt"] == "not_dicom" and named["z/truncated.dcm"] == "truncated"
    assert named["z/mpeg.dcm"] == "no_decoder" and named["y/scout.dcm"] == "localizer"
    assert named["y/small.dcm"] == "inconsistent_shape" and named["y/nopos.dcm"] == "missing_position"
    assert all(len(d) > 40 for d in details)  # every row carries a sentence, not just a key
    # every file found is accounted for exactly once: ingested, or recorded with a reason
    assert n_files == len(find_files(src)) == ok + sum(exp["errors"].values())


def test_slice_order_and_hu_round_trip(messy):
    _, store, exp, _ = messy
    found = _series_arrays(store)
    arrays = {n: a for n, a in found if n != 3}
    np.testing.assert_array_equal(arrays[12], exp["vol_a"])  # shuffled, renamed files back in z order, exact HU
    np.testing.assert_array_equal(arrays[4], exp["vol_g"])   # InstanceNumber fallback
    np.testing.assert_array_equal(arrays[5], exp["vol_e"])   # multi-frame frames in z order
    # D is both big endian and mirrored (row direction -x): stored in the standard orientation
    d = [a for n, a in found if n == 3]
    assert any(np.array_equal(a, exp["vol_d"][..., ::-1]) for a in d)


def test_non_square_pixels_keep_aspect(messy):
    _, store, exp, _ = messy
    with connect(store_paths(store).db, read_only=True) as con:
        path, sp = con.execute("SELECT array_path, pixel_spacing_mm FROM series WHERE orig_rows = 32 AND "
                               "pixel_spacing_mm > 0.9").fetchone()
    a = np.load(store / path)
    assert sp == pytest.approx(1.0)
    assert (a[:, :8] == -1024).all() and (a[:, -8:] == -1024).all()  # 16 mm of rows centred in a 32 mm field
    src = exp["vol_c"].astype(np.float32)
    expect = src.reshape(3, 16, 2, N).mean(axis=2)  # rows halved (area), columns unchanged
    np.testing.assert_allclose(a[:, 8:24], np.rint(expect), atol=1)


def test_selection_rule_recorded(messy):
    _, store, _, _ = messy
    with connect(store_paths(store).db, read_only=True) as con:
        rules = [r[0] for r in con.execute("SELECT selection_rule FROM series WHERE n_slices = 12").fetchall()]
    assert len(rules) == 1 and "thinnest" in rules[0] and "2 axial series" in rules[0]


def test_slice_ids_dense_and_catalog_consistent(messy):
    _, store, exp, _ = messy
    with connect(store_paths(store).db, read_only=True) as con:
        ids = np.array([r[0] for r in con.execute("SELECT slice_id FROM slices ORDER BY slice_id").fetchall()])
        per = dict(con.execute("SELECT series_key, count(*) FROM slices GROUP BY series_key").fetchall())
        n = dict(con.execute("SELECT series_key, n_slices FROM series").fetchall())
        zs = con.execute("SELECT z_mm FROM slices s JOIN series USING (series_key) WHERE n_slices = 12 "
                         "ORDER BY idx").fetchall()
    np.testing.assert_array_equal(ids, np.arange(sum(exp["series"].values())))
    assert per == n
    assert np.all(np.diff([z[0] for z in zs]) > 0)


def test_no_identifier_leaks(messy):
    src, store, exp, _ = messy
    needles = SECRETS + [exp["study_a"], exp["series_a"], "copy_of_slice", "nopos.dcm"]  # file names too
    for f in find_files(src):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            needles.append(str(ds.SOPInstanceUID))
        except Exception:  # noqa: BLE001 - the bad files
            pass
    blobs = [p.read_bytes() for p in store.rglob("*") if p.is_file()]
    with connect(store_paths(store).db, read_only=True) as con:
        text = []
        for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall():
            text.append(str(con.execute(f"SELECT * FROM {t}").fetchall()))
    dump = "\n".join(text)
    for s in needles:
        assert s not in dump, s
        assert not any(s.encode() in b for b in blobs), s


def test_reingest_is_idempotent(messy):
    src, store, exp, _ = messy

    def counts():
        with connect(store_paths(store).db, read_only=True) as con:
            return [con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                    for t in ("patients", "studies", "series", "slices", "ingest_errors", "ingested_files")]

    before = counts()
    s = ingest(src, store, IngestConfig(size=N, workers=1), progress=False)
    assert s.files_new == 0 and s.series == 0 and s.errors == 0
    assert s.files_already_done == len(find_files(src))
    assert counts() == before


def test_reingest_with_two_workers_reads_the_catalog_alongside(messy):
    """Several workers: the catalog is read in a thread while the folder is walked; same outcome."""
    src, store, _, _ = messy
    s = ingest(src, store, IngestConfig(size=N, workers=2), progress=False)
    assert s.files_new == 0 and s.series == 0 and s.files_already_done == len(find_files(src))
    with pytest.raises(ConfigError, match="train.csv"):  # an argument error still wins over the catalog thread
        ingest(src, store, IngestConfig(size=N, workers=2, format="rsna-pe"), progress=False)


def test_interrupted_ingest_resumes(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for k in range(3):
        write_series(src / f"s{k}", phantom(4, 16, 16, seed=k), patient_id=f"P{k}")
    (src / "junk.bin").write_bytes(b"\x00" * 10)
    store = tmp_path / "store"
    monkeypatch.setattr(ingest_mod, "COMMIT_SLICES", 1)
    real = ingest_mod._commit
    calls = {"n": 0}

    def commit_then_die(*a, **k):
        real(*a, **k)
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest_mod, "_commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        ingest(src, store, IngestConfig(size=16, workers=1), progress=False)
    monkeypatch.setattr(ingest_mod, "_commit", real)
    s = ingest(src, store, IngestConfig(size=16, workers=1), progress=False)
    assert s.files_already_done == 4 + 1 and s.series == 2  # one series + the junk file were done before
    with connect(store_paths(store).db, read_only=True) as con:
        ids = [r[0] for r in con.execute("SELECT slice_id FROM slices ORDER BY slice_id").fetchall()]
        n_series = con.execute("SELECT count(*) FROM series").fetchone()[0]
        n_err = con.execute("SELECT count(*) FROM ingest_errors").fetchone()[0]
    assert ids == list(range(12)) and n_series == 3 and n_err == 1
    assert not list((store / "slices").glob(".*tmp*"))  # no temp files left behind


def test_bad_config_and_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="between 16 and 2048"):
        IngestConfig(size=4)
    with pytest.raises(ConfigError, match="worker"):
        IngestConfig(workers=0)
    with pytest.raises(ConfigError, match="not a folder"):
        ingest(tmp_path / "nope", tmp_path / "store", progress=False)
    with pytest.raises(ConfigError, match="train.csv"):
        ingest(tmp_path, tmp_path / "store", IngestConfig(format="rsna-pe"), progress=False)


def test_cli_ingest_prints_summary(tmp_path, capsys):
    from ctssl_core.cli import main

    write_series(tmp_path / "src" / "a", phantom(3, 16, 16), patient_id="P1")
    (tmp_path / "src" / "readme.txt").write_text("x")
    rc = main(["ingest", str(tmp_path / "src"), "--store", str(tmp_path / "st"), "--size", "16", "--workers", "1",
               "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "3 slices" in out and "slices/s" in out and "not_dicom" in out
    assert main(["ingest", str(tmp_path / "src"), "--store", str(tmp_path / "st"), "--quiet", "--list-errors"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert "not_dicom" in last and last.endswith("readme.txt")
    assert main(["ingest", str(tmp_path / "missing"), "--store", str(tmp_path / "st")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_cli_list_errors_as_json(tmp_path, capsys):
    """`--list-errors --json`: one JSON array on stdout (path relative to DIR, reason, the catalog's detail and the
    summary's advice), the summary table on stderr; `--json` alone: the summary as a JSON object. The paths reach
    the terminal only: no file of the store holds them."""
    import json

    from ctssl_core.cli import main
    from ctssl_core.data.ingest import REASONS

    src, st = tmp_path / "src", tmp_path / "st"
    write_series(src / "a", phantom(3, 16, 16), patient_id="P1")
    good = write_series(src / "broken", phantom(1, 16, 16), patient_id="P2", names=["cut-short.dcm"])[0]
    good.write_bytes(good.read_bytes()[:-300])         # a DICOM cut off in its pixel data: truncated
    (src / "readme.txt").write_text("x")
    base = ["ingest", str(src), "--store", str(st), "--size", "16", "--workers", "1", "--quiet"]
    assert main([*base, "--json"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert (summary["files_found"], summary["slices"], summary["errors"]) == (5, 3, 2)
    assert summary["errors_by_reason"] == {"not_dicom": 1, "truncated": 1} and summary["store"] == str(st)
    assert "3 slices" in err and "not_dicom" in err     # the table is still shown, on stderr
    assert main([*base, "--list-errors", "--json"]) == 0
    out, err = capsys.readouterr()
    listed = json.loads(out)
    assert [(e["path"], e["reason"]) for e in listed] == [("readme.txt", "not_dicom"),
                                                          ("broken/cut-short.dcm", "truncated")]
    assert all(e["what_to_do"] == REASONS[e["reason"]] and len(e["detail"]) > 20 for e in listed)
    assert "files: 5 found" in err
    # the text listing is unchanged
    assert main([*base, "--list-errors"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("broken/cut-short.dcm")
    for f in st.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert b"cut-short" not in data and b"readme.txt" not in data, f


def test_gantry_tilt_recorded_in_selection_rule(tmp_path):
    t = np.deg2rad(12.0)
    write_series(tmp_path / "src", phantom(3, 16, 16), gantry_tilt=12.0,
                 orientation=(1, 0, 0, 0, float(np.cos(t)), float(-np.sin(t))), patient_id="P-TILT")
    s = ingest(tmp_path / "src", tmp_path / "store", IngestConfig(size=16, workers=1), progress=False)
    assert s.slices == 3 and s.errors == 0  # tilted but axial: kept
    with connect(store_paths(tmp_path / "store").db, read_only=True) as con:
        rule = con.execute("SELECT selection_rule FROM series").fetchone()[0]
    assert "gantry tilt 12.0 deg" in rule


@pytest.mark.parametrize("workers", [1, 2])
def test_batched_ingest_matches_single_pass(tmp_path, monkeypatch, workers):
    """Very large ingests run in batches of whole studies; the result must not change."""
    exp = build_messy_folder(tmp_path / "src")
    monkeypatch.setattr(ingest_mod, "BATCH_FILES", 8)  # forces several batches on this small folder
    monkeypatch.setattr(headers_mod, "SCAN_CHUNK", 4)  # and several scan chunks to share
    real_batches, batches = ingest_mod._study_batches, []
    monkeypatch.setattr(ingest_mod, "_study_batches", lambda *a: batches.append(real_batches(*a)) or batches[-1])
    s = ingest(tmp_path / "src", tmp_path / "store", IngestConfig(size=N, workers=workers), progress=False)
    assert len(batches) == 1 and len(batches[0]) > 1  # the patches above took effect: really several batches
    assert s.errors_by_reason == exp["errors"]
    assert s.series == len(exp["series"]) and s.slices == sum(exp["series"].values())
    found = dict((n, a) for n, a in _series_arrays(tmp_path / "store") if n != 3)
    np.testing.assert_array_equal(found[12], exp["vol_a"])
    with connect(store_paths(tmp_path / "store").db, read_only=True) as con:
        n_files = con.execute("SELECT count(*) FROM ingested_files").fetchone()[0]
        ids = [r[0] for r in con.execute("SELECT slice_id FROM slices ORDER BY 1").fetchall()]
    assert n_files == len(find_files(tmp_path / "src")) and ids == list(range(s.slices))


def test_box_factors_only_where_halving_reaches_the_target():
    from ctssl_core.data.ingest import box_factors

    assert box_factors(512, 512, (0.7, 0.7), 256) == (2, 2)
    assert box_factors(512, 512, None, 128) == (4, 4)
    assert box_factors(64, 64, (0.5, 1.0), 32) == (4, 2)  # non-square pixels: padded rows
    assert box_factors(32, 32, (0.7, 0.7), 32) == (1, 1)  # no resize at all
    assert box_factors(512, 512, (0.7, 0.7), 224) is None  # not a power-of-two ratio: torch path
    assert box_factors(48, 48, None, 32) is None
    assert box_factors(32, 32, None, 64) is None  # enlarging


@pytest.mark.parametrize("case, via_torch", [
    (dict(), False),                                          # unsigned, slope 1, intercept -1024
    (dict(size=16), False),                                   # 4x4 blocks
    (dict(signed=True, pad_hu=-3000), False),                 # padding below air clamped on the integers
    (dict(signed=True, slope=2.0, intercept=-1000.0), False),
    (dict(slope=0.5, intercept=-1024.0), False),
    (dict(intercept=-1024.5), True),                          # air at a non-integer stored value
    (dict(orientation=(-1, 0, 0, 0, -1, 0)), False),          # mirrored both ways
    (dict(pixel_spacing=(0.5, 1.0)), False),                  # non-square pixels: 4x2 blocks and padding
    (dict(rows=48), True),                                    # 48 -> 32 is no halving
])
def test_numpy_box_path_matches_torch_path_exactly(tmp_path, monkeypatch, case, via_torch):
    """The integer block-mean path stores the same int16 values as the torch resample, bit for bit."""
    from ctssl_core.data.dicom import scan
    from ctssl_core.data.ingest import build_series, plan_series

    case = dict(case)
    size, rows, pad_hu = case.pop("size", 32), case.pop("rows", 64), case.pop("pad_hu", None)
    vol = phantom(4, rows, rows, seed=11)
    if pad_hu is not None:
        vol[:, :5] = pad_hu  # scanner padding far below air
    paths = write_series(tmp_path / "src", vol, patient_id="P-BOX", **case)
    plans, errors = plan_series([scan(p) for p in paths])
    assert len(plans) == 1 and not errors
    torch_chunks = []
    real_torch = build_mod._hu_chunk_torch  # patched where build_series looks it up
    monkeypatch.setattr(build_mod, "_hu_chunk_torch", lambda raw, *a: torch_chunks.append(1) or real_torch(raw, *a))
    fast = build_series(plans[0], str(tmp_path / "store"), "fast", size)
    assert bool(torch_chunks) == via_torch
    monkeypatch.setattr(build_mod, "box_factors", lambda *a: None)
    n_torch = len(torch_chunks)
    ref = build_series(plans[0], str(tmp_path / "store"), "ref", size)
    assert len(torch_chunks) > n_torch  # the reference really went through torch (the patch took effect)
    a, b = np.load(tmp_path / "store" / fast.array_rel), np.load(tmp_path / "store" / ref.array_rel)
    assert a.shape == (4, size, size) and a.dtype == np.int16
    np.testing.assert_array_equal(a, b)
    assert fast.pixel_spacing == ref.pixel_spacing and not fast.errors


def test_two_workers_match_one(tmp_path, monkeypatch):
    """Scan chunks and series builds shared by the pool give exactly the in-process result, also
    when headers were scanned while the catalog was being read (an existing, empty store)."""
    import time

    from ctssl_core.schema import ensure_schema

    exp = build_messy_folder(tmp_path / "src")
    monkeypatch.setattr(headers_mod, "SCAN_CHUNK", 4)  # many scan chunks: the pool really shares the scan
    one = ingest(tmp_path / "src", tmp_path / "one", IngestConfig(size=N, workers=1), progress=False)
    key = store_paths(tmp_path / "two").secret           # one store key: the same pseudonyms in both stores
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_bytes(store_paths(tmp_path / "one").secret.read_bytes())
    with connect(store_paths(tmp_path / "two").db) as con:
        ensure_schema(con)
    real_state, real_while, early = ingest_mod._catalog_state, ingest_mod._scan_while, []

    def slow_state(db):
        time.sleep(0.3)  # a slow catalog read: headers get scanned meanwhile
        return real_state(db)

    monkeypatch.setattr(ingest_mod, "_catalog_state", slow_state)
    monkeypatch.setattr(ingest_mod, "_scan_while",
                        lambda files, busy, ex: early.append(real_while(files, busy, ex)) or early[-1])
    two = ingest(tmp_path / "src", tmp_path / "two", IngestConfig(size=N, workers=2), progress=False)
    assert early and early[0]  # some headers came from the wait for the catalog
    assert one.errors_by_reason == two.errors_by_reason == exp["errors"]
    assert (one.series, one.slices) == (two.series, two.slices)
    arrays = [sorted((n, a.tobytes()) for n, a in _series_arrays(tmp_path / s)) for s in ("one", "two")]
    assert arrays[0] == arrays[1]
    # the same slice ids too: training samples slices by id, so ids that followed the pool's finishing order
    # (the old hand-written scheduler) gave one profile other results from one fresh store to the next
    ids = []
    for s in ("one", "two"):
        with connect(store_paths(tmp_path / s).db, read_only=True) as con:
            ids.append(con.execute("SELECT slice_id, series_key, idx, sop_key FROM slices ORDER BY slice_id").fetchall())
    assert ids[0] == ids[1] and len(ids[0]) == one.slices


def _square_with_pid(x: int) -> tuple[int, int]:
    import os
    import time

    time.sleep(0.005)  # enough work that both sides get items
    return x * x, os.getpid()


def _fail_on_seven(x: int) -> int:
    if x == 7:
        raise ValueError("item 7")
    return x


@pytest.mark.parametrize("ahead", [1, 2])
def test_pool_map_gives_every_item_once_in_order_from_the_workers(ahead):
    import os

    from ctssl_core.data.ingest.schedule import _executor, _imap

    drained = []
    with _executor(3) as ex:  # three forked workers; this process only collects
        got = list(_imap(_square_with_pid, list(range(60)), ex, ahead=ahead, drained=lambda: drained.append(1)))
    assert [i for i, _ in got] == list(range(60))  # in item order: slice ids follow the plan
    assert all(sq == i * i for i, (sq, _) in got)
    pids = {pid for _, (_, pid) in got}
    assert os.getpid() not in pids and 2 <= len(pids) <= 3 and drained == [1]
    with _executor(1) as ex:
        assert ex is None and list(_imap(_square_with_pid, [3, 4], ex)) == [(0, (9, os.getpid())), (1, (16, os.getpid()))]


def test_pool_map_stops_handing_out_when_told():
    """``until``: items stop being submitted once it turns false; what was submitted still comes back."""
    from ctssl_core.data.ingest.schedule import _executor, _imap

    calls = []

    def until():
        calls.append(1)
        return len(calls) <= 3

    with _executor(2) as ex:
        got = list(_imap(_square_with_pid, list(range(60)), ex, until=until))
    assert [i for i, _ in got] == [0, 1, 2]  # the three submitted while until() held, in order
    assert all(sq == i * i for i, (sq, _) in got)
    assert [i for i, _ in _imap(_square_with_pid, [1, 2, 3], None, until=lambda: False)] == []


def test_pool_map_raises_a_worker_error_and_stops():
    from ctssl_core.data.ingest.schedule import _executor, _imap

    seen = []
    with pytest.raises(ValueError, match="item 7"):
        with _executor(2) as ex:
            for i, _ in _imap(_fail_on_seven, list(range(40)), ex):
                seen.append(i)
    assert seen == list(range(7))  # every item before the failing one, none after


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2])
def test_broken_links_and_pipes_are_recorded_not_fatal(tmp_path, workers):
    """A broken symlink used to stop the ingest (os.stat raised) and a named pipe hung it (open blocks):
    both are now not_dicom rows and the real series beside them is ingested."""
    import os

    src = tmp_path / "src"
    vol = phantom(4, N, N, seed=3)
    write_series(src / "a", vol, patient_id="P1")
    os.symlink(tmp_path / "gone.dcm", src / "a" / "link.dcm")
    os.mkfifo(src / "a" / "pipe")
    store = tmp_path / f"store{workers}"
    s = ingest(src, store, IngestConfig(size=N, workers=workers), progress=False)
    assert s.errors_by_reason.get("not_dicom") == 2 and s.slices == 4
    with connect(store_paths(store).db, read_only=True) as con:
        reasons = [r[0] for r in con.execute("SELECT reason FROM ingest_errors").fetchall()]
    assert reasons == ["not_dicom", "not_dicom"]
    again = ingest(src, store, IngestConfig(size=N, workers=workers), progress=False)
    assert again.files_new == 0 and again.slices == 0                    # recorded once, not retried


def test_functional_group_rescale_is_read_by_every_header_path(tmp_path):
    """RescaleSlope/Intercept and PixelSpacing inside SharedFunctionalGroupsSequence (defined length):
    the byte walker used to skip the sequence and read slope 1 / intercept 0 / no spacing."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from ctssl_core.data.dicom import read_hu
    from ctssl_core.data.dicom import scan as scan_one

    hu = phantom(1, N, N, seed=4)[0]
    ds = ct_dataset(hu, slope=1.0, intercept=-1024.0)
    stored = np.frombuffer(ds.PixelData, dtype="<u2" if not ds.PixelRepresentation else "<i2")
    # move the rescale into a functional group with slope 2: stored values halve
    ds.PixelData = (np.round((hu.astype(np.float64).ravel() + 1024) / 2)).astype(stored.dtype).tobytes()
    del ds.RescaleSlope, ds.RescaleIntercept, ds.PixelSpacing
    pm, tr = Dataset(), Dataset()
    pm.PixelSpacing = [0.7, 0.7]
    tr.RescaleSlope, tr.RescaleIntercept, tr.RescaleType = 2, -1024, "HU"
    fg = Dataset()
    fg.PixelMeasuresSequence = Sequence([pm])
    fg.PixelValueTransformationSequence = Sequence([tr])
    ds.SharedFunctionalGroupsSequence = Sequence([fg])
    path = save(ds, tmp_path / "fg.dcm")
    h = scan_one(path)
    assert h.spacing is not None and h.spacing[0] == pytest.approx(0.7)
    got = read_hu(h)
    assert np.abs(got.astype(np.int32) - hu.astype(np.int32)).max() <= 1          # slope 2 rounding
