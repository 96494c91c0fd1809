"""Int8 inference of a 2D :class:`UNet` on the CPU, with PyTorch's quantized kernels (FBGEMM / oneDNN).

Post-training static quantization with min/max calibration, written out for this network with PyTorch's quantized
modules and operators:

- weights: symmetric int8, one scale per output channel (the largest absolute weight maps to 127);
- activations: unsigned integers; the range each convolution's output took on calibration images
  (:func:`activation_ranges`, before the activation) maps to the levels 0..:data:`ACTIVATION_MAX`, the levels
  above are headroom; activations run in place on those levels, concatenations requantize over both ranges;
- the network input is quantized once, the 1x1 head runs in float32 on the dequantized last features, so the
  logits come back in float32.

The kernel-2, stride-2 transposed convolution of each decoder level runs as the equivalent 1x1 convolution to
``4 * out`` maps followed by a pixel shuffle: PyTorch's quantized ``ConvTranspose2d`` gave wrong results on the
FBGEMM, x86 and oneDNN engines (torch 2.13: errors of the size of the output itself, against 1 % for QNNPACK),
and a 1x1 convolution is the kernel those engines are fastest at anyway.

Supported: the plain U-Net (``residual=False``, ``stage_blocks=1``, ``merge="concat"``, any long skips on or off),
batch norm folded into the convolutions or no normalisation, ReLU or leaky ReLU. :func:`int8_problem` says what a
network lacks. Results differ from float32 by quantization error: ``tests/test_int8.py`` bounds it on real images.

PyTorch marks its quantized tensor types as deprecated (to move to torchao); they work in the torch versions
``pyproject.toml`` allows, and the tests fail when they stop working.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial

import torch
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import nn

from unetseg.model.blocks import ConvBlock
from unetseg.model.unet import UNet, crop_to, pad_high_end

# Calibrated ranges map to levels 0..127, not 0..255: CPUs without VNNI multiply uint8 by int8 in pairs summed into
# int16 (vpmaddubsw), which 8-bit inputs can overflow; PyTorch's own x86 configs reduce the range the same way. The
# levels above 127 are headroom for values beyond what the calibration images reached.
ACTIVATION_MAX = 127
Ranges = Mapping[str, Sequence[float]]  # tensor name -> (smallest, largest) value on the calibration images
_DEPRECATION = "torch.quantize_per_tensor, torch.quantize_per_channel and other quantized"


def quantized_engine() -> str | None:
    """The x86 quantized engine this PyTorch has (``x86``, else ``fbgemm``, else ``onednn``), or None."""
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("x86", "fbgemm", "onednn") if e in engines), None)


def int8_problem(net: UNet) -> str | None:
    """Why ``net`` cannot run as :class:`Int8UNet` (one line), else None."""
    if net.spatial_dims != 2:
        return "int8 inference is for 2D networks (a 3D volume already takes well under a second)"
    if quantized_engine() is None:
        return (f"this PyTorch has no x86 quantized engine (it has {torch.backends.quantized.supported_engines}); "
                "predict in float32")
    if getattr(net, "stages", None) is not None:
        return "int8 inference needs stage_blocks=1"
    for name, module in net.named_modules():
        if isinstance(module, ConvBlock) and module.residual:
            return f"int8 inference needs residual=False ({name} has a short residual skip)"
        if isinstance(module, (nn.InstanceNorm2d, nn.GroupNorm)):
            return f"int8 inference needs batch norm or none ({name} is {type(module).__name__})"
    if any(up.has_skip and up.merge != "concat" for up in net.decoder):
        return "int8 inference needs merge='concat'"
    lesioned = [level for level, up in enumerate(net.decoder) if up.lesion_skip]
    if lesioned:
        return f"int8 inference does not run lesioned long skips (levels {lesioned}); restore them or use float32"
    return None


def _convolutions(net: UNet) -> dict[str, nn.Conv2d | nn.ConvTranspose2d]:
    """The convolutions that run in int8, by module name (all but the head)."""
    return {name: m for name, m in net.named_modules()
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and name != "head"}


def activation_ranges(net: UNet, images: Iterable[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """The smallest and largest value of the network input (``"input"``) and of each int8 convolution's output
    (before its activation; by module name) over ``images``, each ``(C, H, W)`` float32 as the network takes it.

    ``net``: the float32 network :class:`Int8UNet` will be built from, batch norm folded into its convolutions
    (``unetseg.infer.inference_network(model, portable=True)``).

    Raises:
        ValueError: a network with batch norm layers (its convolutions' outputs are not what the folded ones give).
    """
    if any(isinstance(m, nn.BatchNorm2d) for m in net.modules()):
        raise ValueError("fold batch norm into the convolutions first (unetseg.infer.inference_network)")
    ranges: dict[str, tuple[float, float]] = {}

    def widen(name: str, tensor: torch.Tensor) -> None:
        lo, hi = float(tensor.min()), float(tensor.max())
        old = ranges.get(name, (lo, hi))
        ranges[name] = (min(old[0], lo), max(old[1], hi))

    hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: widen(name, out))
             for name, module in _convolutions(net).items()]
    try:
        with torch.inference_mode():
            for image in images:
                widen("input", image)
                net(image[None])
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def quantization_params(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point that map ``[lo, hi]`` (widened to include 0) to the levels ``0..ACTIVATION_MAX``."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / ACTIVATION_MAX if hi > lo else 1.0
    return scale, min(ACTIVATION_MAX, round(-lo / scale))


def _quantized_conv(weight: torch.Tensor, bias: torch.Tensor | None, padding: int, out_range: Sequence[float]
                    ) -> nnq.Conv2d:
    """An int8 convolution with float ``weight`` ``(O, I, k, k)`` (per-channel scales) and ``bias`` ``(O,)``,
    whose output is quantized over ``out_range`` (:func:`quantization_params`)."""
    out, inputs, k = weight.shape[0], weight.shape[1], weight.shape[2]
    scales = (weight.abs().amax(dim=(1, 2, 3)) / 127).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # the deprecation is said once, in the module docstring
        warnings.filterwarnings("ignore", message=_DEPRECATION, category=UserWarning)
        q_weight = torch.quantize_per_channel(weight.detach().float(), scales, torch.zeros(out, dtype=torch.long),
                                              0, torch.qint8)
    conv = nnq.Conv2d(inputs, out, k, padding=padding)
    conv.set_weight_bias(q_weight, None if bias is None else bias.detach().float())
    conv.scale, conv.zero_point = quantization_params(*out_range)
    return conv


def _transposed_as_1x1(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights ``(4 O, I, 1, 1)`` and bias ``(4 O,)`` of the 1x1 convolution that, followed by
    :func:`_pixel_shuffle`, computes the kernel-2 stride-2 ``conv`` (weight ``(I, O, 2, 2)``): output pixel
    ``(2h + a, 2w + b)`` of map ``o`` is row ``4o + 2a + b``."""
    weight = conv.weight.permute(1, 2, 3, 0).reshape(-1, conv.in_channels, 1, 1)
    return weight, None if conv.bias is None else conv.bias.repeat_interleave(4)


def _pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """Channels-last ``(B, 4 * O, H, W)`` -> channels-last ``(B, O, 2H, 2W)``, channel ``4o + 2a + b`` going to
    pixel ``(2h + a, 2w + b)`` of map ``o`` (``F.pixel_shuffle``'s order), on quantized tensors: one copy."""
    n, c4, h, w = x.shape
    nhwc = x.permute(0, 2, 3, 1).reshape(n, h, w, c4 // 4, 2, 2)  # (n, h, w, o, a, b)
    nhwc = nhwc.permute(0, 1, 4, 2, 5, 3).contiguous().view(n, 2 * h, 2 * w, c4 // 4)  # (n, h, a, w, b, o)
    return nhwc.permute(0, 3, 1, 2)


def _in_place_activation(act: object) -> Callable[[torch.Tensor], torch.Tensor]:
    """The in-place form, for quantized tensors, of a block's activation (ReLU or leaky ReLU). It keeps the
    convolution's quantization: requantizing over the activated range was tried, and followed float32 less
    closely on the DSB validation images (99.2 % of labels equal against 99.6 %): the range it drops is the
    headroom that values beyond the calibration images' use."""
    if act in (torch.relu, torch.relu_):
        return torch.relu_
    if isinstance(act, partial) and act.func in (F.leaky_relu, F.leaky_relu_):
        return partial(torch.ops.aten.leaky_relu_, negative_slope=float(act.keywords.get("negative_slope", 0.01)))
    raise ValueError(f"int8 inference supports ReLU and leaky ReLU, not {act!r}")


class Int8UNet(nn.Module):
    """The int8 version of a 2D :class:`UNet`: same inputs and outputs, quantized inside.

    Each convolution multiplies unsigned inputs by per-channel int8 weights; its output is quantized over its
    calibrated range (:func:`quantization_params`) and activated in place. A level's concatenation requantizes
    both inputs over the union of their ranges.

    Args:
        net: the float32 network in eval mode, batch norm folded into its convolutions
            (``unetseg.infer.inference_network(model, portable=True)``) or none; it is not changed.
        ranges: :func:`activation_ranges` of ``net`` on calibration images.

    Raises:
        ValueError: a network :func:`int8_problem` refuses (the reason), batch norm not folded, or a missing range.

    Shapes: ``forward(x)``: ``(B, in_channels, H, W)`` float32 -> ``(B, out_channels, H, W)`` float32 logits.
    """

    def __init__(self, net: UNet, ranges: Ranges) -> None:
        super().__init__()
        problem = int8_problem(net)
        if problem:
            raise ValueError(problem)
        if any(isinstance(m, nn.BatchNorm2d) for m in net.modules()):
            raise ValueError("fold batch norm into the convolutions first (unetseg.infer.inference_network)")
        convs = _convolutions(net)
        missing = sorted({"input", *convs} - set(ranges))
        if missing:
            raise ValueError(f"no calibration range for {', '.join(missing[:3])}; calibrate this network again")
        torch.backends.quantized.engine = quantized_engine()  # read when the weights are packed below
        # what UNet.input_padding reads, so the float network is not kept alive with this one
        self.size_multiple, self.pad_to_multiple = net.size_multiple, net.pad_to_multiple
        self.input_params = quantization_params(*ranges["input"])
        self.act = _in_place_activation(net.encoder[0].act)
        self.convs = nn.ModuleDict()
        for name, conv in convs.items():
            weight, bias = _transposed_as_1x1(conv) if isinstance(conv, nn.ConvTranspose2d) else (conv.weight,
                                                                                                  conv.bias)
            self.convs[name.replace(".", "_")] = _quantized_conv(weight, bias, conv.padding[0], ranges[name])
        # a level's concatenation: its upsampled maps and its encoder maps, over both ranges
        self.cat_params = {
            level: quantization_params(min(ranges[f"decoder.{level}.up"][0], ranges[f"encoder.{level}.conv2"][0]),
                                       max(ranges[f"decoder.{level}.up"][1], ranges[f"encoder.{level}.conv2"][1]))
            for level, up in enumerate(net.decoder) if up.has_skip}
        self.levels = len(net.encoder)
        self.head = net.head

    def _conv_act(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Convolution ``key`` and its activation, quantized ``(B, C_in, H, W)`` -> ``(B, C_out, H, W)``."""
        return self.act(self.convs[key](x))

    def _block(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        """The two convolutions of a :class:`ConvBlock`, quantized ``(B, C_in, H, W)`` -> ``(B, C, H, W)``."""
        return self._conv_act(f"{prefix}_conv2", self._conv_act(f"{prefix}_conv1", x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        pad = UNet.input_padding(self, spatial)
        x = pad_high_end(x.float(), pad)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DEPRECATION, category=UserWarning)
            h = torch.quantize_per_tensor(x.contiguous(memory_format=torch.channels_last), *self.input_params,
                                          torch.quint8)
        encoded = []
        for level in range(self.levels):
            h = self._block(f"encoder_{level}", h if level == 0 else F.max_pool2d(h, 2))
            encoded.append(h)
        for level in reversed(range(self.levels - 1)):
            h = _pixel_shuffle(self.convs[f"decoder_{level}_up"](h))
            if level in self.cat_params:
                h = torch.ops.quantized.cat([encoded[level], h], 1, *self.cat_params[level])
            h = self._block(f"decoder_{level}_block", h)
        logits = self.head(h.dequantize())
        return crop_to(logits, spatial)
