"""A tiny random Qwen2 written as a GGUF file (float32 tensors, a byte-level BPE tokenizer), as
llama.cpp's converter names things: what ``load_model(path.gguf)`` converts in about a second."""

from __future__ import annotations

import numpy as np
import torch


def _byte_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())  # 256 tokens: every byte, GPT-2's printable form


def tiny_qwen2_gguf(path, seed: int = 0, chat_template: str | None = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"):
    """Write a 2-layer Qwen2 GGUF at ``path``; returns the HF model it holds (float32, eval)."""
    import gguf
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokens = _byte_tokens() + ["he", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # one merge: h + e
    config = Qwen2Config(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, bos_token_id=257, eos_token_id=259, initializer_range=0.2)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.normal_(1.0, 0.3)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 257 + [3] * 3)
    w.add_token_merges(["h e"])
    w.add_bos_token_id(257)
    w.add_eos_token_id(259)
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(config.num_hidden_layers):
        for hf, cpp in parts.items():
            for kind in ("weight", "bias"):
                names[f"model.layers.{i}.{hf}.{kind}"] = f"blk.{i}.{cpp}.{kind}"
    for name, p in model.state_dict().items():
        w.add_tensor(names[name], p.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model
