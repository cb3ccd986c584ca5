"""mipnerf360.prepare: validation, downsampled images, manifest (read by training)."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from mipnerf360 import cli, configs, datasets, io, prepare, synthetic, train
from mipnerf360.errors import UserError


def run(src, manifest, dataset_type, factor=0, overrides=(), preset=None):
    """prepare.prepare with the config `mipnerf360 prepare` builds from these arguments."""
    cfg = prepare.prepare_config(preset, None, overrides, dataset_type, factor)
    return prepare.prepare(src, manifest, cfg)


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Our cache folder (downsampled images) in a temporary folder, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIPNERF360_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    sizes = {"360": (16, 32, 24), "llff": (10, 32, 24), "blender": (10, 32, 32)}
    for kind, (views, w, h) in sizes.items():
        synthetic.generate(root / kind, kind, views, w, h, 0, (2,))
    return root


def snapshot(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    "kind,dataset_type,factor",
    [("360", "colmap", 4), ("llff", "llff", 2), ("blender", "blender", 0)],
)
def test_manifest_matches_the_loader_and_training_check(
    scenes, tmp_path, kind, dataset_type, factor
):
    src = scenes / kind
    before = snapshot(src)
    manifest_path = tmp_path / "prep" / "manifest.json"
    assert (
        prepare.main(
            [str(src), str(manifest_path), "--dataset-type", dataset_type, "--factor", str(factor)]
        )
        == 0
    )
    assert snapshot(src) == before  # the source folder is never written to
    m = json.loads(manifest_path.read_text())
    prepared = manifest_path.parent / "scene"
    assert m["scene_dir"] == str(prepared) and m["factor"] == factor
    cfg = configs.get_config(
        "cpu", overrides=[f"data.dataset_type={dataset_type}", f"data.factor={factor}"]
    )
    scene = datasets.load_scene(prepared, cfg.data)
    train.check_manifest(scene, str(manifest_path), cfg)  # what `train --manifest` does
    other = configs.get_config(
        "cpu", overrides=[f"data.dataset_type={dataset_type}", f"data.factor={factor + 1}"]
    )
    with pytest.raises(UserError, match=f"prepared with data.factor={factor}"):
        train.check_manifest(scene, str(manifest_path), other)
    assert m["num_images"] == len(scene.names) == len(m["images"])
    assert len(m["split"]["train"]) + len(m["split"]["test"]) == m["num_images"]
    assert (m["width"], m["height"]) == (scene.width, scene.height)
    first = m["images"][0]
    assert first["fx"] == pytest.approx(1.0 / float(scene.pixtocams[0, 0, 0]), rel=1e-6)
    assert {im["split"] for im in m["images"]} == {"train", "test"}
    if kind == "360":  # images_4 did not exist in the source: made in the prepared folder
        assert not (src / "images_4").exists()
        small = sorted((prepared / "images_4").glob("*.png"))
        full = sorted((src / "images").iterdir())
        assert len(small) == len(full)
        w, h = Image.open(full[0]).size
        assert Image.open(small[0]).size == (round(w / 4), round(h / 4))
        assert (m["width"], m["height"]) == (round(w / 4), round(h / 4))
    if kind == "llff":  # images_2 shipped with the scene is used as is (a link)
        assert os.path.islink(prepared / "images_2")


def test_rerun_replaces_the_prepared_folder(scenes, tmp_path):
    manifest_path = tmp_path / "manifest.json"
    args = [str(scenes / "360"), str(manifest_path), "--dataset-type", "colmap"]
    assert prepare.main([*args, "--factor", "4"]) == 0
    assert prepare.main([*args, "--factor", "2"]) == 0
    assert json.loads(manifest_path.read_text())["factor"] == 2
    assert not (tmp_path / "scene" / "images_4").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def copy_scene(scenes, kind, tmp_path):
    dst = tmp_path / f"src_{kind}"
    shutil.copytree(scenes / kind, dst)
    return dst


def test_missing_poses_are_named(scenes, tmp_path, capsys):
    src = copy_scene(scenes, "360", tmp_path)
    shutil.rmtree(src / "sparse")
    rc = cli.main(["prepare", str(src), str(tmp_path / "m.json"), "--dataset-type", "colmap"])
    assert rc == 1
    assert "sparse/0: not found (COLMAP poses are missing)" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_missing_images_are_named(scenes, tmp_path):
    src = copy_scene(scenes, "llff", tmp_path)
    shutil.rmtree(src / "images")
    with pytest.raises(prepare.PrepareError, match=r"images: not found"):
        run(src, tmp_path / "m.json", "llff", 0)


def test_image_count_mismatch_is_an_error(scenes, tmp_path):
    src = copy_scene(scenes, "llff", tmp_path)
    os.remove(sorted((src / "images").iterdir())[-1])
    shutil.rmtree(src / "images_2")
    with pytest.raises(prepare.PrepareError, match=str(src)):
        run(src, tmp_path / "m.json", "llff", 0)
    assert not (tmp_path / "m.json").exists()


def test_wrong_image_size_is_an_error(scenes, tmp_path):
    src = copy_scene(scenes, "360", tmp_path)
    first = sorted((src / "images").iterdir())[0]
    img = np.asarray(Image.open(first))
    Image.fromarray(img[:-2]).save(first)  # 2 rows short: does not match its camera
    with pytest.raises(prepare.PrepareError, match=str(src)):
        run(src, tmp_path / "m.json", "colmap", 0)


def test_missing_scene_and_blender_json(scenes, tmp_path):
    with pytest.raises(prepare.PrepareError, match="nowhere: scene folder not found"):
        run(tmp_path / "nowhere", tmp_path / "m.json", "colmap", 0)
    src = copy_scene(scenes, "blender", tmp_path)
    os.remove(src / "transforms_test.json")
    with pytest.raises(prepare.PrepareError, match=r"transforms_test.json: not found"):
        run(src, tmp_path / "m.json", "blender", 0)


def test_cli_data_overrides_after_options(scenes, tmp_path):
    m = tmp_path / "m.json"
    args = [str(scenes / "llff"), str(m), "--dataset-type", "llff", "--factor", "0"]
    assert prepare.main([*args, "data.near=0.5", "data.far=2.0"]) == 0
    got = json.loads(m.read_text())
    assert (got["near"], got["far"]) == (0.5, 2.0)


def test_bad_override_is_named(scenes, tmp_path):
    with pytest.raises(configs.ConfigError, match="data.nope"):
        run(scenes / "360", tmp_path / "m.json", "colmap", 0, ["data.nope=1"])
    m = tmp_path / "m.json"
    assert cli.main(["prepare", str(scenes / "360"), str(m), "train.nope=1"]) == 2
    assert not m.exists()


def test_preset_and_overrides_decide_type_factor_near_far(scenes, tmp_path):
    """LLFF and Blender manifests record their own preset's near/far and factor."""
    m = tmp_path / "llff" / "manifest.json"
    assert cli.main(["prepare", str(scenes / "llff"), str(m), "--preset", "llff_256"]) == 0
    got = json.loads(m.read_text())
    assert (got["dataset_type"], got["factor"], got["near"], got["far"]) == ("llff", 4, 0.0, 1.0)
    assert got["data"] == dataclasses.asdict(configs.get_config("llff_256").data)
    assert (got["width"], got["height"]) == (8, 6)  # 32x24 at the preset's factor 4
    m = tmp_path / "blender" / "manifest.json"
    args = ["prepare", str(scenes / "blender"), str(m), "--preset", "blender_256"]
    assert cli.main([*args, "data.factor=2", "train.max_steps=7"]) == 0  # train.*: ignored
    got = json.loads(m.read_text())
    assert (got["dataset_type"], got["factor"], got["near"], got["far"]) == ("blender", 2, 2.0, 6.0)
    # a YAML config, as `mipnerf360 train --config` takes it
    yml = tmp_path / "c.yaml"
    yml.write_text("preset: llff_512\ndata:\n  factor: 2\n  near: 0.25\n")
    m = tmp_path / "yaml" / "manifest.json"
    assert cli.main(["prepare", str(scenes / "llff"), str(m), "--config", str(yml)]) == 0
    got = json.loads(m.read_text())
    assert (got["dataset_type"], got["factor"], got["near"]) == ("llff", 2, 0.25)


def test_old_flags_must_agree_with_the_config(scenes, tmp_path, capsys):
    m = tmp_path / "manifest.json"
    src = str(scenes / "llff")
    assert cli.main(["prepare", src, str(m), "--factor", "2", "data.factor=4"]) == 2
    assert "--factor 2 disagrees with data.factor: 4" in capsys.readouterr().err
    assert cli.main(["prepare", src, str(m), "--dataset-type", "llff", "data.dataset_type=colmap"])
    assert not m.exists()
    # agreeing spellings are the same thing
    assert cli.main(["prepare", src, str(m), "--preset", "llff_256", "--factor", "2"]) == 0
    assert json.loads(m.read_text())["factor"] == 2


def test_fingerprint_is_what_training_computes(scenes, tmp_path):
    src = scenes / "360"
    m = run(src, tmp_path / "a" / "manifest.json", "colmap", 4, preset="360")
    data = configs.get_config("360").data
    assert m["fingerprint"] == datasets.scene_fingerprint(
        datasets.load_scene(tmp_path / "a" / "scene", data)
    )
    # train without a manifest loads the source itself (images_4 made in our cache)
    assert m["fingerprint"] == datasets.scene_fingerprint(datasets.load_scene(src, data))
    copy = copy_scene(scenes, "360", tmp_path)  # content, not paths
    assert run(copy, tmp_path / "b" / "m.json", "colmap", 4)["fingerprint"] == m["fingerprint"]
    first = sorted((copy / "images").iterdir())[0]
    img = np.asarray(Image.open(first)).copy()
    img[0, 0] ^= 255
    Image.fromarray(img).save(first)
    assert run(copy, tmp_path / "c" / "m.json", "colmap", 4)["fingerprint"] != m["fingerprint"]
    other = run(src, tmp_path / "d" / "m.json", "colmap", 4, ["data.llffhold=4"])
    assert other["fingerprint"] != m["fingerprint"]


def test_prepare_uses_the_loaders_precheck(scenes, tmp_path, monkeypatch):
    def precheck(path, cfg):
        raise datasets.DatasetError(f"{path}: rejected by the loader's precheck")

    loader = datasets.LOADERS["blender"]
    monkeypatch.setitem(datasets.LOADERS, "blender", dataclasses.replace(loader, precheck=precheck))
    with pytest.raises(prepare.PrepareError, match="rejected by the loader's precheck"):
        run(scenes / "blender", tmp_path / "m.json", "blender", 0)


def test_prepared_folders_have_umask_modes(scenes, tmp_path):
    """Never mkdtemp's private 0700: others in the group read the prepared scene."""
    run(scenes / "360", tmp_path / "manifest.json", "colmap", 4)
    mask = io.umask()
    for p in (tmp_path / "scene", tmp_path / "scene" / "images_4"):
        assert p.stat().st_mode & 0o777 == 0o777 & ~mask, p
    for p in (tmp_path / "manifest.json", *(tmp_path / "scene" / "images_4").iterdir()):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p
