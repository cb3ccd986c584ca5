"""Paper-style result tables over variants and seeds (``mipnerf360 tables``).

    mipnerf360 tables OUT_DIR --results results --spec SPEC(.json)
    mipnerf360 tables OUT_DIR --results results DATASET/SCENE/VARIANT/seedK ... \\
        [--published DATASET=KEY]

A run is one data set x scene x variant x seed; its numbers come from
``<results>/evaluate/<run>/metrics.json`` (``mipnerf360 evaluate``),
``<results>/train/<run>/summary.json`` and ``<results>/train/<run>/config.yaml``
(``mipnerf360 train``; ``data.factor`` says which images the run used). The metrics, their
headers, formats, directions and published keys are ``mipnerf360.metrics.METRICS``: a new
metric there is a new column here.

Written to OUT_DIR:

* ``runs.csv``: every per-seed value, long format (dataset, scene, variant, seed, metric,
  value), for your own statistics.
* ``<dataset>.{csv,md,tex}``: one row per scene and a mean row; per variant the mean over
  seeds (``± std`` with 2+ seeds), and for every variant but the baseline the difference
  to the baseline, marked ``*`` where it exceeds two standard errors of the paired
  differences (per scene: over the seeds both ran; mean row: over the scenes); beside a
  variant with published numbers, those numbers (rows of another protocol: none). Then
  the same in the paper's layout (one row per variant, mean over scenes; LaTeX: best per
  column in bold) and a provenance section (protocol, published source, archives' sha256).
* ``combined.{csv,md,tex}``: one row per data set (its mean row).
* ``<dataset>_psnr.png``: per-scene PSNR of every variant with error bars over seeds and
  the published number as a marker.

Scene score = mean over test images, data-set score = mean over scenes (multinerf's
``scripts/generate_tables.ipynb``).
"""

from __future__ import annotations

import argparse
import io as _io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mipnerf360 import io
from mipnerf360.errors import UserError
from mipnerf360.metrics import METRICS, Metric

PUBLISHED_FILE = Path(__file__).with_name("published.yaml")

# Training cost per run (from summary.json), shown after the metrics.
COST = {
    "train_time_min": ("train [min]", ".1f"),
    "rays_per_s": ("rays/s", ",.0f"),
    "peak_memory_mb": ("peak mem [MB]", ",.0f"),
    "steps": ("steps", ".0f"),
}


class TablesError(UserError, ValueError):
    """A missing or malformed results file or spec; the message names it."""


def load_published(path: str | os.PathLike = PUBLISHED_FILE) -> dict:
    """The published numbers: {key: {'source', 'protocol', 'scenes': {scene: {...}}, ...}}."""
    data = io.read_yaml(path)
    if not isinstance(data, dict):
        raise TablesError(f"{path}: expected a mapping of published entries")
    return data


def images_name(factor: int) -> str:
    """The image folder a data.factor reads (0 and 1: full resolution)."""
    return "images" if int(factor) <= 1 else f"images_{int(factor)}"


def published_factor(entry: dict, scene: str) -> int | None:
    """The factor the published number of ``scene`` was produced at (None: unknown)."""
    proto = entry.get("protocol") or {}
    factors = proto.get("factors") or {}
    f = factors.get(scene, proto.get("factor"))
    return None if f is None else max(int(f), 1)


# ----------------------------------------------------------------------------- spec


@dataclass
class Spec:
    """What to tabulate: the runs in table order, the variants (order = column order), the
    baseline, each variant's published keys per data set, and the archives' provenance."""

    runs: list[tuple[str, str, str, int]]
    baseline: str
    labels: dict[str, str] = field(default_factory=dict)
    published: dict[str, dict[str, str]] = field(default_factory=dict)  # variant -> {d: key}
    archives: dict[str, dict] = field(default_factory=dict)

    @property
    def variants(self) -> list[str]:
        seen: list[str] = []
        for _, _, v, _ in self.runs:
            if v not in seen:
                seen.append(v)
        if self.baseline in seen:
            seen.remove(self.baseline)
            seen.insert(0, self.baseline)
        return seen

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(d for d, _, _, _ in self.runs))

    def scenes(self, dataset: str) -> list[str]:
        return list(dict.fromkeys(s for d, s, _, _ in self.runs if d == dataset))

    def label(self, variant: str) -> str:
        return self.labels.get(variant, variant)


def spec_from_json(data: dict, where: str = "--spec") -> Spec:
    try:
        runs = [(str(d), str(s), str(v), int(k)) for d, s, v, k in data["runs"]]
        variants = data.get("variants") or {}
        baseline = data.get("baseline") or (runs[0][2] if runs else "")
        return Spec(
            runs=runs,
            baseline=baseline,
            labels={v: x.get("label", v) for v, x in variants.items()},
            published={v: dict(x.get("published") or {}) for v, x in variants.items()},
            archives=dict(data.get("archives") or {}),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise TablesError(f"{where}: not a tables spec ({type(e).__name__}: {e})") from None


def run_dir(run: tuple[str, str, str, int]) -> str:
    d, s, v, k = run
    return f"{d}/{s}/{v}/seed{k}"


def parse_run(item: str) -> tuple[str, str, str, int]:
    """'dataset/scene/variant/seedK' -> (dataset, scene, variant, K)."""
    parts = item.split("/")
    if len(parts) != 4 or not all(parts) or not parts[3].startswith("seed"):
        raise TablesError(f"run {item!r} is not of the form DATASET/SCENE/VARIANT/seedK")
    try:
        seed = int(parts[3][4:])
    except ValueError:
        raise TablesError(f"run {item!r}: {parts[3]!r} is not seed<integer>") from None
    return parts[0], parts[1], parts[2], seed


# ----------------------------------------------------------------------------- reading


def _read_mapping(path: Path, reader) -> dict:
    try:
        data = reader(path)
    except UserError as e:
        msg = str(e)
        if msg.endswith(": not found"):
            msg += " (has that step run?)"
        raise TablesError(msg) from None
    if not isinstance(data, dict):
        raise TablesError(f"{path}: expected a mapping")
    return data


def _num(value) -> float:
    return float("nan") if value is None else float(value)


def read_runs(results: str | os.PathLike, spec: Spec) -> tuple[pd.DataFrame, dict, dict]:
    """Long table (dataset, scene, variant, seed, metric, value) of every run,
    {(dataset, scene, variant, seed): data.factor} and {dataset: {how its runs were trained:
    number of runs}} (for the tables' provenance)."""
    results = Path(results)
    required = [m.name for m in METRICS.values() if m.option is None]
    rows, factors, modes = [], {}, {}
    for run in spec.runs:
        rd = run_dir(run)
        mpath = results / "evaluate" / rd / "metrics.json"
        spath = results / "train" / rd / "summary.json"
        cpath = results / "train" / rd / "config.yaml"
        m = _read_mapping(mpath, io.read_json)
        s = _read_mapping(spath, io.read_json)
        c = _read_mapping(cpath, io.read_yaml)
        for key in required:
            if key not in m:
                raise TablesError(f"{mpath}: missing key {key!r}")
        for key in ("wall_time_s", "rays_per_s", "peak_memory_mb"):
            if key not in s:
                raise TablesError(f"{spath}: missing key {key!r}")
        try:
            factors[run] = max(int((c.get("data") or {})["factor"]), 1)
        except (KeyError, TypeError, ValueError):
            raise TablesError(f"{cpath}: no data.factor") from None
        values = {name: _num(m[name]) for name in METRICS if m.get(name) is not None}
        values["train_time_min"] = _num(s["wall_time_s"]) / 60.0
        values["rays_per_s"] = _num(s["rays_per_s"])
        values["peak_memory_mb"] = _num(s["peak_memory_mb"])
        values["steps"] = _num(s.get("steps"))
        for name, value in values.items():
            rows.append((*run, name, value))
        counts, mode = modes.setdefault(run[0], {}), _training_mode(s)
        counts[mode] = counts.get(mode, 0) + 1
    long = pd.DataFrame(rows, columns=["dataset", "scene", "variant", "seed", "metric", "value"])
    return long, factors, modes


def _training_mode(summary: dict) -> str:
    """How a run was trained, from its summary.json: precision, compile, device and
    processes, torch version."""
    s = summary
    compiled = {True: "compiled", False: "eager"}.get(s.get("compiled"), "compile ?")
    return (
        f"precision {s.get('precision', 'fp32')}, {compiled}, {s.get('device', '?')} x "
        f"{s.get('world_size', 1)} process(es), torch {s.get('torch_version', '?')}"
    )


def shown_metrics(long: pd.DataFrame) -> list[Metric]:
    """The registry's metrics that some run reported (always-on ones always)."""
    have = set(long.loc[long["value"].notna(), "metric"])
    return [m for m in METRICS.values() if m.option is None or m.name in have]


# ----------------------------------------------------------------------------- statistics


def paired_delta(diffs) -> tuple[float, bool]:
    """Mean of paired differences and whether it exceeds two standard errors
    (SE = sample std / sqrt(n); needs n >= 2 finite differences)."""
    d = np.asarray([x for x in diffs if np.isfinite(x)], dtype=np.float64)
    if len(d) == 0:
        return float("nan"), False
    mean = float(d.mean())
    if len(d) < 2:
        return mean, False
    se = float(d.std(ddof=1)) / math.sqrt(len(d))
    return mean, bool(abs(mean) > 2.0 * se)


def _std(values) -> float:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    return float(v.std(ddof=1)) if len(v) >= 2 else float("nan")


def _mean(values) -> float:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    return float(v.mean()) if len(v) else float("nan")


def _values(long: pd.DataFrame, dataset: str, variant: str, metric: str) -> pd.DataFrame:
    """scene x seed matrix of one metric of one variant."""
    sel = long[
        (long["dataset"] == dataset) & (long["variant"] == variant) & (long["metric"] == metric)
    ]
    return sel.pivot_table(index="scene", columns="seed", values="value", aggfunc="first")


def _mean_row_std(mat: pd.DataFrame, scenes: list[str]) -> float:
    """Std over seeds of the scene-mean, over the seeds every scene ran."""
    if mat.empty or any(s not in mat.index for s in scenes):
        return float("nan")
    full = mat.loc[scenes].dropna(axis=1, how="any")
    return _std(full.mean(axis=0).tolist()) if full.shape[1] >= 2 else float("nan")


@dataclass
class DatasetTable:
    """Numbers of one data set: ``df`` (scenes + 'mean' rows, flat columns
    '<variant>:<key>') and what the rendering needs."""

    name: str
    df: pd.DataFrame
    variants: list[str]
    metrics: list[Metric]
    published: dict[str, str]  # variant -> published key
    mismatched: dict[str, tuple[int, int]]  # scene -> (ours, published factor)
    summary: pd.DataFrame  # variants x flat keys (paper layout)


def dataset_table(
    long: pd.DataFrame,
    factors: dict,
    spec: Spec,
    dataset: str,
    pub_all: dict,
) -> DatasetTable:
    scenes = spec.scenes(dataset)
    variants = [v for v in spec.variants if any(r[2] == v and r[0] == dataset for r in spec.runs)]
    metrics = shown_metrics(long[long["dataset"] == dataset])
    base = spec.baseline
    factor_of = {}
    for (d, s, _, _), f in factors.items():
        if d == dataset:
            factor_of.setdefault(s, f)
    published = {v: spec.published.get(v, {}).get(dataset) for v in variants}
    published = {v: k for v, k in published.items() if k}
    for v, key in published.items():
        if key not in pub_all:
            raise TablesError(
                f"{PUBLISHED_FILE.name}: no published numbers for {key!r} (data set "
                f"{dataset!r}, variant {v!r}); known: {sorted(pub_all)}"
            )
    mismatched = {}
    for key in set(published.values()):
        for s in scenes:
            pf = published_factor(pub_all[key], s)
            if pf is not None and s in pub_all[key].get("scenes", {}) and pf != factor_of[s]:
                mismatched[s] = (factor_of[s], pf)

    df = pd.DataFrame(index=[*scenes, "mean"])
    df.index.name = "scene"
    df["images"] = [images_name(factor_of[s]) for s in scenes] + [""]
    summary = pd.DataFrame(index=variants)
    summary.index.name = "variant"
    for v in variants:
        for key in [*(m.name for m in metrics), *COST]:
            mat = _values(long, dataset, v, key)
            means = [_mean(mat.loc[s]) if s in mat.index else math.nan for s in scenes]
            stds = [_std(mat.loc[s]) if s in mat.index else math.nan for s in scenes]
            ran = [s for s, x in zip(scenes, means, strict=True) if np.isfinite(x)]
            mean_all = _mean(means) if len(ran) == len(scenes) else math.nan
            std_all = _mean_row_std(mat, scenes)
            df[f"{v}:{key}"] = [*means, mean_all]
            summary.loc[v, key] = mean_all
            if key in COST:
                continue
            df[f"{v}:{key}_std"] = [*stds, std_all]
            summary.loc[v, f"{key}_std"] = std_all
            if v != base:
                bmat = _values(long, dataset, base, key)
                cells, sigs, scene_diffs = [], [], []
                for s in scenes:
                    if s in mat.index and s in bmat.index:
                        common = [k for k in mat.columns if k in bmat.columns]
                        diffs = [mat.loc[s, k] - bmat.loc[s, k] for k in common]
                        dm, sig = paired_delta(diffs)
                        scene_diffs.append(_mean(mat.loc[s]) - _mean(bmat.loc[s]))
                    else:
                        dm, sig = math.nan, False
                    cells.append(dm)
                    sigs.append(sig)
                dm, sig = paired_delta(scene_diffs)
                if len(scene_diffs) != len(scenes):
                    dm, sig = math.nan, False
                df[f"{v}:d_{key}"] = [*cells, dm]
                df[f"{v}:d_{key}_sig"] = [*sigs, sig]
                summary.loc[v, f"d_{key}"] = dm
                summary.loc[v, f"d_{key}_sig"] = sig
        if v in published:
            entry = pub_all[published[v]].get("scenes", {})
            for m in metrics:
                if not m.published_key:
                    continue
                pub = [
                    _num((entry.get(s) or {}).get(m.published_key))
                    if s not in mismatched
                    else math.nan
                    for s in scenes
                ]
                ours = df[f"{v}:{m.name}"].tolist()[:-1]
                complete = all(np.isfinite(pub))
                pub_mean = _mean(pub) if complete else math.nan
                diff = [o - p for o, p in zip(ours, pub, strict=True)]
                diff_mean = _mean(diff) if complete else math.nan
                df[f"{v}:pub_{m.name}"] = [*pub, pub_mean]
                df[f"{v}:pubd_{m.name}"] = [*diff, diff_mean]
                summary.loc[v, f"pub_{m.name}"] = pub_mean
    return DatasetTable(dataset, df, variants, metrics, published, mismatched, summary)


def combined_table(tables: dict[str, DatasetTable], spec: Spec) -> pd.DataFrame:
    """One row per data set: its mean row (flat columns '<variant>:<key>') + scene count."""
    rows = {}
    for name, t in tables.items():
        row = t.df.loc["mean"].drop(labels=["images"]).to_dict()
        row["scenes"] = len(t.df) - 1
        rows[name] = row
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "dataset"
    return out


# ----------------------------------------------------------------------------- rendering


def _finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _fmt(value, fmt: str) -> str:
    return format(value, fmt) if _finite(value) else "–"


def _tex_escape(s: str) -> str:
    for a, b in [
        ("\\", r"\textbackslash{}"),
        ("_", r"\_"),
        ("%", r"\%"),
        ("&", r"\&"),
        ("#", r"\#"),
        ("±", r"$\pm$"),
        ("Δ", r"$\Delta$"),
        ("–", "--"),
        ("†", r"$^\dagger$"),
    ]:
        s = s.replace(a, b)
    return s


@dataclass
class Cell:
    text: str
    bold: bool = False
    mark: bool = False  # significant difference


def _render_md(
    header: list[str],
    rows: list[tuple[str, list[Cell]]],
    groups: list[tuple[str, int]] = (),
) -> str:
    """A Markdown table; a column of a labelled group is headed '<group>: <name>'."""
    if any(g for g, _ in groups):
        names, col = list(header), 0
        for g, n in groups:
            for i in range(col, col + n):
                names[i] = f"{g}: {header[i]}" if g else header[i]
            col += n
        header = names
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for name, cells in rows:
        shown = []
        for c in cells:
            t = c.text + ("*" if c.mark else "")
            shown.append(f"**{t}**" if c.bold else t)
        first = f"**{name}**" if name == "mean" else name
        lines.append("| " + " | ".join([first, *shown]) + " |")
    return "\n".join(lines) + "\n"


def _render_tex(
    groups: list[tuple[str, int]], header: list[str], rows: list[tuple[str, list[Cell]]]
) -> str:
    """A booktabs tabular with an optional grouped header row (no jinja2 needed)."""
    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule"]
    if any(g for g, _ in groups):
        cells, rules, col = [], [], 1
        for g, n in groups:
            if g:
                cells.append(rf"\multicolumn{{{n}}}{{c}}{{{_tex_escape(g)}}}")
                rules.append(rf"\cmidrule(lr){{{col}-{col + n - 1}}}")
            else:
                cells.extend([""] * n)
            col += n
        lines.append(" & ".join(cells) + r" \\")
        lines.append(" ".join(rules))
    lines.append(" & ".join(_tex_escape(h) for h in header) + r" \\")
    lines.append(r"\midrule")
    for name, cells in rows:
        if name == "mean":
            lines.append(r"\midrule")
        out = [_tex_escape(name)]
        for c in cells:
            t = _tex_escape(c.text) + (r"$^{*}$" if c.mark else "")
            out.append(r"\textbf{" + t + "}" if c.bold else t)
        lines.append(" & ".join(out) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _best(values: list[float], higher: bool) -> set[int]:
    fin = [(i, x) for i, x in enumerate(values) if _finite(x)]
    if len(fin) < 2:
        return set()
    target = max(x for _, x in fin) if higher else min(x for _, x in fin)
    return {i for i, x in fin if x == target}


def _scene_layout(t: DatasetTable, spec: Spec, df: pd.DataFrame | None = None):
    """(groups, header, rows) of the per-scene table (rows: scenes + mean)."""
    df = t.df if df is None else df
    many = len(t.variants) > 1
    groups: list[tuple[str, int]] = [("", 2 if "images" in df.columns else 1)]
    header = [df.index.name or "scene", "images"]
    cols: list[tuple[str, str, str]] = []  # (kind, variant, key)
    for v in t.variants:
        n0 = len(cols)
        for m in t.metrics:
            cols.append(("value", v, m.name))
        if v != spec.baseline:
            for m in t.metrics:
                cols.append(("delta", v, m.name))
        if v in t.published:
            for m in t.metrics:
                if m.published_key:
                    cols.append(("pub", v, m.name))
        cols.append(("cost", v, "train_time_min"))
        groups.append((spec.label(v) if many else "", len(cols) - n0))
    for kind, _, key in cols:
        label = METRICS[key].label if key in METRICS else COST[key][0]
        header.append(
            {"value": label, "delta": f"Δ {label}", "pub": f"pub. {label}"}.get(kind, label)
        )
    rows = []
    for idx in df.index:
        cells: list[Cell] = []
        if "images" in df.columns:
            img = df.loc[idx, "images"]
            cells.append(Cell(str(img) + (" †" if idx in t.mismatched else "")))
        for kind, v, key in cols:
            if kind == "value":
                m = METRICS[key]
                x, sd = df.loc[idx, f"{v}:{key}"], df.loc[idx, f"{v}:{key}_std"]
                text = _fmt(x, m.fmt) + (f" ± {_fmt(sd, m.fmt)}" if _finite(sd) else "")
                vals = [df.loc[idx, f"{w}:{key}"] for w in t.variants]
                best = t.variants.index(v) in _best(vals, m.higher_is_better) if many else False
                cells.append(Cell(text, bold=best))
            elif kind == "delta":
                m = METRICS[key]
                x = df.loc[idx, f"{v}:d_{key}"]
                sig = bool(df.loc[idx, f"{v}:d_{key}_sig"]) if _finite(x) else False
                cells.append(Cell(_fmt(x, "+" + m.fmt), mark=sig))
            elif kind == "pub":
                cells.append(Cell(_fmt(df.loc[idx, f"{v}:pub_{key}"], METRICS[key].fmt)))
            else:
                cells.append(Cell(_fmt(df.loc[idx, f"{v}:{key}"], COST[key][1])))
        rows.append((str(idx), cells))
    if "images" not in df.columns:
        header.remove("images")
    return groups, header, rows


def _summary_layout(t: DatasetTable, spec: Spec):
    """(header, rows) of the paper layout: one row per variant, mean over scenes."""
    header = ["", *(m.label for m in t.metrics)]
    has_delta = len(t.variants) > 1
    has_pub = bool(t.published)
    if has_delta:
        header += [f"Δ {m.label}" for m in t.metrics]
    pub_metrics = [m for m in t.metrics if m.published_key]
    if has_pub:
        header += [f"pub. {m.label}" for m in pub_metrics]
    header += [COST["train_time_min"][0]]
    s = t.summary
    best = {m.name: _best(s[m.name].tolist(), m.higher_is_better) for m in t.metrics}
    rows = []
    for i, v in enumerate(t.variants):
        cells = []
        for m in t.metrics:
            sd = s.loc[v, f"{m.name}_std"]
            text = _fmt(s.loc[v, m.name], m.fmt) + (f" ± {_fmt(sd, m.fmt)}" if _finite(sd) else "")
            cells.append(Cell(text, bold=i in best[m.name]))
        if has_delta:
            for m in t.metrics:
                if v == spec.baseline:
                    cells.append(Cell(""))
                    continue
                x = s.loc[v, f"d_{m.name}"]
                sig = bool(s.loc[v, f"d_{m.name}_sig"]) if _finite(x) else False
                cells.append(Cell(_fmt(x, "+" + m.fmt), mark=sig))
        if has_pub:
            for m in pub_metrics:
                key = f"pub_{m.name}"
                x = s.loc[v, key] if key in s.columns else math.nan
                cells.append(Cell(_fmt(x, m.fmt)))
        cells.append(Cell(_fmt(s.loc[v, "train_time_min"], COST["train_time_min"][1])))
        rows.append((spec.label(v), cells))
    return header, rows


def _protocol_lines(t: DatasetTable, pub_all: dict) -> list[str]:
    lines = []
    for v, key in t.published.items():
        entry = pub_all[key]
        proto = (entry.get("protocol") or {}).get("name", "unknown")
        text = f"Published ({key}, beside {v}): {entry.get('source', key)}; protocol: {proto}"
        if entry.get("train_time_h") is not None:
            text += f"; their training time {entry['train_time_h']} h per scene"
        lines.append(text + ".")
    if t.mismatched:
        items = ", ".join(
            f"{s} ({images_name(a)}, published {images_name(b)})"
            for s, (a, b) in t.mismatched.items()
        )
        lines.append(f"† not the published protocol, no comparison printed: {items}.")
    elif t.published:
        lines.append("Every row used the published protocol's images.")
    return lines


def _stats_line(spec: Spec, dataset: str) -> str:
    seeds = sorted({k for d, _, _, k in spec.runs if d == dataset})
    line = f"Mean over {len(seeds)} seed(s) ({', '.join(map(str, seeds))})"
    if len(seeds) > 1:
        line += ", ± standard deviation over seeds"
    return (
        line + f". Δ = variant − baseline ({spec.label(spec.baseline)}); * = more than two "
        "standard errors of the paired differences (per scene: over seeds; mean: over scenes)."
    )


def _archive_lines(spec: Spec, datasets: list[str]) -> list[str]:
    lines = []
    for key, a in sorted(spec.archives.items()):
        if datasets and not set(a.get("datasets") or datasets) & set(datasets):
            continue
        if a.get("sha256"):
            how = f"sha256 {a['sha256']} (pinned)"
        else:
            rec = a.get("record")
            parts = Path(rec).read_text().split() if rec and os.path.exists(rec) else []
            value = parts[0] if parts else None
            how = (
                f"sha256 {value} (not pinned; recorded at first download in {rec})"
                if value
                else f"sha256 not pinned and not recorded ({rec} missing)"
            )
        lines.append(f"Archive {key}: {a.get('url', '')} — {how}.")
    return lines


def _write_files(
    out_dir: Path,
    name: str,
    csv_df: pd.DataFrame,
    md_parts: list[str],
    tex_parts: list[str],
) -> None:
    io.write_text(out_dir / f"{name}.csv", csv_df.to_csv(float_format="%.10g"))
    io.write_text(out_dir / f"{name}.md", "\n".join(md_parts))
    io.write_text(out_dir / f"{name}.tex", "\n".join(tex_parts))


def _tex_table(body: str, caption: str) -> str:
    return "\n".join(
        [r"\begin{table}[t]", r"\centering", r"\small", body.rstrip("\n"),
         r"\caption{" + _tex_escape(caption) + "}", r"\end{table}", ""]
    )  # fmt: skip


def _mode_lines(modes: dict[str, dict[str, int]], datasets: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    for d in datasets:
        for mode, n in modes.get(d, {}).items():
            counts[mode] = counts.get(mode, 0) + n
    return [f"Trained with {mode}: {n} run(s)." for mode, n in counts.items()]


def write_dataset(
    t: DatasetTable, spec: Spec, pub_all: dict, out_dir: Path, modes: dict | None = None
) -> None:
    groups, header, rows = _scene_layout(t, spec)
    s_header, s_rows = _summary_layout(t, spec)
    notes = [_stats_line(spec, t.name), *_protocol_lines(t, pub_all)]
    prov = _archive_lines(spec, [t.name]) + _mode_lines(modes or {}, [t.name])
    title = f"{t.name}: per scene"
    md = [
        f"## {title}",
        "",
        _render_md(header, rows, groups),
        f"## {t.name}: mean over scenes",
        "",
        _render_md(s_header, s_rows),
        "Notes: " + " ".join(notes),
        "",
        "### Provenance",
        "",
        *[f"- {line}" for line in prov or ["No downloaded archives (local or generated scenes)."]],
        "",
    ]
    tex = [
        _tex_table(_render_tex(groups, header, rows), f"{title}. " + " ".join(notes)),
        _tex_table(
            _render_tex([("", 1)], s_header, s_rows),
            f"{t.name}: mean over scenes (bold: best per column).",
        ),
        *[f"% {line}" for line in prov],
        "",
    ]
    _write_files(out_dir, t.name, t.df, md, tex)


def write_combined(
    tables: dict[str, DatasetTable], spec: Spec, out_dir: Path, modes: dict | None = None
) -> pd.DataFrame:
    comb = combined_table(tables, spec)
    first = next(iter(tables.values()))
    # one layout for all data sets: the metrics and variants they share
    proxy = DatasetTable(
        "combined",
        comb.drop(columns=["scenes"]),
        spec.variants,
        [m for m in first.metrics if all(m in t.metrics for t in tables.values())],
        {},
        {},
        first.summary,
    )
    proxy.variants = [v for v in spec.variants if all(v in t.variants for t in tables.values())]
    groups, header, rows = _scene_layout(proxy, spec, proxy.df)
    header[0] = "dataset"
    prov = _archive_lines(spec, []) + _mode_lines(modes or {}, list(tables))
    md = [
        "## Data-set means (mean over scenes)",
        "",
        _render_md(header, rows, groups),
        "### Provenance",
        "",
        *[f"- {line}" for line in prov or ["No downloaded archives (local or generated scenes)."]],
        "",
    ]
    tex = [
        _tex_table(_render_tex(groups, header, rows), "Data-set means (mean over scenes)."),
        *[f"% {line}" for line in prov],
        "",
    ]
    _write_files(out_dir, "combined", comb, md, tex)
    return comb


def psnr_figure(t: DatasetTable, spec: Spec, pub_all: dict, path: Path) -> None:
    """Per-scene PSNR of every variant (bars: mean over seeds, error bars: std), published
    numbers as black markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "psnr"
    scenes = list(t.df.index[:-1])
    n = len(t.variants)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(scenes) * max(1, n) ** 0.5), 3.2))
    x = np.arange(len(scenes))
    marked = False
    for i, v in enumerate(t.variants):
        means = t.df.loc[scenes, f"{v}:{key}"].to_numpy(dtype=float)
        stds = t.df.loc[scenes, f"{v}:{key}_std"].to_numpy(dtype=float)
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, means, width, yerr=np.where(np.isfinite(stds), stds, 0.0), capsize=2,
               label=spec.label(v))  # fmt: skip
        pcol = f"{v}:pub_{key}"
        if pcol in t.df.columns:
            pub = t.df.loc[scenes, pcol].to_numpy(dtype=float)
            ok = np.isfinite(pub)
            if ok.any():
                ax.plot(pos[ok], pub[ok], "k_", markersize=14, markeredgewidth=2,
                        label=None if marked else "published")  # fmt: skip
                marked = True
    ax.set_xticks(x, scenes, rotation=30 if len(scenes) > 4 else 0)
    ax.set_ylabel("test PSNR [dB]")
    ax.set_title(f"{t.name}: PSNR per scene")
    fin = t.df[[f"{v}:{key}" for v in t.variants]].to_numpy(dtype=float)
    if np.isfinite(fin).any():
        ax.set_ylim(max(0.0, float(np.nanmin(fin)) - 3.0), None)
    ax.legend(fontsize=7, ncol=min(n + 1, 3))
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    io.write_bytes(path, buf.getvalue())


def make_tables(
    results: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: Spec,
    published_file: str | os.PathLike = PUBLISHED_FILE,
    figures: bool = True,
) -> dict[str, pd.DataFrame]:
    """Build and write every table and figure; returns {dataset: table, ..., 'combined',
    'runs' (the long table)}."""
    if not spec.runs:
        raise TablesError("no runs to tabulate")
    if spec.baseline not in spec.variants:
        raise TablesError(f"baseline variant {spec.baseline!r} has no runs")
    out_dir = Path(out_dir)
    wanted = any(spec.published.values())
    pub_all = load_published(published_file) if wanted else {}
    long, factors, modes = read_runs(results, spec)
    io.write_text(out_dir / "runs.csv", long.to_csv(index=False, float_format="%.10g"))
    tables = {}
    for d in spec.datasets:
        t = dataset_table(long, factors, spec, d, pub_all)
        write_dataset(t, spec, pub_all, out_dir, modes)
        if figures:
            psnr_figure(t, spec, pub_all, out_dir / f"{d}_psnr.png")
        tables[d] = t
    comb = write_combined(tables, spec, out_dir, modes)
    out = {d: t.df for d, t in tables.items()}
    out["combined"] = comb
    out["runs"] = long
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mipnerf360 tables", description=__doc__.split("\n")[0])
    p.add_argument("out_dir", help="folder for the tables (e.g. results/tables)")
    p.add_argument("runs", nargs="*", help="DATASET/SCENE/VARIANT/seedK items, in table order")
    p.add_argument("--results", default="results", help="results folder of the workflow")
    p.add_argument("--spec", default=None, help="JSON (or a JSON file) written by the workflow")
    p.add_argument(
        "--published",
        action="append",
        default=[],
        metavar="DATASET=KEY",
        help="compare the baseline of DATASET with published numbers KEY (360, llff_256, ...)",
    )
    p.add_argument("--no-figures", action="store_true", help="tables only")
    a = p.parse_intermixed_args(argv)
    if a.spec is not None:
        if a.runs or a.published:
            raise TablesError("--spec describes the runs: no RUN arguments or --published")
        text = a.spec
        if not text.lstrip().startswith("{"):
            text = Path(a.spec).read_text() if Path(a.spec).is_file() else text
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TablesError(f"--spec: not valid JSON: {e}") from None
        spec = spec_from_json(data)
    else:
        if not a.runs:
            raise TablesError("no runs given (DATASET/SCENE/VARIANT/seedK ... or --spec)")
        runs = [parse_run(r) for r in a.runs]
        pub = {}
        for item in a.published:
            if "=" not in item:
                raise TablesError(f"--published {item!r} is not of the form DATASET=KEY")
            d, k = item.split("=", 1)
            if d not in {r[0] for r in runs}:
                raise TablesError(f"--published {d}={k}: no runs of data set {d!r} given")
            pub[d] = k
        spec = Spec(runs=runs, baseline=runs[0][2], published={runs[0][2]: pub})
    tables = make_tables(a.results, a.out_dir, spec, figures=not a.no_figures)
    print(f"{len(spec.runs)} runs, {len(tables) - 2} data set(s): tables in {a.out_dir}")
    return 0
