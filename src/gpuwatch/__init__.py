"""gpuwatch: watch a fleet of NVIDIA GPU servers over SSH and report to Feishu."""

__version__ = "0.1.0"
