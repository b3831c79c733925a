"""The pool strategies' spill and fit-job format (hrad.strategies.spill): chunks read back exactly,
batches regroup rows across chunks, jobs write their state where asked."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from conftest import GaussianTestConfig, GaussianTestDetector
from safetensors.torch import load_file

from hrad.strategies.spill import ChunkBatches, ChunkRef, FeatureSpill, FitJob, fit_detectors


def test_chunks_read_back_exactly_whole_or_by_rows_in_their_type(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(5, 3, 2, 4, generator=generator)
    with FeatureSpill(str(tmp_path)) as spill:
        path = spill.write(features)
        half = spill.write(features.half())
        brain = spill.write(features.bfloat16())
        (whole,) = ChunkBatches([ChunkRef(path)])
        (rows,) = ChunkBatches([ChunkRef(path, (4, 0, 2))])
        (halves,) = ChunkBatches([ChunkRef(half, (1,))])
        (brains,) = ChunkBatches([ChunkRef(brain)])
        assert Path(path).parent == spill.root
    assert not spill.root.exists()
    assert torch.equal(whole, features)
    assert torch.equal(rows, features[[4, 0, 2]])
    assert halves.dtype == torch.float16 and torch.equal(halves, features.half()[[1]])
    assert brains.dtype == torch.float32 and torch.equal(brains, features.bfloat16().float())


def test_batches_regroup_the_rows_of_consecutive_references(tmp_path: Path) -> None:
    """``batch_size``: the referenced rows in order, that many at a time across chunks (the
    ensemble's batches of one tile location over images); None: one batch per reference."""
    chunks = [torch.arange(24, dtype=torch.float32).view(4, 6, 1, 1) + 100 * index for index in range(3)]
    with FeatureSpill(str(tmp_path)) as spill:
        refs = [ChunkRef(spill.write(chunk), (1,)) for chunk in chunks] + [ChunkRef(spill.write(chunks[0]))]
        expected = torch.cat([chunks[0][[1]], chunks[1][[1]], chunks[2][[1]], chunks[0]])
        for size in (1, 2, 3, 7, 100):
            batches = list(ChunkBatches(refs, batch_size=size))
            assert [len(batch) for batch in batches[:-1]] == [size] * (len(batches) - 1)
            assert torch.equal(torch.cat(batches), expected)
            assert list(ChunkBatches(refs, batch_size=size)) is not batches  # re-iterable
        per_reference = list(ChunkBatches(refs))
    assert [len(batch) for batch in per_reference] == [1, 1, 1, 4]


def test_a_created_chunk_is_filled_row_by_row(tmp_path: Path) -> None:
    with FeatureSpill(str(tmp_path)) as spill:
        path, rows = spill.create((3, 2, 1, 1))
        for index in (2, 0, 1):
            rows[index] = index + 0.5
        rows.flush()
        del rows
        (read,) = ChunkBatches([ChunkRef(path)])
    assert read.flatten().tolist() == [0.5, 0.5, 1.5, 1.5, 2.5, 2.5]


def test_a_job_returns_its_state_or_writes_it_to_its_file(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    tensors = [torch.randn(4, 3, 2, 2, generator=generator) for _ in range(2)]
    with FeatureSpill(str(tmp_path)) as spill:
        refs = tuple(ChunkRef(spill.write(tensor), (0, 3)) for tensor in tensors)
        job = FitJob(GaussianTestDetector, GaussianTestConfig(), refs, "cpu", batch_size=3)
        out = tmp_path / "state.safetensors"
        to_file = FitJob(GaussianTestDetector, GaussianTestConfig(), refs, "cpu", 3, str(out))
        assert pickle.loads(pickle.dumps(to_file)) == to_file  # jobs travel to workers as paths
        returned, written = fit_detectors([job, to_file], workers=1)
    assert written == {}
    direct = GaussianTestDetector(GaussianTestConfig())
    direct.fit([torch.cat([tensor[[0, 3]] for tensor in tensors])])
    torch.testing.assert_close(returned["mean"], direct.state_dict()["mean"])
    saved = load_file(out)
    assert saved.keys() == returned.keys()
    for key, value in returned.items():
        assert torch.equal(saved[key], value)
