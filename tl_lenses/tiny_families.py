"""Tiny random models of every model family TL users study, on both TL backends.

Two registries, one per backend, each keyed by a family name:

- :data:`HOOKED_FAMILIES`: hand-written ``HookedTransformerConfig`` flags (LN / LNPre / RMS /
  RMSPre / none, parallel attention+MLP, rotary full and partial, learned / ALiBi /
  shortformer positions, post-embedding LN, gated MLP, GQA, attention-only, untied
  unembedding with ``b_U`` and ``d_vocab_out``, logit and attention-score soft caps, norms
  before and after each sublayer, Gemma's embedding scale, attention biases, mixture of
  experts, post-norm blocks).
- :data:`BRIDGE_FAMILIES`: tiny ``transformers`` configs for every family with a HF class and
  a TL Bridge adapter (Gemma, Gemma-2, Qwen2/3, Mistral, Mixtral, Phi, Phi-3, GPT-NeoX /
  Pythia, GPT-J, GPT-Neo, OPT, OLMo, OLMo-2, BLOOM, GPT-2, Llama).

Every norm weight and bias is randomised (HF and TL initialise them to 1 and 0, which would
hide a lens that normalises with the wrong statistics), then the weights get tl_lenses'
processing (:data:`tl_lenses.models.PROCESSING`). Sizes are tiny (d_model 32, 2 layers) so
the whole matrix runs in seconds per family on a CPU.
"""

from __future__ import annotations

import logging
import math

import torch

from tl_lenses._compat import hooked_classes
from tl_lenses.models import PROCESSING, bridge_from_hf
from tl_lenses.tiny import N_BYTES, _randomise, byte_tokenizer

D_MODEL, N_LAYERS, N_HEADS, D_MLP, N_CTX = 32, 2, 4, 64, 32
VOCAB = N_BYTES + 1

_BASE = dict(d_model=D_MODEL, d_head=D_MODEL // N_HEADS, n_heads=N_HEADS, d_mlp=D_MLP,
             n_layers=N_LAYERS, n_ctx=N_CTX, d_vocab=VOCAB, act_fn="gelu_new",
             default_prepend_bos=False, tokenizer_prepends_bos=False)
_RMS_LLAMA = dict(normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True,
                  act_fn="silu", final_rms=True)

# family -> HookedTransformerConfig flags (on top of _BASE). Families whose weights TL folds
# wrongly are listed in _NO_FOLD with the reason.
HOOKED_FAMILIES: dict[str, dict] = {
    "gpt2": dict(normalization_type="LN", positional_embedding_type="standard"),
    "llama": dict(**_RMS_LLAMA, n_key_value_heads=2),
    "pythia": dict(normalization_type="LN", positional_embedding_type="rotary", rotary_dim=2,
                   parallel_attn_mlp=True, act_fn="gelu"),
    "gpt-j": dict(normalization_type="LN", positional_embedding_type="rotary", rotary_dim=4,
                  rotary_adjacent_pairs=True, parallel_attn_mlp=True),
    "bloom": dict(normalization_type="LN", positional_embedding_type="alibi",
                  post_embedding_ln=True, act_fn="gelu"),
    "gemma2": dict(**{**_RMS_LLAMA, "act_fn": "gelu_pytorch_tanh"}, n_key_value_heads=2,
                   use_normalization_before_and_after=True, output_logits_soft_cap=3.0,
                   attn_scores_soft_cap=5.0),
    "qwen2": dict(**_RMS_LLAMA, n_key_value_heads=2),
    "mixtral": dict(**_RMS_LLAMA, n_key_value_heads=2, num_experts=4, experts_per_token=2),
    "shortformer": dict(normalization_type="LN", positional_embedding_type="shortformer"),
    "attn-only": dict(normalization_type="LN", positional_embedding_type="standard",
                      attn_only=True),
    "no-norm": dict(normalization_type=None, positional_embedding_type="standard"),
    "lnpre": dict(normalization_type="LNPre", positional_embedding_type="standard"),
    "rmspre-partial-rotary": dict(normalization_type="RMSPre", positional_embedding_type="rotary",
                                  rotary_dim=4),
    "untied-vocab-out": dict(normalization_type="LN", positional_embedding_type="standard",
                             d_vocab_out=300),
    "olmo2-post-norm": dict(**_RMS_LLAMA, original_architecture="Olmo2ForCausalLM"),
}

# TL's fold_ln changes these models' logits (checked in the tests), so their norms are kept
# unfolded; methods that need folded norms refuse them.
_NO_FOLD = {
    "shortformer": "TL's fold_ln scales the shortformer position embedding added after ln1",
    "olmo2-post-norm": "TL's fold_ln folds post-norm weights as if they were pre-norms",
}

# family -> (transformers config class, its arguments, the HF architecture class).
_HF_SMALL = dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_MLP,
                 num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                 max_position_embeddings=N_CTX)
_GQA = dict(num_key_value_heads=2, head_dim=D_MODEL // N_HEADS)
BRIDGE_FAMILIES: dict[str, tuple[str, dict, str]] = {
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_positions=N_CTX, n_embd=D_MODEL,
                                n_layer=N_LAYERS, n_head=N_HEADS), "GPT2LMHeadModel"),
    "llama": ("LlamaConfig", dict(**_HF_SMALL, **_GQA, tie_word_embeddings=False),
              "LlamaForCausalLM"),
    "gemma": ("GemmaConfig", dict(**_HF_SMALL, **_GQA), "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", dict(**_HF_SMALL, **_GQA, final_logit_softcapping=3.0,
                                    attn_logit_softcapping=5.0, sliding_window=16),
               "Gemma2ForCausalLM"),
    "qwen2": ("Qwen2Config", dict(**_HF_SMALL, num_key_value_heads=2, tie_word_embeddings=False),
              "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", dict(**_HF_SMALL, **_GQA), "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", dict(**_HF_SMALL, **_GQA), "MistralForCausalLM"),
    "mixtral": ("MixtralConfig", dict(**_HF_SMALL, **_GQA, num_local_experts=4,
                                      num_experts_per_tok=2), "MixtralForCausalLM"),
    "phi": ("PhiConfig", dict(**_HF_SMALL, partial_rotary_factor=0.5), "PhiForCausalLM"),
    "phi3": ("Phi3Config", dict(**_HF_SMALL, pad_token_id=0), "Phi3ForCausalLM"),
    "pythia": ("GPTNeoXConfig", dict(**_HF_SMALL, rotary_pct=0.25), "GPTNeoXForCausalLM"),
    "gpt-j": ("GPTJConfig", dict(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=N_LAYERS,
                                 n_head=N_HEADS, n_positions=N_CTX, rotary_dim=4),
              "GPTJForCausalLM"),
    "gpt-neo": ("GPTNeoConfig", dict(vocab_size=VOCAB, hidden_size=D_MODEL, num_layers=N_LAYERS,
                                     num_heads=N_HEADS, max_position_embeddings=N_CTX,
                                     attention_types=[[["global", "local"], 1]], window_size=16),
                "GPTNeoForCausalLM"),
    "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=D_MODEL, ffn_dim=D_MLP,
                              num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                              max_position_embeddings=N_CTX, word_embed_proj_dim=D_MODEL),
            "OPTForCausalLM"),
    "olmo": ("OlmoConfig", dict(**_HF_SMALL), "OlmoForCausalLM"),
    "olmo2": ("Olmo2Config", dict(**_HF_SMALL), "Olmo2ForCausalLM"),
    "bloom": ("BloomConfig", dict(vocab_size=VOCAB, hidden_size=D_MODEL, n_layer=N_LAYERS,
                                  n_head=N_HEADS), "BloomForCausalLM"),
}


def hooked_config(family: str):
    """The hand-written ``HookedTransformerConfig`` of a :data:`HOOKED_FAMILIES` member."""
    HookedTransformerConfig = hooked_classes()[1]  # TL 3.x only: refuses clearly on 4.x
    if family not in HOOKED_FAMILIES:
        raise ValueError(f"family must be one of {sorted(HOOKED_FAMILIES)}, got {family!r}")
    return HookedTransformerConfig(**{**_BASE, **HOOKED_FAMILIES[family]}, model_name=family)


def _randomise_hooked(state: dict[str, torch.Tensor], seed: int) -> None:
    """Norm weights ``1 + 0.3 N(0, 1)``, every bias ``0.1 N(0, 1)`` (TL inits 1 and 0)."""
    generator = torch.Generator().manual_seed(seed + 1)
    for name, value in state.items():
        last = name.rsplit(".", 1)[-1]
        if not value.is_floating_point() or "rotary" in name or last in ("mask", "IGNORE"):
            continue
        noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
        if last == "w":
            value.copy_(1 + 0.3 * noise)
        elif last == "b" or last.startswith("b_"):
            value.copy_(0.1 * noise)


def folds_norms(family: str) -> bool:
    """Whether tl_lenses' ``fold_ln=True`` keeps this hooked family's logits (see _NO_FOLD)."""
    return family not in _NO_FOLD


def tiny_family_hooked(family: str, *, seed: int = 0, processed: bool = True):
    """A tiny random HookedTransformer of ``family`` with the byte tokenizer.

    ``processed``: load the weights with tl_lenses' processing (norms folded where TL folds
    them correctly); False keeps TL's raw module tree (``LN``/``RMS`` with weights).
    """
    HookedTransformer = hooked_classes()[0]  # TL 3.x only: refuses clearly on 4.x
    cfg = hooked_config(family)
    torch.manual_seed(seed)
    raw = HookedTransformer(cfg, tokenizer=byte_tokenizer(), move_to_device=False)
    state = raw.state_dict()
    _randomise_hooked(state, seed)
    if family == "gemma2":  # Gemma multiplies the embedding by sqrt(d_model); TL folds it in W_E
        state["embed.W_E"].mul_(math.sqrt(cfg.d_model))
    if not processed:
        raw.load_state_dict(state)
        return raw.eval()
    model = HookedTransformer(hooked_config(family), tokenizer=byte_tokenizer(),
                              move_to_device=False)
    # TL warns that there is nothing to fold for None/LNPre/RMSPre: expected here.
    quiet = logging.getLogger()
    level, quiet.level = quiet.level, logging.ERROR
    try:
        model.load_and_process_state_dict(
            state, **{**PROCESSING, "fold_ln": PROCESSING["fold_ln"] and folds_norms(family)})
    finally:
        quiet.setLevel(level)
    return model.eval()


def tiny_family_hf(family: str, *, seed: int = 0):
    """A tiny random ``transformers`` causal LM of ``family`` (float32, eval mode)."""
    import transformers

    if family not in BRIDGE_FAMILIES:
        raise ValueError(f"family must be one of {sorted(BRIDGE_FAMILIES)}, got {family!r}")
    config_name, kwargs, architecture = BRIDGE_FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**kwargs)
    model = getattr(transformers, architecture)(config)
    _randomise(model, seed)
    return model.float().eval()


def tiny_family_bridge(family: str, *, seed: int = 0):
    """A tiny random TransformerBridge (compatibility mode) of ``family``."""
    hf_model = tiny_family_hf(family, seed=seed)
    return bridge_from_hf(hf_model, byte_tokenizer(), BRIDGE_FAMILIES[family][2], family)


def tiny_family(family: str, backend: str = "hooked", *, seed: int = 0):
    """A tiny random model of ``family`` on ``backend`` ("hooked" or "bridge")."""
    if backend == "hooked":
        return tiny_family_hooked(family, seed=seed)
    if backend == "bridge":
        return tiny_family_bridge(family, seed=seed)
    raise ValueError(f"backend must be 'hooked' or 'bridge', got {backend!r}")


def family_summary(family: str, backend: str) -> str:
    """What a member covers: its config flags (hooked) or its HF architecture (bridge)."""
    if backend == "bridge":
        return BRIDGE_FAMILIES[family][2]
    flags = {k: v for k, v in HOOKED_FAMILIES[family].items() if k != "final_rms"}
    flags["normalization_type"] = flags.get("normalization_type") or "none"
    text = ", ".join(str(v) if k in ("normalization_type", "positional_embedding_type",
                                     "act_fn") else f"{k}={v}" for k, v in flags.items())
    return text + ("" if folds_norms(family) else " (norms unfolded)")


def family_members() -> list[tuple[str, str]]:
    """Every ``(family, backend)`` pair of the matrix, hooked families first."""
    return [(f, "hooked") for f in HOOKED_FAMILIES] + [(f, "bridge") for f in BRIDGE_FAMILIES]


__all__ = ["HOOKED_FAMILIES", "BRIDGE_FAMILIES", "hooked_config", "folds_norms",
           "tiny_family_hooked", "tiny_family_hf", "tiny_family_bridge", "tiny_family",
           "family_members", "family_summary"]
