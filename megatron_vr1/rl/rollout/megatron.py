"""Rollout on megatron-core's own generation loop, with the policy's weights (``rl.engine=megatron``).

Generation runs through the model's own wrapper (:class:`Qwen25VLInferenceWrapper`: M-RoPE and
image features) in one of two modes (``batching``):

* ``continuous`` (the default): megatron-core's paged KV cache with slots refilled as sequences
  end (:mod:`.continuous`);
* ``static``: megatron-core's static-batch loop (``TextGenerationController``, the loop under
  ``StaticInferenceEngine(legacy=True)``: prefill, then one token per step over a KV cache),
  ``max_batch`` sequences at a time.

Both, on top of megatron-core:

* stopping at any end token (``<|im_end|>``, ``<|endoftext|>``) or stop string, the finishing token
  kept, as the ``hf`` engine does (megatron-core's loop knows one end id and drops it);
* vision tokens and the padded vocabulary rows are never sampled;
* per-token log-probs at the rollout temperature (``log_softmax(z / T)``, ``T = 1`` for greedy),
  the quantity the GRPO loss uses; sampling draws from a generator seeded per call, leaving the
  caller's RNG as it was.

Two ways to hold the weights:

* the policy itself (the default, ``tensor_parallel: null``): every rank of the replica's TP x PP
  group generates together; nothing is copied, ever;
* a copy in another layout (``tensor_parallel: N``), refit from the policy after every update with
  megatron-core's ``swap_model_weights`` (gloo on the CPU, NCCL on GPUs). Ranks are grouped into
  blocks that hold whole policy replicas and whole engine replicas; a block's prompts are shared
  out over its engine replicas and the completions go back to the replicas that asked.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.inference_request import InferenceRequest
from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
from megatron.core.inference.sampling_params import SamplingParams as MegatronSampling
from megatron.core.inference.text_generation_controllers.text_generation_controller import (
    TextGenerationController,
)

from ... import platform
from ...data.template import Sample
from ...errors import UsageError
from ...models.qwen2_5_vl import Qwen25VLModel
from ...models.qwen2_5_vl.inference import Qwen25VLInferenceWrapper
from .base import END_TOKENS, VISION_TOKENS, Completion, RolloutEngine, SamplingParams, check_batching, finish
from .continuous import DEFAULT_BLOCK_SIZE, BatchStats, generate_continuous

@dataclass(kw_only=True)
class _Request(InferenceRequest):
    sample: Optional[Sample] = None


class _Tokenizer:
    """What megatron-core's loop asks of a tokenizer. The loop pads with ``eod``; it also decodes
    each whole prompt + response, which the engine never reads (it decodes the cut response itself)."""

    def __init__(self, pad_id: int) -> None:
        self.eod = pad_id

    def detokenize(self, tokens, skip_special_tokens: bool = True) -> str:
        return ""


class _Controller(TextGenerationController):
    """megatron-core's static loop with our end conditions, masking and log-probs."""

    def __init__(self, wrapper: Qwen25VLInferenceWrapper, tokenizer, pp_group, *, end_ids: Sequence[int],
                 blocked: Sequence[int]) -> None:
        super().__init__(wrapper, _Tokenizer(end_ids[-1]), pp_group=pp_group)
        self.text_tokenizer = tokenizer
        self.end_ids = torch.tensor(list(end_ids), device=platform.device())
        self.blocked = torch.tensor(sorted(set(blocked)), dtype=torch.long, device=platform.device())
        self.logp_temperature = 1.0
        self.stop: tuple[str, ...] = ()
        self._pieces: dict[int, str] = {}

    # ---- per batch
    def prep_inference_input(self, prompts_tokens: torch.Tensor, active_requests, use_attention_mask: bool = False):
        samples = [r.sample for r in active_requests.values()]
        self.step_logprobs: list[torch.Tensor] = []  # one [B] row per loop step
        self.first_column = min(len(x) for x in samples)  # the column the first step samples
        self.reset_stop_tails()
        return self.inference_wrapped_model.prep_inference_input(prompts_tokens, samples)

    def sample_from_logits(self, last_token_logits: torch.Tensor, sampling_params=None, vocab_size=None,
                           generation_started=None, top_n_logprobs_dict=None, logits=None, **kwargs) -> torch.Tensor:
        token, logp = self.pick(last_token_logits, sampling_params, vocab_size)
        self.step_logprobs.append(logp)
        return token

    def pick(self, logits: torch.Tensor, params, vocab_size=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row of ``logits [B, V]`` (vision tokens and padded rows excluded) and the
        training forward's log-prob of it (every logit column, unmasked, at ``logp_temperature``)."""
        z = logits.float()
        allowed = z.index_fill(1, self.blocked, float("-inf")) if self.blocked.numel() else z
        token = self._torch_sampling_func(allowed, params.temperature, params.top_k, params.top_p, vocab_size)
        logp = torch.log_softmax(z / self.logp_temperature, dim=-1).gather(1, token[:, None])[:, 0]
        return token, logp

    def update_generation_status(self, updated_prompts_tokens, generation_started, current_context_end_position,
                                 is_generation_done_tensor, generated_sequence_lengths, termination_id=None):
        latest = updated_prompts_tokens[:, current_context_end_position]
        live = generation_started & ~is_generation_done_tensor
        ended = torch.isin(latest, self.end_ids) & live
        if self.stop:
            ended |= self.stop_hits(latest, range(len(latest)), live)
        generated_sequence_lengths += live  # the token that ends a response is part of it
        return is_generation_done_tensor | ended, generated_sequence_lengths.int()

    def reset_stop_tails(self) -> None:
        self._tails: dict[int, str] = {}

    def stop_hits(self, latest: torch.Tensor, keys, live: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows whose text now holds a stop string. ``keys``: each row's request (its text so far
        is kept by key). Each request keeps the tail of its decoded text (tokens decoded one by
        one, cached; enough for ASCII stop strings; ``finish`` cuts exactly)."""
        keep = max(len(s) for s in self.stop) + 16
        on = live.tolist() if live is not None else [True] * len(latest)
        hits = torch.zeros(len(latest), dtype=torch.bool, device=latest.device)
        for i, (token, key, active) in enumerate(zip(latest.tolist(), keys, on)):
            if not active:
                continue
            piece = self._pieces.get(token)
            if piece is None:
                piece = self._pieces[token] = self.text_tokenizer.decode([token], skip_special_tokens=True)
            tail = self._tails[key] = (self._tails.get(key, "") + piece)[-keep:]
            hits[i] = any(s in tail for s in self.stop)
        return hits


class MegatronEngine(RolloutEngine):
    spmd = True

    def __init__(self, args, tokenizer, *, policy: Qwen25VLModel, dtype: torch.dtype = torch.float32,
                 max_batch: int = 64, tensor_parallel: Optional[int] = None,
                 kv_cache_fraction: Optional[float] = None, batching: str = "continuous",
                 block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        check_batching(batching, block_size)
        self.args, self.tokenizer, self.max_batch = args, tokenizer, max_batch
        self.batching, self.block_size = batching, int(block_size)
        self.last_stats = BatchStats()
        self.kv_cache_fraction = kv_cache_fraction
        self.policy = policy
        self.end_ids = [tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS]
        if tensor_parallel is None:
            self.model = policy
            self._mp_group = _policy_mp_group()
        else:
            self.model, self._mp_group = _refit_copy(args, policy, int(tensor_parallel), dtype)
        model = self.model
        blocked = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
        blocked += range(args.vocab_size, model.padded_vocab_size)  # padding rows of the vocabulary
        config = InferenceWrapperConfig(hidden_size=args.hidden_size, params_dtype=model.config.params_dtype,
                                        inference_batch_times_seqlen_threshold=-1,
                                        padded_vocab_size=model.padded_vocab_size, inference_max_requests=max_batch,
                                        inference_max_seq_length=1 << 30)
        wrapper = Qwen25VLInferenceWrapper(model, config, StaticInferenceContext(1, 1),
                                           pg_collection=model.pg_collection)
        self.controller = _Controller(wrapper, tokenizer, model.pg_collection.pp, end_ids=self.end_ids,
                                      blocked=blocked)
        self._blocks = _Blocks(_policy_mp_group(), self._mp_group)

    # ---- weights
    def sync_from(self, policy, bucket_bytes: int) -> None:
        if policy is not self.policy:
            raise ValueError("the megatron engine was built on another policy model")
        if self.model is not policy:
            from megatron.core.resharding.refit import swap_model_weights

            swap_model_weights([policy], [self.model], refit_method=_copy_service())

    def load_weights(self, buckets) -> int:
        raise NotImplementedError("the megatron engine takes the policy's weights with sync_from, not HF buckets")

    # ---- generation
    def generate(self, prompts: Sequence[Sample], params: SamplingParams) -> list[list[Completion]]:
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {params.max_new_tokens}")
        return self._blocks.run(list(prompts), params.seed, lambda mine, seed: self._generate(mine, params, seed))

    def _generate(self, prompts: list[Sample], params: SamplingParams, seed: int) -> list[list[Completion]]:
        if not prompts:
            return []
        greedy = params.temperature <= 0
        copies = 1 if greedy else params.n
        sampling = MegatronSampling(
            temperature=1.0 if greedy else float(params.temperature), top_k=1 if greedy else 0,
            top_p=0.0 if greedy or params.top_p >= 1.0 else float(params.top_p),
            num_tokens_to_generate=params.max_new_tokens)
        ctl = self.controller
        ctl.logp_temperature = 1.0 if greedy else float(params.temperature)
        ctl.stop = tuple(params.stop)
        ctl.sampling_rng.manual_seed(int(seed))
        rows = [p for p in prompts for _ in range(copies)]
        flat: list[Completion] = []
        step = self.rows_per_batch(max(len(r) for r in rows), params.max_new_tokens)
        self.last_stats = BatchStats(slots=step)
        with _generation_mode(self.model):
            if self.batching == "continuous":
                flat = generate_continuous(self, rows, sampling, params, step, self.block_size, self.last_stats)
            else:
                for start in range(0, len(rows), step):
                    flat += self._batch(rows[start:start + step], sampling, params)
        if greedy:
            return [[Completion(list(c.token_ids), c.text, c.finish_reason, c.logprobs) for _ in range(params.n)]
                    for c in flat]
        return [flat[i * copies:(i + 1) * copies] for i in range(len(prompts))]

    def rows_per_batch(self, prompt_tokens: int, new_tokens: int) -> int:
        """``max_batch``, or fewer where ``kv_cache_fraction`` of the accelerator's memory would not
        hold their KV cache and prefill logits (the planner's own formula); at least one."""
        from ...planning import rollout_rows

        model = self.model
        return rollout_rows(self.args, model.layout, model.config.params_dtype.itemsize, max_batch=self.max_batch,
                            kv_cache_fraction=self.kv_cache_fraction, prompt_tokens=prompt_tokens,
                            response_tokens=new_tokens, device_bytes=platform.device_memory_bytes())

    def _batch(self, samples: list[Sample], sampling: MegatronSampling, params: SamplingParams) -> list[Completion]:
        requests = OrderedDict(
            (i, _Request(request_id=i, prompt="", prompt_tokens=x.input_ids.tolist(), sampling_params=sampling,
                         sample=x)) for i, x in enumerate(samples))
        ctl = self.controller
        done = ctl.generate_all_output_tokens_static_batch(requests)
        steps = torch.stack(ctl.step_logprobs).cpu() if ctl.step_logprobs else torch.zeros(0, len(samples))
        out = []
        self.last_stats.steps += len(ctl.step_logprobs)
        self.last_stats.slot_steps += len(ctl.step_logprobs) * len(samples)
        for i, request in done.items():
            ids = request.generated_tokens.tolist()
            self.last_stats.tokens += len(ids)
            first = len(samples[i]) - ctl.first_column  # the step that sampled this row's first token
            logps = steps[first:first + len(ids), i].tolist()
            out.append(finish(ids, self.tokenizer, self.end_ids, params.stop, logps))
        return out


_SP_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


class _generation_mode:
    """Eval mode and no sequence parallelism (megatron-core's static loop has none) while
    generating; afterwards the model's own mode and every switch as it was."""

    def __init__(self, model: Qwen25VLModel) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.training = self.model.training
        self.switches = [(m, a, getattr(m, a)) for m in self.model.modules() for a in _SP_ATTRS
                         if isinstance(getattr(m, a, None), bool)]
        self.sp = self.model.config.sequence_parallel
        for m, a, _ in self.switches:
            setattr(m, a, False)
        self.model.config.sequence_parallel = False

    def __exit__(self, *exc) -> None:
        for m, a, value in self.switches:
            setattr(m, a, value)
        self.model.config.sequence_parallel = self.sp
        self.model.train(self.training)


def _policy_mp_group():
    from megatron.core import parallel_state as ps

    return ps.get_model_parallel_group()


_SERVICE = None


def _copy_service():
    global _SERVICE
    if _SERVICE is None:
        _SERVICE = platform.refit_copy_service()
    return _SERVICE


def _refit_copy(args, policy: Qwen25VLModel, tensor_parallel: int, dtype: torch.dtype):
    """An engine-layout copy of the policy (TP = ``tensor_parallel``, no PP) on its own process
    groups, and its model-parallel group. Its weights arrive by refit."""
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from megatron.core.process_groups_config import ProcessGroupCollection

    from ...models.qwen2_5_vl import ParallelLayout

    world = dist.get_world_size()
    if tensor_parallel < 1 or world % tensor_parallel:
        raise UsageError(f"rl.engine_options.tensor_parallel ({tensor_parallel}) must divide the world size ({world})")
    if args.num_heads % tensor_parallel or args.num_kv_heads % tensor_parallel:
        raise UsageError(f"rl.engine_options.tensor_parallel ({tensor_parallel}) must divide the model's attention "
                         f"heads ({args.num_heads}) and KV heads ({args.num_kv_heads})")
    grid = HyperCommGrid([tensor_parallel, 1, world // tensor_parallel, 1], ["tp", "cp", "dp", "pp"],
                         backend=platform.dist_backend())
    groups = ProcessGroupCollection()
    for name in ("tp", "cp", "dp", "pp"):
        setattr(groups, name, grid.create_pg(name))
    groups.tp_cp = grid.create_pg(["tp", "cp"])
    groups.dp_cp = grid.create_pg(["cp", "dp"])
    groups.mp = grid.create_pg(["tp", "pp"])
    groups.embd = groups.pos_embd = None
    layout = ParallelLayout(tensor_parallel=tensor_parallel)
    # Initialised, although refit overwrites every weight: megatron-core's linear layers mark
    # their tensor-parallel sharding (which refit plans from) only when they initialise.
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    states = tracker.get_states()
    devices = [torch.cuda.current_device()] if platform.has_cuda() else []
    with torch.random.fork_rng(devices=devices):  # building draws nothing from the trainer's RNG
        copy = Qwen25VLModel(args, layout, backend=policy.backend, dtype=dtype,
                             padded_vocab_size=policy.padded_vocab_size, pg_collection=groups)
    tracker.set_states(states)
    if platform.has_cuda():
        copy = copy.cuda()
    copy.requires_grad_(False)
    return copy.eval(), groups.mp


class _Blocks:
    """Sets of ranks closed under both the policy's and the engine's model-parallel groups.

    With the policy itself as engine every block is one replica's group and nothing moves. With
    a copy in another layout, a block's policy replicas pool their prompts, its engine replicas
    each generate a contiguous share, and every policy replica gets its own completions back.
    """

    def __init__(self, policy_group, engine_group) -> None:
        mine = (tuple(dist.get_process_group_ranks(policy_group)), tuple(dist.get_process_group_ranks(engine_group)))
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        self.trivial = all(p == e for p, e in every)
        parent = list(range(len(every)))

        def root(r: int) -> int:
            while parent[r] != r:
                parent[r] = parent[parent[r]]
                r = parent[r]
            return r

        for group in {g for pair in every for g in pair}:
            for r in group[1:]:
                parent[root(r)] = root(group[0])
        blocks = sorted({tuple(r for r in range(len(every)) if root(r) == root(q)) for q in range(len(every))})
        me = dist.get_rank()
        self.group = None
        for block in blocks:  # every rank creates every group, in the same order
            group = dist.new_group(list(block), backend="gloo") if len(block) > 1 and not self.trivial else None
            if me in block:
                self.group, self.ranks = group, block
        self.policy_replicas = sorted({every[r][0] for r in self.ranks})
        self.engine_replicas = sorted({every[r][1] for r in self.ranks})
        self.my_policy, self.my_engine = mine

    def run(self, prompts: list, seed: int, generate) -> list:
        if self.trivial or self.group is None:  # a lone rank holds whole replicas of both
            return generate(prompts, seed)
        leader = dist.get_rank() == self.my_policy[0]
        shared: list = [None] * len(self.ranks)
        dist.all_gather_object(shared, (self.my_policy, prompts if leader else None, seed), group=self.group)
        asked = {p: (ps, s) for p, ps, s in shared if ps is not None}
        pooled = [x for p in self.policy_replicas for x in asked[p][0]]
        k, n = len(self.engine_replicas), len(pooled)
        bounds = [n * i // k for i in range(k + 1)]
        at = self.engine_replicas.index(self.my_engine)
        # one seed per block (its first replica's): the engine replicas draw from distinct streams
        outs = generate(pooled[bounds[at]:bounds[at + 1]], asked[self.policy_replicas[0]][1] + at)
        results: list = [None] * len(self.ranks)
        engine_leader = dist.get_rank() == self.my_engine[0]
        dist.all_gather_object(results, (self.my_engine, outs if engine_leader else None), group=self.group)
        done = {e: o for e, o in results if o is not None}
        flat = [c for e in self.engine_replicas for c in done[e]]
        start = sum(len(asked[p][0]) for p in self.policy_replicas[:self.policy_replicas.index(self.my_policy)])
        return flat[start:start + len(prompts)]
