"""The CLT stage's config: validated on load, saved beside the stage's outputs as clt_config.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from runtime.precision import AUTO_DESCRIPTION, PRECISION_DESCRIPTION, AutoPrecision
from sparse_attention.data import DataConfig


class CLTShapeConfig(BaseModel):
    """The dictionary: `n_features` per layer (n_layers and d_model come from the model)."""

    model_config = ConfigDict(extra="forbid")

    n_features: int = Field(512, gt=0, description="features per layer; an untied SmolLM2 CLT has ~285k * F weights")
    threshold_init: float = Field(0.03, ge=0)
    bandwidth: float = Field(1.0, gt=0, description="rectangle kernel width of the JumpReLU threshold gradient")
    skip: bool = Field(False, description="a linear skip path per layer (MLP input -> output, d_model^2 weights "
                       "each, trained with the features); attribution treats it as one more linear path")
    seed: int = 0


class HarvestConfig(BaseModel):
    """How activations get from the LM to the trainer: forward hooks into an in-memory shuffle buffer."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(8, gt=0, description="token blocks per LM forward")
    buffer_tokens: int = Field(16384, ge=2, description="shuffle buffer size; each round serves half, refills half")
    reuse: int = Field(1, ge=1, description="times each harvested token is served, on average (LM forwards are costly)")
    seed: int = 0


class CacheConfig(BaseModel):
    """Optional on-disk activation cache (fp16, sharded, memory-mapped) that several runs can share."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    directory: Path | None = Field(None, description="default: <output>/activations")
    max_tokens: int = Field(200_000, gt=0, description="tokens to harvest into the cache (~69 KB each for SmolLM2)")
    shard_tokens: int = Field(8192, gt=0)


class CLTTrainConfig(BaseModel):
    """Optimisation: loss weights, schedule, checkpoints."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, gt=0)
    batch_tokens: int = Field(1024, gt=0, description="tokens per optimiser step")
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    sparsity_coefficient: float = Field(0.02, ge=0, description="final lambda_s on sum_f tanh(c * |W_dec,f| * a_f)")
    sparsity_c: float = Field(4.0, gt=0, description="c inside the tanh")
    sparsity_ramp_fraction: float = Field(0.8, gt=0, le=1, description="lambda_s ramps linearly from 0 over this part")
    preact_coefficient: float = Field(3e-6, ge=0, description="weight of sum_f relu(-pre_f): revives dead features")
    normalisation_batches: int = Field(4, gt=0, description="batches used to estimate the per-layer scales")
    init_firing_fraction: float | None = Field(
        0.05, gt=0, lt=1, description="b_enc starts so each feature fires on this fraction of tokens (None: b_enc=0)"
    )
    encoder_init: Literal["uniform", "decoder_transpose"] = Field(
        "uniform", description="W_enc starts as drawn (uniform), or each feature's encoder row along its own-layer "
        "decoder row (W_dec[l][f, 0]) at the uniform draw's expected norm sqrt(d_model / (3 n_features)); applied "
        "before init_firing_fraction sets b_enc")
    skip_init: Literal["zero", "least_squares"] = Field(
        "zero", description="with clt.skip: W_skip starts at 0, or at the ridge least-squares map from MLP input to "
        "output on the normalisation batches (b_dec then at the mean output minus the mean input's skip output)")
    dead_window_tokens: int = Field(100_000, gt=0, description="a feature silent this long in training counts as dead")
    decode: Literal["sparse", "dense"] = Field("sparse", description="dense is the slow reference")
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoint: bool = Field(False, description="keep the training state (4x the CLT's size) once the stage is done")
    log_every: int = Field(1, gt=0)
    seed: int = 0
    threads: int | None = Field(None, gt=0, description="torch threads; None = leave as is")

    @model_validator(mode="after")
    def _warmup_shorter_than_training(self) -> CLTTrainConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self


class CLTEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    heldout_blocks: int = Field(32, gt=0, description="held-out token blocks for nMSE, L0, dead features and CE")
    batch_size: int = Field(8, gt=0)


class FeaturesConfig(BaseModel):
    """Feature dashboards (transcoders/dashboards.py): a pass over held-out text, after training, of a CLT."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    tokens: int = Field(100_000, gt=0, description="held-out tokens to scan (at most the whole held-out split)")
    top_k: int = Field(10, gt=0, description="top activating contexts kept per feature")
    n_random: int = Field(4, ge=0, description="contexts per feature spread over its activation range")
    random_pool: int = Field(4, ge=1, description="the random contexts are picked from a uniform sample of "
                             "n_random * random_pool active tokens per feature")
    window: int = Field(16, ge=1, description="tokens per context; the activating token has window // 4 after it")
    n_tokens_listed: int = Field(10, gt=0, description="promoted, suppressed and input tokens stored per feature")
    batch_size: int = Field(8, gt=0, description="held-out blocks per LM forward")
    checkpoint_tokens: int = Field(20_000, gt=0, description="save the scan state every this many tokens")
    precision: AutoPrecision = Field("auto", validate_default=True, description="LM and encoder forwards of the "
                                     "scan: " + PRECISION_DESCRIPTION + AUTO_DESCRIPTION)
    seed: int = 0


class CLTStageConfig(BaseModel):
    """Everything the CLT stage needs besides the model; `model_dump()` is saved as clt_config.yaml."""

    model_config = ConfigDict(extra="forbid")

    data: DataConfig = DataConfig()
    clt: CLTShapeConfig = CLTShapeConfig()
    harvest: HarvestConfig = HarvestConfig()
    cache: CacheConfig = CacheConfig()
    train: CLTTrainConfig = CLTTrainConfig()
    eval: CLTEvalConfig = CLTEvalConfig()
    precision: AutoPrecision = Field("auto", validate_default=True, description="harvest (LM forwards) and CLT "
                                     "training (its forward, the encoder matmuls; decoding and the loss stay fp32): "
                                     + PRECISION_DESCRIPTION + AUTO_DESCRIPTION + ". Evaluation runs in fp32")
    memory_budget_gb: float | None = Field(
        None, gt=0, description="refuse to start above this estimate; None = the memory available at start"
    )

    @model_validator(mode="after")
    def _buffer_holds_a_batch(self) -> CLTStageConfig:
        if self.harvest.buffer_tokens < 2 * self.train.batch_tokens:
            raise ValueError(
                f"harvest.buffer_tokens ({self.harvest.buffer_tokens}) must be at least twice train.batch_tokens "
                f"({self.train.batch_tokens}): each round serves half the buffer"
            )
        return self
