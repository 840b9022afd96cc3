"""Pairs per minute of a datalist run, serial against Ray workers on this machine, in one run.

    python -m benchmarks.throughput [--bundle node_mind] [--pairs 8] [--workers 2] [--output benchmarks/throughput]

The datalist repeats the embedded sample pair (each its own id and output folder). Each executor runs the bundle's
command line as a user would (``--executor serial``, and ``--executor ray --ray_address auto`` on a Ray cluster of
``--workers`` CPUs started here by ``ray start --head``, one CPU and one torch thread per pair); the serial run gets as many torch threads as Ray has workers, so that both use the
same cores. Prints and writes ``table.md``: wall time, pairs per minute and the ratio to serial.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.make_sample import REPO_ROOT
from common.sample import sample_pair


def datalist(folder: Path, count: int) -> Path:
    """A datalist of ``count`` copies of the embedded sample pair."""
    pair = sample_pair()
    path = folder / "pairs.json"
    path.write_text(json.dumps({"pairs": [{**pair, "id": f"pair{i:02d}"} for i in range(count)]}))
    return path


def run(bundle: str, pairs: Path, output: Path, executor: str, workers: int, overrides: list[str]) -> float:
    """Wall time (s) of one datalist run of ``bundle`` with ``executor``."""
    config = REPO_ROOT / "bundles" / bundle / "configs" / "inference.json"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config), "--datalist", str(pairs)]
    command += ["--output_dir", str(output), "--executor", executor, "--progress", "false", *overrides]
    threads = str(workers if executor == "serial" else 1)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if executor == "ray":
        command += ["--ray_address", "auto"]
        subprocess.run(["ray", "start", "--head", "--num-cpus", str(workers)], check=True, capture_output=True)
    try:
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO_ROOT, env=env, capture_output=True)
        return time.perf_counter() - start
    finally:
        if executor == "ray":
            subprocess.run(["ray", "stop"], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="node_mind")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "throughput"))
    parser.add_argument("--override", action="append", default=[], help="KEY=VALUE passed to the bundle as --KEY VALUE")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    pairs = datalist(output, args.pairs)
    overrides = [part for item in args.override for part in (f"--{item.split('=', 1)[0]}", item.split("=", 1)[1])]
    rows = []
    for executor in ("serial", "ray"):
        wall = run(args.bundle, pairs, output / executor, executor, args.workers, overrides)
        rows.append((executor, wall, 60 * args.pairs / wall))
    lines = [
        f"{args.pairs} pairs of the embedded sample, `{args.bundle}`, {args.workers} cores",
        "",
        "| executor | wall time (s) | pairs per minute | × serial |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {wall:.0f} | {rate:.2f} | {rate / rows[0][2]:.2f} |" for name, wall, rate in rows]
    table = "\n".join(lines)
    (output / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
