"""The training skeleton of the neural detectors.

:class:`NeuralDetector` owns the **layout** (the embedding's channels per backbone layer: bound
from the embedder, one check, one saved key), the network (built lazily under ``config.seed``)
and a seeded :attr:`~NeuralDetector.generator` for the detector's draws, the **epoch loop** over
one or more :class:`Stage` (one line on a non-finite loss; every epoch's mean loss kept),
**mixed precision** (``config.precision``: autocast for the training forward pass and predict,
float16 with a ``GradScaler``; weights, optimiser state and maps stay float32), predict (eval
mode, no gradients, one image-score rule), the flat state (loaded with one line of ArtifactError
on any mismatch, nothing half-loaded) and ONNX export. A detector supplies
:meth:`~NeuralDetector.build_network`, :meth:`~NeuralDetector.training_step` and
:meth:`~NeuralDetector.anomaly_maps`, plus the hooks it needs; shared network pieces:
:class:`StandardisedNet`, :func:`conv_bn_relu`.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, NoReturn, TypeVar

import torch
from pydantic import Field
from torch import Tensor, nn

from hrad.detectors.base import Detector, DetectorConfig, DetectorOutput, PredictScoring
from hrad.detectors.checkpoints import TrainingCheckpoint
from hrad.detectors.scoring import (
    ChannelStatistics,
    ImageScore,
    image_scores,
    load_module_state,
    module_state,
)
from hrad.errors import ArtifactError, ConfigError, DivergedError, InputError, NotFittedError
from hrad.progress import log_progress

logger = logging.getLogger(__name__)

#: the state entry holding the embedding's per-layer channels
LAYOUT_KEY = "layer_channels"
#: names older artifacts used for it (FastFlow, RD++, DeSTSeg; ViTAD, VarAD)
LEGACY_LAYOUT_KEYS = ("level_channels", "split_sizes")

#: compute precision of a neural detector's training and predict (see :func:`autocast_dtype`)
Precision = Literal["float32", "auto", "bfloat16", "float16"]


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast type of ``precision`` on ``device``; None = plain float32 (no autocast)."""
    if precision == "float32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bfloat16" else torch.float16


class NeuralConfig(DetectorConfig):
    """Options every neural detector has."""

    #: channels of each embedding layer; empty = bound from the embedder, else the default split
    level_channels: tuple[int, ...] = ()
    #: how the token map becomes one image score: its maximum or the mean of its top fraction
    image_score: ImageScore = "max"
    #: fraction of the map's highest tokens averaged by image_score="top_mean"
    top_fraction: float = Field(default=0.01, gt=0, le=1)
    #: autocast type of training and predict (weights stay float32): auto = bfloat16 on CUDA
    #: (float16 on GPUs without it), float32 elsewhere; bfloat16 / float16 on any device
    precision: Precision = "float32"


def check_fraction_range(config: NeuralConfig, field: str) -> None:
    """One line of ConfigError unless the ``(low, high)`` option ``field`` has ``0 < low <= high <= 1``."""
    low, high = value = getattr(config, field)
    if not 0 < low <= high <= 1:
        raise ConfigError(f"{config.name} {field} {value} must satisfy 0 < low <= high <= 1")


class EpochsConfig(NeuralConfig):
    """A neural detector trained in one stage of ``epochs`` epochs."""

    #: training epochs (passes over the embedding batches)
    epochs: int = Field(default=20, ge=1)


class StandardisedNet(nn.Module):
    """A network that first standardises the embedding with saved per-channel ``mean`` / ``std``
    (filled by :meth:`NeuralDetector.fit_standardisation`)."""

    mean: Tensor
    std: Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))

    def standardise(self, embeddings: Tensor) -> Tensor:
        return (embeddings - self.mean) / self.std


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, stride: int = 1
) -> nn.Sequential:
    padding = dilation * (kernel_size // 2)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU())


ConfigT = TypeVar("ConfigT", bound=NeuralConfig)
NetT = TypeVar("NetT", bound=nn.Module)
ResultT = TypeVar("ResultT")


@dataclass
class Stage:
    """``epochs`` passes, one optimiser step per batch; ``optimizers`` is called once the network
    exists, ``train`` sets the modes (e.g. one part frozen), ``lr_factor(epoch)`` scales the rates."""

    name: str
    epochs: int
    step: Callable[[Tensor], Tensor]
    optimizers: Callable[[], list[torch.optim.Optimizer]]
    train: Callable[[nn.Module], object] = nn.Module.train
    lr_factor: Callable[[int], float] = lambda epoch: 1.0


class NeuralDetector(Detector[ConfigT], Generic[ConfigT, NetT]):
    """Base of the gradient-trained detectors; see the module docstring."""

    multi_pass = True  # one pass over the embedding batches per epoch
    #: prefix of the network's weights in the state (per detector, so old artifacts load)
    state_prefix: ClassVar[str] = "network"
    #: extra state entries the detector saves besides the weights and the layout
    extra_state_keys: ClassVar[tuple[str, ...]] = ()
    #: smallest channel count of one layer (a coupling flow needs 2)
    min_layer_channels: ClassVar[int] = 1
    #: whether predict is plain torch on fixed shapes (ONNX-exportable as it is)
    exportable: ClassVar[bool] = True
    #: the one-stage optimiser: the config's ``lr`` and, where it has them, ``betas`` / ``weight_decay``
    optimizer_class: ClassVar[type[torch.optim.Optimizer]] = torch.optim.Adam

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
        """How many equal layers :meth:`default_layout` splits the embedding into."""
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
            least = self.min_layer_channels
            need = "must all be positive" if least == 1 else f"every layer needs at least {least} channels"
            raise ConfigError(f"{self.name} level_channels {sizes}: {need}")
        if sum(sizes) != channels:
            raise ConfigError(
                f"{self.name} level_channels {sizes} sum to {sum(sizes)}, but the embedding has {channels} channels"
            )
        return sizes

    def check_embeddings(self, embeddings: Tensor, channels: int | None = None) -> None:
        """``B x C x h x w`` with the fitted channel count (once fitted, else ``channels`` if given)."""
        if embeddings.ndim != 4:
            raise InputError(
                f"{self.name} expects B x C x h x w embeddings, got shape {tuple(embeddings.shape)}"
            )
        channels = sum(self.layout) if self.layout else channels
        if channels is not None and embeddings.shape[1] != channels:
            raise InputError(f"{self.name} was fitted on {channels}-channel embeddings, got {embeddings.shape[1]}")

    def split(self, embeddings: Tensor) -> list[Tensor]:
        return list(embeddings.split(self.layout, dim=1))

    # ----------------------------------------------------------------- what a detector supplies
    @abstractmethod
    def build_network(self, layout: list[int]) -> NetT:
        """The untrained network for a layout (called under a fixed seed)."""

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimisers of the one-stage schedule: :attr:`optimizer_class` over the network."""
        keys = ("lr", "betas", "weight_decay")
        options = {key: getattr(self.config, key) for key in keys if hasattr(self.config, key)}
        if "lr" not in options:
            raise NotImplementedError(f"{type(self).__name__}'s config has no lr: define optimizers")
        return [self.optimizer_class(self.fitted_network().parameters(), **options)]

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
        """Called with the first batch once :attr:`layout` is set, before the network is built."""

    def check_batch(self, embeddings: Tensor) -> None:
        """Extra per-batch training checks (e.g. a grid too small for the network)."""

    def training_batches(self, batches: Iterable[Tensor]) -> Iterable[Tensor]:
        """What one epoch iterates: the embedding batches by default."""
        return batches

    def training_embeddings(self, batch: Tensor) -> Tensor:
        """The clean embeddings of a training batch, for the checks (differs from the batch when
        it is packed with image-space anomalies)."""
        return batch

    def end_epoch(self, stage: Stage, epoch: int, loss: float) -> bool:
        """Called after every epoch with its mean loss; True stops the stage (early stopping)."""
        return False

    def after_fit(self) -> None:
        """Called once training is over, before eval mode (e.g. restore the best weights)."""

    def training_state(self) -> dict[str, Any]:
        """What the detector changes while it trains besides the network, the optimisers and the
        loss histories (e.g. early stopping's best weights), for a training checkpoint
        (:mod:`hrad.detectors.checkpoints`); :meth:`load_training_state` puts it back."""
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`training_state` returned, when a fit resumes from a checkpoint."""

    def extra_state(self) -> dict[str, Tensor]:
        """Entries saved besides weights and layout (named in :attr:`extra_state_keys`)."""
        return {}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        """Check / restore the extra entries before the network is rebuilt; ArtifactError on mismatch."""

    def check_loaded(self, network: NetT) -> None:
        """Check loaded weights; ArtifactError on failure. Here: every saved std is positive."""
        for name, module in network.named_modules():
            if isinstance(module, StandardisedNet) and not bool((module.std > 0).all()):
                entry = ".".join(part for part in (self.state_prefix, name, "std") if part)
                raise ArtifactError(f"{self.name} state entry {entry} has non-positive standard deviations")

    def upgrade_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Older artifacts' state in today's names: the layout under :data:`LAYOUT_KEY`."""
        if LAYOUT_KEY not in state:
            for legacy in LEGACY_LAYOUT_KEYS:
                if legacy in state:
                    state = {**state, LAYOUT_KEY: state[legacy]}
                    del state[legacy]
                    break
        return state

    def fit_standardisation(self, batches: Iterable[Tensor]) -> NetT:
        """A checking pass for the per-channel mean and std of the clean training embeddings,
        then the network built with them (call from ``before_fit``): each
        :class:`StandardisedNet` in it, in order, takes its share of the channels."""
        statistics = ChannelStatistics()
        for batch in map(self.training_embeddings, batches):
            self.check_embeddings(batch, statistics.channels)
            self.check_batch(batch)
            statistics.add(batch)
        mean, std = statistics.mean_std(self.name)
        network = self.build(self.resolve_layout(mean.numel()), mean.device)
        parts = [module for module in network.modules() if isinstance(module, StandardisedNet)]
        sizes = [part.mean.numel() for part in parts]
        for part, part_mean, part_std in zip(parts, mean.split(sizes), std.split(sizes), strict=True):
            part.mean.copy_(part_mean.view(1, -1, 1, 1))
            part.std.copy_(part_std.view(1, -1, 1, 1))
        return network

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
        """Autocast at :attr:`compute_dtype`; none while exporting (the traced graph stays float32)."""
        dtype = self.compute_dtype
        if dtype is None or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    # ----------------------------------------------------------------- Detector API
    def fit(self, batches: Iterable[Tensor]) -> None:
        """Train every stage; with ``HRAD_CHECKPOINTS`` set, save the position as it goes and
        resume from a checkpoint of the same fit (:mod:`hrad.detectors.checkpoints`)."""
        self.network, self.layout = None, []  # a refit starts from scratch
        self.loss_history, self.stage_losses = [], {}
        checkpoint = TrainingCheckpoint.for_fit(type(self).__name__, self.config, batches)
        self.before_fit(batches)
        position = checkpoint.load() if checkpoint is not None else None
        if position is not None:
            self._resume(position, batches)
        first = position["stage"] if position is not None else 0
        for index, stage in enumerate(self.training_stages()):
            if index >= first:
                self._run_stage(stage, batches, index, checkpoint, position if index == first else None)
        if self.network is None:
            raise InputError(f"{self.name} fit received no embedding batches")
        self.after_fit()
        self.network.eval()

    def _build_for(self, batch: Tensor) -> None:
        """The network for the layout of a training batch (built lazily, at the first batch)."""
        clean = self.training_embeddings(batch)
        self.check_embeddings(clean)
        self.layout = self.resolve_layout(int(clean.shape[1]))
        self.configure(clean)
        self.build(self.layout, batch.device)

    def _resume(self, position: dict[str, Any], batches: Iterable[Tensor]) -> None:
        """Network, generators, histories and the detector's own state as a checkpoint left them."""
        if self.network is None:
            self._build_for(next(iter(self.training_batches(batches))))
        network = self.fitted_network()
        network.load_state_dict({key: value.to(self.device) for key, value in position["network"].items()})
        self.generator.set_state(position["generator"])
        torch.set_rng_state(position["torch_rng"])
        self.loss_history = list(position["loss_history"])
        self.stage_losses = {name: list(values) for name, values in position["stage_losses"].items()}
        self.load_training_state(position["training_state"])
        logger.info("%s: resuming from a training checkpoint at stage %d, epoch %d", self.name, position["stage"] + 1, position["epoch"] + 1)

    def _position(
        self, stage: int, epoch: int, optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler | None
    ) -> dict[str, Any]:
        """A checkpoint's content: where the next epoch starts and everything it depends on."""
        network = self.fitted_network()
        return {
            "stage": stage,
            "epoch": epoch,
            "network": {key: value.detach().cpu().clone() for key, value in network.state_dict().items()},
            "optimizers": [optimizer.state_dict() for optimizer in optimizers],
            "scaler": scaler.state_dict() if scaler is not None else None,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "loss_history": list(self.loss_history),
            "stage_losses": {name: list(values) for name, values in self.stage_losses.items()},
            "training_state": self.training_state(),
        }

    def _non_finite_loss(self, stage: Stage, epoch: int, embeddings: Tensor) -> NoReturn:
        """Raise for a NaN / inf training loss: :class:`InputError` when the embeddings it came
        from hold NaN or inf (the input's fault), else :class:`DivergedError` (the training
        diverged: the CLI exits 1, not 2)."""
        where = f"{self.name}: the training loss is not finite in epoch {epoch + 1} of {stage.name}"
        if not bool(torch.isfinite(embeddings).all()):
            raise InputError(f"{where}; the embeddings contain NaN or inf")
        overflow = (
            f", or float16 overflowed (precision {self.config.precision}; try bfloat16)"
            if self.compute_dtype == torch.float16
            else ""
        )
        raise DivergedError(
            f"{where}: the training diverged; lower its learning rate (hrad options detector {self.name}){overflow}"
        )

    def _run_stage(
        self,
        stage: Stage,
        batches: Iterable[Tensor],
        index: int = 0,
        checkpoint: TrainingCheckpoint | None = None,
        resume: dict[str, Any] | None = None,
    ) -> None:
        """The epochs of stage ``index``, from ``resume``'s epoch when a checkpoint is resumed."""
        optimizers: list[torch.optim.Optimizer] | None = None
        scaler: torch.amp.GradScaler | None = None
        history = self.stage_losses.setdefault(stage.name, [])
        for epoch in range(resume["epoch"] if resume is not None else 0, stage.epochs):
            total, count = 0.0, 0
            for batch in self.training_batches(batches):
                clean = self.training_embeddings(batch)
                self.check_embeddings(clean)
                if self.network is None:
                    self._build_for(batch)
                embeddings = batch.to(self.device).float()
                self.check_batch(embeddings)
                network = self.fitted_network()
                if optimizers is None:
                    optimizers = stage.optimizers()
                    for optimizer in optimizers:
                        for group in optimizer.param_groups:
                            group.setdefault("initial_lr", group["lr"])
                    # float16 gradients underflow: scale the loss (disabled = plain backward / step)
                    scaler = torch.amp.GradScaler(self.device.type, enabled=self.compute_dtype == torch.float16)
                    if resume is not None and resume["optimizers"]:  # mid-stage: the optimisers' moments too
                        for optimizer, saved in zip(optimizers, resume["optimizers"], strict=True):
                            optimizer.load_state_dict(saved)
                        if resume["scaler"] is not None:
                            scaler.load_state_dict(resume["scaler"])
                if count == 0:
                    stage.train(network)
                    factor = stage.lr_factor(epoch)
                    for optimizer in optimizers:
                        for group in optimizer.param_groups:
                            group["lr"] = group["initial_lr"] * factor
                with self.autocast():
                    loss = stage.step(embeddings)
                if not bool(torch.isfinite(loss)):
                    self._non_finite_loss(stage, epoch, embeddings)
                assert scaler is not None
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                for optimizer in optimizers:
                    groups = optimizer.param_groups
                    if scaler.is_enabled() and all(p.grad is None for g in groups for p in g["params"]):
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
            log_progress(
                logger, epoch + 1, stage.epochs, f"{self.name}: {stage.name} epochs",
                "%s %s: epoch %d/%d, mean loss %.5g", self.name, stage.name, epoch + 1, stage.epochs, mean,
            )  # fmt: skip
            stop = self.end_epoch(stage, epoch, mean)
            finished = stop or epoch + 1 == stage.epochs
            if checkpoint is not None and optimizers is not None and checkpoint.due(force=finished):
                position = (index + 1, 0) if finished else (index, epoch + 1)
                checkpoint.save(self._position(*position, optimizers=[] if finished else optimizers, scaler=scaler))
            if stop:
                break

    def evaluate(self, forward: Callable[[Tensor], ResultT], embeddings: Tensor) -> ResultT:
        """``forward`` of checked float embeddings in eval mode, without gradients, at the compute
        precision: what ``predict`` runs, also for analysis helpers."""
        network = self.fitted_network()
        if self.device != embeddings.device:
            # a network loaded from a state (artifacts, HiAD's pool) is built on the CPU: follow
            # the embeddings, as PatchCore's bank does (benchmarks/results/gpu_cuda.md)
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
