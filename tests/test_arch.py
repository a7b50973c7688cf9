import pytest
import torch

from mpis.arch import PAPER_EXAMPLES, ArchError, ConvLayer, parse_arch
from mpis.model.network import MPISNet

INPUT_SHAPES = {
    "Fashion-MNIST": (1, 28, 28),
    "Fashion-MNIST (T=1)": (1, 28, 28),
    "N-MNIST": (2, 34, 34),
    "CIFAR-10": (3, 32, 32),
    "CIFAR-100": (3, 32, 32),
}


@pytest.mark.parametrize("text", list(PAPER_EXAMPLES))
def test_paper_example_parses_and_prints_back(text):
    arch = parse_arch(text)
    assert str(arch) == text
    assert arch.streams == 2
    assert 1 <= arch.fusion_layer <= len(arch.feb)


def test_fields_of_the_fashion_mnist_net():
    arch = parse_arch("16C3S1-2F1*(32C3S2-48C3S1)-FC10")
    assert arch.stem == (ConvLayer(16, 3, 1),)
    assert arch.feb == (ConvLayer(32, 3, 2), ConvLayer(48, 3, 1))
    assert (arch.streams, arch.fusion_layer, arch.classes) == (2, 1, 10)


def test_stride_left_out_means_one_and_spaces_are_allowed():
    assert parse_arch("32C3-2F1* (32C3-64C3S2)-FC10") == parse_arch("32C3S1-2F1*(32C3S1-64C3S2)-FC10")


@pytest.mark.parametrize(
    ("text", "column", "words"),
    [
        ("16C3-2F5*(32C3S2)-FC10", 8, "fusion layer 5 > FEB depth 1"),
        ("16C3-2F1*(32C3S3)-FC10", 16, "stride 3"),
        ("16C-2F1*(32C3)-FC10", 4, "expected kernel size"),
        ("16C3-2F1*(32C3)", 16, "'-FCn' classifier"),
        ("16C3-2F1*(32C3)-FC10x", 21, "end of string"),
        ("16C4-2F1*(32C3)-FC10", 4, "even"),
        ("2F0*(32C3)-FC10", 3, "at least 1"),
        ("2F1*(32C3-FC10", 11, "expected output channels"),
        ("16C3-2F1(32C3)-FC10", 9, "'*'"),
        ("", 1, "empty"),
    ],
)
def test_malformed_string_names_column_and_expectation(text, column, words):
    with pytest.raises(ArchError) as err:
        parse_arch(text)
    assert f"column {column}:" in str(err.value)
    assert words in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text", list(PAPER_EXAMPLES))
def test_paper_example_builds_with_expected_output_shape(text):
    dataset, _ = PAPER_EXAMPLES[text]
    net = MPISNet(text, INPUT_SHAPES[dataset]).eval()
    arch = net.arch
    x = torch.rand(1, *INPUT_SHAPES[dataset])
    with torch.no_grad():
        state = net.loop_step(net.zero_state(1, x.device), net.explicit_rates(x))
        logits = net.classify(state)
    assert logits.shape == (1, arch.classes)
    for i, name in enumerate(net.graph.state):
        assert state[name].shape[1] == arch.feb[-1].channels
        if i:  # every stream works at half the resolution of the one before
            previous = state[net.graph.state[i - 1]].shape[-1]
            assert state[name].shape[-1] == -(-previous // 2)
