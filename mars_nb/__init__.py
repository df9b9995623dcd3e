"""Where should MARS (multi-view consistency regularization) hook into Mask2Former for rotation robustness, and does it help?

Modules:

- `mars_nb.ablate`: A YAML grid of configurations × datasets × seeds, each run executed through papermill into its own folder; finished runs are skipped, interrupted ones resume, a failing run is recorded and the rest go on.
- `mars_nb.d2`: The official (detectron2) Mask2Former trained with MARS: config keys, a meta-architecture that puts two views in one batch, a trainer that follows Mask2Former's own conventions, the crater and nuclei datasets in detectron2's catalogs, and a CPU fallback for the deformable-attention op.
- `mars_nb.evaluate`: Test tiles from the held-out region at every angle, predictions, and how much of the upright accuracy survives rotation.
- `mars_nb.losses`: How far apart are two views once they are aligned? Feature, attention and output distances, the MARs paper's pooled formulation, and `MarsLoss`, which weighs them per stage: L = Σ_s w_s · mean over the stage's taps t of d_s(align(v1[t]), align(v2[t])).
- `mars_nb.model`: A Hugging Face `Mask2FormerForUniversalSegmentation`, built from a config (nothing is downloaded), in three sizes: `tiny` for CPU experiments, `r50` for the paper's architecture, and `pretrained` for users who have a checkpoint.
- `mars_nb.predict`: Apply a finished run to images it has never seen — at any angle — and write the masks as PNG (and, if asked, the class probabilities).
- `mars_nb.taps`: Forward hooks that pick backbone maps, pixel-decoder maps and masked cross-attention weights out of one forward pass — for the Hugging Face Mask2Former and the official detectron2 one — under one naming, with their strides and grids.
- `mars_nb.train`: Configs that round-trip to YAML, a resumable stream of view pairs, and one Lightning module for the three training modes: `none`, `rotaug` and `mars`.
- `mars_nb.views`: Rotate images, labels and feature maps about the image centre; know which pixels are real; bring the rotated view's internal tensors back into the upright frame."""

__version__ = "0.1.0"
