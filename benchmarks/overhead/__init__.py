"""Engine overhead: one FedAvg workload run by a plain PyTorch loop, hierfed and Flower."""
