"""The routing explorer page (GET /explore) in a real browser: Playwright driving chromium.

One `python -m experiments.serve` per module (a random tiny MoE, subsets "code" and "prose"
besides "all", a cluster file of experiments.cluster's format), on a free 127.0.0.1 port,
stopped by pid with SIGTERM. The page is loaded, a text pasted, and the token grid and the two
continuations it shows are checked against POST /v1/route and POST /v1/completions. Skips when
Playwright (pip install playwright) or a chromium binary (Debian: apt-get install chromium; or
$CHROMIUM) is missing: Playwright's own browser download is not needed. With
$EXPLORE_SCREENSHOT set, the page's screenshot is written there (docs/explore.png is one).
"""

import json
import os
import shutil

import httpx
import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

from emo_jax.train import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position
from tests.random_model import random_params  # pylint: disable=wrong-import-position
from tests.test_serve import CFG, CODE_DOCS, serve_process  # pylint: disable=wrong-import-position

PROSE_DOCS = ["Once upon a time there was a king.\n", "The weather was fine that day.\n",
              "She walked to the market and bought bread.\n"]
TEXT = "def square(x):\n    return x * x\n"


def chromium() -> str:
  for candidate in (os.environ.get("CHROMIUM"), shutil.which("chromium"),
                    shutil.which("chromium-browser"), shutil.which("google-chrome")):
    if candidate and os.path.exists(candidate):
      return candidate
  pytest.skip("no chromium binary (apt-get install chromium, or set $CHROMIUM)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  root = tmp_path_factory.mktemp("explore_http")
  _, params = random_params(CFG, seed=5)
  ckpt_lib.save_params(root / "explored", params, CFG.to_dict())
  for name, docs in (("code", CODE_DOCS), ("prose", PROSE_DOCS)):
    (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  R = CFG.num_routed_experts
  usage = np.zeros((CFG.num_layers, 3, R))
  for e in range(R):
    usage[:, e % 3, e] = 1.0
  (root / "clusters.json").write_text(json.dumps({
      "model": "explored", "domains": ["code", "news", "stories"],
      "models": {"explored": {"expert_usage": usage.tolist()}}}))
  with serve_process([f"--checkpoint={root / 'explored'}", "--tokenizer=bytes",
                      f"--subset=code={root / 'code.jsonl'}:4",
                      f"--subset=prose={root / 'prose.jsonl'}:4",
                      f"--clusters={root / 'clusters.json'}", "--slots=2",
                      "--request_timeout=60", "--drain_seconds=2"], root / "server.log") as url:
    yield url


def test_explore_page_shows_the_routing_and_two_continuations(server, tmp_path):
  sync_api = pytest.importorskip("playwright.sync_api",
                                 reason="Playwright is not installed (pip install playwright)")
  executable = chromium()
  page_html = httpx.get(server + "/explore", timeout=10)
  assert page_html.status_code == 200 and "text/html" in page_html.headers["content-type"]
  with sync_api.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=executable, headless=True,
                                args=["--no-sandbox", "--disable-gpu"])
    try:
      page = browser.new_page(viewport={"width": 1280, "height": 900})
      errors = []
      page.on("pageerror", lambda e: errors.append(str(e)))
      page.goto(server + "/explore")
      page.wait_for_selector("body[data-ready='1']", timeout=30_000)
      page.fill("#text", TEXT)
      page.select_option("#subset-a", "code")
      page.select_option("#subset-b", "prose")
      page.fill("#max-tokens", "8")
      page.fill("#pool-size-input", "3")
      page.click("#go")
      page.wait_for_selector("body[data-done='1']", timeout=60_000)
      cells = page.eval_on_selector_all(
          "td.cell", "cells => cells.map(c => [+c.dataset.layer, +c.dataset.token, "
          "c.dataset.experts])")
      heads = page.eval_on_selector_all("th.token", "hs => hs.length")
      continuations = [page.get_attribute(f"#cont-{s}", "data-text") for s in "ab"]
      best = page.inner_text("#best")
      pools = page.eval_on_selector_all("#pool li", "items => items.map(i => i.textContent)")
      legend = page.inner_text("#legend")
      shot = os.environ.get("EXPLORE_SCREENSHOT") or str(tmp_path / "explore.png")
      page.screenshot(path=shot, full_page=True)
      assert not errors, errors
    finally:
      browser.close()
  route = httpx.post(server + "/v1/route", json={"text": TEXT, "experts": "all", "pool_size": 3},
                     timeout=60).json()
  assert pools == [f"layer {p['layer']}: {' '.join(map(str, p['experts']))}"
                   for p in route["pool"]]
  assert heads == len(route["tokens"]) == len(TEXT.encode())
  assert len(cells) == len(route["tokens"]) * CFG.num_layers
  for layer, token, experts in cells:
    assert experts == ",".join(map(str, route["tokens"][token]["layers"][layer]["experts"]))
  assert best == route["best_subset"] and best in ("code", "prose")
  assert "stories" in legend
  for name, shown in zip(("code", "prose"), continuations):
    want = httpx.post(server + "/v1/completions", json={
        "prompt": TEXT, "experts": name, "max_tokens": 8, "temperature": 0}, timeout=60).json()
    assert shown == want["choices"][0]["text"], name
  assert os.path.getsize(shot) > 10_000
