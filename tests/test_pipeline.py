import json
import os
import re

import numpy as np
import pytest

from medseg_jax.data import cache
from medseg_jax.data import dataset as dataset_lib
from medseg_jax import fileio
from medseg_jax.data import loader
from medseg_jax.data import preprocess


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from conftest import tiny_config

    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config()
    dataset, plans, samples = cache.prepare(config, workdir)
    return config, workdir, dataset, plans, samples


def test_split_is_by_case_seeded_and_persisted(prepared):
    config, workdir, dataset, _, _ = prepared
    splits = dataset.splits
    all_keys = [k for s in dataset_lib.SPLITS for k in splits[s]]
    assert len(all_keys) == len(set(all_keys)) == len(dataset.refs)
    tasks = {k.split("/")[0] for k in splits["test"]}
    assert len(tasks) == 3  # every synthetic modality reaches the test split
    with open(os.path.join(workdir, "splits.json")) as f:
        assert json.load(f) == splits
    again = dataset_lib.make_splits(dataset.infos, tuple(config.data.split_fractions), config.seed)
    assert again == splits
    other = dataset_lib.make_splits(dataset.infos, tuple(config.data.split_fractions), 1)
    assert other != splits


def test_user_splits_file_is_checked(prepared, tmp_path):
    config, _, dataset, _, _ = prepared
    keys = sorted(dataset.refs)
    bad = tmp_path / "splits.json"
    bad.write_text(json.dumps({"train": keys[:2], "val": [keys[1]], "test": []}))
    config = config.copy_and_resolve_references()
    config.data.splits_file = str(bad)
    with pytest.raises(ValueError, match="in both 'train' and 'val'"):
        dataset_lib.open_dataset(config, str(tmp_path / "w"))
    bad.write_text(json.dumps({"train": ["nope/x"], "val": keys[:1]}))
    with pytest.raises(ValueError, match="'nope/x'.*not in the data"):
        dataset_lib.open_dataset(config, str(tmp_path / "w"))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="splits.json: not valid JSON .*config.data.splits_file.*fix the file"):
        dataset_lib.open_dataset(config, str(tmp_path / "w"))


def test_samples_cached_and_reused(prepared):
    config, workdir, dataset, plans, samples = prepared
    train = samples["train"]
    assert train.images.shape[1:] == (16, 16, 1) and train.images.dtype == np.float32
    assert len(train) == len(train.labels) == len(train.case_index)
    assert train.foreground.any()
    intensity = plans["intensity"]
    assert intensity["SynthCT"][0]["scheme"] == "ct" and intensity["SynthMRI"][0]["scheme"] == "zscore"
    assert plans["target_spacing"] is None  # 2D models resize slices instead
    mtime = os.path.getmtime(os.path.join(train.directory, "train_images.npy"))
    _, _, again = cache.prepare(config, workdir)
    assert again["train"].directory == train.directory
    assert os.path.getmtime(os.path.join(train.directory, "train_images.npy")) == mtime


def test_epoch_order_deterministic_with_foreground_share(prepared):
    _, _, _, _, samples = prepared
    train = samples["train"]
    a = loader.epoch_indices(train, 8, 5, seed=0, epoch=3, foreground_fraction=0.5)
    b = loader.epoch_indices(train, 8, 5, seed=0, epoch=3, foreground_fraction=0.5)
    c = loader.epoch_indices(train, 8, 5, seed=0, epoch=4, foreground_fraction=0.5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (5, 8)
    assert train.foreground[a[:, :4]].all()


def test_process_shards_make_up_the_global_batch(prepared):
    _, _, _, _, samples = prepared
    train = samples["train"]
    order = loader.epoch_indices(train, 8, 3, seed=0, epoch=0, foreground_fraction=0.0)
    full = list(loader.train_batches(train, order, 0, 1))
    parts = [list(loader.train_batches(train, order, p, 2)) for p in range(2)]
    assert len(full) == 3
    for step in range(3):
        joined = np.concatenate([parts[0][step]["image"], parts[1][step]["image"]])
        np.testing.assert_array_equal(joined, full[step]["image"])
        np.testing.assert_array_equal(full[step]["label"], train.labels[order[step]])


def test_padded_batches_mask_the_padding():
    images = np.arange(10, dtype=np.float32).reshape(10, 1)
    batches = list(loader.padded_batches(images, None, 4))
    assert [b["image"].shape[0] for b in batches] == [4, 4, 4]
    np.testing.assert_array_equal(batches[-1]["mask"], [1, 1, 0, 0])
    assert sum(b["mask"].sum() for b in batches) == 10


def test_a_validation_subset_is_evenly_spaced_and_padded():
    assert loader.evenly_spaced(10, 0) is None and loader.evenly_spaced(10, 10) is None
    np.testing.assert_array_equal(loader.evenly_spaced(10, 4), [0, 2, 5, 7])
    np.testing.assert_array_equal(loader.evenly_spaced(8832, 2048)[-3:], [8819, 8823, 8827])
    assert len(np.unique(loader.evenly_spaced(8832, 2048))) == 2048
    images = np.arange(10, dtype=np.float32).reshape(10, 1)
    batches = list(loader.padded_batches(images, None, 3, indices=loader.evenly_spaced(10, 4)))
    np.testing.assert_array_equal(np.concatenate([b["image"][:, 0] for b in batches]),
                                  [0, 2, 5, 7, 0, 0])
    np.testing.assert_array_equal(batches[-1]["mask"], [1, 0, 0])


def test_missing_root_is_named(tmp_path):
    from conftest import tiny_config

    config = tiny_config(**{"data.root": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="nowhere is not a directory"):
        dataset_lib.open_dataset(config, str(tmp_path / "w"))


def test_worker_processes_give_the_same_batches(prepared):
    _, _, _, _, samples = prepared
    train = samples["train"]
    order = loader.epoch_indices(train, 8, 3, seed=0, epoch=1, foreground_fraction=0.3)
    inline = list(loader.train_batches(train, order, 0, 1, num_workers=0))
    workers = list(loader.train_batches(train, order, 0, 1, num_workers=2))
    assert len(workers) == len(inline) == 3
    for a, b in zip(inline, workers):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_3d_patches_centred_on_foreground(tmp_path):
    from conftest import tiny_config

    config = tiny_config(**{"model.spatial_dims": 3, "data.image_size": (8, 8, 8)})
    dataset, plans, samples = cache.prepare(config, str(tmp_path))
    volumes = samples["train"]
    assert isinstance(volumes, cache.Volumes) and len(volumes) == len(dataset.splits["train"])
    assert len(plans["target_spacing"]) == 3
    records = loader.patch_records(volumes, 8, 3, seed=0, epoch=0, foreground_fraction=0.5)
    again = loader.patch_records(volumes, 8, 3, seed=0, epoch=0, foreground_fraction=0.5)
    np.testing.assert_array_equal(records, again)
    batches = list(loader.patch_batches(volumes, records, (8, 8, 8), 0, 1))
    assert len(batches) == 3
    assert batches[0]["image"].shape == (8, 8, 8, 8, 1) and batches[0]["label"].shape == (8, 8, 8, 8)
    for rec, b in zip(records, batches):  # the first half is centred on labelled voxels
        has_fg = np.array([len(volumes.case(int(c))[2]) > 0 for c in rec[:4, 0]])
        assert has_fg.any()
        np.testing.assert_array_equal(b["label"][:4].reshape(4, -1).max(axis=1) > 0, has_fg)
    # Validation tiles cover each resampled volume exactly once.
    val = samples["val"]
    assert val.images.shape[1:] == (8, 8, 8, 1)


def test_rescale_01_reaches_the_cached_samples(tmp_path):
    from conftest import tiny_config

    _, _, samples = cache.prepare(tiny_config(**{"data.rescale_01": True}), str(tmp_path))
    images = np.asarray(samples["train"].images)
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_cache_key_follows_what_dataset_json_decides(tmp_path):
    """The cached arrays depend on dataset.json (modalities: CT or z-score; labels;
    partial labels): editing it gives another cache entry, not the stale one."""
    import dataclasses

    from conftest import tiny_config

    config, workdir = tiny_config(), str(tmp_path)
    dataset = dataset_lib.open_dataset(config, workdir)
    key = cache._fingerprint(config, dataset)
    assert cache._fingerprint(config, dataset) == key  # stable
    info = dataset.infos[0]
    ct = dataclasses.replace(info, modalities=("CT",) * len(info.modalities))
    assert cache._fingerprint(config, dataclasses.replace(
        dataset, infos=[ct, *dataset.infos[1:]])) != key
    first = dataset.splits["train"][0]
    ref, owner = dataset.refs[first]
    partial = {**dataset.refs, first: (dataclasses.replace(ref, annotated=(1,)), owner)}
    assert cache._fingerprint(config, dataclasses.replace(dataset, refs=partial)) != key


def test_cache_key_follows_the_data_files(tmp_path):
    """Unchanged data: the same cache entry, not rebuilt. One voxel of one training image
    changed (the file keeps its size): another entry, preprocessed from the new data."""
    import nibabel as nib

    from conftest import tiny_config

    from medseg_jax.data import synthetic

    roots = synthetic.make_synthetic(str(tmp_path / "data"), seed=0, num_cases=4, size=16,
                                     depth=4)
    config, workdir = tiny_config(**{"data.root": ",".join(roots)}), str(tmp_path / "run")
    dataset, _, samples = cache.prepare(config, workdir)
    first = samples["train"].directory
    images = os.path.join(first, "train_images.npy")
    before, mtime = np.load(images), os.path.getmtime(images)
    _, _, again = cache.prepare(config, workdir)  # the data as they were
    assert again["train"].directory == first and os.path.getmtime(images) == mtime

    ref, _ = dataset.refs[dataset.splits["train"][0]]
    path = ref.image_paths[0]
    size, image = os.path.getsize(path), nib.load(path)
    original = np.asarray(image.dataobj)
    for i in range(original.size):  # a voxel whose change keeps the gzip size
        data = original.copy()
        data.flat[i] += 1
        nib.save(nib.Nifti1Image(data, image.affine, image.header), path)
        if os.path.getsize(path) == size:
            break
    assert os.path.getsize(path) == size
    _, _, changed = cache.prepare(config, workdir)
    second = changed["train"].directory
    assert second != first and sorted(os.listdir(os.path.dirname(first))) == sorted(
        os.path.basename(d) for d in (first, second))
    assert not np.array_equal(np.load(os.path.join(second, "train_images.npy")), before)
    np.testing.assert_array_equal(np.load(images), before)  # the old entry untouched


def test_cache_finished_by_another_process_is_kept(tmp_path, monkeypatch):
    import shutil

    from conftest import tiny_config

    config, workdir = tiny_config(), str(tmp_path)
    dataset = dataset_lib.open_dataset(config, workdir)
    final = os.path.join(workdir, "cache", cache._fingerprint(config, dataset))
    real = fileio.write_json_atomic

    def racing(path, obj):  # another process completes the same cache just before us
        real(path, obj)
        if path.endswith("manifest.json") and ".tmp_" in path:  # its last file
            shutil.copytree(os.path.dirname(path), final)
            with open(os.path.join(final, "theirs"), "w") as f:
                f.write("x")

    monkeypatch.setattr(fileio, "write_json_atomic", racing)
    _, _, samples = cache.prepare(config, workdir, dataset)
    assert samples["train"].directory == final
    assert os.path.exists(os.path.join(final, "theirs"))  # theirs kept, not replaced
    leftovers = [d for d in os.listdir(os.path.join(workdir, "cache")) if d.startswith(".tmp_")]
    assert leftovers == []


def test_2d_patches_of_resampled_slices(tmp_path):
    """data.in_plane='spacing': 2D inputs are one-slice patches of the resampled cases
    (3D volumes) or patches of the resampled images (2D ultrasound)."""
    from conftest import tiny_config

    config = tiny_config(**{"data.in_plane": "spacing", "data.image_size": (8, 8)})
    dataset, plans, samples = cache.prepare(config, str(tmp_path))
    volumes = samples["train"]
    assert isinstance(volumes, cache.Volumes) and len(volumes) == len(dataset.splits["train"])
    assert len(plans["target_spacing"]) == 2
    ndims = {len(s) for s in volumes.shapes}
    assert ndims == {2, 3}  # the synthetic set holds 2D ultrasound and 3D volumes
    # A 3D case keeps its own number of slices; its in-plane grid follows the target.
    key = next(k for k in dataset.splits["train"] if not dataset.refs[k][1].is_2d)
    case = dataset.load(key)
    i = dataset.splits["train"].index(key)
    assert volumes.shapes[i][2] == case.label.shape[2]
    expected = sum(np.prod(s) for s in volumes.shapes) / (8 * 8)  # 8x8 or 8x8x1 inputs
    assert volumes.patches_per_pass((8, 8), 2) == int(expected)

    records = loader.patch_records(volumes, 8, 4, seed=0, epoch=0, foreground_fraction=0.5)
    batches = list(loader.patch_batches(volumes, records, (8, 8), 0, 1, slice_axis=2))
    assert len(batches) == 4
    for rec, b in zip(records, batches):
        assert b["image"].shape == (8, 8, 8, 1) and b["label"].shape == (8, 8, 8)
        has_fg = np.array([len(volumes.case(int(c))[2]) > 0 for c in rec[:4, 0]])
        np.testing.assert_array_equal(b["label"][:4].reshape(4, -1).max(axis=1) > 0, has_fg)
    # Validation tiles: every resampled voxel once (label counts add up).
    val = samples["val"]
    assert val.images.shape[1:] == (8, 8, 1)
    total = 0
    for key in dataset.splits["val"]:
        _, label = preprocess.case_volume(dataset.load(key), plans, config)
        total += int((label > 0).sum())
    assert int((np.asarray(val.labels) > 0).sum()) == total


@pytest.mark.parametrize("dims, given, expected", [
    (2, (0.5, 0.5, 2.0), [0.5, 0.5]),  # slice-axis entry dropped
    (2, (0.5, 0.7), [0.5, 0.7]),
    (3, (0.5, 0.5, 2.0), [0.5, 0.5, 2.0]),
    (3, (0.5, 0.5), "must be three positive numbers (mm)"),
    (2, (0.5,), "must be two (in plane) or three positive numbers (mm)"),
    (2, (0.5, 0.0), "must be two (in plane) or three positive numbers (mm)"),
])
def test_target_spacing_config(prepared, dims, given, expected):
    config, _, dataset, _, _ = prepared
    config = config.copy_and_resolve_references()
    config.model.spatial_dims = dims
    config.data.target_spacing = given
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=r"config\.data\.target_spacing: .*" + re.escape(expected)):
            cache.target_spacing(config, dataset)
    else:
        assert cache.target_spacing(config, dataset) == expected


@pytest.mark.parametrize("in_plane", ["resize", "spacing"])
def test_one_pipeline_for_the_run_equals_epoch_by_epoch(tmp_path, in_plane):
    """run_batches spans epochs (grain workers start once) and gives exactly the batches
    of each epoch's own order, also from a mid-epoch start and with worker processes."""
    from conftest import tiny_config

    config = tiny_config(**{"data.in_plane": in_plane, "data.image_size": (8, 8),
                            "train.num_epochs": 3})
    _, _, samples = cache.prepare(config, str(tmp_path))
    train, steps = samples["train"], 2
    fg = config.data.foreground_fraction

    def epoch(e):  # each epoch on its own, from its order (what training used to iterate)
        if in_plane == "spacing":
            records = loader.patch_records(train, 8, steps, config.seed, e, fg)
            return loader.patch_batches(train, records, (8, 8), 0, 1, slice_axis=2)
        return loader.train_batches(
            train, loader.epoch_indices(train, 8, steps, config.seed, e, fg), 0, 1)

    per_epoch = [b for e in range(3) for b in epoch(e)]
    run = loader.run_batches(train, config, steps)
    whole = list(run)
    run.close()
    config.data.num_workers = 2
    resumed = loader.run_batches(train, config, steps, first=3)
    from_step_3 = list(resumed)
    resumed.close()
    assert len(per_epoch) == len(whole) == 6 and len(from_step_3) == 3
    for a, b in zip(per_epoch, whole):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    for a, b in zip(per_epoch[3:], from_step_3):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(per_epoch[0]["image"], per_epoch[2]["image"])  # epochs differ


def test_normalisation_and_spacing_are_fitted_on_training_cases_only(tmp_path, monkeypatch):
    """CT statistics and the median spacing come from the training split: a leak of the
    validation or test cases into either would change them, and is caught."""
    from conftest import tiny_config

    config = tiny_config(**{"model.spatial_dims": 3, "data.image_size": (8, 8, 4),
                            "model.depth": 2})
    workdir = str(tmp_path)
    dataset = dataset_lib.open_dataset(config, workdir)
    loaded = []
    real = dataset_lib.Dataset.load

    def spy(self, key):
        loaded.append(key)
        return real(self, key)

    monkeypatch.setattr(dataset_lib.Dataset, "load", spy)
    plans = cache.intensity_plans(dataset)
    assert loaded and set(loaded) <= set(dataset.splits["train"])
    assert any(p["scheme"] == "ct" for p in plans["SynthCT"])
    # The spacing: make every non-training case 10x coarser; the median must not move.
    spacing = cache.target_spacing(config, dataset)
    real_spacing = cache.canonical_spacing

    def coarse_outside_train(path):
        held_out = any(path in dataset.refs[k][0].image_paths
                       for s in ("val", "test") for k in dataset.splits[s])
        return tuple(10 * x for x in real_spacing(path)) if held_out else real_spacing(path)

    monkeypatch.setattr(cache, "canonical_spacing", coarse_outside_train)
    assert cache.target_spacing(config, dataset) == spacing
