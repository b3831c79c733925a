"""RD++: reverse distillation with multi-scale projection and self-supervised OT (Tien et al. 2023).

RD (Deng & Li 2022): a frozen teacher, a trainable one-class bottleneck embedding (OCBE) and a
student decoder that reconstructs the teacher's multi-level features; anomalies reconstruct
badly. RD++ adds a multi-scale projection layer (MPL) before the bottleneck, trained with three
losses that make the projected normal features compact and noise-free. Modules: ``network``,
``loss`` (feature noise, Sinkhorn / SSOT) and ``detector`` (config, training step, map).

The teacher is the embedding, split into levels (``level_channels``), all at the first layer's
grid ``h x w``; level ``i`` is average-pooled to the pyramid size ``s_i = ceil(h / 2^i) x
ceil(w / 2^i)``. Network: per level the reference ``ProjLayer`` (MPL) at ``s_i``; RD's OCBE
(levels strided down to the coarsest size, concatenated, fused by ResNet bottleneck blocks, the
first with stride 2); a decoder, coarse to fine, of residual blocks as wide as each level and a
linear 1x1 head per level, its reconstructions resized to ``h x w``.

Loss (reference weights): ``L_distill + 0.2 * (L_ssot + 0.01 * L_recon + 0.1 * L_contrast) / 1.11``;
the reference's two Adam optimisers (OCBE + decoder lr 0.005, projection lr 0.001, betas (0.5,
0.999)) step on the total. Map: per level ``1 - cos`` at every position, summed over levels (the
reference's ``amap_mode='a'``), at embedding resolution; image score = max.

Deviations:

- Pyramid: RD reads WRN50 layer1..3 at native strides; here pooling rebuilds the pyramid. For
  CNN layers one stride apart (the default layer2 + layer3) this roughly undoes the embedder's
  upsampling; on ViTs deeper blocks are projected and reconstructed at a coarser grid than theirs.
- Decoder upsampling is bilinear resizing to the exact pyramid size (RD: stride-2 transposed
  convs), so odd sizes round-trip; heads are linear (RD's final ReLU would cut ViT tokens'
  negative values); widths and depths are configurable (RD: a 2048-wide bottleneck).
- ``distill_loss="both"``: ``(1 - mean per-position cos) + (1 - cos of the flattened maps)``; the
  RD paper uses the first term, the RD and RD++ code the second (``"flattened"``).
- Noise (RD++: 6-octave simplex noise, amplitude 0.2, in one random 10..31 px box of the 256 px
  image): a Gaussian white field blurred over ``noise_sigma`` tokens, unit variance, times
  ``noise_amplitude`` times each channel's batch std, in one random box per sample with sides
  ``noise_extent`` (default 10/256..32/256) of the grid.
- ``L_recon`` and ``L_contrast`` as the reference code: the mean ``1 - cos(P(noisy), P(clean))``,
  and ``max(0, cos + 0.5)`` between the flattened noisy teacher features and clean projection (a
  cosine embedding loss, margin -0.5, target -1 per the author's fix in reference issue #1).
- ``L_ssot``: the reference passes ``B x D`` matrices to geomloss, which reads them as one cloud
  of ``B`` points; its shuffled copy is the same measure, so the divergence is zero up to solver
  error. Implemented is the paper's intent, OT between normal samples: each sample, the uniform
  cloud of its tokens (softmax over channels; at most ``ssot_points``), is paired with another (a
  random cyclic shift of the batch, never itself) by the debiased Sinkhorn divergence at
  geomloss's settings (cost ``|x - y|^2 / 2``, blur 0.05, scaling 0.95), annealed from the data's
  diameter (reference: 1e7, hundreds of idle iterations; solver in :mod:`~hrad.detectors.rdpp.loss`).
  Softmax tokens of a ``c``-channel level lie about ``1/c`` apart, far below the blur, so for wide
  levels the term is a weak regulariser (about 2e-6 between random 1024-channel clouds, 3e-3 at 64).
- Every batch takes an optimiser step (the reference's "gradient accumulation" zeroes the
  gradients every batch and steps every second one, so it drops half of the batches).
- Each loss weight may be 0; the 1.11 normaliser stays, so the other terms keep their weights.
- 20 epochs (the reference trains 10 to 300 per MVTec class and keeps the epoch with the best
  test metrics, which a detector cannot do).
"""
from hrad.detectors.rdpp.detector import RDPlusPlus, RDPlusPlusConfig

__all__ = ["RDPlusPlus", "RDPlusPlusConfig"]
