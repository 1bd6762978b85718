"""Screenshot of a dashboard in headless Chromium (for the README): select a layer and an expert, save a PNG.

    python benchmarks/screenshot_dashboard.py runs/bench/interpret/report-carved-moe-dsc/dashboard.html --layer 15
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dashboard")
    parser.add_argument("--layer", default="15")
    parser.add_argument("--expert", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "dashboard.png"))
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu",
                                                                    "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(Path(args.dashboard).resolve().as_uri())
        page.select_option("#layer", args.layer)
        page.locator("#experts tbody tr").nth(args.expert).locator("td").first.click()
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
