rule tables:
    """Per-data-set and combined tables beside the published numbers."""
    input:
        metrics=all_scene_files("results/evaluate/{dataset}/{scene}/metrics.json"),
        summaries=all_scene_files("results/train/{dataset}/{scene}/summary.json"),
    output:
        [
            report(
                f,
                caption="../report/tables.rst",
                category="Tables",
                labels={"table": os.path.basename(f)},
            )
            for f in TABLE_FILES
        ],
    log:
        "logs/tables/tables.log",
    conda:
        "../../envs/mipnerf360.yaml"
    params:
        scenes=" ".join(f"{d}/{s}" for d, s in SCENES),
        published=published_args(),
    shell:
        "mipnerf360 tables results/tables --results results {params.scenes}"
        " {params.published} > {log} 2>&1"
