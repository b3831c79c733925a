"""Helpers the CLI-level tests share: run ``hrad`` in-process, write 8-bit test images."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from hrad.cli.main import main
from hrad.data.images import set_max_pixels


def run(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """``hrad ARGS`` in this process; its exit status. ``hrad --max-pixels N`` sets the process's
    pixel budget (right for a CLI process); it is reset afterwards so later tests get the default."""
    monkeypatch.setattr(sys, "argv", ["hrad", *args])
    try:
        main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        set_max_pixels(None)
    return 0


def write(path: Path, image: np.ndarray) -> None:
    """An RGB float image in [0, 1] as an 8-bit PNG (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), (np.clip(image, 0, 1) * 255).round().astype(np.uint8)[..., ::-1])
