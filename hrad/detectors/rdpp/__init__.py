"""RD++: reverse distillation with multi-scale projection and self-supervised OT (Tien et al. 2023).

A subpackage: ``network`` (pyramid, projection layers, one-class bottleneck, student decoder),
``loss`` (feature noise and the Sinkhorn / SSOT solver), ``detector`` (config, training step,
map). What the method is and every deviation from the paper and reference code:

Built on RD (Deng & Li 2022): a frozen teacher encoder, a trainable one-class bottleneck
embedding (OCBE) and a student decoder that reconstructs the teacher's multi-level features
from the bottleneck; anomalies are where the reconstruction disagrees with the teacher. RD++
inserts a multi-scale projection layer (MPL) between teacher and bottleneck and trains it with
three extra losses that make the projected normal features compact and noise-free.

Here the teacher is the embedding: its channels split into levels (``level_channels``, one per
backbone layer, filled in by :meth:`RDPlusPlus.bind_layout`; empty at fit = one level), every
level already resized to the first layer's grid ``h x w``. The detector builds a pyramid
``s_0 = h x w``, ``s_{i+1} = ceil(s_i / 2)`` and average-pools level ``i`` to ``s_i``. Network:

1. MPL: per level the reference ``ProjLayer`` (four 3x3 convs ``c -> c/2 -> c/4 -> c/2 -> c``,
   each followed by InstanceNorm and LeakyReLU) on the level at ``s_i``;
2. OCBE: level ``i`` goes down to the coarsest size ``s_{L-1}`` through ``L-1-i`` stride-2 3x3
   convs (RD's multi-scale feature fusion), the levels are concatenated and fused by ResNet
   bottleneck blocks (RD's one-class embedding: 3 blocks, the first with stride 2) into a
   ``bottleneck_channels``-wide embedding;
3. student decoder: coarse to fine, per level an upsampling step to ``s_i`` and residual blocks
   whose width is the level's channel count, then a linear 1x1 head reconstructs the level at
   ``s_i``, bilinearly resized to ``h x w`` to meet the teacher.

Losses (weights as in the reference code): ``L = L_distill + 0.2 * (L_ssot + 0.01 * L_recon +
0.1 * L_contrast) / 1.11``; the reference's two Adam optimisers (OCBE + decoder lr 0.005,
projection lr 0.001, both betas (0.5, 0.999)) step on the same total loss.

Map: per level ``1 - cos`` between teacher and reconstruction at every position, summed over
levels (the reference's ``amap_mode='a'``), at embedding resolution; image score = max. The
reference's Gaussian blur (sigma 4) and upsampling are post-processing's job here.

What moved from image space to feature space, and other deviations:

- Pyramid: RD reads WRN50 layer1..3 at their native strides; here every level arrives upsampled
  to the first layer's grid, so the detector rebuilds the pyramid (one halving per level) by
  average pooling. For CNN layers one stride apart (the default layer2 + layer3) this roughly
  undoes the embedder's bilinear upsampling, and the reconstruction is resized back the way
  the embedder resized the teacher. On ViTs every block has the same native grid, so deeper
  blocks are projected and reconstructed at a coarser grid than they have.
- Decoder upsampling is bilinear resizing to the exact pyramid size (not RD's stride-2
  transposed convs), so odd grid sizes round-trip; reconstruction heads are linear (RD ends on a
  ReLU, which would cut the negative values of ViT tokens). Decoder blocks per stage
  (``decoder_blocks=2``, RD: 3/4/6) and residual-block widths (``block_reduction``) are
  configurable; the bottleneck width defaults to the widest level (RD: 2048).
- Distillation loss per level: ``(1 - mean per-position cosine) + (1 - mean cosine of the
  flattened maps)`` (``distill_loss="both"``). The RD paper uses the first term, the RD and RD++
  code only the second (``"flattened"``).
- Noise (RD++ adds 6-octave simplex noise, amplitude 0.2, to one random 10..31 px box of the
  256 px image): here a Gaussian white field blurred over space (``noise_sigma`` tokens,
  independent per channel, normalised to unit variance) times ``noise_amplitude`` times each
  channel's std over the batch, added to one random box per sample whose sides are
  ``noise_extent`` (default 10/256..32/256) of the grid. Drawn from a generator seeded by
  ``seed``.
- ``L_recon`` (``noise_reconstruction_weight``) and ``L_contrast`` (``noise_contrast_weight``)
  follow the reference code: mean per-position ``1 - cos(P(noisy), P(clean))`` and a cosine
  embedding loss with target -1 and margin -0.5 between the flattened noisy teacher features and
  the flattened clean projection, i.e. ``max(0, cos + 0.5)`` (target -1 per the author's fix in
  the reference repository, issue #1).
- ``L_ssot`` (``ssot_weight``): the reference code passes ``B x D`` matrices (softmax over each
  sample's flattened projection) to geomloss, which reads them as one cloud of ``B`` points;
  its shuffled copy is the same empirical measure, so the debiased Sinkhorn divergence is zero
  up to solver error and the term has no effect. Implemented is the paper's intent, pairwise OT
  between normal samples: each sample is paired with another (a random cyclic shift of the
  batch, so no sample is paired with itself as ``randperm`` may do), each sample is the
  uniform cloud of its tokens (softmax over channels, as the reference softmaxes; at most
  ``ssot_points`` random tokens per sample to bound the ``n x n`` cost), and the loss is the
  debiased Sinkhorn divergence of geomloss's settings (cost ``|x - y|^2 / 2``, blur 0.05,
  epsilon-scaling 0.95) averaged over pairs and summed over levels. The annealing starts at the
  data's largest distance (the reference fixes diameter 1e7, i.e. hundreds of extra
  iterations at temperatures where nothing is transported yet) and ends with
  ``ssot_iterations`` iterations at the target blur; the two-sided problem uses alternating
  Sinkhorn updates (geomloss averages them, which converges several times slower), the
  symmetric debiasing problems geomloss's averaged update. Gradients use the envelope theorem
  (the semi-dual at the converged potentials, checked against finite differences) instead of
  backpropagating through the iterations, as geomloss does. Scale: softmax tokens of a
  ``c``-channel level lie about ``1/c`` apart, far below the blur 0.05, so the divergence is
  small for wide levels (about 2e-6 between unrelated random 1024-channel token clouds, 3e-3
  at 64 channels): with the reference's normalisation the term stays a weak regulariser.
- Every batch takes an optimiser step: the reference's "gradient accumulation" zeroes the
  gradients every batch and steps every second one, so it drops half of the batches.
- Each of ``ssot_weight``, ``noise_reconstruction_weight``, ``noise_contrast_weight`` and
  ``projection_weight`` may be 0 to switch its term off; the 1.11 normaliser stays fixed so the
  other terms keep their weights.
- ``epochs=20`` (the reference trains 10 to 300 epochs per MVTec class and keeps the epoch with
  the best test metrics, which a detector cannot do).
"""
from hrad.detectors.rdpp.detector import RDPlusPlus, RDPlusPlusConfig

__all__ = ["RDPlusPlus", "RDPlusPlusConfig"]
