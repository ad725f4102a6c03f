"""CLT training: recovery of a planted sparse dictionary, exact resume after a kill, checkpoint errors,
and the shuffle buffer."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch

from runtime.checkpoint import CheckpointError
from tests.conftest import indexed_source
from transcoders.clt import CLTConfig, CrossLayerTranscoder
from transcoders.config import CLTTrainConfig
from transcoders.harvest import ShuffleBuffer
from transcoders.train import CHECKPOINT_NAME, initialise_from_data, sparsity_weight, train_clt

torch.set_num_threads(1)

L, D, K, P = 3, 24, 16, 3 / 16  # layers, d_model, planted features per layer, firing probability
_g = torch.Generator().manual_seed(0)
ENCODERS = torch.nn.functional.normalize(torch.randn(L, K, D, generator=_g), dim=-1)  # x_l = a_l @ ENCODERS[l]
# decoders [K, L - s, D]: own layer at scale 1, later layers at 0.3
DECODERS = [torch.randn(K, L - s, D, generator=_g) * torch.tensor([1.0] + [0.3] * (L - s - 1))[:, None]
            for s in range(L)]


def planted_batch(index: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch `index` of the planted data: sparse features a [n, L, K] -> MLP inputs x and outputs y [n, L, D]."""
    gen = torch.Generator().manual_seed(1000 + index)
    a = (torch.rand(n, L, K, generator=gen) < P) * (1 + torch.rand(n, L, K, generator=gen))
    x = torch.einsum("nlk,lkd->nld", a, ENCODERS)
    y = torch.zeros(n, L, D)
    for s in range(L):
        y[:, s:] += torch.einsum("nk,ktd->ntd", a[:, s], DECODERS[s])
    return x, y, a


def planted_source():
    """Serves planted_batch(0), planted_batch(1), ...: a resumed run sees exactly the same data."""
    return indexed_source(lambda index: planted_batch(index)[:2])


def train_config(**overrides) -> CLTTrainConfig:
    values = dict(steps=800, batch_tokens=256, lr=3e-3, warmup_steps=10, sparsity_coefficient=0.06, grad_clip=None,
                  init_firing_fraction=0.1)
    return CLTTrainConfig(**{**values, **overrides})


def new_clt(n_features: int = 32) -> CrossLayerTranscoder:
    return CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=D, n_features=n_features), seed=0)


def test_training_recovers_a_planted_dictionary():
    clt = new_clt()
    result = train_clt(clt, planted_source(), train_config(), progress=False)
    x, y, a = planted_batch(10**6, n=2048)  # held out: never served in training
    with torch.no_grad():
        acts = clt.encode(x)
        recon = clt(x)
    fvu = (recon - y).pow(2).sum((0, 2)) / (y - y.mean(0)).pow(2).sum((0, 2))  # [L]
    l0, planted_l0 = (acts > 0).float().sum(-1).mean(0), (a > 0).float().sum(-1).mean(0)
    assert torch.all(fvu < 0.1), fvu  # an untrained CLT explains nothing: fvu ~ 1
    assert torch.all((l0 > 0.7 * planted_l0) & (l0 < 1.5 * planted_l0)), (l0, planted_l0)
    matched = []
    for layer in range(L):  # each planted feature's own-layer decoder is found as a learned direction
        learned = torch.nn.functional.normalize(clt.W_dec[layer][:, 0].detach(), dim=-1)
        true = torch.nn.functional.normalize(DECODERS[layer][:, 0], dim=-1)
        matched.append(((true @ learned.T).max(1).values > 0.9).float().mean())
    assert torch.stack(matched).mean() > 0.6, matched  # random directions in 24-d: max cosine ~0.5
    assert result.history[0]["nmse"] > 0.9 and result.history[-1]["lambda_s"] == pytest.approx(0.06)


def test_data_dependent_init_sets_scales_output_mean_and_firing_fraction():
    clt = new_clt(32)
    g = torch.Generator().manual_seed(0)  # continuous data: no ties at the quantile
    batches = [(torch.randn(256, L, D, generator=g) * 3 + 1, torch.randn(256, L, D, generator=g) - 2) for _ in range(4)]
    initialise_from_data(clt, batches, 0.25)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    torch.testing.assert_close((x / clt.input_scale[:, None]).pow(2).mean((0, 2)), torch.ones(L))
    torch.testing.assert_close((y / clt.output_scale[:, None]).pow(2).mean((0, 2)), torch.ones(L))
    torch.testing.assert_close(clt.b_dec * clt.output_scale[:, None], y.mean(0), rtol=0, atol=1e-5)
    fired = (clt.encode(x) > 0).float().mean(0)  # [L, F]
    assert (fired - 0.25).abs().max() <= 1.5 / len(x)


@pytest.mark.parametrize("skip_init", ["zero", "least_squares"])
def test_skip_init_is_zero_or_the_least_squares_affine_map(skip_init):
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=D, n_features=32, skip=True), seed=0)
    g = torch.Generator().manual_seed(1)
    A, c = torch.randn(L, D, D, generator=g) / D**0.5, torch.randn(L, D, generator=g)
    batches = []
    for _ in range(4):
        x = torch.randn(256, L, D, generator=g) * 2 + 0.5
        batches.append((x, torch.einsum("nli,lio->nlo", x, A) + c))
    initialise_from_data(clt, batches, 0.25, skip_init)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        affine = clt.skip_output(x) + clt.b_dec * clt.output_scale[:, None]
    if skip_init == "zero":
        assert not clt.W_skip.any()
        torch.testing.assert_close(clt.b_dec * clt.output_scale[:, None], y.mean(0), rtol=0, atol=1e-5)
    else:  # exact data: the fit is y up to the small ridge
        assert float((affine - y).norm() / (y - y.mean(0)).norm()) < 1e-2


def test_encoder_init_from_the_decoder_transpose_then_the_firing_fraction():
    clt, uniform = new_clt(32), new_clt(32)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(256, L, D, generator=g), torch.randn(256, L, D, generator=g)) for _ in range(4)]
    initialise_from_data(clt, batches, 0.25, encoder_init="decoder_transpose")
    own = torch.nn.functional.normalize(torch.stack([w[:, 0].detach() for w in clt.W_dec]), dim=-1)  # [L, F, D]
    enc = clt.W_enc.detach()
    torch.testing.assert_close(enc.norm(dim=-1), torch.full((L, 32), (D / (3 * 32)) ** 0.5))
    torch.testing.assert_close(torch.nn.functional.normalize(enc, dim=-1), own)
    fired = (clt.encode(torch.cat([b[0] for b in batches])) > 0).float().mean(0)  # b_enc set after W_enc
    assert (fired - 0.25).abs().max() <= 1.5 / 1024
    initialise_from_data(uniform, batches, 0.25)  # the default keeps the uniform draw
    assert torch.equal(uniform.W_enc, new_clt(32).W_enc)
    with pytest.raises(ValueError, match="encoder_init"):
        initialise_from_data(new_clt(32), batches, 0.25, encoder_init="transpose")


def test_sparsity_weight_ramps_linearly_then_holds():
    config = train_config(steps=100, sparsity_coefficient=2.0, sparsity_ramp_fraction=0.5)
    assert [sparsity_weight(s, config) for s in (0, 25, 50, 99)] == [0.0, 1.0, 2.0, 2.0]


class Killed(Exception):
    pass


def test_resume_after_a_kill_continues_from_the_last_checkpoint(tmp_path: Path):
    config = train_config(steps=12, checkpoint_every=4)
    reference = new_clt(8)
    train_clt(reference, planted_source(), config, progress=False)

    def kill_at_step_7(row):
        if row["step"] == 7:
            raise Killed

    with pytest.raises(Killed):
        train_clt(new_clt(8), planted_source(), config, checkpoint_dir=tmp_path, fingerprint="f", progress=False,
                  on_step=kill_at_step_7)
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)["step"] == 4
    steps_run = []
    resumed = new_clt(8)
    result = train_clt(resumed, planted_source(), config, checkpoint_dir=tmp_path, fingerprint="f", progress=False,
                       on_step=lambda row: steps_run.append(row["step"]))
    assert steps_run == list(range(5, 13))
    assert [row["step"] for row in result.history] == list(range(1, 13))
    for name, param in reference.state_dict().items():  # bit-identical to the run that was never killed
        assert torch.equal(param, resumed.state_dict()[name]), name


def test_unusable_checkpoints_give_clear_errors(tmp_path: Path):
    config = train_config(steps=2, warmup_steps=1, checkpoint_every=1)
    train_clt(new_clt(8), planted_source(), config, checkpoint_dir=tmp_path, fingerprint="a", progress=False)
    with pytest.raises(CheckpointError, match="different CLT config or model; delete it"):
        train_clt(new_clt(8), planted_source(), config, checkpoint_dir=tmp_path, fingerprint="b", progress=False)
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # a partial write
    with pytest.raises(CheckpointError, match="is unreadable .* delete it to restart"):
        train_clt(new_clt(8), planted_source(), config, checkpoint_dir=tmp_path, fingerprint="a", progress=False)


def numbered_chunks(start: int, size: int = 10):
    """Chunk k holds tokens k*size .. k*size+size-1; each token's value is its number (L=1, D=1)."""
    k = start
    while True:
        ids = torch.arange(k * size, (k + 1) * size, dtype=torch.float32).view(-1, 1, 1)
        yield ids, -ids
        k += 1


def test_shuffle_buffer_serves_half_then_refills_half():
    buffer = ShuffleBuffer(numbered_chunks, capacity=40, batch_tokens=5, seed=0)
    batches = iter(buffer)
    first_round = torch.cat([next(batches)[0].flatten() for _ in range(4)])  # half the buffer = 4 batches
    assert buffer.chunks_read == 4  # filled with chunks 0-3
    assert len(set(first_round.tolist())) == 20 and first_round.max() < 40  # distinct tokens, from the fill
    x, y = next(batches)
    assert buffer.chunks_read == 6  # refilled half (20 tokens = 2 chunks)
    assert torch.equal(y, -x)  # inputs and outputs stay paired
    assert not torch.equal(first_round[:20].sort().values, torch.arange(20.0))  # shuffled across chunks


def test_shuffle_buffer_reuse_and_exact_restart_from_its_state():
    buffer = ShuffleBuffer(numbered_chunks, capacity=40, batch_tokens=5, reuse=3, seed=0)
    batches = iter(buffer)
    served = torch.cat([next(batches)[0].flatten() for _ in range(12)])  # one round = 3 * half
    assert buffer.chunks_read == 4 and served.max() < 40
    for taken in (12, 13, 17):  # at a round's end (refill not yet done), one batch in, mid-round
        while len(served) < 5 * taken:
            served = torch.cat([served, next(batches)[0].flatten()])
        state = copy.deepcopy(buffer.state())  # it shares the live buffer's tensors
        ahead = [next(batches)[0].flatten() for _ in range(30)]  # what the buffer serves next
        restarted = iter(ShuffleBuffer(numbered_chunks, capacity=40, batch_tokens=5, reuse=3, seed=0, state=state))
        assert all(torch.equal(next(restarted)[0].flatten(), batch) for batch in ahead)
        served = torch.cat([served, *ahead])
        assert buffer.state()["chunks_read"] > state["chunks_read"]  # the stream went on past the saved state


def test_clt_training_over_a_shuffle_buffer_resumes_bit_identically(tmp_path: Path):
    config = train_config(steps=14, checkpoint_every=5)

    def open_source(state):  # chunks of 100 tokens: the 1,024-token buffer keeps part of a chunk pending
        chunks = lambda start: (planted_batch(k, n=100)[:2] for k in itertools.count(start))  # noqa: E731
        return ShuffleBuffer(chunks, capacity=1024, batch_tokens=256, seed=3, state=state)

    reference = new_clt(8)
    expected = train_clt(reference, open_source, config, progress=False)

    def kill_at_step_8(row):
        if row["step"] == 8:
            raise Killed

    with pytest.raises(Killed):
        train_clt(new_clt(8), open_source, config, checkpoint_dir=tmp_path, fingerprint="f", progress=False,
                  on_step=kill_at_step_8)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["step"] == 5 and saved["source"]["served"] == 1  # mid-round: 4 + 5 batches, 2 per round
    resumed = new_clt(8)
    result = train_clt(resumed, open_source, config, checkpoint_dir=tmp_path, fingerprint="f", progress=False)
    assert without_time(result.history) == without_time(expected.history)
    for name, param in reference.state_dict().items():
        assert torch.equal(param, resumed.state_dict()[name]), name


def without_time(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in history]
