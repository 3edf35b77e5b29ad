"""Headless Chromium for tests: render a file to a PNG and look at its pixels."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("chromium is not installed; `make test` installs it (make system)")


def screenshot(page: Path, out: Path, size: tuple[int, int] = (1280, 1600)) -> Image.Image:
    """Render ``page`` (HTML or SVG) headless and return the screenshot."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}",
                f"--screenshot={out}",
                page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    return Image.open(out).convert("RGB")


def count_color(img: Image.Image, rgb: tuple[int, int, int], tolerance: int = 40) -> int:
    """Count pixels within ``tolerance`` (sum of channel differences) of ``rgb``."""
    px = np.asarray(img, dtype=np.int32)
    return int((np.abs(px - np.array(rgb)).sum(axis=2) <= tolerance).sum())


def non_white(img: Image.Image) -> int:
    """Count pixels that are not (nearly) white."""
    return int((np.asarray(img, dtype=np.int32).sum(axis=2) < 720).sum())
