#!/usr/bin/env python
"""The CPU quick start: train a small SOIT on a small real dataset and evaluate it."""
import sys


def main():
    print(
        "The quick start (train + COCOEvaluator on the nuclei dataset, on the CPU) is not available yet: "
        "it arrives with the training pipeline (train_net.py). The set-up above is complete; "
        "run `bash scripts/test.sh` to check the installation."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
