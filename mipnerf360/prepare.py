"""Validate a scene, make its downsampled images and write its manifest (``mipnerf360 prepare``).

    mipnerf360 prepare SCENE_DIR MANIFEST_JSON --dataset-type T --factor F [data.key=value ...]

The source folder is never written to (it may be read-only or part of the repository):
the prepared scene is ``<manifest folder>/scene``, a folder of relative symbolic links to
every top-level entry of SCENE_DIR plus, for COLMAP/LLFF scenes with ``factor > 1`` and no
``images_<F>/`` of their own, a new ``images_<F>/`` (made by
``datasets.ensure_downsampled``: area filter, as multinerf expects pre-resized images,
reference spec section 2.2). It is built in a temporary folder and renamed into place.

The prepared scene is then loaded with ``datasets.load_scene`` (the loader training uses),
which checks that poses and images are present and that image sizes agree with the
cameras. The manifest (JSON, written atomically) records what training (``mipnerf360 train
--manifest``, which checks its split) and evaluation rely on::

    {"scene", "dataset_type", "factor", "source_dir", "scene_dir", "width", "height",
     "num_images", "near", "far", "split": {"train": [names], "test": [names]},
     "images": [{"name", "split", "width", "height", "fx", "fy", "cx", "cy"}, ...]}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from mipnerf360 import configs
from mipnerf360.errors import UserError


class PrepareError(UserError, ValueError):
    """The scene cannot be prepared; the message names the file or folder."""


def link_scene(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """``target``: a new folder of relative symlinks to every top-level entry of ``source``
    (built beside ``target`` and renamed into place; an old ``target`` is replaced)."""
    source, target = Path(source), Path(target)
    if not source.is_dir():
        raise PrepareError(f"{source}: scene folder not found")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        tmp.chmod(0o755)
        for entry in sorted(source.iterdir()):
            if entry.name.startswith("."):
                continue
            rel = os.path.relpath(entry.resolve(), tmp.resolve())
            os.symlink(rel, tmp / entry.name)
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _precheck(source: Path, dataset_type: str) -> None:
    """Fast checks with clear messages before the (slower) full load."""
    if dataset_type == "blender":
        for split in ("train", "test"):
            f = source / f"transforms_{split}.json"
            if not f.is_file():
                raise PrepareError(f"{f}: not found (Blender scenes need transforms_*.json)")
        return
    if not (source / "images").is_dir():
        raise PrepareError(f"{source / 'images'}: not found (the scene has no images/ folder)")
    has_colmap = (source / "sparse" / "0").is_dir()
    has_llff = (source / "poses_bounds.npy").is_file()
    if dataset_type == "colmap" and not has_colmap:
        raise PrepareError(f"{source / 'sparse' / '0'}: not found (COLMAP poses are missing)")
    if dataset_type == "llff" and not has_llff:
        raise PrepareError(f"{source / 'poses_bounds.npy'}: not found (LLFF poses are missing)")


def make_manifest(scene, source: Path, prepared: Path, factor: int) -> dict:
    """The manifest dict of a loaded ``datasets.Scene``."""
    K = np.linalg.inv(scene.pixtocams.astype(np.float64))  # [N,3,3] intrinsics
    split = np.full(len(scene.names), "", dtype=object)
    split[scene.i_train] = "train"
    split[scene.i_test] = "test"
    images = [
        {
            "name": str(n),
            "split": str(s),
            "width": int(scene.width),
            "height": int(scene.height),
            "fx": float(k[0, 0]),
            "fy": float(k[1, 1]),
            "cx": float(k[0, 2]),
            "cy": float(k[1, 2]),
        }
        for n, s, k in zip(scene.names, split, K, strict=True)
    ]
    return {
        "scene": source.name,
        "dataset_type": scene.dataset_type,
        "factor": int(factor),
        "source_dir": str(source),
        "scene_dir": str(prepared),
        "width": int(scene.width),
        "height": int(scene.height),
        "num_images": len(scene.names),
        "near": float(scene.near),
        "far": float(scene.far),
        "split": {
            "train": [str(scene.names[int(i)]) for i in scene.i_train],
            "test": [str(scene.names[int(i)]) for i in scene.i_test],
        },
        "images": images,
    }


def prepare(
    scene_dir: str | os.PathLike,
    manifest_path: str | os.PathLike,
    dataset_type: str,
    factor: int = 0,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict:
    """Link, downsample, load (validates) and write the manifest; returns the manifest."""
    from mipnerf360 import datasets

    source = Path(scene_dir)
    manifest_path = Path(manifest_path)
    if dataset_type not in ("colmap", "llff", "blender"):
        raise PrepareError(f"unknown dataset type {dataset_type!r} (colmap, llff or blender)")
    if not source.is_dir():
        raise PrepareError(f"{source}: scene folder not found")
    _precheck(source, dataset_type)
    try:
        cfg = configs.get_config("360", overrides=list(overrides))
    except configs.ConfigError as e:
        raise PrepareError(f"override: {e}") from None
    cfg.data.dataset_type, cfg.data.factor = dataset_type, int(factor)
    prepared = link_scene(source, manifest_path.parent / "scene")
    if dataset_type != "blender" and factor > 1:
        try:
            datasets.ensure_downsampled(prepared, int(factor))
        except datasets.DatasetError as e:
            raise PrepareError(str(e)) from None
    try:
        scene = datasets.load_scene(prepared, cfg.data)
    except (ValueError, OSError) as e:  # DatasetError, COLMAP parse errors, unreadable files
        raise PrepareError(f"{source}: {e}") from None
    if len(scene.i_train) == 0 or len(scene.i_test) == 0:
        raise PrepareError(
            f"{source}: empty split ({len(scene.i_train)} train / {len(scene.i_test)} test images)"
        )
    manifest = make_manifest(scene, source, prepared, factor)
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=manifest_path.parent, prefix=f".{manifest_path.name}.tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, manifest_path)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mipnerf360 prepare", description=__doc__.split("\n")[0])
    p.add_argument("scene_dir", help="scene folder (read only)")
    p.add_argument("manifest", help="manifest JSON to write; the prepared scene goes beside it")
    p.add_argument("--dataset-type", required=True, choices=["colmap", "llff", "blender"])
    p.add_argument("--factor", type=int, default=0, help="image downsampling factor (0/1: none)")
    p.add_argument("overrides", nargs="*", help="data.key=value settings for loading")
    a = p.parse_intermixed_args(argv)
    try:
        m = prepare(a.scene_dir, a.manifest, a.dataset_type, a.factor, a.overrides)
    except PrepareError as e:
        print(f"mipnerf360 prepare: error: {e}", file=sys.stderr)
        return 1
    n_train, n_test = len(m["split"]["train"]), len(m["split"]["test"])
    print(
        f"{a.scene_dir}: {m['num_images']} images {m['width']}x{m['height']} "
        f"({n_train} train / {n_test} test) -> {a.manifest}"
    )
    return 0
