"""MedMNIST 3D .npz → NIfTI: real AdrenalMNIST3D files (28³ and 64³) and broken archives."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.data.medmnist import convert_medmnist, read_medmnist
from medssl.errors import MedsslError

# SOURCE.txt of shared/datasets/medmnist3d: class counts (normal, hyperplasia) per official split
EXPECTED_COUNTS = {"training": {0: 929, 1: 259}, "validation": {0: 76, 1: 22}, "test": {0: 229, 1: 69}}


@pytest.fixture(scope="module", params=["adrenalmnist3d.npz", "adrenalmnist3d_64.npz"])
def converted(request, medmnist_dir: Path, tmp_path_factory) -> tuple[Path, list[dict], float]:
    npz = medmnist_dir / request.param
    out = tmp_path_factory.mktemp("medmnist") / npz.stem
    t0 = time.perf_counter()
    items = convert_medmnist(npz, out, salt="test-salt")
    return npz, items, time.perf_counter() - t0


def test_counts_classes_and_official_splits(converted):
    npz, items, seconds = converted
    assert len(items) == 1584
    counts = {s: dict(Counter(it["class"] for it in items if it["split"] == s)) for s in EXPECTED_COUNTS}
    assert counts == EXPECTED_COUNTS
    assert len({it["case_id"] for it in items}) == 1584
    assert len({it["image"] for it in items}) == 1584
    assert all(it["case_id"].startswith("c") and len(it["case_id"]) == 17 for it in items)
    first_val = next(it for it in items if it["split"] == "validation")
    assert first_val["source_index"] == "val/0"
    assert [it["source_index"] for it in items[:2]] == ["train/0", "train/1"]
    assert seconds < 60, f"conversion took {seconds:.1f} s"


def test_written_volumes_equal_npz_arrays(converted):
    npz, items, _ = converted
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    side = arrays["train_images"].shape[1]
    for it in items:
        split, idx = it["source_index"].split("/")
        img = nib.load(it["image"])
        assert img.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), arrays[f"{split}_images"][int(idx)])
        assert it["class"] == int(arrays[f"{split}_labels"][int(idx), 0])
    assert img.shape == (side, side, side)
    np.testing.assert_array_equal(img.affine, np.eye(4))
    assert img.header["sform_code"] == 1 and img.header.get_xyzt_units()[0] == "mm"


def test_case_ids_shared_across_resolutions_and_salted(medmnist_dir: Path, tmp_path: Path):
    data28 = read_medmnist(medmnist_dir / "adrenalmnist3d.npz")
    data64 = read_medmnist(medmnist_dir / "adrenalmnist3d_64.npz")
    for split in ("train", "val", "test"):  # same volumes, same order, same classes
        np.testing.assert_array_equal(data28[split][1], data64[split][1])
    small = tmp_path / "adrenalmnist3d_64.npz"  # a 64³-named file with 2 volumes per split is enough here
    arrays = {}
    for s in ("train", "val", "test"):
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = data64[s][0][:2], data64[s][1][:2, None]
    np.savez(small, **arrays)
    a = convert_medmnist(small, tmp_path / "a", salt="s1", spacing_mm=2.0)
    b = convert_medmnist(small, tmp_path / "b", salt="s1", name="adrenalmnist3d")
    c = convert_medmnist(small, tmp_path / "c", salt="s2")
    assert [x["case_id"] for x in a] == [x["case_id"] for x in b]
    assert not {x["case_id"] for x in a} & {x["case_id"] for x in c}
    np.testing.assert_array_equal(nib.load(a[0]["image"]).affine, np.diag([2.0, 2.0, 2.0, 1.0]))


def _write_npz(path: Path, n=(3, 2, 2), shape=(6, 6, 6), **override) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 2, (k, *shape), dtype=np.uint8) * 255
        arrays[f"{split}_labels"] = rng.integers(0, 2, (k, 1), dtype=np.uint8)
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_small_generated_file_converts(tmp_path: Path):
    items = convert_medmnist(_write_npz(tmp_path / "tiny.npz"), tmp_path / "out", salt="s")
    assert [it["split"] for it in items] == ["training"] * 3 + ["validation"] * 2 + ["test"] * 2
    float_labels = _write_npz(tmp_path / "fl.npz", train_labels=np.array([[0.0], [1.0], [2.0]]))
    assert [it["class"] for it in convert_medmnist(float_labels, tmp_path / "o2", salt="s")][:3] == [0, 1, 2]


def test_ingest_reads_the_archive_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import medssl.data.medmnist as mm
    from medssl.data.ingest_workers import ingest_medmnist

    calls = Counter()
    real_load = np.load

    def counting_load(*args, **kwargs):
        calls["np.load"] += 1
        return real_load(*args, **kwargs)

    monkeypatch.setattr(mm.np, "load", counting_load)
    res = ingest_medmnist(_write_npz(tmp_path / "tiny.npz"), out=tmp_path / "out", salt="s")
    assert calls["np.load"] == 1 and not res.quarantine
    assert len(res.items) == len(res.rows) == 7
    written = nib.load(tmp_path / "out" / res.items[3]["image"]).get_fdata()
    assert written.shape == (6, 6, 6) and [r["section"] for r in res.rows][3] == "validation"


@pytest.mark.parametrize("override,message", [
    ({"test_labels": None}, "'test_labels' missing"),
    ({"val_images": None}, "'val_images' missing"),
    ({"train_labels": np.zeros((4, 1), np.uint8)}, "'train_labels' has shape (4, 1)"),
    ({"train_labels": np.zeros((3, 5), np.uint8)}, "multi-label"),
    ({"train_labels": np.array([[0.5], [1], [0]])}, "non-integer"),
    ({"train_labels": np.array([[-1], [1], [0]])}, "negative"),
    ({"train_images": np.zeros((3, 6, 6), np.uint8)}, "'train_images' has shape (3, 6, 6)"),
    ({"val_images": np.zeros((2, 5, 5, 5), np.uint8)}, "volume shapes differ"),
    ({"test_images": np.zeros((2, 6, 6, 6, 3), np.uint8)}, "multi-channel"),
])
def test_bad_files_name_file_and_key(tmp_path: Path, override: dict, message: str):
    path = _write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(MedsslError) as ei:
        convert_medmnist(path, tmp_path / "out", salt="s")
    assert message in str(ei.value) and str(path) in str(ei.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_corrupt_and_truncated_archives(tmp_path: Path, medmnist_dir: Path):
    raw = (medmnist_dir / "adrenalmnist3d.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.npz").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes())
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0xFF  # inside a compressed member: zlib/CRC error on read
    (tmp_path / "flip.npz").write_bytes(bytes(flipped))
    for name in ("trunc.npz", "junk.npz", "flip.npz"):
        with pytest.raises(MedsslError) as ei:
            convert_medmnist(tmp_path / name, tmp_path / "out", salt="s")
        assert name in str(ei.value)
    with pytest.raises(MedsslError, match="not found"):
        convert_medmnist(tmp_path / "absent.npz", tmp_path / "out", salt="s")
    objects = tmp_path / "obj.npz"
    np.savez(objects, train_images=np.array([None, 1], dtype=object))
    with pytest.raises(MedsslError, match="obj.npz"):
        read_medmnist(objects)


def test_bad_arguments(tmp_path: Path):
    path = _write_npz(tmp_path / "ok.npz")
    with pytest.raises(ValueError, match="spacing"):
        convert_medmnist(path, tmp_path / "o", salt="s", spacing_mm=0)
    with pytest.raises(ValueError, match="salt"):
        convert_medmnist(path, tmp_path / "o", salt="")
