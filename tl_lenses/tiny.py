"""Tiny random-weight models for tests and examples, on both TransformerLens backends.

Each tiny model is a HF model (Llama: RMSNorm, rotary, MHA or GQA; GPT-2: LayerNorm, learned
positions, MHA) with random weights, norms and biases included, so that a lens that
normalises with the wrong statistics shows up in tests. ``tiny_pair`` converts one HF model
into both a HookedTransformer and a TransformerBridge, so the two backends can be compared
number for number. The tokenizer is byte-level: every byte is one token, no download needed.
"""

from __future__ import annotations

from typing import Literal

import torch

from tl_lenses._compat import DEFAULT_BACKEND, hooked_classes
from tl_lenses.models import (
    PROCESSING,
    bridge_from_hf,
    hooked_from_hf,
    llama_config,
    to_device_and_dtype,
)

Arch = Literal["llama", "llama-gqa", "gpt2"]
N_BYTES = 256


def _byte_alphabet() -> list[str]:
    """The printable stand-in for each byte 0..255 that byte-level BPE uses (GPT-2's map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(N_BYTES)]


def byte_tokenizer():
    """A byte-level fast tokenizer: 256 byte tokens plus ``<|endoftext|>`` (id 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(_byte_alphabet())}
    vocab["<|endoftext|>"] = N_BYTES
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Give norm weights and biases non-trivial values (HF initialises them to 1 and 0)."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1 and ("norm" in name or ".ln_" in name) and "bias" not in name:
                param.copy_(1 + 0.3 * noise)
            elif param.dim() == 1:
                param.copy_(0.1 * noise)


def tiny_hf_model(
    arch: Arch = "llama-gqa", *, n_layers: int = 3, d_model: int = 32, n_ctx: int = 64,
    seed: int = 0, unembed_scale: float = 1.0,
):
    """A random HF causal LM over the byte vocabulary, in float32 and eval mode.

    ``unembed_scale`` multiplies the unembedding (Llama only: GPT-2 ties it to the
    embedding). At 1 the random model's next-token distributions are nearly uniform
    (entropy ~5.5 of ln 257 nats); at ~30 they are as peaked as a trained model's (~2.4
    nats), which tests that learn the model's predictions from its own samples need.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = N_BYTES + 1
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers, n_head=4,
            activation_function="gelu_new", tie_word_embeddings=True,
        )
        model = GPT2LMHeadModel(config)
    elif arch in ("llama", "llama-gqa"):
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
            num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2 if arch == "llama-gqa" else 4,
            max_position_embeddings=n_ctx, tie_word_embeddings=False, rms_norm_eps=1e-5,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"arch must be 'llama', 'llama-gqa' or 'gpt2', got {arch!r}")
    if unembed_scale != 1 and arch == "gpt2":
        raise ValueError("unembed_scale needs an untied unembedding ('llama' or 'llama-gqa')")
    _randomise(model, seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(unembed_scale)
    return model.float().eval()


def gpt2_config(hf_config):
    """A HookedTransformerConfig matching a HF GPT-2 config (TL 3.x only)."""
    HookedTransformerConfig = hooked_classes()[1]

    return HookedTransformerConfig(
        d_model=hf_config.n_embd, d_head=hf_config.n_embd // hf_config.n_head,
        n_heads=hf_config.n_head, d_mlp=4 * hf_config.n_embd, n_layers=hf_config.n_layer,
        n_ctx=hf_config.n_positions, eps=hf_config.layer_norm_epsilon,
        d_vocab=hf_config.vocab_size, act_fn=hf_config.activation_function,
        normalization_type="LN", positional_embedding_type="standard",
        default_prepend_bos=False, original_architecture="GPT2LMHeadModel",
        model_name="tiny-gpt2", device="cpu",  # TL's default is "cuda" when CUDA exists
    )


def _architecture(arch: Arch) -> str:
    return "GPT2LMHeadModel" if arch == "gpt2" else "LlamaForCausalLM"


def tiny_hooked(arch: Arch = "llama-gqa", *, device="cpu", dtype=torch.float32, **kwargs):
    """A tiny random HookedTransformer with the byte tokenizer, on ``device`` in ``dtype``.

    TL 3.x only. The weights are drawn and processed on the CPU in float32, then moved, so
    every device and dtype gets the same model (to rounding).
    """
    hf_model = tiny_hf_model(arch, **kwargs)
    cfg = gpt2_config(hf_model.config) if arch == "gpt2" else llama_config(hf_model.config)
    return to_device_and_dtype(hooked_from_hf(hf_model, byte_tokenizer(), cfg), device, dtype)


def tiny_bridge(arch: Arch = "llama-gqa", *, device="cpu", dtype=torch.float32, **kwargs):
    """A tiny random TransformerBridge (compatibility mode) with the byte tokenizer.

    Built on ``device`` in ``dtype``: the HF model is moved first, then wrapped (TL 3.9's
    Llama bridge ``.to`` leaves the gated-MLP weights behind).
    """
    hf_model = tiny_hf_model(arch, **kwargs).to(device=device, dtype=dtype)
    return bridge_from_hf(hf_model, byte_tokenizer(), _architecture(arch))


def tiny_default(arch: Arch = "llama-gqa", **kwargs):
    """A tiny random model on this TransformerLens' default backend.

    The HookedTransformer of :func:`tiny_hooked` under TL 3.x, the TransformerBridge of
    :func:`tiny_bridge` (same weights) under TL 4.x, which has no HookedTransformer; for code
    and tests that work on either. Takes the same keywords as both.
    """
    return (tiny_hooked if DEFAULT_BACKEND == "hooked" else tiny_bridge)(arch, **kwargs)


def tiny_pair(arch: Arch = "llama-gqa", **kwargs):
    """The same tiny random weights as ``(HookedTransformer, TransformerBridge)`` (TL 3.x only).

    ``device`` and ``dtype`` keywords go to both (default: the CPU, float32).
    """
    return tiny_hooked(arch, **kwargs), tiny_bridge(arch, **kwargs)


__all__ = ["byte_tokenizer", "tiny_hf_model", "tiny_hooked", "tiny_bridge", "tiny_default",
           "tiny_pair", "PROCESSING"]


def tiny_spread(arch: Arch = "llama-gqa", backend: str | None = None,
                devices=("cuda:0", "cuda:1"), **kwargs):
    """A tiny random model split over two devices the way TransformerLens splits one.

    ``backend="hooked"`` (TL 3.x): ``cfg.n_devices = 2`` with the blocks placed where
    ``HookedTransformer.forward`` moves the residual for them
    (``get_device_for_block_index``): the embeddings and the first half of the blocks on
    ``cfg.device``, the rest with the final norm and unembedding on the next CUDA device.
    ``devices`` must then be two consecutive CUDA devices (or twice ``"cpu"``, where TL
    keeps everything on the CPU).

    ``backend="bridge"``: the HF model dispatched by accelerate over an explicit all-device
    map (embeddings and the first half of the layers on ``devices[0]``, the rest with the
    final norm and ``lm_head`` on ``devices[1]``; Llama only, GPT-2 ties ``lm_head`` to the
    embedding), then wrapped in compatibility mode. Twice ``"cpu"`` attaches accelerate's
    hooks all the same (a check of this code path on a CPU-only machine).

    Args:
        arch: ``"llama"`` or ``"llama-gqa"`` (either backend) or ``"gpt2"`` (hooked only).
        backend: ``"hooked"`` or ``"bridge"`` (default: this TransformerLens' default).
        devices: the two devices.
        **kwargs: as :func:`tiny_hf_model`.

    Returns:
        The split model (same weights as ``tiny_hooked``/``tiny_bridge`` with ``kwargs``).

    Raises:
        ValueError: a hooked split over devices that are not consecutive CUDA devices, or
            a GPT-2 Bridge.
    """
    first, second = (torch.device(d) for d in devices)
    backend = backend or DEFAULT_BACKEND
    if backend == "hooked":
        return _hooked_split(arch, first, second, **kwargs)
    if arch == "gpt2":
        raise ValueError("a GPT-2 Bridge cannot be split: lm_head shares the embedding")
    from accelerate import dispatch_model

    hf_model = tiny_hf_model(arch, **kwargs)
    n = hf_model.config.num_hidden_layers
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first,
                  "model.norm": second, "lm_head": second}
    device_map.update({f"model.layers.{i}": first if i < n // 2 else second for i in range(n)})
    hf_model = dispatch_model(hf_model, device_map={k: str(v) for k, v in device_map.items()},
                              main_device=str(first), force_hooks=True)
    if first.type == "cpu" and second.type == "cpu":
        # The weights stay real, but TL 4.x reads any "cpu" entry of hf_device_map as
        # offload and refuses compatibility mode: the CPU self-check hides the map.
        del hf_model.hf_device_map
    return bridge_from_hf(hf_model, byte_tokenizer(), _architecture(arch))


def _hooked_split(arch: Arch, first: torch.device, second: torch.device, **kwargs):
    from transformer_lens.utilities.multi_gpu import get_device_for_block_index

    cuda_pair = first.type == second.type == "cuda" and (second.index or 0) == \
        (first.index or 0) + 1
    if not (cuda_pair or first.type == second.type == "cpu"):
        raise ValueError(f"a HookedTransformer splits over consecutive CUDA devices, got "
                         f"{first} and {second}")
    model = tiny_hooked(arch, **kwargs)
    model.cfg.n_devices, model.cfg.device = 2, str(first)
    n = model.cfg.n_layers
    for i, block in enumerate(model.blocks):
        block.to(get_device_for_block_index(i, model.cfg))
    for module in (model.embed, getattr(model, "pos_embed", None)):
        if module is not None:
            module.to(first)
    last = get_device_for_block_index(n - 1, model.cfg)
    for module in (getattr(model, "ln_final", None), model.unembed):
        if module is not None:
            module.to(last)
    return model
