"""Hugging Face's names for tinyformer's parameters: BertModel's and LlamaForCausalLM's (LlamaModel's with prefix "").

One table per architecture, read by loading (tinyformer.convert), export (tinyformer.export) and the adapters of
tinyformer.finetune (PEFT names its LoRA tensors after the modules they adapt), so the three agree by construction.
"""
from __future__ import annotations


def block_index(name: str) -> tuple[int, str]:
    """'decoder.blocks.3.attn.wq.weight' -> (3, 'attn.wq.weight')."""
    parts = name.split(".")
    return int(parts[2]), ".".join(parts[3:])

# --- BERT: BertModel (BertFor* checkpoints add "bert.")
BERT_BLOCK = {
    "attn.wq": "attention.self.query", "attn.wk": "attention.self.key", "attn.wv": "attention.self.value",
    "attn.wo": "attention.output.dense", "norm1": "attention.output.LayerNorm",
    "mlp.w1": "intermediate.dense", "mlp.w2": "output.dense", "norm2": "output.LayerNorm",
}

BERT_MLM = {  # BertForMaskedLM / BertForPreTraining's token head (its decoder weight is the word embeddings)
    "mlm_dense.weight": "cls.predictions.transform.dense.weight",
    "mlm_dense.bias": "cls.predictions.transform.dense.bias",
    "mlm_norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_norm.bias": "cls.predictions.transform.LayerNorm.bias", "mlm_bias": "cls.predictions.bias",
}


def bert_name(ours: str) -> str:
    """Our parameter name -> BertModel's (BertForMaskedLM's for the masked-LM head)."""
    if ours in BERT_MLM:
        return BERT_MLM[ours]
    if ours == "wte":
        return "embeddings.word_embeddings.weight"
    if ours == "encoder.wpe":
        return "embeddings.position_embeddings.weight"
    if ours == "encoder.wtt":
        return "embeddings.token_type_embeddings.weight"
    if ours.startswith("encoder.embed_norm."):
        return "embeddings.LayerNorm." + ours.rsplit(".", 1)[1]
    i, rest = block_index(ours)
    module, leaf = rest.rsplit(".", 1)
    return f"encoder.layer.{i}.{BERT_BLOCK[module]}.{leaf}"


# --- Llama: LlamaForCausalLM ("model." prefix + lm_head) or LlamaModel
LLAMA_BLOCK = {
    "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj", "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj",
    "norm1": "input_layernorm", "norm2": "post_attention_layernorm",
}


def llama_name(ours: str, prefix: str) -> str:
    """Our parameter name -> LlamaForCausalLM's (prefix "model.") or LlamaModel's (prefix "")."""
    if ours == "wte":
        return prefix + "embed_tokens.weight"
    if ours == "lm_head":
        return "lm_head.weight"
    if ours == "decoder.final_norm.weight":
        return prefix + "norm.weight"
    i, rest = block_index(ours)
    module, leaf = rest.rsplit(".", 1)
    return f"{prefix}layers.{i}.{LLAMA_BLOCK[module]}.{leaf}"
