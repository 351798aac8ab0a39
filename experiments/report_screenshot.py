"""Render a report's index.html (`ltnet segment --report DIR`) as a person sees it: headless
Chromium (Debian's `chromium` package) opens the file from disk and saves a PNG screenshot.

    python experiments/report_screenshot.py runs/whole_head/report/index.html docs/images/report.png
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# No network, no first-run pages, no background services: the report is a local file.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("index", type=Path, help="the report's index.html")
    parser.add_argument("png", type=Path, help="screenshot to write")
    parser.add_argument("--size", default="1400,900", help="window WIDTH,HEIGHT in pixels")
    args = parser.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("report_screenshot: chromium not found (Debian: apt-get install chromium)")
    if not args.index.is_file():
        sys.exit(f"report_screenshot: {args.index}: no such file")
    args.png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ltnet_chromium_") as profile:
        subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                        f"--window-size={args.size}", f"--screenshot={args.png.resolve()}",
                        args.index.resolve().as_uri()], check=True, capture_output=True,
                       timeout=120)
    print(f"{args.index} -> {args.png}")


if __name__ == "__main__":
    main()
