"""Training loop settings read by train_net.py (detectron2's ``train`` dict, plus SOIT's)."""
train = dict(
    output_dir="./output",
    # torchvision's ImageNet ResNet-50 in detectron2 format (RGB input, as the official model)
    init_checkpoint="detectron2://ImageNetPretrained/torchvision/R-50.pkl",
    max_iter=184_823,  # 50 epochs of COCO at batch 32 (configs/common/schedule.py)
    # mixed precision: precision "fp16" (with loss scaling) or "bf16"
    amp=dict(enabled=False, precision="bf16"),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=5000,
    log_period=20,
    device="cuda",
    seed=0,  # data order and initialisation; -1 for a random seed
    clip_grad_norm=0.1,  # full-model gradient clipping (official recipe)
    # micro-batches per optimizer step: the effective batch is dataloader.train.total_batch_size
    # times this; an iteration (max_iter, schedules, checkpoints, logs) is an optimizer step
    grad_accum_steps=1,
    # a step with a non-finite loss or gradient is skipped (logged with its images); this many
    # in a row stop the run
    max_nonfinite_steps=5,
    best_metric="segm/AP",  # keep model_best.pth by this metric ("" to disable)
    model_ema=dict(enabled=False, decay=0.9998),
    # training samples mapped when training starts to record the inputs' object sizes and input
    # size, which inference reads back from the checkpoint (docs/scale.md)
    scale_samples=200,
)
