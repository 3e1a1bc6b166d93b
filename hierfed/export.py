"""Export a finished run in its ecosystem's formats, and load it back.

``export_run(run_dir, out)`` writes::

    out/
      adapter/adapter_config.json        the LoRA adapter as a peft adapter folder: loads with
      adapter/adapter_model.safetensors  PeftModel.from_pretrained(backbone, "out/adapter")
      components.safetensors + .json     encoders, prompts and heads (hierfed's checksummed
                                         safetensors; keys "<component>/<param>")
      backbone.safetensors + .json       the frozen ``tiny`` backbone's weights (tiny only; a
                                         pretrained backbone is not copied: the card names it)
      model.json                         modalities, tasks, backbone and what the loader needs
      config.yaml                        the run's config
      README.md                          the model card: data, topology, rounds, epsilon per
                                         institution, metrics
      personalized/<node>/...            on request: the same layout for a client's personalized
                                         model (global components, its tiers' own, its local
                                         ones), or a tier node's (global components and those
                                         scoped to its tier or above; components scoped below
                                         it keep the root's value, which for ``local`` ones is
                                         their initial value: they never leave the clients)

Which backbone the adapter loads onto. ``minilm`` and Hugging Face backbones: the
transformers model itself (``AutoModel.from_pretrained(path)``); the adapter's keys are
relative to it. ``tiny`` is hierfed's own small transformer, not a transformers model:
``PeftModel.from_pretrained`` still loads the adapter onto it (peft handles any
``nn.Module``), and ``tiny_backbone(out)`` rebuilds it from ``backbone.safetensors``.

The model around the backbone — encoders, soft prompts, heads — is hierfed's, not peft's:
``load_export(out)`` puts it back together, with the adapter applied through
``PeftModel.from_pretrained``, and gives an ``M3TModel`` whose logits equal the run's.

Example (a one-round run, exported and loaded back)::

    >>> import tempfile
    >>> from pathlib import Path
    >>> from hierfed.config import load_config
    >>> from hierfed.simulation import run
    >>> tmp = tempfile.mkdtemp()
    >>> cfg = load_config(None, ["runtime.name=local", "rounds=1", "data.num_institutions=2",
    ...     "data.students_per_institution=2", "data.essay_only_institutions=0",
    ...     "model.d_model=16", "model.num_layers=1", "model.num_heads=2"], out=f"{tmp}/run")
    >>> result = run(cfg)
    >>> [p.name for p in export_run(f"{tmp}/run", f"{tmp}/exported")]
    ['exported']
    >>> sorted(p.name for p in (Path(tmp) / "exported" / "adapter").iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']
    >>> model = load_export(f"{tmp}/exported")
    >>> type(model).__name__
    'M3TModel'
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hierfed.checkpoint import atomic_write_text, load_state, save_state
from hierfed.config import RunConfig, load_config
from hierfed.data.federation import ModalitySpec, TaskSpec
from hierfed.errors import ConfigError, HierfedError
from hierfed.model.backbone import Backbone
from hierfed.model_card import model_card
from hierfed.update import State

ADAPTER_DIR = "adapter"
FORMAT = "hierfed-export/1"


# ---------------------------------------------------------------- writing


def export_run(
    run_dir: str | Path, out: str | Path, *, personalized: Sequence[str] = ()
) -> list[Path]:
    """Export the run's global model to ``out`` (created; refused if it holds files), and
    the personalized model of each node in ``personalized``: a client id, a tier node id
    (e.g. ``global/inst-00``) or ``all`` (every client). Returns the folders written."""
    from hierfed.inference import load_run, personalized_states

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise HierfedError(f"--out '{out}' is not empty; give a new folder (nothing overwritten)")
    run = load_run(run_dir)
    picks = _resolve_nodes(run.federation, personalized)  # checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    written = [out]
    _write_model(run, run.state, out)
    shutil.copyfile(run.run_dir / "config.yaml", out / "config.yaml")
    atomic_write_text(out / "README.md", model_card(run))  # hierfed/model_card.py
    if picks:
        states = personalized_states(run, sorted(set(picks.values())))
        spec, _ = run.core.model_info()
        for node, client in picks.items():
            state = dict(states[client])
            if node != client:  # a tier node: what is scoped below it is its members' own
                depth = node.count("/")
                for c in state:
                    if spec.scope_level(c) > depth:
                        state[c] = run.state[c]
            folder = out / "personalized" / _safe(node)
            folder.mkdir(parents=True)
            _write_model(run, state, folder, node=node)
            written.append(folder)
    return written


def _resolve_nodes(fed: Any, nodes: Sequence[str]) -> dict[str, str]:
    """Node -> the client whose personalized view it exports (a tier node: its first client)."""
    ids = sorted(fed.by_id) if list(nodes) == ["all"] else list(nodes)
    picks: dict[str, str] = {}
    for node in ids:
        if node in fed.by_id:
            picks[node] = node
            continue
        under = [c for c in sorted(fed.by_id) if c.startswith(node.rstrip("/") + "/")]
        if not under or "/" not in node:
            example = sorted(fed.by_id)[0]
            raise ConfigError(
                "--personalized",
                node,
                f"not a client or an inner tier node of the run (e.g. {example} or "
                f"{example.rsplit('/', 1)[0]}), nor 'all'",
            )
        picks[node] = under[0]
    return picks


def _safe(node: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "__", node)


def _write_model(run: Any, state: State, folder: Path, *, node: str | None = None) -> None:
    from hierfed.model.m3t import ADAPTER

    cfg: RunConfig = run.cfg
    model = run.model
    comps = {c: p for c, p in state.items() if c != ADAPTER}
    save_state(folder / "components", comps, {"format": FORMAT})
    if ADAPTER in state:
        write_peft_adapter(folder / ADAPTER_DIR, state[ADAPTER], cfg, model.backbone)
    if cfg.model.backbone == "tiny":
        base = {n: p for n, p in model.backbone.state_dict().items() if "lora_" not in n}
        base = {re.sub(r"\.base_layer\.", ".", n): t for n, t in base.items()}
        save_state(folder / "backbone", {"tiny": base}, {"format": FORMAT})
    info = {
        "format": FORMAT,
        "node": node or "global",
        "backbone": cfg.model.backbone,
        "backbone_path": _backbone_path(cfg),
        "seed": cfg.seed,
        "model": dataclasses.asdict(cfg.model),
        "modalities": {m: dataclasses.asdict(s) for m, s in run.federation.modalities.items()},
        "tasks": {t: dataclasses.asdict(s) for t, s in run.federation.tasks.items()},
        "adapter": ADAPTER in state,
    }
    atomic_write_text(folder / "model.json", json.dumps(info, indent=1, sort_keys=True))


def _backbone_path(cfg: RunConfig) -> str | None:
    if cfg.model.backbone == "tiny":
        return None
    if cfg.model.backbone == "minilm":
        from hierfed.model.hf_backbone import minilm_path

        return str(minilm_path())
    return cfg.model.backbone


def _hf_prefix(backbone: nn.Module) -> str:
    """Where the transformers model sits inside a hierfed backbone ('' for tiny)."""
    from hierfed.model.hf_backbone import HFBackbone

    return "model." if isinstance(backbone, HFBackbone) else ""


def write_peft_adapter(
    folder: Path, adapter: Mapping[str, torch.Tensor], cfg: RunConfig, backbone: nn.Module
) -> None:
    """A peft adapter folder for ``adapter`` (peft's state-dict keys relative to hierfed's
    backbone module), with keys relative to the model ``PeftModel`` wraps."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    prefix = _hf_prefix(backbone)
    tensors = {}
    for k, t in adapter.items():
        if prefix and not k.startswith(prefix):
            raise HierfedError(f"adapter key '{k}' does not lie under the backbone's '{prefix}'")
        tensors["base_model.model." + k[len(prefix) :]] = t.detach().contiguous().cpu()
    m = cfg.model
    lora = LoraConfig(
        r=m.lora_rank,
        lora_alpha=m.lora_alpha,  # type: ignore[arg-type]  # peft accepts a float scale
        lora_dropout=m.lora_dropout,
        target_modules=list(m.lora_targets),
        base_model_name_or_path=_backbone_path(cfg),
    )
    folder.mkdir(parents=True, exist_ok=True)
    lora.save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def _read_info(folder: Path) -> dict[str, Any]:
    path = folder / "model.json"
    if not path.is_file():
        raise HierfedError(f"'{folder}' is not a hierfed export (no model.json)")
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
        raise HierfedError(f"'{folder}' has format {info.get('format')!r}; expected {FORMAT}")
    return info


def _model_cfg(info: Mapping[str, Any]) -> Any:
    from hierfed.config import ModelConfig

    return ModelConfig(**info["model"])


def tiny_backbone(folder: str | Path) -> Backbone:
    """The exported ``tiny`` backbone, rebuilt from ``backbone.safetensors`` (no LoRA)."""
    from hierfed.model.backbone import TinyTransformer

    folder = Path(folder)
    info = _read_info(folder)
    m = _model_cfg(info)
    bb = TinyTransformer(m.d_model, m.num_layers, m.num_heads, m.max_tokens)
    weights, _ = load_state(folder / "backbone")
    bb.load_state_dict(dict(weights["tiny"]), strict=True)
    bb.eval()
    return bb


class PeftBackbone(Backbone):
    """A hierfed backbone whose forward goes through a ``peft.PeftModel``.

    ``inner`` is the plain backbone (tiny, or an HFBackbone around the transformers model
    that ``peft`` wraps); it supplies the text embeddings and tokenizer."""

    def __init__(self, inner: Backbone, peft_model: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.peft = peft_model
        self.d_model = inner.d_model
        self.max_tokens = inner.max_tokens
        self.hf = bool(_hf_prefix(inner))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.hf:
            return self.peft(inputs_embeds=tokens, attention_mask=mask.long()).last_hidden_state
        return self.peft(tokens, mask)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor | None:
        return self.inner.embed_text(ids)

    @property
    def text_vocab_size(self) -> int | None:
        return self.inner.text_vocab_size

    def tokenize(self, texts: Sequence[str], length: int) -> Any:
        tok = getattr(self.inner, "tokenize", None)
        if tok is None:
            from hierfed.model.hf_backbone import hash_tokenize

            return hash_tokenize(texts, length)
        return tok(texts, length)


def base_backbone(folder: str | Path) -> Backbone:
    """The frozen backbone an export was trained on, without LoRA: tiny from its weights,
    minilm from its package, a Hugging Face model from its path or id."""
    folder = Path(folder)
    info = _read_info(folder)
    m = _model_cfg(info)
    if info["backbone"] == "tiny":
        return tiny_backbone(folder)
    from hierfed.model.hf_backbone import build_hf, build_minilm

    m = dataclasses.replace(m, lora_rank=0)
    if info["backbone"] == "minilm":
        return build_minilm(m, info["seed"])
    return build_hf(m, info["seed"])


def load_export(folder: str | Path, *, backbone: Backbone | None = None) -> nn.Module:
    """The exported model as an ``M3TModel`` in eval mode: ``backbone`` (default: the one it
    was trained on, ``base_backbone``) with the adapter applied by
    ``PeftModel.from_pretrained``, and the exported encoders, prompts and heads."""
    from hierfed.model.m3t import M3TModel

    folder = Path(folder)
    info = _read_info(folder)
    bb = backbone if backbone is not None else base_backbone(folder)
    if info["adapter"]:
        from peft import PeftModel

        target: nn.Module = getattr(bb, "model") if _hf_prefix(bb) else bb  # noqa: B009
        with warnings.catch_warnings():
            # peft asks transformers 5 for is_gradient_checkpointing, which it deprecated; the
            # notice is about that call inside peft, not about this model
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            peft_model = PeftModel.from_pretrained(target, str(folder / ADAPTER_DIR))
        bb = PeftBackbone(bb, peft_model)
    mods = {
        k: ModalitySpec(**{**v, "shape": tuple(v["shape"])}) for k, v in info["modalities"].items()
    }
    tasks = {
        k: TaskSpec(**{**v, "modalities": tuple(v["modalities"])}) for k, v in info["tasks"].items()
    }
    cfg = dataclasses.replace(_model_cfg(info), lora_rank=0)  # the adapter came through peft
    model = M3TModel(backbone=bb, modalities=mods, tasks=tasks, cfg=cfg)
    comps, _ = load_state(folder / "components")
    model.load_components(comps)
    model.eval()
    return model


def export_config(folder: str | Path) -> RunConfig:
    """The run config stored with an export."""
    return load_config(Path(folder) / "config.yaml", validate=False)
