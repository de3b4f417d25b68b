"""Resampling with FIR filters, bias + activation, and equalised-learning-rate layers, in plain PyTorch.

What StyleGAN2's networks are built of (Karras et al. 2020, "Analyzing and Improving the Image Quality
of StyleGAN"), written from the paper's definitions so they run anywhere PyTorch does (CPU included) and
autograd gives every derivative, the second-order ones of R1 and path-length regularisation too:

- :func:`upfirdn2d`: upsample by zero insertion, pad (negative = crop), convolve with a FIR filter,
  downsample by striding; the filter is separable, so two depthwise 1-D convolutions,
- :func:`upsample2d` / :func:`downsample2d`: the paddings that keep ``H -> 2H`` / ``H -> H/2`` centred,
- :func:`bias_act`: bias, activation with its gain (√2 for leaky ReLU, so activations keep unit variance),
  and an optional clamp (``conv_clamp``: what keeps fp16/bf16 activations in range),
- :class:`EqualLinear` / :class:`EqualConv2d`: weights drawn N(0, 1) and scaled at run time by
  1/√fan_in (the "equalised learning rate"), with an optional learning-rate multiplier (the mapping
  network's 0.01).

On CUDA ``torch.compile`` (``TESSERA_COMPILE=1`` in the method's config) fuses these; the plain code is
the reference the compiled one is tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATION_GAIN = {"linear": 1.0, "lrelu": math.sqrt(2.0)}


def setup_filter(taps=(1, 3, 3, 1)) -> torch.Tensor:
    """The 1-D binomial filter (normalised to sum 1) that resampling applies along each axis."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return f / f.sum()


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, up: int = 1, down: int = 1, pad=(0, 0, 0, 0),
              gain: float = 1.0) -> torch.Tensor:
    """Upsample ``x`` [N, C, H, W] by ``up`` (zeros between samples), pad by ``(x0, x1, y0, y1)``,
    convolve with the separable filter ``f`` (1-D taps) times ``gain``, keep every ``down``-th sample."""
    n, c, h, w = x.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(n, c, h * up, w * up)
    x0, x1, y0, y1 = pad
    x = F.pad(x, (max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)))
    x = x[:, :, max(-y0, 0): x.shape[2] - max(-y1, 0), max(-x0, 0): x.shape[3] - max(-x1, 0)]
    taps = (f * math.sqrt(gain)).flip(0).to(x.dtype)  # flipped: a true convolution; gain split over the axes
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[:, :, ::down, ::down] if down > 1 else x


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    taps = f.numel()
    p0, p1 = (taps + up - 1) // 2, (taps - up) // 2
    return upfirdn2d(x, f, up=up, pad=(p0, p1, p0, p1), gain=up * up)


def downsample2d(x: torch.Tensor, f: torch.Tensor, down: int = 2) -> torch.Tensor:
    taps = f.numel()
    p0, p1 = (taps - down + 1) // 2, (taps - down) // 2
    return upfirdn2d(x, f, down=down, pad=(p0, p1, p0, p1))


def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, act: str = "linear", gain: float = 1.0,
             clamp: float | None = None, dim: int = 1) -> torch.Tensor:
    """``act(x + b) * gain_of(act) * gain``, then clamped to ±``clamp``; ``b`` broadcast along ``dim``."""
    if b is not None:
        shape = [1] * x.ndim
        shape[dim] = -1
        x = x + b.to(x.dtype).view(shape)
    if act == "lrelu":
        x = F.leaky_relu(x, 0.2)
    elif act != "linear":
        raise ValueError(f"unknown activation '{act}' (linear, lrelu)")
    gain = ACTIVATION_GAIN[act] * gain
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


class EqualLinear(nn.Module):
    """A fully connected layer with the equalised learning rate and its own learning-rate multiplier."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act: str = "linear",
                 lr_multiplier: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.act = act
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.bias_gain if self.bias is not None else None
        if self.act == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x @ w.t(), b, self.act)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, act={self.act}"


class EqualConv2d(nn.Module):
    """A convolution with the equalised learning rate, optionally resampling by 2 with the FIR filter
    (up: transposed convolution then filter; down: filter then strided convolution), bias, activation
    and clamp."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, act: str = "linear",
                 up: bool = False, down: bool = False, clamp: float | None = None, gain: float = 1.0):
        super().__init__()
        self.act, self.up, self.down, self.clamp, self.gain = act, up, down, clamp, gain
        self.padding = kernel // 2
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1 / math.sqrt(in_channels * kernel * kernel)
        self.register_buffer("resample_filter", setup_filter(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        x = resampled_conv2d(x, w, self.resample_filter, self.up, self.down, self.padding)
        return bias_act(x, self.bias, self.act, self.gain, self.clamp)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"in={i}, out={o}, kernel={k}, act={self.act}, up={self.up}, down={self.down}"


def resampled_conv2d(x: torch.Tensor, w: torch.Tensor, f: torch.Tensor, up: bool = False, down: bool = False,
                     padding: int = 0, groups: int = 1) -> torch.Tensor:
    """``conv2d(x, w)`` at twice (``up``) or half (``down``) the resolution, with the FIR filter ``f``.

    up: a stride-2 transposed convolution (a quarter of the work of convolving the upsampled image) and
    the filter, aligned so that the result equals upsample2d then a 'same' convolution except in the
    outer kernel//2 pixels, where it keeps what the zero padding of the upsampled image drops. down: the
    filter then a stride-2 convolution. Kernels are odd-sized; a 1x1 kernel resamples first."""
    if not (up or down):
        return F.conv2d(x, w, padding=padding, groups=groups)
    kernel = w.shape[-1]
    taps = f.numel()
    if up and kernel > 1:
        # conv_transpose2d's weight is [in, out/groups, k, k]; flipped, it is the 'zero-insert then
        # convolve with w' operator
        o, i = w.shape[:2]
        wt = w.reshape(groups, o // groups, i, kernel, kernel).transpose(1, 2).reshape(groups * i, o // groups,
                                                                                       kernel, kernel)
        x = F.conv_transpose2d(x, wt.flip(2, 3), stride=2, groups=groups)
        # upsample2d pads the filter by p0 in front and the 'same' convolution by `padding`; the
        # transposed convolution is a full one, so the filter here is padded by p0 - padding in front and
        # by what makes the size 2H behind
        front = (taps + 1) // 2 - padding
        back = taps + 1 - kernel - front
        return upfirdn2d(x, f, pad=(front, back, front, back), gain=4)
    if up:
        x = upsample2d(x, f)
        return F.conv2d(x, w, groups=groups)
    if down and kernel > 1:
        p = (taps - 2) + (kernel - 1)
        x = upfirdn2d(x, f, pad=((p + 1) // 2, p // 2, (p + 1) // 2, p // 2))
        return F.conv2d(x, w, stride=2, groups=groups)
    return F.conv2d(downsample2d(x, f), w, groups=groups)
