"""Foreground masks: which patches of an image belong to the inspected object.

MRF-AD removes the background before scoring (the paper uses the BEN2 segmentation network,
which is not available here). Background varies between normal images (shadows, dust, the
conveyor) and produces false positives that no memory bank can explain away, so zeroing it
helps on object categories; on textures (the whole image is the object) it must stay off.

:class:`ForegroundMasker` is the pluggable interface: anything that maps an image (and its
patch features) to a boolean mask can be set on a strategy. :class:`PCAForegroundMasker` is
the built-in one without extra weights, following AnomalyDINO: the first principal component
of the training patch features separates object from background; its sign is chosen so that
the image border (almost always background in object categories) lands on the negative side,
the threshold is 0 (the training mean), and the mask is slightly dilated and hole-filled so
defects that look like background (holes, missing parts) are not masked away.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from hrad.errors import ArtifactError


@runtime_checkable
class ForegroundMasker(Protocol):
    """Fitted on training patch features; returns ``True`` where an image shows the object."""

    def fit(self, features: Sequence[Tensor]) -> None:
        """Learn from ``C x h x w`` patch-feature maps of normal training images."""

    def mask(self, image: Tensor, features: Tensor) -> Tensor:
        """Bool foreground mask of one image (``3 x H x W`` in [0, 1]) with features ``C x h x w``.

        Any resolution is allowed (callers resize it); feature-based maskers return ``h x w``.
        """

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


def border_ring(height: int, width: int, width_cells: int = 1) -> np.ndarray:
    """Bool ``height x width`` array that is True on the outer ``width_cells`` rows and columns."""
    ring = np.zeros((height, width), dtype=bool)
    k = max(1, min(width_cells, (min(height, width) + 1) // 2))
    ring[:k], ring[-k:], ring[:, :k], ring[:, -k:] = True, True, True, True
    return ring


class PCAForegroundMasker:
    """First principal component of training patch features, thresholded at 0 (AnomalyDINO-style).

    ``dilation``: patches of binary dilation after thresholding (a soft margin around the
    object, whose boundary patches mix both). ``max_fit_vectors`` bounds the PCA's sample.
    """

    def __init__(self, dilation: int = 1, fill_holes: bool = True, max_fit_vectors: int = 200_000, seed: int = 0) -> None:
        self.dilation = dilation
        self.fill_holes = fill_holes
        self.max_fit_vectors = max_fit_vectors
        self.seed = seed
        self.mean: Tensor | None = None
        self.component: Tensor | None = None

    def fit(self, features: Sequence[Tensor]) -> None:
        if not features:
            raise ValueError("the foreground masker needs at least one training feature map")
        vectors = torch.cat([_vectors(f) for f in features])
        if len(vectors) > self.max_fit_vectors:
            generator = torch.Generator().manual_seed(self.seed)
            vectors = vectors[torch.randperm(len(vectors), generator=generator)[: self.max_fit_vectors]]
        mean = vectors.mean(0)
        centred = (vectors - mean).double()
        _, eigenvectors = torch.linalg.eigh(centred.T @ centred)
        component = eigenvectors[:, -1].float()  # largest eigenvalue is last
        border = torch.cat([_vectors(f)[torch.from_numpy(border_ring(*f.shape[-2:]).ravel())] for f in features])
        if float(((border - mean) @ component).mean()) > 0:
            component = -component  # the border is background: it must project below 0
        self.mean, self.component = mean, component

    def projection(self, features: Tensor) -> Tensor:
        """Signed first-component score ``h x w`` (positive = foreground)."""
        if self.mean is None or self.component is None:
            raise RuntimeError("PCAForegroundMasker.mask called before fit")
        height, width = features.shape[-2:]
        scores = (_vectors(features) - self.mean) @ self.component
        return scores.reshape(height, width)

    def mask(self, image: Tensor, features: Tensor) -> Tensor:
        foreground = (self.projection(features) > 0).cpu().numpy()
        if self.dilation > 0:
            foreground = ndimage.binary_dilation(foreground, structure=np.ones((3, 3), bool), iterations=self.dilation)
        if self.fill_holes:
            foreground = ndimage.binary_fill_holes(foreground)
        if not foreground.any():  # nothing looks like the object: masking everything would hide all defects
            foreground[:] = True
        return torch.from_numpy(np.ascontiguousarray(foreground))

    def state_dict(self) -> dict[str, Tensor]:
        if self.mean is None or self.component is None:
            return {}
        return {"mean": self.mean.cpu(), "component": self.component.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = {"mean", "component"} - set(state)
        if missing:
            raise ArtifactError(f"foreground masker state lacks {', '.join(sorted(missing))}")
        self.mean, self.component = state["mean"].float(), state["component"].float()


def _vectors(features: Tensor) -> Tensor:
    """``C x h x w`` (or ``1 x C x h x w``) -> ``h*w x C`` float32 on the CPU."""
    if features.ndim == 4:
        features = features[0]
    return features.detach().float().flatten(1).T.cpu()
