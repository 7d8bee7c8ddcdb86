"""Autoregressive generation with a KV cache: greedy, temperature, top-k and nucleus (top-p) sampling, EOS stops,
left-padded batches, a sliding window past the context; beam search for the encoder-decoder.

Every step runs the model's own forward (`tinyformer.model`). `compile=True` runs a decode step through
torch.compile of that same forward (gpt-fast's way: the KV cache is preallocated, so a step has the same shapes but
for the cached length, which is compiled as a dynamic size once).

References: Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration" (top-p); Fan et al. 2018 (top-k);
Wu et al. 2016, GNMT (beam search with length normalisation); nanoGPT's `generate` (sliding context window once the
sequence is longer than the model's context); pytorch-labs/gpt-fast (a compiled decode step over a static cache).
"""
from __future__ import annotations

import itertools
import types
import warnings
import weakref
from typing import Optional

import torch

from tinyformer import ops


def check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id):
    """A ValueError naming the first bad generation argument, before any work."""
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


@torch.inference_mode()
@ops.frozen_weights()  # no weight changes until the loop ends: each product finds its layout by identity
def generate(model, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token_id: Optional[int] = None, attention_mask=None, generator=None,
             on_token=None, compile: bool = False):
    """Decoder-only generation: returns prompt + new tokens (B, T + n). With a left-padded batch pass
    `attention_mask` (B, T), 1 = real token. Rows that hit EOS are filled with EOS until every row is done.
    `on_token(ids (B,))` is called with each new token as it is chosen (for streaming).
    Past the model's context (max_seq_len), the model sees the last max_seq_len tokens, as nanoGPT does.
    compile: decode steps run the model's forward through torch.compile (`compiled`): faster per token after a
    one-off compile (26-41 s for SmolLM2-135M on 2 cores), so worth it for long generations or many calls (the
    compiled code is kept per model)."""
    check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id)
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
    cache = model.new_cache(B, min(ctx, input_ids.shape[1] + max_new_tokens))  # no bigger than needed
    step = compiled(model) if compile and max_new_tokens > 1 else model
    logits = model(input_ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]  # (B, V): the prefill
    out, full = [input_ids], input_ids
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
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
        if i == max_new_tokens - 1 or bool(done.all()):
            break
        if cache.length < cache.max_len:  # the new token fits in the cache: one cheap step
            logits = step(nxt[:, None], attention_mask=mask, cache=cache)[:, -1]
        else:  # the context is full: slide the window and recompute it (no cache), like nanoGPT
            window_mask = mask[:, -ctx:] if mask is not None else None
            logits = model(full[:, -ctx:], attention_mask=window_mask, last_only=True)[:, -1]
    model.train(was_training)
    result = torch.cat(out, dim=1)
    if result.shape[1] < input_ids.shape[1] + max_new_tokens and eos_token_id is not None:  # all rows stopped early
        pad = result.new_full((B, input_ids.shape[1] + max_new_tokens - result.shape[1]), eos_token_id)
        result = torch.cat((result, pad), dim=1)
    return result


class compiled:
    """`model` with its forward compiled by torch.compile, for decode steps. Inductor compiles it with frozen weights
    (`torch._inductor.config.freezing`): the weights are constants of the compiled code, so every layout the dispatch
    computes from them (stacked q/k/v and gate/up, torch's int4 and int8 packs, oneDNN's blocked bf16) is computed
    once, at compile time. The cached length is a dynamic size, so one compile serves every step. The compiled code
    is kept per model and reused while the model's weights stay as they were; where they changed (an optimizer step,
    `load_state_dict`, `.to()`), it compiles afresh. Where compiling fails (Inductor needs a C++ compiler, among
    other things) it warns once and runs the model as it is."""

    def __init__(self, model):
        import torch._inductor.config as inductor_config  # Inductor loads with torch.compile's first use

        self.model, self.freezing, self.stamp = model, inductor_config.patch(freezing=True), _weights_stamp(model)
        hit = _compiled.get(model)
        if hit is None or hit[0] != self.stamp:
            hit = _compiled[model] = (self.stamp, torch.compile(_fresh(_step), dynamic=True))
        self.fn = hit[1]

    def __call__(self, *args, **kwargs):
        if self.fn is not None:
            try:
                with self.freezing:
                    return self.fn(self.model, *args, **kwargs)
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"generate(compile=True): torch.compile failed ({type(e).__name__}: {str(e)[:200]}); "
                              f"decoding without it", RuntimeWarning, stacklevel=2)
                self.fn, _compiled[self.model] = None, (self.stamp, None)
        return self.model(*args, **kwargs)


_compiled = weakref.WeakKeyDictionary()  # model -> (its weights' stamp, its compiled step): no reference to the model


def _weights_stamp(model) -> tuple:
    """What a frozen weight's compiled code depends on: each parameter's and buffer's identity, storage, in-place
    version, dtype and shape."""
    return tuple((id(t), t.data_ptr(), t._version, t.dtype, t.shape)
                 for t in itertools.chain(model.parameters(), model.buffers()))


def _step(model, *args, **kwargs):
    return model(*args, **kwargs)


def _fresh(fn):
    """fn with a code object of its own: Dynamo keeps compiled code per code object, so a copy compiles anew rather
    than reusing code that froze other weights."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)


@torch.no_grad()
def generate_seq2seq(model, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k=None, top_p=None,
                     eos_token_id=None, attention_mask=None, generator=None):
    """Encoder-decoder sampling/greedy: returns the decoder sequence (B, 1 + n), starting with
    config.decoder_start_token_id."""
    check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id)
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
    check_args(model, input_ids, max_new_tokens, 1.0, None, None, eos_token_id)
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
        cache.reorder(rows, cross=False)  # rows stay within their word's K beams, which share one memory
        seqs = torch.cat((seqs[rows], tok.view(-1, 1)), dim=1)
        prev_done = done.gather(1, beam)
        lengths = lengths.gather(1, beam) + (~prev_done).float()
        done = prev_done | (tok == eos_token_id) if eos_token_id is not None else prev_done
        if bool(done.all()):
            break
    best = (scores / lengths.clamp(min=1) ** length_penalty).argmax(-1)  # (B,)
    model.train(was_training)
    return seqs.view(B, K, -1)[torch.arange(B, device=dev), best]  # (B, 1 + n)
