"""A small tokenizer with Phi-3's special tokens and chat template, trained in seconds with `tokenizers`.

Used by the tests and by the demo model: it behaves like Phi-3's tokenizer where the data pipeline can tell the
difference (special tokens and their order, ``<|endoftext|>`` as eos, ``<unk>`` as pad, ``<s>`` as bos, the exact chat
template, chat tokens that swallow the whitespace after them as Phi-3's ``rstrip: true`` added tokens do), on a
byte-level BPE vocabulary of a few hundred to a few thousand entries instead of Llama's 32000 SentencePiece pieces.

Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, then the trained vocabulary, then the eleven chat tokens in Phi-3's order
(``<|endoftext|>``, ``<|assistant|>``, ``<|placeholder1..4|>``, ``<|system|>``, ``<|end|>``, ``<|placeholder5|>``,
``<|placeholder6|>``, ``<|user|>``). ``phi3_ids=True`` pads the vocabulary with unused tokens so the chat tokens land
on Phi-3's real ids 32000-32010 (a 32011-entry tokenizer for a 32064-row embedding, as in Phi-3).
"""

from __future__ import annotations

from typing import Iterable

# The chat template of microsoft/Phi-3-mini-4k-instruct, verbatim (its tokenizer_config.json on the Hub).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Phi-3.5-mini skips an empty system message.
PHI35_CHAT_TEMPLATE = PHI3_CHAT_TEMPLATE.replace(
    "message['role'] == 'system' %}", "message['role'] == 'system' and message['content'] %}"
)

BASE_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
# Phi-3 ids 32000..32010, in this order.
CHAT_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
]
PHI3_END_OF_TURN_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|end|>"]  # Phi-3's generation_config stop ids

_DEFAULT_CORPUS_SEED = 1234


def default_corpus(n: int = 2000) -> list[str]:
    """A fixed, deterministic English-like corpus (chat-shaped) used when no texts are given."""
    import random

    rng = random.Random(_DEFAULT_CORPUS_SEED)
    subjects = ["the model", "a student", "my friend", "the teacher", "this function", "the assistant", "we", "you",
                "the user", "a cat", "the team", "Python", "the data", "the answer", "an engineer"]
    verbs = ["explains", "writes", "reads", "computes", "needs", "likes", "returns", "learns", "checks", "builds",
             "answers", "solves", "prints", "trains", "loads"]
    objects = ["a short story", "the result", "three numbers", "an example", "the question", "some code",
               "the weather", "a poem", "the capital of France", "a list of fruits", "the sum", "the file",
               "a summary", "two ideas", "the next step"]
    tails = [".", "?", "!", " quickly.", " again.", " for me.", " today.", ", please.", " in detail.", " 42 times."]
    words = ("hello thanks sure yes no maybe because however therefore first second finally please could would "
             "what why how when where which who is are was were be been the a an of to in on for with and or "
             "not it this that these those I me my your our their one two three four five 0 1 2 3 4 5 6 7 8 9 "
             "def return print import class if else for while True False None").split()
    out = []
    for _ in range(n):
        k = rng.randint(1, 3)
        sent = " ".join(
            f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(tails)}"
            for _ in range(k)
        )
        extra = " ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
        out.append(sent + ("\n" + extra if extra else ""))
    return out


def build_phi3_style_tokenizer(
    texts: Iterable[str] | None = None,
    vocab_size: int = 1024,
    *,
    add_bos_token: bool = True,
    phi3_ids: bool = False,
    chat_template: str = PHI3_CHAT_TEMPLATE,
    model_max_length: int = 4096,
):
    """Train a byte-level BPE on ``texts`` (default: :func:`default_corpus`) and wrap it as a transformers fast
    tokenizer with Phi-3's special tokens and chat template.

    ``add_bos_token``: plain ``tokenizer(text)`` prepends ``<s>`` (Llama/Phi-3 SentencePiece behaviour);
    ``apply_chat_template(tokenize=True)`` never does (transformers encodes the rendering with
    ``add_special_tokens=False``), which is why phitune.data adds exactly one BOS itself.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        texts = default_corpus()
    texts = list(texts)
    n_base = 256 + len(BASE_SPECIAL_TOKENS)
    if vocab_size < n_base + 1:
        raise ValueError(f"vocab_size must be at least {n_base + 1} (256 bytes + <unk>, <s>, </s>), got {vocab_size}")
    if phi3_ids and vocab_size > 32000:
        raise ValueError("phi3_ids=True needs vocab_size <= 32000 (the chat tokens start at 32000)")

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(BASE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if phi3_ids:
        filler = 32000 - tok.get_vocab_size()
        tok.add_tokens([AddedToken(f"<|unused{i}|>", special=True, normalized=False) for i in range(filler)])
    # Phi-3's chat tokens are added tokens with rstrip=True: the "\n" the template writes after them is absorbed.
    # <|endoftext|> has rstrip=False in Phi-3's tokenizer_config.json; we keep that.
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=(t != "<|endoftext|>"),
                       single_word=False)
            for t in CHAT_SPECIAL_TOKENS
        ]
    )
    bos_id = tok.token_to_id("<s>")
    if add_bos_token:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<unk>",  # the cookbook's choice: masking padding never masks a real end of turn
        padding_side="right",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template
    return fast


def end_of_turn_ids(tokenizer, configured=None, tokens: Iterable[str] = PHI3_END_OF_TURN_TOKENS) -> list[int]:
    """The ids that end an assistant turn, in order and without repeats: ``configured`` first (a generation config's
    ``eos_token_id``: an int, a list or None), then the tokenizer's eos, then each of ``tokens`` that is a single
    token of the vocabulary (Phi-3's generation_config.json stop tokens). The stop-id rule every consumer uses,
    :func:`phitune.generation.stops.stop_token_ids`, adds the chat template's own end-of-turn token to these."""
    ids: list[int] = []
    vocab = tokenizer.get_vocab()
    configured = configured if isinstance(configured, (list, tuple)) else [configured]
    for value in [*configured, tokenizer.eos_token_id, *(vocab.get(t) for t in tokens)]:
        if isinstance(value, int) and value >= 0 and value not in ids:
            ids.append(value)
    return ids

