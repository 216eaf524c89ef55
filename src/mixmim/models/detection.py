"""Detectors on a pretrained encoder: torchvision's Mask R-CNN with the heads of its
``maskrcnn_resnet50_fpn_v2`` (two-conv RPN head, 4conv1fc box head and 4-conv mask head, each conv
normalised), the closest match in torchvision to the ViTDet / MAE protocol MixMIM reuses (section 3),
and Cascade Mask R-CNN (Cai & Vasconcelos: three box stages trained at IoU 0.5 / 0.6 / 0.7; MixedAE
Table 1) built from torchvision's RoI operations.

The heads normalise with a LayerNorm over the channels at each position (ViTDet's "LN" in the heads;
batch statistics of two images per GPU would be noise), where torchvision's v2 uses BatchNorm. The
backbone is :class:`~mixmim.models.dense.MixMIMFPN`: the encoder's four stage maps (ViTDet's simple
pyramid for a plain ViT) and torchvision's FPN with a max-pooled fifth level.
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops

from mixmim.models.base import GroupedEncoder
from mixmim.models.dense import MixMIMBackbone, MixMIMFPN

DETECTORS = ("mask_rcnn", "cascade_mask_rcnn")
# Cascade R-CNN's stages: the IoU a proposal needs to be a positive, the box coder's weights, the loss weight.
CASCADE_IOUS = (0.5, 0.6, 0.7)
CASCADE_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
CASCADE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) map at every position (detectron2's ``LayerNorm``
    for convolutions, ViTDet's head norm)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def build_detector(encoder: nn.Module, num_classes: int, kind: str = "mask_rcnn", fpn_channels: int = 256,
                   vit_levels: bool = False, anchor_sizes: tuple[int, ...] | None = None, **kwargs: Any) -> MaskRCNN:
    """``kind`` (mask_rcnn | cascade_mask_rcnn) on ``encoder`` for ``num_classes`` object classes
    (torchvision counts the background too: it gets ``num_classes + 1``). Images are resized so that their
    longer side is the encoder's input size (``min_size``/``max_size`` default to it); ``kwargs`` go to
    torchvision's MaskRCNN. A plain ViT feeds the FPN through ViTDet's simple pyramid from its last block,
    or with ``vit_levels`` from blocks 4/6/8/12 (BEiT's and iBOT's detection backbone, MixedAE Table 1).
    ``anchor_sizes``: one anchor side per pyramid level (five; torchvision's 32-512 by default), each at
    aspect ratios 0.5, 1 and 2."""
    if kind not in DETECTORS:
        raise ValueError(f"detect.detector={kind!r}: expected one of {', '.join(DETECTORS)}")
    img_size = cast(GroupedEncoder, encoder).img_size
    kwargs.setdefault("min_size", min(img_size))
    kwargs.setdefault("max_size", max(img_size))
    backbone = MixMIMFPN(MixMIMBackbone(encoder, multi_level=vit_levels), fpn_channels)
    norm = partial(ChannelLayerNorm)
    rpn_head = RPNHead(fpn_channels, 3, conv_depth=2)  # 3 aspect ratios per location (torchvision's anchors)
    if anchor_sizes is not None:
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes={list(anchor_sizes)}: one size per pyramid level, five of them")
        kwargs["rpn_anchor_generator"] = AnchorGenerator(tuple((int(s),) for s in anchor_sizes),
                                                         ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    # The heads' convolutions are as wide as the pyramid (256 in the protocol; narrower in small tests).
    box_head = FastRCNNConvFCHead((fpn_channels, 7, 7), [fpn_channels] * 4, [1024], norm_layer=norm)
    mask_head = MaskRCNNHeads(fpn_channels, [fpn_channels] * 4, 1, norm_layer=norm)
    mask_predictor = MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes + 1)
    model = MaskRCNN(backbone, num_classes=None, rpn_head=rpn_head, box_head=box_head, mask_head=mask_head,
                     box_predictor=FastRCNNPredictor(1024, num_classes + 1), mask_predictor=mask_predictor, **kwargs)
    t = model.transform
    model.transform = SquarePadTransform(max(img_size), t.min_size, t.max_size, t.image_mean, t.image_std)
    if kind == "cascade_mask_rcnn":
        model.roi_heads = CascadeRoIHeads.replacing(model.roi_heads, fpn_channels, num_classes + 1)
    return model


class SquarePadTransform(GeneralizedRCNNTransform):
    """torchvision's normalisation (and its resize at evaluation), every batch padded to the encoder's
    whole ``side x side`` input (ViTDet pads to its 1024 square in training and test): what the network
    sees of an image then does not depend on which images share its batch, so evaluation gives the same
    detections on any number of processes and at any batch size."""

    def __init__(self, side: int, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.side = side

    def batch_images(self, images: list[Tensor], size_divisible: int = 32) -> Tensor:
        batch = images[0].new_zeros(len(images), images[0].shape[0], self.side, self.side)
        for out, image in zip(batch, images):
            if image.shape[-2] > self.side or image.shape[-1] > self.side:
                raise ValueError(f"an image resized to {tuple(image.shape[-2:])} is larger than the detector's "
                                 f"{self.side} px input")
            out[:, :image.shape[-2], :image.shape[-1]].copy_(image)
        return batch

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, Any]:
        # Training images come resized by the data set (LSJ, or the seeded multi-scale side), so that
        # augmentation stays a function of (seed, index); evaluation resizes here (min_size/max_size).
        if self.training:
            return image, target
        return super().resize(image, target)


class StagePredictor(nn.Module):
    """A cascade stage's outputs: class scores and one class-agnostic box regression (Cascade R-CNN)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


class CascadeRoIHeads(RoIHeads):
    """Three box stages, each trained on the previous stage's refined boxes at a higher IoU (0.5, 0.6,
    0.7), losses weighted 1, 0.5, 0.25 (mmdetection's Cascade Mask R-CNN, which MixedAE's detection
    follows); the first stage samples 512 proposals per image as Mask R-CNN does, the later stages relabel
    those refined boxes without resampling (detectron2). At test time the class scores are the mean of the
    three stages' and the boxes the last stage's; the mask head runs on the final boxes."""

    def __init__(self, *args: Any, stage_heads: nn.ModuleList, stage_predictors: nn.ModuleList, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.stage_heads, self.stage_predictors = stage_heads, stage_predictors
        self.stage_coders = [det_utils.BoxCoder(w) for w in CASCADE_WEIGHTS]
        self.stage_matchers = [det_utils.Matcher(iou, iou, allow_low_quality_matches=False) for iou in CASCADE_IOUS]

    @classmethod
    def replacing(cls, heads: RoIHeads, channels: int, num_classes: int) -> CascadeRoIHeads:
        """Cascade heads with the sampling, thresholds, RoI pooling and mask branch of ``heads``."""
        norm = partial(ChannelLayerNorm)
        stage_heads = nn.ModuleList(FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [1024],
                                                       norm_layer=norm) for _ in CASCADE_IOUS)
        stage_predictors = nn.ModuleList(StagePredictor(1024, num_classes) for _ in CASCADE_IOUS)
        sampler = heads.fg_bg_sampler
        return cls(heads.box_roi_pool, None, None, 0.5, 0.5, sampler.batch_size_per_image, sampler.positive_fraction,
                   CASCADE_WEIGHTS[0], heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
                   mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head,
                   mask_predictor=heads.mask_predictor or MaskRCNNPredictor(channels, channels, num_classes),
                   stage_heads=stage_heads, stage_predictors=stage_predictors)

    # ------------------------------------------------------------------ training targets
    def _relabel(self, proposals: list[Tensor], targets: list[dict[str, Tensor]], stage: int
                 ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """(matched_idxs, labels, regression targets) of ``proposals`` at stage ``stage``'s IoU, no sampling."""
        matched, labels, regression = [], [], []
        matcher, coder = self.stage_matchers[stage], self.stage_coders[stage]
        for props, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"], target["labels"]
            if gt_boxes.numel() == 0:
                idx = torch.zeros(len(props), dtype=torch.int64, device=props.device)
                lab = torch.zeros(len(props), dtype=torch.int64, device=props.device)
                gt = torch.zeros_like(props)
            else:
                idx = matcher(box_ops.box_iou(gt_boxes, props))
                clamped = idx.clamp(min=0)
                lab = gt_labels[clamped].to(torch.int64)
                lab[idx < 0] = 0  # below the stage's IoU: background
                gt = gt_boxes[clamped]
            matched.append(idx.clamp(min=0))
            labels.append(lab)
            regression.append(coder.encode([gt], [props])[0])
        return matched, labels, regression

    @staticmethod
    def _stage_loss(class_logits: Tensor, box_regression: Tensor, labels: list[Tensor], regression: list[Tensor]
                    ) -> tuple[Tensor, Tensor]:
        """Cross-entropy over the classes and smooth L1 (beta 1/9) on the positives' class-agnostic boxes,
        divided by the number of sampled boxes, as torchvision's ``fastrcnn_loss``."""
        label = torch.cat(labels)
        target = torch.cat(regression)
        cls_loss = F.cross_entropy(class_logits, label)
        pos = torch.where(label > 0)[0]
        box_loss = F.smooth_l1_loss(box_regression[pos], target[pos], beta=1 / 9, reduction="sum") / label.numel()
        return cls_loss, box_loss

    # ------------------------------------------------------------------ the forward
    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        losses: dict[str, Tensor] = {}
        result: list[dict[str, Tensor]] = []
        counts = [len(p) for p in proposals]
        matched: list[Tensor] = []
        labels: list[Tensor] = []
        all_scores: list[Tensor] = []
        boxes = proposals
        for stage in range(len(CASCADE_IOUS)):
            if self.training:
                assert targets is not None
                if stage == 0:
                    boxes, matched, labels, regression = self.select_training_samples(boxes, targets)
                    counts = [len(p) for p in boxes]
                else:
                    matched, labels, regression = self._relabel(boxes, targets, stage)
            pooled = self.box_roi_pool(features, boxes, image_shapes)
            class_logits, box_regression = self.stage_predictors[stage](self.stage_heads[stage](pooled))
            if self.training:
                cls_loss, box_loss = self._stage_loss(class_logits, box_regression, labels, regression)
                weight = CASCADE_LOSS_WEIGHTS[stage]
                losses[f"loss_classifier_{stage}"] = cls_loss * weight
                losses[f"loss_box_reg_{stage}"] = box_loss * weight
            else:
                all_scores.append(F.softmax(class_logits, -1))
            refined = self.stage_coders[stage].decode(box_regression.detach(), boxes).reshape(-1, 4)
            refined = [box_ops.clip_boxes_to_image(b, s) for b, s in zip(refined.split(counts), image_shapes)]
            if stage < len(CASCADE_IOUS) - 1 or not self.training:
                boxes = refined
        if not self.training:
            scores = torch.stack(all_scores).mean(0)
            result = self._detections(boxes, scores.split(counts))
        if self.has_mask():
            self._masks(features, boxes, image_shapes, targets, matched, labels, result, losses)
        return result, losses

    def _detections(self, boxes: list[Tensor], scores: list[Tensor]) -> list[dict[str, Tensor]]:
        """Per class: the score threshold, small boxes removed, NMS, the best ``detections_per_img`` (the
        boxes are already clipped to their images)."""
        out = []
        for b, s in zip(boxes, scores):
            num_classes = s.shape[1]
            cls_boxes = b[:, None].expand(-1, num_classes - 1, -1).reshape(-1, 4)
            cls_scores = s[:, 1:].reshape(-1)
            cls_labels = torch.arange(1, num_classes, device=b.device)[None].expand(len(b), -1).reshape(-1)
            keep = torch.where(cls_scores > self.score_thresh)[0]
            cls_boxes, cls_scores, cls_labels = cls_boxes[keep], cls_scores[keep], cls_labels[keep]
            keep = box_ops.remove_small_boxes(cls_boxes, min_size=1e-2)
            cls_boxes, cls_scores, cls_labels = cls_boxes[keep], cls_scores[keep], cls_labels[keep]
            keep = box_ops.batched_nms(cls_boxes, cls_scores, cls_labels, self.nms_thresh)[: self.detections_per_img]
            out.append({"boxes": cls_boxes[keep], "scores": cls_scores[keep], "labels": cls_labels[keep]})
        return out

    def _masks(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]],
               targets: list[dict[str, Tensor]] | None, matched: list[Tensor], labels: list[Tensor],
               result: list[dict[str, Tensor]], losses: dict[str, Tensor]) -> None:
        """The mask branch: on the last stage's positives when training, on the detections otherwise."""
        assert self.mask_roi_pool is not None and self.mask_head is not None and self.mask_predictor is not None
        if self.training:
            assert targets is not None
            positives = [torch.where(lab > 0)[0] for lab in labels]
            mask_boxes = [b[p] for b, p in zip(boxes, positives)]
            pos_matched = [m[p] for m, p in zip(matched, positives)]
        else:
            mask_boxes = [r["boxes"] for r in result]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes)))
        if self.training:
            assert targets is not None
            gt_masks = [t["masks"] for t in targets]
            gt_labels = [t["labels"] for t in targets]
            if sum(len(b) for b in mask_boxes) == 0:
                losses["loss_mask"] = mask_logits.sum() * 0  # no positive: nothing to learn, but a graph to keep
            else:
                losses["loss_mask"] = maskrcnn_loss(mask_logits, mask_boxes, gt_masks, gt_labels, pos_matched)
        else:
            for prob, r in zip(maskrcnn_inference(mask_logits, [r["labels"] for r in result]), result):
                r["masks"] = prob


def detector_encoder(model: nn.Module) -> nn.Module:
    """The pretrained encoder inside a detector of :func:`build_detector`."""
    return cast(MixMIMFPN, cast(MaskRCNN, model).backbone).body.encoder
