"""The dashboard in a real browser: every page, one control each, visible text asserted, screenshots saved.

Runs ``streamlit run app.py`` headless on a free localhost port against a
seeded store and drives Debian's Chromium through Playwright (see
``browser_harness.py``). Screenshots land in ``test-artifacts/``.
"""

from __future__ import annotations

import pytest

from browser_harness import exceptions_on_page, goto_page, shot, start_dashboard_module, wait_script_done  # noqa: F401
from ctssl_core.results import read
from ctssl_core.results.seed import SeedConfig, seed_store

pytestmark = pytest.mark.browser
TIMEOUT = 90_000  # generous: the CI machine is shared; waits end as soon as the text shows


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, start_dashboard_module):
    seeded = seed_store(tmp_path_factory.mktemp("browser"), SeedConfig(n_runs=14, n_steps=2000))
    return start_dashboard_module(seeded.root), seeded


def visible(page, text: str) -> None:
    page.get_by_text(text).first.wait_for(state="visible", timeout=TIMEOUT)


def no_errors(page) -> None:
    assert exceptions_on_page(page) == []
    assert "Traceback" not in page.inner_text("body")


def pick(page, label: str, option: str) -> None:
    """Choose ``option`` in the selectbox labelled ``label``."""
    page.locator('[data-testid="stSelectbox"]').filter(has_text=label).first.click()
    page.get_by_role("option", name=option, exact=True).click()
    wait_script_done(page, TIMEOUT)


def choose_radio(page, label: str, option: str) -> None:
    page.locator('[data-testid="stRadio"]').filter(has_text=label).first.get_by_text(option, exact=True).click()
    wait_script_done(page, TIMEOUT)


def test_overview(app_url, page):
    url, seeded = app_url
    goto_page(page, url, "overview", timeout_ms=TIMEOUT)
    visible(page, "Which pretraining strategy should I use?")
    visible(page, "Verdict per strategy")
    visible(page, "sensitivity unknown")                  # the seeded store ran no controls
    for line in read.verdicts(read.headline_table(seeded.root)):
        assert line.split("**")[1] in page.inner_text("body")
    page.get_by_test_id("stExpander").get_by_text("All metrics").click()  # the control: open the expander
    page.get_by_test_id("stExpander").get_by_test_id("stDataFrame").first.wait_for(timeout=TIMEOUT)
    no_errors(page)
    shot(page, "overview")


def test_compare(app_url, page):
    url, _ = app_url
    goto_page(page, url, "compare", timeout_ms=TIMEOUT)
    visible(page, "pe: slice_auroc vs label fraction")
    pick(page, "Task · metric", "nodule · dice")
    visible(page, "nodule: dice vs label fraction")
    visible(page, "Segmentation learning speed")
    no_errors(page)
    shot(page, "compare")


def test_learning_curves(app_url, page):
    url, _ = app_url
    goto_page(page, url, "curves", timeout_ms=TIMEOUT)
    visible(page, "Still running")
    visible(page, "points drawn, at most")
    choose_radio(page, "x axis", "epoch")
    page.locator("svg text").filter(has_text="epoch").first.wait_for(timeout=TIMEOUT)  # bottom panel's x title
    no_errors(page)
    shot(page, "curves")


def test_embeddings(app_url, page):
    url, _ = app_url
    goto_page(page, url, "embeddings", timeout_ms=TIMEOUT)
    visible(page, "not that a downstream model")
    page.locator(".gtitle").filter(has_text="UMAP").first.wait_for(timeout=TIMEOUT)
    page.locator(".gtitle").filter(has_text="PCA").first.wait_for(timeout=TIMEOUT)   # side by side, no toggle
    visible(page, "A linear probe predicts race")
    no_errors(page)
    shot(page, "embeddings")


def test_data(app_url, page):
    url, _ = app_url
    goto_page(page, url, "data", timeout_ms=TIMEOUT)
    visible(page, "Slice viewer")
    # the ingest-errors grid draws on a canvas; its cells exist (hidden) in the accessibility DOM
    page.get_by_text("incoming/p9/broken.dcm").first.wait_for(state="attached", timeout=TIMEOUT)
    choose_radio(page, "Window", "lung")
    visible(page, "lung (L -600, W 1500)")
    no_errors(page)
    shot(page, "data")


def test_sidebar_store_is_a_list_of_configured_stores(app_url, page):
    """Issue 13 item 17: a visitor cannot type a path; the list holds the configured store only."""
    url, seeded = app_url
    goto_page(page, url, "overview", timeout_ms=TIMEOUT)
    dialog = page.get_by_role("dialog")
    assert dialog.count() == 0, f"modal open on the overview page: {dialog.first.inner_text()!r}"
    assert page.get_by_role("textbox", name="Store").count() == 0
    page.locator('[data-testid="stSelectbox"]').filter(has_text="Store").first.click()
    options = [o.inner_text().strip() for o in page.get_by_role("option").all()]
    assert options == [str(seeded.root)]
    page.keyboard.press("Escape")
    no_errors(page)
    shot(page, "store_list")


@pytest.fixture(scope="module")
def smoke_url(smoke_store, start_dashboard_module):
    return start_dashboard_module(smoke_store)


# what plotly.js drew: ``_fullData`` holds the decoded arrays (the figure spec ships them base64-encoded)
PLOTS_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(g => ({
    title: g.layout.title.text, data: g._fullData.map(t => ({name: t.name, x: Array.from(t.x || []),
                                                           y: Array.from(t.y || [])}))}))"""


def test_forest_plot_values_equal_the_summaries_deltas(smoke_url, smoke_store, page):
    """Issue 14: what the browser draws for 'how much better than random init' is the benchmark's deltas."""
    import duckdb

    goto_page(page, smoke_url, "compare", timeout_ms=TIMEOUT)
    visible(page, "How much better than random init, and is it real?")
    page.locator(".gtitle").filter(has_text="minus random init").first.wait_for(timeout=TIMEOUT)
    forest = next(p for p in page.evaluate(PLOTS_JS) if "minus random init" in p["title"])
    con = duckdb.connect(str(smoke_store / "ctssl.duckdb"), read_only=True)
    try:
        want = con.execute("SELECT init, value FROM summaries WHERE task = 'pe' "
                           "AND metric IN ('delta_twin_exam', 'verdict_twin_exam')").df()
    finally:
        con.close()
    got = sorted((y.split(" ")[0], x) for t in forest["data"] for x, y in zip(t["x"], t["y"]))
    assert [i for i, _ in got] == sorted(want.init)
    assert [x for _, x in got] == pytest.approx([v for _, v in sorted(zip(want.init, want.value))])
    assert {t["name"] for t in forest["data"]} == {"strategies", "controls (not strategies)"}
    no_errors(page)
    shot(page, "compare_forest")


def test_deep_link_reproduces_a_view(smoke_url, smoke_store, page):
    """Issue 14: the address carries the view; opening it in a new tab shows the same thing."""
    goto_page(page, smoke_url, "compare", timeout_ms=TIMEOUT)
    pick(page, "Task · metric", "nodule · cpm")
    page.locator(".gtitle").filter(has_text="nodule: cpm minus random init").first.wait_for(timeout=TIMEOUT)
    link = page.url
    assert "metric=nodule" in link and "benchmark=" in link
    other = page.context.new_page()
    other.goto(link, timeout=TIMEOUT)
    wait_script_done(other, TIMEOUT)
    other.locator(".gtitle").filter(has_text="nodule: cpm minus random init").first.wait_for(timeout=TIMEOUT)
    assert [p["title"] for p in other.evaluate(PLOTS_JS)] == [p["title"] for p in page.evaluate(PLOTS_JS)]
    no_errors(other)


# screen position of point ``i`` of trace ``t`` in the first plot whose title starts with ``prefix``
POINT_JS = """([prefix, t, i]) => {
    const g = Array.from(document.querySelectorAll('.js-plotly-plot'))
        .find(g => ((g._fullLayout && g._fullLayout.title && g._fullLayout.title.text) || '')
            .replace(/<[^>]+>/g, '').startsWith(prefix));
    if (!g) return {titles: Array.from(document.querySelectorAll('.js-plotly-plot'))
        .map(g => g._fullLayout && g._fullLayout.title ? g._fullLayout.title.text : null)};
    const fl = g._fullLayout, box = g.getBoundingClientRect(), tr = g._fullData[t];
    return {x: box.left + fl._size.l + fl.xaxis.d2p(tr.x[i]), y: box.top + fl._size.t + fl.yaxis.d2p(tr.y[i]),
            hover: tr.customdata ? String(tr.customdata[i]) : ''};
}"""


def test_clicking_an_embedding_point_opens_its_slice(smoke_url, smoke_store, page):
    """Issue 14 item 6: a click on a point of the scatter (Plotly selection) shows the slice it came from."""
    goto_page(page, smoke_url, "embeddings", timeout_ms=TIMEOUT)
    page.locator(".gtitle").filter(has_text="PCA").first.wait_for(timeout=TIMEOUT)
    plot = page.locator(".js-plotly-plot").first
    plot.scroll_into_view_if_needed()
    pt = page.evaluate(POINT_JS, ["PCA", 0, 1])
    assert "hover" in pt, pt
    row = int(pt["hover"].split("<br>")[0].removeprefix("row: "))               # the hover names the point's row
    assert page.get_by_label("Point (row)", exact=True).input_value() != str(row)   # not the default point
    page.mouse.move(pt["x"], pt["y"])
    page.mouse.click(pt["x"], pt["y"])
    wait_script_done(page, TIMEOUT)
    caption = page.get_by_test_id("stImage").first
    caption.wait_for(timeout=TIMEOUT)
    page.get_by_text(f"point {row} ·").first.wait_for(state="visible", timeout=TIMEOUT)
    assert page.get_by_label("Point (row)", exact=True).input_value() == str(row)
    no_errors(page)
    shot(page, "embeddings_point_slice")
