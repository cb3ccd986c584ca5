rule prepare:
    """Validate a scene, make downsampled images and write the manifest."""
    input:
        scene_input,
    output:
        "results/prepare/{dataset}/{scene}/manifest.json",
    log:
        "logs/prepare/{dataset}/{scene}.log",
    conda:
        "../../envs/mipnerf360.yaml"
    params:
        scene=scene_dir,
        dataset_type=lambda wc: scene_settings(wc.dataset, wc.scene)["dataset_type"],
        factor=lambda wc: scene_settings(wc.dataset, wc.scene)["factor"],
    shell:
        "mipnerf360 prepare {params.scene:q} {output:q} --dataset-type {params.dataset_type}"
        " --factor {params.factor} > {log} 2>&1"
