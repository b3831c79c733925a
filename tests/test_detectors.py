"""PatchCore, PaDiM, the coreset and the nearest-neighbour wrapper, checked against brute force."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from hrad.detectors import build_detector, detector_config
from hrad.detectors.coreset import farthest_point_indices, greedy_coreset
from hrad.detectors.knn import NearestNeighbours
from hrad.detectors.padim import PaDiM, PaDiMConfig
from hrad.detectors.patchcore import PatchCore, PatchCoreConfig, reweighted_scores, sample_patches
from hrad.errors import ConfigError, InputError
from hrad.features import BackboneConfig, Embedder, build_backbone


def brute_force_greedy(points: np.ndarray, count: int, start: int) -> np.ndarray:
    points = points.astype(np.float64)
    min_dist = np.full(len(points), np.inf)
    chosen, current = [], start
    for _ in range(count):
        chosen.append(current)
        min_dist = np.minimum(min_dist, ((points - points[current]) ** 2).sum(axis=1))
        current = int(min_dist.argmax())
    return np.array(chosen)


def normal_embeddings(count: int, channels: int = 8, size: int = 6, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, channels, size, size, generator=generator)


def with_anomalies(embeddings: torch.Tensor, positions: list[tuple[int, int]], shift: float = 6.0) -> torch.Tensor:
    shifted = embeddings.clone()
    for image, (row, col) in enumerate(positions):
        shifted[image, :, row, col] += shift
    return shifted


@pytest.mark.parametrize(("shape", "count", "start"), [((400, 6), 120, 3), ((600, 24), 200, 0), ((300, 2), 150, 7)])
def test_coreset_matches_brute_force(shape: tuple[int, int], count: int, start: int) -> None:
    points = np.random.default_rng(shape[0]).normal(size=shape).astype(np.float32)
    fast = farthest_point_indices(torch.from_numpy(points), count, start).numpy()
    np.testing.assert_array_equal(fast, brute_force_greedy(points, count, start))


def test_coreset_on_structured_data_matches_brute_force_and_is_seeded() -> None:
    rng = np.random.default_rng(1)
    latent = rng.normal(size=(1500, 4))
    points = np.maximum(latent @ rng.normal(size=(4, 40)), 0).astype(np.float32)
    tensor = torch.from_numpy(points)
    without_projection = greedy_coreset(tensor, 300, projection_dim=None, seed=5)
    np.testing.assert_array_equal(
        without_projection.numpy(), brute_force_greedy(points, 300, int(without_projection[0]))
    )
    projected = greedy_coreset(tensor, 300, projection_dim=16, seed=5)
    assert torch.equal(projected, greedy_coreset(tensor, 300, projection_dim=16, seed=5))
    assert len(set(projected.tolist())) == 300
    assert not torch.equal(projected, greedy_coreset(tensor, 300, projection_dim=16, seed=6))
    assert torch.equal(greedy_coreset(tensor[:10], 50), torch.arange(10))


@pytest.mark.gpu
def test_coreset_of_cuda_features_runs_on_the_gpu_and_selects_as_on_the_cpu() -> None:
    """CUDA features are selected on the GPU (PatchCore hands its sample there when its batches
    came from one): the same greedy k-center up to float rounding in near-ties."""
    rng = np.random.default_rng(3)
    points = np.maximum(rng.normal(size=(3000, 4)) @ rng.normal(size=(4, 40)), 0).astype(np.float32)
    tensor = torch.from_numpy(points)
    on_cpu = greedy_coreset(tensor, 300, projection_dim=16, seed=5)
    on_gpu = greedy_coreset(tensor.cuda(), 300, projection_dim=16, seed=5)
    assert on_gpu.device.type == "cpu" and on_gpu[0] == on_cpu[0]
    assert len(set(on_gpu.tolist()) & set(on_cpu.tolist())) >= 285

    def radius(selected: torch.Tensor) -> float:
        return float(torch.cdist(tensor, tensor[selected]).min(dim=1).values.max())

    assert abs(radius(on_gpu) - radius(on_cpu)) <= 1e-3 * radius(on_cpu)
    detector = PatchCore(PatchCoreConfig(coreset_ratio=0.1))
    detector.fit([tensor[:2400].T.reshape(1, 40, 40, 60).cuda()])  # 2400 tokens of 40 channels
    assert detector.memory_bank.shape == (240, 40)


def test_knn_exact_matches_numpy_and_reports_index_kind() -> None:
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(500, 16)).astype(np.float32)
    queries = rng.normal(size=(70, 16)).astype(np.float32)
    neighbours = NearestNeighbours().fit(torch.from_numpy(bank))
    assert neighbours.index_kind == "exact"
    distances, indices = neighbours.search(torch.from_numpy(queries), k=3)
    full = np.sqrt(((queries[:, None, :] - bank[None, :, :]) ** 2).sum(axis=2))
    expected = np.argsort(full, axis=1)[:, :3]
    np.testing.assert_array_equal(indices.numpy(), expected)
    np.testing.assert_allclose(distances.numpy(), np.take_along_axis(full, expected, axis=1), rtol=1e-4, atol=1e-4)


def test_knn_auto_chooses_ivf_for_big_bank_and_stays_accurate() -> None:
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(39 * 16, 8)).astype(np.float32)
    neighbours = NearestNeighbours(nlist=16, nprobe=16).fit(bank)
    assert neighbours.index_kind == "ivf"
    assert NearestNeighbours(nlist=17).fit(bank).index_kind == "exact"
    queries = bank[:50] + 0.01
    distances, indices = neighbours.search(queries, k=1)  # nprobe == nlist: exhaustive, hence exact
    np.testing.assert_array_equal(indices[:, 0].numpy(), np.arange(50))
    assert NearestNeighbours(index="hnsw").fit(bank).search(queries, 1)[1][:, 0].tolist() == list(range(50))
    restored = NearestNeighbours(nlist=16, nprobe=16).load_state_dict(neighbours.state_dict())
    assert torch.equal(restored.search(queries, 2)[1], neighbours.search(queries, 2)[1])
    with pytest.raises(ConfigError):
        NearestNeighbours(index="lsh")  # type: ignore[arg-type]


def test_knn_ivf_state_keeps_its_centroids_so_loading_skips_the_kmeans(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    bank = rng.normal(size=(39 * 16, 8)).astype(np.float32)
    fitted = NearestNeighbours(nlist=16, nprobe=4).fit(bank)
    state = fitted.state_dict("bank")
    assert set(state) == {"bank", "bank_ivf_centroids"} and state["bank_ivf_centroids"].shape == (16, 8)
    assert set(NearestNeighbours().fit(bank[:20]).state_dict("bank")) == {"bank"}  # exact index: the bank alone

    def no_training(*_: object) -> None:
        raise AssertionError("the IVF k-means ran again on load")

    with monkeypatch.context() as patch:
        patch.setattr(faiss.IndexIVFFlat, "train", no_training)
        restored = NearestNeighbours(nlist=16, nprobe=4).load_state_dict(state, "bank")
    queries = rng.normal(size=(40, 8)).astype(np.float32)
    for found, expected in zip(restored.search(queries, 3), fitted.search(queries, 3), strict=True):
        assert torch.equal(found, expected)  # nprobe 4 of 16: the same probes only with the same centroids
    old = NearestNeighbours(nlist=16, nprobe=4).load_state_dict({"bank": state["bank"]}, "bank")  # older artifact
    assert old.index_kind == "ivf"


def test_reweighting_matches_direct_formula() -> None:
    rng = np.random.default_rng(4)
    support = rng.uniform(0.5, 40.0, size=(3, 5))
    nearest = support[:, 0]
    raw = nearest.copy()
    direct = (1 - np.exp(nearest) / np.exp(support).sum(axis=1)) * raw
    ours = reweighted_scores(torch.from_numpy(raw), torch.from_numpy(nearest), torch.from_numpy(support))
    np.testing.assert_allclose(ours.numpy(), direct, rtol=1e-10)
    huge = reweighted_scores(torch.tensor([900.0]), torch.tensor([900.0]), torch.tensor([[900.0, 901.0]]))
    assert torch.isfinite(huge).all() and 0 < float(huge[0]) < 900


def test_patchcore_reweighted_score_equals_manual_computation() -> None:
    train = normal_embeddings(6)
    detector = PatchCore(PatchCoreConfig(coreset_ratio=0.5, reweight_neighbors=4))
    detector.fit([train[:3], train[3:]])
    test = with_anomalies(normal_embeddings(2, seed=9), [(1, 2), (4, 4)])
    output = detector.predict(test)
    bank = detector.memory_bank.numpy().astype(np.float64)
    patches = test.permute(0, 2, 3, 1).reshape(2, -1, 8).numpy().astype(np.float64)
    for image in range(2):
        dists = np.sqrt(((patches[image][:, None, :] - bank[None]) ** 2).sum(axis=2))
        worst = dists.min(axis=1).argmax()
        nearest_entry = dists[worst].argmin()
        s_star = dists[worst, nearest_entry]
        around = np.argsort(((bank - bank[nearest_entry]) ** 2).sum(axis=1))[:4]
        expected = (1 - np.exp(s_star) / np.exp(dists[worst, around]).sum()) * s_star
        np.testing.assert_allclose(float(output.scores[image]), expected, rtol=1e-4)
        np.testing.assert_allclose(output.maps[image].numpy().ravel(), dists.min(axis=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["patchcore", "padim"])
def test_detector_localises_shifted_patches_and_round_trips(name: str) -> None:
    config = detector_config({"name": name, "seed": 1})
    detector = build_detector(config)
    train = normal_embeddings(40)
    detector.fit([train[start : start + 8] for start in range(0, 40, 8)])
    positions = [(1, 2), (4, 4), (0, 5)]
    anomalous = with_anomalies(normal_embeddings(3, seed=7), positions)
    normal = normal_embeddings(3, seed=8)
    output = detector.predict(torch.cat([anomalous, normal]))
    assert output.maps.shape == (6, 6, 6) and output.scores.shape == (6,)
    for image, (row, col) in enumerate(positions):
        assert int(output.maps[image].argmax()) == row * 6 + col
    assert float(output.scores[:3].min()) > float(output.scores[3:].max())
    restored = build_detector(config)
    restored.load_state_dict({key: value.clone() for key, value in detector.state_dict().items()})
    again = restored.predict(torch.cat([anomalous, normal]))
    assert torch.equal(again.maps, output.maps) and torch.equal(again.scores, output.scores)
    twin = build_detector(config)
    twin.fit([train[start : start + 8] for start in range(0, 40, 8)])
    assert all(torch.equal(value, twin.state_dict()[key]) for key, value in detector.state_dict().items())


def test_patchcore_sampling_and_bank_caps() -> None:
    batches = [normal_embeddings(4, seed=seed) for seed in range(5)]  # 5 x 144 patches
    everything = torch.cat([b.permute(0, 2, 3, 1).reshape(-1, 8) for b in batches])
    sample = sample_patches(batches, 100, seed=0)
    assert sample.shape == (100, 8)
    assert torch.equal(sample, sample_patches(batches, 100, seed=0))
    rows = {tuple(row.tolist()) for row in everything}
    assert all(tuple(row.tolist()) in rows for row in sample)
    assert len({tuple(row.tolist()) for row in sample}) == 100
    assert torch.equal(sample_patches(batches, None), everything)
    detector = PatchCore(PatchCoreConfig(coreset_ratio=0.5, max_bank_size=30, max_fit_patches=200))
    detector.fit(batches)
    assert detector.memory_bank.shape == (30, 8)
    with pytest.raises(ConfigError):
        detector.predict(torch.zeros(1, 5, 6, 6))


def test_padim_covariance_matches_numpy_and_grid_is_enforced() -> None:
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(12, 5, 2, 3, generator=generator) * 3 + 100
    detector = PaDiM(PaDiMConfig(n_features=4, seed=2))
    detector.fit([embeddings[:5], embeddings[5:9], embeddings[9:]])
    channels = detector.channel_indices
    assert channels is not None and len(channels) == 4
    data = embeddings[:, channels].numpy().astype(np.float64)  # N x d x h x w
    point = np.random.default_rng(0).normal(size=4) + 100
    for row in range(2):
        for col in range(3):
            samples = data[:, :, row, col]
            covariance = np.cov(samples, rowvar=False) + 0.01 * np.eye(4)
            position = row * 3 + col
            np.testing.assert_allclose(detector.mean[position].numpy(), samples.mean(axis=0), rtol=1e-6)
            np.testing.assert_allclose(
                detector.inv_covariance[position].numpy(), np.linalg.inv(covariance), rtol=1e-3, atol=1e-5
            )
            delta = point - samples.mean(axis=0)
            query = torch.tensor(point, dtype=torch.float32)
            probe = embeddings[:1].clone()
            probe[0, channels, row, col] = query
            expected = np.sqrt(delta @ np.linalg.inv(covariance) @ delta)
            np.testing.assert_allclose(float(detector.predict(probe).maps[0, row, col]), expected, rtol=1e-3)
    with pytest.raises(ConfigError, match="2x3 feature grid"):
        detector.predict(torch.randn(1, 5, 3, 3))


def test_default_embeddings_and_end_to_end_with_tiny_backbones() -> None:
    cnn = build_backbone(BackboneConfig(name="tiny-cnn"))
    vit = build_backbone(BackboneConfig(name="tiny-vit"))
    assert PatchCore.default_embedding(cnn).layers == ("layer2", "layer3")
    assert PatchCore.default_embedding(cnn).aggregation == 3
    assert PatchCore.default_embedding(vit).layers == ("block3", "block4")
    assert PaDiM.default_embedding(cnn).layers == ("layer1", "layer2", "layer3")
    assert PaDiM.default_embedding(vit).layers == ("block1", "block2", "block3")
    generator = torch.Generator().manual_seed(0)
    good = 0.5 + 0.05 * torch.randn(10, 3, 64, 64, generator=generator)
    bad = good[8:].clone()
    bad[:, :, 24:32, 16:24] = torch.tensor([1.0, 0.0, 1.0])[:, None, None]
    for detector_type, config in ((PatchCore, PatchCoreConfig()), (PaDiM, PaDiMConfig())):
        embedder = Embedder(cnn, detector_type.embedding_spec(config, cnn))
        detector = detector_type(config)
        detector.fit([embedder(good[:4]), embedder(good[4:8])])
        embeddings = embedder(torch.cat([bad, good[8:]]))
        output = detector.predict(embeddings)
        assert output.maps.shape == (4, *embeddings.shape[2:])
        # random tiny weights: only image ranking is meaningful (PaDiM's stride-4 grid also localises)
        assert float(output.scores[:2].min()) > float(output.scores[2:].max())
    peak_row, peak_col = divmod(int(output.maps[0].argmax()), 16)
    assert 5 <= peak_row <= 8 and 3 <= peak_col <= 6


def test_channel_statistics_match_brute_force_over_a_stream() -> None:
    from hrad.detectors.scoring import ChannelStatistics

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 5, 3, 4, generator=generator) * 3 + 1000 for n in (2, 1, 3)]
    statistics = ChannelStatistics(eps=1e-5)
    for batch in batches:
        statistics.add(batch)
    mean, std = statistics.mean_std("test")
    every = torch.cat([b.transpose(0, 1).flatten(1) for b in batches], dim=1).double()
    torch.testing.assert_close(mean.double(), every.mean(dim=1), rtol=0, atol=1e-4)
    torch.testing.assert_close(std.double(), (every.var(dim=1, unbiased=False) + 1e-5).sqrt(), rtol=1e-6, atol=1e-6)
    with pytest.raises(InputError, match="test fit received no embedding batches"):
        ChannelStatistics().mean_std("test")


def test_image_scores_max_and_top_fraction() -> None:
    from hrad.detectors.scoring import image_scores

    maps = torch.arange(2 * 10, dtype=torch.float32).view(2, 2, 5)
    assert image_scores(maps, "max", 0.5).tolist() == [9.0, 19.0]
    assert image_scores(maps, "top_mean", 0.2).tolist() == [8.5, 18.5]  # top 2 of 10
    assert image_scores(maps, "top_mean", 1e-6).tolist() == [9.0, 19.0]  # at least one value
