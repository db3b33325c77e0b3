"""load_model: HF folders and GGUF files on both backends give the HF model's logits."""

from __future__ import annotations

import os

import pytest
import torch

from tl_lenses.models import load_model
from tl_lenses.tiny import N_BYTES, _byte_alphabet, byte_tokenizer, tiny_hf_model
from tl_lenses.tiny_families import tiny_family_hf

TOKENS = torch.tensor([[97, 98, 32, 99, 100, 32, 101, 102, 10, 65]])


def hf_logits(hf_model) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(TOKENS).logits


def save_folder(hf_model, folder):
    hf_model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gemma2", "pythia", "phi"])
@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_hf_folder_gives_the_hf_logits(family, backend, tmp_path):
    hf_model = tiny_family_hf(family)
    # "llama" in the folder's path must not make TL read a Qwen folder as Llama.
    folder = save_folder(hf_model, tmp_path / f"llama-named-{family}")
    # TL 3.9 builds Gemma-2 only from hub names, and reads Phi's partial_rotary_factor where
    # transformers 5 no longer keeps it: a clear refusal pointing at the Bridge.
    if backend == "hooked" and family in ("gemma2", "phi"):
        with pytest.raises(NotImplementedError, match="backend='bridge'"):
            load_model(folder, backend=backend)
        return
    model = load_model(folder, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), hf_logits(hf_model), atol=1e-4, rtol=1e-4)
    assert model.cfg.normalization_type in ("LNPre", "RMSPre", "RMS", "LN")


def _permute(weight, n_head: int):
    """llama.cpp's q/k row order (the inverse of what transformers undoes on load)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_llama_gguf(hf_model, path) -> None:
    """A float32 llama GGUF of ``hf_model`` with the byte vocabulary, written by ``gguf``."""
    gguf = pytest.importorskip("gguf")
    c = hf_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(float((getattr(c, "rope_parameters", None) or {})
                                    .get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(_byte_alphabet() + ["<|endoftext|>"])
    writer.add_token_types([1] * N_BYTES + [3])
    writer.add_token_scores([0.0] * (N_BYTES + 1))
    for setter in (writer.add_eos_token_id, writer.add_bos_token_id, writer.add_pad_token_id):
        setter(N_BYTES)
    writer.add_add_bos_token(False)
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    n_head, n_kv = c.num_attention_heads, c.num_key_value_heads
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight",
                          _permute(sd[p + "self_attn.q_proj.weight"], n_head))
        writer.add_tensor(f"blk.{i}.attn_k.weight",
                          _permute(sd[p + "self_attn.k_proj.weight"], n_kv))
        for ours, theirs in names.items():
            writer.add_tensor(f"blk.{i}.{ours}.weight", sd[f"{p}{theirs}.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_gguf_file_gives_the_hf_logits(backend, tmp_path):
    hf_model = tiny_hf_model("llama-gqa")
    path = tmp_path / "tiny-llama.gguf"
    write_llama_gguf(hf_model, path)
    model = load_model(path, backend=backend)
    assert model.to_tokens("ab cd ef\nA", prepend_bos=False).tolist() == TOKENS.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), hf_logits(hf_model), atol=1e-4, rtol=1e-4)


def test_dtype_by_name(tmp_path):
    folder = save_folder(tiny_family_hf("llama"), tmp_path / "m")
    model = load_model(str(folder), backend="bridge", dtype="float64")
    assert model.W_U.dtype == torch.float64


def test_bad_paths_and_arguments_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="name_or_path .*config.json"):
        load_model(empty)
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="name_or_path .*neither .*GGUF"):
        load_model(text)
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="name_or_path 'no-such-model-xyz'"):
        load_model("no-such-model-xyz")
    with pytest.raises(ValueError, match="backend"):
        load_model(empty, backend="jax")
    with pytest.raises(ValueError, match="dtype"):
        load_model(empty, dtype="int8")
    with pytest.raises(TypeError, match="name_or_path"):
        load_model(3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes.txt"]


def test_tl_name_offline_is_a_clear_error(monkeypatch):
    """A name TL knows but the Hub cannot serve: the error names it and the offline state."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="name_or_path 'gpt2'.*HF_HUB_OFFLINE"):
        load_model("gpt2")
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("command", [
    ["logit-lens", "ab cd"], ["dla", "ab cd", "--answer", "a", "--wrong", "b"],
    ["attribute-lens", "ab cd"], ["patchscope", "identity", "ab cd"],
    ["train-tuned", "--out", "x"], ["eval-lens", "x"],
])
def test_every_subcommand_takes_the_model_arguments(command):
    from tl_lenses.cli import build_parser

    args = build_parser().parse_args([*command, "--model", "some/folder", "--device", "cuda:1",
                                      "--dtype", "bfloat16", "--backend", "bridge"])
    assert (args.model, args.device, args.dtype, args.backend) == (
        "some/folder", "cuda:1", "bfloat16", "bridge")


def test_command_line_loads_a_saved_folder(tmp_path, capsys):
    from tl_lenses.cli import main

    folder = save_folder(tiny_family_hf("qwen2"), tmp_path / "qwen")
    out = tmp_path / "lens.html"
    assert main(["logit-lens", "ab cd", "--model", str(folder), "--out", str(out)]) == 0
    assert out.exists()
    assert main(["logit-lens", "ab cd", "--model", str(tmp_path / "nope.gguf")]) == 2
    assert "name_or_path" in capsys.readouterr().err
