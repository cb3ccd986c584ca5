rule evaluate:
    """PSNR / SSIM / LPIPS of the rendered test views."""
    input:
        renders="results/render/{dataset}/{scene}/renders.json",
        config="results/train/{dataset}/{scene}/config.yaml",
    output:
        metrics="results/evaluate/{dataset}/{scene}/metrics.json",
        csv="results/evaluate/{dataset}/{scene}/metrics.csv",
    log:
        "logs/evaluate/{dataset}/{scene}.log",
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
    shell:
        "mipnerf360 evaluate {params.render_dir:q} {params.outdir:q} --config {input.config:q} {params.lpips} > {log} 2>&1"
