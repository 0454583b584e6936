"""One minimal module per op type: each maps to its type, by autograd op or module class."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import EvoNorm2dS0, RmsNorm2d, StdConv2d
from timm.layers.grn import GlobalResponseNorm
from torch import nn

from ghn_init import OP_TYPES, build_graph


class Op(nn.Module):
    """``fn(self, x)`` as a module, with optional parameters and a stem producing ``channels``."""

    def __init__(self, fn, channels: int = 4, **params: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        self.stem = nn.Conv2d(3, channels, 1)
        for name, value in params.items():
            self.register_parameter(name, nn.Parameter(value))

    def forward(self, x):
        return self.fn(self, self.stem(x))


def tokens(x):
    return x.flatten(2).transpose(1, 2)  # (B, 16, 4) for 4x4 inputs


def attention(m, x):
    q = tokens(x)
    return (q @ q.transpose(1, 2)).softmax(-1) @ q


def rel_pos(m, x):
    index = torch.arange(16, device=x.device).view(4, 4).repeat(4, 4)  # constant, like a registered buffer
    return (q := tokens(x)) @ q.transpose(1, 2) + m.table[index]


#: op type -> (module, {parameter name: expected role}). Every entry of OP_TYPES must appear here.
CASES = {
    "input": (Op(lambda m, x: x), {}),
    "conv": (nn.Conv2d(3, 8, (3, 5), stride=(2, 1), dilation=(1, 2), padding=(1, 4)),
             {"weight": "weight", "bias": "bias"}),
    "dw_conv": (nn.Conv2d(3, 3, 3, groups=3), {"weight": "weight", "bias": "bias"}),
    "group_conv": (Op(lambda m, x: m.conv(x), channels=4), {}),
    "linear": (Op(lambda m, x: F.linear(tokens(x), m.w, m.b), w=torch.zeros(6, 4), b=torch.zeros(6)),
               {"w": "weight", "b": "bias"}),
    "matmul": (Op(attention), {}),
    "batch_norm": (nn.BatchNorm2d(3), {"weight": "norm_weight", "bias": "norm_bias"}),
    "layer_norm": (nn.LayerNorm([3, 4, 4]), {"weight": "norm_weight", "bias": "norm_bias"}),
    "group_norm": (nn.GroupNorm(1, 3), {"weight": "norm_weight", "bias": "norm_bias"}),
    "sum": (Op(lambda m, x: x + x.relu()), {}),
    "mul": (Op(lambda m, x: x * x.sigmoid()), {}),
    "concat": (Op(lambda m, x: torch.cat([x, x.relu()], 1)), {}),
    "max_pool": (nn.MaxPool2d(2), {}),
    "avg_pool": (nn.AvgPool2d(2), {}),
    "glob_avg": (Op(lambda m, x: x.mean((2, 3))), {}),
    "relu": (nn.ReLU(), {}),
    "gelu": (nn.GELU(), {}),
    "silu": (nn.SiLU(), {}),
    "sigmoid": (nn.Sigmoid(), {}),
    "tanh": (nn.Tanh(), {}),
    "hardswish": (nn.Hardswish(), {}),
    "hardsigmoid": (nn.Hardsigmoid(), {}),
    "softmax": (nn.Softmax(dim=1), {}),
    "pos_embed": (Op(lambda m, x: x + m.pos, pos=torch.zeros(1, 4, 4, 4)), {"pos": "embedding"}),
    "token": (Op(lambda m, x: torch.cat([m.cls.expand(x.shape[0], -1, -1), tokens(x)], 1), cls=torch.zeros(1, 1, 4)),
              {"cls": "embedding"}),
    "scale": (Op(lambda m, x: x * m.gamma.view(1, -1, 1, 1), gamma=torch.ones(4)), {"gamma": "scale"}),
    "other": (Op(lambda m, x: x.cumprod(1)), {}),
    "unused": (Op(lambda m, x: x, spare=torch.zeros(3)), {"spare": "other"}),
    "rms_norm": (RmsNorm2d(3), {"weight": "norm_weight"}),
    "response_norm": (Op(lambda m, x: m.grn(x.permute(0, 2, 3, 1))), {}),
    "evo_norm": (EvoNorm2dS0(4, group_size=2), {"weight": "norm_weight", "bias": "norm_bias", "v": "scale"}),
    "std_conv": (StdConv2d(3, 8, 3), {"weight": "weight"}),
    "rel_pos": (Op(rel_pos, table=torch.zeros(16)), {"table": "embedding"}),
    "upsample": (Op(lambda m, x: F.interpolate(x, scale_factor=2, mode="bilinear")), {}),
    "affine": (Op(lambda m, x: torch.addcmul(m.beta, m.alpha, x), alpha=torch.ones(1, 4, 1, 1),
                  beta=torch.zeros(1, 4, 1, 1)), {"alpha": "norm_weight", "beta": "norm_bias"}),
    "clamp": (Op(lambda m, x: x.clamp(-1.0, 1.0)), {}),
    "pointwise": (Op(lambda m, x: x.exp()), {}),
    "reduce": (Op(lambda m, x: x.var(dim=1)), {}),
    "rnn": (Op(lambda m, x: m.lstm(tokens(x))[0]), {"lstm.weight_ih_l0": "weight", "lstm.bias_hh_l0": "bias"}),
}
CASES["group_conv"][0].conv = nn.Conv2d(4, 8, 3, groups=2)
CASES["response_norm"][0].grn = GlobalResponseNorm(4, channels_last=True)
CASES["rnn"][0].lstm = nn.LSTM(4, 6, batch_first=True, bidirectional=True)
CASES["evo_norm"] = (nn.Sequential(nn.Conv2d(3, 4, 1), EvoNorm2dS0(4, group_size=2)),
                     {"1.weight": "norm_weight", "1.bias": "norm_bias", "1.v": "scale"})


def test_every_op_type_has_a_case():
    assert set(CASES) == set(OP_TYPES)


@pytest.mark.parametrize("op", sorted(CASES))
def test_op_type_and_roles(op):
    module, roles = CASES[op]
    graph = build_graph(module, (3, 4, 4))
    assert op in graph.summary(), f"{op} missing from {graph.summary()}"
    found = {name: role for node in graph.nodes for name, _, role in node.params}
    for name, role in roles.items():
        assert found.get(name) == role, f"{name}: role {found.get(name)}, expected {role}"
    assert set(found) == {n for n, _ in module.named_parameters()}


def test_conv_keeps_kernel_stride_and_dilation():
    graph = build_graph(CASES["conv"][0], (3, 9, 9))
    conv = next(n for n in graph.nodes if n.op == "conv")
    assert conv.params[0][1] == (8, 3, 3, 5)
    assert conv.attrs["stride"] == [2, 1] and conv.attrs["dilation"] == [1, 2] and conv.attrs["groups"] == 1


def test_bias_of_a_linear_on_strided_input_stays_its_bias():
    """``F.linear`` on a non-contiguous input is a matrix product plus an add: still one linear op."""
    graph = build_graph(CASES["linear"][0], (3, 4, 4))
    assert [n.op for n in graph.nodes] == ["input", "conv", "linear"]


def test_fused_modules_are_one_node():
    """An RMSNorm is pow, mean, add, rsqrt and mul in autograd: one node after fusion."""
    graph = build_graph(nn.Sequential(nn.Conv2d(3, 4, 1), RmsNorm2d(4), nn.ReLU()), (3, 4, 4))
    assert [n.op for n in graph.nodes] == ["input", "conv", "rms_norm", "relu"]
    assert graph.edges == [(0, 1), (1, 2), (2, 3)]


def test_recurrent_layers_are_not_unrolled():
    graph = build_graph(CASES["rnn"][0], (3, 4, 4))
    assert [n.op for n in graph.nodes] == ["input", "conv", "rnn"]
    assert len(graph.nodes[2].params) == 8  # 4 tensors per direction


def test_shape_ops_are_collapsed():
    """Pads, views, permutes, index gathers of activations: data flows straight through them."""
    def shuffle(m, x):
        x = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)[:, :, :, torch.tensor([1, 0, 3, 2])]
        return x.reshape(x.shape[0], -1).relu()

    graph = build_graph(Op(shuffle), (3, 4, 4))
    assert [n.op for n in graph.nodes] == ["input", "conv", "relu"]
