"""Chart builders on hand-made frames: what the browser receives equals what was passed in."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ctssl_core import charts


def _forest() -> pd.DataFrame:
    return pd.DataFrame({
        "init": ["rotation", "flip", "positive_control", "rotation"],
        "group": ["strategy", "strategy", "control", "strategy"],
        "fraction": [1.0, 1.0, 1.0, 0.05],
        "value": [0.10, -0.02, 0.20, 0.04], "ci_low": [0.05, -0.08, 0.12, -0.01],
        "ci_high": [0.15, 0.04, 0.28, 0.09], "corrected": [False, False, False, True],
        "adj_low": [0.04, -0.09, 0.12, -0.01], "adj_high": [0.16, 0.05, 0.28, 0.09],
        "established": ["gain", "", "gain", ""], "source": ["delta_x"] * 3 + ["verdict_x"]})


def test_forest_fig_rows_values_and_highlight():
    fig = charts.forest_fig(_forest(), "pe", "twin_exam", flagged={"flip"})
    strat, ctrl = fig.data
    assert strat.name == "strategies" and ctrl.name == "controls (not strategies)"
    assert list(strat.y) == ["rotation @ 100%", "flip ⚠ @ 100%", "rotation @ 5%"]
    assert np.allclose(strat.x, [0.10, -0.02, 0.04]) and np.allclose(ctrl.x, [0.20])
    # bars are the corrected interval; colour only where it excludes 0
    assert np.allclose(np.asarray(strat.x) + strat.error_x.array, [0.16, 0.05, 0.09])
    assert np.allclose(np.asarray(strat.x) - strat.error_x.arrayminus, [0.04, -0.09, -0.01])
    assert list(strat.marker.color) == [charts.GAIN_COLOR, charts.UNCLEAR_COLOR, charts.UNCLEAR_COLOR]
    assert list(strat.marker.symbol) == ["circle", "circle-open", "circle-open"]
    assert list(ctrl.marker.symbol) == ["diamond"]
    # strategies drawn above the controls (category order is bottom-up)
    assert list(fig.layout.yaxis.categoryarray)[-1] == "rotation @ 100%"
    assert list(fig.layout.yaxis.categoryarray)[0] == "positive_control @ 100%"


def test_forest_fig_loss_in_red_and_controls_only():
    d = _forest().assign(established=["loss", "", "", ""])
    assert charts.forest_fig(d, "pe", "m").data[0].marker.color[0] == charts.LOSS_COLOR
    only = charts.forest_fig(d[d.group == "control"], "pe", "m")
    assert [t.name for t in only.data] == ["controls (not strategies)"]


def test_init_colours_are_stable_across_figures():
    a = charts.init_colors(["random", "rotation", "flip"])
    b = charts.init_colors(["random", "rotation", "masked_region", "positive_control", "denoise", "next_slice"])
    assert a["rotation"] == b["rotation"] and a["random"] == b["random"] == charts.REFERENCE_COLOR
    assert len(set(b.values())) == len(b)
    c = charts.init_colors(["random", "my_own", "rotation"])
    assert c["my_own"] not in (c["rotation"], c["random"])


def test_fraction_curves_bands_only_where_asked():
    df = pd.DataFrame({"init": ["random"] * 2 + ["rotation"] * 2 + ["positive_control"] * 2,
                       "fraction": [0.1, 1.0] * 3, "value": [0.5, 0.6, 0.55, 0.65, 0.6, 0.7],
                       "ci_low": [0.4, 0.5, 0.45, 0.55, 0.5, 0.6], "ci_high": [0.6, 0.7, 0.65, 0.75, 0.7, 0.8],
                       "n_seeds": 1})
    every = charts.fraction_curves_fig(df, "pe", "m")
    assert sum(t.fill == "toself" for t in every.data) == 3
    some = charts.fraction_curves_fig(df, "pe", "m", bands={"random"})
    assert [t.legendgroup for t in some.data if t.fill == "toself"] == ["random"]
    lines = {t.name: t.line for t in some.data if t.mode == "lines+markers"}
    assert lines["random"].dash == "dash" and lines["positive_control"].dash == "dot"
    assert lines["rotation"].dash == "solid"
    assert np.allclose(next(t for t in some.data if t.name == "rotation").y, [0.55, 0.65])
