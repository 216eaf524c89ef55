"""Planted-bug audit of the methods layer: apply one one-line bug at a time to a scratch copy of the
source tree, run the tests of its area, and count the plants the tests catch (a failing run).

    git archive <commit> | tar -x -C /tmp/plant/tree      # a scratch copy, never the worktree
    python tools/plant_bugs.py /tmp/plant/tree --plants before --out before.json
    python tools/plant_bugs.py /tmp/plant/tree --plants after --out after.json

``before`` holds the plants written against commit cfc46db (before the methods contract), ``after``
the same bugs (and a few more) written against the code that replaced it. Each plant is a literal
``old -> new`` replacement that must match exactly once. The loop and recipe tests (which train
whole runs and catch only crashes) are deselected in both lists, so the counts compare the tests
that check formulas. The script edits only the tree it is given and restores every file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SLOW = "not recipe and not run_folder and not pretrain_run and not before_any_work"

AREA_TESTS = {
    "mae": ["tests/test_mae.py", "tests/test_golden_authors.py", "tests/test_method_contract.py"],
    "mixedae": ["tests/test_mixedae.py", "tests/test_method_contract.py"],
    "simmim": ["tests/test_simmim.py", "tests/test_simmim_masks.py", "tests/test_golden_authors.py",
               "tests/test_method_contract.py"],
    "mixmim": ["tests/test_mixmim_method.py", "tests/test_ablations.py", "tests/test_masking.py", "tests/test_golden.py",
               "tests/test_fidelity.py", "tests/test_method_contract.py"],
    # Added with issue 21's second round: evaluation, the study's statistics, the monitor, the encoders.
    "evaluation": ["tests/test_metrics.py", "tests/test_finetune.py", "tests/test_layer_decay.py"],
    "study": ["tests/test_study.py"],
    "encoders": ["tests/test_encoders.py", "tests/test_swin.py", "tests/test_mixed_conv.py", "tests/test_pvt.py",
                 "tests/test_resnet.py"],
}

M, X, S, A, V = ("src/mixmim/methods/mae.py", "src/mixmim/methods/mixmim.py", "src/mixmim/methods/simmim.py",
                 "src/mixmim/methods/mixedae.py", "src/mixmim/models/vit.py")
KNN, METRICS, LD = ("src/mixmim/evaluation/knn.py", "src/mixmim/evaluation/metrics.py",
                    "src/mixmim/evaluation/layer_decay.py")
STUDY, MONITOR = "src/mixmim/study/runner.py", "src/mixmim/training/monitor.py"  # plants moved since: see locate
SWIN, MIXCONV = "src/mixmim/models/swin.py", "src/mixmim/models/mixed_conv.py"
MASKING, SMASKS, HEADS = ("src/mixmim/methods/masking.py", "src/mixmim/methods/simmim_masks.py",
                          "src/mixmim/methods/simmim_heads.py")


def plant(pid: str, area: str, file: str, old: str, new: str, what: str) -> dict:
    return dict(id=pid, area=area, file=file, old=old, new=new, what=what)


BEFORE = [
    # ------------------------------------------------------------------ MAE
    plant("mae-loss-on-kept", "mae", M, "loss = masked_patch_mse(reconstruction, target, hidden)",
          "loss = masked_patch_mse(reconstruction, target, ~hidden)", "loss on the kept patches"),
    plant("mae-norm-pix-ignored", "mae", M, "        if self.config.norm_pix_loss:\n            target = normalize",
          "        if False:\n            target = normalize", "norm_pix_loss ignored"),
    plant("mae-mse-all-patches", "mae", M, "return (per_patch * weight).sum() / weight.sum().clamp(min=1)",
          "return (per_patch * weight).sum() / weight.numel()", "masked MSE divided by all patches"),
    plant("mae-no-positions", "mae", V, "        b, _, c = tokens.shape\n        x = self._patches_with_positions(tokens)",
          "        b, _, c = tokens.shape\n        x = tokens", "kept patches without their positions"),
    plant("mae-keeps-hidden", "mae", M, "keep_index = hidden.long().argsort(dim=1, stable=True)[:, :keep]",
          "keep_index = hidden.long().argsort(dim=1, stable=True)[:, -keep:]", "encoder fed hidden patches"),
    plant("mae-decoder-no-mask-token", "mae", M, "reconstruction = self.decoder(full, ~hidden)",
          "reconstruction = self.decoder(full, None)", "decoder sees zeros, not [MASK], at hidden places"),
    plant("mae-patch-init", "mae", M, "        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))",
          "        pass", "patch projection not xavier-initialised"),
    plant("control-noop", "mae", M, "reconstruction = self.decoder(full, ~hidden)",
          "reconstruction = self.decoder(full + latent.mean(1, keepdim=True) * 0, ~hidden)",
          "(control: a no-op edit; must NOT be caught)"),
    # ------------------------------------------------------------------ MixedAE
    plant("mixedae-loss-on-supplied", "mixedae", A, "recon_loss = masked_patch_mse(reconstruction, seq_target, hidden)",
          "recon_loss = masked_patch_mse(reconstruction, seq_target, visible)", "loss on the supplied patches"),
    plant("mixedae-wrong-target", "mixedae", A, "seq_target = target[seq_sources]",
          "seq_target = target[seq_sources.flip(0)]", "loss against another image's target"),
    plant("mixedae-decoder-sees-all", "mixedae", A,
          "reconstruction = self.decoder(latent.repeat_interleave(self.k, dim=0), visible)",
          "reconstruction = self.decoder(latent.repeat_interleave(self.k, dim=0), None)",
          "eq. 3 without [MASK]: each decoder sees every image's features"),
    plant("mixedae-mse-all-patches", "mixedae", M, "return (per_patch * weight).sum() / weight.sum().clamp(min=1)",
          "return (per_patch * weight).sum() / weight.numel()", "loss divided by all patches"),
    plant("mixedae-norm-pix-ignored", "mixedae", A, "        if c.norm_pix_loss:\n            target = normalize",
          "        if False:\n            target = normalize", "norm_pix_loss ignored"),
    plant("mixedae-segment-once", "mixedae", V, "            if layer_embed is not None:\n                x = x + layer_embed",
          "            if layer_embed is not None and blk is self.blocks[0]:\n                x = x + layer_embed",
          "segment embedding only before the first block"),
    plant("mixedae-pre-post-ln-ignored", "mixedae", A,
          'features = latent if c.contrastive_features == "post_norm" else pre_norm', "features = latent",
          "Table 3b pre/post-LN switch ignored"),
    plant("mixedae-projector-bypassed", "mixedae", A, "homologous_contrastive_loss(self.projector(features), members,",
          "homologous_contrastive_loss(features, members,", "projector bypassed"),
    plant("mixedae-xavier-ignored", "mixedae", A, "        if c.xavier_init:\n            mae_init_(encoder)",
          "        if False:\n            mae_init_(encoder)", "xavier init ignored"),
    plant("mixedae-mean-without-query", "mixedae", A, "centre = F.normalize(members @ z, dim=-1)",
          "centre = F.normalize((same & ~self_pair).float() @ z, dim=-1)", "Table 3c mean positive without the query"),
    plant("mixedae-contrast-whole-batch", "mixedae", A,
          "homologous_contrastive_loss(self.projector(features), members,",
          "homologous_contrastive_loss(self.projector(features).flatten(0, 1)[None], "
          "self.sample_sources(masks).flatten()[None],", "eq. 7 across the whole batch at its call site"),
    plant("mixedae-rotated-sources", "mixedae", A,
          "seq_sources = (self.first_images(s, images.device)[:, None] + index[None, :]).reshape(-1)",
          "seq_sources = (self.first_images(s, images.device)[:, None] + (index[None, :] + torch.arange(s, "
          "device=images.device)[:, None] % self.samples_per_group()) % self.k).reshape(-1)",
          "decoder sources rotated for samples after the first in a group (full mode)"),
    plant("mixedae-global-layers-off-by-one", "mixedae", A, "first = min(c.global_layers, depth)",
          "first = min(c.global_layers + 1, depth)", "one more global block than asked"),
    plant("mixedae-spare-cells-fixed", "mixedae", A,
          "spare = torch.rand(count, k, generator=generator).argsort(dim=1)[:, : n % k]",
          "spare = torch.arange(k).expand(count, -1)[:, : n % k]", "spare cells always to the first members"),
    plant("mixedae-temperature-ignored", "mixedae", A, "sim = z @ z.transpose(1, 2) / temperature",
          "sim = z @ z.transpose(1, 2) / 1.0", "contrastive temperature ignored"),
    plant("mixedae-lambda-ignored", "mixedae", A, "loss = loss + c.contrastive_weight * contrastive",
          "loss = loss + contrastive", "eq. 8 lambda ignored"),
    plant("mixedae-topk-plus-one", "mixedae", V, "keep = min(int(plan.k), n)", "keep = min(int(plan.k) + 1, n)",
          "TopK keeps K + 1 keys"),
    plant("mixedae-full-masks-shared", "mixedae", A,
          "cells = balanced_assignment(self.mask_grid, self.k, count, generator)",
          "cells = balanced_assignment(self.mask_grid, self.k, count // self.samples_per_group(), "
          "generator).repeat_interleave(self.samples_per_group(), 0)", "full mode: one mask for the group's samples"),
    # ------------------------------------------------------------------ SimMIM
    plant("simmim-no-mask-token", "simmim", S, "x = torch.where(at, self.mask_token.to(tokens.dtype), tokens)",
          "x = tokens", "[MASK] token not applied"),
    plant("simmim-loss-on-visible", "simmim", S, "weight = downsample(pixels, c.target_downsample)",
          "weight = downsample(1 - pixels, c.target_downsample)", "loss on the visible pixels"),
    plant("simmim-mean-not-per-channel", "simmim", S, "total = weight.sum() * errors.shape[1]",
          "total = weight.sum()", "loss not divided by the channels"),
    plant("simmim-random-floor", "simmim", SMASKS, "masked = math.ceil(length * ratio)",
          "masked = int(length * ratio)", "random mask rounds down"),
    plant("simmim-square-floor", "simmim", SMASKS, "return max(1, min(h, w, round(math.sqrt(ratio * h * w))))",
          "return max(1, min(h, w, int(math.sqrt(ratio * h * w))))", "square side rounds down"),
    plant("simmim-head-pixel-order", "simmim", HEADS, "return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h * per, w * per)",
          "return x.permute(0, 5, 1, 2, 3, 4).reshape(b, channels, h * per, w * per)", "head outputs laid out wrongly"),
    plant("simmim-bins-255", "simmim", S, "return levels * bins // 256", "return levels * bins // 255",
          "colour bins of 255 levels"),
    plant("simmim-max-pool-target", "simmim", S, "return images if factor == 1 else F.avg_pool2d(images, factor)",
          "return images if factor == 1 else F.max_pool2d(images, factor)", "downsampled target by max pooling"),
    plant("simmim-norm-pix-wrong-patch", "simmim", S, "per = self.cell // c.target_downsample", "per = self.cell",
          "norm_pix target normalised over the wrong patch"),
    plant("simmim-smooth-l1-beta", "simmim", S, 'return F.smooth_l1_loss(pred, tgt, reduction="none")',
          'return F.smooth_l1_loss(pred, tgt, reduction="none", beta=0.5)', "smooth-l1 with another beta"),
    plant("simmim-l1-is-l2", "simmim", S, "return (pred - tgt).abs()", "return (pred - tgt).pow(2)",
          "l1 computed as l2"),
    plant("simmim-mlp-width", "simmim", HEADS, "return TokenHead(width, grid, stride, values, downsample, hidden=width)",
          "return TokenHead(width, grid, stride, values, downsample, hidden=2 * width)", "MLP head twice as wide"),
    # ------------------------------------------------------------------ MixMIM
    plant("mixmim-partner-rolled", "mixmim", MASKING, "return torch.stack([index, index.flip(0)])",
          "return torch.stack([index, index.roll(1)])", "partner i+1 instead of B-1-i"),
    plant("mixmim-loss-on-visible", "mixmim", X, "loss = self.reconstruction_loss(reconstruction, seq_target, hidden)",
          "loss = self.reconstruction_loss(reconstruction, seq_target, ~hidden)", "loss on the visible cells"),
    plant("mixmim-norm-pix-ignored", "mixmim", X, "        if self.config.norm_pix_loss:\n            target = normalize",
          "        if False:\n            target = normalize", "norm_pix_loss ignored"),
    plant("mixmim-mix-from-own", "mixmim", X, "mixed = torch.where(ids == g, images[sources[g]], mixed)",
          "mixed = torch.where(ids == g, images[sources[0]], mixed)", "cells taken from the image itself"),
    plant("mixmim-visible-inverted", "mixmim", X, "visible = torch.cat([(flat == g).expand(b, -1) for g in range(decoded)])",
          "visible = torch.cat([(flat != g).expand(b, -1) for g in range(decoded)])", "decoder sees the other group"),
    plant("mixmim-ratio-rounded", "mixmim", MASKING, "sizes = [length - int(length * r), int(length * r)]",
          "sizes = [length - round(length * r), round(length * r)]", "mask count rounded, not floored"),
    plant("mixmim-sources-transposed", "mixmim", X,
          "return self._reconstruct(images, latent, visible, hidden, sources[:decoded].reshape(-1), groups)",
          "return self._reconstruct(images, latent, visible, hidden, sources[:decoded].t().reshape(-1), groups)",
          "decoded rows paired with the wrong images"),
    plant("mixmim-shuffle-fixed-points", "mixmim", X, "source[i, where] = where[derangement(len(where), generator)]",
          "source[i, where] = where[torch.randperm(len(where), generator=generator)]", "shuffle may keep cells"),
    plant("mixmim-mask-token-cells-unscored", "mixmim", X,
          "hidden = hidden | tokens_at.reshape(tokens_at.shape[0], -1).expand(b, -1).repeat(decoded, 1)",
          "hidden = hidden", "[MASK] cells not scored"),
    plant("mixmim-decoder-no-mask-token", "mixmim", "src/mixmim/models/decoder.py",
          "x = torch.where(visible.unsqueeze(-1), x, self.mask_token.to(x.dtype))",
          "x = torch.where(visible.unsqueeze(-1), x, torch.zeros_like(x))", "decoder mask token unused"),
]

P, D = "src/mixmim/methods/patches.py", "src/mixmim/models/decoder.py"
HOMOLOGOUS = "src/mixmim/methods/homologous.py"

AFTER = [
    # ------------------------------------------------------------------ MAE (the same bugs, then new ones)
    plant("mae-loss-on-kept", "mae", M, "loss=masked_mse(reconstruction, target, hidden)",
          "loss=masked_mse(reconstruction, target, ~hidden)", "loss on the kept patches"),
    plant("mae-norm-pix-ignored", "mae", M, "target = patch_targets(images, self.cell, self.config.norm_pix_loss)",
          "target = patch_targets(images, self.cell, False)", "norm_pix_loss ignored"),
    plant("mae-mse-all-patches", "mae", P, "return (per_patch * weight).sum() / weight.sum().clamp(min=1)",
          "return (per_patch * weight).sum() / weight.numel()", "masked MSE divided by all patches"),
    plant("mae-no-positions", "mae", V, "        b, _, c = tokens.shape\n        x = self._patches_with_positions(tokens)",
          "        b, _, c = tokens.shape\n        x = tokens", "kept patches without their positions"),
    plant("mae-keeps-hidden", "mae", M, "keep_index = hidden.long().argsort(dim=1, stable=True)[:, :keep]",
          "keep_index = hidden.long().argsort(dim=1, stable=True)[:, -keep:]", "encoder fed hidden patches"),
    plant("mae-decoder-no-mask-token", "mae", M, "reconstruction = self.decoder(full, ~hidden, prefix=prefix if lead else None)",
          "reconstruction = self.decoder(full, None, prefix=prefix if lead else None)",
          "decoder sees zeros, not [MASK], at hidden places"),
    plant("mae-patch-init", "mae", M, "        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))",
          "        pass", "patch projection not xavier-initialised"),
    plant("control-noop", "mae", M, "reconstruction = self.decoder(full, ~hidden, prefix=prefix if lead else None)",
          "reconstruction = self.decoder(full + latent.mean(1, keepdim=True) * 0, ~hidden, prefix=prefix if lead else None)",
          "(control: a no-op edit; must NOT be caught)"),
    plant("mae-cls-not-in-decoder", "mae", M, "reconstruction = self.decoder(full, ~hidden, prefix=prefix if lead else None)",
          "reconstruction = self.decoder(full, ~hidden, prefix=None)", "class token dropped before the decoder (issue 21)"),
    plant("mae-decoder-eps", "mae", M, "build_decoder(encoder.num_features, self.grid, self.cell, self.in_chans, c, MAE_NORM_EPS)",
          "build_decoder(encoder.num_features, self.grid, self.cell, self.in_chans, c)", "decoder LayerNorm eps 1e-5"),
    plant("mae-cls-position", "mae", D, "x = torch.cat([self.embed(prefix), x], dim=1)  # MAE's class-token position is all zeros",
          "x = torch.cat([self.embed(prefix) + self.pos_embed[:, :1].to(x.dtype), x], dim=1)",
          "decoder class token given the first patch's position"),
    plant("mae-learnable-positions", "mae", M, 'encoder_defaults: ClassVar[dict[str, dict[str, Any]]] = {"vit": {"fixed_pos_embed": True}}',
          "encoder_defaults: ClassVar[dict[str, dict[str, Any]]] = {}", "timm's learnable positions on vit_*"),
    # ------------------------------------------------------------------ MixedAE
    plant("mixedae-loss-on-supplied", "mixedae", A, "recon_loss = masked_mse(reconstruction, seq_target, hidden)",
          "recon_loss = masked_mse(reconstruction, seq_target, visible)", "loss on the supplied patches"),
    plant("mixedae-wrong-target", "mixedae", A, "seq_target = patch_targets(images, self.cell, c.norm_pix_loss)[seq_sources]",
          "seq_target = patch_targets(images, self.cell, c.norm_pix_loss)[seq_sources.flip(0)]",
          "loss against another image's target"),
    plant("mixedae-decoder-sees-all", "mixedae", A,
          "reconstruction = self.decoder(latent.repeat_interleave(self.k, dim=0), visible, prefix=cls)",
          "reconstruction = self.decoder(latent.repeat_interleave(self.k, dim=0), None, prefix=cls)",
          "eq. 3 without [MASK]: each decoder sees every image's features"),
    plant("mixedae-mse-all-patches", "mixedae", P, "return (per_patch * weight).sum() / weight.sum().clamp(min=1)",
          "return (per_patch * weight).sum() / weight.numel()", "loss divided by all patches"),
    plant("mixedae-norm-pix-ignored", "mixedae", A, "seq_target = patch_targets(images, self.cell, c.norm_pix_loss)[seq_sources]",
          "seq_target = patch_targets(images, self.cell, False)[seq_sources]", "norm_pix_loss ignored"),
    plant("mixedae-segment-once", "mixedae", V, "            if layer_embed is not None:\n                x = x + layer_embed",
          "            if layer_embed is not None and blk is self.blocks[0]:\n                x = x + layer_embed",
          "segment embedding only before the first block"),
    plant("mixedae-pre-post-ln-ignored", "mixedae", A,
          'features = latent if c.contrastive_features == "post_norm" else pre_norm', "features = latent",
          "Table 3b pre/post-LN switch ignored"),
    plant("mixedae-projector-bypassed", "mixedae", A, "homologous_contrastive_loss(self.projector(features), members,",
          "homologous_contrastive_loss(features, members,", "projector bypassed"),
    plant("mixedae-xavier-ignored", "mixedae", A, "        if c.xavier_init:\n            mae_init_(encoder)",
          "        if False:\n            mae_init_(encoder)", "xavier init ignored"),
    plant("mixedae-mean-without-query", "mixedae", A, "centre = F.normalize(members @ z, dim=-1)",
          "centre = F.normalize((same & ~self_pair).float() @ z, dim=-1)", "Table 3c mean positive without the query"),
    plant("mixedae-contrast-whole-batch", "mixedae", A,
          "homologous_contrastive_loss(self.projector(features), members,",
          "homologous_contrastive_loss(self.projector(features).flatten(0, 1)[None], "
          "self.sample_sources(masks).flatten()[None],", "eq. 7 across the whole batch at its call site"),
    plant("mixedae-rotated-sources", "mixedae", A,
          "seq_sources = (self.first_images(s, images.device)[:, None] + index[None, :]).reshape(-1)",
          "seq_sources = (self.first_images(s, images.device)[:, None] + (index[None, :] + torch.arange(s, "
          "device=images.device)[:, None] % self.samples_per_group()) % self.k).reshape(-1)",
          "decoder sources rotated for samples after the first in a group (full mode)"),
    plant("mixedae-global-layers-off-by-one", "mixedae", A, "first = min(c.global_layers, depth)",
          "first = min(c.global_layers + 1, depth)", "one more global block than asked"),
    plant("mixedae-spare-cells-fixed", "mixedae", MASKING,
          "spare = torch.rand(count, k, generator=generator).argsort(dim=1)[:, : n % k]",
          "spare = torch.arange(k).expand(count, -1)[:, : n % k]", "spare cells always to the first members"),
    plant("mixedae-temperature-ignored", "mixedae", A, "sim = z @ z.transpose(1, 2) / temperature",
          "sim = z @ z.transpose(1, 2) / 1.0", "contrastive temperature ignored"),
    plant("mixedae-lambda-ignored", "mixedae", A, "loss = loss + c.contrastive_weight * contrastive",
          "loss = loss + contrastive", "eq. 8 lambda ignored"),
    plant("mixedae-topk-plus-one", "mixedae", HOMOLOGOUS, "top, index = scores.topk(min(int(self.k), n), dim=-1)",
          "top, index = scores.topk(min(int(self.k) + 1, n), dim=-1)", "TopK keeps K + 1 keys"),
    plant("mixedae-full-masks-shared", "mixedae", A,
          "cells = balanced_assignment(self.mask_grid, self.k, count, generator)",
          "cells = balanced_assignment(self.mask_grid, self.k, count // self.samples_per_group(), "
          "generator).repeat_interleave(self.samples_per_group(), 0)", "full mode: one mask for the group's samples"),
    plant("mixedae-cls-switch-ignored", "mixedae", A,
          "cls = prefix.repeat_interleave(self.k, dim=0) if c.decoder_cls_token and lead else None", "cls = None",
          "decoder_cls_token ignored"),
    plant("mixedae-accumulate-ignored", "mixedae", V,
          "                x = x - layer_embed  # the block's update stays, the embedding leaves the stream",
          "                pass", "segment_embed_accumulate=False ignored"),
    plant("mixedae-lr-batch-ignored", "mixedae", A, 'if self.config.lr_batch == "samples":', "if False:",
          "lr_batch=samples ignored"),
    # ------------------------------------------------------------------ SimMIM
    plant("simmim-no-mask-token", "simmim", S, "x = torch.where(at, self.mask_token.to(tokens.dtype), tokens)",
          "x = tokens", "[MASK] token not applied"),
    plant("simmim-loss-on-visible", "simmim", S, "weight = downsample(pixels, c.target_downsample)",
          "weight = downsample(1 - pixels, c.target_downsample)", "loss on the visible pixels"),
    plant("simmim-mean-not-per-channel", "simmim", S, "total = weight.sum() * errors.shape[1]",
          "total = weight.sum()", "loss not divided by the channels"),
    plant("simmim-random-floor", "simmim", SMASKS, "masked = math.ceil(length * ratio)",
          "masked = int(length * ratio)", "random mask rounds down"),
    plant("simmim-square-floor", "simmim", SMASKS, "return max(1, min(h, w, round(math.sqrt(ratio * h * w))))",
          "return max(1, min(h, w, int(math.sqrt(ratio * h * w))))", "square side rounds down"),
    plant("simmim-head-pixel-order", "simmim", HEADS, "return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h * per, w * per)",
          "return x.permute(0, 5, 1, 2, 3, 4).reshape(b, channels, h * per, w * per)", "head outputs laid out wrongly"),
    plant("simmim-bins-255", "simmim", S, "return levels * bins // 256", "return levels * bins // 255",
          "colour bins of 255 levels"),
    plant("simmim-max-pool-target", "simmim", S, "return images if factor == 1 else F.avg_pool2d(images, factor)",
          "return images if factor == 1 else F.max_pool2d(images, factor)", "downsampled target by max pooling"),
    plant("simmim-norm-pix-wrong-patch", "simmim", S, "per = self.cell // c.target_downsample", "per = self.cell",
          "norm_pix target normalised over the wrong patch"),
    plant("simmim-smooth-l1-beta", "simmim", S, 'return F.smooth_l1_loss(pred, tgt, reduction="none")',
          'return F.smooth_l1_loss(pred, tgt, reduction="none", beta=0.5)', "smooth-l1 with another beta"),
    plant("simmim-l1-is-l2", "simmim", S, "return (pred - tgt).abs()", "return (pred - tgt).pow(2)",
          "l1 computed as l2"),
    plant("simmim-mlp-width", "simmim", HEADS, "return TokenHead(width, grid, stride, values, downsample, hidden=width)",
          "return TokenHead(width, grid, stride, values, downsample, hidden=2 * width)", "MLP head twice as wide"),
    plant("simmim-literal-eps", "simmim", S, "return (errors * weight).sum() / total.clamp(min=1e-6)",
          "return (errors * weight).sum() / (total + 1e-5)", "the denominator's 1e-5 taken literally"),
    plant("simmim-bins-channels", "simmim", S, 'values = self.in_chans * (c.num_bins if c.loss == "bins" else 1)',
          'values = 3 * (c.num_bins if c.loss == "bins" else 1)', "head predicts 3 channels whatever in_chans"),
    # ------------------------------------------------------------------ MixMIM
    plant("mixmim-partner-rolled", "mixmim", MASKING, "return torch.stack([index, index.flip(0)])",
          "return torch.stack([index, index.roll(1)])", "partner i+1 instead of B-1-i"),
    plant("mixmim-loss-on-visible", "mixmim", X, "out = PretrainOutput(loss=masked_mse(reconstruction, seq_target, hidden), mask=groups)",
          "out = PretrainOutput(loss=masked_mse(reconstruction, seq_target, ~hidden), mask=groups)",
          "loss on the visible cells"),
    plant("mixmim-norm-pix-ignored", "mixmim", X, "seq_target = patch_targets(images, self.cell, self.config.norm_pix_loss)[seq_sources]",
          "seq_target = patch_targets(images, self.cell, False)[seq_sources]", "norm_pix_loss ignored"),
    plant("mixmim-mix-from-own", "mixmim", X, "mixed = torch.where(ids == g, images[sources[g]], mixed)",
          "mixed = torch.where(ids == g, images[sources[0]], mixed)", "cells taken from the image itself"),
    plant("mixmim-visible-inverted", "mixmim", X, "visible = torch.cat([(flat == g).expand(b, -1) for g in range(decoded)])",
          "visible = torch.cat([(flat != g).expand(b, -1) for g in range(decoded)])", "decoder sees the other group"),
    plant("mixmim-ratio-rounded", "mixmim", MASKING, "sizes = [length - int(length * r), int(length * r)]",
          "sizes = [length - round(length * r), round(length * r)]", "mask count rounded, not floored"),
    plant("mixmim-sources-transposed", "mixmim", X,
          "return self._reconstruct(images, latent, visible, hidden, sources[:decoded].reshape(-1), groups, shown)",
          "return self._reconstruct(images, latent, visible, hidden, sources[:decoded].t().reshape(-1), groups, shown)",
          "decoded rows paired with the wrong images"),
    plant("mixmim-shuffle-fixed-points", "mixmim", X, "source[i, where] = where[derangement(len(where), generator)]",
          "source[i, where] = where[torch.randperm(len(where), generator=generator)]", "shuffle may keep cells"),
    plant("mixmim-mask-token-cells-unscored", "mixmim", X,
          "hidden = hidden | tokens_at.reshape(tokens_at.shape[0], -1).expand(b, -1).repeat(decoded, 1)",
          "hidden = hidden", "[MASK] cells not scored"),
    plant("mixmim-decoder-no-mask-token", "mixmim", D,
          "x = torch.where(visible.unsqueeze(-1), x, self.mask_token.to(x.dtype))",
          "x = torch.where(visible.unsqueeze(-1), x, torch.zeros_like(x))", "decoder mask token unused"),
    plant("mixmim-picture-not-mixed", "mixmim", X, "            shown = mixed\n", "            shown = images\n",
          "the picture's input row shows the originals, not the mix"),
    # ------------------------------------------------------------------ evaluation, study, monitor, encoders
    plant("knn-no-temperature", "evaluation", KNN, "weights = (sims / temperature).exp()", "weights = sims.exp()",
          "k-NN votes ignore the temperature"),
    plant("knn-farthest", "evaluation", KNN, "sims, idx = (query @ bank.T).topk(k, dim=1)",
          "sims, idx = (query @ bank.T).topk(k, dim=1, largest=False)", "k-NN takes the farthest neighbours"),
    plant("topk-any-k", "evaluation", METRICS, "return [int(hits[:, :min(k, kmax)].any(dim=1).sum()) for k in ks]",
          "return [int(hits[:, :kmax].any(dim=1).sum()) for k in ks]", "top-1 counts the top-5"),
    plant("confusion-transposed", "evaluation", METRICS, "flat = targets.long() * num_classes + predictions.long()",
          "flat = predictions.long() * num_classes + targets.long()", "confusion matrix rows are predictions"),
    plant("layer-decay-inverted", "evaluation", LD, '"lr_scale": layer_decay ** (count - 1 - ids[name])}',
          '"lr_scale": layer_decay ** ids[name]}', "layer decay counted from the wrong end"),
    plant("study-std-ddof0", "study", STUDY, "/ (len(values) - 1)) if len(values) > 1 else 0.0",
          "/ len(values)) if len(values) > 1 else 0.0", "population instead of sample standard deviation"),
    plant("study-one-seed-no-yardstick", "study", STUDY, "        spread = max(spread, yardstick)\n",
          "        spread = spread\n", "a one-seed arm counts as spread-free"),
    plant("study-verdict-any-gap", "study", STUDY, 'return "holds" if gap > spread else',
          'return "holds" if gap > 0 else', "any gap holds, whatever the spread"),
    plant("monitor-never-warns", "study", MONITOR, "knn < self.baseline - 2.0", "knn < self.baseline - 200.0",
          "the monitor never warns of a falling k-NN"),
    plant("monitor-top5", "study", MONITOR, 'topk_correct(scores, test_y, (1,))[0]', 'topk_correct(scores, test_y, (5,))[0]',
          "the monitor reports top-5 as k-NN accuracy"),
    plant("study-pretrains-cached-seed", "study", STUDY,
          "        if not todo:  # every result cached: the run (and its checkpoints) need not exist any more\n            return True\n",
          "", "a seed whose results are all cached is pretrained again"),
    plant("study-reuse-overwrites", "study", STUDY, "            if not target.is_file():", "            if True:",
          "--reuse writes over a cached result"),
    plant("study-reuse-any-profile", "study", STUDY, 'if payload.get("profile", self.profile.name) != self.profile.name:',
          "if False:", "--reuse takes results of another profile"),
    plant("study-cache-ignores-settings", "study", STUDY, "        if was is not None and was != now:",
          "        if False:", "a cached result of other settings is taken"),
    plant("study-reuse-ignores-settings", "study", STUDY,
          'if row.get("settings", self.settings(arm, row["metric"])) != self.settings(arm, row["metric"]):',
          "if False:", "--reuse takes rows of other settings"),
    plant("study-settings-all-evaluation", "study", STUDY, '"images": self.profile.images, "pretrain": arm.pretrain, "evaluation": evaluation}',
          '"images": self.profile.images, "pretrain": arm.pretrain, "evaluation": ev}',
          "one metric's fingerprint changes with another metric's settings"),
    plant("study-mae-own-position-table", "study", "src/mixmim/configs/study/profiles/cpu.yaml",
          "fc_norm: false,\n              fixed_pos_embed: false}", "fc_norm: false}",
          "the CPU study's MAE and MixedAE arms keep their methods' fixed position tables"),
    plant("study-curves-forget-kept", "study", STUDY, "kept / arm.name / f\"seed{seed}.csv\" if kept is not None else None",
          "None", "a report redrawn without the runs loses the curves an earlier report kept"),
    plant("study-kept-curves-prefer-copy", "study", STUDY, "if p is not None and p.is_file()]",
          "if p is not None and p.is_file()][::-1]", "the kept copy is drawn although the run is on disk"),
    plant("study-curves-seed0-only", "study", STUDY, "        for seed in seeds_of(arm, study.profile):\n            found",
          "        for seed in [0]:\n            found", "the report's curves look for seed 0 only"),
    plant("study-legend-last-panel", "study", "src/mixmim/viz/study.py",
          "handles = {h.get_label(): h for ax in axes[0] for h in ax.collections}",
          "handles = {h.get_label(): h for ax in axes[0][-1:] for h in ax.collections}",
          "the legend lists only the last panel's arms"),
    plant("swin-groups-leak", "encoders", SWIN, "allowed = (ids[..., :, None] == ids[..., None, :]) | pad",
          "allowed = (ids[..., :, None] >= 0) | pad", "Swin windows attend across images"),
    plant("mixed-conv-leak", "encoders", MIXCONV, "ys = conv(torch.where(masks, x.unsqueeze(0), 0).flatten(0, 1))",
          "ys = conv(x.unsqueeze(0).expand(masks.shape[0], *x.shape).flatten(0, 1))", "mixed convolution sees every image"),
]


def locate(tree: Path, p: dict) -> Path | None:
    """The file the plant's ``old`` text is in: the file it names, or (the code moved since the plant
    was written) the one file under src/ that holds the text once."""
    named = tree / p["file"]
    if named.is_file() and named.read_text().count(p["old"]) == 1:
        return named
    found = [f for f in sorted((tree / "src").rglob("*.py")) + sorted((tree / "src").rglob("*.yaml"))
             if f.read_text().count(p["old"]) == 1]
    return found[0] if len(found) == 1 else None


def run_plant(tree: Path, p: dict, python: str) -> dict:
    path = locate(tree, p)
    if path is None:
        return dict(p, caught=None, error=f"'old' does not occur exactly once in {p['file']} or one other file")
    p = dict(p, file=path.relative_to(tree).as_posix())
    text = path.read_text()
    path.write_text(text.replace(p["old"], p["new"]))
    try:
        files = [f for f in AREA_TESTS[p["area"]] if (tree / f).is_file()]
        cmd = [python, "-m", "pytest", "-q", "-x", "-n", "2", "-p", "no:cacheprovider", *files, "-k", SLOW]
        env = dict(os.environ, PYTHONPATH=str(tree / "src"))
        start = time.time()
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
        tail = [line for line in done.stdout.splitlines() if line.startswith("FAILED") or " passed" in line
                or " failed" in line or "error" in line.lower()][-3:]
        return dict(p, caught=done.returncode != 0, seconds=round(time.time() - start, 1), tail=tail)
    finally:
        path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", type=Path, help="a scratch copy of the repository (never the worktree)")
    parser.add_argument("--plants", choices=("before", "after"), required=True)
    parser.add_argument("--only", nargs="*", help="plant ids to run (default: all)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    args.tree = args.tree.resolve()  # the tests run with cwd=tree: a relative PYTHONPATH would miss it
    plants = BEFORE if args.plants == "before" else AFTER
    if args.only:
        plants = [p for p in plants if p["id"] in args.only]
    results = []
    for p in plants:
        r = run_plant(args.tree, p, args.python)
        results.append(r)
        print(f"{r['id']:36s} {r['area']:8s} caught={r['caught']} {r.get('error', '')}", flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
