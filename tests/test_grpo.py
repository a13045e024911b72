"""GRPO pieces in one process: one update against the textbook, engine weight sync, PTST stages."""

import pytest
import torch

import textbook
from megatron_vr1.config import load_model_conf, model_from_conf


@pytest.fixture(scope="module")
def toy(model_parallel_1):
    from megatron_vr1.models.qwen2_5_vl import build_model

    args, layout = model_from_conf(load_model_conf("toy"))
    torch.manual_seed(0)
    return args, layout, build_model(args, layout, backend="local")


def _sequences(args, tokenizer):
    from megatron_vr1.data import build_sample, process_images
    from megatron_vr1.rl.grpo import RolloutSequence, response_sample
    from PIL import Image

    prompt = build_sample(tokenizer, args, [{"role": "user", "content": "<image>What colour is the shape?"}],
                          *process_images([Image.new("RGB", (56, 56), (200, 30, 30))]), system_prompt=None,
                          add_generation_prompt=True)
    replies = ["<think> red </think><answer> red </answer>", "<think> it is blue </think><answer> blue </answer>"]
    return [RolloutSequence(response_sample(prompt, tokenizer(r, add_special_tokens=False)["input_ids"] + [492]), a)
            for r, a in zip(replies, (1.3, -0.7))]


def test_one_grpo_update_equals_the_textbook(toy, toy_tokenizer_dir):
    """The loss and every parameter's gradient of one GRPO micro-batch (two packed sequences) equal
    the textbook formula in float64 from the same logits, with the PPO clip, the dual clip and the
    k3 KL term all active on some tokens."""
    from megatron_vr1.data import load_tokenizer
    from megatron_vr1.rl.grpo import GRPOObjective, LossSettings, micro_batches
    from megatron_vr1.training.optimizer import OptimizerSettings, wrap_and_optimize
    from megatron_vr1.training.step import run_micro_batches

    from megatron_vr1.models.qwen2_5_vl import build_model

    args, layout, model = toy
    tok = load_tokenizer(toy_tokenizer_dir)
    policy, reference_model = (build_model(args, layout, backend="local") for _ in range(2))
    for copy_ in (policy, reference_model):
        copy_.load_state_dict(model.state_dict())
    ddp, _, _ = wrap_and_optimize(policy, OptimizerSettings(lr=0.0, warmup_ratio=0.0), 1)
    (batch,) = micro_batches(_sequences(args, tok), args, max_tokens=512, pad_to=1, pad_id=490)
    mask = batch.loss_mask[0]
    labels = batch.labels[0]
    with torch.no_grad():
        logits = reference_model(**batch.model_inputs())[0].double()
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0].float()
    g = torch.Generator().manual_seed(1)
    # old log-probs that put ratios inside and outside the clip range; a reference far enough for k3
    old = torch.where(mask, logp + torch.randn(len(logp), generator=g) * 0.4, 0.0)
    cu = batch.cu_seqlens.tolist()
    for start in cu[:-1]:  # a ratio of e^3 in each sequence: the PPO clip (A > 0) and the dual clip (A < 0)
        row = start + int(mask[start:].nonzero()[2, 0])
        old[row] = logp[row] - 3.0
    ref = torch.where(mask, logp + torch.randn(len(logp), generator=g) * 0.3, 0.0)
    adv = batch.extras["advantages"][0]
    settings = LossSettings(clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0, kl_beta=0.1, entropy=False)
    batch.extras.update(old_logprobs=old[None], ref_logprobs=ref[None])

    # textbook: float64 from the reference copy's logits, token mean over the loss mask
    params = dict(reference_model.named_parameters())
    reference_model.zero_grad()
    out = reference_model(**batch.model_inputs())[0]
    loss, _, kl = textbook.grpo(out, labels.clamp(min=0), old, ref, adv, mask, temperature=1.0, clip_low=0.2,
                                clip_high=0.28, kl_beta=0.1, clip_ratio_c=3.0)
    expected = loss.sum() / mask.sum()
    expected.backward()
    ratio = torch.exp(logp.double() - old.double())
    live = mask & (adv.double() != 0)
    assert ((ratio > 1.28) & (adv > 0) & live).any() or ((ratio < 0.8) & (adv < 0) & live).any()  # PPO clip acts
    assert ((ratio < 1.28) & (ratio > 0.8) & live).any()  # and some tokens are inside it
    assert ((ratio > 3.0) & (adv < 0) & live).any()  # the dual clip acts
    assert (kl[mask] > 1e-3).float().mean() > 0.5  # the KL term acts on most tokens

    totals = run_micro_batches(ddp, [batch], GRPOObjective(settings, temperature=1.0, max_response_tokens=32))
    assert totals[0].item() / totals[1].item() == pytest.approx(expected.item(), rel=1e-5)
    worst = 0.0
    for name, p in policy.named_parameters():
        want = params[name].grad
        assert want is not None, name
        worst = max(worst, ((p.main_grad - want).abs().max() / want.abs().max().clamp(min=1e-12)).item())
    assert worst < 1e-4, worst


def test_engine_log_probs_equal_the_policy_after_a_sync(toy, toy_tokenizer_dir):
    """After weight sync through the one name mapping, the hf engine scores a rollout like the
    Megatron policy's own forward (fp32, 1e-4)."""
    from megatron_vr1.checkpoint import iter_hf_weights
    from megatron_vr1.data import load_tokenizer
    from megatron_vr1.rl.grpo import CaptureLogprobs, micro_batches
    from megatron_vr1.rl.rollout import SamplingParams, make_engine
    from megatron_vr1.training.step import run_micro_batches

    args, layout, model = toy
    tok = load_tokenizer(toy_tokenizer_dir)
    engine = make_engine("hf", args, tok)
    engine.load_weights(iter_hf_weights(model))
    seqs = _sequences(args, tok)
    (batch,) = micro_batches(seqs, args, max_tokens=512, pad_to=1, pad_id=490)
    run_micro_batches(model, [batch], CaptureLogprobs("logp", 1.0), forward_only=True)
    ours = batch.extras["logp"][0]
    cu = batch.cu_seqlens.tolist()
    for i, seq in enumerate(seqs):
        ids = seq.sample.input_ids[None]
        rows = slice(cu[i], cu[i + 1])
        with torch.no_grad():
            logits = engine.model(input_ids=ids, pixel_values=seq.sample.pixel_values,
                                  image_grid_thw=seq.sample.image_grid_thw,
                                  mm_token_type_ids=(ids == args.image_token_id).int()).logits[0]
        theirs = torch.log_softmax(logits.float(), -1).gather(-1, batch.labels[0, rows].clamp(min=0)[:, None])[:, 0]
        keep = batch.loss_mask[0, rows]
        torch.testing.assert_close(theirs[keep], ours[rows][keep], rtol=1e-4, atol=1e-4)
    # and it generates reproducibly from the seed
    params = SamplingParams(n=3, max_new_tokens=8, seed=3)
    prompt = _sequences(args, tok)[0].sample
    first = engine.generate([prompt], params)
    assert [c.token_ids for c in first[0]] == [c.token_ids for c in engine.generate([prompt], params)[0]]
    assert all(c.finish_reason in ("stop", "length") and len(c.token_ids) <= 8 for c in first[0])


def test_stages_name_their_steps_and_refuse_bad_entries():
    from megatron_vr1.errors import UsageError
    from megatron_vr1.rl.ptst import parse_stages, stage_at

    stages = parse_stages([{"max_response_tokens": 4096, "group_size": 16, "steps": 100},
                           {"max_response_tokens": 8192, "group_size": 8, "steps": 100, "prompts_per_step": 64}])
    assert [stage_at(stages, s).index for s in (1, 100, 101, 200)] == [1, 1, 2, 2]
    assert stage_at(stages, 101).group_size == 8 and stage_at(stages, 101).prompts_per_step == 64
    with pytest.raises(UsageError, match="needs group_size"):
        parse_stages([{"max_response_tokens": 10, "steps": 1}])
    with pytest.raises(UsageError, match="unknown keys"):
        parse_stages([{"max_response_tokens": 10, "steps": 1, "group_size": 2, "temperature": 1}])
    with pytest.raises(ValueError, match="past the last stage"):
        stage_at(stages, 201)


def test_engine_log_probs_equal_the_policy_at_tp2(tmp_path, toy_tokenizer_dir):
    import json

    from conftest import run_torchrun

    run_torchrun("dist/engine_worker.py", 2, str(toy_tokenizer_dir), str(tmp_path / "result.json"), "2")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["tp"] == 2 and result["tokens"] > 10
    assert result["max_diff"] <= 1e-4, result


def _text_sequences(n: int, seed: int):
    """``n`` text-only prompt + response sequences of varied lengths (no images)."""
    from megatron_vr1.data.template import Sample
    from megatron_vr1.rl.grpo import RolloutSequence, response_sample

    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        p = int(torch.randint(3, 9, (1,), generator=g))
        prompt = Sample(torch.randint(0, 400, (p,), generator=g), torch.zeros(p, dtype=torch.bool),
                        torch.arange(p).expand(3, p), torch.zeros(0, 1176), torch.zeros(0, 3, dtype=torch.long))
        response = torch.randint(0, 400, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        seqs.append(RolloutSequence(response_sample(prompt, response), float(i)))
    return seqs


@pytest.mark.parametrize("cp", [1, 2])
def test_each_ppo_epoch_splits_anew_and_the_log_probs_follow_their_tokens(cp):
    """Every PPO epoch takes its own split of the step's sequences into mini-batches (each a
    partition of them); old and reference log-probs captured on the first epoch's micro-batches
    land on the very same tokens in a later epoch's, also on context-parallel shares."""
    from megatron_vr1.rl.grpo import SEQUENCE, TokenValues, micro_batches, mini_batches

    seqs = _text_sequences(23, seed=5)
    splits = [mini_batches(seqs, 3, seed) for seed in (11, 12, 13)]
    for split in splits:
        assert sorted(i for part in split for i in part) == list(range(23))
    assert splits[0] != splits[1] and splits[1] != splits[2]

    def plan(split, rank):
        return [[b.context_shard(cp, rank) for b in micro_batches(
            seqs, None, max_tokens=40, pad_to=2 * cp if cp > 1 else 1, pad_id=0,
            sequence_multiple=2 * cp if cp > 1 else 1, indices=part)] for part in split]

    def truth(batch):  # a value of the token itself: its sequence and its position there (text: all alike)
        return torch.where(batch.loss_mask, 1000.0 * batch.extras[SEQUENCE] + batch.position_ids[0], 0.0)

    for rank in range(cp):  # each rank keeps its own share's values
        first = [b for part in plan(splits[0], rank) for b in part]
        for b in first:
            b.extras["old_logprobs"] = truth(b)
            b.extras["ref_logprobs"] = -truth(b)
        kept = TokenValues(first, ("old_logprobs", "ref_logprobs"))
        later = [kept.attach(b) for part in plan(splits[1], rank) for b in part]
        assert sum(int(b.loss_mask.sum()) for b in later) == sum(int(b.loss_mask.sum()) for b in first) > 0
        for b in later:
            torch.testing.assert_close(b.extras["old_logprobs"], truth(b), rtol=0, atol=0)
            torch.testing.assert_close(b.extras["ref_logprobs"], -truth(b), rtol=0, atol=0)


@pytest.mark.parametrize("cp", [1, 2])
@pytest.mark.parametrize("mode", ["token-tis", "sequence-tis", "token-mask"])
def test_rollout_correction_weights_are_the_textbook_formula(mode, cp):
    """Each loss token's weight from the engine's and the trainer's log-probs, against the
    formula in float64 per (sequence, response token): packed micro-batches, and context-parallel
    shares whose sequence-level sums add over the ranks."""
    import math

    from megatron_vr1.rl import correction
    from megatron_vr1.rl.grpo import SEQUENCE, RolloutSequence, micro_batches

    cap = 1.5
    seqs = _text_sequences(9, seed=7)
    g = torch.Generator().manual_seed(1)
    prompt_len = [int((~s.sample.loss_mask).sum()) for s in seqs]
    engine = [(-3 * torch.rand(int(s.sample.loss_mask.sum()), generator=g)).tolist() for s in seqs]
    old = [[e + 0.6 * float(torch.randn(1, generator=g)) for e in seq] for seq in engine]

    def shards(values, rank):
        with_values = [RolloutSequence(s.sample, s.advantage, v) for s, v in zip(seqs, values)]
        multiple = 2 * cp if cp > 1 else 1
        return [b.context_shard(cp, rank) if cp > 1 else b for b in micro_batches(
            with_values, None, max_tokens=40, pad_to=multiple, pad_id=0, sequence_multiple=multiple)]

    ranks = []
    for rank in range(cp):
        batches, olds = shards(engine, rank), shards(old, rank)
        for b, o in zip(batches, olds):
            b.extras["old_logprobs"] = o.extras["engine_logprobs"]
        ranks.append(batches)
    total = sum(correction.sequence_log_ratios(b, len(seqs), SEQUENCE) for b in ranks)  # the all-reduce
    for batches in ranks:
        correction.set_weights(batches, mode, cap, SEQUENCE, total if mode == "sequence-tis" else None)
        for b in batches:
            keep = b.loss_mask.reshape(-1)
            seq = b.extras[SEQUENCE].reshape(-1)[keep] - 1
            pos = b.position_ids[0].reshape(-1)[keep]
            got = b.extras[correction.WEIGHTS].reshape(-1)[keep]
            for s, p, w in zip(seq.tolist(), pos.tolist(), got.tolist()):
                k = p + 1 - prompt_len[s]  # the loss row at position p predicts response token k
                if mode == "token-tis":
                    want = min(math.exp(old[s][k] - engine[s][k]), cap)
                elif mode == "sequence-tis":
                    want = min(math.exp(sum(old[s]) - sum(engine[s])), cap)
                else:
                    want = float(1 / cap <= math.exp(old[s][k] - engine[s][k]) <= cap)
                assert w == pytest.approx(want, rel=1e-6), (mode, s, k)
    weights = torch.cat([b.extras[correction.WEIGHTS][b.loss_mask] for bs in ranks for b in bs])
    assert weights.min() < weights.max()  # the case reaches both sides of the cap


def test_rl_settings_refuse_unknown_options_and_bad_bounds():
    """The trainer's own check of rl.loss / rl.reward (a config built in code, not through the
    command line's check): unknown keys and out-of-range values name themselves."""
    from omegaconf import OmegaConf

    from megatron_vr1.errors import UsageError
    from megatron_vr1.rl.settings import check_rl_settings

    def rl(**over):
        base = {"loss": {"kl_beta": 0.01, "kl_max": 10.0, "advantage_std": "unbiased"}, "reward": {"workers": 2}}
        for key, value in over.items():
            section, name = key.split("__")
            base[section][name] = value
        return OmegaConf.create(base)

    loss, reward = check_rl_settings(rl(reward__shuffle=True, loss__kl_max=None))
    assert (loss.kl_max, reward.shuffle, reward.workers, reward.require_final_answer) == (None, True, 2, True)
    for over, message in [({"loss__kl_maximum": 5}, r"unknown option\(s\) rl.loss.kl_maximum; rl.loss has .*kl_max"),
                          ({"reward__shufle": True}, r"unknown option\(s\) rl.reward.shufle; rl.reward has .*shuffle"),
                          ({"loss__kl_max": -1.0}, r"rl.loss.kl_max must be > 0"),
                          ({"reward__timeout": 0}, r"rl.reward.timeout > 0"),
                          ({"reward__warn_timeout_share": 2}, r"warn_timeout_share must lie in \[0, 1\]"),
                          ({"loss__rollout_correction": "tis"}, r"rollout_correction must be null, token-tis, "),
                          ({"loss__rollout_correction_cap": 0.5}, r"rollout_correction_cap must be a finite number >= 1")]:
        with pytest.raises(UsageError, match=message):
            check_rl_settings(rl(**over))
