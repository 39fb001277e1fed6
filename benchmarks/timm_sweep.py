"""Every timm family (its smallest model, or every model with ``--all``) through ``tests/timm_check.py``'s checks.

Each model runs in its own process with a time limit; prints one line per model and a summary, and with ``--out``
writes the results as JSON. ``python benchmarks/timm_sweep.py [--all] [--timeout 300] [--out FILE]``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import pathlib
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _run(name: str, queue: "multiprocessing.Queue") -> None:
    from tests.timm_check import check

    try:
        queue.put({"status": "explained", **check(name)})
    except Exception as error:  # noqa: BLE001 (reported)
        lines = traceback.format_exception_only(type(error), error)
        queue.put({"model": name, "status": "failed", "error": "".join(lines).strip()[:600]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--all", action="store_true", help="every timm model, not the smallest of each family")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--only", nargs="*", help="these families only")
    parser.add_argument("--max-parameters", type=float, default=1.4e8,
                        help="skip models with more parameters (memory: a 400M model in float64 with its copies "
                             "needs over 20 GB)")
    args = parser.parse_args()
    from tests.timm_check import FAMILIES

    if args.all:
        import timm
        names = timm.list_models()
    else:
        names = [entry["model"] for family, entry in FAMILIES.items() if not args.only or family in args.only]
    sizes = {entry["model"]: entry["parameters"] for entry in FAMILIES.values()}
    results = []
    context = multiprocessing.get_context("spawn")
    for name in names:
        if sizes.get(name, 0) > args.max_parameters:
            results.append({"model": name, "status": "skipped", "parameters": sizes[name]})
            print(json.dumps(results[-1]), flush=True)
            continue
        queue = context.Queue()
        process = context.Process(target=_run, args=(name, queue))
        start = time.perf_counter()
        process.start()
        process.join(args.timeout)
        if process.is_alive():
            process.kill()
            result = {"model": name, "status": "timeout"}
        else:
            result = queue.get() if not queue.empty() else {"model": name, "status": "crashed"}
        result["seconds"] = round(time.perf_counter() - start, 1)
        results.append(result)
        print(json.dumps(result), flush=True)
    counts = {status: sum(r["status"] == status for r in results) for status in ("explained", "failed", "timeout",
                                                                                  "crashed", "skipped")}
    print(f"{len(results)} models: {counts}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
