"""benchmarks/gpu_peer.sh (medssl vs nnU-Net v2 at equal GPU minutes) and benchmarks/gpu_wheels.txt (the wheels the
GPU machine lacks): the list's shape, the completeness of the downloaded wheels (every requirement is a wheel of the
list or on the GPU image; skipped without ``make gpu-wheels``), the carry size, the data staging and the report, and
the script's CPU dry run end to end (``slow``; needs ``.venv-nnunet``: ``make peer-venv``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from medssl.data.splits import split_datalist
from medssl.engines.finetune.planner import volume_header

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import _gpu_peer as peer  # noqa: E402

SCRIPT = REPO / "benchmarks" / "gpu_peer.sh"
WHEELS = REPO / "benchmarks" / "gpu_wheels.txt"
WHL_DIR = REPO / ".gpu" / "whl"
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash is not installed")
#: the GPU machine's interpreter, for Requires-Dist markers: Python 3.12.3 (CPython) on Linux x86_64
GPU_PYTHON = default_environment() | {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "implementation_version": "3.12.3", "platform_python_implementation": "CPython", "sys_platform": "linux",
    "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
#: what each group may rely on besides the image (``unused``: declared by nnunetv2, never imported, not carried)
NEEDS = {"core": {"core"}, "medssl": {"core", "medssl"}, "mlflow": {"core", "mlflow"},
         "nnunet": {"core", "nnunet", "unused"}, "unused": {"unused"}}
MIB = 2**20


def wheel_list() -> dict[str, dict[str, str]]:
    """benchmarks/gpu_wheels.txt: ``{group: {canonical name: version}}``."""
    groups: dict[str, dict[str, str]] = {}
    group = None
    for raw in WHEELS.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if m := re.fullmatch(r"\[([a-z]+)\]", line):
            group = m.group(1)
            groups[group] = {}
            continue
        name, version = line.split("==")
        assert group is not None, f"{raw!r} before the first [group]"
        groups[group][canonicalize_name(name)] = version
    return groups


def image_packages() -> set[str]:
    """The GPU image's distributions: benchmarks/gpu_image_packages.txt up to its carried-wheels section."""
    text = (REPO / "benchmarks" / "gpu_image_packages.txt").read_text()
    assert "# carried as wheels" in text, "gpu_image_packages.txt changed shape: update image_packages()"
    head = text.split("# carried as wheels")[0]
    return {canonicalize_name(ln.split()[0]) for ln in (x.split("#")[0] for x in head.splitlines()) if ln.strip()}


def requirements(wheel: Path) -> list[Requirement]:
    """The wheel's ``Requires-Dist`` for CPython 3.12 on Linux x86_64, extras left out."""
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    reqs = [Requirement(ln.split(":", 1)[1].strip()) for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(GPU_PYTHON)]


def test_wheel_list_shape() -> None:
    groups = wheel_list()
    assert set(groups) == set(NEEDS)
    names = [n for g in groups.values() for n in g]
    assert len(names) == len(set(names)), "a wheel in two groups: one version of each"
    assert not {"torch", "torchvision", "numpy", "scipy"} & set(names)
    assert not set(names) & image_packages(), "on the image already: carry one only for another version"
    assert groups["core"]["monai"] == "1.6.1" and groups["mlflow"]["mlflow-skinny"] == "3.17.2"
    assert groups["nnunet"]["nnunetv2"] == "2.8.1"


@pytest.mark.skipif(not WHL_DIR.is_dir(), reason=".gpu/whl missing: run `make gpu-wheels`")
def test_downloaded_wheels_are_complete() -> None:
    """Each listed wheel is there once, for cp312 manylinux x86_64, and every requirement of every wheel is a wheel
    of a group it may rely on (or on the image, or the standard library), in a version the requirement allows."""
    groups, image = wheel_list(), image_packages()
    files: dict[str, tuple[str, str, Path]] = {}  # name → (group, version, file)
    for group, specs in groups.items():
        folder = WHL_DIR / group
        if not folder.is_dir():
            pytest.skip(f"{folder} missing: run `make gpu-wheels`")
        found = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in folder.glob("*.whl")}
        assert set(found) == set(specs), f"{group}: missing {set(specs) - set(found)}, extra {set(found) - set(specs)}"
        for name, w in found.items():
            _, version, _, tags = parse_wheel_filename(w.name)
            assert str(version) == specs[name], w.name
            ok = {(t.interpreter, t.abi, t.platform) for t in tags}
            assert any(i in ("py3", "cp312") or (a == "abi3" and i in {f"cp3{k}" for k in range(2, 13)})
                       for i, a, _ in ok), f"{w.name}: not for CPython 3.12"
            assert all(p == "any" or (p.startswith("manylinux") and p.endswith("x86_64")) for _, _, p in ok), w.name
            files[name] = (group, str(version), w)
    missing = []
    for name, (group, _, w) in files.items():
        for r in requirements(w):
            dep = canonicalize_name(r.name)
            if dep in files:
                assert files[dep][0] in NEEDS[group], f"{name} ({group}) needs {dep} of group {files[dep][0]}"
                assert r.specifier.contains(files[dep][1], prereleases=True), f"{name} needs {r}, {files[dep][1]} listed"
            elif dep not in image and dep not in sys.stdlib_module_names:  # unittest2 → argparse: the stdlib's
                missing.append(f"{name} → {r}")
    assert not missing, f"requirements neither listed nor on the GPU image: {missing}"


def _tracked_mib() -> float:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return sum((REPO / p).stat().st_size for p in out.decode().split("\0") if p and (REPO / p).is_file()) / MIB


@pytest.mark.skipif(not (REPO / ".gpu" / "peer").is_dir() or not (WHL_DIR / "nnunet").is_dir(),
                    reason=".gpu/peer or .gpu/whl/nnunet missing (gpu_peer.sh --stage .gpu/peer, make gpu-wheels)")
def test_peer_carry_fits_a_device_call() -> None:
    """The working tree + .gpu/whl/core + .gpu/whl/nnunet + .gpu/peer stay under a device call's 64 MiB."""
    carried = [WHL_DIR / "core", WHL_DIR / "nnunet", REPO / ".gpu" / "peer"]
    size = _tracked_mib() + sum(f.stat().st_size for d in carried for f in d.rglob("*") if f.is_file()) / MIB
    assert size < 62, f"{size:.1f} MiB would travel (limit 64)"


@pytest.fixture(scope="module")
def tiny_study(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 hippocampus cases in ``datasets/msd_task04_hippocampus`` and a study on them (test 2, validation 2,
    10 % = 1 training case, 100 % = 8) whose datalist paths are relative, as an ingested study's are."""
    root = tmp_path_factory.mktemp("gpu_peer")
    ds = root / "datasets" / "msd_task04_hippocampus"
    for sub in ("imagesTr", "labelsTr"):
        (ds / sub).mkdir(parents=True)
    imgs = [p for p in sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))
            if (hippocampus_dir / "labelsTr" / p.name).exists()][:12]
    for p in imgs:
        shutil.copyfile(p, ds / "imagesTr" / p.name)
        shutil.copyfile(hippocampus_dir / "labelsTr" / p.name, ds / "labelsTr" / p.name)
    labels = {"0": "background", "1": "Anterior", "2": "Posterior"}
    (ds / "dataset.json").write_text(json.dumps({"labels": labels, "numTraining": len(imgs), "training": [
        {"image": f"./imagesTr/{p.name}", "label": f"./labelsTr/{p.name}"} for p in imgs]}))
    study = root / "study" / "data"
    study.mkdir(parents=True)
    items = [{"image": f"../../datasets/msd_task04_hippocampus/imagesTr/{p.name}", "case_id": f"c{i:02d}",
              "label": f"../../datasets/msd_task04_hippocampus/labelsTr/{p.name}"} for i, p in enumerate(imgs)]
    (study / "datalist.json").write_text(json.dumps({"labels": labels, "training": items}))
    (study / "manifest.csv").write_text("case_id,modality\n" + "".join(f"c{i:02d},MRI\n" for i in range(len(imgs))))
    split_datalist(study / "datalist.json", fractions=[10, 100], seeds=[0], test_fraction=0.2, val_fraction=0.2)
    return study


def test_stage_and_relocate(tiny_study: Path, tmp_path: Path) -> None:
    """Staging copies only the run's cases and the study's files; relocating points every datalist path into the
    dataset folder given, and the run's cases resolve there."""
    info = peer.stage_run_data(tiny_study, 10, 0, tmp_path / "peer")
    cases = peer.run_cases(tiny_study, 10, 0)
    n = sum(len(v) for v in cases.values())
    assert info["cases"] == {"training": 1, "validation": 2, "test": 2} and info["files"] == 2 * n
    ds = tmp_path / "peer" / "msd_task04_hippocampus"
    assert len(list((ds / "labelsTr").iterdir())) == n
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == n
    assert {p.name for p in (tmp_path / "peer" / "study").iterdir()} == {
        "datalist.json", "splits.json", "manifest.csv", "staged.json"}
    # the planner's other cases: header-only stubs (same shape and spacing, no voxels), so the plan is the study's
    planned = {Path(it["image"]).name for it in peer.planning_items(tiny_study / "datalist.json",
                                                                     tiny_study / "splits.json")}
    run_images = {Path(it["image"]).name for its in cases.values() for it in its}
    stubs = planned - run_images
    assert info["header_stubs"] == len(stubs) > 0
    for name in stubs:
        stub, orig = ds / "imagesTr" / name, tiny_study.parents[1] / "datasets" / "msd_task04_hippocampus" / "imagesTr" / name
        assert stub.stat().st_size < 200 and volume_header(stub) == volume_header(orig)
        with pytest.raises(OSError, match="Expected"):
            nib.load(str(stub)).get_fdata()
    moved = peer.relocate_datalist(tmp_path / "peer" / "study", tmp_path / "moved", ds)
    items = json.loads((moved / "datalist.json").read_text())["training"]
    assert all(it["image"] == str(ds.resolve() / "imagesTr" / Path(it["image"]).name) for it in items)
    again = peer.run_cases(moved, 10, 0)
    for role, its in again.items():
        assert [it["case_id"] for it in its] == [it["case_id"] for it in cases[role]]
        assert all(Path(it["image"]).is_file() and Path(it["label"]).is_file() for it in its)
    assert (moved / "splits.json").read_bytes() == (tiny_study / "splits.json").read_bytes()
    with pytest.raises(peer.MedsslError, match="datalist.json"):
        peer.relocate_datalist(tmp_path, tmp_path / "x", ds)


def test_medssl_steps_for_minutes() -> None:
    assert peer.medssl_steps_for_minutes(3, 0.07, 3.0, 200) == 2117 == int(180 / (0.07 + 3.0 / 200))
    assert peer.medssl_steps_for_minutes(0.01, 10.0, 0.0, 200) == 1
    with pytest.raises(peer.MedsslError, match="must be > 0"):
        peer.medssl_steps_for_minutes(3, 0.0, 1.0, 200)


def _metrics(d: float) -> dict[str, float]:
    return {"dice_mean": d, "dice_1": d - 0.01, "dice_2": d + 0.01, "hd95_mean": 1.5, "missed_1": 0.0, "missed_2": 1.0}


def test_report_lists_both_arms_and_a_missing_one(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "medssl").mkdir(parents=True)
    (work / "env.json").write_text(json.dumps({"gpu": "NVIDIA H200", "torch": "2.11.0", "nproc": 16}))
    (work / "steps.tsv").write_text("medssl\t0\t200.5\t330\nnnunet\t124\t480.0\t480\n")
    (work / "medssl_config.json").write_text(json.dumps({"steps": 2117, "timing": {"s_per_step": 0.07}}))
    (work / "medssl_train_s.txt").write_text("200.5\n")
    (work / "medssl" / "results.json").write_text(json.dumps({"test_metrics": _metrics(0.85), "status": "finished"}))
    (work / "medssl" / "config.yaml").write_text("batch_size: 4\n")
    rep = peer.gpu_peer_report(work, tmp_path / "out", minutes=3)
    md = (tmp_path / "out" / "gpu_peer.md").read_text()
    assert [a["arm"] for a in rep["arms"]] == ["medssl planner UNet (scratch)"] and not rep["dry_run"]
    assert "| medssl planner UNet (scratch) | 3 min | 2117 × 4 | 3.3 | 0.8500 | 0.840 / 0.860 | 1.50 | 0 / 1 |" in md
    assert "| nnU-Net | 3 min | – | – | (arm did not finish: see steps) |" in md and "| nnunet | 124 (timed out) |" in md
    run = work / "peer" / "f10_s0_bs2_3min_cuda"
    run.mkdir(parents=True)
    run.joinpath("result.json").write_text(json.dumps({
        "batch_spec": "planner", "iterations": 2500, "batch": 2, "seconds_train": 195.0, "metrics": _metrics(0.84),
        "probe": {"chosen_s_per_it": 0.07}, "n_proc_da": 8, "versions": {"nnunetv2": "2.8.1"}}))
    rep = peer.gpu_peer_report(work, tmp_path / "out", minutes=3, dry_run=True)
    md = (tmp_path / "out" / "gpu_peer.md").read_text()
    assert len(rep["arms"]) == 2 and "DRY RUN" in md.splitlines()[0] and "nnunetv2 2.8.1" in md
    assert "| nnU-Net v2 3d_fullres (planner) | 3 min | 2500 × 2 | 3.2 | 0.8400 |" in md and "did not finish" not in md


@needs_bash
def test_usage_errors(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    assert subprocess.run([BASH, str(SCRIPT), "--help"], capture_output=True, env=env).returncode == 0
    bad = subprocess.run([BASH, str(SCRIPT), "--fast"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown option --fast" in bad.stderr
    none = subprocess.run([BASH, str(SCRIPT)], capture_output=True, text=True, env=env)
    assert none.returncode == 2 and "output folder" in none.stderr
    value = subprocess.run([BASH, str(SCRIPT), "--minutes"], capture_output=True, text=True, env=env)
    assert value.returncode == 2 and "--minutes needs a value" in value.stderr


@needs_bash
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_dry_run_end_to_end(tiny_study: Path, tmp_path: Path) -> None:
    """Stage the run's data as for the device call, then the whole comparison on the CPU with tiny budgets (about
    6 minutes on 2 idle cores): both arms finish, the report holds both, every step exits 0."""
    nnunet = REPO / ".venv-nnunet"
    if not (nnunet / "bin" / "nnUNetv2_train").exists():
        pytest.skip(f"{nnunet} missing: create nnU-Net's venv with `make peer-venv`")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_PEER_WORK", "GPU_SUITE_ALLOWED")}
    env |= {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MEDSSL_NNUNET_THREADS": "1"}
    staged = tmp_path / "peer"
    st = subprocess.run([BASH, str(SCRIPT), "--stage", str(staged), "--study-data", str(tiny_study)], env=env,
                        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert st.returncode == 0, st.stderr[-3000:]
    out = tmp_path / "out"
    proc = subprocess.run([BASH, str(SCRIPT), "--dry-run", "--study-data", str(staged / "study"), str(out)],
                          env=env | {"MEDSSL_DATASETS": str(staged)}, capture_output=True, text=True, timeout=2300,
                          cwd=REPO)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-6000:]
    rep = json.loads((out / "gpu_peer.json").read_text())
    assert rep["dry_run"] and rep["minutes"] == 0.05 and rep["machine"]["gpu"] is None
    assert {s["step"]: s["rc"] for s in rep["steps"]} == {
        "relocate": 0, "medssl_time": 0, "medssl_config": 0, "medssl": 0, "nnunet": 0}
    medssl, nnunet = rep["arms"]
    assert medssl["arm"].startswith("medssl") and medssl["steps"] == 2 and medssl["batch"] == 1
    assert nnunet["arm"] == "nnU-Net v2 3d_fullres (planner)" and nnunet["n_proc_da"] == 0 and nnunet["steps"] >= 1
    for arm in rep["arms"]:
        assert 0.0 <= arm["metrics"]["dice_mean"] <= 1.0 and arm["seconds_wall"] > 0
    md = (out / "gpu_peer.md").read_text()
    assert "DRY RUN" in md.splitlines()[0] and md.count("| medssl planner UNet") == 1 and "| nnU-Net v2" in md
    assert (out / "logs.tgz").is_file() and "[gpu_peer] total wall" in proc.stdout
