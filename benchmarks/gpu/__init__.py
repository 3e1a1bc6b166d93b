"""Client-training throughput on a GPU: hierfed's local runtime vs a plain PyTorch loop."""
