"""tokenizer.py: sentencepiece and tokenizer.json backends, chat templates, bad input."""
import json

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
