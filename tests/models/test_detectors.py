"""build_detector for every framework and the Cascade Mask R-CNN: size, stage assignment, refinement, averaging."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection.roi_heads import paste_masks_in_image

from swinlab.models import create_model
from swinlab.models.cascade_rcnn import STAGE_TARGET_STDS, CascadeRCNN
from swinlab.models.detectors import build_detector, feature_strides
from swinlab.models.fpn import SwinFPN
from tests.helpers import TINY_BACKBONE

SWIN_FPN_STRIDES = {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}
# FCOS's heads use GroupNorm(32), so the FPN needs a multiple of 32 channels.
TINY_FPN_CHANNELS = 32
TINY_HEADS = {
    "cascade_mask_rcnn": {"box_head_channels": 16, "box_head_dim": 32, "mask_head_channels": 16},
    "cascade_rcnn": {"box_head_channels": 16, "box_head_dim": 32},
    "mask_rcnn": {"box_head_dim": 32, "mask_head_channels": 16},
    "faster_rcnn": {"box_head_dim": 32},
    "retinanet": {},
    "fcos": {},
}
SIZE = 64
NUM_CLASSES = 2


def tiny_swin_fpn() -> SwinFPN:
    body = create_model("swin_t", num_classes=0, out_indices=(0, 1, 2, 3), **TINY_BACKBONE)
    return SwinFPN(body, TINY_FPN_CHANNELS)


def tiny_detector(framework: str, **options) -> nn.Module:
    torch.manual_seed(0)
    options = {**TINY_HEADS[framework], **options}
    return build_detector(framework, tiny_swin_fpn(), NUM_CLASSES, min_size=SIZE, max_size=SIZE, **options)


def synthetic_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two 64x64 images, each with a coloured rectangle (class 1 red, class 2 green), its box and mask."""
    generator = torch.Generator().manual_seed(0)
    images, targets = [], []
    for label, (x1, y1, x2, y2) in ((1, (8, 10, 32, 40)), (2, (20, 6, 56, 30))):
        image = torch.rand(3, SIZE, SIZE, generator=generator) * 0.2
        image[label - 1, y1:y2, x1:x2] = 1.0
        mask = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
        mask[0, y1:y2, x1:x2] = 1
        box = torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32)
        images.append(image)
        targets.append({"boxes": box, "labels": torch.tensor([label]), "masks": mask})
    return images, targets


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_cascade_mask_rcnn_swin_t_has_the_official_parameter_count():
    """Official Cascade Mask R-CNN Swin-T: 86M parameters (and Mask R-CNN Swin-T 48M), COCO's 80 classes."""
    backbone = create_model("swin_t", num_classes=0, out_indices=(0, 1, 2, 3))
    cascade = build_detector("cascade_mask_rcnn", SwinFPN(backbone), 80, strides=SWIN_FPN_STRIDES)
    assert abs(n_params(cascade) - 86e6) / 86e6 < 0.01, n_params(cascade)
    mask_rcnn = build_detector("mask_rcnn", SwinFPN(backbone), 80, strides=SWIN_FPN_STRIDES)
    assert abs(n_params(mask_rcnn) - 48e6) / 48e6 < 0.01, n_params(mask_rcnn)


def test_strides_are_measured_and_anchors_sized_per_level():
    backbone = tiny_swin_fpn()
    assert feature_strides(backbone) == SWIN_FPN_STRIDES
    rpn_sizes = tiny_detector("mask_rcnn").rpn.anchor_generator.sizes
    assert rpn_sizes == ((32,), (64,), (128,), (256,), (512,))
    retina_sizes = tiny_detector("retinanet").anchor_generator.sizes
    assert retina_sizes[0] == (16, 20, 25) and len(retina_sizes) == 5
    assert tiny_detector("fcos").anchor_generator.sizes == ((4,), (8,), (16,), (32,), (64,))
    three_levels = build_detector("fcos", backbone, 2, strides={"0": 8, "1": 16, "2": 32})
    assert three_levels.anchor_generator.sizes == ((8,), (16,), (32,))


def test_bad_framework_and_options_are_named():
    with pytest.raises(ValueError, match="'yolo'"):
        build_detector("yolo", tiny_swin_fpn(), NUM_CLASSES, strides=SWIN_FPN_STRIDES)
    with pytest.raises(TypeError, match="box_head_dim"):
        build_detector("retinanet", tiny_swin_fpn(), NUM_CLASSES, strides=SWIN_FPN_STRIDES, box_head_dim=32)
    with pytest.raises(ValueError, match="power of two"):
        build_detector("fcos", tiny_swin_fpn(), NUM_CLASSES, strides={"0": 6})


def test_stage_box_coders_use_inverse_target_stds():
    heads = tiny_detector("cascade_mask_rcnn").roi_heads
    for stage, stds in zip(heads.stages, STAGE_TARGET_STDS):
        assert stage.box_coder.weights == pytest.approx(tuple(1 / s for s in stds))


def test_each_stage_assigns_targets_at_its_iou_threshold():
    """Proposals [0, 0, 100, h] against the GT [0, 0, 100, 100] have IoU h / 100."""
    heads = tiny_detector("cascade_mask_rcnn").roi_heads
    ious = (0.55, 0.65, 0.75, 0.30)
    proposals = [torch.tensor([[0.0, 0.0, 100.0, 100 * iou] for iou in ious])]
    target = {"boxes": torch.tensor([[0.0, 0.0, 100.0, 100.0]]), "labels": torch.tensor([2])}
    expected = {  # the last entry is the GT box itself, added as a proposal
        0: [2, 2, 2, 0, 2],  # IoU >= 0.5
        1: [0, 2, 2, 0, 2],  # IoU >= 0.6
        2: [0, 0, 2, 0, 2],  # IoU >= 0.7
    }
    for stage, labels in expected.items():
        boxes, matched, assigned, is_gt = heads.select_training_samples(stage, proposals, [target])
        assert assigned[0].tolist() == labels
        assert is_gt[0].tolist() == [False] * 4 + [True]
        assert torch.equal(boxes[0][:4], proposals[0]) and matched[0].tolist() == [0] * 5


def test_sampling_keeps_512_rois_at_most_a_quarter_positive():
    heads = tiny_detector("cascade_mask_rcnn").roi_heads
    generator = torch.Generator().manual_seed(0)
    near = torch.tensor([[100.0, 100.0, 200.0, 200.0]]) + torch.rand(300, 4, generator=generator) * 4
    far = torch.tensor([[400.0, 400.0, 440.0, 440.0]]) + torch.rand(1700, 4, generator=generator) * 40
    target = {"boxes": torch.tensor([[100.0, 100.0, 200.0, 200.0]]), "labels": torch.tensor([1])}
    for stage in range(3):
        _, _, labels, _ = heads.select_training_samples(stage, [torch.cat([near, far])], [target])
        assert len(labels[0]) == 512 and int((labels[0] > 0).sum()) == 128


class ConstantMask(nn.Module):
    """Stand-in mask predictor: the same logit everywhere, (N, C + 1, 28, 28)."""

    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.full((len(features), NUM_CLASSES + 1, 28, 28), self.logit)


class ConstantPredictor(nn.Module):
    """Stand-in box predictor: the same class logits and box deltas for every RoI (deltas keep the graph)."""

    def __init__(self, logits: list[float], deltas: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)
        self.deltas = torch.tensor(deltas)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anchor = features.sum(dim=1, keepdim=True) * 0  # ties the outputs to the graph, as a real head does
        return anchor + self.logits, anchor + self.deltas.repeat(len(self.logits))


def test_refined_boxes_of_a_stage_are_the_next_stages_proposals(monkeypatch):
    model = tiny_detector("cascade_mask_rcnn")
    heads = model.roi_heads
    # Stage 0 moves every box right by 0.1 x its width (dx = 1 at coder weight 10).
    heads.stages[0].box_predictor = ConstantPredictor([0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    calls = []
    select = heads.select_training_samples

    def recording(stage, proposals, targets):
        out = select(stage, proposals, targets)
        calls.append((stage, proposals, out))
        return out

    monkeypatch.setattr(heads, "select_training_samples", recording)
    images, targets = synthetic_batch()
    model.train()
    model(images, targets)
    assert [c[0] for c in calls] == [0, 1, 2]
    _, _, (sampled, _, _, is_gt) = calls[0]
    for image, proposals in enumerate(calls[1][1]):
        boxes = sampled[image][~is_gt[image]]
        shifted = boxes + (boxes[:, 2:3] - boxes[:, 0:1]) * 0.1 * torch.tensor([1.0, 0.0, 1.0, 0.0])
        assert torch.allclose(proposals, shifted.clamp(0, SIZE), atol=1e-4)
        assert not proposals.requires_grad


def test_tiny_cascade_mask_rcnn_trains_and_detects():
    model = tiny_detector("cascade_mask_rcnn")
    images, targets = synthetic_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    totals = []
    for _ in range(4):
        losses = model(images, targets)
        assert {f"loss_{kind}_s{s}" for kind in ("classifier", "box_giou", "mask") for s in range(3)} <= set(losses)
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert totals[-1] < totals[0]
    model.eval()
    with torch.no_grad():
        detections = model(images)
    for detection in detections:
        count = len(detection["boxes"])
        assert count > 0 and detection["boxes"].shape == (count, 4) and detection["scores"].shape == (count,)
        assert detection["masks"].shape == (count, 1, SIZE, SIZE)
        assert set(detection["labels"].tolist()) <= {1, 2}


def test_evaluation_averages_stage_logits_and_mask_probabilities():
    """Scores come from the softmax of the stages' mean logits; masks are the mean of the stages' sigmoids."""
    model = tiny_detector("cascade_mask_rcnn").eval()
    heads = model.roi_heads
    stage_logits = [[0.0, 2.0, 0.0], [0.0, -1.0, 1.0], [0.0, 0.5, 3.0]]
    mask_logits = [2.0, -1.0, 0.5]
    for stage, logits, mask_logit in zip(heads.stages, stage_logits, mask_logits):
        stage.box_predictor = ConstantPredictor(logits, [0.0] * 4)
        stage.mask_predictor = ConstantMask(mask_logit)
    images, _ = synthetic_batch()
    proposals = [torch.tensor([[4.0, 4.0, 30.0, 30.0], [30.0, 20.0, 60.0, 50.0]])]
    with torch.no_grad():
        features = model.backbone(images[0][None])
        (detection,), _ = heads(features, proposals, [(SIZE, SIZE)])
    mean_probs = torch.softmax(torch.tensor(stage_logits).mean(dim=0), dim=0)
    for label in (1, 2):
        scores = detection["scores"][detection["labels"] == label]
        assert len(scores) == 2 and torch.allclose(scores, mean_probs[label].expand(2))
    last_stage_probs = torch.softmax(torch.tensor(stage_logits[-1]), dim=0)
    assert not torch.isclose(mean_probs[1], last_stage_probs[1])  # the check above tells the two apart
    # Zero deltas: the final boxes are the proposals.
    assert torch.allclose(detection["boxes"][detection["labels"] == 1].sort(dim=0).values, proposals[0])
    expected_mask = torch.sigmoid(torch.tensor(mask_logits)).mean()
    assert torch.allclose(detection["masks"], expected_mask.expand_as(detection["masks"]))
    # The transform pastes those (D, 1, 28, 28) probabilities into the image, as for torchvision's Mask R-CNN.
    assert paste_masks_in_image(detection["masks"], detection["boxes"], (SIZE, SIZE)).shape[-2:] == (SIZE, SIZE)


def test_an_image_without_objects_trains():
    model = tiny_detector("cascade_mask_rcnn").train()
    images, targets = synthetic_batch()
    targets[1] = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": targets[1]["masks"][:0],
    }
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_class_agnostic_regression_shares_one_box_per_roi():
    model = tiny_detector("cascade_rcnn", class_agnostic=True)
    assert isinstance(model, CascadeRCNN) and not model.roi_heads.has_mask
    assert all(stage.box_predictor.bbox_pred.out_features == 4 for stage in model.roi_heads.stages)
    images, targets = synthetic_batch()
    model.train()
    assert torch.isfinite(sum(model(images, targets).values()))
    model.eval()
    with torch.no_grad():
        assert all("masks" not in d for d in model(images))


@pytest.mark.parametrize("framework", ["retinanet", "fcos", "mask_rcnn", "faster_rcnn"])
def test_other_frameworks_train_and_detect(framework: str):
    """Labels 1 .. num_classes for every framework (the one-stage ones shift them internally)."""
    model = tiny_detector(framework)
    images, targets = synthetic_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(3):
        total = sum(model(images, targets).values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        detections = model(images)
    for detection in detections:
        assert {"boxes", "scores", "labels"} <= set(detection)
        assert ("masks" in detection) == (framework == "mask_rcnn")
        assert set(detection["labels"].tolist()) <= {1, 2}


def test_one_stage_detectors_reject_background_labels():
    model = tiny_detector("retinanet").train()
    images, targets = synthetic_batch()
    targets[0]["labels"] = torch.tensor([0])
    with pytest.raises(ValueError, match="count from 1"):
        model(images, targets)
