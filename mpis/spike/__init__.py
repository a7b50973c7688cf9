"""Spiking runs of exported graphs outside mpis: the toolchains' own importers (NIR hand-off)."""
