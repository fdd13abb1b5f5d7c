"""Document-isolated scoring and phased per-document LoRA TTT (issue 28; LINEAGE_TTT_CASEOPS.md §1, §2, §5).

What is proved here, on small fp32 models and hand-made streams of documents: documents split at BOS cover every
target exactly once; windows never leave their document and padding after a row changes nothing before it; the
adapters are part of the one forward (zero B is bitwise the plain forward; Q/K/V/head equal merged weights, O and MLP
bypasses equal hooks written from the description, every loop pass its own slot); both modes score every target
once with the sliding eval's bytes; every target's loss is taken before any update that used it, a document's last
chunk is never trained on, the global phases train only on fully scored prefix documents; a batch's adapters see
another batch's documents only through the warm-started A of their lane (and the phases)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import REPO, TINY_ENV, field, log_lines, run_in_process, run_tiny_training

CPU = torch.device("cpu")
V = 64
# The tiny model over 64 tokens, windows of 32, LoRA chunks of 8, batches of 4 documents, 2 lanes, 2 phases after
# 3 and 6 documents.
SMALL = dict(TINY_ENV, VOCAB_SIZE=str(V), TRAIN_SEQ_LEN="32", EVAL_SEQ_LEN="32", EVAL_STRIDE="8",
             TTT_LORA_ENABLED="1", TTT_LORA_CHUNK="8", TTT_LORA_BATCH_DOCS="4", TTT_LORA_RANK="4", TTT_LORA_LANES="2",
             TTT_LORA_PHASES="2", TTT_LORA_PREFIX_DOCS="6", TTT_LORA_GLOBAL_TOKENS="64", TTT_LORA_LR="0.01",
             TTT_LORA_GLOBAL_LR="0.01")
RT = SimpleNamespace(rank=0, world_size=1, device=CPU, cuda=False, compile="", distributed=False)
LUTS = (torch.arange(V).remainder(3).add(1).to(torch.int16), torch.arange(V) % 5 == 0, torch.arange(V) < 3)
LUTS[0][:3] = 0  # ids 0-2 control tokens: no bytes, boundaries


@pytest.fixture(autouse=True)
def fp32(monkeypatch):
    """These tests compare numbers tightly: activations in fp32, no autocast."""
    monkeypatch.setattr(tg, "ACT_DTYPE", torch.float32)


def small_model(seed: int = 0, **env) -> tuple[tg.GPT, SimpleNamespace]:
    hp = tg.read_hyperparameters({**SMALL, **env})
    torch.manual_seed(seed)
    model = tg.build_model(hp, CPU)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval(), hp


def stream(lengths: list[int], seed: int = 0, lead: bool = True) -> torch.Tensor:
    """Documents of the given target counts: BOS then tokens 3..63; a document's last target is the next BOS (the
    last document's, the stream's last token). lead=False drops the opening BOS (a stream cut mid-document)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for i, n in enumerate(lengths):
        body = n - 1 if i < len(lengths) - 1 else n
        parts += [torch.tensor([tg.BOS_ID]), torch.randint(3, V, (body,), generator=g)]
    out = torch.cat(parts)
    return out if lead else out[1:]


LENGTHS = [70, 1, 9, 33, 8, 40, 17, 5, 64, 2, 26, 12, 48, 3]  # 14 documents: 4 batches of 4, the last of 2


# ------------------------------------------------------------------------------------------------- documents

@pytest.mark.parametrize("lead", [True, False])
def test_documents_cover_every_target_once_and_end_with_the_next_bos(lead):
    val = stream(LENGTHS, lead=lead)
    docs = tg.documents(val)
    assert [t for first, end in docs for t in range(first, end)] == list(range(len(val) - 1))
    assert [end - first for first, end in docs] == (LENGTHS if lead else [LENGTHS[0] - 1] + LENGTHS[1:])
    assert all(val[end] == tg.BOS_ID for _, end in docs[:-1])  # each document's last target is the next BOS
    assert all(val[first] == tg.BOS_ID for first, _ in docs[1:]) and (val[0] == tg.BOS_ID) == lead


@pytest.mark.parametrize("window,stride", [(32, 8), (32, 32), (16, 5), (8, 1)])
def test_document_windows_stay_inside_and_score_each_target_once(window, stride):
    for first, end in tg.documents(stream(LENGTHS)):
        scored = []
        for w in tg.document_windows(first, end, window, stride):
            assert first <= w.start and w.start + w.length <= end and 0 < w.scored <= w.length <= window
            for j in range(w.start + w.length - w.scored, w.start + w.length):
                scored.append(j)
                assert j - w.start + 1 >= min(window - stride + 1, j - first + 1)  # the sliding eval's context
        assert scored == list(range(first, end))


@pytest.mark.parametrize("chunk,window", [(8, 32), (48, 64), (5, 5), (7, 30)])
def test_chunk_windows_end_with_their_chunk_and_take_the_longest_context(chunk, window):
    for first, end in tg.documents(stream(LENGTHS)):
        n = -(-(end - first) // chunk)
        windows = [tg.chunk_window(first, end, ci, chunk, window) for ci in range(n)]
        for ci, w in enumerate(windows):
            stop = first + min(chunk * (ci + 1), end - first)
            assert w.start + w.length == stop and w.start == max(first, stop - window)  # ends with its chunk
            assert w.scored == stop - (first + chunk * ci) > 0
        assert sum(w.scored for w in windows) == end - first


def test_padded_lengths_are_few_and_never_shorter():
    for window, train in [(2048, 2048), (256, 256), (32, 32), (2560, 2048), (64, 16)]:
        hp = SimpleNamespace(eval_len=window, train_seq_len=train)
        buckets = tg.length_buckets(hp)
        assert len(buckets) <= 6 and buckets[-1] == window
        for n in range(1, window + 1):
            length = tg.padded_length(n, window, train)
            assert n <= length and length in buckets
            assert length <= max(2 * n - 1, window // 16) if length <= train else length == window  # NTK: full


# ------------------------------------------------------------------------------------------------- the forward

def adapter_set(model: tg.GPT, hp, rows: int, nonzero: set[tuple[int, str]] = frozenset(), head: bool = False,
                seed: int = 1) -> tg.DocumentAdapters:
    """Adapters with B zero except on the named (slot, projection)s and, with head, the head's."""
    adapters = tg.DocumentAdapters(model, hp, None, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    names = ("q", "k", "v", "o", "mlp")
    with torch.no_grad():
        for i, slot in enumerate(adapters.inputs.slots):
            for name in names:
                if (i, name) in nonzero:
                    b = getattr(slot, name).b
                    b.copy_(torch.randn(b.shape, generator=g))
        if head:
            adapters.inputs.head.b.copy_(torch.randn(adapters.inputs.head.b.shape, generator=g))
    return adapters


def test_zero_b_adapters_leave_the_forward_bitwise_unchanged():
    """B starts at zero: a fresh adapter set must score exactly as the plain model (loops and both parallel forms)."""
    for env in ({}, dict(LOOP_LAYERS="1-1", PARALLEL_START="2"),
                dict(NUM_LAYERS="4", LOOP_LAYERS="1-1", PARALLEL_START="2", PARALLEL_MODE="lanes")):
        model, hp = small_model(**env)
        hp.ttt_lora_batch_docs = 3
        x = torch.randint(0, V, (3, 20))
        adapters = adapter_set(model, hp, 3)
        with torch.no_grad():
            plain, adapted = model.hidden(x), model.hidden(x, adapters.inputs)
            assert torch.equal(plain, adapted)
            assert torch.equal(model.logits(plain), model.logits(plain, adapters.inputs.head))


def merged_attention_weight(model, layer, name, lora):
    w = getattr(model.blocks[layer].attn, f"c_{name}").weight
    return w + lora.scale * (lora.b[0] @ lora.a[0])


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_qkv_adapters_equal_merged_weights_of_their_layer(name):
    """Q/K/V on the attention's normed input: for one row, exactly a weight delta scale * B A on that projection."""
    model, hp = small_model()
    hp.ttt_lora_batch_docs = 1
    x = torch.randint(0, V, (1, 24))
    adapters = adapter_set(model, hp, 1, {(1, name)})
    with torch.no_grad():
        adapted = model.hidden(x, adapters.inputs)
        proj = getattr(model.blocks[1].attn, f"c_{name}")
        saved = proj.weight.clone()
        proj.weight.copy_(merged_attention_weight(model, 1, name, getattr(adapters.inputs.slots[1], name)))
        merged = model.hidden(x)
        proj.weight.copy_(saved)
        assert torch.allclose(adapted, merged, atol=1e-5) and not torch.allclose(adapted, model.hidden(x), atol=1e-3)


def test_head_adapter_equals_a_merged_head():
    model, hp = small_model()
    hp.ttt_lora_batch_docs = 1
    h = torch.randn(1, 10, model.tok_emb.embedding_dim)
    head = adapter_set(model, hp, 1, head=True).inputs.head
    with torch.no_grad():
        raw = F.linear(h, model.tok_emb.weight + head.scale * (head.b[0] @ head.a[0]))
        expected = model.softcap * torch.tanh(raw / model.softcap)
        assert torch.allclose(model.logits(h, head), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["o", "mlp"])
def test_o_and_mlp_bypasses_read_the_normed_inputs_per_loop_pass(name):
    """O: a bypass from the attention's normed input added to its output (before attn_scale); MLP: from the MLP's
    normed input added to its output. With block 1 looped, slot 2 (its second pass) must act on the second call only:
    the reference adds the bypass by forward hooks written from that description."""
    model, hp = small_model(LOOP_LAYERS="1-1")
    hp.ttt_lora_batch_docs = 2
    assert model.virtual_layers() == [(0, 0), (1, 0), (1, 1), (2, 0)]
    x = torch.randint(0, V, (2, 24))
    adapters = adapter_set(model, hp, 2, {(2, name)})
    lora = getattr(adapters.inputs.slots[2], name)
    target = model.blocks[1].attn if name == "o" else model.blocks[1].mlp
    calls = []

    def hook(module, inputs, output):
        calls.append(1)
        return output + tg.low_rank(inputs[0], lora) if len(calls) == 2 else output

    with torch.no_grad():
        adapted = model.hidden(x, adapters.inputs)
        handle = target.register_forward_hook(hook)
        reference = model.hidden(x)
        handle.remove()
    assert len(calls) == 2 and torch.allclose(adapted, reference, atol=1e-5)
    assert not torch.allclose(adapted, model.hidden(x), atol=1e-3)


def test_padding_after_a_row_changes_nothing_before_it_nor_in_other_rows():
    """Causal attention, SmearGate and the bigram hash look back only; RoPE counts from the row's start: a row's
    positions score the same alone, padded with zeros, or batched with any other rows (the latter bitwise)."""
    model, hp = small_model(LOOP_LAYERS="1-1", PARALLEL_START="2")
    rows = [torch.randint(3, V, (n,)) for n in (32, 7, 19)]
    padded = torch.stack([F.pad(r, (0, 32 - len(r))) for r in rows])
    with torch.no_grad():
        batch = model.hidden(padded)
        for i, r in enumerate(rows):
            assert torch.allclose(batch[i, : len(r)], model.hidden(r[None])[0], atol=1e-5)
        other = padded.clone()
        other[1:] = torch.randint(3, V, (2, 32))
        assert torch.equal(model.hidden(other)[0], batch[0])


# ------------------------------------------------------------------------------------------------- the modes

def docs_eval(model, hp, val, stride=8, batch_tokens=96):
    return tg.docs_evaluate(model, model.hidden, val, tg.token_bytes(val, LUTS), hp, RT, stride, batch_tokens,
                            lambda line: None)


def instrumented_lora(monkeypatch, model, hp, val, rt=RT):
    """Runs lora_ttt_evaluate; returns its metrics, its log and the ordered events: ('score', targets) for every
    batch of targets added to the sums, ('adapt', targets) for every adapter step with the targets of its loss,
    ('phase', prefix documents) when a global phase starts, ('global', targets) for every global SGD step with this
    rank's targets of its loss."""
    events, logs = [], []
    real_add, real_adapt, real_step, real_sgd = tg.add_scores, tg.adapt, tg.global_step, tg.global_sgd

    def add(sums, scores, val_bytes):
        events.append(("score", scores.target[scores.mask].tolist()))
        real_add(sums, scores, val_bytes)

    def adapt(optimizer, scores, train):
        events.append(("adapt", scores.target[scores.mask & train[:, None]].tolist()))
        real_adapt(optimizer, scores, train)

    def step(params, optimizer, scores, targets, clip, world_size):
        events.append(("global", [] if scores is None else scores.target[scores.mask].tolist()))
        real_step(params, optimizer, scores, targets, clip, world_size)

    def sgd(model, hidden, val, prefix, hp, rt):
        events.append(("phase", list(prefix)))
        return real_sgd(model, hidden, val, prefix, hp, rt)

    monkeypatch.setattr(tg, "add_scores", add)
    monkeypatch.setattr(tg, "adapt", adapt)
    monkeypatch.setattr(tg, "global_step", step)
    monkeypatch.setattr(tg, "global_sgd", sgd)
    result = tg.lora_ttt_evaluate(model, model.hidden, val, tg.token_bytes(val, LUTS), hp, rt, 8, 96, logs.append)
    for name, fn in (("add_scores", real_add), ("adapt", real_adapt), ("global_step", real_step),
                     ("global_sgd", real_sgd)):
        monkeypatch.setattr(tg, name, fn)
    return result, events, logs


def test_both_modes_score_every_target_once_with_the_sliding_bytes(monkeypatch):
    model, hp = small_model()
    val = stream(LENGTHS, seed=3)
    total, per_token = len(val) - 1, tg.token_bytes(val, LUTS)
    sliding = tg.evaluate(tg.Scorer(model), val, per_token, hp.eval_len, 8, 4, 0, 1)
    docs = docs_eval(model, hp, val)
    (loss, _, tokens, nbytes), events, _ = instrumented_lora(monkeypatch, model, hp, val)
    assert sorted(t for kind, ts in events if kind == "score" for t in ts) == list(range(total))
    assert docs[2:] == (tokens, nbytes) == sliding[2:] == (total, int(per_token[1:].sum()))
    assert loss != docs[0]  # it adapted


def test_docs_mode_equals_a_brute_force_document_local_reference():
    """Each target scored on exactly the context its document-local window gives it: the tokens of its own
    document from the window's start, never one before the document's BOS."""
    model, hp = small_model()
    val = stream(LENGTHS, seed=5)
    loss, _, tokens, _ = docs_eval(model, hp, val, stride=8)
    reference = 0.0
    with torch.no_grad():
        for first, end in tg.documents(val):
            for w in tg.document_windows(first, end, hp.eval_len, 8):
                for j in range(w.start + w.length - w.scored, w.start + w.length):
                    logits = model.logits(model.hidden(val[w.start : j + 1][None].long()))[0, -1]
                    reference += F.cross_entropy(logits.double()[None], val[j + 1 : j + 2].long()).item()
    assert loss == pytest.approx(reference / tokens, rel=1e-5)
    across = tg.evaluate(tg.Scorer(model), val, tg.token_bytes(val, LUTS), hp.eval_len, 8, 4, 0, 1)[0]
    assert abs(across - loss) > 1e-3  # the sliding eval, which attends across documents, scores otherwise


def test_without_adaptation_lora_ttt_scores_as_the_document_mode(monkeypatch):
    """LR 0 and no phases: the adapters stay at B = 0 and every document no longer than the window sees the same
    context chunk by chunk as in one window: LoRA TTT's score is the document-isolated score."""
    model, hp = small_model(TTT_LORA_LR="0", TTT_LORA_PHASES="0")
    val = stream([n for n in LENGTHS if n <= 32], seed=7)
    (loss, bpb, tokens, nbytes), _, _ = instrumented_lora(monkeypatch, model, hp, val)
    docs = docs_eval(model, hp, val)
    assert (tokens, nbytes) == docs[2:] and loss == pytest.approx(docs[0], rel=1e-6)


def test_score_first_last_chunk_never_trained_phases_only_on_scored_prefix(monkeypatch):
    model, hp = small_model()
    val = stream(LENGTHS, seed=3)
    _, events, logs = instrumented_lora(monkeypatch, model, hp, val)
    docs = tg.documents(val)
    order = [d for batch in tg.lora_batches(docs, hp.ttt_lora_batch_docs) for d in batch]
    doc_of = {t: d for d in docs for t in range(*d)}
    scored, adapted, last_chunks = set(), 0, set()
    for first, end in docs:
        n = end - first
        last_chunks.update(range(first + (n - 1) // hp.ttt_lora_chunk * hp.ttt_lora_chunk, end))
    global_steps, phase_docs = [], []
    for i, (kind, targets) in enumerate(events):
        if kind == "score":
            assert not scored & set(targets)  # scored once, and never by a state that trained on it
            scored.update(targets)
        elif kind == "adapt":
            adapted += 1
            assert targets and set(targets) <= scored and not set(targets) & last_chunks
            assert set(targets) == set(events[i - 1][1]) - last_chunks  # the chunk just scored, its last chunks out
        elif kind == "phase":  # a phase begins: the first 3 (then 6) documents of the order, all scored by now
            assert targets == order[: 3 * (len(global_steps) + 1)] and {t for d in targets for t in range(*d)} <= scored
            global_steps.append([])
        else:
            assert set(targets) <= scored
            assert all(set(range(*doc_of[t])) <= scored for t in targets)  # only documents scored to their end
            global_steps[-1].append(set(targets))
    assert adapted > 0
    # phases after 3 and 6 documents of the processing order, each on its prefix, in rows of 2 pieces of <= 32
    # targets (2 and 5 steps: the last group of rows, at the cosine's zero LR, is skipped)
    assert [line.split()[1] for line in logs if line.startswith("lora_ttt:phase")] == ["1/2", "2/2"]
    assert [len(steps) for steps in global_steps] == [2, 5]
    for k, steps in enumerate(global_steps, 1):
        prefix = [t for d in order[: 3 * k] for t in range(*d)]
        pieces = [set(range(s, min(s + 32, e))) for f, e in order[: 3 * k] for s in range(f, e, 32)]
        assert steps == [pieces[2 * i] | pieces[2 * i + 1] for i in range(len(steps))]
        assert set().union(*steps) < set(prefix)


def test_a_batch_sees_other_batches_only_through_its_lanes_warm_a(monkeypatch):
    """Change one document of the first batch (same length, other tokens) and compare every target's loss. Without
    warm start only that document's losses move (rows of one batch are independent, bitwise); with it, also the
    same row of the later batch of the same lane (A is carried row by row), and nothing else: not the other lane's
    batches, not the other rows."""
    val = stream(LENGTHS, seed=3)
    docs, real_add = tg.documents(val), tg.add_scores
    for warm in ("0", "1"):
        model, hp = small_model(TTT_LORA_WARM_A=warm, TTT_LORA_PHASES="0", TTT_LORA_CHUNK="4")
        batches = tg.lora_batches(docs, hp.ttt_lora_batch_docs)
        changed = batches[0][1]
        other = val.clone()
        other[changed[0] + 1 : changed[1]] = (other[changed[0] + 1 : changed[1]] + 4) % (V - 3) + 3
        losses = []
        for v in (val, other):
            per_target = {}

            def add(sums, scores, val_bytes):
                per_target.update(zip(scores.target[scores.mask].tolist(), scores.nll.detach()[scores.mask].tolist()))
                real_add(sums, scores, val_bytes)

            monkeypatch.setattr(tg, "add_scores", add)
            tg.lora_ttt_evaluate(model, model.hidden, v, tg.token_bytes(v, LUTS), hp, RT, 8, 96, lambda line: None)
            losses.append(per_target)
        monkeypatch.setattr(tg, "add_scores", real_add)
        moved = {d for d in docs if any(losses[0][t] != losses[1][t] for t in range(*d))}
        assert moved == ({changed} if warm == "0" else {changed, batches[2][1]})  # batch 2: lane 0's next


@pytest.mark.parametrize("phases", ["0", "2"])
def test_ranks_split_the_work_and_meet_the_same_collectives(monkeypatch, phases):
    """lora_ttt_evaluate as ranks 0..w-1 of 1, 2 and 3 (all-reduces recorded, not performed): the ranks' scored
    targets are disjoint and together every target; every rank makes the same all-reduces (global SGD steps
    included, whatever its share of their rows). Without phases nothing is shared but the sums, so they add up to
    the one-rank sums (up to float summation order); with phases the real gradient sums are the torchrun test's."""
    model, hp = small_model(TTT_LORA_PHASES=phases)
    val = stream(LENGTHS, seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sums = {}
    for world in (1, 2, 3):
        calls, parts, scored = [], [], []
        monkeypatch.setattr(tg.dist, "all_reduce", lambda t, *a, **k: calls.append(t.numel()))
        monkeypatch.setattr(tg, "metrics", lambda s, w: (parts.append(s.clone()), (1.0, 1.0, 1, 1))[1])
        for rank in range(world):
            model.load_state_dict(state)
            before = len(calls)
            rt = SimpleNamespace(**{**vars(RT), "rank": rank, "world_size": world})
            _, events, _ = instrumented_lora(monkeypatch, model, hp, val, rt)
            calls.append(tuple(calls[before:]))
            scored.append({t for kind, ts in events if kind == "score" for t in ts})
        per_rank = [c for c in calls if isinstance(c, tuple)]
        assert all(c == per_rank[0] for c in per_rank) and (len(per_rank[0]) > 0) == (phases != "0" and world > 1)
        assert sum(map(len, scored)) == len(set().union(*scored)) == len(val) - 1
        sums[world] = torch.stack(parts).sum(0)
    if phases == "0":
        for world in (2, 3):
            assert sums[world][1:].tolist() == sums[1][1:].tolist()
            assert sums[world][0].item() == pytest.approx(sums[1][0].item(), rel=1e-9)


def test_phases_wait_for_every_batch_of_their_prefix_and_none_follows_the_last():
    hp = tg.read_hyperparameters({**SMALL, "TTT_LORA_PREFIX_DOCS": "14", "TTT_LORA_PHASES": "3"})
    sizes = [2, 4, 4, 4]  # the processing order's first batch is the short tail of the longest documents
    assert tg.phase_ends(sizes, hp) == [(4, 2), (9, 3)]  # the third pause (14 documents) would follow the last batch
    assert tg.phase_ends(sizes, tg.read_hyperparameters({**SMALL, "TTT_LORA_PREFIX_DOCS": "3"})) == [(1, 1), (3, 2)]
    assert tg.phase_ends(sizes, tg.read_hyperparameters({**SMALL, "TTT_LORA_PHASES": "0"})) == []


def test_processing_order_is_longest_batches_first_shortest_rows_first():
    docs = tg.documents(stream(LENGTHS))
    batches = tg.lora_batches(docs, 4)
    lengths = [[e - f for f, e in b] for b in batches]
    assert lengths == [[64, 70], [26, 33, 40, 48], [8, 9, 12, 17], [1, 2, 3, 5]]  # cut from the shortest up


def test_bad_settings_are_input_errors():
    tg.read_hyperparameters({"EVAL_SEQ_LEN": "32"})  # the modes' shapes are checked only when they run
    for env, message in [({"TTT_LORA_RANK": "0"}, "TTT_LORA_RANK, TTT_LORA_CHUNK"),
                         ({"TTT_LORA_CHUNK": "4096", "TTT_LORA_ENABLED": "1"},
                          "TTT_LORA_CHUNK=4096 must fit EVAL_SEQ_LEN=2048"),
                         ({"TTT_LORA_BETA2": "1"}, "TTT_LORA_BETA1, TTT_LORA_BETA2"),
                         ({"TTT_LORA_LR": "-1"}, "TTT_LORA_LR, TTT_LORA_WD"),
                         ({"TTT_LORA_GLOBAL_TOKENS": "1000", "TTT_LORA_ENABLED": "1"},
                          "TTT_LORA_GLOBAL_TOKENS=1000 must hold one"),
                         ({"TTT_LORA_ALPHA": "0"}, "TTT_LORA_ALPHA and TTT_LORA_EPS"),
                         ({"DOCS_EVAL": "yes"}, "DOCS_EVAL='yes' is not a valid bool")]:
        with pytest.raises(tg.InputError, match=message):
            tg.read_hyperparameters(env)


def test_defaults_are_pr_1855s_and_off():
    hp = tg.read_hyperparameters({})
    assert not hp.docs_eval and not hp.ttt_lora_enabled
    assert (hp.ttt_lora_rank, hp.ttt_lora_alpha, hp.ttt_lora_chunk, hp.ttt_lora_batch_docs) == (80, 144.0, 48, 64)
    assert (hp.ttt_lora_lr, hp.ttt_lora_beta1, hp.ttt_lora_beta2, hp.ttt_lora_eps, hp.ttt_lora_wd) == \
        (1e-4, 0.0, 0.99, 1e-10, 0.5)
    assert (hp.ttt_lora_phases, hp.ttt_lora_prefix_docs, hp.ttt_lora_global_lr, hp.ttt_lora_global_momentum,
            hp.ttt_lora_global_tokens, hp.ttt_lora_warm_a) == (3, 2500, 1e-3, 0.9, 32768, True)
    assert math.isclose(hp.ttt_lora_alpha / hp.ttt_lora_rank, 1.8)


# ------------------------------------------------------------------------------------------------- whole runs

SHORT_DOCS = dict(VAL_MAX_TOKENS="6000", DOCS_EVAL="1", TTT_LORA_ENABLED="1", TTT_LORA_CHUNK="16",
                  TTT_LORA_BATCH_DOCS="4", TTT_LORA_RANK="4", TTT_LORA_LANES="4", TTT_LORA_PHASES="2",
                  TTT_LORA_PREFIX_DOCS="16", TTT_LORA_GLOBAL_TOKENS="256", TTT_LORA_LR="0.003",
                  TTT_LORA_GLOBAL_LR="0.003")


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory, tiny_data):
    """The tiny run's validation documents cut into documents of 20-300 tokens, each opening with BOS: about 50
    documents in the first 6,000 targets, so LoRA TTT has batches, rounds and phases to deal."""
    import numpy as np

    from make_shards import write_shard

    tokens = tg.load_data_shard(str(tiny_data / "fineweb_val_000000.bin")).astype(np.int64)
    body, g, out, i = tokens[tokens != tg.BOS_ID], np.random.default_rng(0), [], 0
    while i < len(body):
        n = int(g.integers(20, 300))
        out += [tg.BOS_ID] + body[i : i + n].tolist()
        i += n
    folder = tmp_path_factory.mktemp("short_docs")
    write_shard(folder / "fineweb_val_000000.bin", np.array(out))
    return folder


RANKS_DRIVER = f"""
import itertools, json, os, sys, time
sys.path[:0] = [{str(REPO)!r}]
import train_gpt as tg

rank, lines = int(os.environ.get("RANK", 0)), []
call, evaluate = tg.Logger.__call__, tg.lora_ttt_evaluate

def record(self, line):  # every rank's lines, not only rank 0's
    lines.append(line)
    call(self, line)

def ticking(*args, **kwargs):  # LoRA TTT's clock: a tick per reading, 1.5 s on the skewed rank, 1 s on the others
    ticks, real = itertools.count(), time.perf_counter
    tick = 1.5 if rank == int(os.environ["SKEWED_RANK"]) else 1.0
    time.perf_counter = lambda: tick * next(ticks)
    try:
        return evaluate(*args, **kwargs)
    finally:
        time.perf_counter = real

tg.Logger.__call__, tg.lora_ttt_evaluate = record, ticking
status = tg.main()
with open(f"rank{{rank}}.json", "w") as f:
    json.dump(dict(status=status, lines=lines), f)
sys.exit(status)
"""


def rank_lines(workdir, nproc: int) -> list[list[str]]:
    import json

    records = [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(nproc)]
    assert {r["status"] for r in records} == {0}
    return [r["lines"] for r in records]


def test_one_two_and_four_ranks_score_alike_and_agree_on_a_skewed_cap(tmp_path, tiny_run, short_docs):
    """EVAL_ONLY on the tiny run's artifact, 1, 2 and 4 gloo ranks (torchrun), one rank's clock 1.5x fast (LoRA
    TTT's clock ticks once a reading: deterministic), 4 lanes, 2 phases and a cap of 10 s. Locally the other ranks
    would stop adapting after round 3 (elapsed 9 s, the next round would end at 12 s) and the skewed one after
    round 2 (7.5 s -> 11.25 s); on the agreed clock every rank stops after round 2, skips the second phase and
    scores the rest as DOCS_EVAL does, whatever the rank count. The scores: the same tokens and bytes, val_loss
    equal up to float summation order (gradient and score sums split over ranks: measured within 2e-8)."""
    (tmp_path / "driver.py").write_text(RANKS_DRIVER)
    artifact, finals = str(tiny_run / "final_model.int6.ptz"), {}
    for nproc in (1, 2, 4):
        run_tiny_training(tmp_path / str(nproc), nproc=nproc, data=short_docs, script=tmp_path / "driver.py",
                          EVAL_ONLY=artifact, SKEWED_RANK=str(nproc - 1), TTT_LORA_MAX_SECONDS="10", **SHORT_DOCS)
        every_rank = rank_lines(tmp_path / str(nproc), nproc)
        for lines in every_rank:
            decided = [line for line in lines if line.startswith(("lora_ttt:updates_stopped", "lora_ttt:phase"))]
            assert len(decided) == 2
            assert decided[0].startswith("lora_ttt:phase 1/2 prefix_docs:8 batches_scored:3 global_steps:9")
            assert decided[1].startswith("lora_ttt:updates_stopped after_round:2 batches_adapted:5 elapsed_ms:7500")
        exact = [[line for line in lines if line.startswith(("final_int6_docs_exact", "final_int6_lora_ttt_exact"))]
                 for lines in every_rank]
        assert all(e == exact[0] for e in exact) and len(exact[0]) == 2  # every rank holds the same sums
        finals[nproc] = exact[0]
    docs, lora = finals[1]
    assert float(field(lora, "val_loss")) < float(field(docs, "val_loss")) - 0.02  # it adapts on real text
    for nproc in (2, 4):
        assert finals[nproc][0] == docs
        other = finals[nproc][1]
        assert (field(other, "tokens"), field(other, "bytes")) == (field(lora, "tokens"), field(lora, "bytes"))
        assert abs(float(field(other, "val_loss")) - float(field(lora, "val_loss"))) < 1e-7


@pytest.mark.parametrize("mode", ["blocks", "model"])
def test_every_document_graph_is_compiled_before_the_timed_evaluations(tmp_path, tiny_data, short_docs, monkeypatch,
                                                                      mode):
    """COMPILE=blocks|model (dynamo with its eager backend: the tracing is what is tested) with a looped block, the
    document mode and LoRA TTT with phases: fullgraph tracing raises at any graph break, the adapters enter every
    block's graph as inputs, and no graph is compiled after eval:compiled (the priming on random tokens), though
    the evaluations run every bucket length, with and without adapters, frozen and trained."""
    from torch._dynamo.utils import counters

    compile = torch.compile
    monkeypatch.setattr(tg.torch, "compile", lambda fn, **kw: compile(fn, backend="eager", **kw))
    graphs, logger = {}, tg.Logger.__call__

    def count(self, line):
        if line.startswith("eval:compiled"):
            graphs["primed"] = counters["stats"]["unique_graphs"]
        logger(self, line)

    monkeypatch.setattr(tg.Logger, "__call__", count)
    torch._dynamo.reset()
    counters.clear()
    env = dict(SHORT_DOCS, COMPILE=mode, LOOP_LAYERS="1-1", ITERATIONS="2", WARMUP_STEPS="1", VAL_LOSS_EVERY="0",
               TRAIN_BATCH_TOKENS="512", VAL_MAX_TOKENS="3000", TTT_LORA_LANES="2", TTT_LORA_PREFIX_DOCS="6",
               TRAIN_FILES=str(tiny_data / "fineweb_train_*.bin"))
    assert run_in_process(tmp_path, short_docs, **env) == 0
    lines = log_lines(tmp_path)
    assert any(line.startswith("lora_ttt:phase 1/2") for line in lines)
    assert any(line.startswith("final_int6_lora_ttt_exact") for line in lines)
    assert graphs["primed"] > 0 and counters["stats"]["unique_graphs"] == graphs["primed"]
    torch._dynamo.reset()


def test_document_plan_counts_the_positions_each_mode_computes(tmp_path):
    """bench/document_plan.py on 40 documents of 64 targets, window 64, chunks of 16, batches of 4: LoRA's windows
    are 16, 32, 48 and 64 tokens (padded to 16, 32, 64, 64): 2.5 real and 2.75 computed positions per target; the
    document mode one 64-token window per document; the sliding eval (stride 16) 64 per 16 targets."""
    import sys

    import numpy as np

    from make_shards import write_shard

    sys.path.insert(0, str(REPO / "bench"))
    import document_plan

    write_shard(tmp_path / "val.bin", np.concatenate([[tg.BOS_ID] + [5] * 63] * 40 + [[tg.BOS_ID]]))
    lines = document_plan.main([str(tmp_path / "val.bin"), "--", "EVAL_SEQ_LEN=64", "TRAIN_SEQ_LEN=64",
                                "EVAL_STRIDE=16", "TTT_LORA_CHUNK=16", "TTT_LORA_BATCH_DOCS=4", "VAL_BATCH_SIZE=4096"])
    assert lines[0].startswith("targets:2560 docs:40 window:64 stride:16")
    assert lines[1] == f"sliding per_target:{((2560 - 64) // 16 + 1) * 64 / 2560:.2f}"
    assert lines[2] == "docs per_target:1.00 positions:2560 padding:0.000"
    assert lines[3] == "lora per_target:2.75 real:2.50 padding:0.091 chunk_steps:40"
