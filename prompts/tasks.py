"""Clean/corrupted prompt sets for circuit discovery: IOI, Greater-Than, Docstring, antonyms, induction.

Every prompt is a minimal pair: the corrupted text has the same number of tokens as the clean one,
and the metric (`prompts.metrics.logit_diff`) is the logit difference mean(logits[correct]) -
mean(logits[incorrect]) at the last position (higher = the clean behaviour). Prompts are drawn from word lists by a seeded generator,
then checked with the tokenizer that will run them (single-token answers, equal lengths); pairs that
fail are dropped and drawn again. `python -m prompts --write` writes the SmolLM2 sets to
prompts/data/{task}.jsonl; `--performance N` measures the dense model on N prompts per task.

Token conventions (SmolLM2's tokenizer; our code prefixes bos to every sequence): names and words
after a space carry the leading space (" Mary"); SmolLM2 splits numbers into single digits, so
Greater-Than predicts the tens digit of the end year (see `greater_than_candidate`).

Token roles: each generator cuts the clean text into (text, role) pieces (`TaskPrompt.role_pieces`, roles
in `TASK_ROLES`), so a token position means the same thing in every prompt of a task, whatever its template
or length. `token_roles` labels the tokens after tokenizing: a token takes the role of the piece holding
its first non-space character (whitespace joins the piece after it), every token of a piece split into
several tokens takes the piece's role, and the last token, which the metric reads, is always `end`. A
token whose characters fall in pieces of two roles makes the prompt invalid for that tokenizer.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROMPT_DIR = Path(resources.files("prompts") / "data")  # package data: ships in the wheel
TASKS = ("ioi", "greater_than", "docstring", "antonyms", "induction")
DEFAULT_N_PROMPTS = 300
DEFAULT_SEED = 0
BOS_ROLE = "bos"  # the role of the bos token that encode_prompts prefixes
END_ROLE = "end"  # the role of every prompt's last token, the position the metric reads
# Each task's token roles (besides bos), in prompt order where the templates agree; the generators' docstrings
# say which words carry which role.
TASK_ROLES = {
    "ioi": ("IO", "S1", "S2", "place", "object", "verb", "other", END_ROLE),
    "greater_than": ("noun", "start_century", "start_tens", "start_units", "end_century", "other", END_ROLE),
    "docstring": ("func", "arg0", "arg1", "arg2", "arg3", "description", "param", "param_arg0", "param_arg1",
                  "other", END_ROLE),
    "antonyms": ("opposite", "quote", "cue", "other", END_ROLE),
    "induction": ("prefix", "cue", "answer", "suffix", "repeat", END_ROLE),
}


class TaskError(ValueError):
    """A task name, prompt file or prompt set that cannot be used; the message says what to do."""


class TaskPrompt(BaseModel):
    """One clean/corrupted minimal pair and the answers of its logit-difference metric."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    template: int = Field(ge=0, description="index of the template the prompt came from")
    clean: str = Field(min_length=1)
    corrupted: str = Field(min_length=1)
    correct: tuple[str, ...] = Field(min_length=1, description="answers the clean prompt should predict")
    incorrect: tuple[str, ...] = Field(min_length=1, description="contrast answers (what corruption favours)")
    role_pieces: tuple[tuple[str, str], ...] = Field(
        min_length=1, description="the clean text cut into (text, role) pieces, in order (see `token_roles`)")

    @model_validator(mode="after")
    def _pieces_are_the_clean_text(self) -> TaskPrompt:
        joined = "".join(text for text, _ in self.role_pieces)
        if joined != self.clean:
            raise ValueError(f"role_pieces join to {joined!r}, not the clean text {self.clean!r}")
        unknown = {role for _, role in self.role_pieces} - set(TASK_ROLES.get(self.task, ()))
        if unknown:
            raise ValueError(f"roles {sorted(unknown)} are not roles of task {self.task!r} "
                             f"({', '.join(TASK_ROLES.get(self.task, ()))})")
        return self

    @field_validator("incorrect")
    @classmethod
    def _answers_differ(cls, incorrect: tuple[str, ...], info) -> tuple[str, ...]:
        shared = set(incorrect) & set(info.data.get("correct", ()))
        if shared:
            raise ValueError(f"answers {sorted(shared)} are both correct and incorrect")
        return incorrect


# --------------------------------------------------------------------------------------------------
# Word lists (filtered per tokenizer to single tokens before use)


def _words(text: str) -> tuple[str, ...]:
    """Whitespace-separated words, duplicates dropped, order kept."""
    return tuple(dict.fromkeys(text.split()))


NAMES = _words(
    "Mary John Alice Bob Tom James Robert Michael William David Richard Joseph Thomas Charles Daniel "
    "Matthew Anthony Mark Paul Steven Andrew Kevin Brian George Edward Ronald Timothy Jason Jeffrey Ryan "
    "Jacob Gary Eric Jonathan Stephen Larry Justin Scott Brandon Frank Benjamin Gregory Samuel Raymond "
    "Patrick Alexander Jack Dennis Jerry Tyler Aaron Henry Adam Peter Nathan Zachary Kyle Walter Harold "
    "Jeremy Ethan Carl Keith Roger Gerald Christian Terry Sean Arthur Austin Noah Lawrence Jesse Joe "
    "Bryan Billy Jordan Albert Dylan Bruce Willie Gabriel Alan Juan Logan Wayne Ralph Roy Eugene Randy "
    "Vincent Russell Louis Philip Bobby Johnny Bradley Patricia Jennifer Linda Elizabeth Barbara Susan "
    "Jessica Sarah Karen Nancy Lisa Betty Margaret Sandra Ashley Kimberly Emily Donna Michelle Dorothy "
    "Carol Amanda Melissa Deborah Stephanie Rebecca Sharon Laura Cynthia Kathleen Amy Shirley Angela "
    "Helen Anna Brenda Pamela Nicole Emma Samantha Katherine Christine Debra Rachel Catherine Carolyn "
    "Janet Ruth Maria Heather Diane Virginia Julie Joyce Victoria Olivia Kelly Christina Lauren Joan "
    "Evelyn Judith Megan Cheryl Andrea Hannah Martha Jacqueline Frances Gloria Ann Teresa Kathryn Sara "
    "Janice Jean Alice Madison Doris Abigail Julia Judy Grace Denise Amber Marilyn Beverly Danielle "
    "Theresa Sophia Marie Diana Brittany Natalie Isabella Charlotte Rose Alexis Kayla Lucy Max Sam Ben"
)
IOI_PLACES = _words(
    "store garden restaurant school hospital office house station park library market beach church museum "
    "airport bank hotel cafe"
)
IOI_OBJECTS = _words(
    "ring kiss bone basketball computer necklace drink snack book letter gift pen ball cake flower key hat "
    "phone bag ticket"
)
# Wang et al. (2022) IOI templates: {X} and {Y} are the two names (either order), {S} the subject, who
# repeats; the answer is the other name, the indirect object.
IOI_TEMPLATES = (
    "Then, {X} and {Y} went to the {place}. {S} gave a {object} to",
    "Then, {X} and {Y} had a lot of fun at the {place}. {S} gave a {object} to",
    "Then, {X} and {Y} were working at the {place}. {S} decided to give a {object} to",
    "Then, {X} and {Y} were thinking about going to the {place}. {S} wanted to give a {object} to",
    "Then, {X} and {Y} had a long argument, and afterwards {S} said to",
    "After {X} and {Y} went to the {place}, {S} gave a {object} to",
    "When {X} and {Y} got a {object} at the {place}, {S} decided to give it to",
    "When {X} and {Y} got a {object} at the {place}, {S} decided to give the {object} to",
    "While {X} and {Y} were working at the {place}, {S} gave a {object} to",
    "While {X} and {Y} were commuting to the {place}, {S} gave a {object} to",
    "After the lunch, {X} and {Y} went to the {place}. {S} gave a {object} to",
    "Afterwards, {X} and {Y} went to the {place}. {S} gave a {object} to",
    "Then, {X} and {Y} had a long argument. Afterwards {S} said to",
    "The {place} {X} and {Y} went to had a {object}. {S} gave it to",
    "Friends {X} and {Y} found a {object} at the {place}. {S} gave it to",
)
IOI_WORD_ROLES = {"gave": "verb", "give": "verb", "said": "verb"}

# Hanna et al. (2023) Greater-Than nouns (a subset).
GT_NOUNS = _words(
    "war expedition project campaign siege voyage journey reign dynasty treaty trial study program "
    "investigation construction negotiation occupation rebellion revolution drought famine plague "
    "epidemic crisis conflict dispute partnership marriage friendship alliance tour pilgrimage strike "
    "boycott blockade embargo rivalry contract apprenticeship exile imprisonment captivity "
    "experiment excavation survey mission operation festival exhibition"
)
GT_TEMPLATES = (
    "The {noun} lasted from the year {century}{start} to the year {century}",
    "The {noun} started in the year {century}{start} and ended in the year {century}",
    "The {noun} went on from {century}{start} until {century}",
)

DOC_WORDS = _words(
    "load size files last data name path value index count key item user text mode line state node "
    "config source target result output input start end step limit offset width height color image "
    "title label message error token query table field column row record cache buffer stream block "
    "parent child group order level score weight rate speed time date price amount total number "
    "model layer unit port host address timeout option flag filter pattern format prefix suffix "
    "version status type kind code id info content context event handler callback func args request "
    "response client server session account email password location position direction angle radius"
)
DOC_DESCRIPTIONS = _words(
    "oil column piece crime population unit dark bank trade sound river fire world house money story "
    "hand party water place week case point city night family head room friend power country school "
    "answer field form game line light market music paper price report space table war wind wood word "
    "board box cell class club group horse king lake land law letter list mind moon mountain news"
)
DOC_TEMPLATE = (
    'def {func}(self, {a0}, {a1}, {a2}, {a3}):\n    """{d0} {d1} {d2}\n\n'
    "    :param {a0}: {d3} {d4}\n    :param {a1}: {d5} {d6}\n    :param"
)

# Every word is in one pair only, so each cue has one answer.
ANTONYMS = (
    ("large", "small"), ("hot", "cold"), ("up", "down"), ("good", "bad"), ("fast", "slow"),
    ("high", "low"), ("old", "new"), ("long", "short"), ("open", "closed"), ("happy", "sad"),
    ("rich", "poor"), ("light", "dark"), ("hard", "soft"), ("strong", "weak"), ("early", "late"),
    ("full", "empty"), ("clean", "dirty"), ("wet", "dry"), ("true", "false"), ("love", "hate"),
    ("win", "lose"), ("inside", "outside"), ("top", "bottom"), ("left", "right"), ("day", "night"),
    ("black", "white"), ("thick", "thin"), ("wide", "narrow"),
    ("deep", "shallow"), ("loud", "quiet"), ("easy", "difficult"), ("cheap", "expensive"),
    ("safe", "dangerous"), ("first", "last"), ("before", "after"), ("above", "below"), ("push", "pull"),
    ("give", "take"), ("buy", "sell"), ("start", "end"), ("north", "south"),
    ("east", "west"), ("positive", "negative"), ("friend", "enemy"), ("war", "peace"), ("male", "female"),
    ("alive", "dead"), ("always", "never"), ("more", "less"), ("maximum", "minimum"), ("increase", "decrease"),
    ("accept", "reject"), ("arrive", "leave"), ("remember", "forget"), ("success", "failure"),
    ("question", "answer"), ("beautiful", "ugly"), ("brave", "afraid"), ("kind", "cruel"),
    ("smart", "stupid"), ("big", "little"), ("near", "far"), ("in", "out"),
    ("on", "off"), ("yes", "no"), ("all", "none"), ("public", "private"), ("major", "minor"),
    ("internal", "external"), ("input", "output"), ("import", "export"), ("sweet", "sour"),
    ("warm", "cool"), ("sharp", "dull"), ("real", "fake"), ("same", "different"),
    ("future", "past"), ("present", "absent"), ("winter", "summer"), ("ancient", "modern"),
    ("simple", "complex"), ("common", "rare"), ("include", "exclude"), ("entrance", "exit"),
)
ANTONYM_TEMPLATES = (
    'The opposite of "{word}" is "',  # the paper's prompt
    'The antonym of "{word}" is "',
    'The opposite of the word "{word}" is the word "',
)
ANTONYM_WORD_ROLES = {'"': "quote", "opposite": "opposite", "antonym": "opposite"}

INDUCTION_WORDS = tuple(sorted(set(DOC_WORDS + DOC_DESCRIPTIONS + IOI_PLACES + IOI_OBJECTS + GT_NOUNS)))
INDUCTION_LENGTH = 10  # tokens in the first copy

# Word lists of the training prompts (`words="training"`): task-format prompts a sparsify run may train on, with
# no word in common with any evaluation list above (tests/test_prompts.py checks), so behaviour measured on the
# evaluation prompts is not behaviour on words seen in training. The templates are the same.
TRAIN_NAMES = _words(
    "Oscar Felix Hugo Leo Ivan Victor Simon Martin Oliver Lucas Owen Isaac Caleb Eli Ian Luke Mason Miles Nolan "
    "Seth Tristan Wesley Xavier Jake Chris Dan Fred Greg Jim Ken Neil Phil Rick Tony Wade Zoe Chloe Ella Ivy Lily "
    "Mia Nora Ruby Stella Violet Clara Eva Fiona Gina Iris Jade Kate Leah Maya Nina Paige Rita Tara Vera Wendy "
    "Lena Molly Holly Sally Jane Ellen Irene Kim Beth Carla Dana Erin Faith Gail Hazel Joy Kay Lori Mabel Nell "
    "Pearl Rosa Sue Tina Val Leon Otto Hans Karl Fritz Igor Boris Sergei Dmitri Pablo Carlos Diego Luis Jose "
    "Manuel Pedro Miguel Rafael Marco Luca Paolo Giovanni Antonio Francesco Pierre Jacques Andre Rene Claude "
    "Henri Marcel Emile Omar Ali Hassan Ahmed Yusuf Ravi Arjun Raj Vikram Kenji Hiro Yuki Chen Wei Li Ming Jun "
    "Sven Lars Nils Erik Olaf Ingrid Astrid Freya Greta Heidi Elsa Anya Olga Ivana Sonia Lara Nadia"
)
TRAIN_PLACES = _words(
    "farm zoo mall gym theater bakery factory island harbor village castle temple stadium bridge forest cinema "
    "pharmacy shop bar kitchen garage"
)
TRAIN_OBJECTS = _words(
    "cup watch toy coin lamp map shirt apple candle jar radio camera wallet pencil blanket bottle guitar puzzle "
    "sandwich umbrella chair knife spoon plate"
)
TRAIN_GT_NOUNS = _words(
    "season semester course tenure residency lease mandate presidency career regime recession boom crusade "
    "migration settlement colony empire kingdom republic monarchy council parliament administration scandal "
    "shortage flood storm blizzard heatwave lockdown craze fashion movement reform"
)
TRAIN_GT_CENTURIES = (18, 19)  # the evaluation's start years are 1100-1799
TRAIN_DOC_WORDS = _words(
    "alpha beta gamma delta seed verbose debug threshold epsilon margin scale factor ratio depth span batch epoch "
    "shape dim axis mask bias kernel stride padding channel sample frame pixel vertex edge graph tree dict array "
    "vector matrix tensor loss grad writer reader logger parser builder loader worker pool queue lock thread "
    "process signal socket packet header body payload digest cipher salt hash"
)
TRAIN_DOC_DESCRIPTIONS = _words(
    "apple bird cat dog fish tree rock sand cloud rain snow star sun sky ocean desert island bridge road car train "
    "ship plane bike door window wall roof floor village town castle tower farm forest hill valley stone iron "
    "gold silver glass cotton silk wool"
)
TRAIN_ANTONYMS = (
    ("asleep", "awake"), ("guilty", "innocent"), ("odd", "even"), ("polite", "rude"), ("tight", "loose"),
    ("wild", "tame"), ("rough", "smooth"), ("victory", "defeat"), ("sunrise", "sunset"),
    ("vertical", "horizontal"), ("plus", "minus"), ("add", "subtract"), ("ask", "reply"), ("boy", "girl"),
    ("man", "woman"), ("mother", "father"), ("brother", "sister"), ("husband", "wife"), ("uncle", "aunt"),
    ("visible", "invisible"), ("legal", "illegal"), ("possible", "impossible"), ("known", "unknown"),
    ("wise", "foolish"), ("generous", "selfish"), ("humble", "proud"), ("calm", "angry"), ("sick", "healthy"),
    ("rise", "fall"), ("attack", "defend"), ("lend", "borrow"), ("teach", "learn"), ("laugh", "cry"),
    ("sink", "float"), ("freeze", "melt"), ("rural", "urban"), ("solid", "liquid"), ("raw", "cooked"),
    ("fresh", "stale"), ("silent", "noisy"), ("floor", "ceiling"), ("dawn", "dusk"), ("sunny", "cloudy"),
    ("arrival", "departure"), ("employer", "employee"), ("teacher", "student"), ("buyer", "seller"),
    ("winner", "loser"), ("master", "servant"), ("ascend", "descend"), ("inhale", "exhale"), ("vague", "precise"),
    ("permanent", "temporary"), ("natural", "artificial"), ("gain", "loss"), ("sender", "receiver"),
    ("upper", "lower"), ("inner", "outer"), ("front", "back"), ("pass", "fail"), ("grow", "shrink"),
    ("lock", "unlock"), ("forward", "backward"), ("upstairs", "downstairs"), ("noon", "midnight"),
    ("insert", "remove"), ("son", "daughter"), ("he", "she"), ("this", "that"), ("here", "there"), ("now", "then"),
    ("go", "come"), ("send", "receive"), ("read", "write"), ("sit", "stand"), ("hit", "miss"), ("get", "set"),
    ("show", "hide"), ("enable", "disable"), ("sky", "ground"), ("cause", "effect"), ("problem", "solution"),
    ("fact", "fiction"), ("truth", "lie"), ("bright", "dim"), ("begin", "finish"), ("over", "under"),
    ("these", "those"),
)
TRAIN_INDUCTION_WORDS = tuple(sorted(set(TRAIN_DOC_WORDS + TRAIN_DOC_DESCRIPTIONS + TRAIN_PLACES + TRAIN_OBJECTS
                                         + TRAIN_GT_NOUNS)))
WORD_SETS = ("evaluation", "training")


# --------------------------------------------------------------------------------------------------
# Tokenizer checks


def token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (bos is prefixed by whoever runs the model)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def single_token_words(words: Sequence[str], tokenizer, prefix: str = " ") -> list[str]:
    """The words (in order, without duplicates) that `prefix + word` encodes to exactly one token."""
    seen: dict[str, None] = {}
    for word in words:
        if word not in seen and len(token_ids(tokenizer, prefix + word)) == 1:
            seen[word] = None
    return list(seen)


def invalid_reason(prompt: TaskPrompt, tokenizer) -> str | None:
    """Why `prompt` cannot be used with `tokenizer` (None when it can): answers must be single tokens,
    correct and incorrect tokens disjoint, and clean and corrupted texts the same number of tokens."""
    answers = {}
    for answer in prompt.correct + prompt.incorrect:
        ids = token_ids(tokenizer, answer)
        if len(ids) != 1:
            return f"answer {answer!r} is {len(ids)} tokens, not 1"
        answers[answer] = ids[0]
    if {answers[a] for a in prompt.correct} & {answers[a] for a in prompt.incorrect}:
        return "a correct and an incorrect answer are the same token"
    n_clean, n_corrupted = len(token_ids(tokenizer, prompt.clean)), len(token_ids(tokenizer, prompt.corrupted))
    if n_clean != n_corrupted:
        return f"clean is {n_clean} tokens but corrupted is {n_corrupted}"
    if prompt.clean == prompt.corrupted:
        return "clean and corrupted texts are identical"
    try:
        token_roles(prompt, tokenizer)
    except TaskError as error:
        return str(error)
    return None


def token_roles(prompt: TaskPrompt, tokenizer) -> list[str]:
    """The role of each token of the clean text (no bos), aligned to `tokenizer`'s tokens: the role of the
    piece holding the token's first non-space character (a whitespace-only token: of its first character);
    the last token's role is END_ROLE. TaskError if a token's characters fall in pieces of two roles, or the
    tokenizer gives no character offsets (a slow tokenizer)."""
    char_roles = [role for text, role in prompt.role_pieces for _ in text]
    try:
        encoded = tokenizer(prompt.clean, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise TaskError("token roles need a tokenizer with character offsets (a fast tokenizer)") from None
    roles = []
    for index, (start, end) in enumerate(encoded["offset_mapping"]):
        text = prompt.clean[start:end]
        letters = [start + i for i, char in enumerate(text) if not char.isspace()] or [start]
        found = sorted({char_roles[i] for i in letters})
        if len(found) != 1:
            raise TaskError(f"token {index} ({text!r}) of {prompt.clean!r} spans the roles {found}: this "
                            "tokenizer does not split the prompt at its role boundaries")
        roles.append(found[0])
    if len(roles) != len(encoded["input_ids"]) or not roles:
        raise TaskError(f"the tokenizer gave {len(roles)} offsets for {len(encoded['input_ids'])} tokens")
    roles[-1] = END_ROLE
    return roles


# --------------------------------------------------------------------------------------------------
# Candidate generators: one random minimal pair from an rng and tokenizer-filtered word lists


@dataclass(frozen=True)
class Vocab:
    """The word lists a generator draws from, already filtered to single tokens where that matters."""

    names: list[str]
    doc_words: list[str]
    antonyms: list[tuple[str, str]]
    induction_words: list[str]
    places: tuple[str, ...] = IOI_PLACES  # IOI's places and objects and the docstrings' descriptions: any tokens
    objects: tuple[str, ...] = IOI_OBJECTS
    gt_nouns: tuple[str, ...] = GT_NOUNS
    gt_centuries: tuple[int, int] = (11, 17)  # Greater-Than's start centuries, inclusive
    descriptions: tuple[str, ...] = DOC_DESCRIPTIONS


def vocab_for(tokenizer, words: str = "evaluation") -> Vocab:
    """Filter the `words` set's lists ("evaluation", or "training": the TRAIN_* lists, no word in common) for
    `tokenizer`: names/words with a leading space, antonyms without."""
    if words not in WORD_SETS:
        raise TaskError(f"unknown word set {words!r}; word sets are {', '.join(WORD_SETS)}")
    training = words == "training"
    pairs = TRAIN_ANTONYMS if training else ANTONYMS
    plain = set(single_token_words([w for pair in pairs for w in pair], tokenizer, prefix=""))
    vocab = Vocab(
        names=single_token_words(TRAIN_NAMES if training else NAMES, tokenizer),
        doc_words=single_token_words(TRAIN_DOC_WORDS if training else DOC_WORDS, tokenizer),
        antonyms=[pair for pair in pairs if pair[0] in plain and pair[1] in plain],
        induction_words=single_token_words(TRAIN_INDUCTION_WORDS if training else INDUCTION_WORDS, tokenizer),
    )
    if not training:
        return vocab
    return replace(vocab, places=TRAIN_PLACES, objects=TRAIN_OBJECTS, gt_nouns=TRAIN_GT_NOUNS,
                   gt_centuries=TRAIN_GT_CENTURIES, descriptions=TRAIN_DOC_DESCRIPTIONS)


def template_pieces(template: str, fields: dict[str, str], field_roles: dict[str, str],
                    word_roles: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """`template.format(**fields)` cut into (text, role) pieces: each field is one piece with its role in
    `field_roles`; the literal text is cut into words and punctuation runs, each with its role in
    `word_roles` (looked up without spaces) or "other"; whitespace joins the piece after it."""
    word_roles = word_roles or {}
    pieces: list[tuple[str, str]] = []
    for literal, name, _, _ in string.Formatter().parse(template):
        words = re.findall(r"\s*(?:\w+|[^\w\s]+)|\s+", literal)  # words and punctuation runs, spaces before
        pieces += [(word, word_roles.get(word.strip(), "other")) for word in words]
        if name is not None:
            pieces.append((fields[name], field_roles[name]))
    joined: list[tuple[str, str]] = []
    spaces = ""
    for text, role in pieces:
        if text.isspace():
            spaces += text
        elif text:
            joined.append((spaces + text, role))
            spaces = ""
    if spaces:  # trailing whitespace joins the last piece
        joined[-1] = (joined[-1][0] + spaces, joined[-1][1])
    return joined


def ioi_candidate(rng: random.Random, vocab: Vocab, templates: Sequence[str] = IOI_TEMPLATES) -> TaskPrompt:
    """IOI (Wang et al.): "When A and B went to the store, B gave a drink to" -> " A" over " B".

    Both name orders (ABBA, BABA). Corrupted: the same sentence with three unrelated names (the "ABC"
    distribution), where neither answer is in context. Roles: IO (the answer's name) and S1 (the subject's
    first mention), S2 (its second mention), place, object, verb (" gave", " give", " said"), end (the final
    " to"), other. `templates` (fields X, Y, S, place, object) default to IOI_TEMPLATES.
    """
    template_index = rng.randrange(len(templates))
    a, b, c, d, e = rng.sample(vocab.names, 5)
    place, obj = rng.choice(vocab.places), rng.choice(vocab.objects)
    first, second = (a, b) if rng.random() < 0.5 else (b, a)
    template = templates[template_index]
    clean = template.format(X=first, Y=second, S=b, place=place, object=obj)
    corrupted = template.format(X=c, Y=d, S=e, place=place, object=obj)
    roles = {"X": "IO" if first == a else "S1", "Y": "S1" if first == a else "IO", "S": "S2", "place": "place",
             "object": "object"}
    pieces = template_pieces(template, {"X": first, "Y": second, "S": b, "place": place, "object": obj}, roles,
                             IOI_WORD_ROLES)
    return TaskPrompt(task="ioi", template=template_index, clean=clean, corrupted=corrupted,
                      correct=(" " + a,), incorrect=(" " + b,), role_pieces=pieces)


def greater_than_candidate(rng: random.Random, vocab: Vocab) -> TaskPrompt:
    """Greater-Than (Hanna et al.): "The war lasted from the year 1732 to the year 17" -> a later year.

    SmolLM2 writes years digit by digit, so the next token is the tens digit d of the end year. With
    start year CC t u, d > t means a later year and d < t an earlier one; d = t is ambiguous and is in
    neither set (t is drawn from 1..8 so both sets are non-empty). Corrupted: start year CC 0 u, the
    analogue of Hanna et al.'s "01", after which no end decade is earlier. Roles: noun, start_century,
    start_tens, start_units (the start year's digits), end_century (the end year's), end, other.
    """
    template_index = rng.randrange(len(GT_TEMPLATES))
    noun, century = rng.choice(vocab.gt_nouns), str(rng.randint(*vocab.gt_centuries))
    tens, units = rng.randint(1, 8), rng.randint(0, 9)
    template = GT_TEMPLATES[template_index]
    clean = template.format(noun=noun, century=century, start=f"{tens}{units}")
    corrupted = template.format(noun=noun, century=century, start=f"0{units}")
    by_digit = template.replace("{century}", "{start_century}", 1).replace("{century}", "{end_century}")
    by_digit = by_digit.replace("{start}", "{start_tens}{start_units}")
    fields = {"noun": noun, "start_century": century, "end_century": century, "start_tens": str(tens),
              "start_units": str(units)}
    return TaskPrompt(task="greater_than", template=template_index, clean=clean, corrupted=corrupted,
                      correct=tuple(str(d) for d in range(tens + 1, 10)),
                      incorrect=tuple(str(d) for d in range(tens)),
                      role_pieces=template_pieces(by_digit, fields, {name: name for name in fields}))


def docstring_candidate(rng: random.Random, vocab: Vocab) -> TaskPrompt:
    """Docstring (Heimersheim & Janiak): after two documented parameters, ":param" -> the third argument.

    Contrast: the def's other arguments (the two already documented and the fourth). Corrupted: the
    def's arguments replaced by four other names, the docstring unchanged, so the next parameter is
    no longer readable from the def. Roles: func, arg0..arg3 (the def's arguments; arg2 is the answer),
    description (the docstring's words), param (each ":param" word), param_arg0, param_arg1 (the documented
    arguments), end (the last "param"), other.
    """
    args = rng.sample(vocab.doc_words, 8)
    clean_args, corrupt_args = args[:4], args[4:]
    func = rng.choice(vocab.doc_words)
    words = {f"d{i}": rng.choice(vocab.descriptions) for i in range(7)}
    doc_args = {f"a{i}": arg for i, arg in enumerate(clean_args)}
    clean = _with_def_args(DOC_TEMPLATE, func, doc_args, doc_args, words)
    corrupted = _with_def_args(DOC_TEMPLATE, func, dict(zip(doc_args, corrupt_args)), doc_args, words)
    signature, body = DOC_TEMPLATE.split("\n", 1)
    pieces = (template_pieces(signature, {"func": func, **doc_args},
                              {"func": "func", **{name: f"arg{i}" for i, name in enumerate(doc_args)}})
              + template_pieces("\n" + body, {**doc_args, **words},
                                {**{name: f"param_arg{i}" for i, name in enumerate(doc_args)},
                                 **dict.fromkeys(words, "description")}, {"param": "param"}))
    return TaskPrompt(task="docstring", template=0, clean=clean, corrupted=corrupted,
                      correct=(" " + clean_args[2],),
                      incorrect=tuple(" " + a for a in (clean_args[0], clean_args[1], clean_args[3])),
                      role_pieces=pieces)


def _with_def_args(template: str, func: str, def_args: dict, doc_args: dict, words: dict) -> str:
    """The docstring template with `def_args` in the signature and `doc_args` in the :param lines."""
    signature, body = template.split("\n", 1)
    return signature.format(func=func, **def_args) + "\n" + body.format(**doc_args, **words)


def antonyms_candidate(rng: random.Random, vocab: Vocab, templates: Sequence[str] = ANTONYM_TEMPLATES) -> TaskPrompt:
    """Antonyms: 'The opposite of "large" is "' -> "small". Corrupted: another word, whose antonym is
    the contrast answer. Either word of a pair can be the cue. Roles: cue (the word), quote (the quote
    marks), opposite (" opposite" / " antonym"), end (the last quote mark), other. `templates` (field word)
    default to ANTONYM_TEMPLATES."""
    template_index = rng.randrange(len(templates))
    (cue, answer), (other_cue, other_answer) = (
        pair if rng.random() < 0.5 else pair[::-1] for pair in rng.sample(vocab.antonyms, 2)
    )
    template = templates[template_index]
    return TaskPrompt(task="antonyms", template=template_index, clean=template.format(word=cue),
                      corrupted=template.format(word=other_cue), correct=(answer,), incorrect=(other_answer,),
                      role_pieces=template_pieces(template, {"word": cue}, {"word": "cue"}, ANTONYM_WORD_ROLES))


def induction_candidate(rng: random.Random, vocab: Vocab) -> TaskPrompt:
    """Induction: random words w_1..w_n then w_1..w_k -> w_{k+1}. Corrupted: w_{k+1} in the first copy
    replaced by another word z, which becomes the contrast answer (same second copy, same length).
    Roles, first copy: prefix (w_1..w_{k-1}), cue (w_k), answer (w_{k+1}), suffix (the rest); second copy:
    repeat (w_1..w_{k-1}), end (w_k)."""
    words = rng.sample(vocab.induction_words, INDUCTION_LENGTH + 1)
    sequence, replacement = words[:INDUCTION_LENGTH], words[INDUCTION_LENGTH]
    k = rng.randint(2, INDUCTION_LENGTH - 2)  # the second copy has k words, the answer is word k+1
    corrupt_sequence = [*sequence[:k], replacement, *sequence[k + 1:]]
    repeat = "".join(" " + w for w in sequence[:k])
    first_roles = ["prefix"] * (k - 1) + ["cue", "answer"] + ["suffix"] * (INDUCTION_LENGTH - k - 1)
    pieces = [(" " + w, role) for w, role in zip(sequence, first_roles)] + [
        (" " + w, "repeat" if i < k - 1 else END_ROLE) for i, w in enumerate(sequence[:k])]
    return TaskPrompt(task="induction", template=0, clean="".join(" " + w for w in sequence) + repeat,
                      corrupted="".join(" " + w for w in corrupt_sequence) + repeat,
                      correct=(" " + sequence[k],), incorrect=(" " + replacement,), role_pieces=pieces)


TASK_NOTES = {
    "ioi": "Wang et al. templates, ABBA and BABA; corrupted = three unrelated names (ABC), so ~50% "
           "corrupted accuracy is chance",
    "greater_than": "SmolLM2 splits digits: the answer is the end year's tens digit; correct = digits "
                    "above the start year's tens digit, incorrect = below (equal is ambiguous, left out)",
    "docstring": "contrast = the def's other three arguments; corrupted = other def arguments, same docstring",
    "antonyms": "three templates (the paper's first); corrupted = another cue word, contrast = its antonym",
    "induction": "10 random single-token words, then a prefix of them; corrupted = the answer's first "
                 "occurrence replaced, contrast = the replacement",
}

GENERATORS: dict[str, Callable[[random.Random, Vocab], TaskPrompt]] = {
    "ioi": ioi_candidate,
    "greater_than": greater_than_candidate,
    "docstring": docstring_candidate,
    "antonyms": antonyms_candidate,
    "induction": induction_candidate,
}
MIN_WORDS = {"ioi": ("names", 5), "docstring": ("doc_words", 8), "antonyms": ("antonyms", 2),
             "induction": ("induction_words", INDUCTION_LENGTH + 1)}


def generate_task(name: str, tokenizer, n: int = DEFAULT_N_PROMPTS, seed: int = DEFAULT_SEED,
                  words: str = "evaluation") -> list[TaskPrompt]:
    """`n` distinct valid prompts of task `name` for `tokenizer` from the `words` set's lists ("evaluation", or
    "training": the words a sparsify run may train on, none of them in an evaluation prompt); the same
    (name, n, seed, words, tokenizer) always gives the same list. Invalid candidates are dropped and drawn again."""
    generator = task_generator(name)
    vocab = vocab_for(tokenizer, words)
    if name in MIN_WORDS:
        field_name, needed = MIN_WORDS[name]
        available = len(getattr(vocab, field_name))
        if available < needed:
            raise TaskError(
                f"task {name!r} needs at least {needed} single-token {field_name} for this tokenizer, "
                f"found {available}; use a tokenizer with word-level tokens (e.g. SmolLM2's)"
            )
    rng = random.Random(f"{name}:{seed}" if words == "evaluation" else f"{name}:{seed}:{words}")
    return distinct_valid_prompts(lambda: generator(rng, vocab), tokenizer, n, name)


def distinct_valid_prompts(draw: Callable[[], TaskPrompt], tokenizer, n: int, name: str) -> list[TaskPrompt]:
    """The first `n` distinct (by clean text) prompts from repeated `draw()` that are valid for `tokenizer`;
    TaskError naming task `name` after 50 * n draws without them."""
    prompts, seen = [], set()
    for _ in range(50 * n):
        prompt = draw()
        if prompt.clean in seen or invalid_reason(prompt, tokenizer) is not None:
            continue
        seen.add(prompt.clean)
        prompts.append(prompt)
        if len(prompts) == n:
            return prompts
    raise TaskError(f"task {name!r}: only {len(prompts)} of {n} valid distinct prompts after {50 * n} draws; "
                    "ask for fewer or extend the word lists")


def task_generator(name: str) -> Callable[[random.Random, Vocab], TaskPrompt]:
    """The candidate generator of task `name`; TaskError for an unknown task."""
    if name not in GENERATORS:
        raise TaskError(f"unknown task {name!r}; tasks are {', '.join(TASKS)}")
    return GENERATORS[name]


# --------------------------------------------------------------------------------------------------
# Files


def task_path(name: str, directory: Path = PROMPT_DIR) -> Path:
    task_generator(name)
    return Path(directory) / f"{name}.jsonl"


def write_task(prompts: Sequence[TaskPrompt], path: Path) -> None:
    """One JSON object per line, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(prompt.model_dump_json() + "\n" for prompt in prompts))


def load_task(name: str, directory: Path = PROMPT_DIR) -> list[TaskPrompt]:
    """The committed prompt set of task `name` (written by `python -m prompts --write`)."""
    path = task_path(name, directory)
    if not path.is_file():
        raise TaskError(f"no prompt file {path}; run `python -m prompts --write` to create it")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            prompt = TaskPrompt.model_validate_json(line)
        except ValidationError as err:
            raise TaskError(f"{path}:{number} is not a valid prompt ({err.errors()[0]['msg']}); "
                            "regenerate it with `python -m prompts --write`") from None
        if prompt.task != name:
            raise TaskError(f"{path}:{number} holds a {prompt.task!r} prompt, expected {name!r}")
        prompts.append(prompt)
    if not prompts:
        raise TaskError(f"{path} holds no prompts; regenerate it with `python -m prompts --write`")
    return prompts
