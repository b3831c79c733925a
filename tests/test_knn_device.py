"""Nearest-neighbour search on the queries' device: the torch matmul top-k and the CUDA dispatch."""

from __future__ import annotations

import pytest
import torch

from hrad.detectors import knn
from hrad.detectors.knn import NearestNeighbours, torch_knn
from hrad.detectors.patchcore import PatchCore, PatchCoreConfig
from hrad.features import BackboneConfig, Embedder, EmbeddingSpec, build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def test_torch_knn_matches_faiss_exact_and_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 16, generator=generator)
    queries = torch.randn(70, 16, generator=generator)
    monkeypatch.setattr(knn, "TORCH_KNN_BLOCK_BYTES", 4 * 300 * 16)  # 16-query blocks: the loop is exercised
    distances, indices = torch_knn(queries, bank, k=3)
    brute = torch.cdist(queries.double(), bank.double())
    expected_distances, expected_indices = brute.topk(3, largest=False)
    torch.testing.assert_close(distances.double(), expected_distances, rtol=1e-4, atol=1e-4)
    assert torch.equal(indices, expected_indices)
    faiss_distances, faiss_indices = NearestNeighbours(index="exact").fit(bank).search(queries, 3)
    torch.testing.assert_close(distances, faiss_distances, rtol=1e-4, atol=1e-4)
    assert torch.equal(indices, faiss_indices)


def test_torch_knn_exact_match_is_zero_and_k_is_capped() -> None:
    bank = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    distances, indices = torch_knn(torch.tensor([[3.0, 4.0]]), bank, k=5)
    assert distances.shape == (1, 2) and indices.tolist() == [[1, 0]]
    torch.testing.assert_close(distances, torch.tensor([[0.0, 5.0]]))


@pytest.mark.gpu
@pytest.mark.parametrize("index", ["exact", "ivf"])
def test_cuda_queries_are_searched_on_the_device(index: str) -> None:
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(4000, 32, generator=generator)
    queries = torch.randn(500, 32, generator=generator)
    neighbours = NearestNeighbours(index=index, nlist=16, nprobe=16).fit(bank)  # nprobe = nlist: exact too
    host_distances, host_indices = neighbours.search(queries, 2)
    distances, indices = neighbours.search(queries.cuda(), 2)
    assert distances.is_cuda and indices.is_cuda
    torch.testing.assert_close(distances.cpu(), host_distances, rtol=1e-4, atol=1e-4)
    assert (indices.cpu() == host_indices).float().mean() > 0.99  # ties may order differently


@pytest.mark.gpu
def test_patchcore_on_cuda_embeddings_matches_cpu() -> None:
    generator = torch.Generator().manual_seed(2)
    train = [torch.randn(2, 8, 6, 6, generator=generator) for _ in range(3)]
    test = torch.randn(2, 8, 6, 6, generator=generator)
    detector = PatchCore(PatchCoreConfig(coreset_ratio=0.5, num_neighbors=3))
    detector.fit(train)
    host = detector.predict(test)
    device = detector.predict(test.cuda())
    assert device.maps.is_cuda and device.scores.is_cuda
    torch.testing.assert_close(device.maps.cpu(), host.maps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(device.scores.cpu(), host.scores, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_embedder_on_cuda(precision: str) -> None:
    extractor = build_backbone(BackboneConfig(name="tiny-cnn")).cuda()
    spec = EmbeddingSpec(layers=("layer2", "layer3"), aggregation=3)
    images = torch.rand(2, 3, 64, 64, device="cuda")
    reference = Embedder(extractor, spec)(images)
    extractor.precision = precision
    low = Embedder(extractor, spec)(images)
    assert low.dtype == torch.float32 and low.is_cuda
    torch.testing.assert_close(low, reference, rtol=0.05, atol=0.05 * float(reference.abs().max()))
