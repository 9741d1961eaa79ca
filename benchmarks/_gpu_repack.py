"""Recompress wheels with LZMA so that ``make gpu-wheels``' carry to the lent GPU machine fits 64 MiB.

A wheel is a zip; pip installs an LZMA-compressed one exactly as the published one (same files, same RECORD
hashes: only the zip entries' compression changes). Wheels of at most ``--min-bytes`` (default 1 MiB) and wheels
already LZMA-compressed are left alone, so running it twice is a no-op.

    python benchmarks/_gpu_repack.py .gpu/whl/*/*.whl
"""

from __future__ import annotations

import argparse
import os
import zipfile
from pathlib import Path


def repack(path: str | Path, *, min_bytes: int = 2**20) -> tuple[int, int] | None:
    """Rewrite ``path`` with every entry LZMA-compressed (via ``path.tmp``, then an atomic replace).

    Returns:
        ``(bytes before, bytes after)``, or ``None`` when the wheel was left as is (small or already LZMA).
    """
    path = Path(path)
    before = path.stat().st_size
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        if before <= min_bytes or not infos or infos[0].compress_type == zipfile.ZIP_LZMA:
            return None
        with zipfile.ZipFile(tmp, "w") as out:
            for info in infos:
                out.writestr(info, z.read(info.filename), compress_type=zipfile.ZIP_LZMA)
    os.replace(tmp, path)
    return before, path.stat().st_size


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheels", nargs="*", type=Path)
    ap.add_argument("--min-bytes", type=int, default=2**20, help="leave wheels of at most this size as they are")
    args = ap.parse_args(argv)
    for wheel in args.wheels:
        sizes = repack(wheel, min_bytes=args.min_bytes)
        if sizes is not None:
            print(f"gpu-wheels: {wheel.name}: {sizes[0] / 2**20:.1f} -> {sizes[1] / 2**20:.1f} MiB (LZMA)")


if __name__ == "__main__":
    main()
