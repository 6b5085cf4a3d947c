"""GPTConfig: the static description of a GPT-2 model, and the named presets.

The field names are the seed repository's (`vocab_size, context_length, emb_dim, n_heads, n_layers, drop_rate,
qkv_bias`); the rest are what real checkpoints differ in. A config is frozen and hashable: it rides along with the
parameters as pytree metadata and is never a leaf that a transform differentiates.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["GPTConfig", "PRESETS", "preset"]


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a GPT-2 model.

    The defaults are the seed's `GPT_CONFIG` (124M, no q/k/v bias, untied output head). Real GPT-2 checkpoints
    (OpenAI / Hugging Face) are `preset("gpt2")`: q/k/v biases and a head tied to the token embedding.
    """

    vocab_size: int = 50257
    """Rows of the token embedding (and columns of the logits)."""
    context_length: int = 1024
    """Rows of the position embedding: the longest sequence the model can read."""
    emb_dim: int = 768
    """Width of the residual stream, `d_model`."""
    n_heads: int = 12
    """Attention heads; `emb_dim` must be divisible by it."""
    n_layers: int = 12
    """Transformer blocks."""
    drop_rate: float = 0.1
    """Dropout probability, applied only when a generator (or seed) is passed for training."""
    qkv_bias: bool = False
    """Whether the query/key/value projections have biases (True for OpenAI GPT-2, False in the seed)."""
    bias: bool = True
    """Biases on the attention output, MLP and layer norms (nanoGPT's `bias=False` drops them all)."""
    tie_head: bool = False
    """Whether the output head reads the token embedding (GPT-2, nanoGPT) instead of its own matrix (seed)."""
    ln_eps: float = 1e-5
    """Layer-norm epsilon."""
    gelu: Literal["tanh", "erf"] = "tanh"
    """GELU flavour: the tanh approximation (OpenAI, Hugging Face, seed) or the exact erf form (nanoGPT)."""
    mlp_dim: int | None = None
    """Hidden width of the MLP; None means 4 * emb_dim."""
    token_vocab_size: int | None = None
    """Ids the tokenizer can produce; rows at or beyond it are padding never to be generated (nanoGPT pads
    50257 to 50304). None means every row is a token."""
    trained_vocab: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)
    """The sorted token ids the model predicts when it was trained on a corpus's own vocabulary (`gpt2fn train
    --vocab corpus`): the loss's softmax runs over these rows only and generation never produces another id.
    None means the whole vocabulary. The embedding keeps every row, so ids stay GPT-2's."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.emb_dim % self.n_heads:
            problems.append(
                f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}); "
                f"try n_heads={_divisor_near(self.emb_dim, self.n_heads)}"
            )
        if not (0.0 <= self.drop_rate < 1.0):
            problems.append(f"drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if self.gelu not in ("tanh", "erf"):
            problems.append(f"gelu must be 'tanh' or 'erf', got {self.gelu!r}")
        if not self.ln_eps > 0:
            problems.append(f"ln_eps must be positive, got {self.ln_eps!r}")
        if self.mlp_dim is not None and self.mlp_dim < 1:
            problems.append(f"mlp_dim must be a positive integer or None, got {self.mlp_dim!r}")
        if self.token_vocab_size is not None and not (1 <= self.token_vocab_size <= self.vocab_size):
            problems.append(
                f"token_vocab_size must be in [1, vocab_size={self.vocab_size}], got {self.token_vocab_size!r}"
            )
        if self.trained_vocab is not None:
            if isinstance(self.trained_vocab, list):  # from JSON
                object.__setattr__(self, "trained_vocab", tuple(self.trained_vocab))
            tv = self.trained_vocab
            if (not isinstance(tv, tuple) or not tv or not all(isinstance(i, int) for i in tv)
                    or any(b <= a for a, b in zip(tv, tv[1:], strict=False)) or tv[0] < 0
                    or tv[-1] >= self.vocab_size):
                problems.append(f"trained_vocab must be a non-empty, strictly increasing tuple of ids in "
                                f"[0, vocab_size={self.vocab_size}) or None")
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def d_mlp(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else 4 * self.emb_dim

    @property
    def n_tokens(self) -> int:
        """How many ids may be generated (the vocabulary without padding rows)."""
        return self.token_vocab_size if self.token_vocab_size is not None else self.vocab_size

    def replace(self, **changes: Any) -> "GPTConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)


def _divisor_near(n: int, target: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - target))


_GPT2 = dict(vocab_size=50257, context_length=1024, qkv_bias=True, tie_head=True, drop_rate=0.1)

PRESETS: dict[str, GPTConfig] = {
    # OpenAI GPT-2 sizes (the Hugging Face `gpt2*` checkpoints)
    "gpt2": GPTConfig(**_GPT2, emb_dim=768, n_heads=12, n_layers=12),
    "gpt2-medium": GPTConfig(**_GPT2, emb_dim=1024, n_heads=16, n_layers=24),
    "gpt2-large": GPTConfig(**_GPT2, emb_dim=1280, n_heads=20, n_layers=36),
    "gpt2-xl": GPTConfig(**_GPT2, emb_dim=1600, n_heads=25, n_layers=48),
    # the seed's from-scratch GPTModel: 124M, no q/k/v bias, untied head
    "seed": GPTConfig(),
    # small sizes for experiments and training on a CPU
    "small": GPTConfig(vocab_size=50257, context_length=256, emb_dim=384, n_heads=6, n_layers=6,
                       drop_rate=0.0, qkv_bias=True, tie_head=True),
    "mini": GPTConfig(vocab_size=50257, context_length=128, emb_dim=128, n_heads=4, n_layers=2,
                      drop_rate=0.0, qkv_bias=True, tie_head=True),
    # tests: pairwise-distinct sizes so that a swapped axis cannot pass a shape check
    "tiny": GPTConfig(vocab_size=97, context_length=32, emb_dim=24, n_heads=3, n_layers=2,
                      drop_rate=0.0, qkv_bias=True, tie_head=True),
}


def preset(name: str, **overrides: Any) -> GPTConfig:
    """A named preset (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `seed`, `small`, `mini`, `tiny`)."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return base.replace(**overrides) if overrides else base
