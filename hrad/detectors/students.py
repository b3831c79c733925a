"""Students of "Learning to Be a Transformer" (L2BT): two small MLPs that mimic a frozen ViT.

The teacher is the frozen ViT backbone the strategy runs; the embedding this detector receives
is the teacher's blocks ``j`` and ``k`` (after the final LayerNorm) concatenated along channels.
A forward student learns ``j -> k`` (contextualisation), a backward student ``k -> j``; both
are trained jointly on tokens of good images with ``1 - cos`` losses. On anomalous tokens the
small students fail, so the per-token distance between the L2-normalised prediction and the
L2-normalised teacher feature, fused over both directions, is the anomaly map.

Choices beyond the paper, all configurable:

* tokens, not images, are the training samples: every pass shuffles tokens across images, so a
  few images (few-shot) still give thousands of samples per step;
* the teacher runs once: tokens are gathered in one buffer on the embeddings' device (float16
  by default) and the epochs iterate that buffer. When there are more than ``max_tokens``
  tokens, a uniform seeded sample of ``max_tokens`` is kept (priority/reservoir sampling, so
  memory stays bounded while batches stream in);
* the learning rate follows the paper (1e-3); the reference code uses 1e-4;
* the final epoch's weights are used; with ``val_fraction`` > 0 whole training images are held
  out and the weights with the lowest held-out loss are kept (early stopping), never test data;
* the image score is the mean of the top ``top_fraction`` values of the token map (at least one
  token). The paper takes 0.1% of the *upsampled pixel* map; at token resolution this is the
  same fraction of tokens, which is coarser but does not depend on the output size.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hrad.detectors.base import Detector, DetectorConfig, DetectorOutput
from hrad.detectors.scoring import top_fraction_score
from hrad.errors import ArtifactError, ConfigError, InputError
from hrad.features.base import EmbeddingSpec, FeatureExtractor

Fusion = Literal["product", "sum", "forward", "backward"]


class StudentsConfig(DetectorConfig):
    """Options of the L2BT students (defaults follow the paper unless noted)."""

    name: Literal["students"] = "students"
    #: training epochs of both students
    epochs: int = Field(default=50, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)  # paper; the reference code uses 1e-4
    #: tokens per optimisation step (the paper does not say; the reference code uses 4 images)
    batch_tokens: int = Field(default=4096, ge=1)
    #: at most this many training tokens are kept (uniform seeded sample beyond that)
    max_tokens: int = Field(default=1_000_000, ge=1)
    #: tokens drawn per epoch from the buffer; None = one full pass over the buffer
    tokens_per_epoch: int | None = Field(default=None, ge=1)
    #: storage type of the token buffer; float16 halves memory (1M ViT-B tokens: 3 GB)
    buffer_dtype: Literal["float16", "float32"] = "float16"
    #: fraction of training images held out for early stopping; 0 = use the final epoch
    val_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    #: epochs without held-out improvement before stopping (only with ``val_fraction`` > 0)
    patience: int = Field(default=5, ge=1)
    #: map from the students' errors: product (paper), sum, forward or backward student only
    fusion: Fusion = "product"
    #: image score = mean of this fraction of the highest map values (paper: 0.001)
    top_fraction: float = Field(default=0.001, gt=0.0, le=1.0)
    #: channel index where block k starts in the embedding; None = half of the channels
    split_at: int | None = Field(default=None, ge=1)
    #: tokens per chunk at inference (bounds memory on huge maps)
    predict_batch_tokens: int = Field(default=65536, ge=1)


def default_student_blocks(depth: int) -> tuple[str, str]:
    """Blocks ``j, k`` for a ViT of ``depth`` blocks: about two thirds of the depth and the last.

    For the paper's 12-block ViT this is (8, 12); for a 4-block ViT (3, 4).
    """
    if depth < 2:
        raise ConfigError(f"students need a ViT teacher with at least 2 blocks, this one has {depth}")
    j = min(max(1, round(2 * depth / 3)), depth - 1)
    return f"block{j}", f"block{depth}"


def _vit_depth(extractor: FeatureExtractor) -> int:
    blocks = [name for name in extractor.layer_strides if name.startswith("block")]
    return max((int(name.removeprefix("block")) for name in blocks), default=0)


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
    """Combine the two directions: product (paper, a soft AND), sum, or one direction alone.

    ``backward_map`` is Delta_j (k -> j prediction error), ``forward_map`` Delta_k (j -> k).
    """
    if fusion == "product":
        return backward_map * forward_map
    if fusion == "sum":
        return backward_map + forward_map
    if fusion == "forward":
        return forward_map
    return backward_map


class TokenReservoir:
    """A uniform seeded sample of at most ``capacity`` tokens from a stream of batches.

    Every token gets a random key; the buffer keeps the tokens with the smallest keys, which is
    a uniform sample without replacement. Only the buffer slots that change are rewritten, so
    memory and copying stay bounded however many batches stream in. Each token remembers the
    index of the image it came from (for image-level hold-out).
    """

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


def _timer_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Students(Detector[StudentsConfig]):
    """Forward (j -> k) and backward (k -> j) students over a frozen ViT teacher."""

    trainable = True

    def __init__(self, config: StudentsConfig) -> None:
        super().__init__(config)
        self.forward_student: StudentMLP | None = None
        self.backward_student: StudentMLP | None = None
        self.split: tuple[int, int] | None = None
        #: mean training loss (forward + backward) of every epoch run
        self.loss_history: list[float] = []
        #: mean held-out loss of every epoch (only with ``val_fraction`` > 0)
        self.val_history: list[float] = []
        #: seconds of the last :meth:`predict` (students + distances; the teacher is not in it)
        self.last_predict_seconds: float = 0.0

    # ----------------------------------------------------------------- embedding
    @classmethod
    def default_embedding(cls, extractor: FeatureExtractor) -> EmbeddingSpec:
        if not extractor.is_vit:
            raise ConfigError("students need a ViT teacher (e.g. a DINOv2 backbone); this backbone is a CNN")
        return EmbeddingSpec(layers=default_student_blocks(_vit_depth(extractor)), aggregation=1)

    @classmethod
    def embedding_spec(cls, config: DetectorConfig, extractor: FeatureExtractor) -> EmbeddingSpec:
        spec = super().embedding_spec(config, extractor)
        if len(spec.layers) != 2:
            raise ConfigError(f"students need exactly two layers (j, k), got {len(spec.layers)}: {', '.join(spec.layers)}")
        return spec

    # ----------------------------------------------------------------- training
    def _split(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """``n x C`` tokens -> (block j part, block k part)."""
        assert self.split is not None
        if embeddings.shape[-1] != sum(self.split):
            raise InputError(
                f"students were built for {sum(self.split)} embedding channels, got {embeddings.shape[-1]}"
            )
        return embeddings[..., : self.split[0]], embeddings[..., self.split[0] :]

    def _init_split(self, channels: int) -> tuple[int, int]:
        at = self.config.split_at
        if at is None:
            if channels % 2:
                raise InputError(
                    f"students: cannot split {channels} embedding channels into two equal blocks; set split_at"
                )
            at = channels // 2
        if not 0 < at < channels:
            raise ConfigError(f"students: split_at {at} is outside the {channels} embedding channels")
        return at, channels - at

    def _build_students(self, split: tuple[int, int], device: torch.device) -> None:
        self.split = split
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.forward_student = StudentMLP(split[0], split[1]).to(device)
            self.backward_student = StudentMLP(split[1], split[0]).to(device)

    def _gather(self, batches: Iterable[Tensor], generator: torch.Generator) -> TokenReservoir:
        dtype = torch.float16 if self.config.buffer_dtype == "float16" else torch.float32
        reservoir = TokenReservoir(self.config.max_tokens, dtype, generator)
        for batch in batches:
            if batch.ndim != 4:
                raise InputError(f"students expect embedding batches n x C x h x w, got shape {tuple(batch.shape)}")
            n, c, h, w = batch.shape
            tokens = batch.detach().permute(0, 2, 3, 1).reshape(n * h * w, c)
            ids = torch.arange(reservoir.images_seen, reservoir.images_seen + n, device=batch.device)
            reservoir.images_seen += n
            reservoir.add(tokens, ids.repeat_interleave(h * w).to(torch.int32))
        if reservoir.tokens is None or len(reservoir.tokens) == 0:
            raise InputError("students: no training embeddings were given")
        return reservoir

    def _losses(self, tokens: Tensor) -> Tensor:
        assert self.forward_student is not None and self.backward_student is not None
        f_j, f_k = self._split(tokens.float())
        return cosine_loss(self.forward_student(f_j), f_k) + cosine_loss(self.backward_student(f_k), f_j)

    @torch.no_grad()
    def _mean_loss(self, tokens: Tensor) -> float:
        total = 0.0
        step = self.config.predict_batch_tokens
        for start in range(0, len(tokens), step):
            chunk = tokens[start : start + step]
            total += float(self._losses(chunk)) * len(chunk)
        return total / len(tokens)

    def fit(self, batches: Iterable[Tensor]) -> None:
        """Gather tokens once (bounded sample), then train both students for ``epochs`` epochs."""
        config = self.config
        generator = torch.Generator().manual_seed(config.seed)
        reservoir = self._gather(batches, generator)
        assert reservoir.tokens is not None and reservoir.image_ids is not None
        tokens, image_ids = reservoir.tokens, reservoir.image_ids
        device = tokens.device
        self._build_students(self._init_split(tokens.shape[1]), device)
        assert self.forward_student is not None and self.backward_student is not None

        val_tokens: Tensor | None = None
        if config.val_fraction > 0:
            images = torch.unique(image_ids).cpu()
            if len(images) < 2:
                raise InputError("students: val_fraction needs at least 2 training images to hold some out")
            n_val = min(len(images) - 1, max(1, round(config.val_fraction * len(images))))
            held_out = images[torch.randperm(len(images), generator=generator)[:n_val]].to(device)
            is_val = torch.isin(image_ids, held_out)
            val_tokens, tokens = tokens[is_val], tokens[~is_val]

        parameters = [*self.forward_student.parameters(), *self.backward_student.parameters()]
        optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
        self.loss_history, self.val_history = [], []
        best_val, best_state, stale = math.inf, None, 0
        self.forward_student.train()
        self.backward_student.train()
        for _ in range(config.epochs):
            order = torch.randperm(len(tokens), generator=generator)
            if config.tokens_per_epoch is not None:
                order = order[: config.tokens_per_epoch]
            order = order.to(device)
            total = 0.0
            for start in range(0, len(order), config.batch_tokens):
                batch = tokens[order[start : start + config.batch_tokens]]
                loss = self._losses(batch)
                if not torch.isfinite(loss):
                    raise InputError("students: training loss is not finite; the embeddings contain NaN or inf")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
            self.loss_history.append(total / len(order))
            if val_tokens is not None:
                val_loss = self._mean_loss(val_tokens)
                self.val_history.append(val_loss)
                if val_loss < best_val:
                    best_val, stale = val_loss, 0
                    best_state = copy.deepcopy((self.forward_student.state_dict(), self.backward_student.state_dict()))
                else:
                    stale += 1
                    if stale >= config.patience:
                        break
        if best_state is not None:
            self.forward_student.load_state_dict(best_state[0])
            self.backward_student.load_state_dict(best_state[1])
        self.forward_student.eval()
        self.backward_student.eval()

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def direction_maps(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """``(Delta_j, Delta_k)``: backward and forward distance maps, each ``B x h x w``."""
        if self.forward_student is None or self.backward_student is None:
            raise ConfigError("students: predict was called before fit or load_state_dict")
        if embeddings.ndim != 4:
            raise InputError(f"students expect embeddings B x C x h x w, got shape {tuple(embeddings.shape)}")
        b, c, h, w = embeddings.shape
        device = embeddings.device
        self.forward_student.to(device).eval()
        self.backward_student.to(device).eval()
        tokens = embeddings.permute(0, 2, 3, 1).reshape(b * h * w, c)
        backward_parts, forward_parts = [], []
        for start in range(0, len(tokens), self.config.predict_batch_tokens):
            f_j, f_k = self._split(tokens[start : start + self.config.predict_batch_tokens].float())
            forward_parts.append(normalised_distance(self.forward_student(f_j), f_k))
            backward_parts.append(normalised_distance(self.backward_student(f_k), f_j))
        return torch.cat(backward_parts).reshape(b, h, w), torch.cat(forward_parts).reshape(b, h, w)

    def predict(self, embeddings: Tensor) -> DetectorOutput:
        """Fused token-resolution maps and top-fraction image scores; times the student part."""
        _timer_sync(embeddings.device)
        started = time.perf_counter()
        backward_map, forward_map = self.direction_maps(embeddings)
        maps = fuse_maps(backward_map, forward_map, self.config.fusion)
        scores = top_fraction_score(maps, self.config.top_fraction)
        _timer_sync(embeddings.device)
        self.last_predict_seconds = time.perf_counter() - started
        return DetectorOutput(maps=maps.float(), scores=scores.float())

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Tensor]:
        if self.forward_student is None or self.backward_student is None or self.split is None:
            raise ConfigError("students: state_dict was called before fit")
        state = {f"forward.{key}": value.detach().cpu().clone() for key, value in self.forward_student.state_dict().items()}
        state.update({f"backward.{key}": value.detach().cpu().clone() for key, value in self.backward_student.state_dict().items()})
        state["split"] = torch.tensor(self.split, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "split" not in state:
            raise ArtifactError("students state has no 'split' entry; the artifact is not a students model")
        split = (int(state["split"][0]), int(state["split"][1]))
        self._build_students(split, torch.device("cpu"))
        assert self.forward_student is not None and self.backward_student is not None
        for prefix, student in (("forward.", self.forward_student), ("backward.", self.backward_student)):
            part = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
            try:
                student.load_state_dict(part, strict=True)
            except RuntimeError as error:
                first = str(error).strip().splitlines()[0]
                raise ArtifactError(f"students state does not match its split {split}: {first}") from None
        self.forward_student.eval()
        self.backward_student.eval()
