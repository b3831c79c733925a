"""Students of "Learning to Be a Transformer" (L2BT): two small MLPs that mimic a frozen ViT.

The embedding is the teacher's blocks ``j`` and ``k`` (after the final LayerNorm), concatenated. A
forward student learns ``j -> k``, a backward student ``k -> j``, jointly, with ``1 - cos`` losses
on tokens of good images. The small students fail on anomalous tokens, so the per-token distance
between the L2-normalised prediction and teacher feature, fused over both directions, is the map.

Against the paper (Algorithm 1: one step per training image on all its tokens, 50 epochs, Adam lr
1e-3) and the reference code (alex-costanzino/L2BT ``A_train_VisA.py``: 4 whole images per step,
shuffled every epoch, every token, Adam lr 1e-4, 50 epochs, PIL bicubic resize to 1036):

* ``batch_images`` N steps on N whole images (1 = the paper, 4 = the reference); by default every
  pass shuffles tokens across images into steps of ``batch_tokens``, so a few images (few-shot)
  still give thousands of samples per step;
* the teacher runs once: tokens go to one buffer (float16 by default) that the epochs iterate;
  beyond ``max_tokens`` a uniform seeded sample is kept (300 images at 1036 px: 1.64 M tokens);
* the learning rate follows the paper; images are resized by the strategy (bilinear);
* early stopping (``val_fraction``) holds out whole training images, never test data;
* image score: the mean of the top ``top_fraction`` of the token map; the paper's 0.1 % of the
  *upsampled pixel* map is the same fraction, but depends on the output size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from hrad.detectors.base import DetectorConfig, DetectorOutput
from hrad.detectors.neural import EpochsConfig, NeuralDetector, Stage
from hrad.detectors.scoring import ImageScore
from hrad.errors import ConfigError, InputError
from hrad.features.base import EmbeddingSpec, FeatureExtractor, vit_depth

Fusion = Literal["product", "sum", "forward", "backward"]


class StudentsConfig(EpochsConfig):
    """Options of the L2BT students (defaults follow the paper unless noted)."""

    name: Literal["students"] = "students"
    #: training epochs of both students
    epochs: int = Field(default=50, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)  # paper; the reference code uses 1e-4
    #: tokens per optimisation step when batch_images is None (drawn across all images)
    batch_tokens: int = Field(default=4096, ge=1)
    #: whole training images per optimisation step (all their kept tokens), images shuffled
    #: every epoch: 1 = the paper's Algorithm 1, 4 = the reference code; None = token batches
    batch_images: int | None = Field(default=None, ge=1)
    #: at most this many training tokens are kept (uniform seeded sample beyond that)
    max_tokens: int = Field(default=1_000_000, ge=1)
    #: tokens drawn per epoch from the buffer; None = one full pass (token batches only)
    tokens_per_epoch: int | None = Field(default=None, ge=1)
    #: storage type of the token buffer; float16 halves memory (1M ViT-B tokens: 3 GB)
    buffer_dtype: Literal["float16", "float32"] = "float16"
    #: fraction of training images held out for early stopping; 0 = use the final epoch
    val_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    #: epochs without held-out improvement before stopping (only with ``val_fraction`` > 0)
    patience: int = Field(default=5, ge=1)
    #: map from the students' errors: product (paper), sum, forward or backward student only
    fusion: Fusion = "product"
    #: image score: the mean of the top fraction of the token map (paper), or its maximum
    image_score: ImageScore = "top_mean"
    #: image score = mean of this fraction of the highest map values (paper: 0.001)
    top_fraction: float = Field(default=0.001, gt=0.0, le=1.0)
    #: channel index where block k starts in the embedding; None = half of the channels
    split_at: int | None = Field(default=None, ge=1)
    #: tokens per chunk at inference (bounds memory on huge maps)
    predict_batch_tokens: int = Field(default=65536, ge=1)

    @model_validator(mode="after")
    def _one_batching(self) -> StudentsConfig:
        if self.batch_images is not None and self.tokens_per_epoch is not None:
            raise ValueError("tokens_per_epoch applies to token batches; unset it or batch_images")
        return self


def default_student_blocks(depth: int) -> tuple[str, str]:
    """Blocks ``j, k``: about two thirds of the depth and the last (8, 12 of 12; 3, 4 of 4)."""
    if depth < 2:
        raise ConfigError(f"students need a ViT teacher with at least 2 blocks, this one has {depth}")
    j = min(max(1, round(2 * depth / 3)), depth - 1)
    return f"block{j}", f"block{depth}"


class StudentMLP(nn.Sequential):
    """Linear-GELU-Linear-GELU-Linear, hidden width = input width (the paper's student)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(
            nn.Linear(in_features, in_features),
            nn.GELU(),
            nn.Linear(in_features, in_features),
            nn.GELU(),
            nn.Linear(in_features, out_features),
        )


def cosine_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean ``1 - cos`` over tokens (the paper's per-patch loss)."""
    return (1.0 - F.cosine_similarity(prediction, target, dim=-1, eps=1e-6)).mean()


def normalised_distance(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-token L2 distance between the L2-normalised prediction and target (in [0, 2])."""
    return torch.linalg.vector_norm(F.normalize(prediction, dim=-1) - F.normalize(target, dim=-1), dim=-1)


def fuse_maps(backward_map: Tensor, forward_map: Tensor, fusion: Fusion) -> Tensor:
    """Combine Delta_j (``backward_map``, k -> j error) and Delta_k (``forward_map``): product
    (paper, a soft AND), sum, or one direction alone."""
    if fusion == "product":
        return backward_map * forward_map
    if fusion == "sum":
        return backward_map + forward_map
    return forward_map if fusion == "forward" else backward_map


class TokenReservoir:
    """A uniform seeded sample of at most ``capacity`` tokens from a stream of batches: the tokens
    with the smallest random keys. Only the buffer slots that change are rewritten, so memory and
    copying stay bounded; each token keeps its image's index (for image-level hold-out)."""

    def __init__(self, capacity: int, dtype: torch.dtype, generator: torch.Generator) -> None:
        self.capacity = capacity
        self.dtype = dtype
        self.generator = generator
        self.tokens: Tensor | None = None
        self.keys: Tensor | None = None
        self.image_ids: Tensor | None = None
        self.images_seen = 0
        self.tokens_seen = 0

    def add(self, tokens: Tensor, image_ids: Tensor) -> None:
        keys = torch.rand(len(tokens), generator=self.generator).to(tokens.device)
        tokens = tokens.to(self.dtype)
        self.tokens_seen += len(tokens)
        if self.tokens is None or self.keys is None or self.image_ids is None:
            self.tokens, self.keys, self.image_ids = tokens[:0], keys[:0], image_ids[:0]
        room = self.capacity - len(self.tokens)
        if room > 0:
            self.tokens = torch.cat([self.tokens, tokens[:room]])
            self.keys = torch.cat([self.keys, keys[:room]])
            self.image_ids = torch.cat([self.image_ids, image_ids[:room]])
            tokens, keys, image_ids = tokens[room:], keys[room:], image_ids[room:]
        if len(tokens) == 0:
            return
        accepted = keys < self.keys.max()
        if not accepted.any():
            return
        tokens, keys, image_ids = tokens[accepted], keys[accepted], image_ids[accepted]
        if len(keys) > self.capacity:
            smallest = keys.topk(self.capacity, largest=False).indices
            tokens, keys, image_ids = tokens[smallest], keys[smallest], image_ids[smallest]
        # The tokens dropped from (buffer + new) are its largest keys; they all lie among the
        # buffer's r largest and the r new ones, so only those r slots need to be rewritten.
        r = len(keys)
        slots = self.keys.topk(r).indices
        pool_keys = torch.cat([self.keys[slots], keys])
        keep = pool_keys.topk(r, largest=False).indices
        self.tokens[slots] = torch.cat([self.tokens[slots], tokens])[keep]
        self.image_ids[slots] = torch.cat([self.image_ids[slots], image_ids])[keep]
        self.keys[slots] = pool_keys[keep]


class StudentsNet(nn.Module):
    def __init__(self, j_channels: int, k_channels: int) -> None:
        super().__init__()
        self.forward_student = StudentMLP(j_channels, k_channels)
        self.backward_student = StudentMLP(k_channels, j_channels)


class Students(NeuralDetector[StudentsConfig, StudentsNet]):
    """Forward (j -> k) and backward (k -> j) students over a frozen ViT teacher."""

    multi_pass = False  # the tokens are gathered in one pass; the epochs iterate that buffer
    exportable = False  # predict chunks tokens by count and times itself: not traced to ONNX

    def __init__(self, config: StudentsConfig) -> None:
        super().__init__(config)
        #: mean held-out loss of every epoch (only with ``val_fraction`` > 0)
        self.val_history: list[float] = []
        #: of the last predict: seconds, or its two CUDA events (:attr:`last_predict_seconds`)
        self._timing: float | tuple[torch.cuda.Event, torch.cuda.Event] = 0.0
        self._tokens = self._val_tokens = torch.empty(0)
        #: with batch_images: the buffer's tokens of every image (views of the image-sorted buffer)
        self._images: list[Tensor] = []
        self._sampler = torch.Generator()
        self._best: tuple[float, dict[str, Tensor] | None, int] = (math.inf, None, 0)

    @classmethod
    def default_embedding(cls, extractor: FeatureExtractor) -> EmbeddingSpec:
        if not extractor.is_vit:
            raise ConfigError("students need a ViT teacher (e.g. a DINOv2 backbone); this backbone is a CNN")
        return EmbeddingSpec(layers=default_student_blocks(vit_depth(extractor)), aggregation=1)

    @classmethod
    def embedding_spec(cls, config: DetectorConfig, extractor: FeatureExtractor) -> EmbeddingSpec:
        spec = super().embedding_spec(config, extractor)
        if len(spec.layers) != 2:
            raise ConfigError(
                f"students need exactly two layers (j, k), got {len(spec.layers)}: {', '.join(spec.layers)}"
            )
        return spec

    def resolve_layout(self, channels: int) -> list[int]:
        """Blocks j and k: ``split_at`` if set, else the bound layout, else two equal halves."""
        at = self.config.split_at
        if at is not None and not 0 < at < channels:
            raise ConfigError(f"students: split_at {at} is outside the {channels} embedding channels")
        sizes = [at, channels - at] if at is not None else super().resolve_layout(channels)
        if len(sizes) != 2:
            raise ConfigError(f"students need two embedding layers (j, k), the layout has {sizes}")
        return sizes

    def default_layout(self, channels: int) -> list[int]:
        if channels % 2:
            raise InputError(
                f"students: cannot split {channels} embedding channels into two equal blocks; set split_at"
            )
        return [channels // 2, channels // 2]

    def build_network(self, layout: list[int]) -> StudentsNet:
        return StudentsNet(layout[0], layout[1])

    def upgrade_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Artifacts before the neural base: ``forward.*``, ``backward.*`` and ``split``."""
        renames = {"forward.": "network.forward_student.", "backward.": "network.backward_student."}
        upgraded = {}
        for key, value in state.items():
            for old, new in renames.items():
                if key.startswith(old):
                    key = new + key.removeprefix(old)
            upgraded["level_channels" if key == "split" else key] = value
        return super().upgrade_state(upgraded)

    def before_fit(self, batches: Iterable[Tensor]) -> None:
        """Gather a bounded token sample once, hold out whole images if asked, build the students."""
        config = self.config
        self._sampler = torch.Generator().manual_seed(config.seed)
        dtype = torch.float16 if config.buffer_dtype == "float16" else torch.float32
        reservoir = TokenReservoir(config.max_tokens, dtype, self._sampler)
        for batch in batches:
            self.check_embeddings(batch)
            n, c, h, w = batch.shape
            tokens = batch.detach().permute(0, 2, 3, 1).reshape(n * h * w, c)
            ids = torch.arange(reservoir.images_seen, reservoir.images_seen + n, device=batch.device)
            reservoir.images_seen += n
            reservoir.add(tokens, ids.repeat_interleave(h * w).to(torch.int32))
        if reservoir.tokens is None or reservoir.image_ids is None or len(reservoir.tokens) == 0:
            raise InputError("students: no training embeddings were given")
        tokens, image_ids = reservoir.tokens, reservoir.image_ids
        self.build(self.resolve_layout(tokens.shape[1]), tokens.device)
        self._val_tokens = tokens[:0]
        if config.val_fraction > 0:
            images = torch.unique(image_ids).cpu()
            if len(images) < 2:
                raise InputError("students: val_fraction needs at least 2 training images to hold some out")
            n_val = min(len(images) - 1, max(1, round(config.val_fraction * len(images))))
            held_out = images[torch.randperm(len(images), generator=self._sampler)[:n_val]].to(tokens.device)
            is_val = torch.isin(image_ids, held_out)
            self._val_tokens, tokens, image_ids = tokens[is_val], tokens[~is_val], image_ids[~is_val]
        if config.batch_images is not None:  # the buffer in image order, to cut whole images from
            order = torch.argsort(image_ids, stable=True)
            tokens = tokens[order]
            counts = torch.unique_consecutive(image_ids[order], return_counts=True)[1]
            self._images = list(tokens.split(counts.tolist()))
        self._tokens = tokens
        self.val_history, self._best = [], (math.inf, None, 0)

    def training_batches(self, batches: Iterable[Tensor]) -> Iterator[Tensor]:
        """A fresh shuffle of the token buffer, ``batch_tokens`` at a time, as ``n x C x 1 x 1``;
        with ``batch_images``, the tokens of that many whole images, in a fresh image order."""
        if self.config.batch_images is not None:
            yield from self._image_batches(self.config.batch_images)
            return
        order = torch.randperm(len(self._tokens), generator=self._sampler)
        if self.config.tokens_per_epoch is not None:
            order = order[: self.config.tokens_per_epoch]
        for chunk in order.to(self._tokens.device).split(self.config.batch_tokens):
            yield self._tokens[chunk][:, :, None, None]

    def _image_batches(self, per_step: int) -> Iterator[Tensor]:
        images = torch.randperm(len(self._images), generator=self._sampler).tolist()
        for first in range(0, len(images), per_step):
            chosen = [self._images[image] for image in images[first : first + per_step]]
            yield torch.cat(chosen)[:, :, None, None]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.fitted_network().parameters(), lr=self.config.learning_rate)]

    def _losses(self, tokens: Tensor) -> Tensor:
        network = self.fitted_network()
        f_j, f_k = tokens.float().split(self.layout, dim=-1)
        return cosine_loss(network.forward_student(f_j), f_k) + cosine_loss(
            network.backward_student(f_k), f_j
        )

    def training_step(self, embeddings: Tensor) -> Tensor:
        return self._losses(embeddings.flatten(1))

    def end_epoch(self, stage: Stage, epoch: int, loss: float) -> bool:
        """Early stopping on held-out images: keep the best weights, stop after ``patience`` worse epochs."""
        if len(self._val_tokens) == 0:
            return False
        with torch.no_grad():
            chunks = self._val_tokens.split(self.config.predict_batch_tokens)
            total = sum(float(self._losses(chunk)) * len(chunk) for chunk in chunks)
        val_loss = total / len(self._val_tokens)
        self.val_history.append(val_loss)
        best, state, stale = self._best
        if val_loss < best:
            network = self.fitted_network()
            self._best = (val_loss, {key: value.clone() for key, value in network.state_dict().items()}, 0)
            return False
        self._best = (best, state, stale + 1)
        return stale + 1 >= self.config.patience

    def training_state(self) -> dict[str, Any]:
        """Early stopping's best weights and patience, the validation losses so far and the
        token sampler's state (it shuffles every epoch)."""
        return {"best": self._best, "val_history": list(self.val_history), "sampler": self._sampler.get_state()}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self._best = state["best"]
        self.val_history = list(state["val_history"])
        self._sampler.set_state(state["sampler"])

    def after_fit(self) -> None:
        _, state, _ = self._best
        if state is not None:
            self.fitted_network().load_state_dict(state)
        self._tokens = self._val_tokens = torch.empty(0)
        self._images = []

    def direction_maps(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """``(Delta_j, Delta_k)``: backward and forward distance maps, each ``B x h x w``."""
        return self.evaluate(self._direction_maps, embeddings)

    def _direction_maps(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        network = self.fitted_network()
        b, c, h, w = embeddings.shape
        tokens = embeddings.permute(0, 2, 3, 1).reshape(b * h * w, c)
        backward_parts, forward_parts = [], []
        for chunk in tokens.split(self.config.predict_batch_tokens):
            f_j, f_k = chunk.split(self.layout, dim=-1)
            forward_parts.append(normalised_distance(network.forward_student(f_j), f_k))
            backward_parts.append(normalised_distance(network.backward_student(f_k), f_j))
        return torch.cat(backward_parts).reshape(b, h, w), torch.cat(forward_parts).reshape(b, h, w)

    def anomaly_maps(self, embeddings: Tensor) -> Tensor:
        return fuse_maps(*self._direction_maps(embeddings), self.config.fusion)

    def predict(self, embeddings: Tensor) -> DetectorOutput:
        """Fused token-resolution maps and top-fraction image scores; times the student part
        (:attr:`last_predict_seconds`). On CUDA the time is taken by two events queued around the
        students' kernels, read only when asked: predict itself never waits for the device, so the
        teacher's kernels, the students' and the map's run back to back."""
        if embeddings.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            output = super().predict(embeddings)
            end.record()
            self._timing = (start, end)
            return output
        started = time.perf_counter()
        output = super().predict(embeddings)
        self._timing = time.perf_counter() - started
        return output

    @property
    def last_predict_seconds(self) -> float:
        """Seconds of the last :meth:`predict` (students + distances; the teacher is not in it); on
        CUDA the device time between its two events, waiting for the second one here."""
        if isinstance(self._timing, tuple):
            start, end = self._timing
            end.synchronize()
            return start.elapsed_time(end) / 1000
        return self._timing
