"""GRPO with attention rewards (SAYO r_v, AVAR r_vis), on the shared trainer core (`loop.Recipe`).

One rollout batch, in three separate steps (an external engine could replace step 1: it only has to return
`Completions`):

1. generate  (`generate_completions`): each prompt G times (`rollout.group_size`), sampled with the rollout's
   temperature / top-p / top-k, at most `rollout.max_completion_length` new tokens.
2. score     (`score_completions`): ONE no-grad teacher-forced forward of the patched policy over
   prompt + completion gives the old log-probs, the token entropies and the attention masses (all layers,
   O(N) memory) the rewards need; the frozen reference's log-probs come from the reference (the disabled LoRA
   adapter, or a second copy of the initial model; not loaded at all when beta = 0).
3. reward    (`compute_rewards`): the components of `objective.rewards` (name -> weight), each ONE scalar per
   sequence (attn_mod.trainers.rewards), combined with optional correctness gating.

Then `objective.num_iterations` optimizer steps reuse the rollout batch. Per completion token t of sequence n
(valid tokens only: up to and including the first EOS), with log-probs of softmax(logits / T):

    A_n       = (r_n - mean_group(r)) / (std_group(r) + 1e-4)          std: unbiased (n - 1), as TRL
    ratio_nt  = exp(logp_nt - logp_old_nt)
    l_nt      = -min(ratio_nt A_n, clip(ratio_nt, 1 - eps_low, 1 + eps_high) A_n) + beta * kl_nt
    kl_nt     = exp(logp_ref_nt - logp_nt) - (logp_ref_nt - logp_nt) - 1    (k3 estimator, >= 0)
    L         = sum_{n,t} l_nt / #tokens                   (loss_aggregation: token, DAPO; per micro-batch)
              | mean_n (sum_t l_nt / L_n)                  (loss_aggregation: sequence)

eps_low = objective.epsilon (0.2), eps_high = objective.epsilon_high (default eps_low). clip_frac = share of
valid tokens where the clipped branch is active (ratio < 1 - eps_low with A < 0, or ratio > 1 + eps_high with
A > 0). Sequence rewards give one advantage per sequence, applied once to each of its tokens.

Metrics per optimizer step: step, loss, reward (weighted total), reward/<name> (each component, unweighted,
0 where undefined), reward_undefined/<name> (completions without that reward: no box / no system turn),
kl (null when beta = 0), entropy (mean over valid completion tokens), completion_length, clip_frac, vas (AVAR
VAS, ratio form, over the completion rows), target_attention (mean SAYO target attention score R_a(i) over the
completion rows of the samples with a box, last layer; `attention_metrics`), lr.

Micro-batches: `schedule.batch_size` prompts x G completions each; groups never straddle micro-batches.
Rollouts are regenerated at steps 1, 1 + num_iterations, ...; the prompts advance once per rollout batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence, Union

import torch

from ..capture import capture
from ..categories import SYSTEM, TARGET
from ..metrics import target_attention_from_masses, vas_from_masses
from . import rewards as R
from .data import TOKEN_KEYS, Batch
from .loop import Recipe, StepOutput

REWARD_NAMES = ("accuracy", "sayo", "avar_visual", "format")
ATTENTION_REWARD_NAMES = ("sayo", "avar_visual")


# ============================================================================================== config
@dataclass
class SayoRewardConfig:
    rows: Literal["decision", "emitted"] = "decision"   # attention row of token t: p_t - 1 | p_t (released code)
    top_frac: float = 0.3                                # SAYO: top 30 % entropy tokens
    eps: float = 1e-8

    def validate(self):
        if not 0 < self.top_frac <= 1:
            raise ValueError(f"objective.sayo.top_frac must lie in (0, 1], got {self.top_frac}")


@dataclass
class AvarRewardConfig:
    layers: Union[str, list[int]] = "all"    # DESIGN default all; the released AVAR GRPO script used 0-7
    heads: Optional[list[int]] = None
    eps: float = 1e-6

    def validate(self):
        if isinstance(self.layers, str) and self.layers != "all":
            raise ValueError(f"objective.avar_visual.layers must be 'all' or a list of indices, got {self.layers!r}")


@dataclass
class FormatRewardConfig:
    pattern: Optional[str] = None            # default <think>...</think><answer>...</answer> (rewards.DEFAULT_FORMAT)
    max_length: Optional[int] = None         # length shaping (off): soft over-length penalty up to L_max tokens
    length_buffer: Optional[int] = None


@dataclass
class GRPOObjective:
    rewards: dict[str, float] = field(default_factory=lambda: {"sayo": 1.0, "format": 1.0})
    gate_on: Optional[str] = None            # "accuracy": attention rewards count only for correct completions
    beta: float = 0.0                        # k3 KL coefficient (0: no reference model is loaded)
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None     # None: = epsilon (symmetric clip)
    loss_aggregation: Literal["token", "sequence"] = "token"
    num_iterations: int = 1                  # policy updates per rollout batch
    advantage_eps: float = 1e-4
    sayo: SayoRewardConfig = field(default_factory=SayoRewardConfig)
    avar_visual: AvarRewardConfig = field(default_factory=AvarRewardConfig)
    format: FormatRewardConfig = field(default_factory=FormatRewardConfig)

    def validate(self):
        if not self.rewards:
            raise ValueError("objective.rewards must name at least one reward: " + ", ".join(REWARD_NAMES))
        bad = [k for k in self.rewards if k not in REWARD_NAMES]
        if bad:
            raise ValueError(f"objective.rewards: unknown reward {bad[0]!r}; known: {', '.join(REWARD_NAMES)}")
        if self.gate_on is not None and self.gate_on not in self.rewards:
            raise ValueError(f"objective.gate_on={self.gate_on!r} must be one of the rewards {sorted(self.rewards)}")
        if self.beta < 0 or self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ValueError("objective.beta must be >= 0 and objective.epsilon / epsilon_high > 0")
        if self.num_iterations < 1:
            raise ValueError(f"objective.num_iterations must be >= 1, got {self.num_iterations}")
        if self.advantage_eps <= 0:
            raise ValueError("objective.advantage_eps must be > 0")


@dataclass
class GRPORollout:
    engine: Literal["hf"] = "hf"             # generation engine (the HF policy itself); scoring is separate
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    max_completion_length: int = 256

    def validate(self):
        if self.group_size < 2:
            raise ValueError(f"rollout.group_size must be >= 2 (group-normalised advantages), got {self.group_size}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("rollout.temperature must be > 0 and rollout.top_p in (0, 1]")
        if self.max_completion_length < 1:
            raise ValueError("rollout.max_completion_length must be >= 1")


# ======================================================================================== the math
def token_logps_and_entropy(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                            suppress: Sequence[int] = ()):
    """logits (N, T, V) of the decision rows of tokens ids (N, T) -> (log p(ids), entropy), both (N, T), of
    softmax(logits / temperature), in float32 (float64 for a float64 model). `suppress`: token ids the sampler
    never emits (visual placeholders), removed from the distribution (logit -inf) exactly as in generation."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if len(suppress):
        z = z.index_fill(-1, torch.as_tensor(list(suppress), device=z.device), -math.inf)
    logp = torch.log_softmax(z, dim=-1)
    tok = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    plogp = logp.exp() * logp
    ent = -torch.where(torch.isinf(logp), torch.zeros_like(plogp), plogp).sum(-1)  # 0 log 0 = 0 (suppressed ids)
    return tok, ent


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards of N / G consecutive groups of G -> (r - mean_group) / (std_group + eps), std unbiased."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N,) with N a multiple of the group size {group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    g = rewards.view(-1, group_size)
    return ((g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True) + eps)).reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token") -> torch.Tensor:
    """(N, T) per-token values over valid tokens: "token" sum / #tokens, "sequence" mean of per-sequence means."""
    m = mask.to(per_token.dtype)
    if mode == "token":
        return (per_token * m).sum() / m.sum().clamp_min(1)
    if mode == "sequence":
        return ((per_token * m).sum(1) / m.sum(1).clamp_min(1)).mean()
    raise ValueError(f"loss aggregation must be 'token' or 'sequence', got {mode!r}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                epsilon: float = 0.2, epsilon_high: float | None = None, ref_logp: torch.Tensor | None = None,
                beta: float = 0.0, aggregation: str = "token"):
    """Clipped GRPO loss (module docstring): returns (loss, clip_frac, mean k3 KL or None)."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.to(logp.dtype)[:, None]
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl_tok = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl_tok
        kl = aggregate(kl_tok.detach(), mask, "token")
    loss = aggregate(per_token, mask, aggregation)
    is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    clip_frac = aggregate(is_clipped.to(logp.dtype).detach(), mask, "token")
    return loss, clip_frac, kl


# ========================================================================================= rollouts
def placeholder_token_ids(config) -> list[int]:
    """Visual placeholder / marker ids of a VLM config: a sampled completion must never contain them (an extra
    <|image_pad|> would not match the image features in the scoring forward)."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
             "image_token_index", "video_token_index")
    ids = []
    for cfg in (config, getattr(config, "text_config", None)):
        for n in names:
            v = getattr(cfg, n, None) if cfg is not None else None
            if isinstance(v, int) and v >= 0 and v not in ids:
                ids.append(v)
    return ids


@dataclass
class Completions:
    """Prompts repeated G times (left-padded, length P) and their completions: what a generation engine returns."""

    prompt_inputs: dict                    # model inputs of the N = B * G prompts (input_ids (N, P), ...)
    target_mask: torch.Tensor | None       # (N, P) bool TARGET tokens of the prompts, or None
    completion_ids: torch.Tensor           # (N, T) long, padded after EOS
    completion_mask: torch.Tensor          # (N, T) bool valid tokens (through the first EOS)
    texts: list[str]                       # decoded valid completions (special tokens skipped)
    samples: list                          # the N TrainSamples (answer, answer_type, options for rewards)
    group_size: int

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]


def repeat_prompts(collator, items, group_size: int) -> tuple[Batch, list]:
    """Collate each encoded prompt G times in a row (groups are consecutive)."""
    rep = [e for e in items for _ in range(group_size)]
    return collator.collate(rep), [e.sample for e in rep]


@torch.no_grad()
def generate_completions(model, prompts: Batch, samples: list, tokenizer, rollout: GRPORollout, *,
                         handle=None, eos_token_id=None, pad_token_id=None, suppress: Sequence[int] = ()
                         ) -> Completions:
    """Step 1: sample completions with `model.generate` (prompts must be left-padded); `suppress` ids are never
    sampled (see `placeholder_token_ids`).

    FSDP2 (`model` wrapped by `fully_shard`): the root shard group (vision tower included) is gathered for the
    whole generation, because `generate` runs the vision encoder outside the model's forward; and with several
    processes generation is synchronised (`synced_gpus`: a process whose completions ended keeps running forwards
    until all are done, since every forward all-gathers the layers' shards on all processes). transformers does
    not detect accelerate's FSDP2 wrapping by itself."""
    from torch.distributed.fsdp import FSDPModule

    sharded = isinstance(model, FSDPModule)
    synced = sharded and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    am = prompts.model_inputs["attention_mask"]
    if bool((am[:, -1] == 0).any()):
        raise ValueError("GRPO prompts must be left-padded (data.padding_side: left) for generation")
    if handle is not None:
        handle.set_target(prompts.target_mask)
    gen = model.generation_config
    eos = eos_token_id if eos_token_id is not None else gen.eos_token_id
    pad = pad_token_id if pad_token_id is not None else gen.pad_token_id
    was_training = model.training
    model.eval()
    if sharded:
        model.unshard()
    try:
        out = model.generate(**prompts.model_inputs, do_sample=True, temperature=rollout.temperature,
                             top_p=rollout.top_p, top_k=rollout.top_k if rollout.top_k is not None else 0,
                             max_new_tokens=rollout.max_completion_length, eos_token_id=eos, pad_token_id=pad,
                             suppress_tokens=list(suppress) or None, use_cache=True, synced_gpus=synced)
    finally:
        if sharded:
            model.reshard()
        model.train(was_training)
    P = prompts.model_inputs["input_ids"].shape[1]
    comp = out[:, P:]
    if comp.shape[1] == 0:
        raise RuntimeError("generation returned no new token")
    mask = R.completion_mask(comp, eos, pad)
    texts = tokenizer.batch_decode([c[m] for c, m in zip(comp, mask)], skip_special_tokens=True)
    return Completions(prompts.model_inputs, prompts.target_mask, comp, mask, texts, samples, rollout.group_size)


def sequence_inputs(c: Completions) -> tuple[dict, torch.Tensor | None]:
    """Model inputs of prompt + completion (N, P + T) and the TARGET mask extended with False."""
    p = c.prompt_inputs
    comp = c.completion_ids.to(p["input_ids"].device)
    valid = c.completion_mask.to(comp.device)
    inputs = dict(p)
    inputs["input_ids"] = torch.cat([p["input_ids"], comp], dim=1)
    inputs["attention_mask"] = torch.cat([p["attention_mask"], valid.to(p["attention_mask"].dtype)], dim=1)
    for key in TOKEN_KEYS:  # per-token inputs (Qwen's mm_token_type_ids, Gemma3's token_type_ids): text after P
        if key in p:
            inputs[key] = torch.cat([p[key], torch.zeros_like(comp)], dim=1)
    target = None
    if c.target_mask is not None:
        target = torch.cat([c.target_mask.to(comp.device), torch.zeros_like(valid)], dim=1)
    return inputs, target


@dataclass
class Scores:
    """Step 2 output: per completion token (N, T) and the attention quantities of the rewards / metrics."""

    old_logps: torch.Tensor
    entropy: torch.Tensor
    ref_logps: torch.Tensor | None
    masses: torch.Tensor                   # (L, N, Hq, S, C) all layers, detached
    key_cats: torch.Tensor                 # (N, S)
    positions: torch.Tensor                # (N, S) bool positions of valid completion tokens
    row_entropy: torch.Tensor              # (N, S) entropy of each row's next-token distribution
    layers: tuple[int, ...] | None = None  # decoder index of each entry of `masses` (None: 0..L-1); Mllama's
    # cross-attention layers are not among them (their keys are vision tokens only)
    windows: tuple[int | None, ...] | None = None  # sliding window of each entry of `masses` (None: full)
    block_ids: torch.Tensor | None = None  # (N, S) image block ids (Gemma3), or None


def _forward_completion_logits(model, inputs: dict, T: int) -> torch.Tensor:
    """Logits (N, T, V) of the decision rows of the T completion tokens (rows P - 1 .. P + T - 2)."""
    logits = model(**inputs, use_cache=False, logits_to_keep=T + 1).logits
    return logits[:, :-1]


@torch.no_grad()
def score_completions(model, handle, c: Completions, *, temperature: float, reference=None,
                      suppress: Sequence[int] = ()) -> Scores:
    """Step 2: ONE no-grad teacher-forced forward of the patched policy over prompt + completion (old
    log-probs, entropies, masses of every layer); `reference()` is a context manager yielding the reference
    model (or None: no KL)."""
    inputs, target = sequence_inputs(c)
    handle.set_target(target)
    T = c.completion_ids.shape[1]
    was_training = model.training
    model.eval()
    try:
        with capture(model, layers="all") as rec:
            logits = _forward_completion_logits(model, inputs, T)
        ref_logps = None
        if reference is not None:
            with reference() as ref:
                ref_logits = _forward_completion_logits(ref, inputs, T)
            ref_logps, _ = token_logps_and_entropy(ref_logits, c.completion_ids.to(ref_logits.device), temperature,
                                                   suppress)
    finally:
        model.train(was_training)
    comp = c.completion_ids.to(logits.device)
    old, ent = token_logps_and_entropy(logits, comp, temperature, suppress)
    N, S = inputs["input_ids"].shape
    P = S - T
    positions = torch.zeros(N, S, dtype=torch.bool, device=comp.device)
    positions[:, P:] = c.completion_mask.to(comp.device)
    row_entropy = torch.zeros(N, S, dtype=ent.dtype, device=comp.device)
    row_entropy[:, P - 1:S - 1] = ent
    return Scores(old, ent, ref_logps, rec.masses(), rec.categories, positions, row_entropy, tuple(rec.layers),
                  rec.windows(), rec.block_ids)


def _self_attention_entries(layers, s: Scores, num_layers: int) -> list[int]:
    """Entries of `s.masses` for the configured decoder `layers` ("all" = every captured self-attention layer)."""
    captured = list(s.layers) if s.layers is not None else list(range(s.masses.shape[0]))
    if layers == "all":
        return list(range(len(captured)))
    want = [i % num_layers for i in layers]
    bad = [i for i in want if i not in captured]
    if bad:
        raise ValueError(f"objective.avar_visual.layers: decoder layers {bad} have no self-attention masses (the "
                         f"self-attention layers are {captured}); cross-attention layers see only vision keys, so "
                         "r_vis is defined on self-attention layers")
    return [captured.index(i) for i in want]


def compute_rewards(c: Completions, s: Scores, obj: GRPOObjective, num_layers: int) -> dict[str, R.RewardResult]:
    """Step 3: each configured reward component, one scalar per completion."""
    out: dict[str, R.RewardResult] = {}
    n = len(c.texts)
    device = s.masses.device
    for name in obj.rewards:
        if name == "sayo":
            out[name] = R.sayo_attention_reward(s.masses[-1], s.key_cats, s.row_entropy, s.positions,
                                                window=None if s.windows is None else s.windows[-1],
                                                block_ids=s.block_ids,
                                                rows=obj.sayo.rows, top_frac=obj.sayo.top_frac, eps=obj.sayo.eps)
        elif name == "avar_visual":
            idx = _self_attention_entries(obj.avar_visual.layers, s, num_layers)
            out[name] = R.avar_visual_reward(s.masses[idx], s.positions, heads=obj.avar_visual.heads,
                                             eps=obj.avar_visual.eps, key_cats=s.key_cats)
        elif name == "format":
            f = obj.format
            vals = R.format_reward(c.texts, pattern=f.pattern, lengths=c.completion_mask.sum(1).tolist(),
                                   max_length=f.max_length, length_buffer=f.length_buffer)
            out[name] = R.RewardResult(torch.tensor(vals, device=device), torch.ones(n, dtype=torch.bool,
                                                                                    device=device))
        elif name == "accuracy":
            if any(smp.answer is None for smp in c.samples):
                missing = next(smp for smp in c.samples if smp.answer is None)
                raise ValueError(f"accuracy reward: sample {missing.id!r} has no 'answer' (and answer_type)")
            vals = R.accuracy_reward(c.texts, [smp.answer for smp in c.samples],
                                     [smp.answer_type or "text" for smp in c.samples],
                                     [smp.options or None for smp in c.samples])
            out[name] = R.RewardResult(torch.tensor(vals, device=device), torch.ones(n, dtype=torch.bool,
                                                                                    device=device))
    return out


def attention_metrics(s: Scores, rows: str = "decision") -> dict[str, float]:
    """vas: AVAR VAS (ratio form, all layers) over the completion rows, mean over samples with a system turn;
    target_attention: SAYO's target attention score R_a(i) = 0.5 (1 + tanh(log((a + eps) / (v + eps))))
    (`attn_mod.metrics`, last layer) averaged over the completion rows (decision rows p_t - 1 or emitted rows
    p_t, as the SAYO reward), mean over samples with TARGET keys. NaN (null) when no sample defines them."""
    att_rows = s.positions
    if rows == "decision":
        att_rows = torch.cat([s.positions[:, 1:], torch.zeros_like(s.positions[:, :1])], dim=1)
    S = s.masses.shape[3]
    cats = s.key_cats.long()
    v = vas_from_masses(s.masses, cats[:, cats.shape[1] - S:], rows=att_rows)
    has_sys = (cats == SYSTEM).any(1) & att_rows.any(1)
    vas = float(v.value[has_sys].mean()) if bool(has_sys.any()) else math.nan
    ta = target_attention_from_masses(s.masses[-1:], s.key_cats, windows=None if s.windows is None else s.windows[-1:],
                                      block_ids=s.block_ids)
    ra = torch.nan_to_num(ta.reward[0].double())
    w = att_rows.double()
    per = (ra * w).sum(1) / w.sum(1).clamp_min(1)
    has_t = (cats == TARGET).any(1) & att_rows.any(1)
    target = float(per[has_t].mean()) if bool(has_t.any()) else math.nan
    return {"vas": vas, "target_attention": target}


@dataclass
class Rollout:
    """A scored, rewarded rollout batch: what the policy updates consume (the loop's micro-batch)."""

    completions: Completions
    scores: Scores
    advantages: torch.Tensor
    rewards: torch.Tensor                   # (N,) weighted total
    components: dict[str, R.RewardResult]
    metrics: dict[str, float]

    @property
    def ids(self) -> list[str]:
        return self.completions.ids


# =========================================================================================== recipe
class GRPORecipe(Recipe):
    name = "grpo"
    objective_config = GRPOObjective
    rollout_config = GRPORollout
    metric_keys = ("loss", "reward", "kl", "entropy", "completion_length", "clip_frac", "vas", "target_attention",
                   "lr")
    progress_keys = ("loss", "reward", "target_attention")
    require_assistant = False
    train_on = "none"
    # a step's rollout batch depends on these too: a resumed run must keep them
    RESUME_KEYS = Recipe.RESUME_KEYS + (("objective", "num_iterations"), ("rollout", "group_size"))

    @staticmethod
    def validate_config(cfg) -> None:
        if cfg.data.padding_side != "left":
            raise ValueError("recipe grpo generates from the prompts: set data.padding_side: left")
        every, k = cfg.checkpoint.every, cfg.objective.num_iterations
        if every and k > 1 and every % k:
            raise ValueError(f"checkpoint.every ({every}) must be a multiple of objective.num_iterations ({k}) so "
                             "that a resumed run starts with a fresh rollout batch")

    def setup_objective(self) -> None:
        obj = self.cfg.objective
        self.metric_keys = ("loss", "reward", *(f"reward/{k}" for k in obj.rewards), "kl", "entropy",
                            "completion_length", "clip_frac", "vas", "target_attention", "lr")
        self.sum_metrics = frozenset(f"reward_undefined/{k}" for k in obj.rewards if k in ATTENTION_REWARD_NAMES)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.suppress = placeholder_token_ids(self.model.config)
        self._rollouts: dict[tuple[int, int], Rollout] = {}
        self.reference_model = None
        if obj.beta > 0 and self.peft_model is None:
            ref, _ = self._setup_model()  # the initial policy (from model.path / the tiny seed), frozen
            ref.eval().requires_grad_(False)
            self.reference_model = ref.to(self.accelerator.device)

    def reference(self):
        """Context manager yielding the frozen reference policy: the disabled LoRA adapter, or the copy."""
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            if self.peft_model is not None:
                with self.peft_model.disable_adapter():
                    yield self.model
            else:
                yield self.reference_model

        return ctx

    # ------------------------------------------------------------------------ rollouts = micro-batches
    def micro_batch(self, step: int, micro: int) -> Rollout:
        k = self.cfg.objective.num_iterations
        group = (step - 1) // k
        key = (group, micro)
        if key not in self._rollouts:
            self._rollouts = {g: r for g, r in self._rollouts.items() if g[0] == group}
            self._rollouts[key] = self.make_rollout(group + 1, micro)
        return self._rollouts[key]

    def make_rollout(self, rollout_index: int, micro: int) -> Rollout:
        """Generate, score and reward the prompts of micro-batch `micro` of rollout batch `rollout_index`."""
        obj, ro = self.cfg.objective, self.cfg.rollout
        items = [self.dataset[i] for i in self.sample_indices(rollout_index, micro)]
        prompts, samples = repeat_prompts(self.collator, items, ro.group_size)
        prompts = prompts.to(self.accelerator.device)
        comps = generate_completions(self.model, prompts, samples, self.tokenizer, ro, handle=self.handle,
                                     suppress=self.suppress)
        scores = score_completions(self.model, self.handle, comps, temperature=ro.temperature,
                                   reference=self.reference() if obj.beta > 0 else None, suppress=self.suppress)
        parts = compute_rewards(comps, scores, obj, self.handle.state.num_layers)
        values = {k: r.values.float() for k, r in parts.items()}
        total = R.combine_rewards(values, obj.rewards, gate_on=obj.gate_on, attention=ATTENTION_REWARD_NAMES)
        adv = group_advantages(total, ro.group_size, obj.advantage_eps)
        valid = comps.completion_mask.to(scores.entropy.device)
        metrics = {"reward": float(total.mean()),
                   **{f"reward/{k}": float(v.mean()) for k, v in values.items()},
                   **{f"reward_undefined/{k}": float((~parts[k].defined).sum()) for k in parts
                      if k in ATTENTION_REWARD_NAMES},
                   "entropy": float(aggregate(scores.entropy, valid)),
                   "completion_length": float(valid.sum(1).float().mean()),
                   **attention_metrics(scores, obj.sayo.rows)}
        return Rollout(comps, scores, adv, total, parts, metrics)

    # ------------------------------------------------------------------------------- one policy update
    def train_step(self, ro: Rollout) -> StepOutput:
        obj = self.cfg.objective
        c = ro.completions
        inputs, target = sequence_inputs(c)
        self.handle.set_target(target)
        logits = _forward_completion_logits(self.module, inputs, c.completion_ids.shape[1])
        logp, _ = token_logps_and_entropy(logits, c.completion_ids.to(logits.device), self.cfg.rollout.temperature,
                                          self.suppress)
        mask = c.completion_mask.to(logp.device)
        loss, clip_frac, kl = policy_loss(logp, ro.scores.old_logps.to(logp.dtype), ro.advantages, mask,
                                          epsilon=obj.epsilon, epsilon_high=obj.epsilon_high,
                                          ref_logp=ro.scores.ref_logps, beta=obj.beta,
                                          aggregation=obj.loss_aggregation)
        components = {f"reward/{k}": r.values for k, r in ro.components.items()}
        metrics = {"loss": float(loss.detach()), "kl": math.nan if kl is None else float(kl),
                   "clip_frac": float(clip_frac), **ro.metrics}
        return StepOutput(loss, components, metrics)

    def reduce_metrics(self, parts):
        """Micro-batch floats -> one row: reward_undefined/* summed, the rest averaged ignoring NaN (null)."""
        keys = list(parts[0])
        local = torch.tensor([[p[k] for k in keys] for p in parts], dtype=torch.float64)
        if self.accelerator.num_processes > 1:
            local = self.accelerator.gather(local.to(self.accelerator.device)).cpu()
        row = {}
        for j, k in enumerate(keys):
            col = local[:, j]
            row[k] = int(col.sum()) if k in self.sum_metrics else float(col.nanmean())
        return row


__all__ = ["AvarRewardConfig", "Completions", "FormatRewardConfig", "GRPOObjective", "GRPORecipe", "GRPORollout",
           "Rollout", "SayoRewardConfig", "Scores", "aggregate", "attention_metrics", "compute_rewards",
           "generate_completions", "group_advantages", "k3_kl", "placeholder_token_ids", "policy_loss", "repeat_prompts",
           "score_completions", "sequence_inputs", "token_logps_and_entropy"]
