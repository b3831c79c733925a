"""PatchCore (Roth et al., CVPR 2022): a memory bank of normal patch features.

Fit: every patch embedding of the good images (randomly subsampled to ``max_fit_patches``
while streaming, so memory stays bounded), reduced to a greedy k-center coreset. Predict: each
patch's anomaly score is its L2 distance to the nearest bank entry (mean over ``num_neighbors``
entries when > 1, the HiAD reference code's variant with 5); the image score is the maximum
patch score, reweighted by how isolated its nearest bank entry is (paper eq. 7) unless
``reweight`` is off.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from hrad.detectors.base import Detector, DetectorConfig, DetectorOutput, backbone_layers
from hrad.detectors.coreset import greedy_coreset
from hrad.detectors.knn import IndexChoice, NearestNeighbours
from hrad.errors import ArtifactError, ConfigError, InputError
from hrad.features.base import EmbeddingSpec, FeatureExtractor


class PatchCoreConfig(DetectorConfig):
    """PatchCore options.

    ``coreset_ratio`` 0.1 is the paper's; with the default caps (200k sampled fit patches,
    20k bank rows) the coreset takes tens of seconds on a 2-core CPU and a 20k bank keeps the
    nearest-neighbour search well below the backbone's cost.
    """

    name: Literal["patchcore"] = "patchcore"
    #: share of the (sampled) fit patches kept by the greedy coreset; 1.0 keeps all
    coreset_ratio: float = Field(default=0.1, gt=0.0, le=1.0)
    #: hard cap on memory-bank rows (applied to the coreset size); None = no cap
    max_bank_size: int | None = Field(default=20_000, ge=1)
    #: uniform random sample of all fit patches taken while streaming, before the coreset; None = all
    max_fit_patches: int | None = Field(default=200_000, ge=1)
    #: Johnson-Lindenstrauss projection used only for coreset distances; 0 = none
    projection_dim: int = Field(default=128, ge=0)
    #: patch score = mean distance to this many nearest bank entries (1 = paper; HiAD code uses 5)
    num_neighbors: int = Field(default=1, ge=1)
    #: image score reweighting of PatchCore eq. 7 (False: image score = max patch score)
    reweight: bool = True
    #: b of eq. 7: size of the bank neighbourhood of m* that the reweighting softmax runs over
    reweight_neighbors: int = Field(default=9, ge=2)
    #: nearest-neighbour index: exact, IVF-Flat, HNSW, or chosen from the bank size
    index: IndexChoice = "auto"
    #: IVF lists (clusters) of the bank index
    nlist: int = Field(default=512, ge=1)
    #: lists probed by IVF. 8 of 512: recall@1 0.98, mean patch-score error 0.06%, same AUPRO as 32
    #: and 2.3x faster search on a 20k capsules bank (benchmarks/results/knn_index.md,
    #: predict_overhead.md); the search is most of predict's cost beyond the backbone
    nprobe: int = Field(default=8, ge=1)
    #: queries per faiss call (bounds the temporary distance buffers)
    query_batch: int = Field(default=65_536, ge=1)


class PatchCore(Detector[PatchCoreConfig]):
    """Memory-bank detector; see the module docstring."""

    def __init__(self, config: PatchCoreConfig) -> None:
        super().__init__(config)
        self.neighbours = NearestNeighbours(index=config.index, nlist=config.nlist, nprobe=config.nprobe, seed=config.seed)

    @classmethod
    def default_embedding(cls, extractor: FeatureExtractor) -> EmbeddingSpec:
        """CNN: layer2 + layer3 with 3x3 patch aggregation (paper). ViT: two blocks at ~2/3 and
        ~3/4 depth (blocks 8 and 9 of 12): mid-level tokens keep local detail and generalise
        across objects like layer2/3 do, while the last blocks are too semantic. No extra
        aggregation on ViTs: a 14-pixel token already pools its neighbourhood and the patch grid
        is coarse, so 3x3 averaging would blur small defects away."""
        return backbone_layers(extractor, ("layer2", "layer3"), (2 / 3, 3 / 4), cnn_aggregation=3)

    @property
    def fitted(self) -> bool:
        return self.neighbours.size > 0

    @property
    def memory_bank(self) -> Tensor:
        return self.neighbours.bank

    def fit(self, batches: Iterable[Tensor]) -> None:
        devices: set[torch.device] = set()

        def noting_devices(batches: Iterable[Tensor]) -> Iterator[Tensor]:
            for batch in batches:
                devices.add(batch.device)
                yield batch

        sample = sample_patches(noting_devices(batches), self.config.max_fit_patches, seed=self.config.seed)
        target = math.ceil(self.config.coreset_ratio * len(sample))
        if self.config.max_bank_size is not None:
            target = min(target, self.config.max_bank_size)
        if target < len(sample):
            # the sample is kept on the host; the greedy selection runs where the embeddings came from
            device = next((device for device in devices if device.type == "cuda"), torch.device("cpu"))
            keep = greedy_coreset(
                sample.to(device), target, projection_dim=self.config.projection_dim, seed=self.config.seed
            )
            sample = sample[keep]
        self.neighbours.fit(sample.contiguous())

    def predict(self, embeddings: Tensor) -> DetectorOutput:
        if not self.fitted:
            raise RuntimeError("PatchCore.predict called before fit or load_state_dict")
        if embeddings.ndim != 4:
            raise InputError(f"PatchCore expects B x C x h x w embeddings, got shape {tuple(embeddings.shape)}")
        batch, channels, height, width = embeddings.shape
        bank_dim = self.memory_bank.shape[1]
        if channels != bank_dim:
            raise ConfigError(
                f"PatchCore memory bank has {bank_dim} channels but embeddings have {channels}; "
                "the backbone or layers differ from the ones used for fitting"
            )
        # CUDA embeddings are searched on their device (NearestNeighbours.search); others on the host
        device = embeddings.device if embeddings.is_cuda else torch.device("cpu")
        queries = embeddings.detach().permute(0, 2, 3, 1).reshape(-1, channels).to(device, torch.float32)
        distances, indices = self._search(queries, self.config.num_neighbors)
        patch_scores = distances.mean(dim=1)
        maps = patch_scores.reshape(batch, height, width)
        per_image = patch_scores.reshape(batch, -1)
        best = per_image.argmax(dim=1)
        scores = per_image.gather(1, best[:, None])[:, 0]
        if self.config.reweight:
            rows = torch.arange(batch, device=device) * (height * width) + best
            scores = self._reweight(queries[rows], indices[rows, 0], distances[rows, 0], scores)
        return DetectorOutput(maps=maps.to(embeddings.device), scores=scores.to(embeddings.device))

    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        step = self.config.query_batch
        if len(queries) <= step:
            return self.neighbours.search(queries, k)
        parts = [self.neighbours.search(chunk, k) for chunk in queries.split(step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _reweight(
        self, worst_patches: Tensor, nearest_entries: Tensor, nearest_distances: Tensor, raw_scores: Tensor
    ) -> Tensor:
        """Eq. 7: ``s = (1 - exp(s*) / sum_{m in N_b(m*)} exp(|m_test* - m|)) * s*``."""
        bank = self.neighbours.bank_on(worst_patches.device)
        _, support = self.neighbours.search(bank[nearest_entries], self.config.reweight_neighbors)
        support_distances = (worst_patches[:, None, :] - bank[support]).norm(dim=2)
        return reweighted_scores(raw_scores, nearest_distances, support_distances)

    def state_dict(self) -> dict[str, Tensor]:
        if not self.fitted:
            raise RuntimeError("PatchCore.state_dict called before fit")
        return self.neighbours.state_dict("memory_bank")

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "memory_bank" not in state:
            raise ArtifactError("PatchCore state has no 'memory_bank'; the artifact is incomplete or not PatchCore")
        self.neighbours.load_state_dict(state, "memory_bank")


def reweighted_scores(raw_scores: Tensor, nearest_distances: Tensor, support_distances: Tensor) -> Tensor:
    """PatchCore eq. 7 for ``B`` images, computed stably with a log-sum-exp.

    ``raw_scores``: ``s*`` (``B``); ``nearest_distances``: ``|m_test* - m*|`` (equal to ``s*``
    with one neighbour); ``support_distances``: ``B x b`` distances from each worst test patch
    to the ``b`` bank entries nearest ``m*`` (``m*`` itself among them).
    """
    support = support_distances.to(raw_scores.dtype)
    log_ratio = nearest_distances.to(raw_scores.dtype) - torch.logsumexp(support, dim=1)
    return (1.0 - torch.exp(log_ratio)) * raw_scores


def sample_patches(batches: Iterable[Tensor], limit: int | None, seed: int = 0) -> Tensor:
    """All patch vectors (``n*h*w x C`` rows) of ``batches``, or a uniform sample of ``limit`` of them.

    Bottom-k sampling: every patch draws a seeded random key and the ``limit`` smallest keys
    win, which is a uniform sample without replacement that can be kept while streaming with
    memory bounded by ``limit`` rows plus one batch.
    """
    generator = torch.Generator().manual_seed(seed)
    everything: list[Tensor] = []
    kept: Tensor | None = None
    keys = torch.empty(0)
    channels: int | None = None
    for batch in batches:
        if batch.ndim != 4:
            raise InputError(f"PatchCore expects B x C x h x w embeddings, got shape {tuple(batch.shape)}")
        if channels is not None and batch.shape[1] != channels:
            raise InputError(f"embedding batches disagree on channels: {channels} then {batch.shape[1]}")
        channels = batch.shape[1]
        rows = batch.detach().permute(0, 2, 3, 1).reshape(-1, channels).to("cpu", torch.float32)
        if limit is None:
            everything.append(rows)
            continue
        batch_keys = torch.rand(len(rows), generator=generator)
        if kept is not None and len(kept) >= limit:
            threshold = keys.max()
            below = batch_keys < threshold
            rows, batch_keys = rows[below], batch_keys[below]
        merged = rows if kept is None else torch.cat([kept, rows])
        merged_keys = batch_keys if kept is None else torch.cat([keys, batch_keys])
        if len(merged) > limit:
            order = torch.topk(merged_keys, limit, largest=False).indices
            merged, merged_keys = merged[order], merged_keys[order]
        kept, keys = merged, merged_keys
    if everything:
        kept = torch.cat(everything)
    if kept is None or len(kept) == 0:
        raise InputError("no embeddings to fit on: the training set is empty")
    return kept.contiguous()
