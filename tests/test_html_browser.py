"""The offline HTML pages in a real headless browser (Debian's chromium + chromedriver, driven by selenium).

Each page is opened from file:// with the network pointed at a dead proxy: it must load with no
console errors, its selectors must change what is drawn, and hovering must show the values.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no headless browser: install Debian's chromium and chromium-driver packages (.ci/run does) "
           "to check the HTML pages in a real browser")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"):
        opts.add_argument(arg)  # every network request would fail (and show as a console error)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _assert_clean(driver, html: str):
    assert not re.search(r"https?://", html, re.IGNORECASE)
    assert driver.execute_script("return window.minigptErrors") == []
    # Console errors, failed requests and uncaught exceptions are SEVERE (the test's own getImageData
    # readbacks draw a performance WARNING).
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []


def _open_clean(driver, path):
    driver.get(path.resolve().as_uri())
    _assert_clean(driver, path.read_text(encoding="utf-8"))


def _weights():
    from minigpt_core import build_model, parse_spec
    from minigpt_core.inspection import attention_weights

    spec = parse_spec({"seed": 1, "model": {"vocab_size": 64, "context_length": 16, "emb_dim": 32, "n_heads": 4,
                                            "n_layers": 2, "attention": {"name": "book.multihead"}},
                       "tokenizer": {"name": "char"}})
    idx = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    return [w[0].numpy() for w in attention_weights(build_model(spec), idx)]


def test_attention_page_draws_the_chosen_layer_and_head_and_shows_where_a_token_attends(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from minigpt_core.viz.attention import write_attention_page

    weights = _weights()
    tokens = ["The", " cat", " sat", "\n", "on", " the", " mat", ".", " It", " was", " $5", " <b>"]
    page = write_attention_page(tmp_path / "attention.html", weights, tokens, title="test")
    _open_clean(browser, page)
    d = browser
    spans = d.find_elements(By.CSS_SELECTOR, "#tokens span")
    assert [s.get_attribute("textContent") for s in spans][:3] == ["The", " cat", " sat"]
    assert spans[-1].get_attribute("textContent") == " <b>"  # text, not markup

    def drawn():
        return d.execute_script("return document.getElementById('heat').toDataURL()")

    def pixel(i, j):  # colour at the centre of cell (query i, key j)
        return d.execute_script(
            "const c = document.getElementById('heat').getContext('2d');"
            "return Array.from(c.getImageData(M + arguments[1] * CELL + CELL / 2 | 0,"
            " M + arguments[0] * CELL + CELL / 2 | 0, 1, 1).data).slice(0, 3);", i, j)

    def expected(w, i, j):
        vmax = np.tril(w).max()
        return d.execute_script("return minigptColor('viridis', Math.sqrt(arguments[0]))", float(w[i, j] / vmax))

    first = drawn()
    assert pixel(5, 2) == expected(weights[0][0], 5, 2) and pixel(2, 5) == [212, 212, 212]  # masked future
    Select(d.find_element(By.ID, "layer")).select_by_index(1)
    second = drawn()
    assert second != first
    assert pixel(7, 3) == expected(weights[1][0], 7, 3)
    Select(d.find_element(By.ID, "head")).select_by_value("2")
    assert drawn() != second
    assert pixel(9, 0) == expected(weights[1][2], 9, 0)
    Select(d.find_element(By.ID, "head")).select_by_value("mean")
    assert pixel(9, 4) == expected(weights[1].mean(0), 9, 4)

    Select(d.find_element(By.ID, "head")).select_by_value("2")
    ActionChains(d).move_to_element(spans[6]).perform()
    backgrounds = [s.value_of_css_property("background-color") for s in spans]
    assert all(b != "rgba(0, 0, 0, 0)" for b in backgrounds[:7])  # the tokens it attends to are coloured
    assert all(b == "rgba(0, 0, 0, 0)" for b in backgrounds[7:])  # the future is not
    assert "query 6" in d.find_element(By.ID, "tip").text
    Select(d.find_element(By.ID, "head")).select_by_value("0")
    assert [s.value_of_css_property("background-color") for s in spans][:7] != backgrounds[:7]
    _assert_clean(d, page.read_text(encoding="utf-8"))


def test_per_token_page_colours_by_loss_or_difference_and_shows_values(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from minigpt_core.viz.tokens import write_loss_page

    rng = np.random.default_rng(0)
    tokens = list("The cat sat on the mat.\nIt was warm.")
    loss = rng.uniform(0, 5, len(tokens)).astype(np.float32)
    other = (loss + rng.normal(0, 1, len(tokens))).astype(np.float32)
    page = write_loss_page(tmp_path / "per-token.html", tokens, loss, other=other, names=("new", "old"),
                           window_starts=[0, 20])
    _open_clean(browser, page)
    d = browser
    spans = d.find_elements(By.CSS_SELECTOR, "#text span[data-k]")
    assert len(spans) == len(tokens) and len(d.find_elements(By.CSS_SELECTOR, "#text .window")) == 2

    def colours():
        return [s.value_of_css_property("background-color") for s in spans]

    diff = colours()
    Select(d.find_element(By.ID, "mode")).select_by_value("loss")
    by_loss = colours()
    assert by_loss != diff
    Select(d.find_element(By.ID, "mode")).select_by_value("other")
    assert colours() != by_loss
    hardest = int(np.argmax(loss))
    ActionChains(d).move_to_element(spans[hardest]).perform()
    tip = d.find_element(By.ID, "tip").text
    assert f"loss {loss[hardest]:.4f}" in tip and f"old {other[hardest]:.4f}" in tip
    _assert_clean(d, page.read_text(encoding="utf-8"))


def test_single_model_page_has_no_mode_choice(browser, tmp_path):
    from selenium.webdriver.common.by import By

    from minigpt_core.viz.tokens import write_loss_page

    page = write_loss_page(tmp_path / "p.html", ["a", "b", "c"], np.array([0.1, 2.0, 4.0], dtype=np.float32))
    _open_clean(browser, page)
    assert not browser.find_element(By.ID, "mode-box").is_displayed()
    spans = browser.find_elements(By.CSS_SELECTOR, "#text span[data-k]")
    c = [s.value_of_css_property("background-color") for s in spans]
    assert len(set(c)) == 3
