"""PHI-free case identifiers.

A ``case_id`` replaces every patient-derived name (DICOM PatientID/StudyInstanceUID, file names that may
hold a patient name) in datalists, manifests, quarantine reports and logs. It is a salted hash, so the
same input always gets the same id under one salt (re-runs, resolutions of one MedMNIST file), while
nobody without the salt can test a guessed patient ID against it.

Example:
    >>> case_id("1.2.840.1234/series7", salt="s3cret")  # doctest: +SKIP
    'c5d0e1f2a3b4c5d6e'
"""

from __future__ import annotations

import hashlib

__all__ = ["CASE_ID_HEX_CHARS", "case_id"]

#: Hex characters of the sha256 digest kept in a case id: 16 hex = 64 bits, so a collision among
#: one million cases has probability ~3e-8.
CASE_ID_HEX_CHARS = 16


def case_id(key: str, salt: str, *, prefix: str = "c") -> str:
    """Salted, PHI-free identifier of one case.

    ``prefix + sha256(salt + "\\x1f" + key)[:16]`` (hex). The unit-separator byte between salt and key
    keeps ``("ab", "c")`` and ``("a", "bc")`` apart.

    Args:
        key: any stable identity of the case (series UID, relative source path, ``"medmnist:name:train/17"``).
            It may contain PHI: only its hash leaves this function.
        salt: the secret of this ingest (non-empty; an empty salt would let anyone hash guessed IDs).
        prefix: leading letter(s), so that ids never start with a digit (safe as file names and YAML keys).

    Returns:
        e.g. ``"c3f9a0b1c2d3e4f56"``: ``prefix`` followed by 16 lowercase hex characters.

    Raises:
        ValueError: empty ``salt`` or ``key``.
    """
    if not salt:
        raise ValueError("case_id needs a non-empty salt")
    if not key:
        raise ValueError("case_id needs a non-empty key")
    digest = hashlib.sha256(f"{salt}\x1f{key}".encode()).hexdigest()
    return f"{prefix}{digest[:CASE_ID_HEX_CHARS]}"
