"""The object level's dense detector: targets, decoding and its loss, on small real tensors."""
from __future__ import annotations

import torch

from engine.model.config import RsLvlmConfig
from engine.model.detector import (
    CenterNetDetector, DetectorOutput, box_iou_matrix, build_detection_targets, decode_detections, detection_loss,
)

CONFIG = RsLvlmConfig(image_size=64, vision_backbone="centernet", detector_channels=(8, 8, 16, 16),
                      num_object_tokens=4)
AIRPLANE = torch.tensor([[0.25, 0.25, 0.5, 0.375, 0, 2, 1]])    # class 0, colour 2, size 1


def perfect_output(targets) -> DetectorOutput:
    """Head outputs that agree exactly with the targets (logits of the heatmap etc.)."""
    h = CONFIG.image_size // 4
    heat = torch.logit(targets.heatmap.clamp(1e-4, 1 - 1e-4))
    size, offset = torch.zeros(1, 2, h * h), torch.zeros(1, 2, h * h)
    size[0, :, targets.cells[0, 0]] = targets.size[0, 0]
    offset[0, :, targets.cells[0, 0]] = targets.offset[0, 0]
    zeros = torch.zeros(1, 1, h, h)
    return DetectorOutput(zeros, zeros, zeros, heat, size.view(1, 2, h, h), offset.view(1, 2, h, h),
                          torch.zeros(1, 6, h, h), torch.zeros(1, 3, h, h), torch.zeros(1, 6, h // 2, h // 2))


def test_targets_peak_at_one_on_the_centre_cell_of_the_object_class():
    t = build_detection_targets([AIRPLANE], None, CONFIG)
    cell = int(t.cells[0, 0])
    assert t.heatmap[0, 0].flatten()[cell] == 1.0 and t.heatmap[0, 1:].max() == 0.0


def test_decoding_perfect_head_outputs_recovers_the_box():
    t = build_detection_targets([AIRPLANE], None, CONFIG)
    det = decode_detections(perfect_output(t), k=4)
    assert int(det.classes[0, 0]) == 0
    assert float(box_iou_matrix(AIRPLANE[:, :4], det.boxes[0, :1])) > 0.95


def test_training_steps_lower_the_detection_loss():
    torch.manual_seed(0)
    detector = CenterNetDetector(CONFIG)
    detector.reset_parameters()
    pixels = torch.randn(2, 3, 64, 64)
    t = build_detection_targets([AIRPLANE, AIRPLANE], None, CONFIG)
    opt = torch.optim.Adam(detector.parameters(), lr=1e-2)
    first = float(detection_loss(detector(pixels), t))
    for _ in range(15):
        loss = detection_loss(detector(pixels), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first


def test_boxes_without_colour_or_size_labels_give_a_finite_detection_loss():
    import torch

    from engine.model.detector import build_detection_targets, detection_loss
    from model_helpers import small_object_model

    model = small_object_model()
    unlabelled = torch.tensor([[0.25, 0.25, 0.5, 0.5, 1, -1, -1]])     # a published box: class only
    targets = build_detection_targets([unlabelled], None, model.config)
    loss = detection_loss(model.vision.detector(torch.randn(1, 3, 32, 32)), targets)
    assert torch.isfinite(loss) and float(loss) > 0
