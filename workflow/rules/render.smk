rule render:
    """Render the test views of a trained model (color/, gt/, depth/, acc/)."""
    input:
        model="results/train/{dataset}/{scene}/model.pt",
        scene="results/prepare/{dataset}/{scene}/scene",
    output:
        renders="results/render/{dataset}/{scene}/renders.json",
        color=report(
            directory("results/render/{dataset}/{scene}/color"),
            patterns=["{view}.png"],
            caption="../report/test_views.rst",
            category="Test views",
            subcategory="{dataset}",
            labels={"data set": "{dataset}", "scene": "{scene}", "view": "{view}"},
        ),
    log:
        "logs/render/{dataset}/{scene}.log",
    conda:
        "../../envs/mipnerf360.yaml"
    threads: step_resources("render")["threads"]
    resources:
        mem_mb=step_resources("render")["mem_mb"],
        runtime=step_resources("render")["runtime"],
        gpu=step_resources("render")["gpu"],
    params:
        train_dir=subpath(input.model, parent=True),
        outdir=subpath(output.renders, parent=True),
        device=device_args(),
    shell:
        "mipnerf360 render {params.train_dir:q} {input.scene:q} {params.outdir:q} {params.device} > {log} 2>&1"
