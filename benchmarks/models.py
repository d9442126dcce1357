"""Whole networks built in code with the real channel widths (no pretrained weights).

``resnet50_like``: torchvision's ResNet-50 v1.5 layout (7×7 stem, bottlenecks [3, 4, 6, 3] with
widths 64…512 and expansion 4, stride on the 3×3 conv, 1×1 projection shortcuts, BatchNorm),
a 10-class head ``fc``. ``convnext_tiny_like``: ConvNeXt-T (4×4 stride-4 stem, stages
[3, 3, 9, 3] with dims 96…768, blocks = depthwise 7×7 conv → LayerNorm → Linear 4× → GELU →
Linear → layer scale, 2×2 stride-2 downsampling), a 10-class head ``head``. Only the spatial
size and batch of the benchmark input are scaled down so a CPU run stays short (both builders
take optional widths and depths: :mod:`benchmarks.gpu`'s ``--quick`` runs tiny versions of the
same blocks). ``llama_block``: one Llama-style decoder block (pre-RMSNorm, multi-head causal
attention with ``q/k/v/o_proj`` Linear layers through ``F.scaled_dot_product_attention``,
SwiGLU MLP with ``gate/up/down_proj``; HF's module names; no rotary embedding — it is
element-wise and does not touch the adapted layers).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        s = x if self.downsample is None else self.downsample(x)
        return F.relu(y + s)


class ResNet50Like(nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (64, 128, 256, 512),
                 depths: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        cin = widths[0]
        for i, (width, n) in enumerate(zip(widths, depths, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = 4 * width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXtTinyLike(nn.Module):
    def __init__(self, num_classes: int = 10, dims: tuple[int, ...] = (96, 192, 384, 768),
                 depths: tuple[int, ...] = (3, 3, 9, 3)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0])]
        for i, (d, n) in enumerate(zip(dims, depths, strict=True)):
            if i > 0:
                layers += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], d, 2, stride=2)]
            layers += [ConvNeXtBlock(d) for _ in range(n)]
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean((2, 3))
        return self.head(self.norm(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * y).to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, h // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, h))


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """One pre-norm decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, hidden: int, intermediate: int, heads: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden)
        self.self_attn = LlamaAttention(hidden, heads)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.mlp = LlamaMLP(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


def resnet50_like(num_classes: int = 10, widths: tuple[int, ...] = (64, 128, 256, 512),
                  depths: tuple[int, ...] = (3, 4, 6, 3)) -> ResNet50Like:
    return ResNet50Like(num_classes, widths, depths)


def convnext_tiny_like(num_classes: int = 10, dims: tuple[int, ...] = (96, 192, 384, 768),
                       depths: tuple[int, ...] = (3, 3, 9, 3)) -> ConvNeXtTinyLike:
    return ConvNeXtTinyLike(num_classes, dims, depths)


def llama_block(hidden: int = 2048, intermediate: int = 5632, heads: int = 16) -> LlamaBlock:
    """A Llama-style decoder block (TinyLlama-1.1B's widths by default: 2048 / 5632, 16 heads).

    Example:
        >>> import torch
        >>> blk = llama_block(32, 64, 4)
        >>> blk(torch.randn(2, 5, 32)).shape
        torch.Size([2, 5, 32])
        >>> sorted(n for n, m in blk.named_modules() if isinstance(m, torch.nn.Linear))[:3]
        ['mlp.down_proj', 'mlp.gate_proj', 'mlp.up_proj']
    """
    return LlamaBlock(hidden, intermediate, heads)


class LlamaLike(nn.Module):
    """``depth`` Llama-style decoder blocks on embeddings ``(batch, seq, hidden)``: every
    weight is a Linear (attention q/k/v/o, MLP gate/up/down), as in a decoder LLM."""

    def __init__(self, hidden: int, intermediate: int, heads: int, depth: int) -> None:
        super().__init__()
        blocks = (LlamaBlock(hidden, intermediate, heads) for _ in range(depth))
        self.layers = nn.Sequential(*blocks)
        self.norm = RMSNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(x))


def llama_like(hidden: int = 512, intermediate: int = 1408, heads: int = 8,
               depth: int = 2) -> LlamaLike:
    """A small Llama-style decoder stack (the benchmark suite's all-linear case).

    Example:
        >>> import torch
        >>> m = llama_like(32, 64, 4, 2)
        >>> m(torch.randn(2, 5, 32)).shape
        torch.Size([2, 5, 32])
        >>> sum(isinstance(x, torch.nn.Linear) for x in m.modules())
        14
    """
    return LlamaLike(hidden, intermediate, heads, depth)
