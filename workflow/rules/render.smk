rule render:
    """Render the test views of a trained model (color/, gt/, depth/, acc/)."""
    input:
        model=f"results/train/{RUN_DIR}/model.pt",
        scene="results/prepare/{dataset}/{scene}/scene",
    output:
        renders=f"results/render/{RUN_DIR}/renders.json",
        color=report(
            directory(f"results/render/{RUN_DIR}/color"),
            patterns=["{view}.png"],
            caption="../report/test_views.rst",
            category="Test views",
            subcategory="{dataset}",
            labels={
                "data set": "{dataset}",
                "scene": "{scene}",
                "variant": "{variant}",
                "seed": "{seed}",
                "view": "{view}",
            },
        ),
    log:
        f"logs/render/{RUN_DIR}.log",
    conda:
        "../../envs/mipnerf360.yaml"
    threads: step_resources("render")["threads"]
    resources:
        mem_mb=step_resources("render")["mem_mb"],
        runtime=step_resources("render")["runtime"],
        gpu=step_resources("render")["gpu"],
        device=DEVICE,
    params:
        train_dir=subpath(input.model, parent=True),
        outdir=subpath(output.renders, parent=True),
        eval=eval_args,
    shell:
        "mipnerf360 render {params.train_dir:q} {input.scene:q} {params.outdir:q}"
        " --device {resources.device} {params.eval} > {log} 2>&1"
