"""Tokenizers and chat templates.

`load_tokenizer(path)` returns a `Tokenizer` over either a sentencepiece `tokenizer.model`
(Llama-2, Mistral, TinyLlama, our tiny models) or a HF `tokenizer.json` (Qwen2/2.5/3, Llama-3,
through the optional `tokenizers` package). Chat templates are built token by token: special
tokens go in by id and only the text between them is encoded, which is what HF's tokenizers do
with a rendered template, so the ids match while user text can never forge a special token.
"""
import os
import re

from settings import read_json

TEMPLATES = ("chatml", "llama2", "llama3", "plain")
ROLES = ("system", "user", "assistant")


class Tokenizer:
    """encode/decode, special ids and the chat template, over one of two backends."""

    def __init__(self, path, chat_template=None):
        self.path, self.sp, self.hf = path, None, None
        file = find_tokenizer_file(path)
        config = read_tokenizer_config(os.path.dirname(file))
        if file.endswith(".model"):
            import sentencepiece as spm
            self.sp = spm.SentencePieceProcessor()
            try:
                self.sp.Load(file)
            except (OSError, RuntimeError) as e:
                raise ValueError(f"{file}: not a sentencepiece model ({e})") from None
            self.vocab_size = self.sp.GetPieceSize()
            self.special = {self.sp.IdToPiece(i): i for i in range(self.vocab_size)
                            if self.sp.IsControl(i) or self.sp.IsUnknown(i)}
            self.bos_id, self.eos_id, self.pad_id = (
                None if i < 0 else i for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()))
        elif file.endswith(".json"):
            try:
                from tokenizers import Tokenizer as HFTokenizer
            except ImportError:
                raise ImportError(f"{file}: reading tokenizer.json needs the optional package "
                                  "'tokenizers' (pip install tokenizers)") from None
            try:
                self.hf = HFTokenizer.from_file(file)
            except Exception as e:  # the Rust library raises its own exception type
                raise ValueError(f"{file}: not a HF tokenizer.json ({e})") from None
            self.hf.encode_special_tokens = True  # '<|im_end|>' inside user text stays text
            self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
            self.special = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
            self.bos_id, self.eos_id, self.pad_id = (self._config_token(config, f"{k}_token")
                                                     for k in ("bos", "eos", "pad"))
        else:
            raise ValueError(f"{file}: unknown tokenizer kind (expected tokenizer.model or tokenizer.json)")
        if self.pad_id is None:
            self.pad_id = self.eos_id
        jinja = config.get("chat_template") or ""
        if isinstance(jinja, list):  # some checkpoints ship several named templates
            jinja = next((t.get("template") for t in jinja if isinstance(t, dict) and t.get("name") == "default"), "")
        if not isinstance(jinja, str):
            raise ValueError(f"{os.path.dirname(file)}/tokenizer_config.json: chat_template must be a string, or a "
                             "list of {name, template} holding one named default")
        self.template = chat_template or guess_template(jinja, self)
        if self.template not in TEMPLATES:
            raise ValueError(f"chat_template '{self.template}' is not one of {TEMPLATES}")
        self.default_system = default_system_prompt(jinja)
        # The token that closes an assistant turn: generation stops there as well as at EOS.
        end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(self.template)
        self.stop_ids = sorted({i for i in (self.eos_id, self.special.get(end)) if i is not None})
        self.end_of_turn_id = self.special.get(end, self.eos_id)  # what a trained reply ends with

    def _config_token(self, config, key):
        tok = config.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok is not None and not isinstance(tok, str):
            raise ValueError(f"{self.path}: tokenizer_config.json {key}={tok!r} must be a token string")
        i = None if tok is None else self.hf.token_to_id(tok)
        if i is None and tok is not None:
            raise ValueError(f"{self.path}: tokenizer_config.json {key}='{tok}' is not in the vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        r"""Plain text to ids: no BOS/EOS added, special-token strings stay text. Text that is not
        valid Unicode (a lone surrogate such as '\ud800') is a ValueError: it has no UTF-8 bytes."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        try:
            if self.sp is not None:
                return self.sp.EncodeAsIds(text)
            return self.hf.encode(text, add_special_tokens=False).ids
        except (RuntimeError, TypeError):  # what both backends raise for a string they cannot convert
            bad = next((i for i, ch in enumerate(text) if "\ud800" <= ch <= "\udfff"), None)
            if bad is None:
                raise
            raise ValueError(f"text holds a lone surrogate {text[bad]!r} at index {bad}, which is not valid "
                             "Unicode; repair it first, e.g. text.encode('utf-8', 'replace').decode()") from None

    def decode(self, ids) -> str:
        """Ids to text, special tokens dropped."""
        special = set(self.special.values())  # and ids past the tokenizer's own (a model's padded vocabulary)
        ids = [i for i in ids if i not in special and 0 <= i < self.vocab_size]
        if self.sp is not None:
            return self.sp.DecodeIds(ids)
        return self.hf.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int:
        """The id of a special token such as '<|im_end|>'."""
        if token not in self.special:
            raise KeyError(f"{self.path}: no special token '{token}'")
        return self.special[token]

    def apply_chat_template(self, messages, add_generation_prompt=True) -> list[int]:
        """messages: [{"role": "system"|"user"|"assistant", "content": str}] -> prompt ids.
        A content may also be a list of token ids, spliced in as is (the memory agent builds its
        turns this way, so nothing is decoded and re-encoded between turns)."""
        check_messages(messages)
        if self.default_system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}] + list(messages)
        if self.template == "llama2":
            return self._encode_parts(self._llama2(messages))
        sp, parts = self.token_id, []
        if self.template == "chatml":
            for m in messages:
                parts += [sp("<|im_start|>"), f"{m['role']}\n", m["content"], sp("<|im_end|>"), "\n"]
            generation = [sp("<|im_start|>"), "assistant\n"]
        elif self.template == "llama3":
            parts.append(sp("<|begin_of_text|>"))
            for m in messages:
                content = m["content"].strip() if isinstance(m["content"], str) else m["content"]
                parts += [sp("<|start_header_id|>"), m["role"], sp("<|end_header_id|>"), "\n\n", content,
                          sp("<|eot_id|>")]
            generation = [sp("<|start_header_id|>"), "assistant", sp("<|end_header_id|>"), "\n\n"]
        else:  # plain, for tiny models trained by this project: [] ends a text run, so each turn is encoded alone
            parts = [] if self.bos_id is None else [self.bos_id]
            for m in messages:
                parts += [f"<{m['role']}>\n", m["content"], "\n", [self.eos_id] if m["role"] == "assistant" else []]
            generation = ["<assistant>\n"]
        return self._encode_parts(parts + generation if add_generation_prompt else parts)

    def _encode_parts(self, parts):
        """Special ids (int) and spliced ids (list) go in as they are; the text (str) between two of
        them is encoded in one piece, as HF encodes a rendered template."""
        ids, run = [], ""
        for p in parts:
            if isinstance(p, str):
                run += p
                continue
            ids += (self.encode(run) if run else []) + ([p] if isinstance(p, int) else list(p))
            run = ""
        return ids + (self.encode(run) if run else [])

    def _llama2(self, messages):
        r"""<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST]
        as Llama-2-chat's template renders it, as parts for _encode_parts: roles alternate
        user/assistant after an optional system message, string contents are stripped (the system
        block and the first user message as one string), and the text between two special tokens is
        one piece (a separate encode of " {answer} " would add sentencepiece's dummy prefix)."""
        system = None
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        parts = []
        for i, m in enumerate(messages):
            want = "user" if i % 2 == 0 else "assistant"
            if m["role"] != want:
                where = ("a system message must be the first message" if m["role"] == "system"
                         else "roles must alternate user/assistant after an optional first system message")
                raise ValueError(f"llama2 chat template: {where}; message {i + (system is not None)} is "
                                 f"{m['role']!r}, expected {want!r}")
            content = m["content"]
            if want == "assistant":
                parts += [" ", content.strip() if isinstance(content, str) else content, " ", self.eos_id]
                continue
            head = ["<<SYS>>\n", system, "\n<</SYS>>\n\n"] if i == 0 and system is not None else []
            body = head + [content]
            if all(isinstance(p, str) for p in body):
                body = ["".join(body).strip()]
            parts += [self.bos_id, "[INST] ", *body, " [/INST]"]
        return parts


def find_tokenizer_file(path):
    """The tokenizer file itself, or the one a checkpoint directory holds (tokenizer.json first)."""
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    return path


def read_tokenizer_config(model_dir):
    """tokenizer_config.json of a checkpoint directory as a dict ({} where there is none)."""
    path = os.path.join(model_dir, "tokenizer_config.json")
    return read_json(path, "a JSON object") if os.path.isfile(path) else {}


def check_messages(messages):
    """A chat is a non-empty list of {"role": one of ROLES, "content": str or list of token ids}."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise ValueError(f"messages[{i}]: role {role!r} is not one of {ROLES}")
        content = m.get("content")
        if not (isinstance(content, str) or isinstance(content, (list, tuple)) and all(
                type(t) is int for t in content)):
            raise ValueError(f"messages[{i}]: content must be a str or a list of token ids, got {str(content)[:50]}")


def guess_template(jinja: str, tok: Tokenizer) -> str:
    """Pick the chat format from the checkpoint's own template, else from its special tokens."""
    for marker, name in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("[INST]", "llama2")):
        if marker in jinja or (not jinja and marker in tok.special):
            return name
    return "plain"


def default_system_prompt(jinja: str):
    """A system message the checkpoint's template inserts when the conversation has none (Qwen2.5's
    'You are Qwen, ...'; Llama-3.1's knowledge-cutoff header). We insert the same text so prompts
    match the ones the model was tuned on, token for token."""
    m = re.search(r"<\|im_start\|>system\\n([^'\"{}+]+?)<\|im_end\|>", jinja)
    if m:
        return m.group(1)
    if "Cutting Knowledge Date: December 2023" in jinja:
        return "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    return None


def load_tokenizer(path, chat_template=None) -> Tokenizer:
    """A tokenizer file (tokenizer.model / tokenizer.json) or a checkpoint directory holding one."""
    return Tokenizer(str(path), chat_template)


def train_sentencepiece(corpus_iter, vocab_size, path):
    """Train a small BPE sentencepiece model on an iterator of text lines and write it to `path`
    (a tokenizer.model file). Digits are split one per token, which keeps numbers copyable for a
    tiny model; byte fallback means no text is ever unknown."""
    import sentencepiece as spm

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(corpus_iter), model_writer=f, vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, byte_fallback=True, split_digits=True,
            user_defined_symbols=["\n"],  # newlines structure documents: keep them one token
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=2, minloglevel=2,
            max_sentence_length=16384, remove_extra_whitespaces=False, normalization_rule_name="identity",
            add_dummy_prefix=False,  # pieces encoded separately concatenate like running text
        )
    return load_tokenizer(path)
