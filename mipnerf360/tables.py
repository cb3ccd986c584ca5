"""Paper-style result tables (``mipnerf360 tables``).

    mipnerf360 tables OUT_DIR --results results DATASET/SCENE ... [--published DATASET=KEY]

Reads ``<results>/evaluate/<dataset>/<scene>/metrics.json`` (``mipnerf360 evaluate``) and
``<results>/train/<dataset>/<scene>/summary.json`` (``mipnerf360 train``) and writes, per
data set, a table of scenes x (PSNR, SSIM, LPIPS, training time, rays/s, peak memory) with
the mean row, beside the published numbers (``published.yaml``, keyed by config name:
``360``, ``blender_256``, ...) and the differences (ours - published), as
``OUT_DIR/<dataset>.{csv,md,tex}``; plus ``OUT_DIR/combined.{csv,md,tex}`` with one mean row
per data set. Scene score = mean over test images, data-set score = mean over scenes
(multinerf's generate_tables.ipynb; reference spec section 11).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from mipnerf360.errors import UserError

PUBLISHED_FILE = Path(__file__).with_name("published.yaml")

# column -> (header in md/tex, number format)
COLUMNS = {
    "psnr": ("PSNR", "{:.2f}"),
    "ssim": ("SSIM", "{:.3f}"),
    "lpips": ("LPIPS", "{:.3f}"),
    "lpips_alex": ("LPIPS (Alex)", "{:.3f}"),
    "train_time_min": ("train [min]", "{:.1f}"),
    "steps": ("steps", "{:.0f}"),
    "rays_per_s": ("rays/s", "{:,.0f}"),
    "peak_memory_mb": ("peak mem [MB]", "{:,.0f}"),
    "pub_psnr": ("pub. PSNR", "{:.2f}"),
    "pub_ssim": ("pub. SSIM", "{:.3f}"),
    "pub_lpips": ("pub. LPIPS", "{:.3f}"),
    "d_psnr": ("Δ PSNR", "{:+.2f}"),
    "d_ssim": ("Δ SSIM", "{:+.3f}"),
    "d_lpips": ("Δ LPIPS", "{:+.3f}"),
    "scenes": ("scenes", "{:.0f}"),
}
METRICS = ("psnr", "ssim", "lpips")


class TablesError(UserError, ValueError):
    """A missing or malformed results file; the message names it."""


def load_published(path: str | os.PathLike = PUBLISHED_FILE) -> dict:
    """The published numbers: {config key: {'scenes': {scene: {psnr, ssim, lpips}}, ...}}."""
    with open(path) as f:
        return yaml.safe_load(f)


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise TablesError(f"{path}: not found (has that step run?)") from None
    except json.JSONDecodeError as e:
        raise TablesError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TablesError(f"{path}: expected a JSON object")
    return data


def _num(value) -> float:
    return float("nan") if value is None else float(value)


def scene_row(results: str | os.PathLike, dataset: str, scene: str) -> dict:
    """Our numbers for one scene, from its metrics.json and summary.json."""
    results = Path(results)
    mpath = results / "evaluate" / dataset / scene / "metrics.json"
    spath = results / "train" / dataset / scene / "summary.json"
    m, s = _read_json(mpath), _read_json(spath)
    for key in ("psnr", "ssim"):
        if key not in m:
            raise TablesError(f"{mpath}: missing key {key!r}")
    for key in ("wall_time_s", "rays_per_s", "peak_memory_mb"):
        if key not in s:
            raise TablesError(f"{spath}: missing key {key!r}")
    return {
        "psnr": _num(m["psnr"]),
        "ssim": _num(m["ssim"]),
        "lpips": _num(m.get("lpips_vgg")),
        "lpips_alex": _num(m.get("lpips_alex")),
        "train_time_min": _num(s["wall_time_s"]) / 60.0,
        "steps": _num(s.get("steps")),
        "rays_per_s": _num(s["rays_per_s"]),
        "peak_memory_mb": _num(s["peak_memory_mb"]),
    }


def dataset_table(
    results: str | os.PathLike,
    dataset: str,
    scenes: list[str],
    published: dict | None = None,
) -> pd.DataFrame:
    """Scenes x metrics (+ published and differences when ``published`` is given), with a
    final 'mean' row (mean over scenes of every column)."""
    rows = {s: scene_row(results, dataset, s) for s in scenes}
    df = pd.DataFrame.from_dict(rows, orient="index")
    if published is not None:
        pub_scenes = published.get("scenes", {})
        for k in METRICS:
            df[f"pub_{k}"] = [_num(pub_scenes.get(s, {}).get(k)) for s in scenes]
        for k in METRICS:
            df[f"d_{k}"] = df[k] - df[f"pub_{k}"]
    df.loc["mean"] = df.mean(axis=0, skipna=True)
    df.index.name = "scene"
    return df


def combined_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per data set: its mean row, plus the number of scenes."""
    rows = {}
    for name, df in tables.items():
        row = df.loc["mean"].to_dict()
        row["scenes"] = len(df) - 1
        rows[name] = row
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "dataset"
    return out


def _fmt(col: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return COLUMNS.get(col, ("", "{}"))[1].format(value)


def _formatted(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(index=df.index)
    for col in df.columns:
        out[COLUMNS.get(col, (col,))[0]] = [_fmt(col, v) for v in df[col]]
    return out


def to_markdown(df: pd.DataFrame) -> str:
    f = _formatted(df)
    header = [df.index.name or ""] + list(f.columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for idx, row in f.iterrows():
        name = f"**{idx}**" if idx == "mean" else str(idx)
        lines.append("| " + " | ".join([name, *row.tolist()]) + " |")
    return "\n".join(lines) + "\n"


def _tex_escape(s: str) -> str:
    for a, b in [
        ("\\", r"\textbackslash{}"),
        ("_", r"\_"),
        ("%", r"\%"),
        ("&", r"\&"),
        ("#", r"\#"),
        ("Δ", r"$\Delta$"),
    ]:
        s = s.replace(a, b)
    return s


def to_latex(df: pd.DataFrame, caption: str = "") -> str:
    """A booktabs tabular (no jinja2 needed)."""
    f = _formatted(df)
    header = [df.index.name or ""] + list(f.columns)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\begin{tabular}{l" + "r" * len(f.columns) + "}",
        r"\toprule",
        " & ".join(_tex_escape(h) for h in header) + r" \\",
        r"\midrule",
    ]
    for idx, row in f.iterrows():
        if idx == "mean":
            lines.append(r"\midrule")
        cells = [_tex_escape(str(idx)), *(_tex_escape(c) for c in row.tolist())]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(r"\caption{" + _tex_escape(caption) + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_table(df: pd.DataFrame, out_dir: str | os.PathLike, name: str, caption: str) -> None:
    """``<out_dir>/<name>.csv`` (full precision), ``.md`` and ``.tex`` (rounded)."""
    out_dir = Path(out_dir)
    _write_atomic(out_dir / f"{name}.csv", df.to_csv(float_format="%.10g"))
    _write_atomic(out_dir / f"{name}.md", f"{caption}\n\n{to_markdown(df)}")
    _write_atomic(out_dir / f"{name}.tex", to_latex(df, caption))


def make_tables(
    results: str | os.PathLike,
    out_dir: str | os.PathLike,
    scenes: list[tuple[str, str]],
    published_keys: dict[str, str] | None = None,
    published_file: str | os.PathLike = PUBLISHED_FILE,
) -> dict[str, pd.DataFrame]:
    """Build and write every table; returns {dataset: table, ..., 'combined': table}."""
    published_keys = published_keys or {}
    pub_all = load_published(published_file) if published_keys else {}
    by_ds: dict[str, list[str]] = {}
    for d, s in scenes:
        by_ds.setdefault(d, []).append(s)
    for d, key in published_keys.items():
        if d not in by_ds:
            raise TablesError(f"--published {d}={key}: no scenes of data set {d!r} given")
        if key not in pub_all:
            raise TablesError(
                f"{published_file}: no published numbers for {key!r} "
                f"(data set {d!r}); known: {sorted(pub_all)}"
            )
    tables = {}
    for d, names in by_ds.items():
        pub = pub_all.get(published_keys[d]) if d in published_keys else None
        df = dataset_table(results, d, names, pub)
        cap = f"{d}: ours"
        if pub is not None:
            cap += f" vs. {pub.get('source', published_keys[d])} (Δ = ours - published)"
        write_table(df, out_dir, d, cap)
        tables[d] = df
    comb = combined_table(tables)
    write_table(comb, out_dir, "combined", "Data-set means (mean over scenes)")
    tables["combined"] = comb
    return tables


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mipnerf360 tables", description=__doc__.split("\n")[0])
    p.add_argument("out_dir", help="folder for the tables (e.g. results/tables)")
    p.add_argument("scenes", nargs="+", help="DATASET/SCENE items, in table order")
    p.add_argument("--results", default="results", help="results folder of the workflow")
    p.add_argument(
        "--published",
        action="append",
        default=[],
        metavar="DATASET=KEY",
        help="compare DATASET with the published numbers KEY (360, blender_256, llff_256, ...)",
    )
    a = p.parse_intermixed_args(argv)
    try:
        scenes = []
        for item in a.scenes:
            if item.count("/") != 1 or not all(item.split("/")):
                raise TablesError(f"scene {item!r} is not of the form DATASET/SCENE")
            scenes.append(tuple(item.split("/")))
        keys = {}
        for item in a.published:
            if "=" not in item:
                raise TablesError(f"--published {item!r} is not of the form DATASET=KEY")
            d, k = item.split("=", 1)
            keys[d] = k
        tables = make_tables(a.results, a.out_dir, scenes, keys)
    except TablesError as e:
        print(f"mipnerf360 tables: error: {e}", file=sys.stderr)
        return 1
    print(to_markdown(tables["combined"]))
    return 0
