"""The megatron rollout engine (megatron-core's generation loop on the policy's weights) against
the hf engine and the policy's training forward, in one process and under torchrun (gloo)."""

import json

import pytest
import torch

from megatron_vr1.config import load_model_conf, model_from_conf


def spread_weights(model) -> None:
    """Random weights with more spread than the initialiser's, so that greedy decoding of the toy
    model wanders over the vocabulary instead of repeating one token."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)


def engine_prompts(args, tokenizer) -> list:
    """Prompts of different lengths: text only, an image first, an image late in a prompt longer
    than the others (its image tokens arrive after the shortest prompt's prefill), two images."""
    from PIL import Image

    from megatron_vr1.data import build_sample, process_images

    def prompt(text, *images):
        pixels, grid = process_images(list(images)) if images else (torch.zeros(0, 1176), torch.zeros(0, 3, dtype=torch.long))
        return build_sample(tokenizer, args, [{"role": "user", "content": text}], pixels, grid, system_prompt=None,
                            add_generation_prompt=True)

    return [prompt("<image>What colour?", Image.new("RGB", (56, 56), (200, 30, 30))),
            prompt("Hi"),
            prompt("A much longer question about shapes and colours, and then <image> look",
                   Image.new("RGB", (84, 56), (0, 0, 200))),
            prompt("<image> and <image> compare", Image.new("RGB", (56, 56), (0, 200, 0)),
                   Image.new("RGB", (56, 56), (9, 9, 9)))]


def training_logprobs(model, args, prompts, completions, temperature: float) -> list[torch.Tensor]:
    """The policy's own token log-probs of each completion (GRPO's old-log-prob forward)."""
    from megatron.core import parallel_state as ps

    from megatron_vr1.rl.grpo import CaptureLogprobs, RolloutSequence, micro_batches, response_sample
    from megatron_vr1.training.step import run_micro_batches

    seqs = [RolloutSequence(response_sample(p, c.token_ids), 0.0) for p, c in zip(prompts, completions)]
    tp = ps.get_tensor_model_parallel_world_size()  # sequence parallel wants a multiple of it
    (batch,) = micro_batches(seqs, args, max_tokens=4096, pad_to=tp, pad_id=0)
    run_micro_batches(model, [batch], CaptureLogprobs("logp", temperature), forward_only=True)
    if "logp" not in batch.extras:  # not the last pipeline stage
        return []
    logp, mask, cu = batch.extras["logp"][0], batch.loss_mask[0], batch.cu_seqlens.tolist()
    return [logp[cu[i]:cu[i + 1]][mask[cu[i]:cu[i + 1]]] for i in range(len(seqs))]


@pytest.fixture(scope="module", params=["continuous", "static"])
def toy(request, model_parallel_1, toy_tokenizer_dir):
    """The toy policy, the hf engine on its weights, and the megatron engine in one batching mode
    (continuous: 16-token KV blocks, so that sequences cross blocks; 3 slots for more requests)."""
    from megatron_vr1.checkpoint import iter_hf_weights
    from megatron_vr1.data import load_tokenizer
    from megatron_vr1.models.qwen2_5_vl import build_model
    from megatron_vr1.rl.rollout import make_engine

    args, layout = model_from_conf(load_model_conf("toy"))
    model = build_model(args, layout, backend="local")
    spread_weights(model)
    tok = load_tokenizer(toy_tokenizer_dir)
    hf = make_engine("hf", args, tok)
    hf.load_weights(iter_hf_weights(model))
    engine = make_engine("megatron", args, tok, policy=model, max_batch=3, batching=request.param, block_size=16)
    return args, tok, model, hf, engine


def test_greedy_tokens_equal_the_hf_engine(toy):
    """Text-only and image prompts, batched (3 per batch: the last batch holds one) and with the
    prompts' lengths all different: the same greedy tokens as transformers' generate."""
    from megatron_vr1.rl.rollout import SamplingParams

    args, tok, model, hf, engine = toy
    prompts = engine_prompts(args, tok)
    params = SamplingParams(n=2, max_new_tokens=24, temperature=0, stop=())
    want, got = hf.generate(prompts, params), engine.generate(prompts, params)
    assert len({len(p) for p in prompts}) == len(prompts)
    for w, g in zip(want, got):
        assert [c.token_ids for c in g] == [c.token_ids for c in w]
        assert [c.finish_reason for c in g] == [c.finish_reason for c in w] == ["length"] * 2
        assert len(set(g[0].token_ids)) > 4  # the model does not just repeat itself
    assert model.training  # the engine gives the policy back in its own mode


def test_kv_cache_fraction_cuts_the_batches_to_what_fits(toy, monkeypatch):
    """With ``kv_cache_fraction`` of a device holding the KV cache and prefill logits of two
    sequences, the engine generates two at a time (not ``max_batch`` 3), with the same tokens."""
    from megatron_vr1 import platform
    from megatron_vr1.models.qwen2_5_vl import ParallelLayout
    from megatron_vr1.planning import rollout_rows
    from megatron_vr1.rl.rollout import SamplingParams, make_engine

    args, tok, model, hf, engine = toy
    prompts = engine_prompts(args, tok)
    params = SamplingParams(n=1, max_new_tokens=8, temperature=0, stop=())
    longest = max(len(p) for p in prompts)
    one = rollout_rows(args, ParallelLayout(), 4, max_batch=10**9, kv_cache_fraction=1.0, prompt_tokens=longest,
                       response_tokens=8, device_bytes=1e12)  # sequences per 1e12 bytes
    monkeypatch.setattr(platform, "device_memory_bytes", lambda: int(1e12 / one * 2.5 / 0.5))
    capped = make_engine("megatron", args, tok, policy=model, max_batch=3, kv_cache_fraction=0.5, batching="static")
    sizes = []
    run_batch = capped._batch
    monkeypatch.setattr(capped, "_batch", lambda rows, *a: sizes.append(len(rows)) or run_batch(rows, *a))
    got = capped.generate(prompts, params)
    assert sizes == [2] * (len(prompts) // 2) + [1] * (len(prompts) % 2)
    assert [c[0].token_ids for c in got] == [c[0].token_ids for c in engine.generate(prompts, params)]
    # continuous batching: two slots, refilled as requests end
    slots = make_engine("megatron", args, tok, policy=model, max_batch=3, kv_cache_fraction=0.5, block_size=16)
    assert [c[0].token_ids for c in slots.generate(prompts, params)] == [c[0].token_ids for c in got]
    assert slots.last_stats.slots == 2 and slots.last_stats.tokens == 8 * len(prompts)


def test_stop_strings_end_a_response_where_the_hf_engine_ends_it(toy):
    """A stop string cuts each response just after the token that completes it, with finish
    reason "stop", like the hf engine (transformers' stop strings)."""
    from megatron_vr1.rl.rollout import SamplingParams

    args, tok, _, hf, engine = toy
    prompts = engine_prompts(args, tok)
    free = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0, stop=()))
    text = free[2][0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip() and stop in text
    params = SamplingParams(max_new_tokens=24, temperature=0, stop=(stop,))
    want, got = hf.generate(prompts, params), engine.generate(prompts, params)
    assert [g[0].token_ids for g in got] == [w[0].token_ids for w in want]
    assert got[2][0].finish_reason == "stop" and stop in got[2][0].text
    assert len(got[2][0].token_ids) < len(free[2][0].token_ids)
    assert stop not in tok.decode(got[2][0].token_ids[:-1], skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["megatron", "hf"])
def test_sampled_log_probs_equal_the_training_forward(toy, kind):
    """Sampling at T=0.7 with top-p: each token's log-prob from the engine, recorded as it was
    drawn, equals the policy's training forward at the same temperature (fp32, 1e-5); the same
    seed gives the same samples, another seed others. Both engines: the rollout correction
    compares exactly these."""
    from megatron_vr1.rl.rollout import SamplingParams

    args, tok, model, hf, megatron = toy
    engine = megatron if kind == "megatron" else hf
    prompts = engine_prompts(args, tok)
    params = SamplingParams(n=2, max_new_tokens=16, temperature=0.7, top_p=0.9, seed=5, stop=())
    got = engine.generate(prompts, params)
    flat = [c for group in got for c in group]
    theirs = training_logprobs(model, args, [p for p in prompts for _ in range(2)], flat, 0.7)
    for c, want in zip(flat, theirs):
        assert len(c.logprobs) == len(c.token_ids) == len(want)
        torch.testing.assert_close(torch.tensor(c.logprobs), want, rtol=0, atol=1e-5)
    again = engine.generate(prompts, params)
    assert [c.token_ids for g in again for c in g] == [c.token_ids for c in flat]
    other = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=16, temperature=0.7, top_p=0.9, seed=6,
                                                    stop=()))
    assert [c.token_ids for g in other for c in g] != [c.token_ids for c in flat]
    assert any(g[0].token_ids != g[1].token_ids for g in got)  # n samples per prompt, not n copies


@pytest.mark.parametrize("tp, engine_tp", [(2, 1), (1, 2)], ids=["tp2-policy-to-tp1-copy", "tp1-policy-to-tp2-copy"])
def test_engine_under_torchrun(tmp_path, toy_tokenizer_dir, tp, engine_tp):
    """Two processes. The policy at TP=``tp`` (sequence parallel at TP=2; two data-parallel
    replicas with their own prompts at TP=1): greedy tokens equal the hf engine's and sampled
    log-probs the training forward's. A TP=``engine_tp`` copy refit from it holds the policy's
    weights bit for bit (checked through the HF name mapping), before and after an optimizer
    step; after the step its rollouts score like the updated policy."""
    from conftest import run_torchrun

    run_torchrun("dist/megatron_engine_worker.py", 2, str(toy_tokenizer_dir), str(tmp_path), str(tp), str(engine_tp))
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result.rank*.json"))]
    assert len(results) == (1 if tp == 2 else 2)
    for r in results:
        assert r["tp"] == tp and r["engine_tp"] == engine_tp
        assert r["greedy_equal"] and r["greedy_tokens"] > 20
        assert r["copy_greedy_equal"]
        assert r["policy_logprob_diff"] <= 1e-5, r
        assert r["refit_mismatches"] == [] and r["refit_tensors"] > 50, r
        assert r["refit_after_step_mismatches"] == [], r
        assert r["logprob_shift_after_step"] > 1e-3, r  # the step changed the policy
        assert r["copy_logprob_diff_after_step"] <= 1e-5, r


def test_paged_attention_equals_dense_causal_attention():
    """The paged-cache attention the CPU uses for megatron-core's dynamic path (flash-attn's two
    paged entry points): requests of different lengths scattered over shuffled 4-token blocks,
    grouped-query heads, a padding row; prefill (varlen) and decode (kvcache) against dense causal
    attention of each request on its own."""
    import torch.nn.functional as F

    from megatron_vr1.models.common.paged_attention import kvcache_paged_attention, varlen_paged_attention

    g = torch.Generator().manual_seed(0)
    bs, hk, hq, d, lengths = 4, 2, 4, 8, [5, 9, 1]
    blocks_per = [(n + bs - 1) // bs for n in lengths]
    order = torch.randperm(sum(blocks_per) + 2, generator=g)
    k_cache = torch.randn(len(order), bs, hk, d, generator=g)
    v_cache = torch.randn(len(order), bs, hk, d, generator=g)
    table = torch.zeros(len(lengths) + 1, max(blocks_per), dtype=torch.int32)  # + one padding row
    at = 0
    for i, n in enumerate(blocks_per):
        table[i, :n] = order[at:at + n]
        at += n
    for i, n in enumerate(lengths):  # past each request's length: garbage, never to be read
        k_cache[table[i, blocks_per[i] - 1], n - (blocks_per[i] - 1) * bs:] = float("nan")
        v_cache[table[i, blocks_per[i] - 1], n - (blocks_per[i] - 1) * bs:] = float("nan")
    k_cache[order[at:]] = v_cache[order[at:]] = float("nan")

    def dense(i: int, q: torch.Tensor) -> torch.Tensor:  # q [lq, hq, d]: the request's last lq positions
        k = k_cache[table[i, :blocks_per[i]].long()].flatten(0, 1)[:lengths[i]].repeat_interleave(hq // hk, 1)
        v = v_cache[table[i, :blocks_per[i]].long()].flatten(0, 1)[:lengths[i]].repeat_interleave(hq // hk, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * d ** -0.5
        pos = torch.arange(lengths[i] - len(q), lengths[i])[:, None]
        scores = scores.masked_fill(torch.arange(lengths[i])[None] > pos, float("-inf"))
        return torch.einsum("hqk,khd->qhd", F.softmax(scores, -1), v)

    q_lens = [3, 9, 1]  # a request with 2 cached tokens and 3 new ones, a whole prompt, a decode
    q = torch.randn(sum(q_lens), hq, d, generator=g)
    cu_q = torch.tensor([0, 3, 12, 13, 13])
    cu_k = torch.tensor([0, 5, 14, 15, 15])
    got = varlen_paged_attention(q, k_cache, v_cache, cu_q, cu_k, 9, 9, block_table=table)
    want = torch.cat([dense(i, q[cu_q[i]:cu_q[i + 1]]) for i in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    q1 = torch.randn(4, 1, hq, d, generator=g)
    got = kvcache_paged_attention(q1, k_cache, v_cache, torch.tensor(lengths + [0], dtype=torch.int32),
                                  block_table=table)
    for i in range(3):
        torch.testing.assert_close(got[i], dense(i, q1[i]), rtol=1e-5, atol=1e-5)
    assert not got[3].any()  # the padding row
