"""Runs named check cases (TPU compile, CUDA lowering), reporting every failure before exiting non-zero."""

import traceback


def run_cases(cases, success: str) -> int:
    failures = 0
    for name, run in cases:
        try:
            run()
            print(f"ok   {name}", flush=True)
        except Exception:  # report every failing case, then exit 1
            failures += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
    print(f"{failures} failed" if failures else success)
    return 1 if failures else 0
