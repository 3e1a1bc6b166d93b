"""GPU placement logic, checked on the CPU: device selection and the batch/state moves."""

from __future__ import annotations

import numpy as np
import torch

from hierfed.client import _batch, to_cpu
from hierfed.data.federation import ClientData
from hierfed.runtime.worker import select_device


def test_select_device_uses_cpu_without_a_gpu_share():
    assert select_device(0.0, cuda_available=True) == torch.device("cpu")


def test_select_device_uses_cuda_for_a_fractional_gpu_share():
    assert select_device(0.25, cuda_available=True) == torch.device("cuda", 0)


def test_select_device_falls_back_to_cpu_when_cuda_is_missing():
    assert select_device(1.0, cuda_available=False) == torch.device("cpu")


def test_batch_moves_inputs_and_labels_to_the_worker_device():
    data = ClientData(
        {"tabular": np.arange(12, dtype=np.float32).reshape(4, 3)}, {"t": np.array([0, 1, 0, 1])}
    )
    idx = np.array([3, 1])
    # the meta device: a real device move, without a GPU
    x, y = _batch(data, idx, ("tabular",), "t", torch.device("meta"))
    assert x["tabular"].device.type == "meta" and y.device.type == "meta"
    x, y = _batch(data, idx, ("tabular",), "t", torch.device("cpu"))
    assert x["tabular"].tolist() == [[9.0, 10.0, 11.0], [3.0, 4.0, 5.0]] and y.tolist() == [1, 1]


def test_to_cpu_returns_cpu_tensors_with_the_same_values():
    state = {"head.t": {"weight": torch.tensor([1.5, -2.0])}}
    out = to_cpu(state)
    assert out["head.t"]["weight"].device.type == "cpu"
    assert torch.equal(out["head.t"]["weight"], state["head.t"]["weight"])
