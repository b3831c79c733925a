"""The training skeleton every neural detector runs on.

A neural detector (FastFlow, RD++, DeSTSeg, ViTAD, VarAD, the L2BT students, RealNet) is a
network trained by gradient descent on embedding batches. What they all share lives here, in
:class:`NeuralDetector`:

- the **layout**: the embedding's channels split into layers (one per backbone layer),
  ``config.level_channels``, filled by :meth:`~NeuralDetector.bind_layout` from the strategy's
  embedder or, when empty at fit, derived by :meth:`~NeuralDetector.default_layout` (one layer);
  one check that it matches the embedding, and one saved key :data:`LAYOUT_KEY`;
- the network, built lazily on the first batch (seeded, so equal configs give equal networks),
  and :attr:`~NeuralDetector.generator`, seeded, on the batches' device, for the detector's
  random draws (synthetic anomalies, noise);
- the **epoch loop**: one or more :class:`Stage` (DeSTSeg and RealNet train two networks one
  after the other), each with its optimisers, training step, train-mode switch and a
  learning-rate factor per epoch (ViTAD's step decay); non-finite losses stop the fit with one
  line; the mean loss of every epoch goes to :attr:`~NeuralDetector.loss_history`;
- **mixed precision** (``config.precision``): the training step's forward pass and ``predict``
  run under ``torch.autocast`` (bfloat16, or float16 with a ``GradScaler`` scaling the loss);
  the default float32 runs no autocast at all, and ``auto`` means bfloat16 (float16 where the
  GPU lacks it) on CUDA and float32 elsewhere. Weights, optimiser state and the maps handed on
  stay float32;
- ``predict``: eval mode, no gradients, the detector's map, then the one image-score rule
  (``image_score`` / ``top_fraction``);
- the flat state (network weights under :attr:`~NeuralDetector.state_prefix`, the layout, the
  detector's extra entries) and loading it back with one-line :class:`ArtifactError` on any
  mismatch, nothing half-loaded left behind; older artifacts that saved the layout as
  ``level_channels`` or ``split_sizes`` still load;
- :class:`~hrad.errors.NotFittedError` before fit / load, and ``scoring_module`` for ONNX export.

A detector supplies :meth:`~NeuralDetector.build_network`, :meth:`~NeuralDetector.optimizers`,
:meth:`~NeuralDetector.training_step` and :meth:`~NeuralDetector.anomaly_maps`, plus the hooks
it needs.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import ClassVar, Generic, Literal, TypeVar

import torch
from pydantic import Field
from torch import Tensor, nn

from hrad.detectors.base import Detector, DetectorConfig, DetectorOutput, PredictScoring
from hrad.detectors.scoring import (
    ChannelStatistics,
    ImageScore,
    image_scores,
    load_module_state,
    module_state,
)
from hrad.errors import ArtifactError, ConfigError, InputError, NotFittedError

logger = logging.getLogger(__name__)

#: the state entry holding the embedding's per-layer channels
LAYOUT_KEY = "layer_channels"
#: names older artifacts used for it (FastFlow, RD++, DeSTSeg; ViTAD, VarAD)
LEGACY_LAYOUT_KEYS = ("level_channels", "split_sizes")
#: variance floor of per-channel standardisation (``nn.LayerNorm``'s default eps)
STANDARDISE_EPS = 1e-5

#: compute precision of a neural detector's training and predict (see :func:`autocast_dtype`)
Precision = Literal["float32", "auto", "bfloat16", "float16"]


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast type of ``precision`` on ``device``; None = plain float32 (no autocast).

    ``auto`` is bfloat16 on CUDA devices that support it, float16 on older GPUs and float32
    elsewhere; ``bfloat16`` / ``float16`` apply on any device (CPU autocast when asked).
    """
    if precision == "float32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bfloat16" else torch.float16


class NeuralConfig(DetectorConfig):
    """Options every neural detector has."""

    #: channels of each embedding layer in order; empty = filled by bind_layout from the
    #: strategy's embedder (one entry per backbone layer), else the detector's default split
    level_channels: tuple[int, ...] = ()
    #: how the token map becomes one image score: its maximum or the mean of its top fraction
    image_score: ImageScore = "max"
    #: fraction of the map's highest tokens averaged by image_score="top_mean"
    top_fraction: float = Field(default=0.01, gt=0, le=1)
    #: compute precision of training and predict (torch.autocast; weights stay float32):
    #: float32 = no autocast; auto = bfloat16 on CUDA (float16 on GPUs without it, with loss
    #: scaling), float32 on CPU; bfloat16 / float16 on any device
    precision: Precision = "float32"


class EpochsConfig(NeuralConfig):
    """A neural detector trained in one stage of ``epochs`` epochs."""

    #: training epochs (passes over the embedding batches)
    epochs: int = Field(default=20, ge=1)


ConfigT = TypeVar("ConfigT", bound=NeuralConfig)
NetT = TypeVar("NetT", bound=nn.Module)
ResultT = TypeVar("ResultT")


def _train_all(network: nn.Module) -> None:
    network.train()


def _constant_lr(epoch: int) -> float:
    return 1.0


def _has_gradients(optimizer: torch.optim.Optimizer) -> bool:
    return any(
        parameter.grad is not None for group in optimizer.param_groups for parameter in group["params"]
    )


@dataclass
class Stage:
    """One training phase: ``epochs`` passes over the batches, each batch one optimiser step.

    ``optimizers`` is called once, when the stage starts and the network exists; ``train`` puts
    the network in the stage's mode (e.g. one sub-network training, the other frozen in eval);
    ``lr_factor(epoch)`` multiplies every group's initial learning rate in that epoch.
    """

    name: str
    epochs: int
    step: Callable[[Tensor], Tensor]
    optimizers: Callable[[], list[torch.optim.Optimizer]]
    train: Callable[[nn.Module], None] = _train_all
    lr_factor: Callable[[int], float] = _constant_lr


class NeuralDetector(Detector[ConfigT], Generic[ConfigT, NetT]):
    """Base of the gradient-trained detectors; see the module docstring."""

    multi_pass = True  # one pass over the embedding batches per epoch
    #: prefix of the network's weights in the state (kept per detector so old artifacts load)
    state_prefix: ClassVar[str] = "network"
    #: extra state entries the detector saves besides the weights and the layout
    extra_state_keys: ClassVar[tuple[str, ...]] = ()
    #: smallest channel count of one layer (a coupling flow needs 2)
    min_layer_channels: ClassVar[int] = 1
    #: whether predict is plain torch on fixed shapes (ONNX-exportable as it is)
    exportable: ClassVar[bool] = True

    def __init__(self, config: ConfigT) -> None:
        super().__init__(config)
        self.network: NetT | None = None
        #: channels of every embedding layer, fixed at fit / load
        self.layout: list[int] = []
        #: mean training loss of every epoch, all stages in order
        self.loss_history: list[float] = []
        #: the same per stage name
        self.stage_losses: dict[str, list[float]] = {}
        self.generator: torch.Generator = torch.Generator()

    # ----------------------------------------------------------------- names and layout
    @property
    def name(self) -> str:
        return self.config.name

    @classmethod
    def bind_layout(cls, config: ConfigT, layer_channels: tuple[int, ...]) -> ConfigT:
        """Fill ``level_channels`` with the embedder's per-layer channels unless the user set it."""
        if config.level_channels or not layer_channels:
            return config
        return config.model_copy(update={"level_channels": tuple(int(size) for size in layer_channels)})

    def default_layers(self) -> int:
        """How many equal layers :meth:`default_layout` splits the embedding into (ViTAD / VarAD: one
        per configured layer or level)."""
        return 1

    def default_layout(self, channels: int) -> list[int]:
        """The layout when ``level_channels`` is empty: :meth:`default_layers` equal layers."""
        layers = self.default_layers()
        if channels % layers:
            raise ConfigError(
                f"{self.name} cannot split {channels} embedding channels into {layers} equal layers;"
                " set level_channels"
            )
        return [channels // layers] * layers

    def resolve_layout(self, channels: int) -> list[int]:
        """The one level-size check: the layout must cover the embedding exactly."""
        sizes = list(self.config.level_channels) or self.default_layout(channels)
        if min(sizes) < self.min_layer_channels:
            need = (
                "must all be positive"
                if self.min_layer_channels == 1
                else (f"every layer needs at least {self.min_layer_channels} channels")
            )
            raise ConfigError(f"{self.name} level_channels {sizes}: {need}")
        if sum(sizes) != channels:
            raise ConfigError(
                f"{self.name} level_channels {sizes} sum to {sum(sizes)}, but the embedding has {channels} channels"
            )
        return sizes

    def check_embeddings(self, embeddings: Tensor) -> None:
        """``B x C x h x w`` with the fitted channel count (once fitted)."""
        if embeddings.ndim != 4:
            raise InputError(
                f"{self.name} expects B x C x h x w embeddings, got shape {tuple(embeddings.shape)}"
            )
        if self.layout and embeddings.shape[1] != sum(self.layout):
            raise InputError(
                f"{self.name} was fitted on {sum(self.layout)}-channel embeddings, got {embeddings.shape[1]}"
            )

    def split(self, embeddings: Tensor) -> list[Tensor]:
        """The embedding's layers, as the layout says."""
        return list(embeddings.split(self.layout, dim=1))

    # ----------------------------------------------------------------- what a detector supplies
    @abstractmethod
    def build_network(self, layout: list[int]) -> NetT:
        """The untrained network for a layout (called under a fixed seed)."""

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimisers of the one-stage schedule."""
        raise NotImplementedError(f"{type(self).__name__} defines no optimizers")

    def training_step(self, embeddings: Tensor) -> Tensor:
        """The loss of one batch in the one-stage schedule (the base steps the optimisers)."""
        raise NotImplementedError(f"{type(self).__name__} defines no training_step")

    def lr_factor(self, epoch: int) -> float:
        """Learning-rate multiplier of ``epoch`` in the one-stage schedule."""
        return 1.0

    @abstractmethod
    def anomaly_maps(self, embeddings: Tensor) -> Tensor:
        """``B x h x w`` maps of checked, float, on-device embeddings (eval mode, no gradients)."""

    # ----------------------------------------------------------------- hooks
    def training_stages(self) -> list[Stage]:
        """The schedule: one stage of ``config.epochs`` epochs by default."""
        if not isinstance(self.config, EpochsConfig):
            raise NotImplementedError(f"{type(self).__name__} must define training_stages")
        return [
            Stage("train", self.config.epochs, self.training_step, self.optimizers, lr_factor=self.lr_factor)
        ]

    def before_fit(self, batches: Iterable[Tensor]) -> None:
        """Called first in ``fit`` (e.g. a statistics pass that then calls :meth:`build`)."""

    def configure(self, embeddings: Tensor) -> None:
        """Called with the first batch once :attr:`layout` is set, before the network is built
        (e.g. grid-dependent sizes)."""

    def check_batch(self, embeddings: Tensor) -> None:
        """Extra per-batch training checks (e.g. a grid too small for the network)."""

    def training_batches(self, batches: Iterable[Tensor]) -> Iterable[Tensor]:
        """What one epoch iterates: the embedding batches by default."""
        return batches

    def training_embeddings(self, batch: Tensor) -> Tensor:
        """The clean embeddings of a training batch, for the checks: the batch itself unless the
        detector asked for image-space anomalies (then a packed batch, :func:`~hrad.detectors.base.unpack_anomalies`)."""
        return batch

    def end_epoch(self, stage: Stage, epoch: int, loss: float) -> bool:
        """Called after every epoch with its mean loss; True stops the stage (early stopping)."""
        return False

    def after_fit(self) -> None:
        """Called once training is over, before eval mode (e.g. restore the best weights)."""

    def extra_state(self) -> dict[str, Tensor]:
        """Entries saved besides weights and layout (named in :attr:`extra_state_keys`)."""
        return {}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        """Check / restore the extra entries before the network is rebuilt; ArtifactError on mismatch."""

    def check_loaded(self, network: NetT) -> None:
        """Check loaded weights (e.g. positive standard deviations); ArtifactError on failure."""

    def upgrade_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Older artifacts' state in today's names: the layout under :data:`LAYOUT_KEY`."""
        if LAYOUT_KEY not in state:
            for legacy in LEGACY_LAYOUT_KEYS:
                if legacy in state:
                    state = {**state, LAYOUT_KEY: state[legacy]}
                    del state[legacy]
                    break
        return state

    def channel_statistics(
        self, batches: Iterable[Tensor], eps: float = STANDARDISE_EPS
    ) -> tuple[Tensor, Tensor]:
        """A checking pass over the batches: per-channel mean and std over every training
        position (float64 shifted sums), on the batches' device."""
        statistics = ChannelStatistics(eps)
        for batch in batches:
            self.check_embeddings(batch)
            if statistics.channels is not None and batch.shape[1] != statistics.channels:
                raise InputError(
                    f"{self.name} was fitted on {statistics.channels}-channel embeddings, got {batch.shape[1]}"
                )
            self.check_batch(batch)
            statistics.add(batch)
        return statistics.mean_std(self.name)

    # ----------------------------------------------------------------- building
    def build(self, layout: list[int], device: torch.device) -> NetT:
        """Set the layout and build the seeded network and generator on ``device``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            network = self.build_network(layout).to(device)
        self.layout, self.network = list(layout), network
        self.generator = torch.Generator(device=device).manual_seed(self.config.seed)
        return network

    def fitted_network(self) -> NetT:
        if self.network is None:
            raise NotFittedError(
                f"{self.name} has not been fitted or loaded; call fit() or load_state_dict() first"
            )
        return self.network

    @property
    def device(self) -> torch.device:
        network = self.fitted_network()
        for tensor in (*network.parameters(), *network.buffers()):
            return tensor.device
        return torch.device("cpu")

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The autocast type training and predict run at on the network's device (None = float32)."""
        return autocast_dtype(self.config.precision, self.device)

    def autocast(self) -> AbstractContextManager[object]:
        """Context of a forward pass at :attr:`compute_dtype` (none while exporting: the traced
        graph stays float32)."""
        dtype = self.compute_dtype
        if dtype is None or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    # ----------------------------------------------------------------- Detector API
    def fit(self, batches: Iterable[Tensor]) -> None:
        self.network, self.layout = None, []  # a refit starts from scratch
        self.loss_history, self.stage_losses = [], {}
        self.before_fit(batches)
        for stage in self.training_stages():
            self._run_stage(stage, batches)
        if self.network is None:
            raise InputError(f"{self.name} fit received no embedding batches")
        self.after_fit()
        self.network.eval()

    def _run_stage(self, stage: Stage, batches: Iterable[Tensor]) -> None:
        optimizers: list[torch.optim.Optimizer] | None = None
        scaler: torch.amp.GradScaler | None = None
        history = self.stage_losses.setdefault(stage.name, [])
        for epoch in range(stage.epochs):
            total, count = 0.0, 0
            for batch in self.training_batches(batches):
                clean = self.training_embeddings(batch)
                self.check_embeddings(clean)
                if self.network is None:
                    self.layout = self.resolve_layout(int(clean.shape[1]))
                    self.configure(clean)
                    self.build(self.layout, batch.device)
                embeddings = batch.to(self.device).float()
                self.check_batch(embeddings)
                network = self.fitted_network()
                if optimizers is None:
                    optimizers = stage.optimizers()
                    for optimizer in optimizers:
                        for group in optimizer.param_groups:
                            group.setdefault("initial_lr", group["lr"])
                    # float16 gradients underflow: scale the loss (disabled = plain backward / step)
                    scaler = torch.amp.GradScaler(
                        self.device.type, enabled=self.compute_dtype == torch.float16
                    )
                if count == 0:
                    stage.train(network)
                    factor = stage.lr_factor(epoch)
                    for optimizer in optimizers:
                        for group in optimizer.param_groups:
                            group["lr"] = group["initial_lr"] * factor
                with self.autocast():
                    loss = stage.step(embeddings)
                if not bool(torch.isfinite(loss)):
                    hint = (
                        f", or float16 overflowed (precision {self.config.precision}; try bfloat16)"
                        if self.compute_dtype == torch.float16
                        else ""
                    )
                    raise InputError(
                        f"{self.name}: the training loss is not finite in epoch {epoch + 1} of {stage.name};"
                        f" the embeddings contain NaN or inf, or the learning rate is too high{hint}"
                    )
                assert scaler is not None
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                for optimizer in optimizers:
                    if scaler.is_enabled() and not _has_gradients(optimizer):
                        continue  # nothing to unscale (a frozen part): the scaler would refuse it
                    scaler.step(optimizer)
                scaler.update()
                total += float(loss.detach()) * len(embeddings)
                count += len(embeddings)
            if count == 0:
                raise InputError(f"{self.name} fit received no embedding batches")
            mean = total / count
            history.append(mean)
            self.loss_history.append(mean)
            logger.info("%s %s: epoch %d/%d, mean loss %.5g", self.name, stage.name, epoch + 1, stage.epochs, mean)
            if self.end_epoch(stage, epoch, mean):
                break

    def evaluate(self, forward: Callable[[Tensor], ResultT], embeddings: Tensor) -> ResultT:
        """``forward`` of checked float embeddings on the network's device, in eval mode, without
        gradients, at the compute precision: what ``predict`` runs, also for analysis helpers."""
        network = self.fitted_network()
        if self.device != embeddings.device:
            # follow the embeddings, as PatchCore's bank and PaDiM's statistics do: a network
            # loaded from an artifact is built on the CPU, and HiAD rebuilds its detectors from
            # saved states, so without this a GPU predict ran the network on the CPU
            # (benchmarks/results/gpu_cuda.md)
            network.to(embeddings.device)
        network.eval()  # BatchNorm uses running statistics: no image depends on its batch mates
        self.check_embeddings(embeddings)
        with torch.no_grad(), self.autocast():
            return forward(embeddings.float())

    def predict(self, embeddings: Tensor) -> DetectorOutput:
        maps = self.evaluate(self.anomaly_maps, embeddings).float()  # float32 maps at any precision
        return DetectorOutput(
            maps=maps, scores=image_scores(maps, self.config.image_score, self.config.top_fraction)
        )

    def scoring_module(self) -> nn.Module | None:
        """Predict is plain torch: exportable to ONNX as it is (unless ``exportable`` is off)."""
        network = self.fitted_network()
        return PredictScoring(self, network) if self.exportable else None

    def state_dict(self) -> dict[str, Tensor]:
        state = module_state(self.fitted_network(), self.state_prefix)
        state[LAYOUT_KEY] = torch.tensor(self.layout, dtype=torch.int64)
        state.update(self.extra_state())
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Rebuild the network from the config and the saved layout; on any mismatch raise one
        line of ArtifactError and keep the detector as it was."""
        state = self.upgrade_state(dict(state))
        missing = [key for key in (LAYOUT_KEY, *self.extra_state_keys) if key not in state]
        if missing:
            raise ArtifactError(f"{self.name} state lacks {', '.join(missing)}; the artifact is incomplete")
        layout = [int(size) for size in state[LAYOUT_KEY].flatten().tolist()]
        if not layout or min(layout) < self.min_layer_channels:
            raise ArtifactError(f"{self.name} state has invalid {LAYOUT_KEY} {layout}")
        if self.config.level_channels and list(self.config.level_channels) != layout:
            raise ArtifactError(
                f"{self.name} state was trained with level_channels {layout},"
                f" config says {list(self.config.level_channels)}"
            )
        previous = self.network, self.layout, self.generator
        try:
            self.load_extra_state(state)
            try:
                network = self.build(layout, torch.device("cpu"))
            except ConfigError as error:
                raise ArtifactError(f"{self.name} state does not fit the config: {error}") from None
            load_module_state(network, state, self.state_prefix, self.name)
            self.check_loaded(network)
        except ArtifactError:
            self.network, self.layout, self.generator = previous
            raise
        network.eval()
