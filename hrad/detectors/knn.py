"""Nearest-neighbour search over a memory bank (faiss), shared by PatchCore and MRF-AD.

The bank (``N x D`` float32) is the only thing saved; the faiss index is rebuilt from it on
load, so artifacts never contain faiss's binary format. Small banks use an exact flat index;
banks big enough to train an inverted file (about 39 vectors per list, faiss's own minimum for
a stable k-means) use IVF-Flat, which scans only ``nprobe / nlist`` of the bank per query.

Queries on a CUDA device are answered there, with no trip through host memory: by an exact
matmul + top-k in torch (:func:`torch_knn`) when the bank's device copy fits in
``GPU_BANK_FRACTION`` of the free device memory, else by faiss-gpu when that build of faiss is
installed, else on the host by the faiss index (results moved back to the device).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import faiss
import numpy as np
import torch
from torch import Tensor

from hrad.errors import ArtifactError, ConfigError
from hrad.seeds import seed_bits

IndexChoice = Literal["auto", "exact", "ivf", "hnsw"]
INDEX_CHOICES: tuple[str, ...] = ("auto", "exact", "ivf", "hnsw")
#: faiss warns below this many training vectors per inverted list
IVF_POINTS_PER_LIST = 39
#: state key suffix of an IVF index's coarse centroids (see NearestNeighbours.state_dict)
IVF_CENTROIDS_SUFFIX = "_ivf_centroids"
#: a bank is searched by torch on the GPU when its float32 copy takes at most this share of free memory
GPU_BANK_FRACTION = 0.25
#: bytes of the ``queries x bank`` distance block one torch_knn step may allocate
TORCH_KNN_BLOCK_BYTES = 1 << 30


def torch_knn(queries: Tensor, bank: Tensor, k: int, bank_squared_norms: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact k nearest rows of ``bank`` for each query row, by matmul and top-k on the queries' device.

    Squared L2 distances are ``|q|^2 - 2 q.b + |b|^2`` (faiss's flat index uses the same form),
    clamped at 0; returns L2 distances ascending (float32 ``Q x k``) and bank indices (int64).
    Query blocks bound the ``Q x N`` distance matrix to :data:`TORCH_KNN_BLOCK_BYTES`.
    """
    queries = queries.float()
    bank = bank.to(queries.device, torch.float32)
    k = min(k, len(bank))
    norms = bank_squared_norms if bank_squared_norms is not None else (bank * bank).sum(1)
    step = max(1, TORCH_KNN_BLOCK_BYTES // (4 * max(1, len(bank))))
    distances, indices = [], []
    for start in range(0, len(queries), step):
        block = queries[start : start + step]
        squared = torch.addmm(norms[None, :], block, bank.T, alpha=-2.0)
        squared += (block * block).sum(1, keepdim=True)
        values, positions = torch.topk(squared, k, dim=1, largest=False, sorted=True)
        distances.append(values.clamp_min_(0.0).sqrt_())
        indices.append(positions)
    if not distances:
        return queries.new_zeros((0, k)), torch.zeros((0, k), dtype=torch.int64, device=queries.device)
    return torch.cat(distances), torch.cat(indices)


def faiss_has_gpu() -> bool:
    """True when the installed faiss build has GPU support (faiss-gpu)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def set_faiss_threads() -> None:
    """Use as many faiss (OpenMP) threads as torch does, so both respect the same CPU budget."""
    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))


def as_float32_rows(values: Tensor | np.ndarray) -> np.ndarray:
    """``values`` as a C-contiguous float32 numpy array (what faiss requires), copying only if needed."""
    if isinstance(values, Tensor):
        values = values.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(values, dtype=np.float32)


class NearestNeighbours:
    """k-nearest-neighbour search in a fixed bank with L2 distances (not squared).

    ``index``: ``"exact"`` (IndexFlatL2), ``"ivf"`` (IVF-Flat, ``nlist`` lists, ``nprobe``
    probed; ``nlist`` shrinks for banks too small to train it), ``"hnsw"`` (graph index,
    ``hnsw_m`` links, ``ef_search``) or ``"auto"``: IVF when the bank has at least
    ``IVF_POINTS_PER_LIST * nlist`` rows, else exact. The index actually built is
    ``index_kind``.
    """

    def __init__(
        self,
        index: IndexChoice = "auto",
        nlist: int = 512,
        nprobe: int = 32,
        hnsw_m: int = 32,
        ef_search: int = 128,
        seed: int = 0,
    ) -> None:
        if index not in INDEX_CHOICES:
            raise ConfigError(f"unknown nearest-neighbour index {index!r}; known: {', '.join(INDEX_CHOICES)}")
        if nlist < 1 or nprobe < 1:
            raise ConfigError(f"nlist and nprobe must be >= 1, got nlist={nlist}, nprobe={nprobe}")
        self.index_choice = index
        self.nlist = nlist
        self.nprobe = nprobe
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self.seed = seed
        self.index_kind: str | None = None
        self._bank: np.ndarray | None = None
        self._index: faiss.Index | None = None
        # device copies for CUDA queries: (bank, squared norms) per device, faiss-gpu indexes
        self._device_banks: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._gpu_indexes: dict[torch.device, Any] = {}

    @property
    def bank(self) -> Tensor:
        """The bank as a float32 tensor (shares memory with the index's copy source)."""
        if self._bank is None:
            raise RuntimeError("NearestNeighbours.fit must be called before using the bank")
        return torch.from_numpy(self._bank)

    def bank_on(self, device: torch.device) -> Tensor:
        """The bank on ``device`` (the cached copy the GPU search uses; no copy for the CPU)."""
        if device.type == "cpu":
            return self.bank
        cached = self._device_banks.get(device)
        return cached[0] if cached is not None else self.bank.to(device)

    @property
    def size(self) -> int:
        return 0 if self._bank is None else int(self._bank.shape[0])

    def fit(self, bank: Tensor | np.ndarray, ivf_centroids: Tensor | np.ndarray | None = None) -> NearestNeighbours:
        """Build the index over ``bank`` (``N x D``, N >= 1); an IVF index takes ``ivf_centroids``
        (saved by :meth:`state_dict`) when their shape fits instead of training its k-means again."""
        data = as_float32_rows(bank)
        if data.ndim != 2 or data.shape[0] == 0:
            raise ValueError(f"memory bank must be a non-empty N x D array, got shape {data.shape}")
        set_faiss_threads()
        rows, dim = data.shape
        kind = self.index_choice
        if kind == "auto":
            kind = "ivf" if rows >= IVF_POINTS_PER_LIST * self.nlist else "exact"
        if kind == "ivf":
            nlist = max(1, min(self.nlist, rows // IVF_POINTS_PER_LIST))
            quantizer = faiss.IndexFlatL2(dim)
            ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
            ivf.cp.seed = seed_bits(self.seed, 31)
            if ivf_centroids is not None and tuple(ivf_centroids.shape) == (nlist, dim):
                quantizer.add(as_float32_rows(ivf_centroids))
                ivf.is_trained = True
            else:
                ivf.train(data)
            ivf.nprobe = min(self.nprobe, nlist)
            index: faiss.Index = ivf
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_L2)
            index.hnsw.efSearch = self.ef_search
        else:
            index = faiss.IndexFlatL2(dim)
        index.add(data)
        self._bank = data
        self._index = index
        self.index_kind = kind
        self._device_banks = {}
        self._gpu_indexes = {}
        return self

    def _search_on_device(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
        """Search CUDA ``queries`` on their device (torch or faiss-gpu); None when neither fits."""
        assert self._bank is not None and self._index is not None
        device = queries.device
        cached = self._device_banks.get(device)
        if cached is None:
            free, _ = torch.cuda.mem_get_info(device)
            if self._bank.nbytes <= GPU_BANK_FRACTION * free:
                bank = torch.from_numpy(self._bank).to(device)
                cached = (bank, (bank * bank).sum(1))
                self._device_banks[device] = cached
        if cached is not None:
            return torch_knn(queries, cached[0], k, cached[1])
        if faiss_has_gpu():
            import faiss.contrib.torch_utils  # noqa: F401  (lets faiss-gpu take CUDA tensors)

            gpu_index = self._gpu_indexes.get(device)
            if gpu_index is None:
                resources = faiss.StandardGpuResources()
                gpu_index = faiss.index_cpu_to_gpu(resources, device.index or 0, self._index)
                self._gpu_indexes[device] = (resources, gpu_index)  # resources live as long as the index
            else:
                gpu_index = gpu_index[1]
            found_squared, found = gpu_index.search(queries.float().contiguous(), k)
            if bool((found < 0).any()):
                return None  # a probe came back short: the host path fills it exactly
            return found_squared.clamp_min(0.0).sqrt(), found.long()
        return None

    def search(self, queries: Tensor | np.ndarray, k: int = 1) -> tuple[Tensor, Tensor]:
        """Distances (L2, ascending; float32 ``Q x k``) and bank indices (int64 ``Q x k``) of the k nearest,
        on the queries' device (CUDA queries are searched there; see the module docstring)."""
        if self._index is None or self._bank is None:
            raise RuntimeError("NearestNeighbours.fit must be called before search")
        if isinstance(queries, Tensor) and queries.is_cuda:
            if queries.ndim != 2 or queries.shape[1] != self._bank.shape[1]:
                raise ValueError(f"queries must be Q x {self._bank.shape[1]}, got shape {tuple(queries.shape)}")
            found = self._search_on_device(queries, min(k, self.size))
            if found is not None:
                return found
            host_distances, host_indices = self.search(queries.cpu(), k)
            return host_distances.to(queries.device), host_indices.to(queries.device)
        data = as_float32_rows(queries)
        if data.ndim != 2 or data.shape[1] != self._bank.shape[1]:
            raise ValueError(f"queries must be Q x {self._bank.shape[1]}, got shape {data.shape}")
        k = min(k, self.size)
        set_faiss_threads()
        squared, indices = self._index.search(data, k)
        # approximate indices return -1 / huge distances when a probe finds fewer than k rows
        missing = indices < 0
        if missing.any():
            squared, indices = _fill_missing(data, self._bank, squared, indices, missing)
        distances = np.sqrt(np.maximum(squared, 0.0))
        return torch.from_numpy(distances), torch.from_numpy(indices.astype(np.int64, copy=False))

    def state_dict(self, key: str = "memory_bank") -> dict[str, Tensor]:
        """The bank under ``key`` and, for an IVF index, its coarse centroids under
        ``key + "_ivf_centroids"``: loading then skips the k-means, which took 0.6 s of every
        ``hrad predict``'s start for a 20k-row bank on two cores (once per bank: HiAD's pool and
        MRF's layers and scales have several)."""
        state = {key: self.bank.clone()}
        if self.index_kind == "ivf":
            assert self._index is not None
            ivf: Any = faiss.downcast_index(self._index)
            quantizer = ivf.quantizer
            state[key + IVF_CENTROIDS_SUFFIX] = torch.from_numpy(quantizer.reconstruct_n(0, quantizer.ntotal))
        return state

    def load_state_dict(self, state: Mapping[str, Tensor], key: str = "memory_bank") -> NearestNeighbours:
        """Rebuild the index from a saved bank (and its IVF centroids when saved; older artifacts
        have none and train them again)."""
        if key not in state:
            raise ArtifactError(f"saved state has no {key!r}; the artifact is incomplete or from another detector")
        return self.fit(state[key], state.get(key + IVF_CENTROIDS_SUFFIX))


def _fill_missing(
    queries: np.ndarray, bank: np.ndarray, squared: np.ndarray, indices: np.ndarray, missing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Answer the queries an approximate index left incomplete with an exact search."""
    rows = np.nonzero(missing.any(axis=1))[0]
    exact = faiss.IndexFlatL2(bank.shape[1])
    exact.add(bank)
    exact_squared, exact_indices = exact.search(queries[rows], indices.shape[1])
    squared = squared.copy()
    indices = indices.copy()
    squared[rows] = exact_squared
    indices[rows] = exact_indices
    return squared, indices
