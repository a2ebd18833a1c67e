"""Project a site's measured step cost on a small model to larger models of the same family.

A PROJECTION, not a measurement. Two measured points (the whole model, and an fsl-edge site
that runs `site_blocks` of its blocks, both with the embeddings, head and loss) give a cost per
block and a fixed cost (embeddings, head, loss and overhead):

    per_block = (whole - site) / (n_blocks - site_blocks)
    fixed     = site - site_blocks * per_block

For a larger model:
- compute: per_block scales with the block's parameter count (its matmuls), fixed with the
  head's vocab x hidden (the head's matmul and its backward dominate it); attention's T^2 term
  is left out (the same tokens per step);
- memory: the weights are known exactly (parameters x bytes per weight); what the measurement
  holds beyond them scales with what drives it: per block, the activations a block keeps
  (10 hidden + 4 intermediate per token, as `fsl_edge.delay.ModelSpec`) and its LoRA; in the
  fixed part, the logits and their gradient (vocab per token).
Same dtype, batch and sequence length as measured.
"""

from __future__ import annotations

from dataclasses import dataclass

# From the models' config.json on the Hugging Face hub (meta-llama/Llama-3.2-1B,
# meta-llama/Llama-3.1-8B); only the fields the projection reads.
LLAMA_3_2_1B = {"name": "Llama-3.2-1B", "num_hidden_layers": 16, "hidden_size": 2048,
                "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
                "vocab_size": 128256, "tie_word_embeddings": True}
LLAMA_3_1_8B = {"name": "Llama-3.1-8B", "num_hidden_layers": 32, "hidden_size": 4096,
                "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
                "vocab_size": 128256, "tie_word_embeddings": False}
TARGETS = (LLAMA_3_2_1B, LLAMA_3_1_8B)
SOURCE = ("config.json of meta-llama/Llama-3.2-1B and meta-llama/Llama-3.1-8B on the Hugging "
          "Face hub")


@dataclass(frozen=True)
class Sizes:
    """What the projection needs of a decoder-only model."""

    name: str
    n_blocks: int
    hidden: int
    intermediate: int
    vocab: int
    block_params: int
    embed_head_params: int  # input embeddings plus an untied head

    @property
    def act_per_token(self) -> int:
        return 10 * self.hidden + 4 * self.intermediate

    @property
    def params(self) -> int:
        final_norm = self.hidden
        return self.n_blocks * self.block_params + self.embed_head_params + final_norm


def llama_sizes(config: dict) -> Sizes:
    """Sizes of a Llama-family model from its config: attention (q, k, v, o with grouped KV),
    the gated MLP (gate, up, down) and two RMSNorms per block."""
    c, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = c // config["num_attention_heads"] * config["num_key_value_heads"]
    block = 2 * c * c + 2 * c * kv + 3 * c * i + 2 * c
    embed_head = v * c * (1 if config.get("tie_word_embeddings", False) else 2)
    return Sizes(config.get("name", "?"), config["num_hidden_layers"], c, i, v, block, embed_head)


@dataclass(frozen=True)
class Split:
    """One quantity measured on the whole model and on a site of `site_blocks` blocks."""

    whole: float
    site: float

    def per_block_and_fixed(self, n_blocks: int, site_blocks: int) -> tuple[float, float]:
        if not 0 < site_blocks < n_blocks:
            raise ValueError(f"a site of {site_blocks} of {n_blocks} blocks cannot separate "
                             "the per-block cost from the fixed one")
        per_block = (self.whole - self.site) / (n_blocks - site_blocks)
        fixed = self.site - site_blocks * per_block
        if per_block <= 0 or fixed < 0:
            raise ValueError(f"whole {self.whole:.4g} and site {self.site:.4g} give a cost per "
                             f"block of {per_block:.4g} and a fixed cost of {fixed:.4g}: the "
                             "measurement is too noisy (or the model too small) to project")
        return per_block, fixed


@dataclass(frozen=True)
class Projected:
    name: str
    site_s: float
    whole_s: float
    site_bytes: float
    whole_bytes: float

    @property
    def compute_ratio(self) -> float:
        return self.site_s / self.whole_s

    @property
    def memory_ratio(self) -> float:
        return self.site_bytes / self.whole_bytes


def project(ref: Sizes, seconds: Split, memory: Split, site_blocks: int, target: Sizes,
            target_site_blocks: int, weight_bytes: int = 4) -> Projected:
    """The site's and the whole model's step cost on `target`, from `ref`'s measured ones."""
    t_block, t_fixed = seconds.per_block_and_fixed(ref.n_blocks, site_blocks)
    m_block, m_fixed = memory.per_block_and_fixed(ref.n_blocks, site_blocks)
    t_block *= target.block_params / ref.block_params
    t_fixed *= (target.vocab * target.hidden) / (ref.vocab * ref.hidden)
    # beyond the weights: a block's activations and LoRA; the head's logits and their gradient
    block_rest = max(m_block - ref.block_params * weight_bytes, 0.0)
    fixed_rest = max(m_fixed - ref.embed_head_params * weight_bytes, 0.0)
    m_block = (target.block_params * weight_bytes
               + block_rest * target.act_per_token / ref.act_per_token)
    m_fixed = target.embed_head_params * weight_bytes + fixed_rest * target.vocab / ref.vocab
    return Projected(target.name,
                     target_site_blocks * t_block + t_fixed, target.n_blocks * t_block + t_fixed,
                     target_site_blocks * m_block + m_fixed, target.n_blocks * m_block + m_fixed)
