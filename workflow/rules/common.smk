# Shared helpers: the scene list, per-scene settings and input functions.
import hashlib
import json
import os
import shlex

RESOURCES_DIR = config.get("resources_dir", "resources")
_METRICS = config.get("metrics", {})
if _METRICS.get("lpips", True):
    LPIPS_ARGS = "--lpips-nets " + ",".join(_METRICS.get("lpips_nets", ["alex", "vgg"]))
else:
    LPIPS_ARGS = "--no-lpips"
DATASETS = config["datasets"]
SCENES = [(d, s) for d, ds in DATASETS.items() for s in ds["scenes"]]
if "combined" in DATASETS:
    raise ValueError(
        "config: datasets.combined: reserved name (results/tables/combined.*)"
    )
# Each archive is extracted (atomically) to <resources_dir>/data/<archive key>.
ARCHIVE_DIR = os.path.join(RESOURCES_DIR, "data")

_DEFAULT_RESOURCES = {"threads": 1, "mem_mb": 2000, "runtime": 60, "gpu": 0}
_STEP_DEFAULTS = {"train": {"gpu": 1}}


def scene_settings(dataset, scene):
    """The data set's settings with the scene's on top (overrides and source merged)."""
    ds = DATASETS[dataset]
    sc = ds["scenes"][scene] or {}
    out = {
        "dataset_type": ds["dataset_type"],
        "preset": sc.get("preset", ds["preset"]),
        "factor": sc.get("factor", ds.get("factor", 0)),
        "steps": sc.get("steps", ds.get("steps")),
        "overrides": {
            **(config.get("overrides") or {}),
            **(ds.get("overrides") or {}),
            **(sc.get("overrides") or {}),
        },
        "source": {**ds["source"], **(sc.get("source") or {})},
    }
    src = out["source"]
    kinds = [k for k in ("generate", "archive", "path") if k in src]
    if len(kinds) != 1:
        raise ValueError(
            f"config: datasets.{dataset}.scenes.{scene}: source needs exactly one of "
            f"generate/archive/path, got {kinds or 'none'}"
        )
    if "archive" in src and src["archive"] not in config.get("archives", {}):
        raise ValueError(
            f"config: datasets.{dataset}.scenes.{scene}: source.archive {src['archive']!r} "
            f"is not a key of archives ({sorted(config.get('archives', {}))})"
        )
    return out


def _check_overrides():
    """Fail early, naming the key, when an override is not a mipnerf360 config key."""
    try:
        from mipnerf360.configs import ConfigError, get_config
    except (
        ImportError
    ):  # the package lives in the conda env only: checked at train time
        return
    for d, s in SCENES:
        st = scene_settings(d, s)
        try:
            get_config(st["preset"], overrides=override_args(st))
        except ConfigError as e:
            raise ValueError(f"config: datasets.{d}.scenes.{s}: {e}") from None


def _format_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def override_args(st):
    """Settings -> the key=value list given to `mipnerf360 train`."""
    values = {"data.dataset_type": st["dataset_type"], "data.factor": st["factor"]}
    if st["steps"] is not None:
        values["train.max_steps"] = st["steps"]
    values.update(st["overrides"])
    return [f"{k}={_format_value(v)}" for k, v in values.items()]


def scene_dir(wildcards):
    """Folder of the scene's data (what prepare/train/render read)."""
    src = scene_settings(wildcards.dataset, wildcards.scene)["source"]
    if "generate" in src:
        return f"results/generate/{wildcards.dataset}/{wildcards.scene}"
    if "archive" in src:
        base = os.path.join(ARCHIVE_DIR, src["archive"], src.get("subdir", ""))
        return os.path.normpath(os.path.join(base, wildcards.scene))
    return os.path.normpath(os.path.join(src["path"], wildcards.scene))


def scene_input(wildcards):
    """The file/folder a scene depends on: generated scene, extracted archive or local folder."""
    src = scene_settings(wildcards.dataset, wildcards.scene)["source"]
    if "archive" in src:
        return os.path.join(ARCHIVE_DIR, src["archive"])
    return scene_dir(wildcards)


def generate_args(wildcards):
    src = scene_settings(wildcards.dataset, wildcards.scene)["source"]
    args = [src["generate"]]
    for key in ("views", "width", "height", "seed"):
        if key in src:
            args += [f"--{key}", str(src[key])]
    return args


def train_args(wildcards):
    """Preset and key=value overrides of one scene (a param of the train step, so a change reruns the scene)."""
    st = scene_settings(wildcards.dataset, wildcards.scene)
    return " ".join(
        shlex.quote(a) for a in ["--preset", st["preset"], *override_args(st)]
    )


def prepare_args(wildcards):
    """Loader settings of one scene: data set type, factor and the data.* overrides."""
    st = scene_settings(wildcards.dataset, wildcards.scene)
    args = ["--dataset-type", st["dataset_type"], "--factor", str(st["factor"])]
    args += [a for a in override_args(st) if a.startswith("data.")]
    args = [a for a in args if not a.startswith(("data.dataset_type=", "data.factor="))]
    return " ".join(shlex.quote(a) for a in args)


def resume_key(wildcards):
    """Hash of a scene's training settings: checkpoints made with other settings are not
    resumed (the train step deletes them)."""
    return hashlib.sha256(train_args(wildcards).encode()).hexdigest()[:16]


def archive_args(wildcards):
    a = config["archives"][wildcards.archive]
    args = [a["url"], "--archive", os.path.join(RESOURCES_DIR, a["file"])]
    if a.get("sha256"):
        args += ["--sha256", a["sha256"]]
    return " ".join(shlex.quote(x) for x in args)


def step_resources(step, dataset=None):
    """threads/mem_mb/runtime/gpu of a step: defaults < resources.default < resources.<step>
    < datasets.<dataset>.resources (train only)."""
    res = config.get("resources", {})
    out = {**_DEFAULT_RESOURCES, **_STEP_DEFAULTS.get(step, {})}
    out.update(res.get("default") or {})
    out.update(res.get(step) or {})
    if dataset is not None:
        out.update(DATASETS[dataset].get("resources") or {})
    return out


def train_resource(key):
    return lambda wildcards: step_resources("train", wildcards.dataset)[key]


def device_args():
    dev = config.get("device", "auto")
    return "" if dev == "auto" else f"--device {shlex.quote(dev)}"


def published_args():
    pairs = [
        f"{d}={ds['published']}" for d, ds in DATASETS.items() if ds.get("published")
    ]
    return " ".join(f"--published {shlex.quote(p)}" for p in pairs)


def all_scene_files(pattern):
    return [pattern.format(dataset=d, scene=s) for d, s in SCENES]


TABLE_FILES = [
    f"results/tables/{name}.{ext}"
    for name in [*DATASETS, "combined"]
    for ext in ("csv", "md", "tex")
]

_check_overrides()
