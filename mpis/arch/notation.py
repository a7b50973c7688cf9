"""Parser for the paper's notation `stem-xFl*(aCbSd-...)-FCn` (MPIS supplement §1).

A hand-written recursive-descent parser rather than a regex so that every malformed string is
reported with the column where it went wrong and what was expected there.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpis.errors import MpisError

SUPPORTED_STRIDES = (1, 2)

# The six architectures the paper uses, with the parameter count the paper reports (None: not given).
PAPER_EXAMPLES: dict[str, tuple[str, int | None]] = {
    "16C3S1-2F1*(32C3S2-48C3S1)-FC10": ("Fashion-MNIST", 133_000),
    "2F1*(32C3S1-32C3S2-64C3S1)-FC10": ("N-MNIST", 213_000),
    "120C3S1-120C3S2-2F3*(240C3S1-360C3S1-480C3S2)-FC10": ("CIFAR-10", 11_800_000),
    "120C3S1-120C3S2-2F3*(240C3S1-480C3S1-570C3S2)-FC100": ("CIFAR-100", 14_800_000),
    "128C3S1-128C3S2-2F3*(256C3S1-512C3S1-1024C3S2)-FC10": ("CIFAR-10", 28_500_000),
    "128C3S1-2F1*(128C3S1-256C3S2)-FC10": ("Fashion-MNIST (T=1)", None),
}


class ArchError(MpisError):
    """A malformed architecture string; the message names the column and what was expected."""

    def __init__(self, text: str, pos: int, what: str):
        super().__init__(f"arch {text!r}, column {pos + 1}: {what}")
        self.pos = pos


@dataclass(frozen=True)
class ConvLayer:
    """`aCbSd`: conv with `channels` outputs, `kernel`×`kernel`, `stride`; then BN, dropout, neuron."""

    channels: int
    kernel: int
    stride: int = 1

    def __str__(self) -> str:
        return f"{self.channels}C{self.kernel}S{self.stride}"


@dataclass(frozen=True)
class Arch:
    """A parsed architecture: explicit stem, `streams` implicit streams sharing one FEB layout,
    fusion after FEB layer `fusion_layer` (1-based), and an FC classifier with `classes` outputs."""

    stem: tuple[ConvLayer, ...]
    streams: int
    fusion_layer: int
    feb: tuple[ConvLayer, ...]
    classes: int

    def __str__(self) -> str:
        parts = [str(layer) for layer in self.stem]
        parts.append(f"{self.streams}F{self.fusion_layer}*(" + "-".join(map(str, self.feb)) + ")")
        parts.append(f"FC{self.classes}")
        return "-".join(parts)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def fail(self, what: str, pos: int | None = None) -> ArchError:
        return ArchError(self.text, self.pos if pos is None else pos, what)

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def found(self) -> str:
        char = self.peek()
        return f"found {char!r}" if char else "found end of string"

    def expect(self, char: str, what: str) -> None:
        if self.peek() != char:
            raise self.fail(f"expected {what}, {self.found()}")
        self.pos += 1

    def integer(self, what: str) -> tuple[int, int]:
        self.skip_space()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos].isdigit():
            self.pos += 1
        if start == self.pos:
            raise self.fail(f"expected {what} (a whole number), {self.found()}")
        value = int(self.text[start : self.pos])
        if value < 1:
            raise self.fail(f"{what} must be at least 1, got {value}", start)
        return value, start

    def conv(self) -> ConvLayer:
        channels, _ = self.integer("output channels")
        self.expect("C", "'C' after the channel count")
        kernel, kpos = self.integer("kernel size")
        if kernel % 2 == 0:
            raise self.fail(f"kernel size {kernel} is even; only odd kernels keep the 'same' padding", kpos)
        stride = 1
        if self.peek() == "S":
            self.pos += 1
            stride, spos = self.integer("stride")
            if stride not in SUPPORTED_STRIDES:
                raise self.fail(f"stride {stride} is not supported (use S1 or S2)", spos)
        return ConvLayer(channels, kernel, stride)

    def parse(self) -> Arch:
        stem: list[ConvLayer] = []
        while True:
            self.skip_space()
            start = self.pos
            self.integer("a layer 'aCbSd' or the streams 'xFl*(...)'")
            if self.peek() == "F":
                self.pos = start
                break
            self.pos = start
            stem.append(self.conv())
            self.expect("-", "'-' between layers")
        streams, _ = self.integer("number of streams")
        self.expect("F", "'F' after the number of streams")
        fusion, fusion_pos = self.integer("fusion layer")
        self.expect("*", "'*' after the fusion layer")
        self.expect("(", "'(' opening the feature extraction block")
        feb = [self.conv()]
        while self.peek() == "-":
            self.pos += 1
            feb.append(self.conv())
        self.expect(")", "'-' and another layer, or ')' closing the block")
        if fusion > len(feb):
            raise self.fail(f"fusion layer {fusion} > FEB depth {len(feb)}", fusion_pos)
        self.expect("-", "'-FCn' classifier after the block")
        self.expect("F", "'FC' classifier")
        self.expect("C", "'FC' classifier")
        classes, _ = self.integer("number of classes")
        if self.peek():
            raise self.fail(f"expected end of string after the classifier, {self.found()}")
        return Arch(tuple(stem), streams, fusion, tuple(feb), classes)


def parse_arch(text: str) -> Arch:
    """Parse the paper's notation; a stride left out means stride 1 (as in the paper's main tables)."""
    if not isinstance(text, str) or not text.strip():
        raise ArchError(str(text), 0, "empty architecture string")
    return _Parser(text).parse()
