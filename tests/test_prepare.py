"""mipnerf360.prepare: validation, downsampled images, manifest (read by training)."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from mipnerf360 import configs, datasets, prepare, synthetic, train


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
    train.check_manifest(scene, str(manifest_path))  # what `mipnerf360 train --manifest` does
    assert m["num_images"] == len(scene.names) == len(m["images"])
    assert len(m["split"]["train"]) + len(m["split"]["test"]) == m["num_images"]
    assert (m["width"], m["height"]) == (scene.width, scene.height)
    first = m["images"][0]
    assert first["fx"] == pytest.approx(1.0 / float(scene.pixtocams[0, 0, 0]), rel=1e-6)
    assert {im["split"] for im in m["images"]} == {"train", "test"}
    if kind == "360":  # images_4 did not exist in the source: made in the prepared folder
        assert not (src / "images_4").exists()
        small = sorted((prepared / "images_4").iterdir())
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
    rc = prepare.main([str(src), str(tmp_path / "m.json"), "--dataset-type", "colmap"])
    assert rc == 1
    assert "sparse/0: not found (COLMAP poses are missing)" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_missing_images_are_named(scenes, tmp_path):
    src = copy_scene(scenes, "llff", tmp_path)
    shutil.rmtree(src / "images")
    with pytest.raises(prepare.PrepareError, match=r"images: not found"):
        prepare.prepare(src, tmp_path / "m.json", "llff", 0)


def test_image_count_mismatch_is_an_error(scenes, tmp_path):
    src = copy_scene(scenes, "llff", tmp_path)
    os.remove(sorted((src / "images").iterdir())[-1])
    shutil.rmtree(src / "images_2")
    with pytest.raises(prepare.PrepareError, match=str(src)):
        prepare.prepare(src, tmp_path / "m.json", "llff", 0)
    assert not (tmp_path / "m.json").exists()


def test_wrong_image_size_is_an_error(scenes, tmp_path):
    src = copy_scene(scenes, "360", tmp_path)
    first = sorted((src / "images").iterdir())[0]
    img = np.asarray(Image.open(first))
    Image.fromarray(img[:-2]).save(first)  # 2 rows short: does not match its camera
    with pytest.raises(prepare.PrepareError, match=str(src)):
        prepare.prepare(src, tmp_path / "m.json", "colmap", 0)


def test_missing_scene_and_blender_json(scenes, tmp_path):
    with pytest.raises(prepare.PrepareError, match="nowhere: scene folder not found"):
        prepare.prepare(tmp_path / "nowhere", tmp_path / "m.json", "colmap", 0)
    src = copy_scene(scenes, "blender", tmp_path)
    os.remove(src / "transforms_test.json")
    with pytest.raises(prepare.PrepareError, match=r"transforms_test.json: not found"):
        prepare.prepare(src, tmp_path / "m.json", "blender", 0)


def test_cli_data_overrides_after_options(scenes, tmp_path):
    m = tmp_path / "m.json"
    args = [str(scenes / "llff"), str(m), "--dataset-type", "llff", "--factor", "0"]
    assert prepare.main([*args, "data.near=0.5", "data.far=2.0"]) == 0
    got = json.loads(m.read_text())
    assert (got["near"], got["far"]) == (0.5, 2.0)


def test_bad_override_is_named(scenes, tmp_path):
    with pytest.raises(prepare.PrepareError, match="data.nope"):
        prepare.prepare(scenes / "360", tmp_path / "m.json", "colmap", 0, ["data.nope=1"])
