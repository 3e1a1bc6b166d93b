"""The multi-modal multi-task (M3T) model: encoders -> [prompt | tokens] -> frozen backbone
with LoRA -> pooled -> one head per task.

``model.lora_rank: 0`` builds no adapter: the backbone stays wholly frozen and clients train
encoders, prompts and heads only (a linear-probe style baseline). peft, which pulls in
transformers (about 3 s of import per process), is then never imported.

One instance (a *skeleton*) holds every component of the federation; a client trains only
the subset ``ModelSpec.holds(profile)`` picks, so a worker can serve client after client
without rebuilding anything. Component state crosses the federation boundary through
``component_state`` / ``load_components``; adapters go through peft's
``get_peft_model_state_dict`` / ``set_peft_model_state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from hierfed.config import ModelConfig
from hierfed.data.federation import Federation, ModalitySpec, TaskSpec
from hierfed.errors import ConfigError
from hierfed.model.backbone import Backbone
from hierfed.model.hf_backbone import HASH_VOCAB
from hierfed.model.init import init_module
from hierfed.model.spec import ComponentSpec, ModelSpec, resolve_scope
from hierfed.registry import BACKBONES
from hierfed.update import State

ADAPTER = "adapter.backbone"


class TabularEncoder(nn.Module):
    """Features -> ``n_tokens`` tokens."""

    def __init__(self, n_features: int, d: int, n_tokens: int = 2) -> None:
        super().__init__()
        self.n_tokens = n_tokens
        self.proj = nn.Linear(n_features, d * n_tokens)
        self.type_embed = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return self.proj(x.float()).view(b, self.n_tokens, -1) + self.type_embed


class ImageEncoder(nn.Module):
    """Image (C, H, W) -> one token per non-overlapping patch."""

    def __init__(self, shape: tuple[int, ...], d: int, patch: int = 2) -> None:
        super().__init__()
        c, h, w = shape
        if h % patch or w % patch:
            patch = 1
        self.patch = patch
        self.proj = nn.Linear(c * patch * patch, d)
        # where a patch sits matters (a mean over patches would forget it)
        self.pos_embed = nn.Parameter(torch.zeros((h // patch) * (w // patch), d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        b, c, h, w = x.shape
        patches = x.float().unfold(2, p, p).unfold(3, p, p)  # b c h/p w/p p p
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, (h // p) * (w // p), c * p * p)
        return self.proj(patches) + self.pos_embed


class TextEncoder(nn.Module):
    """Token ids -> tokens. Learns its own embedding table unless the backbone has one,
    in which case it learns a residual projection over the backbone's frozen embeddings."""

    def __init__(self, vocab_size: int, d: int, own_embeddings: bool) -> None:
        super().__init__()
        self.own = own_embeddings
        if own_embeddings:
            self.embed = nn.Embedding(vocab_size, d)
        else:
            self.proj = nn.Linear(d, d)
        self.type_embed = nn.Parameter(torch.zeros(d))

    def forward(self, ids: torch.Tensor, backbone: Backbone) -> torch.Tensor:
        if self.own:
            x = self.embed(ids.long())
        else:
            base = backbone.embed_text(ids.long())
            assert base is not None
            x = base + self.proj(base)
        return x + self.type_embed


class M3TModel(nn.Module):
    """Encoders, frozen backbone with LoRA, soft prompts and heads for every task."""

    def __init__(
        self,
        *,
        backbone: Backbone,
        modalities: Mapping[str, ModalitySpec],
        tasks: Mapping[str, TaskSpec],
        cfg: ModelConfig,
    ) -> None:
        super().__init__()
        d = backbone.d_model
        self.tasks = dict(tasks)
        self.modalities = dict(modalities)
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.has_adapter = cfg.lora_rank > 0
        if self.has_adapter:
            from peft import LoraConfig, inject_adapter_in_model

            lora = LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # peft accepts a float scale
                lora_dropout=cfg.lora_dropout,
                target_modules=list(cfg.lora_targets),
            )
            try:
                inject_adapter_in_model(lora, self.backbone)
            except ValueError as exc:
                raise ConfigError(
                    "model.lora_targets",
                    list(cfg.lora_targets),
                    f"peft could not inject LoRA: {exc}",
                ) from None
        self.encoders = nn.ModuleDict()
        for name, spec in modalities.items():
            if spec.kind == "tabular":
                self.encoders[name] = TabularEncoder(spec.shape[0], d)
            elif spec.kind == "image":
                self.encoders[name] = ImageEncoder(spec.shape, d)
            else:
                own = backbone.embed_text(torch.zeros(1, 1, dtype=torch.long)) is None
                # raw-string text (vocab_size 0) is tokenized by the backbone, else word-hashed
                vocab = spec.vocab_size or backbone.text_vocab_size or HASH_VOCAB
                self.encoders[name] = TextEncoder(vocab, d, own_embeddings=own)
        self.prompt_tokens = cfg.prompt_tokens
        self.prompts = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(cfg.prompt_tokens, d)) for t in tasks}
            if cfg.prompt_tokens
            else {}
        )
        self.heads = nn.ModuleDict()
        for t, task in tasks.items():
            out = task.num_classes if task.kind == "classification" else 1
            if cfg.head_hidden:
                self.heads[t] = nn.Sequential(
                    nn.Linear(d, cfg.head_hidden), nn.GELU(), nn.Linear(cfg.head_hidden, out)
                )
            else:
                self.heads[t] = nn.Linear(d, out)
        self.freeze_backbone()

    # ---------------------------------------------------------------- components

    def component_modules(self) -> dict[str, nn.Module | nn.Parameter]:
        out: dict[str, nn.Module | nn.Parameter] = {}
        for m, enc in self.encoders.items():
            out[f"encoder.{m}"] = enc
        for t, p in self.prompts.items():
            out[f"prompt.{t}"] = p
        for t, h in self.heads.items():
            out[f"head.{t}"] = h
        return out

    def component_names(self) -> list[str]:
        return sorted([*self.component_modules(), *([ADAPTER] if self.has_adapter else [])])

    def component_parameters(self, component: str) -> list[nn.Parameter]:
        if component == ADAPTER:
            return [p for n, p in self.backbone.named_parameters() if "lora_" in n]
        mod = self.component_modules()[component]
        if isinstance(mod, nn.Parameter):
            return [mod]
        return list(mod.parameters())

    @torch.no_grad()
    def component_state(self, components: Iterable[str] | None = None) -> State:
        """Detached copies of the named components' tensors (all components if None)."""
        names = self.component_names() if components is None else list(components)
        mods = self.component_modules()
        out: State = {}
        live = self._live_tensors()
        for c in names:
            if (
                c in live
            ):  # fast path: the same tensors peft / state_dict would give, without rebuilding dicts
                out[c] = {k: v.detach().clone() for k, v in live[c].items()}
            elif c == ADAPTER:
                from peft import get_peft_model_state_dict

                sd = get_peft_model_state_dict(self.backbone)
                out[c] = {k: v.detach().clone() for k, v in sd.items()}
            else:
                mod = mods[c]
                if isinstance(mod, nn.Parameter):
                    out[c] = {"weight": mod.detach().clone()}
                else:
                    out[c] = {k: v.detach().clone() for k, v in mod.state_dict().items()}
        return out

    @torch.no_grad()
    def load_components(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Copy tensors into the named components; every key must match exactly."""
        mods = self.component_modules()
        live = self._live_tensors()
        for c, params in state.items():
            dst = live.get(c)
            if (
                dst is not None
                and dst.keys() == params.keys()
                and all(dst[k].shape == params[k].shape for k in dst)
            ):
                for (
                    k,
                    t,
                ) in (
                    dst.items()
                ):  # what set_peft_model_state_dict / load_state_dict do: an in-place copy
                    t.copy_(params[k])
                continue
            if (
                c == ADAPTER
            ):  # mismatching keys or shapes: the library paths raise the precise error
                from peft import set_peft_model_state_dict

                res = set_peft_model_state_dict(self.backbone, dict(params))
                if res.unexpected_keys:  # type: ignore[attr-defined]
                    raise ValueError(f"{c}: unexpected keys {res.unexpected_keys[:3]}")  # type: ignore[attr-defined]
            else:
                mod = mods[c]
                if isinstance(mod, nn.Parameter):
                    mod.copy_(params["weight"])
                else:
                    mod.load_state_dict(dict(params), strict=True)

    def _live_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Component -> state-dict key -> the live parameter, built once per skeleton.

        The keys are exactly those of ``component_state`` (peft's adapter keys, matched to the
        parameters they share storage with). Parameters are only ever updated in place, so
        the index stays valid. A component whose keys cannot all be matched is left out
        (it then takes the peft / state_dict path).
        """
        cache = self.__dict__.get("_live_cache")
        if cache is None:
            cache = {}
            for c, mod in self.component_modules().items():
                cache[c] = (
                    {"weight": mod}
                    if isinstance(mod, nn.Parameter)
                    else dict(mod.state_dict(keep_vars=True))
                )
            by_ptr = {p.data_ptr(): p for n, p in self.backbone.named_parameters() if "lora_" in n}
            sd: dict[str, torch.Tensor] = {}
            if self.has_adapter:
                from peft import get_peft_model_state_dict

                sd = get_peft_model_state_dict(self.backbone)
            if sd and all(
                v.data_ptr() in by_ptr and by_ptr[v.data_ptr()].shape == v.shape
                for v in sd.values()
            ):
                cache[ADAPTER] = {k: by_ptr[v.data_ptr()] for k, v in sd.items()}
            self.__dict__["_live_cache"] = cache
        return cache

    def freeze_backbone(self) -> None:
        """Base weights frozen *and* in eval mode (no dropout, fixed norms); LoRA stays trainable."""
        self.__dict__.pop("_trainable", None)
        self.__dict__.pop("_mode", None)
        for n, p in self.backbone.named_parameters():
            p.requires_grad_("lora_" in n)
        self.backbone.eval()

    def set_trainable(self, components: Iterable[str]) -> list[nn.Parameter]:
        """Make exactly ``components`` trainable; returns their parameters in a fixed order.

        A worker calls this once per client; when the set is the one it set last (clients of
        the same kind, one after another) the flags are already right and nothing is redone."""
        keep = tuple(sorted(set(components)))
        cached = self.__dict__.get("_trainable")
        if cached is not None and cached[0] == keep and all(p.requires_grad for p in cached[1]):
            return list(cached[1])
        for p in self.parameters():
            p.requires_grad_(False)
        params: list[nn.Parameter] = []
        for c in keep:
            for p in self.component_parameters(c):
                p.requires_grad_(True)
                params.append(p)
        self.backbone.eval()
        self.__dict__["_trainable"] = (keep, tuple(params))
        return params

    def train(self, mode: bool = True) -> M3TModel:
        if self.__dict__.get("_mode") is mode:  # already there: skip walking every module again
            return self
        super().train(mode)
        self.backbone.eval()  # the frozen backbone never leaves eval mode ...
        for name, module in self.backbone.named_modules():
            if (
                "lora_dropout" in name
            ):  # ... but LoRA's own dropout (model.lora_dropout) is trained with
                module.train(mode)
        self.__dict__["_mode"] = mode
        return self

    # ---------------------------------------------------------------- forward

    def forward(self, inputs: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
        spec = self.tasks[task]
        parts: list[torch.Tensor] = []
        masks: list[torch.Tensor | int] = []  # per modality: a text mask, or a token count
        batch = next(iter(inputs.values())).shape[0]
        if self.prompt_tokens:
            parts.append(self.prompts[task].unsqueeze(0).expand(batch, -1, -1))
        for m in spec.modalities:
            x = inputs[m]
            enc = self.encoders[m]
            tok = enc(x, self.backbone) if isinstance(enc, TextEncoder) else enc(x)
            parts.append(tok)
            masks.append(x != 0 if self.modalities[m].kind == "text" else tok.shape[1])
        tokens = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        width = tokens.shape[1]
        has_text = any(isinstance(k, torch.Tensor) for k in masks)
        if has_text:  # built out of place: under DP-SGD's vmap the text masks are batched
            dev = tokens.device
            counts = [self.prompt_tokens, *masks] if self.prompt_tokens else masks
            mask = torch.cat(
                [
                    k
                    if isinstance(k, torch.Tensor)
                    else torch.ones(batch, k, dtype=torch.bool, device=dev)
                    for k in counts
                ],
                dim=1,
            )
            mask[:, 0] = True  # never an all-masked row
        else:
            mask = torch.ones(batch, width, dtype=torch.bool, device=tokens.device)
        h = self.backbone(tokens, mask)
        if has_text:
            w = mask.unsqueeze(-1).float()
            pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        else:  # every token counts: the same sum and divisor without the weight tensor
            pooled = h.sum(1) / float(width)
        out = self.heads[task](pooled)
        return out if spec.kind == "classification" else out.squeeze(-1)


def build_model(cfg: ModelConfig, federation: Federation, seed: int) -> M3TModel:
    """Build the skeleton: the backbone from the registry, everything else keyed by ``seed``.

    Module constructors draw their default initial values from torch's global generator;
    those values are all overwritten by keyed ones, and ``fork_rng`` puts the global
    generator back as it was, so building a model neither depends on nor disturbs it."""
    with torch.random.fork_rng(devices=[]):
        return _build_model(cfg, federation, seed)


def _build_model(cfg: ModelConfig, federation: Federation, seed: int) -> M3TModel:
    if cfg.backbone in BACKBONES:
        backbone = BACKBONES.get(cfg.backbone)(cfg, seed)
    else:
        backbone = BACKBONES.get("hf")(cfg, seed)
    model = M3TModel(
        backbone=backbone, modalities=federation.modalities, tasks=federation.tasks, cfg=cfg
    )
    for name, mod in model.component_modules().items():
        if isinstance(mod, nn.Parameter):
            holder = nn.Module()
            holder.register_parameter("prompt", mod)
            init_module(holder, seed, name)
        else:
            init_module(mod, seed, name)
    if model.has_adapter:
        init_module(_LoraView(model.backbone), seed, ADAPTER)
    model.freeze_backbone()
    return model


class _LoraView(nn.Module):
    """Exposes only the LoRA parameters of a backbone, so init touches nothing else."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self._items = [(n, p) for n, p in backbone.named_parameters() if "lora_" in n]

    def named_parameters(self, *args, **kwargs):  # type: ignore[override]
        return iter(self._items)


def model_spec(model: M3TModel, federation: Federation, cfg: ModelConfig) -> ModelSpec:
    """Describe ``model``'s components (names, shapes, scopes) for validation and routing."""
    comps = {}
    for name, params in model.component_state().items():
        kind = name.split(".", 1)[0]
        shapes = tuple(sorted((p, tuple(t.shape)) for p, t in params.items()))
        comps[name] = ComponentSpec(name, kind, resolve_scope(name, cfg.scopes, federation), shapes)
    backbone_numel = sum(
        p.numel() for n, p in model.backbone.named_parameters() if "lora_" not in n
    )
    return ModelSpec(
        components=comps,
        tier_names=federation.tier_names,
        resources={k: tuple(v) for k, v in cfg.resources.items()},
        backbone_numel=backbone_numel,
        lora_rank=cfg.lora_rank,
        resource_ranks=dict(cfg.resource_ranks),
    )
