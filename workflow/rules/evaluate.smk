rule evaluate:
    """The metrics of mipnerf360.metrics.METRICS for the rendered test views; the eval.*
    settings and the `metrics:` section are params of this step (and render), not of
    training."""
    input:
        renders=f"results/render/{RUN_DIR}/renders.json",
        config=f"results/train/{RUN_DIR}/config.yaml",
    output:
        metrics=f"results/evaluate/{RUN_DIR}/metrics.json",
        csv=f"results/evaluate/{RUN_DIR}/metrics.csv",
    log:
        f"logs/evaluate/{RUN_DIR}.log",
    conda:
        "../../envs/mipnerf360.yaml"
    threads: step_resources("evaluate")["threads"]
    resources:
        mem_mb=step_resources("evaluate")["mem_mb"],
        runtime=step_resources("evaluate")["runtime"],
        gpu=step_resources("evaluate")["gpu"],
    params:
        render_dir=subpath(input.renders, parent=True),
        outdir=subpath(output.metrics, parent=True),
        lpips=LPIPS_ARGS,
        eval=eval_args,
    shell:
        "mipnerf360 evaluate {params.render_dir:q} {params.outdir:q} --config {input.config:q}"
        " {params.lpips} {params.eval} > {log} 2>&1"
