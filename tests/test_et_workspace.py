"""The model of XNNPACK's workspace for one delegate call (exporters/et_workspace.py), on a tiny graph
whose bytes are counted by hand: inner values by their lifetimes, elementwise ops over their input,
the channels-last copy of a 4-D input around a convolution, a pad in NCHW before a convolution."""
import torch
import torch.nn.functional as F

from exporters.et_workspace import inner_peak_bytes


class _ConvChain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 4, 3, 3))

    def forward(self, x):
        y = F.conv2d(x, self.weight, padding=1)  # (1, 8, 8, 8): 2048 bytes
        return ((y + 1.0) * 2.0).sum()  # both elementwise ops write over y


def test_inner_peak_counts_lifetimes_in_place_ops_and_the_channels_last_input():
    ep = torch.export.export(_ConvChain(), (torch.randn(1, 4, 8, 8),)).run_decompositions()
    graph = ep.graph_module.graph
    assert any("convolution" in str(n.target) for n in graph.nodes)
    # x's channels-last copy (1024) and y (2048) at once; the add and mul reuse y; the sum is the output
    assert inner_peak_bytes(graph, set(ep.graph_signature.user_inputs)) == 1024 + 2048
    assert inner_peak_bytes(graph, set()) == 2048  # no user input copied: the weight is a constant


class _PadConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 1, 3, 3))

    def forward(self, x):
        p = F.pad(x, (0, 1, 0, 1))  # (1, 4, 9, 9): 1296 bytes, NCHW (a pad keeps its input's layout)
        return F.conv2d(p, self.weight, stride=2, groups=4).sum()  # (1, 4, 4, 4): 256 bytes


def test_a_pad_stays_nchw_and_dies_into_the_channels_last_copy_its_conv_reads():
    # as measured per delegate call (XNNPACK's workspace, Lite0 64 b8: 6.38 MiB for such a call):
    # the padded value and its channels-last copy, no copy of the input (the earlier model: 6.19)
    ep = torch.export.export(_PadConv(), (torch.randn(1, 4, 8, 8),)).run_decompositions()
    graph = ep.graph_module.graph
    assert inner_peak_bytes(graph, set(ep.graph_signature.user_inputs)) == 1296 + 1296


class _ConvAddClamp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 4, 1, 1))

    def forward(self, x, b):
        y = F.conv2d(x, self.weight) + b.reshape(1, -1, 1, 1)  # (1, 8, 8, 8): 2048 bytes, channels-last
        return F.hardtanh(y, 0.0, 6.0)  # the call's output: written over y, then copied out to NCHW


def test_an_elementwise_output_is_written_over_its_input_before_it_is_copied_out():
    # measured per delegate call (Lite0 64 b8: a projection + expand conv call ending in a ReLU6, 3.50 MiB,
    # modelled 6.00 while the output was counted beside the value it is written over)
    ep = torch.export.export(_ConvAddClamp(), (torch.randn(1, 4, 8, 8), torch.randn(8))).run_decompositions()
    graph = ep.graph_module.graph
    assert inner_peak_bytes(graph, {"x"}) == 1024 + 2048  # x's channels-last copy and y


class _MaskedConvGrad(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 1, 3, 3))

    def forward(self, g, mask):
        y = F.conv2d(g, self.weight, padding=1, groups=8)  # (1, 8, 8, 8): 2048 bytes, channels-last
        m = torch.ops.quantized_decomposed.dequantize_per_tensor(mask, 1.0, 0, -128, 127, torch.int8)
        return y * m  # the call's output


def test_a_mask_dequantized_beside_a_channels_last_value_is_copied_as_int8_then_converted():
    # measured per delegate call (Lite0 64 b8, a depthwise conv's input gradient times a ReLU6 mask kept as
    # int8: 6.754 MiB, modelled 6.00 while the mask's channels-last int8 copy was not counted)
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

    mask = torch.ones(1, 8, 8, 8, dtype=torch.int8)
    ep = torch.export.export(_MaskedConvGrad(), (torch.randn(1, 8, 8, 8), mask)).run_decompositions()
    graph = ep.graph_module.graph
    assert any("dequantize_per_tensor" in str(n.target) for n in graph.nodes)
    # at the multiply: y, the mask's int8 channels-last copy (512) and its float convert (2048); g's
    # channels-last copy (2048, made at the call's start) died into the conv
    assert inner_peak_bytes(graph, {"g", "mask"}) == 2048 + 512 + 2048


class _ConvAddInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(2, 8, 1, 1))

    def forward(self, x, r):
        return F.conv2d(x, self.weight) + r  # (1, 2, 8, 8): 512 bytes, r NCHW beside a channels-last value


def test_an_input_copied_channels_last_is_copied_at_the_call_start():
    # measured (Lite0 64 b8, a projection conv's input gradient plus the skip's: 1.504 MiB, modelled 1.31 while
    # the skip input's copy was counted only at the add, after the conv's input copy had died)
    ep = torch.export.export(_ConvAddInput(), (torch.randn(1, 8, 8, 8), torch.randn(1, 2, 8, 8))).run_decompositions()
    assert inner_peak_bytes(ep.graph_module.graph, {"x", "r"}) == 2048 + 512 + 512  # both copies and the conv's
