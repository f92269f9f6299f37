"""What a target needs from the lean step, given to the step instead of patched into it.

One frozen `Lowering` per target (the exporter of each target owns its instance): the step
(`LeanStep`, `LeanEval`), its program and the rules read it; nothing is changed class-wide.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .quant import dequantize_per_channel

Tensor = torch.Tensor

# the rule kinds whose frozen weight `Lowering.int8_frozen_linear` reads as stored (rules/linear.py, rules/lora.py)
LINEAR_KINDS = ("linear", "linear+lora")


@dataclass(frozen=True)
class Lowering:
    # int8 + per-channel scale -> fp32, as the target's runtime spells it (ONNX: DequantizeLinear)
    dequantize: Callable[[Tensor, Tensor], Tensor] = dequantize_per_channel
    # a linear's bias as an add after the bias-free op where the bias or the weight trains (ExecuTorch:
    # XNNPACK would bake a bias fused into the op into its packed weights; a trainable weight leaves
    # the op to ExecuTorch's kernels, whose addmm is ~8x slower than mm + add: mnist_cnn's fc, b32)
    bias_as_add: bool = False
    # exact zeros made from data (the op's input, kept masks) that pin what a graph runtime with
    # its own scheduler (onnxruntime) would otherwise run early: dequantizing a frozen weight, a
    # mask only the backward reads. Eager torch and ExecuTorch run the step as written.
    pin_schedule: bool = False
    # dequantize a large frozen int8 weight in row blocks (output channels / features) of at most
    # this many fp32 bytes, each used and dropped before the next is made, instead of one fp32
    # copy of the whole weight while its op runs (microcontrollers: that copy is the step's peak).
    # None: whole weights. Exact up to fp32 summation order (input gradients add per-block parts).
    weight_block_bytes: int | None = None
    # a conv bias's gradient summed over positions, then over the batch: onnxruntime's ReduceSum over
    # axes (0, 2, 3) is ~2x slower than the two; ExecuTorch plans the reshaped gradient as a copy
    # (+23% planned memory on a ReLU6 CNN's `bias+mask` step), so it keeps the one sum
    two_step_bias_sum: bool = False
    # a conv bias's gradient summed over the batch first, then over the positions of the (C, H, W) sum:
    # ExecuTorch's portable sum adds whole contiguous samples at once but walks (0, 2, 3) element by
    # element (8x96x112x112, one thread: 5.3 ms against 18.7 ms; no reshape, so no planned copy).
    # XNNPACK's mean over (H, W) would take the positions, but where the gradient is the mask's product
    # its second reader stops XNNPACK computing it in place: +33% workspace per such call (BENCHMARKS.md)
    batch_first_bias_sum: bool = False
    # a conv bias's gradient of at most this many bytes summed inside XNNPACK (ExecuTorch's delegated
    # lowering): positions as its mean over (H, W) times H*W, then the batch as a second mean over the
    # (1, C, N, 1) view. Each portable sum cuts the backward's delegate call, with layout copies at both
    # ends; but a mean reading the mask's product stops XNNPACK writing that product over its input (two
    # readers), one more gradient-sized value in the call. Small gradients only: the large ones, early in
    # the network, are what size XNNPACK's workspace, and the merged backward call's outputs there stay alive
    # beside its inputs in ExecuTorch's plan (BENCHMARKS.md, tasks F (session 9) and I). None: no XNNPACK sums.
    xnnpack_bias_sum_max_bytes: int | None = None
    # frozen depthwise conv kernels dequantized from their int8 constants alone (not pinned to data),
    # so that onnxruntime folds them to fp32 constants when it loads the program (the runtime's session
    # option session.disable_quant_qdq): it runs a depthwise Conv with a constant kernel in its NCHWc
    # kernels, with a computed one as an im2col + GEMM per channel, 2-9x slower (one thread, Lite0's
    # shapes); the kernels are small (Lite0: 182k of 4.6M weights, 0.73 MB fp32)
    foldable_depthwise: bool = False
    # an asymmetrically padded (TF-same) conv as one symmetrically padded conv whose kernel has zero taps
    # added on the side padded less (exact): no pad op. In ExecuTorch's XNNPACK lowering a pad keeps its
    # input's layout, so a pad of a value from outside the call ran NCHW beside the conv's channels-last
    # copy of the padded value (two 96-channel 113x113 values at EfficientNet-Lite0 224 b8: what sized
    # XNNPACK's workspace); the onnx target folds the pad into the Conv's own asymmetric pads instead
    pads_in_kernel: bool = False
    # where set, a depthwise conv whose kernel with those zero taps would have more taps than this keeps its
    # k x k kernel behind an explicit zero pad instead: XNNPACK's one-pass depthwise kernels take up to 25
    # taps, so a TF-same 5x5 made 6x6 ran its multipass kernel, 2-4.5x slower than the pad and the 5x5 conv
    # together at EfficientNet-Lite0's stride-2 shapes (b8, one thread); a 3x3 made 4x4 still fits one pass
    # and, reading a value from outside the call, is as fast as the 3x3 (BENCHMARKS.md, task E)
    pads_in_kernel_max_depthwise_taps: int | None = None
    # a strided asymmetrically padded (TF-same) conv's input gradient as one ConvTranspose over the
    # output gradient shifted by zero rows/columns (exact), not a larger result cropped by slices
    # (in XNNPACK the result and the crop's copy were alive together); the onnx target folds the crop
    # into the ConvTranspose's pads itself (exporters/onnx_passes.py)
    shifted_strided_input_grad: bool = False
    # a strided depthwise conv's input gradient (frozen kernel) as one stride-1 depthwise conv with the
    # flipped kernel over the gradient with zeros inserted between its samples (exact), not a
    # ConvTranspose: XNNPACK runs a depthwise ConvTranspose as a deconvolution with one channel per
    # group, ~3x slower than the zero insertion (a broadcast multiply) and its depthwise conv kernel
    # together at EfficientNet-Lite0's stride-2 shapes (b8, one thread; BENCHMARKS.md, task A)
    zero_inserted_depthwise_input_grad: bool = False
    # ... and where its zero-inserted gradient (fp32) is larger than this many bytes, computed by batch parts of
    # about this size, joined by a cat along the batch that the ExecuTorch exporter leaves to ExecuTorch's kernels
    # (each part then ends its own XNNPACK call): XNNPACK's workspace is one buffer sized by its largest call, and
    # at EfficientNet-Lite0 224 b8 that was this conv's two channels-last 36.75 MiB copies (BENCHMARKS.md, task H).
    # None: one conv over the whole batch
    zero_inserted_split_bytes: int | None = None
    # ... and those parts carried on, not joined: each part runs through the whole chain of per-sample backward
    # rules that follows (`Rule.per_sample`; at Lite0, the ReLU6 mask, the expand conv's bias sum and input
    # gradient, down to the stem), one part after the other, the parameter gradients added over the parts; joined
    # (a cat) where a rule that is not per-sample reads the gradient, or where the value has more than one reader
    # (a residual sum's input: `Program._per_sample_chain`). Inside a chain each rule returns plain tensors for its
    # part (a second strided depthwise conv there joins its own parts). The cat of the 112x112 halves, and the
    # halves alive beside it in ExecuTorch's plan, are gone, and smaller parts then run faster too (one part's
    # values at a time, nearer the core: Lite0 224 b8, parts of 10 MiB, BENCHMARKS.md, task K2)
    batch_parts_carried: bool = False
    # convolutions with a computed kernel (a trainable weight, or the gradient as the kernel of a weight
    # gradient) as one batched matmul per kernel tap on channels-last slices: ExecuTorch's XNNPACK
    # delegate takes a conv only with a constant kernel but a matmul with two computed operands, and its
    # portable conv kernel is ~50x slower than torch (mnist_cnn `full`: 95% of the step). Dense convs
    # (groups 1) and depthwise ones; a stride-2 conv's input gradient stays a transposed conv.
    computed_conv_as_matmul: bool = False
    # ... and a dense one with at most this many input channels: its forward and its weight gradient as one matmul
    # for all kernel taps, not one per tap: forward, the taps' channels-last windows side by side (1, N*Ho*Wo,
    # kh*kw*Cin) @ the kernel (1, kh*kw*Cin, Cout); weight gradient, the windows stacked channels first
    # (1, kh*kw*Cin, N*Ho*Wo) @ the channels-last gradient (1, N*Ho*Wo, Cout). XNNPACK's matmuls with a dimension
    # this narrow took ~0.5 (forward) and ~0.85 ms (weight gradient) per tap whatever Cin (3x3, b32 at 28x28, one
    # thread, bench/et_weight_grad_forms.py; BENCHMARKS.md task N2): weight gradient 1 channel 7.7 ms for the 9 taps,
    # 0.9 ms as one; 3 channels 8.0 -> 1.7, 8 8.5 -> 4.7, 16 10.4 -> 9.4; 32 channels at 14x14 2.6 -> 4.5, so wide
    # inputs keep a matmul per tap; forward 1 channel 4.8 -> 1.7, 3 4.9 -> 2.0, 8 5.7 -> 4.1, 16 7.9 -> 7.4. The
    # taps' windows are all alive at once: kh*kw*Cin*N*Ho*Wo floats (mnist b32: 0.9 MB). None: a matmul per tap
    few_channel_conv_one_matmul_max_cin: int | None = None
    # max pooling (with an input gradient) in float arithmetic XNNPACK runs, no bool op: the pool itself, each
    # tap's "is the window's first maximum" as 1 + floor(max(v - max, -1)), and the backward's "tap t is the
    # kept position" as relu(1 - |position - t|), the position kept as int8 (quantized inside XNNPACK, scale 1).
    # ExecuTorch's bool kernels (comparisons, where) take a generic per-element path: ~65% of mnist_cnn's
    # `bias+mask` step with the comparisons and selects of the running max
    max_pool_in_arithmetic: bool = False
    # a frozen int8 1x1 conv (stride 1, one group, unpadded) in the forward as a linear over the channels-last
    # view, its weight dequantized by the per-channel dequantize op right before it: ExecuTorch's XNNPACK
    # delegate then keeps the weight int8 (XNNPACK's f32_qc8w fully connected: fp32 activations, 1 byte per
    # packed weight) where a conv packs it as fp32; XNNPACK 1.5.1 has no f32_qc8w conv (BENCHMARKS.md, task G)
    int8_pointwise_linear: bool = False
    # ... only where its positions (H x W) are at most this many times its input channels: the linear's result
    # and its permuted copy are both inner values of XNNPACK's call, one output more than the conv's, so
    # the large early 1x1 convs (few weights, 112x112 outputs) stay convs (Lite0 224 b8: the 16->96 expand
    # at 112x112 as a linear was a 73.5 MiB call, and XNNPACK's workspace growth at load peaked with it)
    int8_pointwise_max_positions_per_channel: int = 4
    # a frozen int8 linear layer's weight read as stored, dequantized by the per-channel dequantize op right before
    # its linear, forward and input gradient: XNNPACK's f32_qc8w fully connected, as `int8_pointwise_linear`
    # (mnist_cnn's fc, 1152 -> 256: packed 2 x 1.1 MiB fp32 -> 2 x 0.3 MiB; BENCHMARKS.md, task L2). A LoRA linear's
    # frozen W too (its branch A, B stays fp32 and trains; BENCHMARKS.md, task R2)
    int8_frozen_linear: bool = False
    # a frozen linear's input gradient as a linear over its transposed weight, g . (W^T)^T, not g @ W: the exporter
    # folds W^T into a constant of its own. XNNPACK packs W for the forward and again, transposed, for g @ W, and
    # ExecuTorch's XNNPACK weight cache names a packed weight by its constant alone: one constant packed two ways
    # was re-packed by every later program that read it (the eval program's forward: a third copy, mnist_cnn's fc
    # 1.1 MiB) and its bookkeeping broke (`delete_packed_data ... not found` at exit; BENCHMARKS.md, task L2)
    linear_input_grad_own_weight: bool = False

    def __post_init__(self):
        # the program runs a chain of batch parts without the pinned schedule's steps (weight pins, gradients and
        # kept values dropped inside a rule, early local derivatives); no target asks for both
        if self.batch_parts_carried and self.pin_schedule:
            raise ValueError("Lowering: batch_parts_carried and pin_schedule are never set together")

    def foldable_weights(self, graph) -> set[str]:
        """The frozen int8 tensors of `graph` this lowering dequantizes from constants alone (unpinned)."""
        if not self.foldable_depthwise:
            return set()
        out = set()
        for t, (node, role) in graph.weight_roles().items():
            rule, shape = node.rule, tuple(graph.tensors[t].shape)
            groups = getattr(rule, "groups", 1)
            if role == "weight" and graph.is_quantized(t) and groups > 1 and len(shape) == 4 and shape[1] == 1:
                out.add(t)
        return out

    def int8_linear_weights(self, graph) -> set[str]:
        """The frozen int8 weights of `graph` this lowering hands to a linear as int8: those of the 1x1 convs that
        run as one (`int8_pointwise_linear`, `int8_linear_conv`) and of linear layers, LoRA ones included
        (`int8_frozen_linear`)."""
        return {t for t, (node, role) in graph.weight_roles().items()
                if role == "weight" and graph.is_quantized(t)
                and (self.int8_linear_conv(node.rule) or (self.int8_frozen_linear and node.rule.kind in LINEAR_KINDS))}

    def int8_linear_conv(self, rule) -> bool:
        """Whether a conv rule runs as the int8 linear (`int8_pointwise_linear`), given int8 for its weight."""
        if not (self.int8_pointwise_linear and getattr(rule, "int8_as_linear", False) and rule.pointwise):
            return False
        channels, h, w = rule.in_chw
        return h * w <= self.int8_pointwise_max_positions_per_channel * channels

    def row_blocks(self, graph) -> dict[str, list[tuple[int, int]]]:
        """The frozen tensors of `graph` this lowering dequantizes in row blocks, each as its
        [lo, hi) row ranges: int8 weights larger than the block whose every user can run by rows."""
        if self.weight_block_bytes is None:
            return {}
        users: dict[str, list] = {}
        for n in graph.nodes:
            for role, t in n.params.items():
                users.setdefault(t, []).append((n.rule, role))
        out = {}
        for t, us in users.items():
            shape = tuple(graph.tensors[t].shape)
            row = 4 * graph.tensors[t][0].numel() if shape else 0
            if not graph.is_quantized(t) or not row or shape[0] * row <= self.weight_block_bytes \
                    or not all(rule.by_rows(role) for rule, role in us):
                continue
            rows = max(1, self.weight_block_bytes // row)
            out[t] = [(lo, min(lo + rows, shape[0])) for lo in range(0, shape[0], rows)]
        return out


EAGER = Lowering()
# onnxruntime's schedule (the `onnx` target's step, less its dequantize op): what the analytic
# memory model follows unless it is given a target's lowering
PINNED = Lowering(pin_schedule=True, two_step_bias_sum=True)


def lowering_of(w) -> Lowering:
    """The lowering a node's tensors `w` carry (the program's Weights), else eager torch's."""
    return getattr(w, "lowering", EAGER)


def separate_bias(w) -> bool:
    """Whether a rule emits the bias in `w` (a node's tensors) as an add after its bias-free op:
    the target asks for it and the bias or the weight trains (see `Lowering.bias_as_add`)."""
    return lowering_of(w).bias_as_add and (w.trainable("bias") or w.trainable("weight"))


def max_pool_in_arithmetic(w: Mapping[str, Tensor]) -> bool:
    """Whether a max pooling, given its node's tensors `w`, is written in float arithmetic without bool ops
    (see `Lowering.max_pool_in_arithmetic`)."""
    return lowering_of(w).max_pool_in_arithmetic


def pins(w: Mapping[str, Tensor]) -> bool:
    """Whether a rule, given its node's tensors `w`, adds the data dependencies that pin a graph
    runtime's schedule (see `Lowering.pin_schedule`)."""
    return lowering_of(w).pin_schedule


def _nchwc_block(cpuinfo: str = "/proc/cpuinfo") -> int:
    """MLAS's NCHWc block on this machine's CPU: 16 with AVX-512F, 8 with AVX2, 0 (no NCHWc) otherwise.
    The analytic model replays the step as onnxruntime runs it here (where `profile` measures it)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return 0
    return 16 if "avx512f" in flags else 8 if "avx2" in flags else 0


# onnxruntime's CPU runs a pooling, and a conv with a constant kernel, in its NCHWc kernels (on a reordered
# copy of the input) when the channels are a multiple of MLAS's NCHWc block
NCHWC_BLOCK = _nchwc_block()


def runs_nchwc(channels: int) -> bool:
    """Whether onnxruntime's CPU runs an op over `channels` channels in NCHWc (see NCHWC_BLOCK)."""
    return NCHWC_BLOCK > 0 and channels % NCHWC_BLOCK == 0


def replaying(w: Mapping[str, Tensor]) -> bool:
    """Whether a rule, given its node's tensors `w`, runs in the analytic memory model's replay
    (meta tensors): it may then spell out what the target's runtime allocates (copies where the
    exported program's ops copy) without changing the program itself."""
    return bool(getattr(w, "replay", False))


def int8_of(w: Mapping[str, Tensor], role: str):
    """The stored (int8, scale) of the frozen tensor in `role` of `w` where the program gives them (`Weights.int8`),
    else None."""
    ask = getattr(w, "int8", None)
    return ask(role) if ask is not None else None


def in_blocks(w: Mapping[str, Tensor], role: str) -> bool:
    """Whether the lowering gives the tensor in `role` of `w` (a node's tensors) by row blocks."""
    ask = getattr(w, "in_blocks", None)
    return bool(ask is not None and ask(role))


def by_rows(w: Mapping[str, Tensor], role: str, fn: Callable[[int, int, Tensor], Tensor]) -> list[Tensor]:
    """`fn(lo, hi, rows)` for the row blocks of `w[role]` the lowering asks for (the program's
    Weights make each block when reached and drop it after `fn`), else once for the whole tensor."""
    blocks = getattr(w, "row_blocks", None)
    if blocks is not None:
        return blocks(role, fn)
    t = w[role]
    return [fn(0, t.shape[0], t)]


def summed_by_rows(w: Mapping[str, Tensor], role: str, fn: Callable[[int, int, Tensor], Tensor]) -> Tensor:
    """The sum of `fn(lo, hi, rows)` over the row blocks of `w[role]` (as `by_rows`), added as
    they come (block order), so one partial result is alive beside the running sum."""
    blocks = getattr(w, "row_blocks", None)
    if blocks is not None:
        return blocks(role, fn, add=True)[0]
    t = w[role]
    return fn(0, t.shape[0], t)
