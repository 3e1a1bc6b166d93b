"""Pretrained-backbone glue on a tiny BERT saved to a local folder: loading by path with LoRA on
query/value, frozen and in eval mode, the backbone's own tokenizer for raw text, one load per worker."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hierfed import plugins  # noqa: F401  (registers the built-in plug-ins)
from hierfed.config import load_config
from hierfed.data.federation import ClientData, ClientProfile, Federation, ModalitySpec, TaskSpec
from hierfed.errors import ConfigError
from hierfed.model.hf_backbone import HASH_VOCAB, HFBackbone, hash_tokenize, tokenize_federation
from hierfed.model.m3t import ADAPTER, build_model

WORDS = [
    "intro",
    "to",
    "chemistry",
    "jazz",
    "law",
    "history",
    "music",
    "seminar",
    "advanced",
    "theory",
]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A 2-layer, 32-wide BERT with a 15-word vocabulary, saved like a hub checkpoint."""
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(d))
    conf = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(conf).save_pretrained(str(d))
    return d


def _fed(n: int = 12) -> Federation:
    """Two clients with raw course-title strings and a 2-class task (music vs law titles)."""
    rng = np.random.default_rng(0)
    titles = np.array(
        [("intro to music" if i % 2 else "law seminar") for i in range(n)], dtype=np.str_
    )
    labels = np.array([i % 2 for i in range(n)], dtype=np.int64)
    data = ClientData({"text": titles}, {"kind": labels})
    clients, train, test = [], {}, {}
    for k in range(2):
        cid = f"global/c{k}"
        idx = rng.permutation(n)
        train[cid] = ClientData({"text": titles[idx]}, {"kind": labels[idx]})
        test[cid] = ClientData({"text": titles[:2]}, {"kind": labels[:2]})
        clients.append(ClientProfile(cid, ("text",), ("kind",), num_train=n, num_test=2))
    return Federation(
        "titles",
        ("global", "client"),
        {"text": ModalitySpec("text", "text", (), vocab_size=0)},
        {"kind": TaskSpec("kind", ("text",), 2)},
        clients,
        train,
        test,
        data,
    )


def _cfg(bert_dir, *extra: str):
    return load_config(
        None,
        [
            f"model.backbone={bert_dir}",
            "model.lora_targets=[query,value]",
            "model.lora_rank=2",
            "model.prompt_tokens=2",
            *extra,
        ],
        validate=False,
    )


def test_local_path_backbone_gets_lora_on_query_and_value_and_stays_frozen(bert_dir):
    model = build_model(_cfg(bert_dir).model, _fed(), 0)
    assert isinstance(model.backbone, HFBackbone) and model.backbone.d_model == 32
    lora = sorted(model.component_state([ADAPTER])[ADAPTER])
    assert lora and all(".query." in k or ".value." in k for k in lora)
    assert len(lora) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    model.set_trainable([ADAPTER])
    model.train()
    assert not model.backbone.model.training and not model.backbone.training
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_unknown_lora_target_lists_the_models_linear_layers(bert_dir):
    with pytest.raises(ConfigError, match="model.lora_targets") as err:
        build_model(_cfg(bert_dir, "model.lora_targets=[q_proj]").model, _fed(), 0)
    assert "query" in str(err.value)


def test_missing_model_folder_is_a_config_error(tmp_path):
    cfg = load_config(None, [f"model.backbone={tmp_path / 'nope'}"], validate=False)
    with pytest.raises(ConfigError, match="model.backbone"):
        build_model(cfg.model, _fed(), 0)


def test_raw_text_goes_through_the_backbones_own_tokenizer(bert_dir):
    model = build_model(_cfg(bert_dir).model, _fed(), 0)
    fed = tokenize_federation(_fed(), model.backbone, 6)
    ids = fed.global_test.inputs["text"]
    assert ids.dtype == np.int64 and ids.shape == (12, 6)
    # [CLS]=2 law=9 seminar=12 [SEP]=3, padded with 0;  [CLS] intro=5 to=6 music=11 [SEP]
    assert ids[0].tolist() == [2, 9, 12, 3, 0, 0]
    assert ids[1].tolist() == [2, 5, 6, 11, 3, 0]
    assert fed.modalities["text"].shape == (6,)
    assert _fed().global_test.inputs["text"].dtype.kind == "U"  # the input federation is untouched
    assert tokenize_federation(fed, model.backbone, 6) is fed  # nothing left to tokenize


def test_backbones_without_a_vocabulary_hash_words_stably():
    a = hash_tokenize(["Intro to Jazz", "jazz"], 4)
    assert a.shape == (2, 4) and a[0, 3] == 0 and a[0, 2] == a[1, 0]
    assert (a[a > 0] < HASH_VOCAB).all()
    assert np.array_equal(a, hash_tokenize(["intro TO jazz!", "Jazz"], 4))


def test_a_worker_loads_the_backbone_once_and_trains_clients_on_it(bert_dir, monkeypatch):
    from transformers import AutoModel

    from hierfed.runtime.jobs import TrainJob
    from hierfed.runtime.worker import WorkerCore, WorkerSetup

    calls = []
    real = AutoModel.from_pretrained

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModel, "from_pretrained", counting)
    cfg = load_config(
        None,
        [
            f"model.backbone={bert_dir}",
            "model.lora_targets=[query,value]",
            "model.lora_rank=2",
            "model.prompt_tokens=2",
            "topology.name=star",
            "runtime.name=local",
        ],
    )
    fed = _fed()
    core = WorkerCore(WorkerSetup(cfg, fed))
    assert len(calls) == 1
    state = core.initial_state()
    jobs = [
        TrainJob(
            client_id=c.id,
            parent_id="global",
            tier="global",
            round=1,
            key=(1, c.id),
            trains=core.spec.holds(c),
            sends=core.spec.holds(c),
        )
        for c in fed.clients
    ]
    metas, updates = core.train(jobs, {"global": state})
    assert len(calls) == 1  # no reload per client
    assert all(m.error is None for m in metas), [m.error for m in metas]
    assert set(updates) == {c.id for c in fed.clients}
    b_keys = [k for k in updates["global/c0"].tensors[ADAPTER] if "lora_B" in k]
    assert any(float(updates["global/c0"].tensors[ADAPTER][k].abs().sum()) > 0 for k in b_keys)
