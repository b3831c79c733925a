"""Helpers the CLI-level tests share: run ``hrad`` in-process, write 8-bit test images, wait for
an ``hrad serve`` process."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for an ``hrad serve`` process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_ready(base: str, seconds: float = 120) -> None:
    """Until ``GET base/ready`` answers 200 (the server loaded its model and listens); fails the test after ``seconds``."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.3)
    pytest.fail(f"server did not become ready in {seconds:g} s")


def hold_predictions(app: Any, seconds: float) -> threading.Event:
    """Make ``hrad serve``'s model (``app.state.model``) wait before each prediction until the
    returned event is set (or ``seconds`` pass): requests then queue behind a busy model."""
    model = app.state.model
    original = model.predict
    release = threading.Event()

    def held_predict(image: Any, **options: Any) -> object:
        release.wait(seconds)
        return original(image, **options)

    model.predict = held_predict
    return release
