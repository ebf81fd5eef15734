"""Embeddings of the evaluation split and their 2D projections (PCA, UMAP).

What: every slice of the evaluation split (default ``test``) goes through a
frozen encoder's ``embed`` (batched, no grad) -> slice embeddings; exam
embeddings are the mean of an exam's slice embeddings. Each is saved as a
float32 ``.npy`` ``(N, D)`` plus a parquet of row keys (slice_id, series_key,
patient_key, idx) with the demographics joined from the catalog (age, sex,
race, control_group, site, PE label) and one row in the ``embeddings`` table.
No patient identifier is stored: keys are the catalog's keyed hashes.

Why: the bias analysis (``bias.py``) and the dashboard's embedding view both
need the same vectors; computing them once keeps page reruns instant.

Projections are computed once and stored (``projections`` table + parquet
``row, x, y``): PCA always; UMAP (umap-learn) after PCA to 50 dims with a fixed
``random_state`` and recorded parameters. Above ``max_points`` rows a sample
stratified by sex and race is projected (``sampled = true`` in the table).
UMAP cost: the first fit in a fresh process pays ~30-45 s of numba
compilation on two idle CPU cores (23 CPU-s measured; ``experiments/bench_embed.py``
reports it separately); 20,000 x 512 then fits in ~20 CPU-s with the exact
kNN graph (see ``project_umap``).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from ctssl_core.config import ConfigError
from ctssl_core.data.catalog import slice_rows, split_size
from ctssl_core.db import StoreError
from ctssl_core.paths import store_paths
from ctssl_core.results.store_api import (
    embedding_row, projection_path, replace_embedding, replace_projection, run_origin,
)


class EmbedError(StoreError):
    """Embeddings that cannot be made or found; the message says what to do."""


@dataclass
class EmbedConfig:
    split: str = "test"                 # 'train' | 'val' | 'test' | 'all'
    split_seed: int = 0                 # seed of the patient split (splits table)
    pool: float = 0.0                   # the split scheme's unlabelled pool fraction (benchmark.pool), so the
                                        # test split here is the one fine-tuning scores on
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # benchmark.split_fractions (same scheme)
    encoder: str = "resnet18"           # registry key used for --checkpoint random
    encoder_kwargs: dict = field(default_factory=dict)   # its build_encoder options (width, in_chans...): a
                                        # benchmark passes pretrain.encoder_params, so random init is the same
                                        # architecture as the strategies' encoders (a checkpoint uses its own)
    seed: int = 0                       # init seed for random
    batch_size: int = 64
    device: str = "cpu"
    max_per_series: int = 0             # 0 = every slice; else evenly spaced slices per series
    windows: Any = None                 # input windows for random init (ops.WINDOWS preset or pairs); None:
                                        # a checkpoint's own (the view it was trained on), paper for random
    pca: bool = True
    umap: bool = True
    max_points: int = 20000             # projections above this use a stratified sample
    umap_pca_dims: int = 50
    umap_neighbors: int = 15
    umap_min_dist: float = 0.1
    random_state: int = 0

    def __post_init__(self) -> None:
        if self.split not in ("train", "val", "test", "all"):
            raise ConfigError(f"embed.split must be train, val, test or all (got {self.split!r})")
        if not 0.0 <= self.pool < 1.0:
            raise ConfigError(f"embed.pool must be in [0, 1) (got {self.pool})")
        if self.windows is not None:
            from ctssl_core.ops import resolve_windows

            try:
                resolve_windows(self.windows)   # a bad preset or pair fails here, with the valid ones
            except ConfigError as e:
                raise ConfigError(f"embed.windows: {e}") from None
        for name, low in (("batch_size", 1), ("max_per_series", 0), ("max_points", 3), ("umap_pca_dims", 2),
                          ("umap_neighbors", 2)):
            if getattr(self, name) < low:
                raise ConfigError(f"embed.{name} must be >= {low} (got {getattr(self, name)})")


# ---------------------------------------------------------------- pure pieces


def embed_array(encoder, read: Callable[[np.ndarray], np.ndarray], slice_ids: np.ndarray, batch_size: int = 64,
                device: str = "cpu", progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Slice embeddings ``(N, D)`` float32: read int16 HU batches, window them as the encoder was
    trained (``encoder.windows``, through the loader's ``ops.model_input``), ``encoder.embed``."""
    import torch

    from ctssl_core.ops import model_input, slice_at

    enc = encoder.to(device).eval()
    out = []
    n = len(slice_ids)
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            ids = np.asarray(slice_ids[i:i + batch_size])
            hu = torch.from_numpy(np.ascontiguousarray(read(ids))).to(device)             # (B, H, W) int16
            x = slice_at(model_input(hu[:, None], enc.windows), 0)                         # (B, C, H, W)
            out.append(enc.embed(x).float().cpu().numpy())                                # (B, D)
            if progress:
                progress(min(i + batch_size, n), n)
    if not out:
        raise EmbedError("no slices to embed; is the split empty? Check `--split` and that the store has patients in it")
    return np.concatenate(out).astype(np.float32)


def pool_rows(E: np.ndarray, by: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of the rows of ``E`` per value of ``by`` -> (pooled (G, D), first row index (G,), counts (G,))."""
    keys, first, inv, counts = np.unique(by, return_index=True, return_inverse=True, return_counts=True)
    pooled = np.zeros((len(keys), E.shape[1]), dtype=np.float64)
    np.add.at(pooled, inv, E)
    pooled /= counts[:, None]
    order = np.argsort(first)                                       # keep first-appearance order
    return pooled[order].astype(np.float32), first[order], counts[order]


def exam_table(E: np.ndarray, keys: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Exam (series) embeddings by mean pooling, with one key row per exam."""
    pooled, first, counts = pool_rows(E, keys["series_key"].to_numpy())
    ek = keys.iloc[first].reset_index(drop=True).copy()
    ek["n_slices"] = counts
    if "pe" in ek.columns:
        ek = ek.drop(columns=["pe"])
    if "pe_exam" in ek.columns:
        ek["pe"] = ek["pe_exam"]
    ek["slice_id"], ek["idx"] = -1, -1
    return pooled, ek


def stratified_sample(keys: pd.DataFrame, max_points: int, by: tuple[str, ...] = ("sex", "race"), seed: int = 0) -> np.ndarray:
    """Sorted row indices: all rows if ``len <= max_points``, else a sample keeping each stratum's share.

    Strata are the combinations of ``by`` present (missing values form their
    own stratum); allocation is proportional with largest remainders, so small
    groups keep their share rather than vanishing from the plot.
    """
    n = len(keys)
    if n <= max_points:
        return np.arange(n)
    cols = [c for c in by if c in keys.columns]
    strata = keys[cols].astype(str).agg("|".join, axis=1).to_numpy() if cols else np.zeros(n, dtype=str)
    labels, inv, counts = np.unique(strata, return_inverse=True, return_counts=True)
    quota = counts * max_points / n
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take))[: max_points - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    out = [rng.choice(np.flatnonzero(inv == s), size=take[s], replace=False) for s in range(len(labels))]
    return np.sort(np.concatenate(out))


def project_pca(E: np.ndarray, fit_rows: np.ndarray | None = None, n_components: int = 2, random_state: int = 0):
    """PCA fitted on ``E[fit_rows]`` (default all); returns (model, explained variance ratio)."""
    from sklearn.decomposition import PCA

    k = int(min(n_components, E.shape[0], E.shape[1]))
    X = E if fit_rows is None else E[fit_rows]
    pca = PCA(n_components=k, random_state=random_state).fit(X)
    return pca, pca.explained_variance_ratio_


def project_umap(E: np.ndarray, pca_dims: int = 50, n_neighbors: int = 15, min_dist: float = 0.1,
                 random_state: int = 0) -> tuple[np.ndarray, dict[str, Any], float]:
    """UMAP of ``E`` after PCA to ``pca_dims``: (xy (N, 2), params, fit seconds excluding import).

    The k-nearest-neighbour graph is computed exactly (scikit-learn, on the PCA
    scores) and handed to UMAP as ``precomputed_knn``. Why: with a fixed
    ``random_state`` UMAP runs single-threaded, and its approximate NN-descent
    (plus that code's own numba compile) dominated the fit: 20,000 x 512 took
    95 CPU-s that way against ~20 CPU-s (PCA 1 + exact kNN 3 + layout 16) with
    the exact graph, which is also deterministic.
    """
    try:
        import umap  # numba: first fit per process compiles (~30-45 s on 2 cores)
    except ImportError as e:   # umap-learn is the optional `umap` extra (numba + llvmlite, ~210 MB)
        raise EmbedError(f"UMAP needs umap-learn, which is not installed ({e}): `pip install 'ctssl[umap]'` "
                         f"(or umap-learn), or skip UMAP with `ctssl embed --no-umap` / embed.umap: false") from e
    from sklearn.neighbors import NearestNeighbors

    t0 = time.perf_counter()
    X = E
    if E.shape[1] > pca_dims and E.shape[0] > pca_dims:
        X = project_pca(E, n_components=pca_dims, random_state=random_state)[0].transform(E)   # (N, pca_dims)
    nn = int(min(n_neighbors, len(E) - 1))
    if len(E) < 5:   # UMAP's spectral initialisation needs more points than 2 + 2 components
        raise EmbedError(f"UMAP needs at least 5 points; got {len(E)}. Embed more exams or use PCA only")
    X = np.ascontiguousarray(X, dtype=np.float32)
    dist, idx = NearestNeighbors(n_neighbors=nn).fit(X).kneighbors(X)      # (N, nn) incl. self at column 0
    reducer = umap.UMAP(n_neighbors=nn, min_dist=min_dist, n_components=2, random_state=random_state,
                        metric="euclidean", precomputed_knn=(idx, dist.astype(np.float32), None))
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")   # fixed random_state => 1 thread, by choice
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")  # we never transform new points
        xy = reducer.fit_transform(X).astype(np.float32)
    params = dict(pca_dims=int(X.shape[1]), n_neighbors=nn, min_dist=min_dist, metric="euclidean", knn="exact",
                  random_state=random_state, umap_version=umap.__version__)
    return xy, params, time.perf_counter() - t0


# ---------------------------------------------------------------- store side


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)[:80]


def catalog_keys(store_root: str | Path, slice_ids: np.ndarray | None = None, split: str = "test",
                 split_seed: int = 0, pool: float = 0.0, fractions=(0.7, 0.15, 0.15)) -> pd.DataFrame:
    """Row keys + demographics for the slices of ``split`` (or the given ``slice_ids``), ordered by slice_id.

    Columns: slice_id, series_key, patient_key, idx, age, sex, race,
    control_group, site, pe (slice label), pe_exam (exam label), split (train/val/test, or pool when the
    scheme has one). The split column is filled for ``split='all'`` too: the scheme (split_seed, pool) is
    created when missing, so a benchmark with a pool never writes an all-null split column.
    """
    from ctssl_core.data.splits import split_scheme

    scheme = split_scheme(split_seed, pool, fractions)
    _ensure_splits(store_root, split_seed, pool, fractions)
    df = slice_rows(store_root, scheme)
    if split != "all":
        df = df[df["split"] == split]
    if slice_ids is not None:
        df = df.set_index("slice_id").loc[np.asarray(slice_ids)].reset_index()
    attrs = df["attributes"].map(lambda a: json.loads(a) if isinstance(a, str) and a else {})
    df["control_group"] = attrs.map(lambda a: a.get("control_group"))
    df["site"] = df["series_site"].where(df["series_site"].notna(), attrs.map(lambda a: a.get("site")))
    return df.drop(columns=["attributes", "series_site"]).reset_index(drop=True)


def _ensure_splits(store_root: str | Path, seed: int, pool: float = 0.0, fractions=(0.7, 0.15, 0.15)) -> None:
    from ctssl_core.data.splits import get_or_create_splits, split_scheme

    if not split_size(store_root, split_scheme(seed, pool, fractions)):
        get_or_create_splits(store_root, seed, fractions, pool=pool)


def even_per_series(keys: pd.DataFrame, k: int) -> pd.DataFrame:
    """Keep ``k`` evenly spaced slices of each series (all when ``k <= 0`` or the series is shorter)."""
    if k <= 0:
        return keys
    pos = keys.groupby("series_key", sort=False).cumcount().to_numpy()            # position in its series
    size = keys.groupby("series_key", sort=False)["series_key"].transform("size").to_numpy()
    keep = np.zeros(len(keys), bool)
    for n in np.unique(size):
        wanted = np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int))  # evenly spaced positions
        rows = size == n
        keep[rows] = np.isin(pos[rows], wanted)
    return keys[keep].reset_index(drop=True)


def save_embeddings(store_root: str | Path, emb_id: str, E: np.ndarray, keys: pd.DataFrame, *, run_id: str | None,
                    init: str, encoder: str, split: str, level: str, record_run: str | None = None) -> dict[str, Any]:
    """Write ``<emb_id>.npy`` + ``<emb_id>.parquet`` and (re)place the ``embeddings`` row: in the store, or,
    for a benchmark's embedding unit (``record_run``: its run id), in that run's folder, which the benchmark
    merges (a unit's process never writes the store: ``results/runfolder.py``)."""
    if len(E) != len(keys):
        raise EmbedError(f"embeddings ({len(E)} rows) and keys ({len(keys)} rows) differ; nothing written")
    sp = store_paths(store_root)
    sp.embeddings.mkdir(parents=True, exist_ok=True)
    npy, pq = sp.embeddings / f"{emb_id}.npy", sp.embeddings / f"{emb_id}.parquet"
    tmp = npy.with_suffix(".tmp.npy")
    np.save(tmp, np.ascontiguousarray(E, dtype=np.float32))
    tmp.replace(npy)
    keys.reset_index(drop=True).to_parquet(pq, index=False)
    row = dict(emb_id=emb_id, run_id=run_id, init=init, encoder=encoder, split=split, level=level,
               path=str(npy.relative_to(sp.root)), keys_path=str(pq.relative_to(sp.root)), n=int(len(E)),
               dim=int(E.shape[1]), created_at=_now())
    if record_run is not None:
        from ctssl_core.results.runfolder import record_rows

        record_rows(store_root, record_run, "embeddings", [row])
    else:
        replace_embedding(store_root, row)
    return row


def load_embeddings(store_root: str | Path, emb_id: str, row: dict[str, Any] | None = None
                    ) -> tuple[np.ndarray, pd.DataFrame, dict[str, Any]]:
    """(vectors (N, D) float32, keys DataFrame, embeddings row) of ``emb_id`` (``row``: its row when the
    caller has it, e.g. one an embedding unit recorded in its run folder; else the store's)."""
    sp = store_paths(store_root)
    known: list[str] = []
    if row is None:
        row, known = embedding_row(store_root, emb_id)
    if row is None:
        raise EmbedError(f"no embeddings {emb_id!r} in {sp.root}; run `ctssl embed --checkpoint RUN_ID|random` "
                         f"first. Known: {known or 'none'}")
    E = np.load(sp.root / row["path"], mmap_mode="r")
    keys = pd.read_parquet(sp.root / row["keys_path"])
    if len(E) != len(keys):
        raise EmbedError(f"{row['path']} has {len(E)} rows but its keys have {len(keys)}; re-run `ctssl embed`")
    return np.asarray(E), keys, row


def compute_projections(store_root: str | Path, emb_id: str, cfg: EmbedConfig | None = None,
                        log: Callable[[str], None] | None = None, emb_row: dict[str, Any] | None = None,
                        record_run: str | None = None) -> list[dict[str, Any]]:
    """PCA (always) and UMAP (if ``cfg.umap``) of ``emb_id``; parquet ``row, x, y`` + ``projections`` rows
    (in the store, or in ``record_run``'s folder as ``save_embeddings`` does; ``emb_row``: the embedding's row)."""
    cfg = cfg or EmbedConfig()
    say = log or (lambda m: None)
    E, keys, _ = load_embeddings(store_root, emb_id, emb_row)
    sp = store_paths(store_root)
    rows_idx = stratified_sample(keys, cfg.max_points, seed=cfg.random_state)
    sampled = len(rows_idx) < len(E)
    out = []
    methods = (["pca"] if cfg.pca else []) + (["umap"] if cfg.umap else [])
    for method in methods:
        t0 = time.perf_counter()
        if method == "pca":
            pca, evr = project_pca(E, random_state=cfg.random_state)
            xy = pca.transform(E[rows_idx]).astype(np.float32)          # (n, 2), fitted on all rows
            params = dict(n_components=2, fit_n=int(len(E)), explained_variance_ratio=[float(v) for v in evr],
                          random_state=cfg.random_state)
        else:
            try:
                xy, params, _ = project_umap(E[rows_idx], cfg.umap_pca_dims, cfg.umap_neighbors, cfg.umap_min_dist,
                                             cfg.random_state)
            except EmbedError as e:
                say(f"umap of {emb_id} skipped: {e}")
                continue
        secs = time.perf_counter() - t0
        if sampled:
            params["sample"] = f"stratified by sex and race, {len(rows_idx)} of {len(E)} rows"
        if xy.shape[1] == 1:
            xy = np.concatenate([xy, np.zeros_like(xy)], 1)
        path = sp.embeddings / f"{emb_id}.{method}.parquet"
        pd.DataFrame({"row": rows_idx.astype(np.int64), "x": xy[:, 0], "y": xy[:, 1]}).to_parquet(path, index=False)
        row = dict(emb_id=emb_id, method=method, params=json.dumps(params), seconds=float(secs), n_points=int(len(rows_idx)),
                   sampled=bool(sampled), path=str(path.relative_to(sp.root)))
        if record_run is not None:
            from ctssl_core.results.runfolder import record_rows

            record_rows(store_root, record_run, "projections", [row])
        else:
            replace_projection(store_root, row)
        say(f"{method} of {emb_id}: {len(rows_idx)} points in {secs:.1f}s" + (" (sampled)" if sampled else ""))
        out.append(row)
    return out


def load_projection(store_root: str | Path, emb_id: str, method: str = "pca") -> pd.DataFrame:
    """Stored projection joined with the embedding's keys (x, y + demographics)."""
    sp = store_paths(store_root)
    path = projection_path(store_root, emb_id, method)
    if path is None:
        raise EmbedError(f"no {method} projection of {emb_id!r}; run `ctssl embed` (projections are made with the embeddings)")
    pts = pd.read_parquet(sp.root / path)
    _, keys, _ = load_embeddings(store_root, emb_id)
    return pd.concat([pts.reset_index(drop=True), keys.iloc[pts["row"].to_numpy()].reset_index(drop=True)], axis=1)


def resolve_encoder(checkpoint: str, store_root: str | Path, cfg: EmbedConfig):
    """(encoder, init, encoder key, run_id, tag) for ``random``, a run id or a checkpoint path."""
    import torch

    if checkpoint == "random":
        from ctssl_core.models import build_encoder

        if "windows" in cfg.encoder_kwargs:
            raise EmbedError("embed.encoder_kwargs must not set windows; set embed.windows (pretrain.windows in a "
                             "benchmark) instead")
        torch.manual_seed(cfg.seed)
        enc = build_encoder(cfg.encoder, windows=cfg.windows, **cfg.encoder_kwargs)
        # other options, another architecture: a digest keeps it from overwriting the default's embeddings
        opts = (f"-k{hashlib.sha256(json.dumps(cfg.encoder_kwargs, sort_keys=True).encode()).hexdigest()[:8]}"
                if cfg.encoder_kwargs else "")
        return enc, "random", cfg.encoder, None, f"random-{cfg.encoder}{opts}-s{cfg.seed}"
    from ctssl_core.checkpoint import load_encoder, read_checkpoint

    enc, run_cfg = load_encoder(checkpoint, store_root)
    from ctssl_core.models import windows_mismatch

    differs = windows_mismatch(enc, cfg.windows)
    if differs:
        raise EmbedError(f"{checkpoint} was trained {differs}; drop embed.windows to use its own")
    name = read_checkpoint(checkpoint, store_root).get("encoder_name") or cfg.encoder
    run_id, init = None, None
    r = run_origin(store_root, str(checkpoint))
    if r is not None:
        run_id = r[0]
        init = r[1] if r[1] else r[2]
    init = init or run_cfg.get("task") or run_cfg.get("pretext") or Path(str(checkpoint)).stem
    # a checkpoint outside the store's runs: a digest of its path, not its folder names (which may name people)
    tag = run_id or f"ckpt-{hashlib.sha256(str(Path(str(checkpoint)).resolve()).encode()).hexdigest()[:12]}"
    return enc, str(init), name, run_id, tag


def run_embed(store_root: str | Path, checkpoint: str, cfg: EmbedConfig | None = None,
              log: Callable[[str], None] | None = None, progress: bool = False,
              record_run: str | None = None) -> dict[str, str]:
    """Embed the evaluation split with ``checkpoint`` (run id, path or 'random'); store slice + exam
    embeddings and their projections. Returns ``{"slice": emb_id, "exam": emb_id}``. ``record_run``: a
    benchmark unit's run id: the rows go to its run folder, for the benchmark to merge."""
    from ctssl_core.data.store import SliceStore

    cfg = cfg or EmbedConfig()
    say = log or (lambda m: None)
    sp = store_paths(store_root)
    if not sp.db.exists():
        raise EmbedError(f"no ctssl store at {sp.root}; create one with `ctssl synth` + `ctssl ingest`")
    enc, init, name, run_id, tag = resolve_encoder(checkpoint, store_root, cfg)
    keys = catalog_keys(store_root, split=cfg.split, split_seed=cfg.split_seed, pool=cfg.pool,
                        fractions=cfg.split_fractions)
    keys = even_per_series(keys, cfg.max_per_series)
    if keys.empty:
        raise EmbedError(f"split {cfg.split!r} (seed {cfg.split_seed}) has no slices in {sp.root}; choose another split")
    store = SliceStore.open(store_root)
    say(f"embedding {len(keys)} slices of split {cfg.split} with {tag} ({name})")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(keys), desc=f"embed {tag}", unit="slice")
    try:
        E = embed_array(enc, store.read, keys["slice_id"].to_numpy(), cfg.batch_size, cfg.device,
                        progress=(lambda done, n: bar.update(done - bar.n)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    ids = {}
    for level, (V, K) in {"slice": (E, keys), "exam": exam_table(E, keys)}.items():
        emb_id = f"{tag}-{cfg.split}-{level}"
        row = save_embeddings(store_root, emb_id, V, K, run_id=run_id, init=init, encoder=name, split=cfg.split,
                              level=level, record_run=record_run)
        compute_projections(store_root, emb_id, cfg, log=say, emb_row=row, record_run=record_run)
        ids[level] = emb_id
    return ids


# tissue HU ranges of the raw-HU baseline features (lung, fat, cancellous bone, cortical bone)
TISSUE_RANGES: dict[str, tuple[float, float]] = {
    "lung": (-950.0, -600.0), "fat": (-200.0, -40.0), "cancellous": (120.0, 400.0), "cortical": (400.0, 1500.0)}


def hu_features(hu: np.ndarray) -> np.ndarray:
    """A hand-crafted, encoder-free baseline "embedding" of int16 HU slices (B, H, W) -> (B, 6).

    Mean HU inside each tissue range of ``TISSUE_RANGES``, the body fraction
    (HU > -300) and the body's width fraction along the widest row. It exists
    to validate the bias analysis: on the synthetic cohort these raw features
    carry the planted age (lung/bone HU), sex (body size) and race (fat/bone HU)
    correlates, so the analysis must find them, and nothing for control_group.
    """
    x = np.asarray(hu, dtype=np.float32)                                   # (B, H, W)
    out = []
    for lo, hi in TISSUE_RANGES.values():
        m = (x > lo) & (x < hi)
        s = (x * m).sum((1, 2))
        n = m.sum((1, 2))
        out.append(np.where(n > 0, s / np.maximum(n, 1), (lo + hi) / 2))
    body = x > -300
    out.append(body.mean((1, 2)))
    out.append(body.sum(2).max(1) / x.shape[2])                            # widest row of body pixels
    return np.stack(out, 1).astype(np.float32)                             # (B, 6)
