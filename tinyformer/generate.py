"""Autoregressive generation with a KV cache: greedy, temperature, top-k and nucleus (top-p) sampling, EOS stops,
left-padded batches; beam search for the encoder-decoder.

References: Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration" (top-p); Fan et al. 2018 (top-k);
Wu et al. 2016, GNMT (beam search with length normalisation); nanoGPT's `generate` (sliding context window once the
sequence is longer than the model's context).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from tinyformer import ops
from tinyformer.model import Linear


def _check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D LongTensor (batch, time)")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    V = model.config.vocab_size
    if eos_token_id is not None and not (0 <= eos_token_id < V):
        raise ValueError(f"eos_token_id {eos_token_id} is outside the vocabulary 0..{V - 1}")


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token_id: Optional[int] = None, attention_mask=None, generator=None,
             on_token=None):
    """Decoder-only generation: returns prompt + new tokens (B, T + n). With a left-padded batch pass
    `attention_mask` (B, T), 1 = real token. Rows that hit EOS are filled with EOS until every row is done.
    `on_token(ids (B,))` is called with each new token as it is chosen (for streaming).
    Past the model's context (max_seq_len), the model sees the last max_seq_len tokens, as nanoGPT does."""
    _check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id)
    was_training = model.training
    model.eval()
    B, T0 = input_ids.shape
    ctx = model.config.max_seq_len
    if T0 > ctx:  # keep the prompt's tail, as nanoGPT does
        input_ids = input_ids[:, -ctx:]
    mask = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, T0):
            raise ValueError(f"attention_mask must have shape {(B, T0)}, got {tuple(attention_mask.shape)}")
        mask = attention_mask.to(device=input_ids.device, dtype=torch.long)[:, -input_ids.shape[1]:]
    out = [input_ids]
    full = input_ids
    cache = model.new_cache(B, min(ctx, input_ids.shape[1] + max_new_tokens))  # no bigger than needed
    logits = model(input_ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]  # (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    fast = B == 1 and mask is None and numpy_decodes(model)
    numpy_step = NumpyDecodeStep(model, cache) if fast else None  # batch-1 fp32 on CPU: decode steps on numpy
    with ops.cpu_decode(fast):
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(done, eos_token_id)
                done |= nxt == eos_token_id
            out.append(nxt[:, None])
            if on_token is not None:
                on_token(nxt)
            full = torch.cat((full, nxt[:, None]), dim=1)
            if mask is not None:
                mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            if cache.length < cache.max_len and numpy_step is not None:
                logits = numpy_step(int(nxt))  # (1, V)
            elif cache.length < cache.max_len:  # the new token fits in the cache: one cheap step
                logits = model(nxt[:, None], attention_mask=mask, cache=cache)[:, -1]
            else:  # the context is full: slide the window and recompute it (no cache), like nanoGPT
                window = full[:, -ctx:]
                window_mask = mask[:, -ctx:] if mask is not None else None
                logits = model(window, attention_mask=window_mask, last_only=True)[:, -1]
    model.train(was_training)
    result = torch.cat(out, dim=1)
    if result.shape[1] < input_ids.shape[1] + max_new_tokens and eos_token_id is not None:  # all rows stopped early
        pad = result.new_full((B, input_ids.shape[1] + max_new_tokens - result.shape[1]), eos_token_id)
        result = torch.cat((result, pad), dim=1)
    return result


def numpy_decodes(model) -> bool:
    """Whether `NumpyDecodeStep` serves this model: a decoder-only model (no token types, no embedding norm), fp32
    weights on CPU, the torch backend, no quantized linears (torch's int8/int4 kernels need torch's threads)."""
    from tinyformer.model import DecoderLM
    from tinyformer.qlinear import QuantLinear
    p, stack = next(model.parameters()), getattr(model, "decoder", None)
    return (isinstance(model, DecoderLM) and stack.wtt is None and stack.embed_norm is None
            and p.device.type == "cpu" and p.dtype == torch.float32 and ops.get_backend(p.device) == "torch"
            and not any(isinstance(m, QuantLinear) for m in model.modules()))


class NumpyDecodeStep:
    """One decode step of a batch-1 fp32 `DecoderLM` on numpy: the math of model.py's Stack/Block/Attention/
    FeedForward for a single new position, on numpy views of the model's own weights and KV cache (no copies).

    Why: at batch 1 a decode step is ~120 matrix-vector products plus ~60 small ops per layer, each on a vector of a
    few hundred floats. On 2 CPU cores torch spends 3-15 us of dispatch on each small op and 10 us in F.linear's GEMV
    for every 1 us of numpy's; for SmolLM2-135M the small ops alone took ~10 ms a token through the modules, which is
    as long as streaming a third of the weights. Here each layer is ~40 numpy calls, and every product is OpenBLAS's
    sgemv on the (in, out)-contiguous weights `TransformerBase.pack_` lays out (unpacked weights work too, slower).
    A linear that is not a float `Linear` (a factored `LowRankLinear`) runs its own forward on a torch view.
    `generate` uses it inside `ops.cpu_decode` (torch on one thread while OpenBLAS has both cores) and tests check it
    against the modules' forward. The cache's `length` advances as in `DecoderLM.forward`."""

    def __init__(self, model, cache):
        from tinyformer.model import _one_buffer
        stack = model.decoder
        cfg = model.config
        self.cache, self.cfg = cache, cfg
        self.wte = model.wte.detach().numpy()  # (V, C)
        head = model.lm_head if model.lm_head is not None else model.wte
        self.head = head.detach().T.numpy()  # (C, V)
        self.wpe = stack.wpe.detach().numpy() if stack.wpe is not None else None
        self.pe = stack.pe.numpy() if cfg.pos == "sinusoidal" else None
        if cfg.pos == "rope":
            self.cos, self.sin = stack.rope_cos.numpy(), stack.rope_sin.numpy()  # (P, Dh/2)
        self.final_norm = self._norm(stack.final_norm) if stack.final_norm is not None else None
        self.layers = []
        for i, b in enumerate(stack.blocks):
            a, f = b.attn, b.mlp
            proj = [a.wq, a.wk, a.wv]
            w = _one_buffer([m.weight for m in proj]) if all(type(m) is Linear for m in proj) else None
            qkv = (self._linear_of(w, [m.bias for m in proj]) if w is not None
                   else self._concat([self._linear(m) for m in proj]))
            if f.w3 is not None:
                w = (_one_buffer([f.w1.weight, f.w3.weight]) if type(f.w1) is Linear and type(f.w3) is Linear
                     else None)
                up = (self._linear_of(w, [f.w1.bias, f.w3.bias]) if w is not None
                      else self._concat([self._linear(f.w1), self._linear(f.w3)]))
            else:
                up = self._linear(f.w1)
            self.layers.append(dict(
                pre=b.pre, norm1=self._norm(b.norm1), norm2=self._norm(b.norm2), qkv=qkv, wo=self._linear(a.wo),
                up=up, down=self._linear(f.w2), act=f.act, H=a.n_head, Hkv=a.n_kv_head, D=a.head_dim, rope=a.rope,
                K=cache.k[i].numpy()[0], V=cache.v[i].numpy()[0]))  # (Hkv, max_len, Dh) views of the cache

    # -- the pieces, each a function of one row (numpy) -----------------------------------------------------------
    @staticmethod
    def _norm(norm):
        w = norm.weight.detach().numpy()
        b = norm.bias.detach().numpy() if norm.bias is not None else None
        eps = norm.eps
        if norm.kind == "rmsnorm":
            return lambda x: x * (w / math.sqrt(float(x @ x) / x.size + eps))
        def layer_norm(x):
            x = x - x.mean()
            y = x * (w / math.sqrt(float(x @ x) / x.size + eps))  # biased variance, as LayerNorm defines it
            return y + b if b is not None else y
        return layer_norm

    @staticmethod
    def _linear_of(weight, biases):
        """x (K,) @ weight (N, K)^T + bias, weight a transposed view of an (in, out)-contiguous tensor or not."""
        wt = weight.detach().T.numpy()  # (K, N)
        b = None if biases[0] is None else torch.cat([t.detach() for t in biases]).numpy()
        return (lambda x: x @ wt) if b is None else (lambda x: x @ wt + b)

    @classmethod
    def _linear(cls, m):
        if type(m) is Linear:
            return cls._linear_of(m.weight, [m.bias])
        return lambda x: m(torch.from_numpy(x)[None]).numpy()[0]  # any other linear: its own forward, (1, K) -> (K,)

    @staticmethod
    def _concat(fs):
        return lambda x: np.concatenate([f(x) for f in fs])

    # -- the step ----------------------------------------------------------------------------------------------------
    def __call__(self, token: int) -> torch.Tensor:
        """The logits (1, V) after appending `token` at position cache.length."""
        cache, cfg = self.cache, self.cfg
        pos = cache.length
        if pos >= cache.max_len or pos >= cfg.max_seq_len:
            raise ValueError(f"position {pos} is beyond the cache ({cache.max_len}) or max_seq_len={cfg.max_seq_len}")
        x, cos, sin = self.wte[token].copy(), None, None  # (C,)
        if self.wpe is not None:
            x += self.wpe[pos]
        elif self.pe is not None:
            x = x * math.sqrt(cfg.d_model) + self.pe[pos]
        else:
            cos, sin = self.cos[pos], self.sin[pos]  # (Dh/2,)
        for L in self.layers:
            x = self._sublayer(x, L, L["norm1"], lambda h: self._attention(h, L, pos, cos, sin))
            x = self._sublayer(x, L, L["norm2"], lambda h: self._feed_forward(h, L))
        if self.final_norm is not None:
            x = self.final_norm(x)
        cache.length += 1
        return torch.from_numpy(x @ self.head)[None]  # (C,) @ (C, V) -> (1, V)

    @staticmethod
    def _sublayer(x, L, norm, f):
        return x + f(norm(x)) if L["pre"] else norm(x + f(x))

    @staticmethod
    def _attention(h, L, pos, cos, sin):
        H, Hkv, D = L["H"], L["Hkv"], L["D"]
        qkv = L["qkv"](h)  # (H*Dh + 2*Hkv*Dh,)
        qk = qkv[:(H + Hkv) * D].reshape(H + Hkv, D)  # q heads then k heads: rotated together
        if L["rope"]:
            x1, x2 = qk[:, :D // 2], qk[:, D // 2:]  # (H+Hkv, Dh/2) each
            qk = np.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=1)  # (H+Hkv, Dh)
        K, V = L["K"], L["V"]  # (Hkv, max_len, Dh)
        K[:, pos] = qk[H:]
        V[:, pos] = qkv[(H + Hkv) * D:].reshape(Hkv, D)
        q = qk[:H].reshape(Hkv, H // Hkv, D)  # (Hkv, G, Dh): the G query heads that share each k/v head
        s = q @ K[:, :pos + 1].transpose(0, 2, 1)  # (Hkv, G, Dh) @ (Hkv, Dh, S) -> (Hkv, G, S)
        s *= D ** -0.5
        s -= s.max(-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(-1, keepdims=True)
        y = s @ V[:, :pos + 1]  # (Hkv, G, S) @ (Hkv, S, Dh) -> (Hkv, G, Dh)
        return L["wo"](y.reshape(H * D))  # heads concatenated in q's order -> (C,)

    @staticmethod
    def _feed_forward(h, L):
        a = L["up"](h)  # (F,), or (2F,) = gate then up for SwiGLU
        act = L["act"]
        if act == "swiglu":
            gate, up = np.split(a, 2)
            a = gate * (0.5 + 0.5 * np.tanh(0.5 * gate)) * up  # silu(gate) * up; sigmoid via tanh: no overflow
        elif act == "relu":
            a = np.maximum(a, 0.0)
        else:  # numpy has no erf: torch's GELU on a view
            a = F.gelu(torch.from_numpy(a), approximate="tanh" if act == "gelu_tanh" else "none").numpy()
        return L["down"](a)


@torch.no_grad()
def generate_seq2seq(model, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k=None, top_p=None,
                     eos_token_id=None, attention_mask=None, generator=None):
    """Encoder-decoder sampling/greedy: returns the decoder sequence (B, 1 + n), starting with
    config.decoder_start_token_id."""
    _check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id)
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - 1)
    was_training = model.training
    model.eval()
    B = input_ids.shape[0]
    memory = model.encode(input_ids, attention_mask)  # (B, S, C)
    cache = model.new_cache(B, max_new_tokens + 1)
    tok = input_ids.new_full((B, 1), model.config.decoder_start_token_id)
    out = [tok]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = model.decode(tok, memory, attention_mask, cache)[:, -1]  # (B, V)
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = nxt.masked_fill(done, eos_token_id)
            done |= nxt == eos_token_id
        tok = nxt[:, None]
        out.append(tok)
        if bool(done.all()):
            break
    model.train(was_training)
    return torch.cat(out, dim=1)


@torch.no_grad()
def beam_search(model, input_ids, max_new_tokens: int, num_beams: int, eos_token_id: Optional[int] = None,
                attention_mask=None, length_penalty: float = 1.0):
    """Encoder-decoder beam search. Each beam's score is its summed log-probability; a finished beam (it emitted EOS)
    keeps its score and stays finished. The best beam maximises score / length ** length_penalty (GNMT-style
    normalisation by the number of generated tokens). Returns (B, 1 + n), EOS-padded after a beam ends."""
    _check_args(model, input_ids, max_new_tokens, 1.0, None, None, eos_token_id)
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - 1)
    was_training = model.training
    model.eval()
    B, K, V = input_ids.shape[0], num_beams, model.config.vocab_size
    dev = input_ids.device
    memory = model.encode(input_ids, attention_mask)  # (B, S, C)
    memory = memory.repeat_interleave(K, dim=0)  # (B*K, S, C)
    mask = attention_mask.repeat_interleave(K, dim=0) if attention_mask is not None else None  # (B*K, S)
    cache = model.new_cache(B * K, max_new_tokens + 1)
    seqs = input_ids.new_full((B * K, 1), model.config.decoder_start_token_id)  # (B*K, 1)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: only the first may expand at step one
    lengths = torch.zeros(B, K, device=dev)
    done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    for _ in range(max_new_tokens):
        logp = model.decode(seqs[:, -1:], memory, mask, cache)[:, -1].float().log_softmax(-1)  # (B*K, V)
        logp = logp.view(B, K, V)
        if eos_token_id is not None:  # finished beams may only "emit" EOS again, at no cost
            finished = torch.full_like(logp, float("-inf"))
            finished[..., eos_token_id] = 0.0
            logp = torch.where(done[..., None], finished, logp)
        cand = (scores[..., None] + logp).view(B, K * V)  # (B, K*V)
        scores, flat = cand.topk(K, dim=-1)  # (B, K)
        beam, tok = flat // V, flat % V  # (B, K) each
        rows = (beam + torch.arange(B, device=dev)[:, None] * K).view(-1)  # (B*K,): source row of each new beam
        cache.reorder(rows)
        seqs = torch.cat((seqs[rows], tok.view(-1, 1)), dim=1)
        prev_done = done.gather(1, beam)
        lengths = lengths.gather(1, beam) + (~prev_done).float()
        done = prev_done | (tok == eos_token_id) if eos_token_id is not None else prev_done
        if bool(done.all()):
            break
    best = (scores / lengths.clamp(min=1) ** length_penalty).argmax(-1)  # (B,)
    model.train(was_training)
    return seqs.view(B, K, -1)[torch.arange(B, device=dev), best]  # (B, 1 + n)


def apply_chat_template(model, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render `messages` ([{"role": "user", "content": "..."}, ...]) with the model's Jinja chat template, the way
    Hugging Face tokenizers do (sandboxed Jinja, trim_blocks + lstrip_blocks, bos/eos token strings defined)."""
    if not getattr(model, "chat_template", None):
        raise ValueError("this model has no chat template")
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    tok = model.tokenizer
    special = {f"{k}_token": tok.id_to_token(i) if tok is not None and i is not None else ""
               for k, i in (("bos", model.bos_token_id), ("eos", model.eos_token_id))}
    return env.from_string(model.chat_template).render(messages=messages,
                                                       add_generation_prompt=add_generation_prompt, **special)
