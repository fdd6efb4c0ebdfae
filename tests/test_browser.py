"""The web page in a real headless Chromium (Debian's, driven by Playwright): upload, caption, attention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attncap.images import load_image
from attncap.predict import Predictor
from attncap.serve import background_server, create_app

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Canvas pixels as numbers the test can compare: total alpha and a checksum of every byte.
CANVAS_STATS = """() => {
  const c = document.getElementById('overlay');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let alpha = 0, sum = 0;
  for (let i = 0; i < d.length; i += 4) { alpha += d[i + 3]; sum = (sum * 31 + d[i] + d[i + 3]) % 1000000007; }
  return {width: c.width, height: c.height, alpha: alpha, checksum: sum};
}"""


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    if not CHROMIUM.is_file():
        pytest.fail("Debian's chromium is missing: `make install` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=ARGS,
            viewport={"width": 1100, "height": 760})
        try:
            yield context.new_page()
        finally:
            context.close()


def test_upload_shows_the_caption_alternatives_and_attention(trained_run, browser_page, tmp_path):
    predictor = Predictor.from_run(trained_run)
    image = sorted((trained_run / "dataset" / "images").glob("*.jpg"))[3]
    expected = predictor.caption([load_image(image)], n_best=2)[0]
    maps = expected[0].attention
    assert len(maps) >= 2, "the tiny model should write more than one word"
    # Hover the word whose map differs most from the first word's, so the overlay must change.
    other = int(np.argmax([np.abs(m - maps[0]).sum() for m in maps]))
    page, outside = browser_page, []
    with background_server(create_app(predictor)) as url:
        page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else outside.append(r.url))
        page.goto(url)
        page.wait_for_selector("#model:not(:empty)")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#result[data-state=ready]", timeout=60_000)
        words = page.locator("#caption .word").all_inner_texts()
        assert " ".join(words) == expected[0].caption
        alternatives = page.locator("#alternatives li").all_inner_texts()
        assert len(alternatives) == 2 and alternatives[0].startswith(expected[0].caption)
        first = page.evaluate(CANVAS_STATS)
        assert first["width"] > 100 and first["alpha"] > 0  # the overlay is drawn
        page.locator("#caption .word").nth(other).hover()
        assert page.locator("#caption .word.active").inner_text() == words[other]
        hovered = page.evaluate(CANVAS_STATS)
        assert hovered["checksum"] != first["checksum"]  # another word, another map
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        text = tmp_path / "notes.jpg"
        text.write_text("not a picture\n")
        page.set_input_files("#file", str(text))
        page.wait_for_selector("#status.error", timeout=60_000)
        assert "notes.jpg: not an image" in page.inner_text("#status")
    assert shot.stat().st_size > 10_000
    assert outside == []  # no CDN, no fonts, nothing but the server itself
