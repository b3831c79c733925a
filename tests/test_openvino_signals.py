"""A process that compiled and released OpenVINO models still handles signals.

Each OpenVINO CPU plugin instance points the thread's alternate signal stack at a buffer of its
own and frees it when destroyed; two plugins released first-made first left the main thread's
alternate stack on freed memory, so the next Python signal handler (SIGTERM from ``docker
stop``) killed the process with SIGSEGV and no traceback (the whole suite died so at
tests/test_watch.py). Each case runs in a subprocess: on the old code that process crashes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openvino")

#: two models compiled through hrad, released in the order they were made, then a SIGTERM to the
#: main thread with a Python handler: "handled [15]" and status 0, or the process dies
RELEASED_THEN_SIGTERM = """
import gc, signal, threading
{compile_two}
del first
gc.collect()
del second
gc.collect()
handled = []
signal.signal(signal.SIGTERM, lambda signum, frame: handled.append(signum))
signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
print("handled", handled)
"""

SESSIONS = """
import numpy as np
import openvino as ov
import openvino.opset13 as ops
from hrad.export_runtime import inference_session

x = ops.parameter([1, 4], ov.Type.f32, name="x")
ov.save_model(ov.Model([ops.relu(x)], [x], "tiny"), "tiny.xml")
first = inference_session(Path("tiny.xml"), {}, "openvino")
second = inference_session(Path("tiny.xml"), {}, "openvino")
ones = {"x": np.ones((1, 4), np.float32)}
assert [session.run(None, ones)[0].tolist() for session in (first, second)] == [[[1.0] * 4]] * 2
"""

EXTRACTORS = """
import torch
from hrad.features import BackboneConfig, build_backbone

images = torch.rand(1, 3, 32, 32)
first = build_backbone(BackboneConfig(name="tiny-cnn", runtime="openvino"))
first.extract(images, ["layer2"])
second = build_backbone(BackboneConfig(name="tiny-cnn", runtime="openvino"))
second.extract(images, ["layer2"])
"""


@pytest.mark.parametrize("compile_two", [SESSIONS, EXTRACTORS], ids=["export-sessions", "backbone-extractors"])
def test_sigterm_is_handled_after_openvino_models_are_released(compile_two: str, tmp_path: Path) -> None:
    script = "from pathlib import Path\n" + RELEASED_THEN_SIGTERM.format(compile_two=compile_two)
    env = {**os.environ, "HRAD_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"status {done.returncode} (-11: SIGSEGV)\n{done.stderr[-2000:]}"
    assert done.stdout.strip().endswith("handled [15]")
