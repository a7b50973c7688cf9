"""The MPIS paper's architecture notation, parsed into a typed spec."""

from mpis.arch.notation import PAPER_EXAMPLES, Arch, ArchError, ConvLayer, parse_arch

__all__ = ["Arch", "ArchError", "ConvLayer", "PAPER_EXAMPLES", "parse_arch"]
