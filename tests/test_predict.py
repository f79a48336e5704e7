"""Prediction to NIfTI: geometry of the written files, reoriented inputs, bad inputs, TTA."""

import hashlib
import json
import logging
import os
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_config

from medseg_jax import inference, predict, sharding, train
from medseg_jax.data import nifti
from medseg_jax import state as state_lib


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 2D U-Net trained on the synthetic MRI, CT and ultrasound tasks."""
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(**{"eval.figures": False})
    train.train_and_evaluate(config, str(workdir))
    return config, workdir


def _inputs(workdir, task="SynthMRI"):
    return workdir / "synthetic_data" / task / "imagesTr"


def test_predictions_keep_the_input_geometry(trained, tmp_path):
    config, workdir = trained
    out = tmp_path / "pred"
    summary = predict.predict(config, str(workdir), str(_inputs(workdir)), str(out),
                              task="SynthMRI", save_probabilities=True)
    names = sorted(os.listdir(_inputs(workdir)))
    assert sorted(os.path.basename(p) for p in summary["written"]) == names
    assert not summary["skipped"] and summary["cases_per_second"] > 0
    for name in names:
        src, dst = nib.load(_inputs(workdir) / name), nib.load(out / name)
        assert dst.shape == src.shape
        np.testing.assert_array_equal(dst.affine, src.affine)
        assert dst.header.get_sform(coded=True)[1] == src.header.get_sform(coded=True)[1]
        assert dst.header.get_qform(coded=True)[1] == src.header.get_qform(coded=True)[1]
        np.testing.assert_array_equal(dst.header.get_zooms(), src.header.get_zooms())
        assert dst.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(dst.dataobj))) <= {0, 1}
        probs = nib.load(out / name.replace(".nii.gz", "_probabilities.nii.gz"))
        assert probs.shape == src.shape + (2,)
        np.testing.assert_allclose(np.asarray(probs.dataobj).sum(-1), 1.0, atol=1e-5)
    # The manifest of what was written; no temporary file left.
    assert [f for f in os.listdir(out) if f.startswith(".")] == [predict.MANIFEST]

    # The written map is the evaluation's prediction, mapped back to the file's voxels.
    run = state_lib.restore_run(config, str(workdir))
    key = "SynthMRI/" + names[0].replace(".nii.gz", "")
    case = run.dataset.load(key)
    labels, _ = inference.predict_case(case, run.plans, config, run.state, run.predict_fn,
                                       run.mesh)
    np.testing.assert_array_equal(np.asarray(nib.load(out / names[0]).dataobj),
                                  nifti.to_original_orientation(labels, case))


def test_a_reoriented_input_gets_the_same_prediction_in_world_space(trained, tmp_path):
    config, workdir = trained
    name = sorted(os.listdir(_inputs(workdir)))[0]
    src = nib.load(_inputs(workdir) / name)
    data = np.asarray(src.dataobj)
    # The same scan stored with its first two voxel axes swapped and the first flipped (LPS-like).
    flipped = np.flip(np.transpose(data, (1, 0, 2)), axis=0)
    swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = data.shape[1] - 1
    affine = src.affine @ swap @ flip
    folder = tmp_path / "in"
    folder.mkdir()
    nib.save(nib.Nifti1Image(flipped, affine), folder / "moved.nii.gz")
    shutil.copy(_inputs(workdir) / name, folder / "plain.nii.gz")
    out = tmp_path / "out"
    predict.predict(config, str(workdir), str(folder), str(out), task="SynthMRI")
    moved, plain = nib.load(out / "moved.nii.gz"), nib.load(out / "plain.nii.gz")
    assert moved.shape == flipped.shape
    np.testing.assert_array_equal(moved.affine, nib.load(folder / "moved.nii.gz").affine)
    np.testing.assert_array_equal(np.asarray(nib.as_closest_canonical(moved).dataobj),
                                  np.asarray(nib.as_closest_canonical(plain).dataobj))
    assert np.asarray(plain.dataobj).any()  # a non-trivial map was compared


def test_2d_inputs_get_their_own_geometry_back(trained, tmp_path):
    """2D NIfTI inputs (the ultrasound task): as stored; with the axes swapped and the
    first flipped (the same image in the world), a registered sform and a scanner qform
    that differ; as (H, W, 1) with a scanner-only qform. Each prediction has its input's shape,
    affine, sform and qform with their codes, zooms and units; the same world image
    gets the same labels."""
    config, workdir = trained
    inputs = _inputs(workdir, "SynthUS")
    name = sorted(os.listdir(inputs))[0]
    src = nib.load(inputs / name)
    data = np.asarray(src.dataobj)
    assert data.ndim == 2
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(inputs / name, folder / "plain.nii.gz")
    swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = data.shape[1] - 1
    moved = nib.Nifti1Image(np.flip(data.T, axis=0), src.affine @ swap @ flip)
    scanner = moved.affine.copy()
    scanner[:3, 3] += (1.0, 2.0, 3.0)  # the scanner's qform, the registered sform
    moved.set_sform(moved.affine, 2)
    moved.set_qform(scanner, 1)
    moved.header.set_xyzt_units("mm", "sec")
    nib.save(moved, folder / "moved.nii.gz")
    shifted = src.affine.copy()
    shifted[:3, 3] += (5.0, -3.0, 2.0)
    single = nib.Nifti1Image(data[..., None], shifted)
    single.set_sform(None, 0)
    single.set_qform(shifted, 1)
    nib.save(single, folder / "single.nii.gz")
    out = tmp_path / "out"
    predict.predict(config, str(workdir), str(folder), str(out), task="SynthUS")
    for stem in ("plain", "moved", "single"):
        src, dst = nib.load(folder / f"{stem}.nii.gz"), nib.load(out / f"{stem}.nii.gz")
        assert dst.shape == src.shape, stem
        np.testing.assert_array_equal(dst.affine, src.affine, err_msg=stem)
        for got, want in ((dst.header.get_sform(coded=True), src.header.get_sform(coded=True)),
                          (dst.header.get_qform(coded=True), src.header.get_qform(coded=True))):
            assert got[1] == want[1], stem
            np.testing.assert_array_equal(got[0], want[0], err_msg=stem)
        np.testing.assert_array_equal(dst.header.get_zooms(), src.header.get_zooms())
        assert dst.header.get_xyzt_units() == src.header.get_xyzt_units(), stem
        assert dst.get_data_dtype() == np.uint8
    plain = np.asarray(nib.load(out / "plain.nii.gz").dataobj)
    np.testing.assert_array_equal(np.flip(np.asarray(nib.load(out / "moved.nii.gz").dataobj),
                                          axis=0).T, plain)
    np.testing.assert_array_equal(np.asarray(nib.load(out / "single.nii.gz").dataobj)[..., 0],
                                  plain)
    assert plain.any() and not plain.all()  # a non-trivial map was compared


def test_unreadable_inputs_are_named_and_skipped(trained, tmp_path, caplog):
    config, workdir = trained
    names = sorted(os.listdir(_inputs(workdir)))[:2]
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name in names:
        shutil.copy(_inputs(workdir) / name, folder / name)
    raw = (_inputs(workdir) / names[0]).read_bytes()
    (folder / "broken.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated download
    (folder / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.INFO):
        with pytest.raises(ValueError,
                           match=r"1 of 3 input case\(s\).*broken.*broken\.nii\.gz"):
            predict.predict(config, str(workdir), str(folder), str(out), task="SynthMRI")
    assert f"Ignored in {folder} (not .nii/.nii.gz files): notes.txt" in caplog.text
    assert "Predicted 2 of 3 case(s) (3 input file(s))" in caplog.text
    assert "; 1 skipped" in caplog.text
    for name in names:
        assert nib.load(out / name).shape == nib.load(folder / name).shape
    assert sorted(os.listdir(out)) == sorted(names + [predict.MANIFEST])
    manifest = json.loads((out / predict.MANIFEST).read_text())
    assert sorted(manifest["files"]) == names


def _probs_of(real, bad: dict):
    """``inference.ensemble_probs`` with the cases of ``bad`` given NaN probabilities
    ("nan") or raising ValueError ("raise")."""
    def probs(case, runs):
        p, n = real(case, runs)
        if bad.get(case.case_id) == "nan":
            p = p.copy()
            p[(0,) * p.ndim] = np.nan
        elif bad.get(case.case_id) == "raise":
            raise ValueError("target spacing (1.0, 1.0, 1.4) does not fit a case with "
                             "spacing (1.0, 1.0)")
        return p, n
    return probs


def test_bad_cases_are_skipped_whole_and_the_others_written(trained, tmp_path, monkeypatch):
    """A case with non-finite probabilities, one the network cannot take and a 2D image
    for a task of 3D images: each named with its reason, none of its files written (label
    map nor probabilities), every other case written, then one error."""
    config, workdir = trained
    names = sorted(os.listdir(_inputs(workdir)))
    folder, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(_inputs(workdir), folder)
    flat = sorted((workdir / "synthetic_data" / "SynthUS" / "imagesTr").iterdir())[0]
    shutil.copy(flat, folder / "flat.nii.gz")
    stems = [n.replace(".nii.gz", "") for n in names]
    monkeypatch.setattr(inference, "ensemble_probs", _probs_of(
        inference.ensemble_probs, {stems[0]: "nan", stems[1]: "raise"}))
    with pytest.raises(ValueError) as error:
        predict.predict(config, str(workdir), str(folder), str(out), task="SynthMRI",
                        save_probabilities=True)
    message = str(error.value)
    assert message.startswith(f"3 of {len(names) + 1} input case(s) were skipped")
    assert f"{stems[0]} ({names[0]}): probabilities hold NaN (1 of " in message
    assert f"{stems[1]} ({names[1]}): prediction failed: target spacing" in message
    assert "flat (flat.nii.gz): a 2D image, but the run's task SynthMRI holds 3D images" \
        in message
    kept = [s for s in stems[2:]]
    assert sorted(os.listdir(out)) == sorted(
        [predict.MANIFEST] + [f"{s}.nii.gz" for s in kept]
        + [f"{s}_probabilities.nii.gz" for s in kept])
    assert predict.finite_problem(np.full((2, 2), np.inf)) == \
        "probabilities hold infinite values (4 of 4)"
    assert predict.finite_problem(np.ones((2, 2))) is None


def test_predict_input_errors(trained, tmp_path):
    config, workdir = trained
    with pytest.raises(ValueError, match="several tasks"):
        predict.predict(config, str(workdir), str(_inputs(workdir)), str(tmp_path / "o"))
    with pytest.raises(ValueError, match="'Liver' is not a task of this run"):
        predict.predict(config, str(workdir), str(_inputs(workdir)), str(tmp_path / "o"),
                        task="Liver")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        predict.predict(config, str(workdir), str(tmp_path / "nothing"), str(tmp_path / "o"),
                        task="SynthMRI")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .nii"):
        predict.predict(config, str(workdir), str(tmp_path / "empty"), str(tmp_path / "o"),
                        task="SynthMRI")


def test_channel_files_form_one_case(tmp_path):
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b.nii", "notes.txt", ".hidden.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    found = predict.find_inputs(str(tmp_path), num_channels=2)
    assert found == [("a", (str(tmp_path / "a_0000.nii.gz"), str(tmp_path / "a_0001.nii.gz"))),
                     ("b", (str(tmp_path / "b.nii"),))]
    assert predict.find_inputs(str(tmp_path / "a_0000.nii.gz"), 1)[0][0] == "a"


def test_write_failures(trained, tmp_path, monkeypatch):
    """A case whose file cannot be written (ValueError) is skipped; a full disk (OSError)
    stops the command, naming the case; the cases before it stay written and listed."""
    import errno

    config, workdir = trained
    names = sorted(os.listdir(_inputs(workdir)))
    real = predict._write_nifti

    def write(array, reference, path):
        if path.endswith("_" + names[1]):
            raise ValueError("header field out of range")
        if path.endswith("_" + names[2]):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(array, reference, path)

    monkeypatch.setattr(predict, "_write_nifti", write)
    out = tmp_path / "out"
    with pytest.raises(OSError, match=rf"--output {out}: cannot write the files of "
                                      rf"{names[2][:-7]} \({names[2]}\) \(No space left on "
                                      r"device\); the cases before it are written"):
        predict.predict(config, str(workdir), str(_inputs(workdir)), str(out), task="SynthMRI")
    assert sorted(os.listdir(out)) == sorted([predict.MANIFEST, names[0]])
    assert list(json.loads((out / predict.MANIFEST).read_text())["files"]) == [names[0]]
    def broken(array, reference, path):
        raise ValueError("header field out of range")

    monkeypatch.setattr(predict, "_write_nifti", broken)
    with pytest.raises(ValueError, match=rf"{names[1][:-7]} \({names[1]}\): not written: "
                                         "header field out of range"):
        predict.predict(config, str(workdir), str(_inputs(workdir)), str(tmp_path / "o2"),
                        task="SynthMRI")
    assert os.listdir(tmp_path / "o2") == []


def test_clashing_case_names_stop_before_anything_is_written(tmp_path):
    for name in ("a.nii", "a.nii.gz", "b.nii.gz", "b_0000.nii.gz", "c_0000.nii",
                 "c_0000.nii.gz", "c_0001.nii.gz", "d_0000.nii.gz", "d_0001.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError) as error:
        predict.find_inputs(str(tmp_path), num_channels=1)
    assert str(error.value) == (
        f"--input {tmp_path}: a.nii and a.nii.gz both give case 'a'; b.nii.gz and "
        "b_0000.nii.gz both give case 'b'; c_0000.nii, c_0000.nii.gz and c_0001.nii.gz all "
        "give case 'c'; rename or move the extra files (nnU-Net channel files CASE_0000, "
        "CASE_0001, ... form one case CASE)")
    # A case and another's probabilities would be one file.
    cases = [("x", ("in/x.nii.gz",)), ("x_probabilities", ("in/x_probabilities.nii",))]
    assert predict.output_names(cases, False) == ["x.nii.gz", "x_probabilities.nii.gz"]
    with pytest.raises(ValueError, match="x.nii.gz and x_probabilities.nii would both be "
                                         "written to x_probabilities.nii.gz"):
        predict.output_names(cases, True)


def test_output_folders_that_are_refused(tmp_path):
    """The input folder, a data set folder (symlinks resolved), a data root, the workdir
    and its checkpoints, or a folder inside one: refused before anything is read."""
    from medseg_jax.data import synthetic

    roots = synthetic.make_synthetic(str(tmp_path / "data"), num_cases=2, size=16, depth=4)
    task = next(r for r in roots if r.endswith("SynthMRI"))
    plain = tmp_path / "plain_root"  # a data root without dataset.json
    plain.mkdir()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.nii.gz").write_bytes(b"")
    (tmp_path / "link").symlink_to(os.path.join(task, "labelsTr"))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = tiny_config(**{"data.root": f"{task},{plain}"})
    refused = {
        tmp_path / "in": "is the input folder",
        tmp_path / "in" / "pred": "lies inside the input folder",
        os.path.join(task, "labelsTr"): f"lies inside the data set folder {task} (it holds "
                                        "dataset.json, imagesTr, labelsTr",
        task: f"is the data set folder {task}",
        os.path.join(task, "new", "pred"): "lies inside the data set folder",
        tmp_path / "link" / "pred": "lies inside the data set folder",
        plain: f"is the run's data root {plain}",
        plain / "pred": f"lies inside the run's data root {plain}",
        run: f"is the run's workdir {run}",
        run / "checkpoints" / "p": f"lies inside the checkpoints of the run {run}",
    }
    for output, expected in refused.items():
        for source in (tmp_path / "in", tmp_path / "in" / "x.nii.gz"):
            with pytest.raises(ValueError, match=re.escape(f"--output {output}: {expected}")):
                predict.check_output_location(str(output), str(source), config, str(run))
    for output in (run / "predictions", tmp_path / "pred"):
        predict.check_output_location(str(output), str(tmp_path / "in"), config, str(run))
    assert not (tmp_path / "pred").exists() and not (run / "predictions").exists()


def test_predict_replaces_only_its_own_unchanged_files(trained, tmp_path):
    config, workdir = trained
    names = sorted(os.listdir(_inputs(workdir)))
    first, rest = tmp_path / "first", tmp_path / "rest"
    first.mkdir()
    rest.mkdir()
    shutil.copy(_inputs(workdir) / names[0], first / names[0])
    for name in names[1:]:
        shutil.copy(_inputs(workdir) / name, rest / name)
    out = tmp_path / "out"
    predict.predict(config, str(workdir), str(first), str(out), task="SynthMRI")
    # Other cases into the same folder: nothing to replace, the manifest lists them all.
    predict.predict(config, str(workdir), str(rest), str(out), task="SynthMRI")
    manifest = json.loads((out / predict.MANIFEST).read_text())
    assert sorted(manifest["files"]) == names
    entry = manifest["files"][names[0]]
    assert entry["sha256"] == hashlib.sha256((out / names[0]).read_bytes()).hexdigest()
    assert entry["case"] == names[0].replace(".nii.gz", "")
    assert entry["inputs"] == [str(first / names[0])] and entry["step"] > 0

    def contents():
        return {p.name: p.read_bytes() for p in out.iterdir()}

    before = contents()
    with pytest.raises(ValueError, match=rf"would replace 1 file\(s\) an earlier predict "
                                         rf"wrote \({names[0]}\); pass --overwrite"):
        predict.predict(config, str(workdir), str(first), str(out), task="SynthMRI")
    assert contents() == before
    inode = (out / names[0]).stat().st_ino
    predict.predict(config, str(workdir), str(first), str(out), task="SynthMRI",
                    overwrite=True)
    assert (out / names[0]).stat().st_ino != inode  # replaced (by a rename)
    assert contents()[names[0]] == before[names[0]]  # with the same prediction

    # A file the user changed is never replaced, nor is one they added.
    with open(out / names[0], "ab") as f:
        f.write(b"edited")
    before = contents()
    with pytest.raises(ValueError, match=rf"{out / names[0]}: changed .*--overwrite replaces "
                                         "only predict's own files unchanged since"):
        predict.predict(config, str(workdir), str(first), str(out), task="SynthMRI",
                        overwrite=True)
    assert contents() == before
    (out / names[0]).unlink()
    (out / "notes.txt").write_text("mine")
    before = contents()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"holds 1 file\(s\) that predict did not write "
                                             rf"\(not in its \{predict.MANIFEST}\): notes.txt"):
            predict.predict(config, str(workdir), str(first), str(out), task="SynthMRI",
                            overwrite=overwrite)
    assert contents() == before


def test_output_folder_checks_without_a_run(tmp_path):
    """Foreign or damaged folders are refused by OutputFolder.check (before the run is
    restored); a file that appears after the check is not replaced."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "scan.nii.gz").write_bytes(b"mine")
    with pytest.raises(ValueError, match=r"the folder holds 1 file\(s\) predict did not "
                                         r"write \(scan.nii.gz\)"):
        predict.OutputFolder(str(foreign), overwrite=True).check()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        predict.OutputFolder(str(tmp_path / "file")).check()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / predict.MANIFEST).write_text('{"files": []}')
    with pytest.raises(ValueError, match="not a record written by predict"):
        predict.OutputFolder(str(damaged)).check()
    (damaged / predict.MANIFEST).write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        predict.OutputFolder(str(damaged)).check()

    out = tmp_path / "out"
    folder = predict.OutputFolder(str(out))
    folder.check()
    out.mkdir()
    (out / "late.nii.gz").write_bytes(b"appeared meanwhile")
    image = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4))
    with pytest.raises(ValueError, match="late.nii.gz: is not in"):
        folder.write_case({"late.nii.gz": (np.ones((2, 2, 2), np.uint8), image)}, {})
    assert (out / "late.nii.gz").read_bytes() == b"appeared meanwhile"
    assert sorted(os.listdir(out)) == ["late.nii.gz"]  # no manifest, no temporary file
    folder.write_case({"a.nii.gz": (np.ones((2, 2, 2), np.uint8), image),
                       "a_probabilities.nii.gz": (np.ones((2, 2, 2), np.float32), image)},
                      {"case": "a"})
    files = json.loads((out / predict.MANIFEST).read_text())["files"]
    assert sorted(files) == ["a.nii.gz", "a_probabilities.nii.gz"]


def test_flip_tta_is_equivariant(trained):
    config, workdir = trained
    run = state_lib.restore_run(config, str(workdir))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, *config.data.image_size, 1)).astype(np.float32)
    xf = np.ascontiguousarray(x[:, ::-1])
    mesh = sharding.make_mesh()
    tta_config = tiny_config(**{"eval.tta": True})
    assert len(state_lib.flip_axes(2)) == 4 and len(state_lib.flip_axes(3)) == 8
    for cfg, equivariant in ((config, False), (tta_config, True)):
        fn = state_lib.make_predict_fn(cfg, mesh)
        p = np.asarray(fn(run.state, sharding.to_global({"image": x}, mesh)["image"]))
        pf = np.asarray(fn(run.state, sharding.to_global({"image": xf}, mesh)["image"]))
        close = np.allclose(pf, p[:, ::-1], atol=1e-5)
        assert close == equivariant
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)


def test_run_config_is_the_runs_own_config_from_any_directory(trained, tmp_path, monkeypatch):
    """configs/run.py:WORKDIR: a run's config.json as a config (what evaluating or
    predicting with one of a study's runs needs), path fields as the run resolved them."""
    import json
    import runpy

    from medseg_jax import evaluate
    from medseg_jax import workdir as workdir_lib

    config, workdir = trained
    get_config = runpy.run_path(
        os.path.join(os.path.dirname(__file__), "..", "configs", "run.py"))["get_config"]
    monkeypatch.chdir(tmp_path)  # another working directory than the run's
    recorded = get_config(str(workdir))
    sections = ("model", "data", "train", "eval", "augment")
    assert workdir_lib.config_differences(workdir_lib.config_json(config),
                                          workdir_lib.config_json(recorded), sections) == []
    results = evaluate.evaluate(recorded, str(workdir), split="test")
    saved = json.load(open(workdir / "test_metrics.json"))
    assert json.dumps(results["aggregate"], sort_keys=True) == json.dumps(saved["aggregate"],
                                                                          sort_keys=True)

    # A field added to the package after the run takes its default.
    older = tmp_path / "older"
    older.mkdir()
    content = json.load(open(workdir / "config.json"))
    del content["eval"]["sw_window"]
    # A relative data.root reads as the folder the run resolved it to (config.json "paths").
    content["data"]["root"], content["paths"] = "data/X", {"data.root": "/somewhere/data/X"}
    (older / "config.json").write_text(json.dumps(content))
    assert get_config(str(older)).eval.sw_window == "patch"
    assert get_config(str(older)).data.root == "/somewhere/data/X"

    # Not a run's workdir, or a damaged config.json: one line naming the file.
    for folder, text, expected in [("none", None, "config.json: not found"),
                                   ("bad", "{", "config.json: not valid JSON"),
                                   ("other", "{\"a\": 1}", "not a config record"),
                                   ("list", "[1]", "not a JSON object"),
                                   ("paths", json.dumps(dict(content, paths=[1])),
                                    "'paths' is not a section"),
                                   ("data", json.dumps(dict(content, data=3)),
                                    "'data' is not a section")]:
        (tmp_path / folder).mkdir()
        if text is not None:
            (tmp_path / folder / "config.json").write_text(text)
        with pytest.raises(ValueError, match=expected) as error:
            get_config(str(tmp_path / folder))
        assert "\n" not in str(error.value) and str(tmp_path / folder) in str(error.value)
    with pytest.raises(ValueError, match="needs the run's workdir"):
        get_config()


def test_a_cropped_case_is_predicted_in_its_full_geometry(tmp_path):
    """data.crop_nonzero: the network sees the non-zero box; the written map has the
    input's shape and affine, background outside the box, and inside it the prediction
    of the same image without the zero border."""
    config = tiny_config(**{"eval.figures": False, "data.crop_nonzero": True,
                            "data.resampling": "nnunet"})
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    src = nib.load(sorted(_inputs(workdir).glob("*.nii.gz"))[0])
    data = np.asarray(src.dataobj)
    data = np.where(data == 0, 1, data).astype(data.dtype)  # non-zero: its box is the grid
    folder = tmp_path / "inputs"
    folder.mkdir()
    nib.save(nib.Nifti1Image(data, src.affine, src.header), folder / "plain.nii.gz")
    border = ((3, 2), (1, 4), (1, 1))
    shift = src.affine.copy()
    shift[:3, 3] -= src.affine[:3, :3] @ np.array([b[0] for b in border], float)
    nib.save(nib.Nifti1Image(np.pad(data, border), shift, src.header),
             folder / "padded.nii.gz")
    out = tmp_path / "pred"
    summary = predict.predict(config, str(workdir), str(folder), str(out), task="SynthMRI")
    assert not summary["skipped"]
    plain, padded = nib.load(out / "plain.nii.gz"), nib.load(out / "padded.nii.gz")
    assert padded.shape == tuple(n + a + b for n, (a, b) in zip(data.shape, border))
    np.testing.assert_array_equal(padded.affine, nib.load(folder / "padded.nii.gz").affine)
    labels = np.asarray(padded.dataobj)
    inner = tuple(slice(a, a + n) for n, (a, _) in zip(data.shape, border))
    np.testing.assert_array_equal(labels[inner], np.asarray(plain.dataobj))
    labels[inner] = 0
    assert not labels.any()  # background outside the box
