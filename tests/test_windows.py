"""Several HU windows as input channels: the loader's layout, the encoder's identity, checkpoints that
carry their windows, and whole slices for the global pretext tasks (issue "A benchmark with power")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _fit_fakes import ArrayStore, make_arrays
from ctssl_core import ops
from ctssl_core.config import ConfigError
from ctssl_core.data.loader import SliceBatcher

torch.set_num_threads(1)
RSNA3 = ops.WINDOWS["rsna3"]


def test_model_input_stacks_one_channel_per_window_and_slice_at_reads_both_layouts():
    hu = torch.tensor([-1000, -600, 40, 100, 2000], dtype=torch.int16).view(1, 1, 1, 5).expand(2, 2, 3, 5)
    one, three = ops.model_input(hu, "paper"), ops.model_input(hu, "rsna3")
    assert one.shape == (2, 2, 3, 5) and three.shape == (2, 2, 3, 3, 5)               # (B, S, [C,] H, W)
    for c, (level, width) in enumerate(RSNA3):
        assert torch.equal(three[:, :, c], ops.window(hu, level, width))
    assert ops.slice_at(one, 1).shape == (2, 1, 3, 5) and ops.slice_at(three, 1).shape == (2, 3, 3, 5)
    assert torch.equal(ops.slice_at(three, 0)[:, 0], ops.window(hu[:, 0], *RSNA3[0]))
    with pytest.raises(ConfigError, match=r"\(B, S, H, W\)"):
        ops.slice_at(torch.zeros(2, 3, 4), 0)


def test_loader_gives_windows_as_channels_after_resize_and_crop():
    store = ArrayStore(make_arrays(n_series=2, n_slices=8, size=32), pe=[np.arange(8) % 2] * 2)
    raw = next(iter(SliceBatcher(store, None, 4, context=2, gap=1, seed=0, windows="rsna3", crop=8, wants_hu=True)))
    assert raw["x"].shape == (4, 2, 3, 8, 8) and raw["hu"].shape == (4, 2, 8, 8)
    for c, (level, width) in enumerate(RSNA3):        # same crop for every window of a slice
        assert torch.equal(raw["x"][:, :, c], ops.window(raw["hu"], level, width))
    small = next(iter(SliceBatcher(store, None, 4, context=2, gap=1, seed=0, windows="rsna3", image_size=16, crop=8)))
    assert small["x"].shape == (4, 2, 3, 8, 8)
    plain = next(iter(SliceBatcher(store, None, 4, context=2, gap=1, seed=0, image_size=16, crop=8)))
    assert plain["x"].shape == (4, 2, 8, 8)
    assert torch.equal(plain["x"], next(iter(SliceBatcher(store, None, 4, context=2, gap=1, seed=0, image_size=16,
                                                            crop=8, windows="paper")))["x"])
    with pytest.raises(ConfigError, match="unknown window preset"):
        SliceBatcher(store, None, 4, windows="bone")


def test_encoder_channels_follow_the_windows_and_dense_heads_predict_every_window():
    from ctssl_core.models import build_encoder
    from ctssl_core.pretext import make_pretext

    enc = build_encoder("tiny", windows="rsna3")
    assert enc.in_chans == 3 and enc.windows == RSNA3 and enc.kwargs["windows"] == [list(w) for w in RSNA3]
    assert build_encoder("tiny").windows == ops.WINDOWS["paper"] and build_encoder("tiny").in_chans == 1
    assert build_encoder("paper", n_res=0).in_chans == 3                      # one window: grey copies, as the paper
    with pytest.raises(ConfigError, match="in_chans"):
        build_encoder("tiny", windows="rsna3", in_chans=1)
    x = torch.rand(2, 2, 3, 32, 32)                                           # (B, S, C, H, W)
    g = torch.Generator().manual_seed(0)
    for name in ("masked_region", "denoise", "next_slice", "rotation", "flip"):
        task = make_pretext(name)
        batch = task.make_batch({"x": x[:, :task.context]}, g)
        assert batch.inputs.shape == (2, 3, 32, 32), name
        head = task.build_head(enc)
        loss, _ = task.loss(task.forward(enc, head, batch), batch)
        assert torch.isfinite(loss), name


def test_global_pretext_tasks_see_the_whole_slice_resized_not_a_crop():
    from ctssl_core.pretext import make_pretext
    from ctssl_core.pretrain import input_geometry

    assert input_geometry(make_pretext("rotation"), 0, 64) == (64, None)
    assert input_geometry(make_pretext("flip"), 0, 64) == (64, None)
    assert input_geometry(make_pretext("masked_region"), 0, 64) == (None, 64)
    assert input_geometry(make_pretext("denoise"), 96, 0) == (96, None)
    assert input_geometry(make_pretext("composite", tasks=("masked_region", "rotation")), 0, 64) == (64, None)


def test_checkpoints_carry_their_windows_and_a_different_view_is_refused(smoke_store, tmp_path):
    """The smoke profile pretrains on rsna3: fine-tune and embed use the checkpoint's windows, and asking
    for another view is an error (a 3-window encoder fed grey copies would be silently wrong)."""
    from ctssl_core.checkpoint import load_encoder
    from ctssl_core.embed import EmbedConfig, EmbedError, resolve_encoder
    from ctssl_core.export import export_run
    from ctssl_core.finetune import resolve_init
    from ctssl_core.results import read

    runs = read.run_table(smoke_store)
    pre = runs[(runs.kind == "pretrain") & (runs.status == "succeeded")].run_id.iloc[0]
    enc, cfg = load_encoder(pre, smoke_store)
    assert enc.windows == RSNA3 and cfg["data"]["windows"] == [list(w) for w in RSNA3]
    assert resolve_init(pre, smoke_store, "tiny", {}, "rsna3")[0].windows == RSNA3
    with pytest.raises(ConfigError, match="pretrained on windows"):
        resolve_init(pre, smoke_store, "tiny", {}, "paper")
    with pytest.raises(EmbedError, match="trained on windows"):
        resolve_encoder(pre, smoke_store, EmbedConfig(windows="paper"))
    _, card = export_run(pre, tmp_path / "export", smoke_store)
    import json

    prep = json.loads(card.read_text())["preprocessing"]
    assert prep["channels"] == 3 and [(w["level"], w["width"]) for w in prep["windows"]] == list(RSNA3)
