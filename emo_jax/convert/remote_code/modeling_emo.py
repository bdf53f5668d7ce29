"""EmoForCausalLM: AllenAI's EMO mixture-of-experts LM in PyTorch, for transformers >= 5.

Written by emo_jax to run its `--layout emo` exports and the released checkpoints
(allenai/Emo_1b14b_1T, StdMoE_1b14b_1T, the 130B ablations and pruned derivatives) offline with
`trust_remote_code=True`, with the release's parameter names:

  model.embed_tokens.weight, model.norm.weight, lm_head.weight,
  model.layers.{i}.pre_attention_layernorm.weight / pre_feedforward_layernorm.weight,
  model.layers.{i}.self_attn.{q,k,v,o}_proj.weight,
  model.layers.{i}.mlp.gate.weight                  [num_experts, hidden] (shared rows unused),
  model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight.

Inference routing is the release's (docs/algorithm.md): softmax over the routed logits only, top-k
without renormalisation, and every shared expert (the last rows of the bank) added with weight
exactly 1.0; no document pool. The router runs in float32 whatever the model dtype, as in
training. Attention is plain causal (left padding through `attention_mask`), eager, with
logits and softmax in float32, so results do not depend on an attention backend. Each row is
one sequence, where a model trained with attention confined to each packed document and one
trained across them (emo_jax's ModelConfig.document_attention, kept in emo_jax_config.json
beside an export) compute the same.

The key/value cache follows whichever cache API the installed transformers speaks: releases up to
5.23 pass and return it as `past_key_values`, 5.24 and later as `cache` (the old name still
accepted with a deprecation warning). `forward` takes either and returns it under the name the
installed output classes declare, so `generate` carries the cache from step to step on both.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from .configuration_emo import EmoConfig

# The output field that carries the KV cache in the installed transformers ("cache" from 5.24).
_CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(MoeCausalLMOutputWithPast)}
                else "past_key_values")


def _one_cache(cache, past_key_values):
  """The cache passed under either name; both at once is ambiguous and refused."""
  if cache is not None and past_key_values is not None:
    raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
  return cache if cache is not None else past_key_values

# Keys of the reference's experimental code paths, with the value that means "off". Any other
# value changes the computation in ways this file does not implement, so it is refused.
_OFF = {"always_active_experts": None, "always_active_experts_per_layer": None,
        "ghost_extend_eval": False, "dense_mlp_bias": False, "clip_qkv": None}


def _check_supported(config):
  for key, off in _OFF.items():
    value = getattr(config, key, off)
    if value not in (off, None, False, []) and str(value).lower() not in ("false", "0", "none"):
      raise ValueError(f"config.{key}={value!r} is not supported by this modeling_emo.py (written "
                       f"by emo_jax); remove the key or set it to {off!r}")
  rope = getattr(config, "rope_parameters", None) or {}
  if rope.get("rope_type", "default") != "default":
    raise ValueError(f"config.rope_parameters={rope!r}: only the default RoPE is supported")
  if config.norm_topk_prob and any(s > 0 for s in _experts_per_layer(config)[1]):
    raise ValueError("config.norm_topk_prob=True with shared experts is not defined (the "
                     "reference refuses it too); set norm_topk_prob=false")


def _experts_per_layer(config):
  """(experts, shared experts) of every layer; pruned releases list them per layer."""
  n = config.num_hidden_layers
  experts = config.num_experts_per_layer or [config.num_experts] * n
  shared = config.num_shared_experts_per_layer or [min(config.num_shared_experts, e)
                                                   for e in experts]
  if len(experts) != n or len(shared) != n:
    raise ValueError(f"num_experts_per_layer / num_shared_experts_per_layer must have "
                     f"num_hidden_layers={n} entries, got {len(experts)} and {len(shared)}")
  return list(experts), list(shared)


class EmoRMSNorm(nn.Module):
  """RMSNorm in float32 (weight applied in float32, then cast back), as in training."""

  def __init__(self, size, eps):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(size))
    self.variance_epsilon = eps

  def forward(self, x):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return (self.weight.float() * x32).to(x.dtype)


class EmoRotaryEmbedding(nn.Module):
  """Default ("rotate half") RoPE; cos / sin in float32.

  The frequencies are recomputed per call instead of kept in a buffer: transformers 5 builds
  models on the meta device, where a non-persistent buffer would come back uninitialised.
  """

  def __init__(self, config):
    super().__init__()
    self.theta = float((config.rope_parameters or {}).get("rope_theta", config.default_theta))
    self.dim = config.head_dim

  @torch.no_grad()
  def forward(self, position_ids):
    exponent = torch.arange(0, self.dim, 2, dtype=torch.float32, device=position_ids.device)
    inv_freq = 1.0 / (self.theta ** (exponent / self.dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x):
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat((-x2, x1), dim=-1)


def _rope(x, cos, sin):
  x32 = x.float()
  return (x32 * cos[:, None] + _rotate_half(x32) * sin[:, None]).to(x.dtype)


class EmoAttention(nn.Module):
  def __init__(self, config, layer_idx):
    super().__init__()
    self.layer_idx = layer_idx
    self.num_heads = config.num_attention_heads
    self.num_kv_heads = config.num_key_value_heads
    self.head_dim = config.head_dim
    d, h, g, k = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
    bias = config.attention_bias
    self.q_proj = nn.Linear(d, h * k, bias=bias)
    self.k_proj = nn.Linear(d, g * k, bias=bias)
    self.v_proj = nn.Linear(d, g * k, bias=bias)
    self.o_proj = nn.Linear(h * k, d, bias=bias)
    self.qk_norm = bool(getattr(config, "qk_norm", False))
    if self.qk_norm:
      self.q_norm = EmoRMSNorm(h * k, config.rms_norm_eps)
      self.k_norm = EmoRMSNorm(g * k, config.rms_norm_eps)

  def forward(self, x, cos, sin, mask, past_key_values=None):
    b, l, _ = x.shape
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = _rope(q.view(b, l, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
    k = _rope(k.view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
    v = v.view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
    if past_key_values is not None:
      k, v = past_key_values.update(k, v, self.layer_idx)
    groups = self.num_heads // self.num_kv_heads
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * self.head_dim ** -0.5
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, l, -1)
    return self.o_proj(out)


class EmoMLP(nn.Module):
  """One SwiGLU expert (or the dense feed-forward of a dense layer)."""

  def __init__(self, hidden_size, intermediate_size, act):
    super().__init__()
    self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
    self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
    self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
    self.act_fn = ACT2FN[act]

  def forward(self, x):
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class EmoSparseMoeBlock(nn.Module):
  """Router over routed experts (top-k, no renormalisation) plus shared experts at 1.0."""

  def __init__(self, config, num_experts, num_shared):
    super().__init__()
    self.num_experts, self.num_shared = num_experts, num_shared
    self.top_k = config.num_experts_per_tok - num_shared
    if not 1 <= self.top_k <= num_experts - num_shared:
      raise ValueError(f"num_experts_per_tok={config.num_experts_per_tok} must be in "
                       f"[{num_shared + 1}, {num_experts}] for a layer with {num_experts} "
                       f"experts of which {num_shared} are shared")
    self.norm_topk_prob = config.norm_topk_prob
    self.gate = nn.Linear(config.hidden_size, num_experts, bias=False)
    self.experts = nn.ModuleList([EmoMLP(config.hidden_size, config.intermediate_size,
                                         config.hidden_act) for _ in range(num_experts)])

  def forward(self, x):
    b, l, d = x.shape
    h = x.reshape(-1, d)
    logits = F.linear(h.float(), self.gate.weight.float())
    routed = self.num_experts - self.num_shared
    probs = logits[:, :routed].softmax(dim=-1)
    weights, ids = torch.topk(probs, self.top_k, dim=-1)
    if self.norm_topk_prob:
      weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(h.dtype)
    out = torch.zeros_like(h)
    for e in ids.unique().tolist():
      token, slot = torch.where(ids == e)
      out.index_add_(0, token, self.experts[e](h[token]) * weights[token, slot, None])
    for e in range(routed, self.num_experts):
      out = out + self.experts[e](h)
    return out.view(b, l, d), logits


class EmoDecoderLayer(nn.Module):
  """Pre-norm block: h = x + attn(norm1(x)); y = h + mlp(norm2(h))."""

  def __init__(self, config, layer_idx, num_experts, num_shared):
    super().__init__()
    self.self_attn = EmoAttention(config, layer_idx)
    if num_experts == 0:
      width = config.dense_intermediate_size or config.intermediate_size
      self.mlp = EmoMLP(config.hidden_size, width, config.hidden_act)
    else:
      self.mlp = EmoSparseMoeBlock(config, num_experts, num_shared)
    self.pre_attention_layernorm = EmoRMSNorm(config.hidden_size, config.rms_norm_eps)
    self.pre_feedforward_layernorm = EmoRMSNorm(config.hidden_size, config.rms_norm_eps)

  def forward(self, x, cos, sin, mask, past_key_values=None):
    h = x + self.self_attn(self.pre_attention_layernorm(x), cos, sin, mask, past_key_values)
    y = self.mlp(self.pre_feedforward_layernorm(h))
    router_logits = None
    if isinstance(y, tuple):
      y, router_logits = y
    return h + y, router_logits


class EmoPreTrainedModel(PreTrainedModel):
  config_class = EmoConfig
  config: EmoConfig
  base_model_prefix = "model"
  supports_gradient_checkpointing = False
  _no_split_modules = ["EmoDecoderLayer"]
  _skip_keys_device_placement = ["past_key_values", "cache"]

  @torch.no_grad()
  def _init_weights(self, module):
    std = self.config.initializer_range
    if isinstance(module, (nn.Linear, nn.Embedding)):
      _init_normal(module.weight, std)
      if getattr(module, "bias", None) is not None:
        _init_zeros(module.bias)
    elif isinstance(module, EmoRMSNorm):
      _init_ones(module.weight)


def _init_fn(name):
  """transformers' guarded initialisers (they skip loaded tensors), else torch's."""
  try:
    from transformers import initialization  # pylint: disable=import-outside-toplevel
    return getattr(initialization, name)
  except (ImportError, AttributeError):
    return getattr(nn.init, name)


def _init_normal(t, std):
  _init_fn("normal_")(t, mean=0.0, std=std)


def _init_zeros(t):
  _init_fn("zeros_")(t)


def _init_ones(t):
  _init_fn("ones_")(t)


def _causal_mask(attention_mask, q_len, kv_len, device):
  """bool [B|1, 1, q_len, kv_len]: causal over the cache, minus padded keys.

  A query always sees itself, so a padded query row is never fully masked (no NaN).
  """
  past = kv_len - q_len
  q_pos = torch.arange(past, kv_len, device=device)[:, None]
  k_pos = torch.arange(kv_len, device=device)[None, :]
  mask = (k_pos <= q_pos)[None]
  if attention_mask is not None:
    mask = mask & attention_mask[:, None, -kv_len:].bool()
    mask = mask | (k_pos == q_pos)[None]
  return mask[:, None]


class EmoModel(EmoPreTrainedModel):
  def __init__(self, config):
    super().__init__(config)
    _check_supported(config)
    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
    experts, shared = _experts_per_layer(config)
    self.layers = nn.ModuleList([EmoDecoderLayer(config, i, experts[i], shared[i])
                                 for i in range(config.num_hidden_layers)])
    self.norm = EmoRMSNorm(config.hidden_size, config.rms_norm_eps)
    self.rotary_emb = EmoRotaryEmbedding(config)
    self.post_init()

  def get_input_embeddings(self):
    return self.embed_tokens

  def set_input_embeddings(self, value):
    self.embed_tokens = value

  def forward(self, input_ids=None, attention_mask=None, position_ids=None,
              past_key_values=None, inputs_embeds=None, use_cache=None, cache=None, **kwargs):
    past_key_values = _one_cache(cache, past_key_values)
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
      inputs_embeds = self.embed_tokens(input_ids)
    use_cache = self.config.use_cache if use_cache is None else use_cache
    if use_cache and past_key_values is None:
      past_key_values = DynamicCache(config=self.config)
    b, l, _ = inputs_embeds.shape
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    if position_ids is None:
      position_ids = torch.arange(past, past + l, device=inputs_embeds.device)[None].expand(b, l)
    mask = _causal_mask(attention_mask, l, past + l, inputs_embeds.device)
    cos, sin = self.rotary_emb(position_ids)
    x, router_logits = inputs_embeds, []
    for layer in self.layers:
      x, logits = layer(x, cos, sin, mask, past_key_values)
      router_logits.append(logits)
    return MoeModelOutputWithPast(last_hidden_state=self.norm(x),
                                  router_logits=tuple(router_logits),
                                  **{_CACHE_FIELD: past_key_values if use_cache else None})


def load_balancing_loss(router_logits, num_shared, top_k):
  """The release's balancing loss over routed experts, averaged over MoE layers."""
  losses = []
  for logits, shared, k in zip(router_logits, num_shared, top_k):
    if logits is None:
      continue
    probs = logits[:, :logits.shape[-1] - shared].float().softmax(dim=-1)
    n = probs.shape[-1]
    counts = F.one_hot(probs.topk(k, dim=-1).indices, n).sum(dim=(0, 1)).float()
    losses.append((n / k) * (counts * probs.mean(dim=0)).sum() / probs.shape[0])
  return torch.stack(losses).mean() if losses else None


class EmoForCausalLM(EmoPreTrainedModel, GenerationMixin):
  _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

  def __init__(self, config):
    super().__init__(config)
    self.model = EmoModel(config)
    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    self.post_init()

  def get_input_embeddings(self):
    return self.model.embed_tokens

  def set_input_embeddings(self, value):
    self.model.embed_tokens = value

  def get_output_embeddings(self):
    return self.lm_head

  def set_output_embeddings(self, value):
    self.lm_head = value

  def forward(self, input_ids=None, attention_mask=None, position_ids=None,
              past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
              output_router_logits=None, logits_to_keep=0, cache=None, **kwargs):
    past_key_values = _one_cache(cache, past_key_values)
    out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids, past_key_values=past_key_values,
                     inputs_embeds=inputs_embeds, use_cache=use_cache)
    hidden = out.last_hidden_state
    if isinstance(logits_to_keep, int) and logits_to_keep > 0:
      hidden = hidden[:, -logits_to_keep:]
    logits = self.lm_head(hidden).float()
    loss = None
    if labels is not None:
      loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                             labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
    if output_router_logits is None:
      output_router_logits = self.config.output_router_logits
    aux_loss = None
    if output_router_logits:
      shared = _experts_per_layer(self.config)[1]
      top_k = [self.config.num_experts_per_tok - s for s in shared]
      aux_loss = load_balancing_loss(out.router_logits, shared, top_k)
      if loss is not None and aux_loss is not None:
        loss = loss + self.config.router_aux_loss_coef * aux_loss
    return MoeCausalLMOutputWithPast(
        loss=loss, aux_loss=aux_loss, logits=logits,
        router_logits=out.router_logits if output_router_logits else None,
        **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})


__all__ = ["EmoForCausalLM", "EmoModel", "EmoPreTrainedModel"]
