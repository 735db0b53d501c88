"""Open a local HTML file in Debian's headless Chromium (driven by Playwright, no browser download)
and report what a user would see: console errors, network requests (every one but the file itself
is blocked and recorded), the time to the first render, and whether each panel is blank."""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-default-apps", "--no-first-run", "--disable-dev-shm-usage"]


def missing() -> str | None:
    """Why a browser test cannot run here (None when it can)."""
    if not os.path.isfile(CHROMIUM) or not os.access(CHROMIUM, os.X_OK):
        return f"Chromium not found at {CHROMIUM}: install Debian's chromium package (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright; no browser download needed)"
    return None


def pixel_spread(png: bytes) -> float:
    """Standard deviation of an element screenshot's pixels (0 for a blank, uniform panel)."""
    import numpy as np
    from PIL import Image

    return float(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32).std())


def hover_explorer(page, view: str = "all methods", colour: str = "method") -> int:
    """On an explorer page: open the tab ``view``, colour by ``colour``, move the mouse over the plot
    until a point's tooltip shows; the number of thumbnails it shows (0: no tooltip found)."""
    page.get_by_text(view, exact=True).click()
    page.select_option("select", colour)
    canvases = [c.bounding_box() for c in page.query_selector_all("canvas") if c.is_visible()]
    box = max(canvases, key=lambda b: b["width"] * b["height"])
    for fy in [i / 24 for i in range(1, 24)]:
        for fx in [i / 24 for i in range(1, 24)]:
            page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
            shown = [i for i in page.query_selector_all("img[src^='data:image/png']") if i.is_visible()]
            if shown:
                return len(shown)
    return 0


def render(path: Path, *, panels: str = "[data-panel]", wait_for: str | None = None, screenshot: Path | None = None,
           width: int = 1400, height: int = 1000, timeout_s: float = 60, interact=None) -> dict:
    """Open ``path``; returns ``console_errors``, ``requests`` (blocked, not the file itself),
    ``first_render_s`` (navigation start to first contentful paint, from the page's own timing),
    ``load_s`` (wall time of the load), ``panels`` ([(data-panel, pixel spread)]) and writes a
    full-page ``screenshot`` if given (after ``interact(page)``, whose value is ``interaction``).
    ``wait_for``: a JS expression awaited before measuring."""
    from playwright.sync_api import sync_playwright

    url = Path(path).resolve().as_uri()
    errors: list[str] = []
    requests: list[str] = []
    with tempfile.TemporaryDirectory() as home, sync_playwright() as pw:
        env = {**os.environ, "XDG_CONFIG_HOME": home, "XDG_CACHE_HOME": home, "HOME": home}
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True, env=env,
                                     timeout=timeout_s * 1000)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_s * 1000)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))

            def route(r):
                if r.request.url == url:
                    r.continue_()
                else:
                    requests.append(r.request.url)
                    r.abort()

            page.route("**/*", route)
            start = time.perf_counter()
            page.goto(url, wait_until="load")
            if wait_for:
                page.wait_for_function(wait_for)
            load_s = time.perf_counter() - start
            paint = page.evaluate("""() => new Promise(done => {
                new PerformanceObserver(list => {
                    const p = list.getEntries().find(e => e.name === 'first-contentful-paint');
                    if (p) done(p.startTime);
                }).observe({type: 'paint', buffered: true});
                setTimeout(() => done(null), 5000);
            })""")
            found = []
            for element in page.query_selector_all(panels):
                element.scroll_into_view_if_needed()
                found.append((element.get_attribute("data-panel"), pixel_spread(element.screenshot())))
            interaction = interact(page) if interact is not None else None
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {"console_errors": errors, "requests": requests, "load_s": load_s, "interaction": interaction,
            "first_render_s": None if paint is None else paint / 1000, "panels": found}
