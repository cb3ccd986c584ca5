rule tables:
    """Per-data-set and combined tables (every variant, mean +/- std over seeds, deltas to
    the baseline, published numbers beside), the long-format runs.csv and one PSNR figure
    per data set."""
    input:
        metrics=run_files("results/evaluate/{run}/metrics.json"),
        summaries=run_files("results/train/{run}/summary.json"),
        configs=run_files("results/train/{run}/config.yaml"),
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
        [
            report(
                f,
                caption="../report/figure.rst",
                category="Figures",
                labels={"figure": os.path.basename(f)},
            )
            for f in FIGURE_FILES
        ],
    log:
        "logs/tables/tables.log",
    conda:
        "../../envs/mipnerf360.yaml"
    params:
        spec=tables_spec(),
    shell:
        "mipnerf360 tables results/tables --results results --spec {params.spec:q}"
        " > {log} 2>&1"
