"""benchmarks/_gpu_repack.py (``make gpu-wheels``): LZMA recompression keeps every file of a wheel byte for byte,
shrinks a compressible one, leaves small and already-recompressed wheels alone, and pip still reads the result."""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_gpu_repack", REPO / "benchmarks" / "_gpu_repack.py")
gpu_repack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_repack)


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def test_repack_keeps_files_and_shrinks_then_is_a_no_op(tmp_path: Path) -> None:
    rng_bytes = os.urandom(1_200_000)  # incompressible part + a repetitive part: LZMA beats deflate on the latter
    text = b"".join(b"def f%d(x):\n    return x * %d + 1\n" % (i, i % 7) for i in range(60_000))
    files = {"pkg/__init__.py": text, "pkg/blob.bin": rng_bytes,
             "pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n"}
    wheel = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl", files)
    before = wheel.stat().st_size
    assert before > 2**20
    sizes = gpu_repack.repack(wheel)
    assert sizes is not None and sizes[0] == before and sizes[1] == wheel.stat().st_size < before
    with zipfile.ZipFile(wheel) as z:
        assert z.testzip() is None
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_LZMA}
        assert {n: z.read(n) for n in z.namelist()} == files
    assert gpu_repack.repack(wheel) is None  # already LZMA
    assert not (tmp_path / "pkg-1.0-py3-none-any.whl.tmp").exists()


def test_small_wheel_is_left_alone(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "small-1.0-py3-none-any.whl", {"small/__init__.py": b"x = 1\n" * 100})
    data = wheel.read_bytes()
    assert gpu_repack.repack(wheel) is None
    assert wheel.read_bytes() == data


def test_cli_prints_what_it_recompressed(tmp_path: Path, capsys) -> None:
    big = _wheel(tmp_path / "big-1.0-py3-none-any.whl", {"big/data.txt": b"0123456789abcdef" * 100_000 + os.urandom(2**20)})
    small = _wheel(tmp_path / "small-1.0-py3-none-any.whl", {"small/__init__.py": b""})
    gpu_repack.main([str(big), str(small)])
    out = capsys.readouterr().out
    assert "big-1.0-py3-none-any.whl" in out and "(LZMA)" in out and "small-1.0" not in out
