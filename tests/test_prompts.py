"""Prompt sets: deterministic per seed, valid minimal pairs for the tokenizer, exact metric plumbing.

Most checks use a small byte-level BPE trained in-process on the generators' word lists (digits split
one by one, like SmolLM2's), with part of the names left out so that filtering has work to do. The
committed SmolLM2 sets are checked against the real tokenizer in a slow test.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from prompts import tasks
from prompts.batches import encode_prompts
from prompts.metrics import dense_vs_sparse, logit_diff, task_evaluator, task_performance
from prompts.tasks import (
    TASKS,
    TaskError,
    TaskPrompt,
    generate_task,
    invalid_reason,
    load_task,
    token_ids,
    token_roles,
    write_task,
)
from sparse_attention.gated_attention import GatedModel
from sparse_attention.models import byte_tokenizer

LEFT_OUT_NAMES = tasks.NAMES[::3]  # never in the training text: multi-token for the trained tokenizer


@pytest.fixture(scope="module")
def word_tokenizer() -> PreTrainedTokenizerFast:
    words = [w for w in tasks.NAMES if w not in LEFT_OUT_NAMES] + list(tasks.INDUCTION_WORDS + tasks.DOC_WORDS)
    return trained_word_tokenizer(words, tasks.ANTONYMS)


@pytest.fixture(scope="module")
def training_word_tokenizer() -> PreTrainedTokenizerFast:
    """Single tokens for every training word list (prompts.tasks.TRAIN_*)."""
    words = list(tasks.TRAIN_NAMES + tasks.TRAIN_INDUCTION_WORDS + tasks.TRAIN_DOC_WORDS)
    return trained_word_tokenizer(words, tasks.TRAIN_ANTONYMS)


def trained_word_tokenizer(words: list[str], antonyms) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `words` (after a space) and the antonym words (in quotes), digits split."""
    lines = [" " + " ".join(words)] * 3
    lines += ['"' + '" "'.join(w for pair in antonyms for w in pair) + '"'] * 3
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<|bos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|bos|>")


@pytest.mark.parametrize("name", TASKS)
def test_generation_is_deterministic_per_seed(word_tokenizer, name):
    first = generate_task(name, word_tokenizer, 30, seed=3)
    assert first == generate_task(name, word_tokenizer, 30, seed=3)
    assert first != generate_task(name, word_tokenizer, 30, seed=4)


def _check_meaning(prompt: TaskPrompt) -> None:
    """The answers mean what the task says, read back from the texts."""
    if prompt.task == "ioi":
        io, s = prompt.correct[0].strip(), prompt.incorrect[0].strip()
        assert re.findall(rf"\b{io}\b", prompt.clean) == [io] and len(re.findall(rf"\b{s}\b", prompt.clean)) == 2
        assert not re.search(rf"\b({io}|{s})\b", prompt.corrupted)
    elif prompt.task == "greater_than":
        tens = int(re.search(r"\d\d(\d)\d\D", prompt.clean).group(1))
        assert re.search(r"\d\d0\d\D", prompt.corrupted)
        assert prompt.correct == tuple(str(d) for d in range(tens + 1, 10))
        assert prompt.incorrect == tuple(str(d) for d in range(tens))
    elif prompt.task == "docstring":
        clean_args = re.search(r"\(self, (.*)\):", prompt.clean).group(1).split(", ")
        corrupt_args = re.search(r"\(self, (.*)\):", prompt.corrupted).group(1).split(", ")
        assert prompt.correct == (" " + clean_args[2],)
        assert set(prompt.incorrect) == {" " + a for a in clean_args if a != clean_args[2]}
        assert re.findall(r":param (\w+):", prompt.clean) == clean_args[:2] and not set(clean_args) & set(corrupt_args)
    elif prompt.task == "antonyms":
        cue = re.search(r'"(\w+)"', prompt.clean).group(1)
        other = re.search(r'"(\w+)"', prompt.corrupted).group(1)
        pairs = {*tasks.ANTONYMS, *(pair[::-1] for pair in tasks.ANTONYMS)}
        assert (cue, prompt.correct[0]) in pairs and (other, prompt.incorrect[0]) in pairs
    elif prompt.task == "induction":
        clean, corrupted = prompt.clean.split(), prompt.corrupted.split()
        n = tasks.INDUCTION_LENGTH
        k = len(clean) - n
        assert clean[n:] == clean[:k] and clean[k] == prompt.correct[0].strip()
        assert [i for i in range(len(clean)) if clean[i] != corrupted[i]] == [k]
        assert corrupted[k] == prompt.incorrect[0].strip() and corrupted[k] not in clean


@pytest.mark.parametrize("name", TASKS)
def test_pairs_are_valid_minimal_pairs(word_tokenizer, name):
    prompts = generate_task(name, word_tokenizer, 60, seed=0)
    assert len({p.clean for p in prompts}) == 60
    for prompt in prompts:
        assert prompt.task == name and invalid_reason(prompt, word_tokenizer) is None
        assert len(token_ids(word_tokenizer, prompt.clean)) == len(token_ids(word_tokenizer, prompt.corrupted))
        answers = [token_ids(word_tokenizer, a) for a in prompt.correct + prompt.incorrect]
        assert all(len(ids) == 1 for ids in answers) and len({ids[0] for ids in answers}) == len(answers)
        assert prompt.clean != prompt.corrupted
        _check_meaning(prompt)


def test_multi_token_words_are_filtered_out(word_tokenizer):
    vocab = tasks.vocab_for(word_tokenizer)
    dropped = set(tasks.NAMES) - set(vocab.names)
    assert dropped and dropped <= set(LEFT_OUT_NAMES)  # the filter has work to do, and only drops those
    for prompt in generate_task("ioi", word_tokenizer, 60, seed=1):
        used = set(re.findall(r"\b[A-Z][a-z]+\b", prompt.clean + " " + prompt.corrupted))
        assert not used & dropped


def test_byte_tokenizer_greater_than_works_and_ioi_says_why_not():
    tokenizer = byte_tokenizer()
    prompts = generate_task("greater_than", tokenizer, 20, seed=0)  # digits are single bytes
    assert all(invalid_reason(p, tokenizer) is None for p in prompts)
    with pytest.raises(TaskError, match="single-token names"):
        generate_task("ioi", tokenizer, 5)
    with pytest.raises(TaskError, match="unknown task"):
        generate_task("sorting", tokenizer, 5)


def test_invalid_reason_catches_bad_pairs(word_tokenizer):
    a, b, c, d = [name for name in tasks.NAMES if name not in LEFT_OUT_NAMES][:4]
    good = TaskPrompt(task="ioi", template=0, clean=f"Then, {a} and {b} went", corrupted=f"Then, {c} and {d} went",
                      correct=(" " + a,), incorrect=(" " + b,),
                      role_pieces=(("Then,", "other"), (f" {a}", "IO"), (" and", "other"), (f" {b}", "S1"),
                                   (" went", "other")))
    assert invalid_reason(good, word_tokenizer) is None
    longer = good.model_copy(update={"corrupted": f"Then, {c} and {d} and {a} went"})
    assert "tokens" in invalid_reason(longer, word_tokenizer)
    multi = good.model_copy(update={"correct": (f" {a} {c}",)})
    assert "is 2 tokens" in invalid_reason(multi, word_tokenizer)
    same = good.model_copy(update={"corrupted": good.clean})
    assert "identical" in invalid_reason(same, word_tokenizer)
    with pytest.raises(ValidationError, match="both correct and incorrect"):
        TaskPrompt(task="ioi", template=0, clean="a", corrupted="b", correct=(" Mary",), incorrect=(" Mary",),
                   role_pieces=(("a", "other"),))


def _check_roles(prompt: TaskPrompt, tokenizer) -> None:
    """Token roles line up with the tokens: every non-space character of a token lies in a piece of the token's
    role (the last token is `end`), and each role holds the words the task says, read back from the tokens."""
    ids = token_ids(tokenizer, prompt.clean)
    roles = token_roles(prompt, tokenizer)
    texts = [tokenizer.decode([i]) for i in ids]
    assert len(roles) == len(ids) and "".join(texts) == prompt.clean and roles[-1] == tasks.END_ROLE
    char_roles = [role for text, role in prompt.role_pieces for _ in text]
    start = 0
    for text, role in zip(texts[:-1], roles[:-1]):
        assert {char_roles[start + i] for i, c in enumerate(text) if not c.isspace()} <= {role}
        start += len(text)

    def joined(role: str) -> str:
        return "".join(t for t, r in zip(texts, roles) if r == role)

    if prompt.task == "ioi":
        assert roles.count("IO") == roles.count("S1") == roles.count("S2") == 1
        assert joined("IO") == prompt.correct[0] and joined("S1") == joined("S2") == prompt.incorrect[0]
        assert joined("verb").strip() in {"gave", "give", "said"} and " to".endswith(texts[-1])
        assert roles.index("S1") < roles.index("S2") and roles.index("IO") < roles.index("S2")
    elif prompt.task == "greater_than":
        assert joined("start_tens") == str(int(prompt.correct[0]) - 1) and joined("start_units").isdigit()
        assert joined("start_century") == joined("end_century") + texts[-1] and joined("noun").strip().isalpha()
        year = joined("start_century").strip() + joined("start_tens") + joined("start_units")
        assert re.search(rf"\b{year}\b", prompt.clean)
    elif prompt.task == "docstring":
        assert joined("arg2") == prompt.correct[0]
        assert tuple(joined(f"arg{i}") for i in (0, 1, 3)) == prompt.incorrect
        assert joined("param_arg0") == joined("arg0") and joined("param_arg1") == joined("arg1")
        assert "param".endswith(texts[-1]) and joined("param").count("param") == 2
        assert joined("func").strip() in tasks.DOC_WORDS + tasks.TRAIN_DOC_WORDS
    elif prompt.task == "antonyms":
        assert joined("cue") == re.search(r'"(\w+)"', prompt.clean).group(1)
        assert [t.strip() for t, r in zip(texts, roles) if r in ("quote", "end")] == ['"'] * 3
        assert joined("opposite").strip() in {"opposite", "antonym"}
    elif prompt.task == "induction":
        k = len(ids) - tasks.INDUCTION_LENGTH  # single-token words
        assert roles == (["prefix"] * (k - 1) + ["cue", "answer"] + ["suffix"] * (tasks.INDUCTION_LENGTH - k - 1)
                         + ["repeat"] * (k - 1) + ["end"])
        assert joined("answer") == prompt.correct[0] and texts[-1] == joined("cue")
        assert joined("repeat") == joined("prefix")


@pytest.mark.parametrize("name", TASKS)
def test_token_roles_line_up_with_the_tokens_of_every_template(word_tokenizer, name):
    prompts = generate_task(name, word_tokenizer, 150, seed=0)
    n_templates = {"ioi": len(tasks.IOI_TEMPLATES), "greater_than": len(tasks.GT_TEMPLATES),
                   "antonyms": len(tasks.ANTONYM_TEMPLATES)}.get(name, 1)
    assert {p.template for p in prompts} == set(range(n_templates))  # the set mixes every template
    seen = set()
    for prompt in prompts:
        _check_roles(prompt, word_tokenizer)
        seen |= set(token_roles(prompt, word_tokenizer))
    assert seen == set(tasks.TASK_ROLES[name])  # every role occurs, and no other
    batch = encode_prompts(prompts[:5], word_tokenizer, batch_size=1)
    for b in batch:
        assert b.roles == ((tasks.BOS_ROLE, *token_roles(prompts[b.indices[0]], word_tokenizer)),)
        assert len(b.roles[0]) == b.clean.shape[1]


def test_every_token_of_a_split_word_takes_its_role_and_a_token_across_roles_is_refused(word_tokenizer):
    split = next(n for n in LEFT_OUT_NAMES if len(token_ids(word_tokenizer, " " + n)) > 1)
    a, c, d = [name for name in tasks.NAMES if name not in LEFT_OUT_NAMES][:3]
    prompt = TaskPrompt(task="ioi", template=0, clean=f"Then, {split} and {a} went", role_pieces=(
        ("Then,", "other"), (f" {split}", "IO"), (" and", "other"), (f" {a}", "S1"), (" went", "other")),
        corrupted=f"Then, {c} and {d} went", correct=(" " + a,), incorrect=(" " + c,))
    by_piece = [[role] * len(token_ids(word_tokenizer, text)) for text, role in prompt.role_pieces]
    assert len(by_piece[1]) > 1  # the name is several tokens, each labelled IO
    assert token_roles(prompt, word_tokenizer) == [*sum(by_piece, [])[:-1], "end"]
    assert len(token_ids(word_tokenizer, f" {a}")) == 1
    cut = prompt.model_copy(update={"role_pieces": (*prompt.role_pieces[:3], (f" {a[:2]}", "S1"), (a[2:], "IO"),
                                                    (" went", "other"))})  # one token, two roles
    n_before = len(sum(by_piece[:3], []))
    with pytest.raises(TaskError, match=rf"token {n_before} \(' {a}'\) .* spans the roles \['IO', 'S1'\]"):
        token_roles(cut, word_tokenizer)
    same_length = cut.model_copy(update={"corrupted": cut.clean.replace("Then", "When")})
    assert "spans the roles" in invalid_reason(same_length, word_tokenizer)  # such a prompt is never generated
    with pytest.raises(ValidationError, match="join to"):
        TaskPrompt.model_validate({**prompt.model_dump(), "role_pieces": prompt.role_pieces[:-1]})
    with pytest.raises(ValidationError, match=r"roles \['cue'\] are not roles of task 'ioi'"):
        TaskPrompt.model_validate({**prompt.model_dump(), "role_pieces": (*prompt.role_pieces[:-1], (" went", "cue"))})


def test_write_and_load_round_trip(tmp_path, word_tokenizer):
    prompts = generate_task("antonyms", word_tokenizer, 10, seed=0)
    write_task(prompts, tasks.task_path("antonyms", tmp_path))
    assert load_task("antonyms", tmp_path) == prompts
    with pytest.raises(TaskError, match="--write"):
        load_task("ioi", tmp_path)
    path = tasks.task_path("antonyms", tmp_path)
    path.write_text(path.read_text() + '{"task": "antonyms"}\n')
    with pytest.raises(TaskError, match=r"antonyms.jsonl:11 is not a valid prompt"):
        load_task("antonyms", tmp_path)
    path.write_text(generate_task("ioi", word_tokenizer, 1, seed=0)[0].model_dump_json() + "\n")
    with pytest.raises(TaskError, match="holds a 'ioi' prompt"):
        load_task("antonyms", tmp_path)


@pytest.mark.parametrize("name", TASKS)
def test_committed_prompt_sets_load(name):
    prompts = load_task(name)
    assert len(prompts) >= 300 and len({p.clean for p in prompts}) == len(prompts)


def test_logit_diff_is_mean_correct_minus_mean_incorrect(word_tokenizer):
    prompts = generate_task("greater_than", word_tokenizer, 6, seed=0)
    generator = torch.Generator().manual_seed(0)
    batches = encode_prompts(prompts, word_tokenizer, batch_size=4)
    assert sorted(i for batch in batches for i in batch.indices) == list(range(6))
    for batch in batches:
        logits = torch.randn(len(batch.indices), len(word_tokenizer), generator=generator)
        for row, index in enumerate(batch.indices):
            prompt = prompts[index]
            assert batch.clean[row, 1:].tolist() == token_ids(word_tokenizer, prompt.clean)
            correct = [token_ids(word_tokenizer, a)[0] for a in prompt.correct]
            incorrect = [token_ids(word_tokenizer, a)[0] for a in prompt.incorrect]
            expected = logits[row, correct].mean() - logits[row, incorrect].mean()
            torch.testing.assert_close(logit_diff(logits, batch)[row], expected, rtol=0, atol=1e-6)
        assert batch.clean[:, 0].eq(word_tokenizer.bos_token_id).all()


def test_task_performance_matches_a_bag_of_tokens_model(word_tokenizer):
    """A fake LM whose last-position logit for token t counts t in the input: on IOI the subject (twice)
    beats the indirect object (once), so the clean logit diff is exactly -1 and the corrupted one 0."""
    vocab_size = len(word_tokenizer)

    def bag_of_tokens(ids: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros(ids.shape[0], vocab_size).scatter_add_(1, ids, torch.ones(ids.shape))
        return counts[:, None, :].expand(-1, ids.shape[1], -1)

    prompts = generate_task("ioi", word_tokenizer, 40, seed=2)
    result = task_performance(bag_of_tokens, word_tokenizer, prompts, batch_size=7)
    assert result["n_prompts"] == 40
    assert result["clean"] == {"accuracy": 0.0, "mean_logit_diff": -1.0, "std_logit_diff": 0.0}
    assert result["corrupted"]["mean_logit_diff"] == 0.0
    json.dumps(result)


@pytest.mark.slow
def test_committed_sets_are_valid_and_reproducible_with_smollm2_tokenizer():
    from sparse_attention.models import load_model

    _, tokenizer = load_model("smollm2-135m")
    for name in TASKS:
        committed = load_task(name)
        assert all(invalid_reason(p, tokenizer) is None for p in committed)
        assert generate_task(name, tokenizer, len(committed), seed=tasks.DEFAULT_SEED) == committed
        for prompt in committed:  # token roles line up with SmolLM2's tokens in every template
            _check_roles(prompt, tokenizer)


@pytest.fixture(scope="module")
def word_llama(word_tokenizer):
    """A random 2-layer Llama over word_tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(word_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=word_tokenizer.bos_token_id, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


def test_dense_vs_sparse_task_behaviour_equals_a_hand_computation(word_tokenizer, word_llama):
    original = word_llama
    sparse = GatedModel(copy.deepcopy(original), offset_init=0.0).eval()  # about half the gates shut
    evaluate = task_evaluator(n_prompts=6, seed=1, batch_size=4)
    result = evaluate(original, sparse, word_tokenizer)
    assert result["seed"] == 1 and set(result) - {"seed"} == set(TASKS)
    for task in TASKS:
        prompts = generate_task(task, word_tokenizer, 6, seed=1)
        expected = {}
        for name, model in (("dense", original), ("sparse", sparse)):
            diffs = []
            for prompt in prompts:  # one prompt at a time, answers looked up by hand
                ids = torch.tensor([[word_tokenizer.bos_token_id, *token_ids(word_tokenizer, prompt.clean)]])
                with torch.no_grad():
                    last = model(input_ids=ids).logits[0, -1]
                correct = torch.stack([last[token_ids(word_tokenizer, a)[0]] for a in prompt.correct]).mean()
                incorrect = torch.stack([last[token_ids(word_tokenizer, a)[0]] for a in prompt.incorrect]).mean()
                diffs.append((correct - incorrect).item())
            expected[name] = {"accuracy": sum(d > 0 for d in diffs) / len(diffs), "mean_logit_diff": sum(diffs) / 6}
        got = result[task]
        assert got["n_prompts"] == 6
        for name in ("dense", "sparse"):
            assert got[name]["accuracy"] == pytest.approx(expected[name]["accuracy"], abs=1e-7)
            assert got[name]["mean_logit_diff"] == pytest.approx(expected[name]["mean_logit_diff"], abs=1e-5)
        dense_diff, sparse_diff = expected["dense"]["mean_logit_diff"], expected["sparse"]["mean_logit_diff"]
        if dense_diff > 0:
            assert got["logit_diff_ratio"] == pytest.approx(sparse_diff / dense_diff, rel=1e-4)
        else:
            assert got["logit_diff_ratio"] is None
    assert any(result[t]["sparse"] != result[t]["dense"] for t in TASKS)  # the gates changed something
    json.dumps(result)


def test_ratio_is_refused_against_a_non_positive_dense_value(word_tokenizer):
    prompts = generate_task("ioi", word_tokenizer, 4, seed=0)

    def zeros(ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(ids.shape[0], ids.shape[1], len(word_tokenizer))

    result = dense_vs_sparse(zeros, zeros, word_tokenizer, {"ioi": prompts})["ioi"]
    assert result["dense"] == {"accuracy": 0.0, "mean_logit_diff": 0.0}
    assert result["logit_diff_ratio"] is None and result["accuracy_ratio"] is None


def _words_in(text: str) -> set[str]:
    return {word.lower() for word in re.findall(r"[A-Za-z]+", text)}


EVALUATION_WORDS = {w.lower() for w in tasks.NAMES + tasks.IOI_PLACES + tasks.IOI_OBJECTS + tasks.GT_NOUNS
                    + tasks.DOC_WORDS + tasks.DOC_DESCRIPTIONS + tasks.INDUCTION_WORDS} | {
    w for pair in tasks.ANTONYMS for w in pair}
TEMPLATE_WORDS = set().union(*map(_words_in, tasks.IOI_TEMPLATES + tasks.GT_TEMPLATES + tasks.ANTONYM_TEMPLATES
                                  + (tasks.DOC_TEMPLATE,)))


def test_training_word_lists_share_no_word_with_any_evaluation_list():
    training = {w.lower() for w in tasks.TRAIN_NAMES + tasks.TRAIN_PLACES + tasks.TRAIN_OBJECTS
                + tasks.TRAIN_GT_NOUNS + tasks.TRAIN_DOC_WORDS + tasks.TRAIN_DOC_DESCRIPTIONS
                + tasks.TRAIN_INDUCTION_WORDS}
    antonym_words = [w for pair in tasks.TRAIN_ANTONYMS for w in pair]
    assert not (training | set(antonym_words)) & EVALUATION_WORDS
    assert len(set(antonym_words)) == len(antonym_words)  # each word in one pair: one answer per cue
    assert not set(range(tasks.TRAIN_GT_CENTURIES[0], tasks.TRAIN_GT_CENTURIES[1] + 1)) & set(range(11, 18))


@pytest.mark.parametrize("name", TASKS)
def test_training_prompts_are_valid_and_hold_no_evaluation_word(training_word_tokenizer, word_tokenizer, name):
    prompts = generate_task(name, training_word_tokenizer, 40, seed=0, words="training")
    assert prompts == generate_task(name, training_word_tokenizer, 40, seed=0, words="training")
    for prompt in prompts:
        assert invalid_reason(prompt, training_word_tokenizer) is None
        _check_roles(prompt, training_word_tokenizer)
        text = " ".join((prompt.clean, prompt.corrupted, *prompt.correct, *prompt.incorrect))
        assert not (_words_in(text) - TEMPLATE_WORDS) & EVALUATION_WORDS, prompt.clean
        if name == "greater_than":
            assert re.search(r"year 1[89]|from 1[89]", prompt.clean)
    evaluation = {p.clean for p in generate_task(name, word_tokenizer, 40, seed=0)}
    assert not evaluation & {p.clean for p in prompts}


def test_an_unknown_word_set_is_refused(word_tokenizer):
    with pytest.raises(TaskError, match="unknown word set 'train'; word sets are evaluation, training"):
        generate_task("ioi", word_tokenizer, 5, words="train")
