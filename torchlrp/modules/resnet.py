"""torchvision ResNet blocks whose residual addition is an explainable :class:`~torchlrp.Add`.

torchvision's blocks add the skip connection with ``out += identity``: under LRP the full relevance would flow
down both branches and double at every block. These subclasses keep the blocks' submodules and state_dict and only
route the addition through an ``Add`` module (registered as ``residual``; it has no parameters).
"""
from __future__ import annotations

from torch import Tensor
from torchvision.models.resnet import BasicBlock as TorchBasicBlock
from torchvision.models.resnet import Bottleneck as TorchBottleneck

from .residual import Add


class BasicBlock(TorchBasicBlock):
    """torchvision's ``BasicBlock`` with an explainable residual addition."""

    residual: Add

    def forward(self, x: Tensor) -> Tensor:
        """Run the block (same output as torchvision's)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.residual(out, identity))


class Bottleneck(TorchBottleneck):
    """torchvision's ``Bottleneck`` with an explainable residual addition."""

    residual: Add

    def forward(self, x: Tensor) -> Tensor:
        """Run the block (same output as torchvision's)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.residual(out, identity))


def explainable_block(block: TorchBasicBlock | TorchBottleneck) -> BasicBlock | Bottleneck:
    """Turn a torchvision block into its explainable subclass, in place (its submodules are kept).

    Parameters
    ----------
    block : torchvision BasicBlock or Bottleneck
        The block.

    Returns
    -------
    BasicBlock or Bottleneck
        The same object, now of the explainable class with an ``Add`` named ``residual``.
    """
    block.__class__ = BasicBlock if isinstance(block, TorchBasicBlock) else Bottleneck
    block.residual = Add()
    return block
