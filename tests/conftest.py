import importlib.util
import json
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The project's shared reference material (the authors' key list and fixtures) lies beside
# the checkout; SOIT_SHARED_DIR points elsewhere.
SHARED = os.environ.get("SOIT_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))


def shared_file(*parts):
    """Path of a file of the shared reference material; fails (never skips) when missing."""
    path = os.path.join(SHARED, *parts)
    if not os.path.isfile(path):
        pytest.fail(f"{path} is missing: these tests need the shared reference files (set SOIT_SHARED_DIR)")
    return path


class Touch:
    """Unpickling this creates ``path``: the stand-in for arbitrary code in crafted files."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="session")
def nuclei_wheel_cache(tmp_path_factory):
    """Where the stardist wheel holding the nuclei data is downloaded once per session."""
    return str(tmp_path_factory.getbasetemp() / "stardist-wheel")


@pytest.fixture(scope="session")
def nuclei(tmp_path_factory, nuclei_wheel_cache):
    """The quick-start nuclei dataset (soit/data/nuclei.py), prepared once per session: the dict of
    ``soit.data.nuclei.prepare_nuclei``. A failed download fails (no skip): PyPI is part of
    the test environment."""
    from soit.data.nuclei import prepare_nuclei

    return prepare_nuclei(str(tmp_path_factory.getbasetemp() / "nuclei"), cache_dir=nuclei_wheel_cache)


def write_synthetic_coco(root, num_images=4):
    """Small COCO-format dataset: coloured rectangles and ellipses with exact RLE masks."""
    from PIL import Image
    from pycocotools import mask as mask_util

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(num_images):
        h, w = 72, 88
        yy, xx = np.mgrid[:h, :w]
        img = np.full((h, w, 3), 20, np.uint8)
        for _ in range(2):
            cy, cx = rng.integers(18, h - 18), rng.integers(18, w - 18)
            ry, rx = rng.integers(8, 16), rng.integers(8, 16)
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            img[m] = rng.integers(80, 255, 3)
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            x, y, bw, bh = mask_util.toBbox(rle).tolist()
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "segmentation": rle,
                 "bbox": [x, y, bw, bh], "area": float(m.sum()), "iscrowd": 0}
            )
        name = f"img{i}.png"
        Image.fromarray(img).save(os.path.join(root, "images", name))
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    with open(os.path.join(root, "train.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "blob"}]}, f)


def register_coco_replacing(name, json_file, image_root):
    """``register_coco_instances(name, {}, json_file, image_root)``, replacing an earlier
    registration of ``name`` (tests register fresh files under fixed names)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, json_file, image_root)
    return name


def register_synthetic(name, root, num_images=4):
    """:func:`write_synthetic_coco` under ``root``, registered as ``name`` (an earlier
    registration of that name is replaced)."""
    write_synthetic_coco(root, num_images=num_images)
    return register_coco_replacing(name, os.path.join(root, "train.json"), os.path.join(root, "images"))


QUICKSTART = os.path.join(REPO, "configs", "quickstart", "soit_nuclei_cpu.py")


def save_random_quickstart_weights(path, seed=0):
    """Save the weights of a randomly initialised quick-start model (``{"model": state}``)
    to ``path``; returns the state dict."""
    import torch
    from detectron2.config import LazyConfig, instantiate

    torch.manual_seed(seed)
    state = instantiate(LazyConfig.load(QUICKSTART).model).state_dict()
    if path is not None:
        torch.save({"model": state}, path)
    return state


def dataset_overrides(train=None, test=None):
    """Config overrides that train and/or evaluate the quick-start config on registered datasets."""
    out = [f"dataloader.train.dataset.names={train}"] if train else []
    if test:
        out += [f"dataloader.test.dataset.names={test}", f"dataloader.evaluator.dataset_name={test}"]
    return out


def run(cfg, resume=False):
    from detectron2.engine import default_argument_parser, default_setup

    from soit.engine import training as train_net

    args = default_argument_parser().parse_args(["--resume"] if resume else [])
    default_setup(cfg, args)
    return train_net.do_train(args, cfg)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """A clean one-class COCO dataset (4 images), registered as "test_synthetic"."""
    return register_synthetic("test_synthetic", str(tmp_path_factory.mktemp("synthetic")))


def check_registration(register, root, names, num_images, num_instances, elsewhere):
    """``register(root, names=names)`` registers the train/val splits of a prepared shipped
    dataset: idempotent, ``num_images`` and ``num_instances`` (train, val), every file
    present, class "nucleus" at contiguous id 0 (COCO id 1), COCO evaluation; registering
    the names again with other files (``elsewhere``) is refused. The names are removed after."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    try:
        register(root, names=names)
        register(root, names=names)  # same files: silently skipped
        splits = [DatasetCatalog.get(n) for n in names]
        assert [len(d) for d in splits] == list(num_images)
        assert [sum(len(x["annotations"]) for x in d) for d in splits] == list(num_instances)
        assert {a["category_id"] for d in splits for x in d for a in x["annotations"]} == {0}
        assert all(os.path.isfile(x["file_name"]) for d in splits for x in d)
        assert MetadataCatalog.get(names[0]).thing_classes == ["nucleus"]
        assert MetadataCatalog.get(names[1]).evaluator_type == "coco"
        with pytest.raises(ValueError, match="already registered"):
            register(elsewhere, names=names)
    finally:
        for name in names:
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)


def load_tool(name, folder="tools"):
    """The module of ``<folder>/<name>.py`` (e.g. "demo", "deploy/export_model"; ``folder``
    "dev" for the developer tools), imported once by file path: tools are scripts, not a
    package."""
    module_name = f"soit_{folder}_" + name.replace("/", "_")
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(REPO, folder, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


# ---------------------------------------------------------------- a tiny SOIT and synthetic images
def tiny_model(num_classes=3, **overrides):
    """configs/models/soit_tiny.py with ``num_classes`` and model overrides ("a.b": value)."""
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(os.path.join(REPO, "configs", "models", "soit_tiny.py"))
    cfg.model.num_classes = num_classes
    for key, value in overrides.items():
        node, attr = cfg.model, key.split(".")
        for a in attr[:-1]:
            node = node[a]
        node[attr[-1]] = value
    return instantiate(cfg.model)


def swin_tiny_model(num_classes=3, num_queries=30):
    """configs/models/soit_swin_l.py with Swin-T in place of Swin-L (the same code, smaller)."""
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(os.path.join(REPO, "configs", "models", "soit_swin_l.py"))
    cfg.model.backbone.model_name = "swin_tiny_patch4_window7_224"
    cfg.model.neck.in_channels = [192, 384, 768]
    cfg.model.transformer.num_queries = num_queries
    cfg.model.num_classes = num_classes
    return instantiate(cfg.model)


def synthetic_sample(h, w, shapes, height=None, width=None):
    """An image with filled ellipses (kind 0) / rectangles (kind 1) and their exact masks."""
    import torch
    from detectron2.structures import BitMasks, Boxes, Instances

    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.full((3, h, w), 30, dtype=torch.uint8)
    masks, boxes, classes = [], [], []
    for kind, cy, cx, ry, rx, color in shapes:
        if kind == 0:
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            m = ((yy - cy).abs() <= ry) & ((xx - cx).abs() <= rx)
        image[:, m] = torch.tensor(color, dtype=torch.uint8)[:, None]
        ys, xs = m.nonzero(as_tuple=True)
        masks.append(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        classes.append(kind)
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    inst.gt_masks = BitMasks(torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool))
    return {"image": image, "instances": inst, "height": height or h, "width": width or w}


def two_images():
    return [
        synthetic_sample(96, 96, [(0, 30, 35, 18, 22, (220, 60, 60)), (1, 68, 62, 16, 24, (60, 200, 90))]),
        synthetic_sample(80, 96, [(1, 28, 60, 16, 26, (80, 80, 230)), (0, 58, 30, 17, 15, (230, 220, 60))]),
    ]




def separated_tiny_model(num_classes=3):
    """:func:`tiny_model` (seed 0, eval mode) with well separated class scores, so that the
    top-k order of its detections cannot flip on float rounding."""
    import torch

    torch.manual_seed(0)
    model = tiny_model(num_classes=num_classes).eval()
    torch.nn.init.normal_(model.cls_branches[-1].weight, std=0.5)
    return model


def check_label_image_entry(pixels, anns):
    """One image of a shipped fluorescence dataset and its COCO annotations: a gray RGB
    uint8 image, RLE masks that never overlap, exact areas and boxes, nuclei brighter than
    the background. Returns the (n, h, w) bool masks."""
    import pycocotools.mask as mask_util

    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    masks = np.stack([mask_util.decode(a["segmentation"]) for a in anns]).astype(bool)
    assert masks.sum(0).max() == 1, "instances of a label map never overlap"
    for a, m in zip(anns, masks):
        assert a["iscrowd"] == 0 and a["category_id"] == 1
        assert a["area"] == m.sum() > 0
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    # image and labels are aligned: nuclei are the bright blobs of a fluorescence image
    inside, outside = pixels[..., 0][masks.any(0)].mean(), pixels[..., 0][~masks.any(0)].mean()
    assert inside > outside + 40
    return masks


# ---------------------------------------------------------------- a tiny deformable transformer's inputs
C, K, Q, LAYERS = 32, 5, 7, 2
LEVEL_SIZES = [(12, 16), (6, 8), (3, 4)]


def make_branches(num, c=C, k=K):
    from torch import nn

    cls = nn.ModuleList(nn.Linear(c, k) for _ in range(num))
    reg = nn.ModuleList(
        nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, 4)) for _ in range(num)
    )
    return cls, reg


def level_masks(valid, sizes=LEVEL_SIZES):
    """Per-level masks (True = pad) with the valid (h, w) of each image at each level."""
    import torch

    masks = []
    for lvl, (h, w) in enumerate(sizes):
        m = torch.ones(len(valid), h, w, dtype=torch.bool)
        for i, v in enumerate(valid):
            m[i, : v[lvl][0], : v[lvl][1]] = False
        masks.append(m)
    return masks


def make_inputs(seed=1):
    import torch

    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(2, C, h, w, generator=g) for h, w in LEVEL_SIZES]
    # image 0 fills the batch; image 1 is padded bottom/right at every level
    masks = level_masks([LEVEL_SIZES, [(9, 10), (5, 5), (3, 3)]])
    return feats, masks


def has_gradient_path(t, modules):
    import torch

    params = [p for m in modules for p in m.parameters()]
    if not t.requires_grad:
        return False
    grads = torch.autograd.grad(t.sum(), params, retain_graph=True, allow_unused=True)
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def head_boxes(out, reg, lvl):
    from soit.layers.position_encoding import inverse_sigmoid

    return (inverse_sigmoid(out["inter_references"][lvl]) + reg[lvl](out["hs"][lvl])).sigmoid()


# ---------------------------------------------------------------- SetCriterion inputs
def make_batch(counts, Ld=3, Q=6, K=4, h=4, w=5, valid=None, seed=0, enc=True):
    """Random outputs / targets / mask inputs; image b has counts[b] ground truths and a
    valid stride-8 region valid[b] = (rows, cols) of the (h, w) map."""
    import torch

    from soit.modeling.mask_head import InstanceAwareMaskHead

    gen = torch.Generator().manual_seed(seed)
    B = len(counts)
    valid = valid or [(h, w)] * B
    head = InstanceAwareMaskHead()
    outputs = {
        "pred_logits": torch.randn(Ld, B, Q, K, generator=gen).requires_grad_(),
        "pred_boxes": (0.25 + 0.5 * torch.rand(Ld, B, Q, 4, generator=gen)).requires_grad_(),
        "dyn_params": (0.2 * torch.randn(Ld, B, Q, head.num_dynamic_params, generator=gen)).requires_grad_(),
    }
    if enc:
        outputs["enc_logits"] = torch.randn(B, 20, K, generator=gen).requires_grad_()
        outputs["enc_boxes"] = (0.25 + 0.5 * torch.rand(B, 20, 4, generator=gen)).requires_grad_()
    padding = torch.ones(B, h, w, dtype=torch.bool)
    targets = []
    for b, (n, (hv, wv)) in enumerate(zip(counts, valid)):
        padding[b, :hv, :wv] = False
        masks = torch.zeros(n, 8 * h, 8 * w)
        for i in range(n):
            y0, x0 = torch.randint(0, 8 * hv - 4, (2,), generator=gen).tolist()
            masks[i, y0 : y0 + 12, min(x0, 8 * wv - 4) : 8 * wv] = 1.0
        targets.append(
            {
                "labels": torch.randint(0, K, (n,), generator=gen),
                "boxes": 0.25 + 0.5 * torch.rand(n, 4, generator=gen),
                "masks": masks,
            }
        )
    mask_inputs = {"mask_feats": torch.randn(B, 8, h, w, generator=gen).requires_grad_(), "mask_padding": padding}
    return outputs, targets, mask_inputs


def assert_same_training_state(a, b):
    """Two saved checkpoints (dicts) at the same iteration with bit-identical weights and
    optimizer state."""
    import torch

    assert a["iteration"] == b["iteration"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    sa, sb = a["trainer"]["optimizer"]["state"], b["trainer"]["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in sa[k]:
            torch.testing.assert_close(sa[k][name], sb[k][name], rtol=0, atol=0)
