"""medssl: self-supervised learning for 3D medical images (CT/MRI) on MONAI.

Stages (each a library function, a CLI command and a bundle component):
ingest -> split -> pretrain -> finetune/sweep -> compare -> export/predict/serve.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
