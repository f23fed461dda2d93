#!/usr/bin/env python
"""Median wall time of one inference of a trained model on the first held-out image.

Prints the median of ``--runs`` timed forwards (after two warm-up ones) of the model of
``--config-file`` with ``--weights`` on the first image of the config's test set. Run it
alternately with PYTHONPATH pointing at two copies of the tree to compare two versions of the
code on the same weights, e.g. whether the attention-recording hooks cost anything when not
recording (docs/benchmarks.md, "Attention recording off"):

    for i in 1 2 3 4 5; do for tree in /tmp/before /tmp/after; do
        PYTHONPATH=$tree python $tree/dev/benchmark_inference_time.py --weights model_final.pth
    done; done
"""
import argparse
import copy
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=os.path.join(REPO, "configs", "quickstart", "soit_nuclei_cpu.py"))
    p.add_argument("--weights", required=True)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--data-root", default=os.path.join(REPO, "datasets", "nuclei"), help="the nuclei split (quick start)")
    p.add_argument("opts", nargs="*", default=["model.auto_scale=False"], help="config overrides")
    args = p.parse_args(argv)
    if not os.path.isfile(args.weights):
        p.error(f"--weights {args.weights!r} does not exist")
    os.environ.setdefault("SOIT_NUCLEI_ROOT", args.data_root)

    import torch
    from detectron2.config import instantiate
    from detectron2.data import DatasetCatalog

    from soit.checkpoint.safe_load import SafeCheckpointer
    from soit.config import load_config
    from soit.data.nuclei import register_nuclei

    register_nuclei(args.data_root)
    cfg = load_config(args.config_file, args.opts)
    model = instantiate(cfg.model).eval()
    SafeCheckpointer(model, complete=True).load(args.weights)
    x = instantiate(cfg.dataloader.test.mapper)(copy.deepcopy(DatasetCatalog.get(cfg.dataloader.test.dataset.names)[0]))
    times = []
    with torch.no_grad():
        for i in range(args.runs + 2):
            start = time.perf_counter()
            model([copy.copy(x)])
            if i >= 2:
                times.append(time.perf_counter() - start)
    import soit

    print(f"{os.path.dirname(os.path.dirname(soit.__file__))}: median {statistics.median(times):.4f} s over {args.runs} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
