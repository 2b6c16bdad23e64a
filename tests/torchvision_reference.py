"""A small torch.nn copy of torchvision's ResNet-50 (torchvision/models/resnet.py: ``ResNet`` with
``Bottleneck`` blocks [3, 4, 6, 3], v1.5: the stride on the 3x3 conv), with torchvision's parameter names
and shapes, so the converter's tests need torch alone (a CPU build) and not torchvision, whose wheels
come with a CUDA torch of several GB.

benchmarks/check_torchvision_reference.py checks it against the real torchvision once: the same
state_dict names and shapes, and identical outputs with torchvision's weights loaded.

``cifar_stem=True`` gives the torchvision-like CIFAR variant (a 3x3 stride-1 ``conv1``, no max-pool),
the zoo's CIFAR layout; the parameter names are the same. ``forward`` returns the logits and the four
stage outputs (``layer1`` .. ``layer4``), as the zoo's models return ``(logits, features)``.
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000, cifar_stem: bool = False):
        super().__init__()
        self.inplanes = 64
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(64, 3)
        self.layer2 = self._make_layer(128, 4, stride=2)
        self.layer3 = self._make_layer(256, 6, stride=2)
        self.layer4 = self._make_layer(512, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        logits = self.fc(torch.flatten(self.avgpool(x), 1))
        return logits, tuple(features)


def randomize(model: nn.Module, seed: int = 0, image_size: int = 64) -> nn.Module:
    """Random weights and non-trivial BatchNorm state, in eval mode: a conversion that swapped, dropped
    or mis-transposed any tensor would show in the outputs.

    The BatchNorm affine parameters are random around 1 and 0; the running statistics are those of
    random ``image_size`` images through the random network (so activations stay of order 1 through
    the 16 blocks), then perturbed (means shifted, variances scaled by 0.75..1.25) so that they are not
    the statistics of any batch the test feeds.
    """
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator)
    rand = lambda *shape: torch.rand(*shape, generator=generator)
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):  # He normal over fan-in
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                module.weight.copy_(randn(module.weight.shape) * (2 / fan_in) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(0.5 + rand(module.num_features))
                module.bias.copy_(0.2 * randn(module.num_features))
        for module in model.modules():
            if hasattr(module, "bn3"):  # a bottleneck (also torchvision's): residual branches start small
                module.bn3.weight.mul_(0.3)
            elif isinstance(module, nn.Linear):
                module.weight.copy_(randn(module.weight.shape) * module.in_features ** -0.5)
                module.bias.copy_(0.1 * randn(module.bias.shape))
        for bn in batchnorms:  # cumulative averages over one calibration batch
            bn.reset_running_stats()
            bn.momentum = None
        model.train()(randn(4, 3, image_size, image_size))
        for bn in batchnorms:
            bn.momentum = 0.1
            n = bn.num_features
            bn.running_mean.add_(0.2 * randn(n) * bn.running_var.sqrt())
            bn.running_var.mul_(0.75 + 0.5 * rand(n))
            bn.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=generator)))
    return model.eval()
