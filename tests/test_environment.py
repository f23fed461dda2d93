"""The installed stack works: detectron2 (upstream or our pure-Python build) and this package."""
import importlib
import os
import subprocess

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "stmt",
    [
        "import soit, detectron2",
        "import detectron2.layers",
        "import detectron2.data",
        "from detectron2.evaluation import COCOEvaluator",
        "from detectron2.model_zoo import get_config",
        "from detectron2.export import TracingAdapter",
        "from detectron2.engine import AMPTrainer, launch",
    ],
)
def test_imports(stmt):
    exec(stmt, {})


def _tiny_mask_rcnn():
    from detectron2.config import instantiate
    from detectron2.model_zoo import get_config

    cfg = get_config("common/models/mask_rcnn_fpn.py")
    # FrozenBN at identity statistics overflows in a random deep ResNet: train plain BN instead
    cfg.model.backbone.bottom_up.stages.norm = "BN"
    cfg.model.backbone.bottom_up.stem.norm = "BN"
    cfg.model.roi_heads.num_classes = 3
    cfg.model.roi_heads.batch_size_per_image = 32
    cfg.model.proposal_generator.post_nms_topk = (100, 50)
    cfg.model.proposal_generator.pre_nms_topk = (200, 100)
    return instantiate(cfg.model)


def _inputs():
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 96, 128), generator=g, dtype=torch.uint8)
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[0, 10:40, 20:60] = True
    masks[1, 50:90, 70:120] = True
    inst = Instances((96, 128))
    inst.gt_boxes = Boxes(torch.tensor([[20.0, 10.0, 60.0, 40.0], [70.0, 50.0, 120.0, 90.0]]))
    inst.gt_classes = torch.tensor([0, 2])
    inst.gt_masks = BitMasks(masks)
    return [{"image": image, "instances": inst, "height": 96, "width": 128}]


def test_detectron2_mask_rcnn_trains_infers_and_traces():
    from detectron2.export import TracingAdapter
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    model = _tiny_mask_rcnn()
    batch = _inputs()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with EventStorage(0):
        losses = model(batch)
        total = sum(losses.values())
        total.backward()
        optimizer.step()
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    assert torch.isfinite(total)

    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": batch[0]["image"], "height": 96, "width": 128}])
    assert out["instances"].image_size == (96, 128)

    def inference(model, inputs):
        inst = model.inference(inputs, do_postprocess=False)[0]
        return [{"instances": inst}]

    adapter = TracingAdapter(model, [{"image": batch[0]["image"]}], inference)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
        eager = adapter(*adapter.flattened_inputs)
        replay = traced(*adapter.flattened_inputs)
    assert len(eager) == len(replay)
    for a, b in zip(eager, replay):
        torch.testing.assert_close(a, b)


def test_placeholder_compiled_op_error_names_the_op():
    import detectron2._C as d2c

    if not getattr(d2c, "IS_PLACEHOLDER", False):
        pytest.skip("an upstream detectron2 with its compiled ops is installed; nothing to check")
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated
    from detectron2.layers import nms_rotated

    boxes = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0]])
    with pytest.raises(RuntimeError, match="box_iou_rotated") as err:
        pairwise_iou_rotated(boxes, boxes)
    assert "compiled" in str(err.value) and "full build" in str(err.value)
    with pytest.raises(RuntimeError, match="nms_rotated"):
        nms_rotated(boxes, torch.ones(1), 0.5)


def test_setup_is_idempotent():
    """A second run of the set-up skips every installing step (the README promises < 1 minute)."""
    res = subprocess.run(["bash", "scripts/setup.sh"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    print(out)
    assert "up to date" in out and "dependencies of requirements.txt up to date" in out
    assert "soit (editable) and its compiled op up to date" in out
    assert "keeping it" in out
    assert "installing" not in out


def test_soit_is_the_editable_checkout():
    soit = importlib.import_module("soit")
    assert os.path.dirname(os.path.dirname(soit.__file__)) == REPO, soit.__file__
