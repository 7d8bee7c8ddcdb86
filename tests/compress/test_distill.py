"""Knowledge distillation (tinyformer/compress/distill.py) on tiny models.

- kd_loss: 0 for identical logits; equals T^2 * KL written out with math.exp/math.log on a 2-token example; its
  gradient wrt the student logits equals (softmax(s/T) - softmax(t/T)) * T / N on a ragged shape. hidden_loss and
  attention_loss (KL and MSE, with a masked key) against numbers worked out by hand.
- student_from_teacher: the kept blocks are the teacher's 0, 2, .. tensors, and the student's output equals that of
  the teacher with the other blocks deleted by hand (decoder, post-norm encoder, encoder-decoder).
- Capture: attention maps equal softmax(q k^T / sqrt(Dh) + mask) written out from the weights (causal + learned
  positions; RoPE + GQA; padded post-norm encoder); hidden states are the block outputs (the last one through the
  final norm and head gives the logits).
- teacher_targets: the teacher's greedy output equals a cache-free argmax loop.
- distill lowers its losses (logits; hidden + attention with a width projection; sequence level; a classification
  head) and the distilled student saves and loads.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import tinyformer
from tinyformer.compress.distill import (Capture, MeanPoolHead, attention_loss, attention_probs, distill,
                                         every_other_layer, hidden_loss, kd_loss, student_from_teacher, teacher_targets,
                                         uniform_layer_map)
from tinyformer.model import apply_rope

TINY = dict(n_head=2, d_model=32, max_seq_len=24, vocab_size=41)


def tiny(arch="decoder", **kw):
    base = {"decoder": dict(arch="decoder", n_layer=4),
            "llama": dict(arch="decoder", n_layer=2, n_head=4, n_kv_head=2, norm="rmsnorm", pos="rope",
                          act="swiglu", bias=False, tie_embeddings=False),
            "encoder": dict(arch="encoder", n_layer=4, norm_position="post", embed_norm=True, type_vocab_size=2,
                            pad_token_id=0),
            "encoder-decoder": dict(arch="encoder-decoder", n_layer=4, n_decoder_layer=2, pos="sinusoidal",
                                    pad_token_id=0, decoder_start_token_id=1)}[arch]
    torch.manual_seed(0)
    return tinyformer.build(tinyformer.ModelConfig(**{**TINY, **base, **kw})).eval()


# ----------------------------------------------------------------------------------------------------------------------
# the logit loss
def test_kd_loss_zero_for_identical_logits():
    s = torch.randn(3, 5, 7)
    assert kd_loss(s, s.clone(), temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_hand_computed_two_tokens():
    t = [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]]
    s = [[0.0, 1.0, 1.0], [2.0, 0.0, 0.0]]
    T = 2.0

    def softmax(row):
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    kls = []
    for tr, sr in zip(t, s):
        p, q = softmax(tr), softmax(sr)
        kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    want = T * T * (kls[0] + kls[1]) / 2
    got = kd_loss(torch.tensor(s)[None], torch.tensor(t)[None], temperature=T)  # (1, 2, 3)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # a mask that keeps only the second token
    got2 = kd_loss(torch.tensor(s)[None], torch.tensor(t)[None], T, mask=torch.tensor([[False, True]]))
    assert got2.item() == pytest.approx(T * T * kls[1], rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.5])
def test_kd_loss_gradient_is_softmax_difference(T):
    torch.manual_seed(1)
    s = torch.randn(5, 7, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, 11, dtype=torch.float64)
    kd_loss(s, t, temperature=T).backward()
    N = 5 * 7
    want = (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1)) * T / N
    torch.testing.assert_close(s.grad, want, rtol=1e-5, atol=1e-7)  # kd_loss works in float32


def test_hidden_and_attention_losses_hand_computed():
    hs = torch.zeros(1, 2, 2)
    ht = torch.tensor([[[1.0, 3.0], [5.0, 5.0]]])
    assert hidden_loss(hs, ht).item() == pytest.approx((1 + 9 + 25 + 25) / 4)
    assert hidden_loss(hs, ht, mask=torch.tensor([[True, False]])).item() == pytest.approx((1 + 9) / 2)
    proj = torch.nn.Linear(3, 2)  # a width projection C_s = 3 -> C_t = 2
    with torch.no_grad():
        proj.weight.zero_()
        proj.bias.copy_(torch.tensor([1.0, 3.0]))
    assert hidden_loss(torch.randn(1, 2, 3), ht, proj).item() == pytest.approx((0 + 0 + 16 + 4) / 4)
    pt = torch.tensor([0.5, 0.5, 0.0]).view(1, 1, 1, 3)  # (B, H, T, S); the last key is masked (probability 0)
    ps = torch.tensor([0.25, 0.75, 0.0]).view(1, 1, 1, 3)
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert attention_loss(ps, pt, "kl").item() == pytest.approx(kl, rel=1e-6)
    assert attention_loss(ps, pt, "mse").item() == pytest.approx((0.25 ** 2 + 0.25 ** 2) / 3, rel=1e-6)
    ps.requires_grad_(True)
    attention_loss(ps, pt, "kl").backward()
    assert torch.isfinite(ps.grad).all()  # the masked key's 0 * log 0 does not poison the gradient


def test_bad_arguments_are_named():
    s = torch.randn(2, 3)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, s, temperature=0)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(s, torch.randn(2, 4))
    with pytest.raises(ValueError, match="proj"):
        hidden_loss(torch.randn(1, 2, 3), torch.randn(1, 2, 4))
    m = tiny()
    with pytest.raises(ValueError, match="alpha"):
        distill(m, copy.deepcopy(m), torch.zeros(4, 9, dtype=torch.long), 1, alpha=1.5)
    with pytest.raises(ValueError, match="data as a tensor"):
        distill(m, copy.deepcopy(m), torch.zeros(4, 9), 1)
    with pytest.raises(ValueError, match="layers"):
        student_from_teacher(m, layers=[2, 1])
    with pytest.raises(ValueError, match="sequence_level"):
        distill(m, copy.deepcopy(m), torch.zeros(4, 9, dtype=torch.long), 1, sequence_level=True)


def test_uniform_layer_map():
    assert uniform_layer_map(2, 4) == [1, 3]
    assert uniform_layer_map(3, 6) == [1, 3, 5]
    assert uniform_layer_map(4, 4) == [0, 1, 2, 3]
    assert uniform_layer_map(3, 4) == [1, 2, 3]
    assert every_other_layer(6) == [0, 2, 4] and every_other_layer(5) == [0, 2]


# ----------------------------------------------------------------------------------------------------------------------
# students
@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder-decoder"])
def test_every_other_layer_student_is_the_teacher_without_odd_blocks(arch):
    teacher = tiny(arch)
    student = student_from_teacher(teacher)
    n_dec = teacher.config.n_decoder_layer
    assert student.config.n_layer == teacher.config.n_layer // 2
    # tensors: student block i holds teacher block 2i, not 2i+1
    stack = "decoder" if arch == "decoder" else "encoder"
    for i in range(2):
        s_w = getattr(student, stack).blocks[i].attn.wq.weight
        assert torch.equal(s_w, getattr(teacher, stack).blocks[2 * i].attn.wq.weight)
        assert not torch.equal(s_w, getattr(teacher, stack).blocks[2 * i + 1].attn.wq.weight)
    assert torch.equal(student.wte, teacher.wte)
    # output: the teacher with blocks 1 and 3 deleted by hand
    hand = copy.deepcopy(teacher)
    hand_stack = getattr(hand, stack)
    hand_stack.blocks = torch.nn.ModuleList([hand_stack.blocks[0], hand_stack.blocks[2]])
    if arch == "encoder-decoder":
        assert student.config.n_decoder_layer == n_dec // 2
        hand.decoder.blocks = torch.nn.ModuleList([hand.decoder.blocks[0]])
    torch.manual_seed(2)
    ids = torch.randint(1, 41, (2, 9))
    with torch.no_grad():
        if arch == "encoder-decoder":
            dec = torch.randint(1, 41, (2, 5))
            got, want = student(ids, dec), hand(ids, dec)
        else:
            got, want = student(ids), hand(ids)
    assert torch.equal(got, want)
    assert not torch.allclose(got, teacher(ids) if arch != "encoder-decoder" else teacher(ids, dec))


def test_scratch_student_has_the_shape_but_not_the_weights():
    teacher = tiny()
    student = student_from_teacher(teacher, layers=[0, 1, 3], init="scratch")
    assert student.config.n_layer == 3
    assert not torch.equal(student.decoder.blocks[0].attn.wq.weight, teacher.decoder.blocks[0].attn.wq.weight)


# ----------------------------------------------------------------------------------------------------------------------
# attention maps and hidden states
def _brute_force_probs(attn, x, causal, pad_mask=None, rope=None):
    """softmax(q k^T / sqrt(Dh) + mask), one query head, one query and one key at a time."""
    B, T, _ = x.shape
    H, Hkv, Dh = attn.n_head, attn.n_kv_head, attn.head_dim
    q = x @ attn.wq.weight.T + (attn.wq.bias if attn.wq.bias is not None else 0)
    k = x @ attn.wk.weight.T + (attn.wk.bias if attn.wk.bias is not None else 0)
    q = q.view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
    k = k.view(B, T, Hkv, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = torch.zeros(B, H, T, T, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh = h // (H // Hkv)
            for i in range(T):
                scores = []
                for j in range(T):
                    ok = (not causal or j <= i) and (pad_mask is None or bool(pad_mask[b, j]))
                    scores.append(float((q[b, h, i] @ k[b, kh, j]).detach()) / math.sqrt(Dh) if ok else -math.inf)
                m = max(scores)
                e = [math.exp(v - m) for v in scores]
                for j in range(T):
                    out[b, h, i, j] = e[j] / sum(e)
    return out


@pytest.mark.parametrize("arch", ["decoder", "llama", "encoder"])
def test_captured_attention_maps_equal_brute_force(arch):
    model = tiny(arch)
    torch.manual_seed(3)
    ids = torch.randint(1, 41, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]) if arch == "encoder" else None
    stack_name = "encoder" if arch == "encoder" else "decoder"
    stack = getattr(model, stack_name)
    inputs = {}  # what each Attention module was called with (the test's own hook)
    hooks = [b.attn.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a)) for i, b in
             enumerate(stack.blocks)]
    with torch.no_grad(), Capture(model, hidden=False, attention=True) as cap:
        model(ids, attention_mask=mask) if mask is not None else model(ids)
    for h in hooks:
        h.remove()
    for i, block in enumerate(stack.blocks):
        x, _, rope = inputs[i]
        want = _brute_force_probs(block.attn, x, causal=arch != "encoder", pad_mask=mask, rope=rope)
        got = cap.attention[stack_name][i]
        assert got.shape == (2, block.attn.n_head, 7, 7)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_attention_probs_gqa_and_bottom_right_causal():
    torch.manual_seed(4)
    q, k = torch.randn(1, 4, 2, 16), torch.randn(1, 2, 5, 16)
    p = attention_probs(q, k, causal=True)
    assert p.shape == (1, 4, 2, 5)
    assert torch.all(p[..., 0, 4] == 0) and torch.all(p[..., 1, 4] > 0)  # query 0 sees keys 0..3, query 1 all
    want = torch.softmax(q[0, 3] @ k[0, 1].T / 4.0 + torch.tensor([[0.0] * 4 + [-math.inf], [0.0] * 5]), -1)
    torch.testing.assert_close(p[0, 3], want)  # head 3 uses key head 1 (Dh = 16: scale 1/4)


def test_captured_hidden_states_are_block_outputs():
    model = tiny()
    ids = torch.randint(0, 41, (2, 9))
    with torch.no_grad(), Capture(model) as cap:
        logits = model(ids)
    last = cap.hidden["decoder"][-1]
    torch.testing.assert_close(model.logits(model.decoder.final_norm(last)), logits)
    assert all(h.shape == (2, 9, 32) for h in cap.hidden["decoder"])


# ----------------------------------------------------------------------------------------------------------------------
# sequence level
def test_teacher_targets_are_the_greedy_argmax_sequence():
    teacher = tiny("encoder-decoder")
    torch.manual_seed(5)
    src = torch.randint(3, 41, (4, 6))
    # cache-free greedy decoding, one full forward per step
    seq = torch.full((4, 1), teacher.config.decoder_start_token_id)
    with torch.no_grad():
        for _ in range(8):
            nxt = teacher(src, seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    eos = int(seq[0, 4])  # a token the teacher emits: row 0 stops there (the others where they first emit it)
    dec_in, labels = teacher_targets(teacher, src, max_new_tokens=8, eos_token_id=eos)
    stopped = 0
    for r in range(4):
        row = seq[r, 1:].tolist()
        n = row.index(eos) + 1 if eos in row else len(row)
        stopped += n < len(row)
        assert labels[r, :n].tolist() == row[:n]
        assert (labels[r, n:] == -100).all()
        assert dec_in[r, :n].tolist() == seq[r, :n].tolist()
        assert (dec_in[r, n + 1:] == teacher.config.pad_token_id).all()  # inputs after the EOS input are padding
    assert stopped >= 1


# ----------------------------------------------------------------------------------------------------------------------
# the verb
def _fixed_kd(teacher, student, ids, T=2.0):
    with torch.no_grad():
        return kd_loss(student(ids[:, :-1]), teacher(ids[:, :-1]), T).item()


def test_distill_lowers_kd_loss_and_student_saves_and_loads(tmp_path):
    teacher = tiny()
    student = student_from_teacher(teacher, init="scratch")
    torch.manual_seed(6)
    data = torch.randint(0, 41, (64, 17))
    held = torch.randint(0, 41, (16, 17))
    before = _fixed_kd(teacher, student, held)
    rows = []
    out = distill(teacher, student, data, steps=25, temperature=2.0, alpha=1.0, batch_size=8,
                  learning_rate=3e-3, log=rows.append)
    assert out is student
    after = _fixed_kd(teacher, student, held)
    assert after < 0.5 * before, (before, after)
    assert rows[-1]["step"] == 24 and "soft" in rows[-1] and "hard" not in rows[-1]
    student.eval()
    student.save(tmp_path / "s")
    loaded = tinyformer.load(tmp_path / "s")
    assert loaded.config.n_layer == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(held[:, :-1]), student(held[:, :-1]), rtol=0, atol=0)


def test_distill_with_alpha_zero_is_plain_training_on_labels():
    teacher = tiny()
    teacher.forward = None  # never run when there is nothing to learn from it
    student = tiny(n_layer=2)
    torch.manual_seed(7)
    data = torch.arange(17).repeat(32, 1) % 41  # a sequence the student can memorise
    x, y = data[:4, :-1], data[:4, 1:]
    with torch.no_grad():
        before = F.cross_entropy(student(x).flatten(0, 1), y.flatten()).item()
    distill(teacher, student, data, steps=20, alpha=0.0, batch_size=4, learning_rate=5e-3)
    with torch.no_grad():
        after = F.cross_entropy(student(x).flatten(0, 1), y.flatten()).item()
    assert after < 0.6 * before


def test_distill_hidden_and_attention_with_width_projection():
    teacher = tiny("encoder")
    student = tiny("encoder", n_layer=2, d_model=16)
    torch.manual_seed(8)
    ids = torch.randint(1, 41, (48, 10))
    mask = torch.ones_like(ids)
    mask[::2, 7:] = 0
    held_ids, held_mask = ids[:8], mask[:8]

    def losses():
        with torch.no_grad(), Capture(teacher, attention=True) as tc, Capture(student, attention=True) as sc:
            teacher(held_ids, attention_mask=held_mask)
            student(held_ids, attention_mask=held_mask)
        return sum(attention_loss(sc.attention["encoder"][i], tc.attention["encoder"][j], "kl", held_mask.bool())
                   for i, j in enumerate([1, 3])).item()

    before = losses()
    rows = []
    batches = iter([(ids[i:i + 8], mask[i:i + 8]) for i in range(0, 48, 8)] * 10)
    distill(teacher, student, batches, steps=30, hidden_weight=1.0, attention_weight=1.0, learning_rate=5e-3,
            log=rows.append)
    assert losses() < 0.7 * before
    assert rows[-1]["hidden"] < rows[0]["hidden"] and "soft" not in rows[0]


def test_distill_encoder_with_classification_heads():
    teacher = tiny("encoder")
    t_head = MeanPoolHead(32, 3)
    with torch.no_grad():
        t_head.proj.weight.normal_(0.0, 2.0)  # confident teacher logits, so that there is something to match
    student = student_from_teacher(teacher, init="scratch")
    s_head = copy.deepcopy(t_head)
    torch.manual_seed(9)
    ids = torch.randint(1, 41, (32, 8))
    labels = torch.randint(0, 3, (32,))
    with torch.no_grad():
        t_logits = t_head(teacher(ids))
        before = kd_loss(s_head(student(ids)), t_logits).item()
    distill(teacher, student, lambda: (ids, torch.ones_like(ids), labels), 20, alpha=1.0,
            teacher_head=t_head, student_head=s_head, learning_rate=3e-3)
    with torch.no_grad():
        after = kd_loss(s_head(student(ids)), t_logits).item()
    assert after < 0.5 * before
    assert torch.equal(t_logits, t_head(teacher(ids)))  # the teacher and its head are untouched


def test_distill_sequence_level_encoder_decoder():
    teacher = tiny("encoder-decoder")
    student = student_from_teacher(teacher, init="scratch")
    torch.manual_seed(10)
    src = torch.randint(3, 41, (16, 6))
    dec_in, labels = teacher_targets(teacher, src, max_new_tokens=6, eos_token_id=2)

    def nll():
        with torch.no_grad():
            return F.cross_entropy(student(src, dec_in).flatten(0, 1), labels.flatten(), ignore_index=-100).item()

    before = nll()
    distill(teacher, student, lambda: (src, torch.ones_like(src)), 15, alpha=0.0, sequence_level=True,
            max_new_tokens=6, eos_token_id=2, learning_rate=5e-3)
    assert nll() < 0.5 * before
