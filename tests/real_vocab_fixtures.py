"""The released Qwen-7B-Chat and Baichuan2-7B-Chat tokenizer files (../shared/tokenizers beside the checkout),
converted once per test session and loaded as qdemo's loader loads a converted tokenizer, and their oracles:
tiktoken built as Qwen's tokenization_qwen.py builds it, and sentencepiece itself.

A test that needs a file skips, naming the path, when the file is absent.
"""

from __future__ import annotations

import atexit
import functools
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.baichuan_fixtures import with_unused_pieces
from tests.qwen_v1_fixtures import QWEN_PAT_STR, QWEN_SPECIALS, load_tiktoken_ranks

SHARED_TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
QWEN_V1_DIR = SHARED_TOKENIZERS / "qwen-7b-chat"
BAICHUAN2_DIR = SHARED_TOKENIZERS / "baichuan2-7b-chat"
# Baichuan2's chat role markers (<reserved_106>, <reserved_107>) and its reserved slots, as the release has them.
USER_ID, ASSISTANT_ID = 195, 196
RESERVED_PIECE = re.compile(r"<reserved_\d+>")


def need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} is absent: the released tokenizer files are expected in ../shared/tokenizers "
                    "beside the checkout")
    return path


@functools.lru_cache(maxsize=None)
def _scratch() -> Path:
    path = Path(tempfile.mkdtemp(prefix="qdemo-real-vocab-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _load_converted(path: Path):
    # as qdemo.models.loader loads a tokenizer it converted (tokenizer.json as written)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


@functools.lru_cache(maxsize=None)
def baichuan2_tokenizer():
    """Baichuan2-7B-Chat's tokenizer.model through qdemo's conversion (a few seconds, once)."""
    from qdemo.models.families.sp_tokenizer import convert_sp_tokenizer

    need(BAICHUAN2_DIR / "tokenizer.model")
    out = _scratch() / "baichuan2"
    convert_sp_tokenizer(BAICHUAN2_DIR, out)
    return _load_converted(out)


@functools.lru_cache(maxsize=None)
def qwen_v1_tokenizer():
    """Qwen-7B-Chat's qwen.tiktoken through qdemo's conversion (a few seconds, once)."""
    from qdemo.models.families.qwen_tokenizer import convert_qwen_tokenizer

    need(QWEN_V1_DIR / "qwen.tiktoken")
    out = _scratch() / "qwen-v1"
    convert_qwen_tokenizer(QWEN_V1_DIR, out)
    return _load_converted(out)


@functools.lru_cache(maxsize=None)
def baichuan2_model_bytes() -> bytes:
    return need(BAICHUAN2_DIR / "tokenizer.model").read_bytes()


@functools.lru_cache(maxsize=None)
def baichuan2_sp():
    """sentencepiece itself on the released model: what the official BaichuanTokenizer.encode returns."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=baichuan2_model_bytes())


@functools.lru_cache(maxsize=None)
def baichuan2_plain_sp():
    """sentencepiece on the released model with its `<reserved_N>` pieces marked UNUSED: sentencepiece then
    neither matches them in text nor emits them, and encodes typed `<reserved_106>` from its characters; every
    other user-defined piece (`\\n`, `，`, `?`) is matched as in the release. Control pieces (`<s>`) are never
    matched in text by sentencepiece anyway."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(
        model_proto=with_unused_pieces(baichuan2_model_bytes(), lambda text: bool(RESERVED_PIECE.fullmatch(text))))


@functools.lru_cache(maxsize=None)
def qwen_v1_ranks() -> dict[bytes, int]:
    return load_tiktoken_ranks(need(QWEN_V1_DIR / "qwen.tiktoken"))


@functools.lru_cache(maxsize=None)
def qwen_v1_tiktoken():
    """tokenization_qwen.py's Encoding: Qwen's PAT_STR, the file's ranks, and ENDOFTEXT, IMSTART, IMEND and
    205 extras numbered from len(ranks) (151643)."""
    import tiktoken

    ranks = qwen_v1_ranks()
    specials = {token: len(ranks) + i for i, token in enumerate(QWEN_SPECIALS)}
    return tiktoken.Encoding("Qwen", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


# Texts the real-vocabulary tests compare on: scripts, punctuation that Baichuan2 keeps as user-defined pieces
# (newlines, ， 。 ? ! . + - =, full-width digits, ..., HTML tags), code, emoji and whitespace runs.
ORDINARY_TEXTS = [
    "Hello world", "How are you?", "Hello!\nHow are you today?\n\nFine, thanks.", "What is 2 + 2 = ?",
    "你好，世界。今天天气很好！", "请问有什么我可以帮助你的吗？", "北京是中国的首都，上海是最大的城市。",
    "mixed 中文 and English: 百川 model 123, 第二句。", "１２３４５ full-width digits ＡＢＣ and ０.５",
    "wait... what?! ...really. 。。。 好的。。。。。。", "a+b=c; x-y=z; i++; --j; a == b != c",
    "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n    return a + b\n\nprint(add(1, 2))\n",
    "for i in range(10):\n\tprint(i)\n", "```python\nx = [1, 2, 3]\n```", "<p>Hello <b>world</b></p><br/><h1>T</h1>",
    "<table><tr><td>1</td></tr></table> <!-- comment --> <!DOCTYPE>", "<img/> <div class=\"x\">y</div>",
    "emoji 🚀🌍✨ and 👍🏽 😀!", "rare CJK 𠮷 龘 䶮 and é ñ ü ß", "《红楼梦》【注】『引号』“双引号” ‘单’ ￥100 ％",
    "  two leading spaces", "trailing spaces   ", "many     inner   spaces", " \n \t mixed whitespace \n",
    "line one\r\nline two\r\n", "\n", "?", "。", "", " ", "a", "literal ▁ marks▁here", "e\u0301 cafe\u0301 (NFD)",
    "https://example.com/path?q=1&r=2#frag", "C:\\Users\\me\\file.txt", "1,000,000 and 3.14159 and -7 and 2023年",
    "I'm sure we'll see; THEY'VE said it, you'D know.", "Ελληνικά русский 日本語 한국어 العربية",
    "full\u3000width space and no\u00a0break", "x<SEP>y<CLS>z",
]
# Text that spells reserved or control tokens: it must stay the characters it is.
TYPED_MARKERS = [
    "<reserved_106>", "<reserved_107>", "<reserved_5>", "<reserved_999>", "<s>", "</s>", "<unk>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|extra_0|>", "<|extra_204|>",
]
