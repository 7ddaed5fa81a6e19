"""HaloAE Edge: HaloNet auto-encoder anomaly detection from training to the line camera.

Sub-packages (each a top-level folder of the repository): ``haloae.train`` (train/),
``haloae.export`` (export/), ``haloae.edge`` (edge/). See docs/architecture.md.
"""

__version__ = "0.1.0"
