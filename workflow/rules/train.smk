rule train:
    """Train one scene. Checkpoints (not an output) survive a failed or requeued job and
    --resume continues from the latest; model.pt is written last."""
    input:
        manifest="results/prepare/{dataset}/{scene}/manifest.json",
        scene="results/prepare/{dataset}/{scene}/scene",
    output:
        model="results/train/{dataset}/{scene}/model.pt",
        summary="results/train/{dataset}/{scene}/summary.json",
        metrics="results/train/{dataset}/{scene}/metrics.csv",
        config="results/train/{dataset}/{scene}/config.yaml",
        curves=report(
            "results/train/{dataset}/{scene}/curves.png",
            caption="../report/curves.rst",
            category="Training curves",
            subcategory="{dataset}",
            labels={"data set": "{dataset}", "scene": "{scene}"},
        ),
    log:
        "logs/train/{dataset}/{scene}.log",
    benchmark:
        "results/benchmarks/train/{dataset}/{scene}.tsv"
    conda:
        "../../envs/mipnerf360.yaml"
    threads: train_resource("threads")
    resources:
        mem_mb=train_resource("mem_mb"),
        runtime=train_resource("runtime"),
        gpu=train_resource("gpu"),
    params:
        outdir=subpath(output.model, parent=True),
        args=train_args,
        key=resume_key,
        device=device_args(),
    shell:
        # Resume only checkpoints of the same settings (resume.key is not an output, so it
        # survives a failed job like the checkpoints do).
        "mkdir -p {params.outdir:q};"
        ' if [ "$(cat {params.outdir:q}/resume.key 2>/dev/null)" != {params.key} ]; then'
        " rm -rf {params.outdir:q}/checkpoints; fi;"
        " echo {params.key} > {params.outdir:q}/resume.key;"
        " mipnerf360 train {input.scene:q} {params.outdir:q} {params.args}"
        " --manifest {input.manifest:q} --resume --no-progress --threads {threads}"
        " {params.device} > {log} 2>&1"
