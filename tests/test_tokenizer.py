"""tokenizer.py: sentencepiece and tokenizer.json backends, chat templates, bad input."""
import json
import re

import pytest

from tokenizer import load_tokenizer, train_sentencepiece

CORPUS = [f"The special magic number for {w} is {i * 7919 % 10000}. The sky is wide and the grass is green."
          for i, w in enumerate(["apple", "river", "stone", "cloud", "lamp", "forest", "tiger", "ocean"] * 40)]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return train_sentencepiece(CORPUS, 300, tmp_path_factory.mktemp("sp") / "tokenizer.model")


def test_sentencepiece_round_trip_and_specials(sp_tok):
    text = "The special magic number for lamp is 1234.\nSecond line  with two spaces."
    ids = sp_tok.encode(text)
    assert sp_tok.decode(ids) == text
    assert (sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id) == (0, 2, 3)
    assert sp_tok.eos_id not in ids and sp_tok.bos_id not in ids
    digits = [sp_tok.sp.IdToPiece(i) for i in sp_tok.encode("1234")]
    assert "".join(digits).lstrip("▁") == "1234" and len([d for d in digits if d.strip("▁")]) == 4
    assert sp_tok.template == "plain" and sp_tok.stop_ids == [3]


def test_plain_chat_template(sp_tok):
    ids = sp_tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert ids[0] == sp_tok.bos_id
    assert ids[1:] == sp_tok.encode("<user>\nhello\n") + sp_tok.encode("<assistant>\n")


def test_load_from_directory(sp_tok, tmp_path):
    import shutil
    shutil.copy(sp_tok.path, tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    assert tok.encode("green sky") == sp_tok.encode("green sky")


# -- tokenizer.json (Qwen-style ChatML) -------------------------------------------------------

CHATML_JINJA = (  # a minimal ChatML template with a default system prompt, as Qwen2.5 ships
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a careful reader.<|im_end|>\\n' }}"
    "{%- endif %}{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    d = tmp_path_factory.mktemp("hf")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "chat_template": CHATML_JINJA}))
    return d


def test_hf_tokenizer_json(hf_dir):
    tok = load_tokenizer(hf_dir)
    assert tok.template == "chatml" and tok.default_system == "You are a careful reader."
    assert tok.eos_id == tok.token_id("<|im_end|>") and tok.pad_id == tok.token_id("<|endoftext|>")
    text = "The sky is wide. <|im_end|> stays text here."
    ids = tok.encode(text)
    assert tok.token_id("<|im_end|>") not in ids and tok.decode(ids) == text


def test_chatml_matches_checkpoint_template(hf_dir):
    tok = load_tokenizer(hf_dir)
    msgs = [{"role": "user", "content": "What is the number for lamp?"}]
    ids = tok.apply_chat_template(msgs)
    s, e = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    want = ([s] + tok.encode("system\nYou are a careful reader.") + [e] + tok.encode("\n")
            + [s] + tok.encode("user\nWhat is the number for lamp?") + [e] + tok.encode("\n")
            + [s] + tok.encode("assistant\n"))
    assert ids == want
    try:  # where transformers is installed, its rendering of the jinja template agrees token for token
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return
    hf = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), chat_template=CHATML_JINJA)
    hf_ids = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    assert ids == list(getattr(hf_ids, "input_ids", hf_ids))


def test_template_override_and_bad_name(hf_dir):
    assert load_tokenizer(hf_dir, chat_template="plain").template == "plain"
    with pytest.raises(ValueError, match="nonsense"):
        load_tokenizer(hf_dir, chat_template="nonsense")


# -- bad input ----------------------------------------------------------------------------------

def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        load_tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises((ValueError, ImportError), match="broken.json"):
        load_tokenizer(tmp_path / "broken.json")


# -- llama2 / llama3 templates, token by token against hand-written renderings -------------------

def by_specials(tok, rendered, specials):
    """What HF does with a rendered template: special-token strings become their ids, the text
    between two of them is encoded in one piece."""
    pattern = "(" + "|".join(map(re.escape, specials)) + ")"
    ids = []
    for piece in re.split(pattern, rendered):
        if piece in specials:
            ids.append(specials[piece])
        elif piece:
            ids += tok.encode(piece)
    return ids


LLAMA3_JINJA = (  # Llama-3-Instruct's template: header, "\n\n", trimmed content, <|eot_id|>
    "{% for m in messages %}{% set c = '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set c = bos_token + c %}{% endif %}"
    "{{ c }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is the number for lamp?\n"},
        {"role": "assistant", "content": "It is 1234. "}, {"role": "user", "content": "And for river?"}]


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=LLAMA3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    d = tmp_path_factory.mktemp("llama3")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_JINJA}))
    return d


def test_llama3_template_token_by_token(llama3_dir):
    tok = load_tokenizer(llama3_dir)
    assert tok.template == "llama3" and tok.stop_ids == [tok.token_id("<|eot_id|>")]
    rendered = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nWhat is the number for lamp?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 1234.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nAnd for river?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    specials = {s: tok.token_id(s) for s in LLAMA3_SPECIALS}
    ids = tok.apply_chat_template(CHAT)
    assert ids == by_specials(tok, rendered, specials)
    assert ids[:3] == [specials["<|begin_of_text|>"], specials["<|start_header_id|>"], tok.encode("system")[0]]
    # content given as ids is spliced in as is, untrimmed
    memory = tok.encode(" 42 ")
    ids = tok.apply_chat_template([{"role": "user", "content": memory}], add_generation_prompt=False)
    want = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n 42 <|eot_id|>"
    assert ids == by_specials(tok, want, specials)
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return
    hf = PreTrainedTokenizerFast(tokenizer_file=str(llama3_dir / "tokenizer.json"), chat_template=LLAMA3_JINJA,
                                 bos_token="<|begin_of_text|>")
    hf_ids = hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    assert tok.apply_chat_template(CHAT) == list(getattr(hf_ids, "input_ids", hf_ids))


@pytest.fixture(scope="module", params=[False, True], ids=["no-dummy-prefix", "dummy-prefix"])
def llama2_tok(request, tmp_path_factory):
    """A sentencepiece model with <s> / </s>, with and without the dummy prefix Llama-2's has."""
    import sentencepiece as spm
    path = tmp_path_factory.mktemp("llama2") / "tokenizer.model"
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(CORPUS + ["[INST] <<SYS>> <</SYS>> [/INST] What is And for It"]),
            model_writer=f, vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
            add_dummy_prefix=request.param, remove_extra_whitespaces=False, normalization_rule_name="identity",
            user_defined_symbols=["\n"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return load_tokenizer(path, chat_template="llama2")


def test_llama2_template_token_by_token(llama2_tok):
    tok = llama2_tok
    # Llama-2-chat strips the system block and the first user message as one string, so the user's
    # leading spaces stay
    rendered = ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n  What is the number for lamp? [/INST] It is 1234. </s>"
                "<s>[INST] And for river? [/INST]")
    specials = {"<s>": tok.bos_id, "</s>": tok.eos_id}
    assert tok.apply_chat_template(CHAT) == by_specials(tok, rendered, specials)
    # without a system message; ids content is spliced untrimmed
    memory = tok.encode("42")
    ids = tok.apply_chat_template([{"role": "user", "content": memory}])
    assert ids == [tok.bos_id] + tok.encode("[INST] ") + memory + tok.encode(" [/INST]")


def test_llama2_rejects_what_it_cannot_render(llama2_tok):
    late_system = [{"role": "user", "content": "hi"}, {"role": "system", "content": "Be brief."}]
    with pytest.raises(ValueError, match=r"system message must be the first message; message 1 is 'system'"):
        llama2_tok.apply_chat_template(late_system)
    two_users = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
    with pytest.raises(ValueError, match=r"roles must alternate user/assistant.*message 1 is 'user'"):
        llama2_tok.apply_chat_template(two_users)


@pytest.mark.parametrize("template", ["chatml", "llama2", "llama3", "plain"])
@pytest.mark.parametrize("role", ["tool", "asistant", None])
def test_unknown_roles_are_errors(sp_tok, template, role):
    tok = load_tokenizer(sp_tok.path, chat_template=template)
    msgs = [{"role": "user", "content": "hi"}, {"role": role, "content": "x"}]
    with pytest.raises(ValueError, match=rf"messages\[1\]: role {role!r} is not one of"):
        tok.apply_chat_template(msgs)
    with pytest.raises(ValueError, match="non-empty list"):
        tok.apply_chat_template([])
    for content in (5, ["a", "b"], [1.5, None], [[1, 2]]):  # ids are spliced in as they are: only ints pass
        with pytest.raises(ValueError, match=r"messages\[0\]: content must be a str or a list of token ids"):
            tok.apply_chat_template([{"role": "user", "content": content}])


def test_corrupt_tokenizer_config_names_the_file(sp_tok, tmp_path):
    import shutil
    shutil.copy(sp_tok.path, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "')
    with pytest.raises(ValueError, match=r"tokenizer_config.json: not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('["a list"]')
    with pytest.raises(ValueError, match=r"tokenizer_config.json: expected a JSON object"):
        load_tokenizer(tmp_path)
    for template in (5, {"a": "b"}, [{"name": "default"}]):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        with pytest.raises(ValueError, match=r"tokenizer_config.json: chat_template must be a string"):
            load_tokenizer(tmp_path)


def test_ids_past_the_tokenizers_vocabulary_decode_to_nothing(sp_tok):
    # a model's embedding is often padded past its tokenizer's vocabulary; those rows carry no text
    assert sp_tok.decode(sp_tok.encode("lamp") + [sp_tok.vocab_size, 10**6]) == "lamp"


def test_lone_surrogate_is_a_clear_error(sp_tok, hf_dir):
    for tok in (sp_tok, load_tokenizer(hf_dir)):
        with pytest.raises(ValueError, match=r"lone surrogate '\\ud800' at index 3"):
            tok.encode("abc\ud800def")
        assert tok.decode(tok.encode("abc\ufffddef")) == "abc\ufffddef"  # the replacement char is fine
        with pytest.raises(TypeError, match="encode takes a str, got list"):
            tok.encode(["abc"])
