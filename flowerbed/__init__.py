"""flowerbed: a deployment kit for Flower federations across locked-down workspace VMs."""

__version__ = "0.1.0"
