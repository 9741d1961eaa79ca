"""Self-training students in a study (pipeline ``self_training``): arms ``<init>+st`` after their teachers, each
learning from the teacher child of its fraction and seed; refused when the teacher did not finish; compared
against scratch like SSL; adding students leaves a finished study's children as they are."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from rich.console import Console

from medssl.cluster.sweep_jobs import emit_sweep_jobs
from medssl.engines.studies.pipeline import (
    base_init,
    finetune_dict,
    load_pipeline,
    student_round,
    teacher_init,
)
from medssl.engines.studies.sweep import run_sweep
from medssl.errors import MedsslError
from medssl.tracking.compare import compare_study
from tests.engines.studies._helpers import children, fresh_sqlite_uri
from tests.engines.studies.test_sweep import FakeFinetune, FakePretrain, fake_value, pipeline

ST = {"inits": ["scratch", "ssl"], "fractions": [10], "labelled_share": 0.25, "tta": False}


def test_students_run_after_their_teachers_with_the_teachers_labels(tmp_path: Path) -> None:
    uri = fresh_sqlite_uri(tmp_path)
    ft = FakeFinetune()
    ft.bonus = lambda cfg: 0.02 if cfg.self_training else 0.0
    res = run_sweep(pipeline(tmp_path, uri, self_training=ST), finetune_fn=ft, pretrain_fn=FakePretrain())
    keys = [k for k, _ in ft.calls]
    teachers = [f"f{f}-{i}-s{s}" for f in (10, 100) for s in (0, 1) for i in ("scratch", "ssl")]
    students = [f"f10-{i}+st-s{s}" for s in (0, 1) for i in ("scratch", "ssl")]
    assert keys == teachers + students and not res.failed  # the existing order first, students last
    cfgs = {c.tags["medssl.sweep_key"]: c for c in ft.configs}
    for s in (0, 1):
        for init in ("scratch", "ssl"):
            student, teacher = cfgs[f"f10-{init}+st-s{s}"], cfgs[f"f10-{init}-s{s}"]
            assert student.self_training == {"teacher": str(res.sweep_dir / f"f10-{init}-s{s}" / "checkpoints" / "best.pt"),
                                             "pool": "seed", "labelled_share": 0.25, "tta": False}
            assert student.init == teacher.init and student.tags["medssl.init"] == f"{init}+st"
            assert teacher.self_training is None
            assert student.tags["medssl.config_hash"] != teacher.tags["medssl.config_hash"]
    runs = {r.data.tags["medssl.sweep_key"]: r for r in children(uri, res.parent_run_id)}
    assert runs["f10-ssl+st-s1"].data.tags["medssl.init"] == "ssl+st"

    cmp = compare_study("toy", tracking_uri=uri, out_dir=tmp_path / "cmp")
    assert cmp.summaries[(10.0, "scratch+st-scratch")].mean == pytest.approx(0.02)
    assert cmp.summaries[(10.0, "ssl+st-scratch")].mean == pytest.approx(0.07)  # the fake's SSL bonus + 0.02
    assert cmp.summaries[(10.0, "ssl-scratch")].mean == pytest.approx(0.05)
    assert (100.0, "scratch+st") not in cmp.cells
    text = io.StringIO()
    Console(file=text, width=300).print(cmp.table)
    out = text.getvalue()
    assert "scratch+st − scratch (paired)" in out and "ssl+st − scratch (paired)" in out and "SSL − scratch" in out
    rows = list(csv.DictReader(open(cmp.csv_path)))
    diff = next(r for r in rows if r["init"] == "scratch+st-scratch")
    assert diff["fraction"] == "10.0" and diff["values"] == "0.02 0.02"
    assert cmp.parent_metrics["test_dice_mean/f10_delta_scratch_st_mean"] == pytest.approx(0.02)
    from medssl.tracking.mlflow_tracker import make_client

    logged = make_client(uri).get_run(res.parent_run_id).data.metrics  # every name valid for MLflow
    assert not set(cmp.parent_metrics) - set(logged), sorted(set(cmp.parent_metrics) - set(logged))
    assert "test_dice_mean/f10_delta_scratch_st_mean" in logged and "test_dice_mean/f10_scratch_st_n" in logged
    assert cmp.parent_metrics["test_dice_mean/f10_ssl_st_mean"] == pytest.approx(
        (fake_value(10, "ssl", 0) + fake_value(10, "ssl", 1)) / 2 + 0.02)


def test_a_student_whose_teacher_failed_fails_clearly_and_reruns(tmp_path: Path) -> None:
    uri = fresh_sqlite_uri(tmp_path)
    spec = pipeline(tmp_path, uri, self_training=ST | {"inits": ["scratch"]})
    res = run_sweep(spec, finetune_fn=FakeFinetune(fail={"f10-scratch-s1"}), pretrain_fn=FakePretrain())
    failed = {c.key: c.error for c in res.failed}
    assert set(failed) == {"f10-scratch-s1", "f10-scratch+st-s1"}
    assert "teacher f10-scratch-s1 has not finished" in failed["f10-scratch+st-s1"]
    ft = FakeFinetune()
    res2 = run_sweep(spec, finetune_fn=ft, pretrain_fn=FakePretrain())
    assert [k for k, _ in ft.calls] == ["f10-scratch-s1", "f10-scratch+st-s1"] and not res2.failed


def test_adding_students_to_a_finished_study_keeps_its_children(tmp_path: Path) -> None:
    uri = fresh_sqlite_uri(tmp_path)
    run_sweep(pipeline(tmp_path, uri), finetune_fn=FakeFinetune(), pretrain_fn=FakePretrain())
    ft = FakeFinetune()
    res = run_sweep(pipeline(tmp_path, uri, self_training=ST), finetune_fn=ft, pretrain_fn=FakePretrain())
    assert [k for k, _ in ft.calls] == [f"f10-{i}+st-s{s}" for s in (0, 1) for i in ("scratch", "ssl")]
    assert sum(c.status == "SKIPPED" for c in res.children) == 8


def test_bad_self_training_sections_are_refused(tmp_path: Path) -> None:
    base = pipeline(tmp_path, None)
    for st, match in (({"inits": ["ssl"], "bogus": 1}, "unknown self_training key"),
                      ({"inits": ["scratch"], "fractions": [25]}, "must be swept fractions"),
                      ({"inits": ["genesis"]}, "not swept"),
                      ({"pool": "everything"}, "pool"),
                      ({"labelled_share": 1.5}, "labelled_share")):
        with pytest.raises(MedsslError, match=match):
            load_pipeline(base | {"self_training": st})
    with pytest.raises(MedsslError, match="not swept"):
        load_pipeline(base | {"inits": ["scratch"], "self_training": {"inits": ["ssl"]}})
    pl = load_pipeline(base | {"self_training": {}})  # empty: off
    assert pl.self_training is None and pl.arms == ["scratch", "ssl"]
    pl = load_pipeline(base | {"self_training": {"inits": ["scratch"]}})  # default fractions: all below 100
    assert pl.self_training["fractions"] == [10.0] and pl.arms == ["scratch", "ssl", "scratch+st"]
    assert load_pipeline(base | {"self_training": {"inits": ["scratch"]},
                                 "finetune_by_init": {"scratch+st": {"lr": 0.1}}}).finetune_by_init


def test_slurm_students_are_a_second_array_after_the_teachers(tmp_path: Path) -> None:
    jobs = emit_sweep_jobs(pipeline(tmp_path, fresh_sqlite_uri(tmp_path), self_training=ST), out=tmp_path / "slurm")
    n_teachers = 8  # fractions 10 / 100 × seeds 0 / 1 × scratch / ssl; students: 10 % × 2 seeds × 2 arms
    assert jobs.keys[n_teachers:] == [f"f10-{i}+st-s{s}" for s in (0, 1) for i in ("scratch", "ssl")]
    assert jobs.students_from == n_teachers and jobs.students_script == tmp_path / "slurm" / "students.sbatch"
    kids, studs = (jobs.children_script.read_text(), jobs.students_script.read_text())
    assert "#SBATCH --array=0-7\n" in kids and "#SBATCH --array=8-11\n" in studs
    assert "#SBATCH --job-name=toy-students" in studs and '--child "$SLURM_ARRAY_TASK_ID"' in studs
    submit = jobs.submit_script.read_text()
    assert "--dependency=afterany:${KIDS%%;*} students.sbatch" in submit
    assert submit.index("children.sbatch") < submit.index("students.sbatch")
    plain = emit_sweep_jobs(pipeline(tmp_path / "plain", fresh_sqlite_uri(tmp_path / "plain"), study="plain"),
                            out=tmp_path / "plain_slurm")
    assert plain.students_script is None and "students.sbatch" not in plain.submit_script.read_text()


def test_arm_names_of_rounds() -> None:
    assert [teacher_init(a) for a in ("scratch", "ssl+st", "ssl+st2", "scratch+st12")] == [None, "ssl", "ssl+st",
                                                                                           "scratch+st11"]
    assert [base_init(a) for a in ("scratch", "ssl+st", "ssl+st2")] == ["scratch", "ssl", "ssl"]
    assert [student_round(a) for a in ("ssl", "ssl+st", "ssl+st2", "ssl+st1", "ssl+stx")] == [0, 1, 2, 0, 0]


def test_second_round_students_learn_from_the_first_rounds(tmp_path: Path) -> None:
    """``rounds: 2``: ``<init>+st2`` children after every first-round student, each taught by the ``<init>+st``
    child of its fraction and seed, starting from the base init; its own config hash; compared with scratch."""
    uri = fresh_sqlite_uri(tmp_path)
    ft = FakeFinetune()
    ft.bonus = lambda cfg: 0.03 if cfg.self_training and "+st" in cfg.self_training["teacher"] else \
        0.02 if cfg.self_training else 0.0
    spec = pipeline(tmp_path, uri, self_training=ST | {"rounds": 2},
                    finetune_by_init={"ssl": {"lr": 0.5}, "ssl+st": {"max_steps": 7}})
    res = run_sweep(spec, finetune_fn=ft, pretrain_fn=FakePretrain())
    keys = [k for k, _ in ft.calls]
    round1 = [f"f10-{i}+st-s{s}" for s in (0, 1) for i in ("scratch", "ssl")]
    round2 = [f"f10-{i}+st2-s{s}" for s in (0, 1) for i in ("scratch", "ssl")]
    assert keys[8:] == round1 + round2 and not res.failed
    cfgs = {c.tags["medssl.sweep_key"]: c for c in ft.configs}
    for init in ("scratch", "ssl"):
        st2, st1, base = cfgs[f"f10-{init}+st2-s1"], cfgs[f"f10-{init}+st-s1"], cfgs[f"f10-{init}-s1"]
        assert st2.self_training["teacher"] == str(res.sweep_dir / f"f10-{init}+st-s1" / "checkpoints" / "best.pt")
        assert st2.init == base.init and st2.tags["medssl.init"] == f"{init}+st2"
        assert len({st2.tags["medssl.config_hash"], st1.tags["medssl.config_hash"], base.tags["medssl.config_hash"]}) == 3
    # finetune_by_init follows the chain of teachers: ssl → ssl+st → ssl+st2
    assert (cfgs["f10-ssl+st2-s0"].lr, cfgs["f10-ssl+st2-s0"].max_steps) == (0.5, 7)
    pl = load_pipeline(spec)
    assert "lr" not in finetune_dict(pl, 10.0, "scratch+st2") and "max_steps" not in finetune_dict(pl, 10.0, "scratch+st2")
    assert finetune_dict(pl, 10.0, "ssl+st2") == {**pl.finetune, "lr": 0.5, "max_steps": 7}
    cmp = compare_study("toy", tracking_uri=uri, out_dir=tmp_path / "cmp")
    assert cmp.summaries[(10.0, "scratch+st2-scratch")].mean == pytest.approx(0.03)
    assert cmp.summaries[(10.0, "scratch+st-scratch")].mean == pytest.approx(0.02)
    assert "test_dice_mean/f10_delta_scratch_st2_mean" in cmp.parent_metrics


def test_adding_a_round_keeps_the_first_and_a_failed_teacher_is_named(tmp_path: Path) -> None:
    uri = fresh_sqlite_uri(tmp_path)
    st = ST | {"inits": ["scratch"]}
    run_sweep(pipeline(tmp_path, uri, self_training=st), finetune_fn=FakeFinetune(fail={"f10-scratch+st-s1"}),
              pretrain_fn=FakePretrain())
    ft = FakeFinetune(fail={"f10-scratch+st-s1"})
    res = run_sweep(pipeline(tmp_path, uri, self_training=st | {"rounds": 2}), finetune_fn=ft,
                    pretrain_fn=FakePretrain())
    assert [k for k, _ in ft.calls] == ["f10-scratch+st-s1", "f10-scratch+st2-s0"]  # st2-s1 refused before training
    failed = {c.key: c.error for c in res.failed}
    assert set(failed) == {"f10-scratch+st-s1", "f10-scratch+st2-s1"}
    assert "teacher f10-scratch+st-s1 has not finished" in failed["f10-scratch+st2-s1"]


def test_bad_rounds_are_refused(tmp_path: Path) -> None:
    base = pipeline(tmp_path, None)
    for rounds in (0, 1.5, True, "2", 100):
        with pytest.raises(MedsslError, match="rounds"):
            load_pipeline(base | {"self_training": {"inits": ["scratch"], "rounds": rounds}})
    pl = load_pipeline(base | {"self_training": {"inits": ["scratch", "ssl"], "rounds": 2}})
    assert pl.arms == ["scratch", "ssl", "scratch+st", "ssl+st", "scratch+st2", "ssl+st2"]
    assert "rounds" not in pl.student_options()


def test_copy_paste_reaches_every_student_and_only_them(tmp_path: Path) -> None:
    ft = FakeFinetune()
    st = ST | {"inits": ["scratch"], "copy_paste": 0.5}
    run_sweep(pipeline(tmp_path, fresh_sqlite_uri(tmp_path), self_training=st), finetune_fn=ft,
              pretrain_fn=FakePretrain())
    cfgs = {c.tags["medssl.sweep_key"]: c for c in ft.configs}
    assert {k for k, c in cfgs.items() if c.self_training} == {"f10-scratch+st-s0", "f10-scratch+st-s1"}
    assert all(cfgs[f"f10-scratch+st-s{s}"].self_training["copy_paste"] == 0.5 for s in (0, 1))
    with pytest.raises(MedsslError, match="copy_paste"):
        load_pipeline(pipeline(tmp_path, None) | {"self_training": {"inits": ["scratch"], "copy_paste": 2}})


def test_slurm_each_round_is_an_array_after_the_previous(tmp_path: Path) -> None:
    jobs = emit_sweep_jobs(pipeline(tmp_path, fresh_sqlite_uri(tmp_path), self_training=ST | {"rounds": 2}),
                           out=tmp_path / "slurm")
    assert [(a.round, a.first, a.last, a.script.name) for a in jobs.student_arrays] == [
        (1, 8, 11, "students.sbatch"), (2, 12, 15, "students2.sbatch")]
    assert jobs.keys[12:] == [f"f10-{i}+st2-s{s}" for s in (0, 1) for i in ("scratch", "ssl")]
    second = (tmp_path / "slurm" / "students2.sbatch").read_text()
    assert "#SBATCH --array=12-15\n" in second and "#SBATCH --job-name=toy-students2" in second
    submit = jobs.submit_script.read_text()
    assert "STUD2=$(sbatch --parsable --dependency=afterany:${STUD%%;*} students2.sbatch)" in submit
    assert submit.index("students.sbatch") < submit.index("students2.sbatch")
    assert [jobs.job_of(i) for i in (7, 8, 15)] == [None, None, None]  # nothing submitted
    jobs.children_job, jobs.student_arrays[0].job, jobs.student_arrays[1].job = "10", "11", "12"
    assert [jobs.job_of(i) for i in (7, 8, 11, 12, 15)] == ["10", "11", "11", "12", "12"]


def test_real_engines_teacher_then_student(tmp_path: Path) -> None:
    """The real finetuning engine end to end: the student reads the teacher child's best.pt and trains on its labels."""
    import json

    from medssl.engines.runtime.checkpoint import load_checkpoint
    from tests.engines.finetune.test_self_training import SEG_NET, synthetic_cases

    dl, sp = synthetic_cases(tmp_path / "data")
    uri = fresh_sqlite_uri(tmp_path)
    spec = {"study": "st-real", "experiment": "st", "tracking_uri": uri, "out_dir": str(tmp_path / "runs"),
            "data": {"datalist": str(dl), "splits": str(sp)}, "inits": ["scratch"], "fractions": [20], "seeds": [0],
            "finetune": {"task": "segmentation", "network": "SegResNet", "network_kwargs": SEG_NET, "out_channels": 2,
                         "roi_size": [8, 8, 8], "normalisation": "none", "batch_size": 2, "num_samples": 1,
                         "max_steps": 3, "sw_overlap": 0.0, "sw_batch_size": 1, "device": "cpu", "lr": 1e-2,
                         "augment": {"flip_prob": 0.0}},
            "self_training": {"tta": False}}
    res = run_sweep(spec, progress=False)
    assert not res.failed and [c.key for c in res.children] == ["f20-scratch-s0", "f20-scratch+st-s0"]
    student = res.sweep_dir / "f20-scratch+st-s0"
    best = load_checkpoint(student / "checkpoints" / "best.pt")
    st = best["recipe"]["self_training"]
    assert st["teacher"] == str(res.sweep_dir / "f20-scratch-s0" / "checkpoints" / "best.pt") and st["cases"] > 0
    manifest = json.loads((student / "pseudo_labels" / "manifest.json").read_text())
    assert len(manifest["cases"]) == st["cases"] and not manifest["failed"]
    from medssl.deploy.predict import predict

    # a student deploys like any run (its recipe only gains a record)
    out = predict(student / "checkpoints" / "best.pt", [dl.parent / "img0.nii.gz"], tmp_path / "pred")
    assert out.exit_code == 0 and (tmp_path / "pred" / "img0_seg.nii.gz").is_file()


def test_labels_needed_of_a_student_arm_is_a_valid_mlflow_name() -> None:
    from medssl.tracking.efficiency import efficiency_metrics, label_efficiency
    from medssl.tracking.stats import mean_ci

    summaries = {(10.0, "scratch"): mean_ci([0.80, 0.82]), (100.0, "scratch"): mean_ci([0.86, 0.87]),
                 (10.0, "scratch+st"): mean_ci([0.86, 0.87])}
    eff = label_efficiency(summaries, "test_dice_mean", within=0.01)
    assert eff.needed["scratch+st"] == 10.0 and "scratch+st needs 10 %" in eff.sentence()
    assert efficiency_metrics(eff)["test_dice_mean/labels_needed_scratch_st"] == 10.0


def test_status_reads_jobs_records_written_before_rounds() -> None:
    """A ``jobs.json`` of the previous layout (one students array: ``students_from`` / ``students_job``) still maps
    each child to its array; a record with no students maps none."""
    from medssl.cluster.sweep_jobs import _student_arrays

    keys = [f"k{i}" for i in range(12)]
    old = {"keys": keys, "children_job": "10", "students_job": "11", "students_from": 8}
    assert _student_arrays("toy", old) == [{"round": 1, "from": 8, "to": 11, "job": "11", "name": "toy-students"}]
    assert _student_arrays("toy", {"keys": keys, "children_job": "10", "students_from": None}) == []
    new = old | {"student_arrays": [{"round": 1, "from": 8, "to": 9, "job": "11", "name": "toy-students"},
                                    {"round": 2, "from": 10, "to": 11, "job": "12", "name": "toy-students2"}]}
    assert [a["job"] for a in _student_arrays("toy", new)] == ["11", "12"]
