"""Pretraining (``dinov2.train.train3d.main``) against every kind of bad input (issue #14).

The pre-flight reads every file of the datalist in full before the model is built; a bad file
ends the run with one ``ERROR:`` line naming the datalist, the file and ``--skip-bad-inputs``,
exit code 1, no traceback, and no checkpoint or teacher export. The matrix:

=========================  =====================================================================
kind                       outcome
=========================  =====================================================================
empty                      error: the file is empty
truncated_gzip             error: truncated (found by the full read; the header reads)
random_bytes               error: not gzip-compressed
2d                         error: 2D volume
4d                         tolerated: kept (a frame is drawn each time the volume is sampled)
5d                         error: 5D volume
all_nan                    error: no finite voxel
some_inf (partial +-Inf)   tolerated: kept, one warning naming the file
smaller_than_crop          tolerated: kept (crops are resized to the crop size); trained on in
                           the ``--skip-bad-inputs`` run below
label kinds                n/a (pretraining reads no label maps)
datalist not JSON          error naming the datalist
datalist missing keys      error naming the datalist and the entry
datalist -> missing file   error naming the file: file not found
checkpoint missing         error naming the file (``student.pretrained_weights``)
checkpoint text            error naming the file: a text file
checkpoint other arch      error naming the file: a teacher of patch size 16, or a backbone
                           without the DINO/iBOT heads
=========================  =====================================================================

Tolerated kinds stop the run right after the pre-flight (no training); one end-to-end run of one
iteration with ``--skip-bad-inputs`` trains on a 6^3 volume, a 4D series and a volume with +-Inf
voxels while it leaves a truncated file out and lists it in ``skipped.tsv``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from dinov2.train import train3d

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny_cpu.yaml"
# What a run writes once it trains (config.yaml and log.txt are written before the pre-flight).
RUN_OUTPUTS = ("model_*.pth", "teacher_checkpoint.pth", "training_metrics.json", "skipped.tsv")

# kind -> (outcome, words of the message): "error" = exit 1 naming the file; "kept" = passes the
# pre-flight; "warn" = passes with one warning naming the file.
IMAGES = {
    "empty": ("error", "the file is empty (0 bytes)"),
    "truncated_gzip": ("error", "truncated"),
    "random_bytes": ("error", "not gzip-compressed"),
    "2d": ("error", "2D volume"),
    "4d": ("kept", None),
    "5d": ("error", "5D volume"),
    "all_nan": ("error", "no finite voxel"),
    "some_inf": ("warn", "3 of 4096 voxels are NaN or +-Inf"),
    "smaller_than_crop": ("kept", None),
}
DATALISTS = {
    "not_json": "is not valid JSON",
    "missing_keys": "[2]: entry is not an object with an 'image' path",
    "missing_file": "file not found",
}
CHECKPOINTS = {
    "missing": "Checkpoint file not found",
    "text": "it is a text file",
    "other_architecture": "does not fit student.arch/heads",
    "backbone_without_heads": "has no dino_head",
}


def argv(run: Path, datalist: Path, *overrides: str, flags: tuple[str, ...] = ()) -> list[str]:
    # train3d parses with parse_args: key=value overrides must come after every flag
    return ["--config-file", str(TINY_CONFIG), "--output-dir", str(run), "--cache-dir", str(run.parent / "cache"),
            *flags, f"train.datalist={datalist}", "train.max_iterations=1", "train.num_workers=0", *overrides]


def pretrain_datalist(bad, folder: Path, *extra) -> Path:
    """Two good volumes, then ``extra`` entries (paths, or raw entries)."""
    entries = [{"image": str(bad.good(folder / f"good{i}.nii.gz", seed=i))} for i in range(2)]
    entries += [e if isinstance(e, dict) else {"image": str(e)} for e in extra]
    return bad.write_json(folder / "pretrain.json", entries)


@pytest.fixture()
def stop_after_preflight(monkeypatch, bad):
    """Run only up to the pre-flight: the entries it kept, then :class:`PreflightPassed`."""
    kept: list[dict] = []
    original = train3d._checked_inputs

    def checked_then_stop(*args, **kwargs):
        kept.extend(original(*args, **kwargs))
        raise bad.PreflightPassed

    monkeypatch.setattr(train3d, "_checked_inputs", checked_then_stop)
    return kept


def test_the_table_covers_every_image_kind(bad):
    assert set(IMAGES) == set(bad.IMAGE_KINDS)


@pytest.mark.parametrize("kind", list(IMAGES))
def test_image_kind(kind, tmp_path, bad, user_error, capsys, request):
    outcome, words = IMAGES[kind]
    image = bad.IMAGE_KINDS[kind](tmp_path / "data" / f"{kind}.nii.gz")
    datalist = pretrain_datalist(bad, tmp_path / "data", image)
    run = tmp_path / "run"
    if outcome == "error":
        line = user_error(train3d.main(argv(run, datalist)), datalist, image, "--skip-bad-inputs",
                          outputs_in=(run, RUN_OUTPUTS))
        assert words in line and "[2]" in line and "good0" not in line, line
        assert str(image) in (run / "log.txt").read_text()  # the run's log keeps the error too
        return
    request.getfixturevalue("fresh_nonfinite_warnings")
    kept = request.getfixturevalue("stop_after_preflight")
    with pytest.raises(bad.PreflightPassed):
        train3d.main(argv(run, datalist))
    assert [e["image"] for e in kept][-1] == str(image)
    assert bad.outputs(run, RUN_OUTPUTS) == []
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ERROR" not in err
    # dinov2's records go to stderr and log.txt during a run (not to the root logger caplog reads)
    warned = [line for line in (run / "log.txt").read_text().splitlines() if "WARNING" in line and str(image) in line]
    assert len(warned) == (1 if outcome == "warn" else 0), warned
    if words:
        assert words in warned[0]


@pytest.mark.parametrize("kind", list(DATALISTS))
def test_datalist_kind(kind, tmp_path, bad, user_error):
    folder = tmp_path / "data"
    named = []
    if kind == "not_json":
        datalist = bad.not_json(folder / "pretrain.json")
    elif kind == "missing_keys":
        datalist = pretrain_datalist(bad, folder, {"path": str(bad.good(folder / "c.nii.gz"))})  # "image" misspelt
    else:
        named = [folder / "gone.nii.gz"]
        datalist = pretrain_datalist(bad, folder, *named)
    run = tmp_path / "run"
    line = user_error(train3d.main(argv(run, datalist)), datalist, *named, outputs_in=(run, RUN_OUTPUTS))
    assert DATALISTS[kind] in line, line


@pytest.fixture(scope="module")
def other_teachers(tmp_path_factory):
    """Teacher exports the tiny run cannot start from: patch size 16 instead of 8; a backbone alone."""
    from omegaconf import OmegaConf

    from dinov2.checkpoints.teacher_export import save_teacher_checkpoint
    from dinov2.train.ssl_meta_arch import SSLMetaArch
    from dinov2.utils.config import merge_configs, packaged_config_path

    folder = tmp_path_factory.mktemp("teachers")
    cfg = merge_configs(OmegaConf.load(packaged_config_path("ssl3d_default_config")), TINY_CONFIG,
                        ["train.datalist=unused.json", "student.patch_size=16"])
    teacher = SSLMetaArch(cfg).teacher.state_dict()
    config = OmegaConf.to_container(cfg)
    patch16 = save_teacher_checkpoint(folder / "patch16" / "teacher_checkpoint.pth", teacher, config, 0)
    backbone = {k: v for k, v in teacher.items() if k.startswith("backbone.")}
    alone = save_teacher_checkpoint(folder / "backbone" / "teacher_checkpoint.pth", backbone, config, 0)
    return {"other_architecture": patch16, "backbone_without_heads": alone}


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_checkpoint_kind(kind, tmp_path, bad, user_error, request):
    if kind == "missing":
        weights = tmp_path / "nowhere" / "teacher_checkpoint.pth"
    elif kind == "text":
        weights = bad.text_file(tmp_path / "teacher_checkpoint.pth")
    else:
        weights = request.getfixturevalue("other_teachers")[kind]
    datalist = pretrain_datalist(bad, tmp_path / "data")
    run = tmp_path / "run"
    code = train3d.main(argv(run, datalist, f"student.pretrained_weights={weights}"))
    line = user_error(code, weights, outputs_in=(run, RUN_OUTPUTS))
    assert CHECKPOINTS[kind] in line, line


def test_skip_bad_inputs_trains_on_the_others_and_lists_the_skipped(tmp_path, bad, capsys):
    """One iteration on a 6^3 volume, a 4D series and partial +-Inf; the truncated file left out."""
    folder = tmp_path / "data"
    cut = bad.truncated(folder / "cut.nii.gz")
    tolerated = [bad.small(folder / "small.nii.gz"), bad.four_d(folder / "series.nii.gz"),
                 bad.some_inf(folder / "inf.nii.gz")]
    datalist = bad.write_json(folder / "pretrain.json", [{"image": str(p)} for p in [cut, *tolerated]])
    run = tmp_path / "run"
    assert train3d.main(argv(run, datalist, "train.batch_size_per_gpu=3", flags=("--skip-bad-inputs",))) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ERROR" not in err
    with open(run / "skipped.tsv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [(r["path"], r["where"]) for r in rows] == [(str(cut), "[0]")] and "truncated" in rows[0]["reason"]
    log = (run / "log.txt").read_text()
    assert f"Skipped [0] {cut}" in log and "1 of 4 entries left out" in log
    assert bad.outputs(run, ["teacher_checkpoint.pth"]) == ["eval/training_1/teacher_checkpoint.pth"]
    assert len(bad.outputs(run / "checkpoints", ["model_*.pth"])) == 1
