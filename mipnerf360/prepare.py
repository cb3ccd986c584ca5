"""Validate a scene, make its downsampled images and write its manifest (``mipnerf360 prepare``).

    mipnerf360 prepare SOURCE MANIFEST [--preset NAME] [--config YAML] [key=value ...]

The scene is loaded with the config that training builds from the same arguments
(``configs.get_config(preset, yaml, overrides)``, default preset '360', as ``mipnerf360
train``): its ``data.*`` part (``dataset_type``, ``factor``, ``near``, ``far``, ...)
decides how; other keys are accepted and checked but do not matter here. So give prepare
the preset and overrides the scene trains with. ``--dataset-type T`` / ``--factor F`` are
kept as spellings of ``data.dataset_type=T`` / ``data.factor=F``; one that disagrees with
the config's value given as an override is an error.

The source folder is never written to (it may be read-only or part of the repository):
the prepared scene is ``<manifest folder>/scene``, a folder of relative symbolic links to
every top-level entry of SOURCE plus, for data set types that read pre-downsampled images
(``datasets.LOADERS[type].needs_downsampled_images``) at ``factor > 1`` when SOURCE has no
``images_<F>/`` of its own, a new ``images_<F>/`` (``datasets.downsample_folder``: area
filter, as multinerf expects pre-resized images). It is built under a temporary name and
renamed into place, replacing an earlier one.

The prepared scene is then loaded with ``datasets.load_scene`` (the loader training uses),
which checks that poses and images are present and that image sizes agree with the
cameras. The manifest (JSON, written atomically) records what training (``mipnerf360 train
--manifest``, which checks its split) and evaluation rely on::

    {"scene", "dataset_type", "factor", "source_dir", "scene_dir", "width", "height",
     "num_images", "near", "far", "fingerprint", "data": {data config},
     "split": {"train": [names], "test": [names]},
     "images": [{"name", "split", "width", "height", "fx", "fy", "cx", "cy"}, ...]}

``fingerprint`` is ``datasets.scene_fingerprint`` of the loaded scene: a hash of the image
contents, poses, intrinsics, split and near/far (not of paths or times), the same value
training computes from the scene it loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import numpy as np

from mipnerf360 import configs, io
from mipnerf360.errors import UserError


class PrepareError(UserError, ValueError):
    """The scene cannot be prepared; the message names the file or folder."""


def _link_entries(source: Path, folder: Path) -> None:
    """Relative symlinks in ``folder`` to every top-level entry of ``source`` (not dotfiles)."""
    for entry in sorted(source.iterdir()):
        if entry.name.startswith("."):
            continue
        rel = os.path.relpath(entry.resolve(), folder.resolve())
        try:
            os.symlink(rel, folder / entry.name)
        except OSError as e:
            raise PrepareError(f"{folder / entry.name}: cannot link: {e.strerror or e}") from None


def make_manifest(scene, source: Path, prepared: Path, data_cfg: configs.DataConfig) -> dict:
    """The manifest dict of a loaded ``datasets.Scene``."""
    from mipnerf360 import datasets

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
        "factor": int(data_cfg.factor),
        "source_dir": str(source),
        "scene_dir": str(prepared),
        "width": int(scene.width),
        "height": int(scene.height),
        "num_images": len(scene.names),
        "near": float(scene.near),
        "far": float(scene.far),
        "fingerprint": datasets.scene_fingerprint(scene),
        "data": dataclasses.asdict(data_cfg),
        "split": {
            "train": [str(scene.names[int(i)]) for i in scene.i_train],
            "test": [str(scene.names[int(i)]) for i in scene.i_test],
        },
        "images": images,
    }


def prepare_config(
    preset: str | None = None,
    config_yaml: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    dataset_type: str | None = None,
    factor: int | None = None,
) -> configs.Config:
    """The config prepare loads with: the one ``mipnerf360 train`` builds from the same
    preset, YAML and overrides. ``dataset_type`` / ``factor`` (the old flags) are the same
    thing as ``data.dataset_type`` / ``data.factor`` overrides: ConfigError when they
    disagree with one given as an override."""
    overrides = list(overrides)
    from_yaml = configs.load_yaml(config_yaml).get("data") if config_yaml else None
    given = dict(from_yaml) if isinstance(from_yaml, dict) else {}
    given.update(configs.parse_overrides(overrides).get("data", {}))
    for key, value in (("dataset_type", dataset_type), ("factor", factor)):
        if value is None:
            continue
        if key in given and given[key] != value:
            raise configs.ConfigError(
                f"--{key.replace('_', '-')} {value} disagrees with data.{key}: {given[key]}; "
                f"give data.{key} once"
            )
        overrides.append(f"data.{key}={value}")
    return configs.get_config(preset, config_yaml, overrides)


def prepare(
    scene_dir: str | os.PathLike,
    manifest_path: str | os.PathLike,
    cfg: configs.Config | configs.DataConfig,
) -> dict:
    """Link, downsample, load (validates) and write the manifest; returns the manifest.

    ``cfg``: the scene's config (see ``prepare_config``); only its ``data`` part is used.
    """
    from mipnerf360 import datasets

    data = cfg.data if isinstance(cfg, configs.Config) else cfg
    source = Path(scene_dir)
    manifest_path = Path(manifest_path)
    factor = int(data.factor)
    if not source.is_dir():
        raise PrepareError(f"{source}: scene folder not found")
    loader = datasets.LOADERS.get(data.dataset_type)
    if loader is None:
        raise PrepareError(
            f"unknown dataset type {data.dataset_type!r} ({', '.join(datasets.DATASET_TYPES)})"
        )
    try:
        loader.precheck(source, data)
    except datasets.DatasetError as e:
        raise PrepareError(str(e)) from None
    prepared = manifest_path.parent / "scene"
    own_small = (source / f"images_{factor}").is_dir()
    try:
        with io.atomic_dir(prepared) as tmp:
            _link_entries(source, tmp)
            if loader.needs_downsampled_images and factor > 1 and not own_small:
                datasets.downsample_folder(source / "images", tmp / f"images_{factor}", factor)
        scene = datasets.load_scene(prepared, data)
    except PrepareError:
        raise
    except UserError as e:  # DatasetError, ColmapError, unreadable files
        raise PrepareError(f"{source}: {e}") from None
    if len(scene.i_train) == 0 or len(scene.i_test) == 0:
        raise PrepareError(
            f"{source}: empty split ({len(scene.i_train)} train / {len(scene.i_test)} test images)"
        )
    manifest = make_manifest(scene, source, prepared, data)
    io.write_json(manifest_path, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mipnerf360 prepare", description=__doc__.split("\n")[0])
    p.add_argument("scene_dir", help="scene folder (read only)")
    p.add_argument("manifest", help="manifest JSON to write; the prepared scene goes beside it")
    p.add_argument(
        "--preset", default=None, help=f"config preset, as for train: {sorted(configs.PRESETS)}"
    )
    p.add_argument("--config", default=None, help="YAML config file (applied after the preset)")
    p.add_argument("--dataset-type", default=None, help="same as data.dataset_type=T")
    p.add_argument("--factor", type=int, default=None, help="same as data.factor=F")
    p.add_argument(
        "overrides", nargs="*", help="key=value config overrides, as for train (data.* used)"
    )
    a = p.parse_intermixed_args(argv)
    cfg = prepare_config(a.preset, a.config, a.overrides, a.dataset_type, a.factor)
    m = prepare(a.scene_dir, a.manifest, cfg)
    n_train, n_test = len(m["split"]["train"]), len(m["split"]["test"])
    print(
        f"{a.scene_dir}: {m['num_images']} images {m['width']}x{m['height']} "
        f"({n_train} train / {n_test} test, factor {m['factor']}, near {m['near']:g}, "
        f"far {m['far']:g}) -> {a.manifest}"
    )
    return 0
