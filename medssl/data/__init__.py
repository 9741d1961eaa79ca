"""Data: ingest of NIfTI/DICOM/MedMNIST into PHI-free MONAI datalists, validation, splits."""

from __future__ import annotations
