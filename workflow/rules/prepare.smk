rule prepare:
    """Validate a scene, make downsampled images and write the manifest. The prepared scene
    (links to the source + images_<factor>) is what training and rendering read. Loader
    settings (data.*, incl. data.factor and data.dataset_type) come from the scene's preset
    and overrides, resolved once in common.smk and passed explicitly."""
    input:
        scene_input,
    output:
        manifest="results/prepare/{dataset}/{scene}/manifest.json",
        scene=directory("results/prepare/{dataset}/{scene}/scene"),
    log:
        "logs/prepare/{dataset}/{scene}.log",
    conda:
        "../../envs/mipnerf360.yaml"
    params:
        source=scene_dir,
        args=prepare_args,
    shell:
        "mipnerf360 prepare {params.source:q} {output.manifest:q} {params.args} > {log} 2>&1"
