"""`python -m kvlab.kernels build`: compile the CPU kernels and calibrate them now (`make install`
runs it), so the first generation neither compiles nor measures. Prints what was decided."""

import argparse
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvlab.kernels", description=__doc__)
    parser.add_argument(
        "command", choices=["build"], help="build: compile (once per source digest) and calibrate"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads to calibrate for (default: torch's)"
    )
    parser.add_argument(
        "--recalibrate", action="store_true", help="measure again even if a calibration is cached"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    from kvlab.kernels import cpu

    start = time.perf_counter()
    failure = cpu.build_failure()
    if failure is not None:
        # Not an install error: kvlab runs on torch's kernels without them.
        print(f"kvlab CPU kernels not built ({failure}); torch's kernels will be used", file=sys.stderr)
        return 0
    built = time.perf_counter()
    table = cpu.recalibrate() if args.recalibrate else cpu.calibration()
    done = time.perf_counter()
    how = "measured" if table.measured_now else "cached"
    print(f"kvlab CPU kernels ready in {cpu.build_directory()} (load {built - start:.1f} s)")
    print(f"calibration {how} in {done - built:.1f} s: {table.path}")
    print(cpu.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
