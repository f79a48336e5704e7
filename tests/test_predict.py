"""Prediction to NIfTI: geometry of the written files, reoriented inputs, bad inputs, TTA."""

import os
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
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary file left

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


def test_unreadable_inputs_are_named_and_skipped(trained, tmp_path):
    config, workdir = trained
    names = sorted(os.listdir(_inputs(workdir)))[:2]
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    for name in names:
        shutil.copy(_inputs(workdir) / name, folder / name)
    raw = (_inputs(workdir) / names[0]).read_bytes()
    (folder / "broken.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated download
    (out / "broken.nii.gz").write_bytes(b"earlier result")  # must survive untouched
    (out / names[0]).write_bytes(b"stale")  # replaced whole
    with pytest.raises(ValueError, match=r"1 of 3 input case\(s\).*broken.*broken\.nii\.gz"):
        predict.predict(config, str(workdir), str(folder), str(out), task="SynthMRI")
    assert (out / "broken.nii.gz").read_bytes() == b"earlier result"
    for name in names:
        assert nib.load(out / name).shape == nib.load(folder / name).shape
    assert sorted(os.listdir(out)) == sorted(names + ["broken.nii.gz"])


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
