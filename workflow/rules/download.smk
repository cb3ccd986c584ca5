rule download:
    """Fetch (resumable, or take the copy already in resources/) and extract an archive."""
    output:
        directory(f"{ARCHIVE_DIR}/{{archive}}"),
    log:
        "logs/download/{archive}.log",
    conda:
        "../../envs/mipnerf360.yaml"
    params:
        args=archive_args,
    shell:
        "mipnerf360 download {params.args} --dest {output} > {log} 2>&1"


rule generate:
    """Write a procedural scene of the built-in benchmark."""
    output:
        directory("results/generate/{dataset}/{scene}"),
    log:
        "logs/generate/{dataset}/{scene}.log",
    conda:
        "../../envs/mipnerf360.yaml"
    params:
        args=generate_args,
    shell:
        "mipnerf360 generate {params.args} {output} > {log} 2>&1"
