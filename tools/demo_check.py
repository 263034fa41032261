"""Print the demo's AP table and output locations; fail when bbox AP50 is under the bar.

Usage: python tools/demo_check.py RUN_DIR --min-bbox-ap50 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--min-bbox-ap50", type=float, default=0.5)
    args = parser.parse_args()
    run = args.run_dir
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    print("\n" + (run / "eval" / "metrics.md").read_text())
    print("outputs:")
    for label, path in [("synthetic data", run / "data"), ("checkpoints, logs, curves", run / "train"),
                        ("metrics", run / "eval"), ("predictions and overlays", run / "predict")]:
        print(f"  {label:<26} {path}/")
    ap50 = metrics["bbox"]["AP50"]
    verdict = "PASS" if ap50 >= args.min_bbox_ap50 else "FAIL"
    print(f"\nbbox AP50 on the synthetic val split: {ap50:.3f} (bar {args.min_bbox_ap50}) -> {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
