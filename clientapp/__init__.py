"""Site side: the PyTorch ClientApp that trains on data that never leaves the VM."""
