"""The ``mipnerf360`` command: ``mipnerf360 <command> [args]``.

Each command lives in the module that owns the concept and exposes ``main(argv)``;
this file only dispatches, importing the module lazily so ``--help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys

# Idle OpenMP threads spin by default; on small shared CPUs that slows training several
# times (measured 4x for the cpu preset on 2 cores). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# command -> (module, function, one-line help)
COMMANDS = {
    "train": ("mipnerf360.train", "main", "train a model on a scene"),
    "render": ("mipnerf360.render_views", "main", "render the test views of a trained model"),
    "evaluate": ("mipnerf360.evaluate", "main", "PSNR / SSIM / LPIPS of rendered views"),
    "video": ("mipnerf360.video", "main", "render the camera path to mp4"),
    "bench": ("mipnerf360.bench", "main", "measure training-step throughput"),
    "generate": ("mipnerf360.synthetic", "main", "write a procedural scene"),
    "download": ("mipnerf360.download", "main", "download and extract a data set archive"),
    "prepare": ("mipnerf360.prepare", "main", "validate a scene and write its manifest"),
    "tables": ("mipnerf360.tables", "main", "collect metrics into paper-style tables"),
}


def tune_cpu_process() -> None:
    """Process-wide CPU settings of every command, made before torch's first operation.

    * Subnormal floats are treated as zero (the FTZ and DAZ bits), as XLA does on the CPU.
      The IPE's high-frequency features ``sin * exp(-var/2)`` come out subnormal in
      quantity, and every GEMM reading them then runs through the CPU's microcode assist:
      the first-layer GEMMs of a small 360-style model were 8-20x slower, the step 1.6x.
      The bits are per thread and a new thread copies its creator's, so this must run
      before torch starts its OpenMP threads.
    * glibc's malloc keeps freed memory instead of returning every block of 32 MB or more
      to the OS (``M_MMAP_MAX=0``, a high ``M_TRIM_THRESHOLD``): otherwise each large
      tensor of a step is fresh pages, and their page faults cost more than the arithmetic
      (an element-wise op on 16 M floats: 30 ms -> 7 ms; the step 1.5x). The peak memory
      is that of the step, which is kept anyway. Elsewhere (no glibc) nothing changes.

    Measured with ``mipnerf360 bench`` (benchmarks/README.md, "Measured on the CPU").
    """
    import ctypes

    import torch

    torch.set_flush_denormal(True)
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-4, 0)  # M_MMAP_MAX: serve large blocks from the heap too
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: do not shrink the heap after a step
    except (OSError, AttributeError):
        pass


def usage() -> str:
    lines = ["usage: mipnerf360 <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {h}" for name, (_, _, h) in COMMANDS.items()]
    lines += ["", "`mipnerf360 <command> --help` describes each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"mipnerf360: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[cmd]
    tune_cpu_process()
    from mipnerf360.errors import UserError

    try:
        result = getattr(importlib.import_module(module), func)(rest)
    except (FileNotFoundError, UserError) as e:
        # Bad input (a missing file, a corrupt archive, a config typo, a busy run folder): the
        # message names the file and the problem; a traceback would only bury it.
        # MIPNERF360_DEBUG=1 shows it.
        if os.environ.get("MIPNERF360_DEBUG"):
            raise
        if str(e):  # (a data-parallel rank > 0 leaves the message to rank 0)
            print(f"mipnerf360 {cmd}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
