"""benchmarks/peer_nnunet.py (nnU-Net v2 peer, issue 12 item 2): the raw dataset holds exactly medssl's cases of
(fraction, seed), dataset.json, the plans batch edit, the budget arithmetic, the probe's choice and the evaluation
of prediction files with medssl's metric code. Needs no nnunetv2; the end-to-end test (``slow``) needs
``.venv-nnunet`` (``make peer-venv``)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.data.splits import split_datalist
from medssl.engines.finetune.metrics import image_diagonal_mm
from medssl.errors import MedsslError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import _peer_nnunet_data as peer  # noqa: E402
import peer_nnunet  # noqa: E402
from _nnunet_budget_trainer import budget_schedule  # noqa: E402

LABELS = {"0": "background", "1": "Anterior", "2": "Posterior"}


@pytest.fixture(scope="module")
def study(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small study on real hippocampus files: 10 cases, test 2, validation 2, fractions 50/100, seeds 0/1."""
    src, data = hippocampus_dir, tmp_path_factory.mktemp("peer") / "data"
    data.mkdir()
    imgs = [p for p in sorted((src / "imagesTr").glob("*.nii.gz")) if (src / "labelsTr" / p.name).exists()][:10]
    items = [{"image": str(p), "label": str(src / "labelsTr" / p.name), "case_id": f"c{i:02d}"}
             for i, p in enumerate(imgs)]
    (data / "datalist.json").write_text(json.dumps({"labels": LABELS, "training": items}))
    split_datalist(data / "datalist.json", fractions=[50, 100], seeds=[0, 1], test_fraction=0.2, val_fraction=0.2)
    return data


def _ids(folder: Path, suffix: str) -> set[str]:
    return {p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")}


@pytest.mark.parametrize(("fraction", "seed"), [(50, 0), (100, 1)])
def test_raw_dataset_holds_exactly_medssls_cases(study: Path, tmp_path: Path, fraction: int, seed: int) -> None:
    splits = json.loads((study / "splits.json").read_text())
    cases = peer.run_cases(study, fraction, seed)
    out = peer.write_raw_dataset(tmp_path / "Dataset500_x", cases, labels=peer.nnunet_labels(study / "datalist.json"),
                                 channels=peer.channel_names(cases["training"], study))
    train, test = set(splits["seeds"][str(seed)]["fractions"][str(fraction)]), set(splits["test"])
    assert _ids(out / "imagesTr", "_0000.nii.gz") == train == _ids(out / "labelsTr", ".nii.gz")
    assert _ids(out / "imagesTs", "_0000.nii.gz") == test
    assert not (train | test) & set(splits["seeds"][str(seed)]["validation"])  # validation unused
    by_id = {it["case_id"]: it for it in json.loads((study / "datalist.json").read_text())["training"]}
    for c in train:
        assert (out / "imagesTr" / f"{c}_0000.nii.gz").resolve() == Path(by_id[c]["image"]).resolve()
        assert (out / "labelsTr" / f"{c}.nii.gz").resolve() == Path(by_id[c]["label"]).resolve()
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert ds["channel_names"] == {"0": "MRI"} and ds["numTraining"] == len(train) and ds["file_ending"] == ".nii.gz"
    # re-running keeps it; another case set in the same folder is refused
    assert peer.write_raw_dataset(out, cases, labels=ds["labels"], channels=ds["channel_names"]) == out
    other = peer.run_cases(study, 100 if fraction == 50 else 50, seed)
    with pytest.raises(MedsslError, match="other cases"):
        peer.write_raw_dataset(out, other, labels=ds["labels"], channels=ds["channel_names"])


def test_channel_names_and_labels_from_the_study(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("case_id,modality\na,CT\n")
    assert peer.channel_names([{"case_id": "a", "image": "x"}], tmp_path) == {"0": "CT"}
    assert peer.channel_names([{"case_id": "a", "image": ["t1", "t2"], "channels": ["t1", "t2"]}], tmp_path) == {
        "0": "t1", "1": "t2"}
    (tmp_path / "d.json").write_text(json.dumps({"labels": {"0": "bg", "2": "b"}}))
    with pytest.raises(MedsslError, match="0..K-1"):
        peer.nnunet_labels(tmp_path / "d.json")
    lab = tmp_path / "l.nii.gz"
    nib.save(nib.Nifti1Image(np.array([[[0, 3]]], dtype=np.uint8), np.eye(4)), lab)
    (tmp_path / "d.json").write_text("{}")
    assert peer.nnunet_labels(tmp_path / "d.json", [str(lab)]) == {
        "background": 0, "class_1": 1, "class_2": 2, "class_3": 3}


def test_plans_batch_edit_changes_only_the_batch(tmp_path: Path) -> None:
    plans = {"plans_name": "nnUNetPlans", "dataset_name": "D",
             "configurations": {"3d_fullres": {"batch_size": 7, "patch_size": [40, 56, 40],
                                               "data_identifier": "nnUNetPlans_3d_fullres"},
                                "2d": {"batch_size": 30}}}
    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(plans))
    assert peer.plans_with_batch(tmp_path, 7) == "nnUNetPlans"  # the planner's batch: the stock plans
    assert not (tmp_path / "nnUNetPlans_bs7.json").exists()
    ident = peer.plans_with_batch(tmp_path, peer.resolve_batch("max-iter", 7))
    new = json.loads((tmp_path / f"{ident}.json").read_text())
    assert ident == "nnUNetPlans_bs2" and new["plans_name"] == ident
    assert new["configurations"]["3d_fullres"]["batch_size"] == 2
    new["plans_name"], new["configurations"]["3d_fullres"]["batch_size"] = "nnUNetPlans", 7
    assert new == plans  # nothing else changed (data_identifier kept: the preprocessed data is reused)
    with pytest.raises(MedsslError, match="no configuration"):
        peer.plans_with_batch(tmp_path, 2, configuration="3d_lowres")


def test_resolve_batch() -> None:
    assert peer.resolve_batch("planner", 7) == 7 and peer.resolve_batch("max-iter", 7) == 2
    assert peer.resolve_batch("4", 7) == 4
    for bad in ("1", "big"):
        with pytest.raises(MedsslError, match="--batch"):
            peer.resolve_batch(bad, 7)


def test_budget_arithmetic() -> None:
    assert budget_schedule(1125) == (22, 51) and budget_schedule(250) == (5, 50) and budget_schedule(13) == (1, 13)
    for n in range(1, 3000, 7):
        e, i = budget_schedule(n)
        assert e * i <= n and n - e * i < e and abs(i - 50) <= 25 + (n < 75) * 50  # close to 50 per epoch
    assert peer.iterations_for_minutes(20, 1.07) == 1121 == math.floor(1200 / 1.07)
    assert peer.iterations_for_minutes(20, 4.8) == 250
    assert peer.probe_seconds_per_iteration([5, 6, 7.5, 8.5, 9.5], 2) == pytest.approx(3.5 / 3)
    with pytest.raises(MedsslError, match="probe ran 2"):
        peer.probe_seconds_per_iteration([1.0, 2.0], 3)
    with pytest.raises(ValueError):
        budget_schedule(0)


def test_probe_picks_the_fastest_augmentation_workers(tmp_path: Path) -> None:
    for n, dt in ((0, 1.5), (1, 1.0), (2, 1.2)):  # timing files of finished probes (a re-run only reads them)
        d = tmp_path / "probe" / f"da{n}"
        d.mkdir(parents=True)
        (d / "timing.json").write_text(json.dumps({"step_ends": [100.0 + k * dt for k in range(13)]}))
    res = peer_nnunet._probe(None, "D", "P", tmp_path, [0, 1, 2], warmup=3, iters=10)
    assert res["n_proc_da"] == 1 and res["chosen_s_per_it"] == pytest.approx(1.0)
    assert res["s_per_it"] == {"0": 1.5, "1": 1.0, "2": 1.2}


def _save(path: Path, arr: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.5, 2.0)) -> str:
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), np.diag([*spacing, 1.0])), path)
    return str(path)


def test_evaluation_of_prediction_files_uses_medssls_metrics(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "perfect").mkdir()
    (tmp_path / "missed").mkdir()
    test = []
    for i in range(2):
        lab = np.zeros((16, 12, 10))
        lab[3:9, 2:8, 2:6], lab[9:14, 4:10, 5:9] = 1, 2
        lab[rng.integers(0, 16), 0, 0] = 2
        test.append({"case_id": f"t{i}", "label": _save(tmp_path / f"lab{i}.nii.gz", lab)})
        _save(tmp_path / "perfect" / f"t{i}.nii.gz", lab)
        _save(tmp_path / "missed" / f"t{i}.nii.gz", np.where(lab == 1, 0, lab))
    perfect = peer.evaluate_predictions(tmp_path / "perfect", test, 3)
    assert perfect["metrics"]["dice_mean"] == 1.0 and perfect["metrics"]["hd95_mean"] == 0.0
    assert perfect["metrics"]["missed_1"] == 0 and set(perfect["per_case"]) == {"t0", "t1"}
    missed = peer.evaluate_predictions(tmp_path / "missed", test, 3)["metrics"]
    assert missed["missed_1"] == 2 and missed["dice_1"] == 0.0 and missed["dice_2"] == 1.0
    assert missed["hd95_1"] == pytest.approx(image_diagonal_mm((16, 12, 10), (1.0, 1.5, 2.0)))  # the penalty, mm
    _save(tmp_path / "perfect" / "t1.nii.gz", np.zeros((16, 12, 9)))
    with pytest.raises(MedsslError, match="not on the grid"):
        peer.evaluate_predictions(tmp_path / "perfect", test, 3)
    with pytest.raises(MedsslError, match="missing"):
        peer.evaluate_predictions(tmp_path, test, 3)


def test_missing_nnunet_venv_names_make_peer_venv(tmp_path: Path) -> None:
    with pytest.raises(MedsslError, match="make peer-venv"):
        peer_nnunet.NnUNet(tmp_path / "no-venv", tmp_path)


def test_target_install_runs_with_this_interpreter(tmp_path: Path) -> None:
    """A `pip install --target DIR` folder (console scripts in DIR/bin, no DIR/bin/python, as on the GPU machine):
    nnU-Net's scripts and snippets run with sys.executable; a venv keeps its own python."""
    target = tmp_path / "site"
    (target / "bin").mkdir(parents=True)
    (target / "bin" / "nnUNetv2_train").touch(mode=0o755)
    nn = peer_nnunet.NnUNet(target, tmp_path)
    assert nn.target_install and nn.interpreter == Path(sys.executable)
    assert nn.command("nnUNetv2_train", ["1", "3d_fullres"]) == [
        sys.executable, str(target / "bin" / "nnUNetv2_train"), "1", "3d_fullres"]
    assert nn.python("import sys; print(sys.executable)") == sys.executable
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for tool in ("nnUNetv2_train", "python"):
        (venv / "bin" / tool).touch(mode=0o755)
    nn = peer_nnunet.NnUNet(venv, tmp_path)
    assert not nn.target_install and nn.interpreter == venv / "bin" / "python"
    assert nn.command("nnUNetv2_train", ["1"]) == [str(venv / "bin" / "nnUNetv2_train"), "1"]


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_device_reaches_probe_train_and_predict(study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                device: str) -> None:
    """Every nnUNetv2_train (probe and training) and nnUNetv2_predict call gets ``-device <--device>``; the GPU run
    lives in its own ``_cuda`` folder and records the device and the GPU's name (nnU-Net itself faked)."""
    from _nnunet_budget_trainer import ENV_ITERATIONS, ENV_TIMING

    labels = {c["case_id"]: c["label"] for c in peer.run_cases(study, 50, 0)["test"]}
    calls: list[tuple[str, list[str]]] = []

    def fake_run(self: peer_nnunet.NnUNet, tool: str, args: list[str], env: dict[str, str], logfile: Path) -> float:
        calls.append((tool, args))
        logfile.parent.mkdir(parents=True, exist_ok=True)  # as NnUNet.run does
        if tool == "nnUNetv2_plan_and_preprocess":  # the plans the stages read
            (raw,) = (self.workdir / "nnUNet_raw").glob(f"Dataset{int(args[1]):03d}_*")
            pre = self.workdir / "nnUNet_preprocessed" / raw.name
            (pre / "nnUNetPlans_3d_fullres").mkdir(parents=True)
            (pre / "nnUNetPlans.json").write_text(json.dumps({"configurations": {"3d_fullres": {"batch_size": 2}}}))
        elif tool == "nnUNetv2_train":  # the budget trainer's step end times: 0.5 s per iteration
            Path(env[ENV_TIMING]).write_text(json.dumps({"step_ends": [0.5 * k for k in range(int(env[ENV_ITERATIONS]))]}))
        elif tool == "nnUNetv2_predict":  # perfect predictions
            out = Path(args[args.index("-o") + 1])
            out.mkdir(parents=True)
            for case, label in labels.items():
                (out / f"{case}.nii.gz").write_bytes(Path(label).read_bytes())
        return 1.0

    monkeypatch.setattr(peer_nnunet.NnUNet, "run", fake_run)
    monkeypatch.setattr(peer_nnunet.NnUNet, "install_trainer", lambda self: tmp_path / "trainer.py")
    monkeypatch.setattr(peer_nnunet.NnUNet, "versions", lambda self, device="cpu": {
        "nnunetv2": "2.8.1", **({"gpu": "Fake GPU"} if device == "cuda" else {})})
    fake_install = tmp_path / "site"
    (fake_install / "bin").mkdir(parents=True)
    (fake_install / "bin" / "nnUNetv2_train").touch(mode=0o755)
    argv = ["--study-data", str(study), "--fraction", "50", "--seed", "0", "--minutes", "0.5", "--n-proc-da", "8",
            "--workdir", str(tmp_path / "work"), "--nnunet-venv", str(fake_install), "--device", device]
    assert peer_nnunet.main(argv) == 0
    trains = [a for t, a in calls if t == "nnUNetv2_train"]
    predicts = [a for t, a in calls if t == "nnUNetv2_predict"]
    assert len(trains) == 2 and len(predicts) == 1  # the probe (one worker count) and the training
    for a in [*trains, *predicts]:
        assert a[a.index("-device") + 1] == device and a.count("-device") == 1
    (run,) = (tmp_path / "work").glob("f50_s0_bs2_0.5min*")
    assert run.name == ("f50_s0_bs2_0.5min_cuda" if device == "cuda" else "f50_s0_bs2_0.5min")
    res = json.loads((run / "result.json").read_text())
    assert res["device"] == device and res["machine"]["gpu"] == ("Fake GPU" if device == "cuda" else None)
    assert res["iterations_budgeted"] == 60 and res["n_proc_da"] == 8 and res["metrics"]["dice_mean"] == 1.0


def test_markdown_row() -> None:
    r = {"batch_spec": "max-iter", "fraction": 10.0, "seed": 0, "batch": 2, "iterations": 1122,
         "seconds_train": 1230.0, "metrics": {"dice_mean": 0.85, "dice_1": 0.84, "dice_2": 0.86, "hd95_mean": 2.5,
                                              "missed_1": 0.0, "missed_2": 1.0}}
    assert peer_nnunet.markdown_row(r) == ("| nnU-Net v2 3d_fullres (max-iter) | 10 % | 0 | 2 | 1122 | 20.5 | 0.8500 | "
                                           "0.840 / 0.860 | 2.50 | 0 / 1 |")


@pytest.mark.slow
def test_end_to_end_few_iterations(study: Path, tmp_path: Path) -> None:
    """Plan, preprocess, 3 iterations, predict and evaluate with the real nnU-Net (about 5 minutes on 2 cores)."""
    venv = REPO / ".venv-nnunet"
    if not (venv / "bin" / "nnUNetv2_train").exists():
        pytest.skip(f"{venv} missing (make peer-venv)")
    argv = ["--study-data", str(study), "--fraction", "100", "--seed", "0", "--batch", "max-iter",
            "--iterations", "3", "--n-proc-da", "0", "--workdir", str(tmp_path)]
    assert peer_nnunet.main(argv) == 0
    (run,) = tmp_path.glob("f100_s0_bs2_3it")
    res = json.loads((run / "result.json").read_text())
    test_ids = json.loads((study / "splits.json").read_text())["test"]
    assert set(res["per_case"]) == set(test_ids) and res["iterations"] == 3 == res["iterations_timed"]
    assert 0.0 <= res["metrics"]["dice_mean"] <= 1.0 and res["versions"]["nnunetv2"] == "2.8.1"
    assert res["batch"] == 2 and res["tta_mirroring"] and res["seconds_train"] > 0
    assert peer_nnunet.main(argv) == 0  # resumed: every stage skipped
    assert json.loads((run / "result.json").read_text())["stages"] == res["stages"]


def test_match_medssl_budget_is_medssls_training_time_here(study: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``--match-medssl CONFIG``: nnU-Net's budget = the training minutes of medssl's run of the same fraction, seed
    and splits, timed on this machine by its dry run; kept for re-runs; another fraction or other splits refused."""
    import yaml

    from medssl.engines.finetune.config import FinetuneConfig

    cfg = FinetuneConfig(datalist=str(study / "datalist.json"), splits=str(study / "splits.json"), fraction=50, seed=0,
                         network="UNet", network_kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 0},
                         out_channels=3, roi_size=[16, 16, 16], batch_size=2, num_samples=1, max_steps=40,
                         val_every_steps=20, device="cpu", out_dir=str(tmp_path / "medssl"), experiment=None)
    path = tmp_path / "medssl.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    work = tmp_path / "work"
    first = peer_nnunet.matched_budget(path, study, 50, 0, work, time_steps=2)
    assert first["medssl_steps"] == 40 and first["training_s"] == pytest.approx(40 * first["medssl_s_per_step"], abs=0.06)
    assert first["minutes"] == pytest.approx(first["training_s"] / 60, abs=0.01) and first["machine"]
    assert peer_nnunet.matched_budget(path, study, 50, 0, work) == first  # measured once, reused by a re-run
    with pytest.raises(MedsslError, match="fraction 50 seed 0, the peer runs fraction 100 seed 0"):
        peer_nnunet.matched_budget(path, study, 100, 0, work)
    other = tmp_path / "other"
    other.mkdir()
    (other / "splits.json").write_text((study / "splits.json").read_text())
    with pytest.raises(MedsslError, match="not the same cases"):
        peer_nnunet.matched_budget(path, other, 50, 0, work)
    with pytest.raises(SystemExit):  # one budget only
        peer_nnunet.main(["--study-data", str(study), "--fraction", "50", "--seed", "0", "--minutes", "1",
                          "--match-medssl", str(path), "--workdir", str(work)])
