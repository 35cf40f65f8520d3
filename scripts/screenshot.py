"""Screenshot an audit report in headless Chromium (the README's docs/report.png).

Usage: .venv/bin/python scripts/screenshot.py RUN_DIR/report.html docs/report.png [--height PX]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--height", type=int, default=2200, help="pixels of the page to keep (default 2200)")
    args = parser.parse_args()
    if not args.report.is_file():
        raise SystemExit(f"screenshot: no such report: {args.report}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(args.report.resolve().as_uri(), wait_until="load")
            height = min(args.height, page.evaluate("document.body.scrollHeight"))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), clip={"x": 0, "y": 0, "width": 1280, "height": height})
        finally:
            browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
