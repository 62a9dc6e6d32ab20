"""Network Dissection (Bau, Zhou et al., CVPR 2017) in the training loop."""

__version__ = "0.1.0"
