"""Every ``flowerbed`` command: one module per command group, wired together in ``flowerbed.cli``."""
