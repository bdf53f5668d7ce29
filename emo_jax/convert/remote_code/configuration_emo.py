"""EmoConfig: configuration of AllenAI's EMO mixture-of-experts LM for transformers >= 5.

Written by emo_jax (not copied from the release) and shipped beside exported weights so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works offline. It reads the
config.json keys of the released checkpoints (allenai/Emo_1b14b_1T and siblings): the legacy
top-level `rope_theta`, the per-layer expert counts that the reference's pruning scripts write,
and keys of the reference's experimental code paths, which are kept as attributes so that
`EmoForCausalLM` can refuse values it does not implement instead of silently ignoring them.
"""

from transformers.configuration_utils import PreTrainedConfig


class EmoConfig(PreTrainedConfig):
  """Architecture of an EMO / StdMoE model (defaults: the released 1b14b).

  `num_experts` counts every expert of the bank; the last `num_shared_experts` are shared (every
  token, weight 1.0) and `num_experts_per_tok` counts routed *plus* shared experts, as in the
  release (8 = top-7 routed + 1 shared). `num_experts=0` (or 0 in `num_experts_per_layer`) is a
  dense SwiGLU layer of width `dense_intermediate_size` (default `intermediate_size`).
  `qk_norm` (not a release key) adds OLMoE-style RMSNorms over the whole projected q and k.
  """

  model_type = "emo"
  keys_to_ignore_at_inference = ["past_key_values"]
  default_theta = 500_000.0

  vocab_size: int = 100352
  hidden_size: int = 2048
  intermediate_size: int = 1024
  num_hidden_layers: int = 16
  num_attention_heads: int = 16
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  hidden_act: str = "silu"
  max_position_embeddings: int = 4096
  initializer_range: float = 0.02
  rms_norm_eps: float = 1e-6
  use_cache: bool = True
  tie_word_embeddings: bool = False
  rope_parameters: dict | None = None
  attention_bias: bool = False
  attention_dropout: float = 0.0
  num_experts: int = 128
  num_experts_per_tok: int = 8
  num_shared_experts: int = 1
  norm_topk_prob: bool = False
  output_router_logits: bool = False
  router_aux_loss_coef: float = 0.01
  num_experts_per_layer: list | None = None
  num_shared_experts_per_layer: list | None = None
  dense_intermediate_size: int | None = None
  qk_norm: bool = False
  pad_token_id: int | None = 100277
  bos_token_id: int | None = None
  eos_token_id: int | list | None = 100257

  def __post_init__(self, **kwargs):
    if self.num_key_value_heads is None:
      self.num_key_value_heads = self.num_attention_heads
    if self.head_dim is None:
      self.head_dim = self.hidden_size // self.num_attention_heads
    super().__post_init__(**kwargs)


__all__ = ["EmoConfig"]
