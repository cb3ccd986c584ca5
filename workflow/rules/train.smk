rule train:
    """Train one run (data set x scene x variant x seed). The package decides what a run
    is (scene data + training settings): --resume continues a run of the same identity
    (a finished one re-emits its outputs at once), --restart-on-change moves a run of
    another identity to previous/ and starts over. Checkpoints are not outputs: they
    survive Snakemake deleting the outputs of a job it reruns."""
    input:
        manifest="results/prepare/{dataset}/{scene}/manifest.json",
        scene="results/prepare/{dataset}/{scene}/scene",
    output:
        model=f"results/train/{RUN_DIR}/model.pt",
        summary=f"results/train/{RUN_DIR}/summary.json",
        metrics=f"results/train/{RUN_DIR}/metrics.csv",
        config=f"results/train/{RUN_DIR}/config.yaml",
        curves=report(
            f"results/train/{RUN_DIR}/curves.png",
            caption="../report/curves.rst",
            category="Training curves",
            subcategory="{dataset}",
            labels={
                "data set": "{dataset}",
                "scene": "{scene}",
                "variant": "{variant}",
                "seed": "{seed}",
            },
        ),
    log:
        f"logs/train/{RUN_DIR}.log",
    benchmark:
        f"results/benchmarks/train/{RUN_DIR}.tsv"
    conda:
        "../../envs/mipnerf360.yaml"
    threads: train_resource("threads")
    resources:
        mem_mb=train_resource("mem_mb"),
        runtime=train_resource("runtime"),
        gpu=train_resource("gpu"),
        # one training on N GPUs (or N CPU processes) of one node: N data-parallel ranks
        processes=train_resource("processes"),
        nodes=1,
        device=DEVICE,
    params:
        outdir=subpath(output.model, parent=True),
        args=train_args,
    shell:
        "mipnerf360 train {input.scene:q} {params.outdir:q} {params.args}"
        " --manifest {input.manifest:q} --resume --restart-on-change --no-progress"
        " --threads {threads} --device {resources.device}"
        " --nproc-per-node {resources.processes} > {log} 2>&1"
