#!/usr/bin/env python
"""Train or evaluate SOIT with a LazyConfig, following detectron2's conventions.

    python train_net.py --config-file configs/soit_r50_50ep.py --num-gpus 8
    python train_net.py --config-file configs/soit_r50_50ep.py --resume
    python train_net.py --config-file configs/soit_r50_50ep.py --eval-only train.init_checkpoint=model.pth
    python train_net.py --config-file ... train.amp.precision=bf16 dataloader.train.total_batch_size=16

Without CUDA, ``--num-gpus N`` starts N CPU processes (gloo), e.g. for debugging.
"""
from soit.engine import launch
from soit.engine.training import argument_parser, main

if __name__ == "__main__":
    args = argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
