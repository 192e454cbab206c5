"""ResNet trunk + projection head + prototypes, with the official multi-crop forward (REFERENCE section 1).

The trunk's modules sit at the top level of SwAVModel, so the state_dict uses the official swav layout
(`conv1.weight`, ..., `projection_head.0.weight`, `prototypes.weight`) and its trunk part is exactly a
torchvision ResNet state_dict: export is a key filter, and official checkpoints load after stripping `module.`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

TRUNK_MODULES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")
HEAD_PREFIXES = ("projection_head.", "prototypes.")


class SwAVModel(nn.Module):
    def __init__(self, arch: str = "resnet50", hidden_mlp: int = 2048, feat_dim: int = 128,
                 n_prototypes: int = 3000):
        super().__init__()
        # torchvision's init equals the official one (kaiming fan_out convs, BN 1/0, no zero-init residual).
        resnet = torchvision.models.get_model(arch, weights=None)
        for name in TRUNK_MODULES:
            self.add_module(name, getattr(resnet, name))
        self.arch = arch
        self.num_features = resnet.fc.in_features
        if hidden_mlp == 0:
            self.projection_head = nn.Linear(self.num_features, feat_dim)
        else:
            self.projection_head = nn.Sequential(
                nn.Linear(self.num_features, hidden_mlp),
                nn.BatchNorm1d(hidden_mlp),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_mlp, feat_dim),
            )
        self.prototypes = nn.Linear(feat_dim, n_prototypes, bias=False)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """crops: list of [B, 3, H_i, W_i]. Returns (z [n_crops*B, feat] L2-normalised, scores [n_crops*B, K]), both
        fp32 under autocast too.

        Consecutive crops of the same resolution are concatenated and go through the trunk in one call
        (so BatchNorm statistics are shared within a resolution group, as in the official code).
        """
        feats, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.forward_trunk(torch.cat(crops[start:end])))
            start = end
        h = self.projection_head(torch.cat(feats))
        # fp32 from here even under autocast: the scores go into Sinkhorn's exp(s / eps), where eps = 0.05 multiplies
        # their error by 20, and a bf16 score near 1 is off by up to 2^-9 (the official run's apex O1 fp16 is 8 times
        # finer). The queue's scores, computed outside autocast, are fp32 too, so a Sinkhorn call never mixes two
        # precisions. The cost is one small fp32 matmul (feat_dim x K per crop).
        with torch.autocast(h.device.type, enabled=False):
            z = F.normalize(h.float(), dim=1, p=2)
            return z, self.prototypes(z)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """L2-normalise each prototype row in place (before every step, outside autograd)."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1, p=2))


def trunk_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The torchvision-layout trunk from a SwAVModel (or official, `module.`-prefixed) state_dict."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if not k.startswith(HEAD_PREFIXES):
            out[k] = v
    return out
