# Shared helpers: the config's `include:` files, the list of runs (data set x scene x
# variant x seed), each run's settings checked with the package's own validation, and the
# input/param functions of the rules.
import functools
import json
import os
import shlex
import sys
from pathlib import Path

import yaml

try:
    from mipnerf360 import configs, synthetic
except ImportError:  # not installed: the source tree beside workflow/
    sys.path.insert(0, str(Path(workflow.basedir).parent))
    from mipnerf360 import configs, synthetic


def _deep_merge(base, over):
    """``over`` merged into ``base`` (a new dict): mappings recursively, anything else replaced."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _with_includes(cfg, seen=()):
    """A config with its ``include:`` files (paths relative to the working directory,
    loaded in order, each with its own includes) merged below its own keys."""
    incs = cfg.get("include") or []
    if isinstance(incs, str):
        incs = [incs]
    merged = {}
    for path in incs:
        if path in seen:
            raise ValueError(f"config: include: {path} includes itself")
        try:
            with open(path) as f:
                sub = yaml.safe_load(f) or {}
        except OSError as e:
            raise ValueError(f"config: include: {path}: {e.strerror}") from None
        merged = _deep_merge(merged, _with_includes(sub, (*seen, path)))
    return _deep_merge(merged, {k: v for k, v in cfg.items() if k != "include"})


_merged = _with_includes(dict(config))
config.clear()
config.update(_merged)

# Keys of earlier versions that are now set in one place only (the preset + overrides).
for _d, _ds in (config.get("datasets") or {}).items():
    for _where, _node in [(f"datasets.{_d}", _ds)] + [
        (f"datasets.{_d}.scenes.{_s}", _sc)
        for _s, _sc in ((_ds or {}).get("scenes") or {}).items()
    ]:
        for _old, _new in (
            ("factor", "data.factor"),
            ("dataset_type", "data.dataset_type"),
        ):
            if isinstance(_node, dict) and _old in _node:
                raise ValueError(
                    f"config: {_where}.{_old}: set it as overrides: {{{_new}: ...}} (or "
                    f"leave it to the preset); `{_old}` is no longer a key of its own so "
                    f"that prepare and train read one value"
                )

validate(config, schema="../schemas/config.schema.yaml")

RESOURCES_DIR = config.get("resources_dir", "resources")
_METRICS = config.get("metrics", {})
if _METRICS.get("lpips", True):
    LPIPS_ARGS = "--lpips-nets " + ",".join(
        _METRICS.get("lpips_nets", list(configs.LPIPS_NETS))
    )
else:
    LPIPS_ARGS = "--no-lpips"
DATASETS = config["datasets"]
if "combined" in DATASETS:
    raise ValueError(
        "config: datasets.combined: reserved name (results/tables/combined.*)"
    )
# Each archive is extracted (atomically) to <resources_dir>/data/<archive key>.
ARCHIVE_DIR = os.path.join(RESOURCES_DIR, "data")

# Variants: name -> {overrides, label, baseline, published}; without `variants:` one
# variant named "baseline" with no overrides. Seeds: train.seed values; without `seeds:`
# the package's default seed (multinerf's PRNGKey(20200823)), so such a config trains
# exactly what it did before variants existed.
VARIANTS = config.get("variants") or {"baseline": {}}
VARIANTS = {v: (spec or {}) for v, spec in VARIANTS.items()}
_marked = [v for v, spec in VARIANTS.items() if spec.get("baseline")]
if len(_marked) > 1:
    raise ValueError(f"config: variants: more than one marked baseline: {_marked}")
BASELINE = _marked[0] if _marked else next(iter(VARIANTS))
SEEDS = list(config.get("seeds") or [configs.TrainConfig().seed])
if len(set(SEEDS)) != len(SEEDS):
    raise ValueError(f"config: seeds: repeated values in {SEEDS}")

_DEFAULT_RESOURCES = {"threads": 1, "mem_mb": 2000, "runtime": 60, "gpu": 0}
_STEP_DEFAULTS = {"train": {"gpu": 1}}


def _narrowed(where, chosen, allowed, what):
    if chosen is None:
        return list(allowed)
    bad = [c for c in chosen if c not in allowed]
    if bad:
        raise ValueError(
            f"config: {where}.{what}: {bad} not in the top-level {what} {list(allowed)}"
        )
    return [a for a in allowed if a in chosen]


def _scene_spec(dataset, scene):
    return DATASETS[dataset]["scenes"][scene] or {}


def scene_settings(dataset, scene):
    """The data set's settings with the scene's on top (overrides and source merged)."""
    ds, sc = DATASETS[dataset], _scene_spec(dataset, scene)
    where = f"datasets.{dataset}.scenes.{scene}"
    out = {
        "preset": sc.get("preset", ds["preset"]),
        "steps": sc.get("steps", ds.get("steps")),
        "overrides": {
            **(config.get("overrides") or {}),
            **(ds.get("overrides") or {}),
            **(sc.get("overrides") or {}),
        },
        "source": {**ds["source"], **(sc.get("source") or {})},
        "variants": _narrowed(
            where if "variants" in sc else f"datasets.{dataset}",
            sc.get("variants", ds.get("variants")),
            VARIANTS,
            "variants",
        ),
        "seeds": _narrowed(
            where if "seeds" in sc else f"datasets.{dataset}",
            sc.get("seeds", ds.get("seeds")),
            SEEDS,
            "seeds",
        ),
    }
    src = out["source"]
    kinds = [k for k in ("generate", "archive", "path") if k in src]
    if len(kinds) != 1:
        raise ValueError(
            f"config: {where}: source needs exactly one of generate/archive/path, "
            f"got {kinds or 'none'}"
        )
    if "archive" in src and src["archive"] not in config.get("archives", {}):
        raise ValueError(
            f"config: {where}: source.archive {src['archive']!r} "
            f"is not a key of archives ({sorted(config.get('archives', {}))})"
        )
    if "train.seed" in out["overrides"]:
        raise ValueError(
            f"config: {where}: overrides: train.seed: use the top-level `seeds:` list"
        )
    return out


# Every run: (dataset, scene, variant, seed), in table order.
SCENES = [(d, s) for d, ds in DATASETS.items() for s in ds["scenes"]]
RUNS = [
    (d, s, v, k)
    for d, s in SCENES
    for v in scene_settings(d, s)["variants"]
    for k in scene_settings(d, s)["seeds"]
]


def _format_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _args(values):
    """key=value arguments, sorted by key: the order of keys in a config file is not a
    setting (reordering them reruns nothing)."""
    return [f"{k}={_format_value(v)}" for k, v in sorted(values.items())]


@functools.lru_cache(maxsize=None)
def run_settings(dataset, scene, variant, seed):
    """One run's preset, its key=value overrides split into training (data/model/train)
    and evaluation (eval.*) ones, and its config resolved and validated by the package
    (``configs.get_config``), which is where data.factor / data.dataset_type come from.
    """
    st = scene_settings(dataset, scene)
    spec = VARIANTS[variant]
    values = {}
    if st["steps"] is not None:
        values["train.max_steps"] = st["steps"]
    values.update(st["overrides"])
    for key, value in (spec.get("overrides") or {}).items():
        if key.startswith("data.") or key == "train.seed":
            raise ValueError(
                f"config: variants.{variant}.overrides.{key}: a variant changes model, "
                f"train or eval settings (data.* belongs to a data set or scene, the "
                f"training seed to `seeds:`)"
            )
        values[key] = value
    values["train.seed"] = int(seed)
    where = f"datasets.{dataset}.scenes.{scene}"
    if variant != "baseline" or len(VARIANTS) > 1:
        where += f" (variant {variant})"
    try:
        cfg = configs.get_config(st["preset"], overrides=_args(values))
    except configs.ConfigError as e:
        raise ValueError(f"config: {where}: {e}") from None
    train_values = {k: v for k, v in values.items() if not k.startswith("eval.")}
    # the resolved loader settings, explicit in the commands (one value, from one place)
    train_values["data.dataset_type"] = cfg.data.dataset_type
    train_values["data.factor"] = cfg.data.factor
    return {
        "preset": st["preset"],
        "train": _args(train_values),
        "eval": _args({k: v for k, v in values.items() if k.startswith("eval.")}),
        "data": _args({k: v for k, v in train_values.items() if k.startswith("data.")}),
        "factor": cfg.data.factor,
        "dataset_type": cfg.data.dataset_type,
    }


for _run in RUNS:  # validate every run while the DAG is built (`snakemake -n` reports)
    run_settings(*_run)


def _wc_run(wc):
    return run_settings(wc.dataset, wc.scene, wc.variant, int(wc.seed))


def _quote(args):
    return " ".join(shlex.quote(a) for a in args)


def scene_dir(wildcards):
    """Folder of the scene's data (what prepare reads)."""
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
    return _quote(args)


def prepare_args(wildcards):
    """Preset and data.* settings of one scene (the same for all its variants and seeds)."""
    st = scene_settings(wildcards.dataset, wildcards.scene)
    run = run_settings(
        wildcards.dataset, wildcards.scene, st["variants"][0], st["seeds"][0]
    )
    return _quote(["--preset", st["preset"], *run["data"]])


def train_args(wildcards):
    """Preset and training overrides (data/model/train) of one run: a param of the train
    step only, so a change reruns that run; eval.* settings are not among them."""
    run = _wc_run(wildcards)
    return _quote(["--preset", run["preset"], *run["train"]])


def eval_args(wildcards):
    """The eval.* overrides of one run: params of render and evaluate only."""
    return _quote(_wc_run(wildcards)["eval"])


def archive_args(wildcards):
    a = config["archives"][wildcards.archive]
    args = [a["url"], "--archive", os.path.join(RESOURCES_DIR, a["file"])]
    if a.get("sha256"):
        args += ["--sha256", a["sha256"]]
    return _quote(args)


def step_resources(step, dataset=None):
    """threads/mem_mb/runtime/gpu/processes of a step: defaults < resources.default <
    resources.<step> < datasets.<dataset>.resources (train only). `processes` (data-parallel
    processes of one training, `mipnerf360 train --nproc-per-node`) defaults to one per GPU.
    """
    res = config.get("resources", {})
    out = {**_DEFAULT_RESOURCES, **_STEP_DEFAULTS.get(step, {})}
    out.update(res.get("default") or {})
    out.update(res.get(step) or {})
    if dataset is not None:
        out.update(DATASETS[dataset].get("resources") or {})
    out.setdefault("processes", max(1, out["gpu"]))
    return out


def train_resource(key):
    return lambda wildcards: step_resources("train", wildcards.dataset)[key]


# Where a job runs is not what it computes: the device is a resource of train and render,
# not a param (changing it reruns nothing; the package resumes a run on any device).
DEVICE = str(config.get("device", "auto"))

RUN_DIR = "{dataset}/{scene}/{variant}/seed{seed}"


def run_files(pattern):
    """``pattern`` (with {run}) for every run."""
    return [pattern.format(run=f"{d}/{s}/{v}/seed{k}") for d, s, v, k in RUNS]


def _published_key(dataset, variant):
    """The published.yaml entry a run is compared with: the variant's own `published`
    (per data set) or, for the baseline, the data set's."""
    own = VARIANTS[variant].get("published") or {}
    if dataset in own:
        return own[dataset]
    return DATASETS[dataset].get("published") if variant == BASELINE else None


def tables_spec():
    """What `mipnerf360 tables --spec` needs: the runs in table order, the variants
    (labels, baseline, published keys) and the archives' provenance."""
    used = sorted(
        {
            scene_settings(d, s)["source"]["archive"]
            for d, s in SCENES
            if "archive" in scene_settings(d, s)["source"]
        }
    )
    archives = {}
    for key in used:
        a = config["archives"][key]
        archives[key] = {
            "url": a["url"],
            "sha256": a.get("sha256"),
            "record": os.path.join(RESOURCES_DIR, a["file"] + ".sha256"),
            "datasets": sorted(
                {
                    d
                    for d, s in SCENES
                    if scene_settings(d, s)["source"].get("archive") == key
                }
            ),
        }
    spec = {
        "runs": [[d, s, v, k] for d, s, v, k in RUNS],
        "baseline": BASELINE,
        "variants": {
            v: {
                "label": VARIANTS[v].get("label", v),
                "published": {
                    d: _published_key(d, v) for d in DATASETS if _published_key(d, v)
                },
            }
            for v in VARIANTS
        },
        "archives": archives,
    }
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


TABLE_FILES = [
    f"results/tables/{name}.{ext}"
    for name in [*DATASETS, "combined"]
    for ext in ("csv", "md", "tex")
] + ["results/tables/runs.csv"]
FIGURE_FILES = [f"results/tables/{d}_psnr.png" for d in DATASETS]
