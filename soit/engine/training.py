"""The training loop of ``train_net.py``: training, evaluation, resuming, and the checks that
run before any of it (datasets, class counts, run folders, user files).

``train_net.py`` is its command line; :func:`main` takes the same arguments
(:func:`argument_parser`), so the quick start and tests call it directly.
"""
import json
import logging
import math
import numbers
import os
import re

import torch
from detectron2.config import instantiate
from detectron2.engine import default_argument_parser, default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from detectron2.utils.registry import locate

from ..checkpoint.safe_load import SafeCheckpointer, torch_load_checked
from ..config import add_trust_arguments, load_config
from ..data.check import check_registered_dataset
from ..data.metadata import dataset_metadata, register_coco_once
from ..data.samplers import ResumableTrainingSampler
from ..modeling.object_scale import measure_training_scale
from .hooks import GatherRNGStates, ModelEMA, RNGState
from .preemption import CheckpointAndStop
from .trainer import NonFiniteTrainingError, SOITTrainer

__all__ = [
    "argument_parser",
    "main",
    "setup_soit_logger",
    "do_train",
    "do_test",
    "check_dataset",
    "check_output_dir",
    "resume_iteration",
    "periodic_checkpointer",
    "write_json",
]

logger = logging.getLogger("soit")


def do_test(cfg, model):
    """Evaluate ``model`` on ``cfg.dataloader.test``; results also go to eval_results.json."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
        write_json(os.path.join(cfg.train.output_dir, "eval_results.json"), results)
    return results


def write_json(path, data):
    """``data`` (dicts, lists, numbers) as strict JSON: an undefined metric (NaN, such as COCO's
    ``APl`` without large objects) or an infinite one is written as ``null``."""

    def finite(value):
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
            return float(value) if math.isfinite(value) else None
        return value

    with open(path, "w") as f:
        json.dump(finite(data), f, indent=2, allow_nan=False)


def build_train_loader(cfg, start_iter, dataset=None):
    """The training loader; a resumed run's sampler skips the images already seen.
    ``dataset``: ``cfg.dataloader.train.dataset`` already instantiated (built here if None)."""
    loader = cfg.dataloader.train
    if dataset is None:
        dataset = instantiate(loader.dataset)
    check_dataset(cfg, loader.dataset.get("names"))
    per_rank = loader.total_batch_size // comm.get_world_size()
    seed = cfg.train.get("seed", -1)
    sampler = ResumableTrainingSampler(len(dataset), seed=None if seed < 0 else seed, skip=start_iter * per_rank)
    kwargs = {k: instantiate(v) for k, v in loader.items() if k not in ("_target_", "dataset", "sampler")}
    target = loader._target_
    return (locate(target) if isinstance(target, str) else target)(dataset=dataset, sampler=sampler, **kwargs)


def check_dataset(cfg, names):
    """The model's classes and input format must be the dataset's (class names read from the
    dataset's JSON when it has not been loaded yet)."""
    fmt = cfg.dataloader.train.mapper.get("image_format")
    if fmt is not None and fmt != cfg.model.input_format:
        raise ValueError(
            f"dataloader.train.mapper.image_format={fmt!r} but model.input_format={cfg.model.input_format!r}: "
            "the model would see the channels in the wrong order; set both to the same value"
        )
    for name in _names(names):
        classes = dataset_metadata(name).get("thing_classes")
        if classes is not None and len(classes) != cfg.model.num_classes:
            raise ValueError(
                f"dataset {name!r} has {len(classes)} classes but model.num_classes={cfg.model.num_classes}; "
                f"add the override model.num_classes={len(classes)}"
            )


def _names(names):
    return [names] if isinstance(names, str) else list(names or [])


def check_output_dir(cfg, resume):
    """Never overwrite a previous run's checkpoints without being asked."""
    if not resume and os.path.exists(os.path.join(cfg.train.output_dir, "last_checkpoint")):
        raise SystemExit(
            f"{cfg.train.output_dir} already holds a training run (last_checkpoint). Pass --resume to continue it, "
            "or choose another train.output_dir=..., or delete the folder."
        )


def resume_iteration(path):
    """The iteration after the one saved in ``path``; a damaged file is named with the others
    in its folder that --resume could use instead."""
    try:
        saved = torch_load_checked(path, mmap=True)
    except Exception as e:
        folder = os.path.dirname(path)
        others = sorted(f for f in os.listdir(folder) if f.endswith(".pth") and f != os.path.basename(path))
        hint = (
            f"; other checkpoints in {folder}: {', '.join(others)} (write one's name into "
            f"{os.path.join(folder, 'last_checkpoint')} to resume from it)"
            if others
            else ""
        )
        raise SystemExit(f"--resume: the last checkpoint {path} cannot be read ({type(e).__name__}: {e}){hint}") from e
    return saved.get("iteration", -1) + 1


def do_train(args, cfg, stop_request=None):
    """Train as ``cfg`` says; ``stop_request`` (:class:`~soit.engine.preemption.StopRequest`,
    given by the cluster launcher) stops the run at a step boundary with a checkpoint."""
    check_output_dir(cfg, args.resume)
    model = instantiate(cfg.model).to(cfg.train.device)
    logger.info(f"Model:\n{model}")
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    ema = ModelEMA(model, cfg.train.model_ema.decay) if cfg.train.model_ema.enabled else None

    # every rank's random states resume exactly (the EMA, a hook, is saved with the trainer's state)
    rng = RNGState()
    checkpointer = SafeCheckpointer(model, cfg.train.output_dir, trust_pickle=getattr(args, "trust_pickle", False), rng=rng)
    start_iter = 0
    if args.resume and checkpointer.has_checkpoint():
        # know where the run stopped before building the loader, so the data stream continues
        start_iter = resume_iteration(checkpointer.get_checkpoint_file())

    dataset = instantiate(cfg.dataloader.train.dataset)  # read once: the loader and the scale measure share it
    train_loader = build_train_loader(cfg, start_iter, dataset)
    ddp = dict(cfg.train.ddp)
    if cfg.train.device == "cpu":
        ddp.setdefault("device_ids", None)
    model = create_ddp_model(model, **ddp)
    trainer = SOITTrainer(
        model,
        train_loader,
        optimizer,
        precision=cfg.train.amp.precision if cfg.train.amp.enabled else "fp32",
        clip_grad_norm=cfg.train.clip_grad_norm,
        grad_accum_steps=cfg.train.get("grad_accum_steps", 1),
        max_nonfinite_steps=cfg.train.get("max_nonfinite_steps", 5),
    )
    checkpointer.add_checkpointable("trainer", trainer)
    eval_model = ema.shadow if ema is not None else model
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            ema,
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            # evaluate before checkpointing: a resumed run then starts from the same state
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, eval_model)),
            GatherRNGStates(rng, [cfg.train.checkpointer.get("period"), cfg.train.eval_period])
            if comm.get_world_size() > 1
            else None,
            hooks.BestCheckpointer(cfg.train.eval_period, checkpointer, cfg.train.best_metric, "max")
            if comm.is_main_process() and cfg.train.best_metric and "evaluator" in cfg.dataloader
            else None,
            periodic_checkpointer(cfg, checkpointer, start_iter) if comm.is_main_process() else None,
            # before the writers: their after_train writes the stopped step's metrics once
            CheckpointAndStop(stop_request, checkpointer, rng) if stop_request is not None else None,
            hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
            if comm.is_main_process()
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    if args.resume and checkpointer.has_checkpoint():
        start_iter = trainer.iter + 1
    else:  # what this training shows the model; a resumed run read it from its checkpoint
        record_training_scale(cfg, [getattr(model, "module", model), ema.shadow if ema is not None else None], dataset)
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except NonFiniteTrainingError as e:  # the checkpoints written so far hold finite weights
        raise SystemExit(str(e)) from e
    trainer.checkpointer = checkpointer  # what was saved, for callers that inspect the run
    return trainer


def record_training_scale(cfg, models, dataset=None):
    """Measure the object sizes and input size the training mapper produces
    (``soit.modeling.object_scale``) and give them to ``models``: inference chooses its
    magnification and tile size from them, and every checkpoint saves them. ``dataset``: the
    training dataset already instantiated (built from the config if None)."""
    models = [m for m in models if m is not None and hasattr(m, "set_training_scale")]
    if not models:
        return None
    loader = cfg.dataloader.train
    scale = measure_training_scale(
        instantiate(loader.mapper), instantiate(loader.dataset) if dataset is None else dataset, num_samples=cfg.train.get("scale_samples", 200),
        seed=max(cfg.train.get("seed", -1), 0),
    )  # fmt: skip
    if scale is None:
        logger.warning("no object in the training samples measured: the model will not know its training object sizes")
        return None
    logger.info(f"training inputs: {scale.describe()}")
    for m in models:
        m.set_training_scale(scale, "the training set")
    return scale


def periodic_checkpointer(cfg, checkpointer, start_iter=0):
    """detectron2's ``PeriodicCheckpointer`` hook with ``cfg.train.checkpointer`` (``period``,
    ``max_to_keep``: the number of periodic checkpoints kept, all when absent; ``model_final.pth``
    and ``model_best.pth`` are always kept). detectron2 counts only the files of its own
    process: a run resumed at ``start_iter`` also counts the newest ``max_to_keep`` its earlier
    part wrote, so resuming does not keep them for ever."""
    hook = hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
    if hook.max_to_keep and start_iter > 0:
        name = re.compile(rf"{re.escape(hook.file_prefix)}_(\d{{7}})\.pth")
        found = sorted((int(m[1]), m[0]) for m in map(name.fullmatch, os.listdir(checkpointer.save_dir)) if m)
        earlier = [f for i, f in found if i < start_iter and (i + 1) % hook.period == 0]
        hook.recent_checkpoints = [os.path.join(checkpointer.save_dir, f) for f in earlier[-hook.max_to_keep :]]
    return hook


def register_datasets(specs):
    """``--register-coco NAME JSON IMAGE_ROOT``: ``register_coco_instances`` with the files checked."""
    for name, json_file, image_root in specs:
        if not os.path.isfile(json_file):
            raise SystemExit(f"--register-coco {name}: the annotation file {json_file} does not exist")
        if not os.path.isdir(image_root):
            raise SystemExit(f"--register-coco {name}: the image folder {image_root} does not exist")
        try:
            register_coco_once(name, json_file, image_root)
        except ValueError as e:  # another dataset of that name is already registered
            raise SystemExit(f"--register-coco {name}: {e}") from e


def setup_soit_logger(output_dir):
    """The ``soit`` logger (skipped images, dropped annotations, dataset problems) writes to
    the console and the run's ``log.txt``, at INFO and above (its per-image DEBUG notes stay
    out of both, as before)."""
    logger = setup_logger(output_dir, distributed_rank=comm.get_rank(), name="soit")
    logger.setLevel(logging.INFO)
    return logger


def main(args, stop_request=None):
    """``train_net.py``'s work for ``args`` (:func:`argument_parser`); ``stop_request``: see
    :func:`do_train`."""
    register_datasets(getattr(args, "register_coco", []))
    cfg = load_config(
        args.config_file, args.opts,
        trust_config=getattr(args, "trust_config", False), trust_pickle=getattr(args, "trust_pickle", False),
    )  # fmt: skip
    if not args.eval_only:  # before default_setup writes config.yaml into the run folder
        check_output_dir(cfg, args.resume)
    default_setup(cfg, args)
    # our warnings (skipped images, dropped annotations, dataset problems) go to the run's log.txt too
    setup_soit_logger(cfg.train.output_dir)
    # a ground truth that would make COCO evaluation crash or lie is refused before training
    queries = cfg.model.get("transformer", {}).get("num_queries", 0)
    for name in [] if args.eval_only else _names(cfg.dataloader.train.dataset.get("names")):
        check_registered_dataset(name, num_queries=queries)
    for name in _names(cfg.dataloader.test.dataset.get("names")) if "evaluator" in cfg.dataloader else []:
        check_registered_dataset(name, evaluation=True, num_queries=queries)
    if args.eval_only:
        if not cfg.train.init_checkpoint:
            raise SystemExit("--eval-only needs the weights to evaluate: add train.init_checkpoint=<checkpoint>")
        check_dataset(cfg, cfg.dataloader.test.dataset.get("names"))
        model = instantiate(cfg.model).to(cfg.train.device)
        model = create_ddp_model(model, **({"device_ids": None} if cfg.train.device == "cpu" else {}))
        trust = getattr(args, "trust_pickle", False)
        # every weight must come from the checkpoint: a random classifier would be evaluated otherwise
        SafeCheckpointer(model, trust_pickle=trust, complete=True).load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    return do_train(args, cfg, stop_request)


def argument_parser():
    """detectron2's parser with the opt-ins for user files that can run code."""
    parser = default_argument_parser()
    add_trust_arguments(parser)
    parser.add_argument(
        "--register-coco", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME before the config is read (repeatable)",
    )
    return parser
