"""mpis: train multi-parallel implicit stream (MPIS) equilibrium spiking networks and export them."""

__version__ = "0.1.0"
