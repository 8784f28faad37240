# Test-only reference: the parts of microsoft/SimMIM (https://github.com/microsoft/SimMIM, commit 0e71746) that
# swinlab's SimMIM is checked against, adapted as little as possible:
#   models/simmim.py    SwinTransformerForSimMIM.forward, SimMIM (decoder, loss)
#   data/data_simmim.py MaskGenerator
#   utils.py            remap_pretrained_keys_swin (the relative-position-bias part)
# Adaptations: the encoder is timm's SwinTransformer / SwinTransformerV2 (the official Swin, NHWC maps) instead of
# the repository's own copy, so the mask token is applied to (B, H, W, C) maps; scipy's removed
# interp2d(kind="cubic") is RectBivariateSpline(kx=3, ky=3, s=0), the same spline on a grid; logging dropped.
#
# SimMIM, Copyright (c) 2021 Microsoft. Licensed under The MIT License:
# Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
# documentation files (the "Software"), to deal in the Software without restriction, including without limitation
# the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and
# to permit persons to whom the Software is furnished to do so, subject to the following conditions: The above
# copyright notice and this permission notice shall be included in all copies or substantial portions of the
# Software. THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT
# LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT
# SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION
# OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
# DEALINGS IN THE SOFTWARE.

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import interpolate


class SwinTransformerForSimMIM(nn.Module):
    """models/simmim.py SwinTransformerForSimMIM around a timm Swin (V1 or V2) built with num_classes=0."""

    def __init__(self, swin):
        super().__init__()
        self.swin = swin
        self.num_features = swin.num_features
        self.in_chans = swin.patch_embed.proj.in_channels
        self.patch_size = swin.patch_embed.patch_size[0]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, swin.embed_dim))

    def forward(self, x, mask):
        x = self.swin.patch_embed(x)  # timm: B, H, W, C (the official code: B, L, C)

        assert mask is not None
        B, H, W, _ = x.shape

        mask_tokens = self.mask_token.expand(B, H * W, -1).reshape(B, H, W, -1)
        w = mask.unsqueeze(-1).type_as(mask_tokens)
        x = x * (1.0 - w) + mask_tokens * w

        for layer in self.swin.layers:
            x = layer(x)
        x = self.swin.norm(x)

        return x.permute(0, 3, 1, 2)


class SimMIM(nn.Module):
    def __init__(self, encoder, encoder_stride):
        super().__init__()
        self.encoder = encoder
        self.encoder_stride = encoder_stride

        self.decoder = nn.Sequential(
            nn.Conv2d(in_channels=self.encoder.num_features, out_channels=self.encoder_stride**2 * 3, kernel_size=1),
            nn.PixelShuffle(self.encoder_stride),
        )

        self.in_chans = self.encoder.in_chans
        self.patch_size = self.encoder.patch_size

    def forward(self, x, mask):
        z = self.encoder(x, mask)
        x_rec = self.decoder(z)

        mask = (
            mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2).unsqueeze(1).contiguous()
        )
        loss_recon = F.l1_loss(x, x_rec, reduction="none")
        loss = (loss_recon * mask).sum() / (mask.sum() + 1e-5) / self.in_chans
        return loss


class MaskGenerator:
    def __init__(self, input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6):
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio

        assert self.input_size % self.mask_patch_size == 0
        assert self.mask_patch_size % self.model_patch_size == 0

        self.rand_size = self.input_size // self.mask_patch_size
        self.scale = self.mask_patch_size // self.model_patch_size

        self.token_count = self.rand_size**2
        self.mask_count = int(np.ceil(self.token_count * self.mask_ratio))

    def __call__(self):
        mask_idx = np.random.permutation(self.token_count)[: self.mask_count]
        mask = np.zeros(self.token_count, dtype=int)
        mask[mask_idx] = 1

        mask = mask.reshape((self.rand_size, self.rand_size))
        mask = mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)

        return mask


def remap_relative_position_bias_table(relative_position_bias_table_pretrained, L2):
    """utils.py remap_pretrained_keys_swin, the geometric interpolation of one table to L2 rows."""
    L1, nH1 = relative_position_bias_table_pretrained.size()
    src_size = int(L1**0.5)
    dst_size = int(L2**0.5)

    def geometric_progression(a, r, n):
        return a * (1.0 - r**n) / (1.0 - r)

    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = geometric_progression(1, q, src_size // 2)
        if gp > dst_size // 2:
            right = q
        else:
            left = q

    dis = []
    cur = 1
    for i in range(src_size // 2):
        dis.append(cur)
        cur += q ** (i + 1)

    r_ids = [-_ for _ in reversed(dis)]

    x = r_ids + [0] + dis  # noqa: RUF005 (as the official code)
    y = r_ids + [0] + dis  # noqa: RUF005

    t = dst_size // 2.0
    dx = np.arange(-t, t + 0.1, 1.0)
    dy = np.arange(-t, t + 0.1, 1.0)

    all_rel_pos_bias = []

    for i in range(nH1):
        z = relative_position_bias_table_pretrained[:, i].view(src_size, src_size).float().numpy()
        # interp2d(x, y, z, kind='cubic')(dx, dy): z[j, i] at (x[i], y[j]), output indexed [dy, dx]
        f_cubic = interpolate.RectBivariateSpline(y, x, z, kx=3, ky=3, s=0)
        all_rel_pos_bias.append(torch.Tensor(f_cubic(dy, dx)).contiguous().view(-1, 1))

    return torch.cat(all_rel_pos_bias, dim=-1)
