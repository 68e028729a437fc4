"""Text <-> token ids, from the vocabulary stored in the GGUF file.

Three algorithms, chosen by `tokenizer.ggml.model`:

* SPM ("llama"): SentencePiece-style. Spaces become "▁" (U+2581), the text is split into UTF-8
  characters, and the adjacent pair whose merged text is a token with the highest *score* is
  merged, again and again. A piece that is not in the vocabulary falls back to byte tokens
  "<0xXX>".
* BPE ("gpt2"): byte-level BPE. A pre-tokenizer regex (chosen by `tokenizer.ggml.pre`) cuts the
  text into words; each word's bytes are mapped to printable characters and the pair with the
  lowest *merge rank* is merged, again and again. Gemma 4's ("gemma4") merges UTF-8 characters
  as they are, after spaces became "▁", and falls back to "<0xXX>" byte tokens like SPM.
* WPM ("bert"): WordPiece. The text is cut into words at spaces and punctuation (lowercased
  and stripped of accents if the file says), and each word, with "▁" before it, is covered by
  the longest tokens that match from its start, or becomes the unknown token.

Both first cut out special tokens ("<s>", "<|im_start|>", ...) so they are never split.
The results equal llama.cpp's tokenizer on the golden data in tests/data.
"""
from __future__ import annotations

import heapq
import unicodedata
from functools import lru_cache

import regex

from .gguf_file import EOG_TEXTS, VocabData

# token types stored in tokenizer.ggml.token_type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes by `tokenizer.ggml.pre`, applied one after the other: each splits the
# pieces the previous one produced (the text between matches is kept as pieces too). They are
# llama.cpp's (src/llama-vocab.cpp, llm_tokenizer_bpe); `$` is written `\Z` since C++'s regex
# matches it only at the very end, where Python's also matches before a final newline.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"
           r"|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_LETTERS = (   # deepseek-llm's letter ranges, as llama.cpp spells them
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-"
    "\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90"
    "-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d"
    "\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-"
    "\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
    "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d"
    "\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
    "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e"
    "\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
    "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943")
_DEEPSEEK_PUNCT = "!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002"
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
PRE_TOKENIZERS = {
    "default": [_GPT2],
    "gpt2": [_GPT2],
    "gpt-2": [_GPT2],
    "phi-2": [_GPT2],
    "mpt": [_GPT2],
    "olmo": [_GPT2],
    "llama3": [_LLAMA3],
    "llama-v3": [_LLAMA3],
    "llama-bpe": [_LLAMA3],
    "smollm": [r"\p{N}", _GPT2],
    "starcoder": [r"\p{N}", _GPT2],
    "refact": [r"\p{N}", _GPT2],
    "command-r": [r"\p{N}", _GPT2],
    "qwen2": [_QWEN2],
    "deepseek-r1-qwen": [_QWEN2],
    "stablelm2": [_QWEN2],
    "qwen35": [_QWEN35],
    "deepseek-llm": ["[\r\n]", "\\s?[" + _DEEPSEEK_LETTERS + "]+", r"\s?[" + _DEEPSEEK_PUNCT + "]+",
                     r"\s+\Z", _CJK, r"\p{N}+"],
    "deepseek-coder": ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"],
    "gemma4": [r"[^\n]+|[\n]+"],   # lines only: the merges run over whole lines
}
# pre-tokenizers whose words that are whole tokens are taken as they are, not merged (llama.cpp's
# ignore_merges)
IGNORE_MERGES = frozenset({"llama3", "llama-v3", "llama-bpe"})
# byte-level BPE pre-tokenizers whose detokenized text keeps its spaces (llama-vocab.cpp sets
# clean_spaces = false for these)
NO_CLEAN_SPACES = frozenset({
    "deepseek-llm", "deepseek-coder", "deepseek-v3", "spark2_5", "youtu", "sarvam-moe",
    "command-r", "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "qwen35", "poro-chat", "viking",
    "tekken", "smollm", "chameleon", "gpt-4o", "llama4", "kanana2", "talkie",
    "granite-embed-multi-97m", "tiny_aya", "cohere2moe", "superbpe", "trillion", "granite-docling",
    "bailingmoe", "bailingmoe2", "llada-moe", "seed-coder", "hunyuan", "hunyuan-dense", "hy_v4",
    "joyai-llm", "kimi-k2", "ufakzeka", "grok-2", "afmoe", "laguna", "minimax-m2"})


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def merge_pairs(symbols: list[str], priority, on_merge=None) -> list[str]:
    """The loop both tokenizers share: over a linked list of symbols, repeatedly merge the
    adjacent pair with the best (lowest) priority, leftmost on a tie, until no pair has one.
    priority(left, right) -> a number, or None when the pair may not merge (SPM passes the
    negated score of the merged token, BPE the merge rank). Returns the merged symbols."""
    syms = list(symbols)
    n = len(syms)
    if n < 2:
        return syms
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prev = list(range(-1, n - 1))
    alive = [True] * n
    heap: list = []

    def queue(left: int, right: int):
        if left >= 0 and right >= 0:
            pr = priority(syms[left], syms[right])
            if pr is not None:
                heapq.heappush(heap, (pr, left, right, syms[left] + syms[right]))

    for i in range(1, n):
        queue(i - 1, i)
    while heap:
        _, left, right, merged = heapq.heappop(heap)
        if not alive[left] or not alive[right] or nxt[left] != right or syms[left] + syms[right] != merged:
            continue  # stale: one side was merged since this pair was queued
        if on_merge:
            on_merge(merged, syms[left], syms[right])
        syms[left] = merged
        alive[right] = False
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        queue(prev[left], left)
        queue(left, nxt[left])
    out, i = [], 0
    while i != -1:
        out.append(syms[i])
        i = nxt[i]
    return out


class Tokenizer:
    def __init__(self, vocab: VocabData):
        self.vocab = vocab
        self.n_vocab = len(vocab.tokens)
        self.bos_id = vocab.bos_id
        self.eos_id = vocab.eos_id
        self.spm = vocab.model == "llama"
        self.wpm = vocab.model == "bert"
        # byte-level BPE maps bytes to printable characters; gemma4's merges UTF-8 as it is
        self.byte_encode = vocab.model == "gpt2"
        self.token_to_id = {t: i for i, t in enumerate(vocab.tokens)}
        types = vocab.token_types
        # end-of-generation tokens: EOS, EOT, and the tokens llama.cpp knows by their text
        eog = {vocab.eos_id, vocab.eot_id}
        eog |= {self.token_to_id[name] for name in EOG_TEXTS if name in self.token_to_id}
        # llama.cpp ends generation at the FIM padding, repository and file-separator tokens too
        eog |= {vocab.fim[k] for k in ("pad", "rep", "sep") if k in vocab.fim}
        self.eog_ids = frozenset(i for i in eog if i >= 0)
        # special tokens cut out before tokenizing, longest first so "<|im_start|>" wins over "<|"
        self._specials = sorted(
            ((t, i, int(types[i])) for i, t in enumerate(vocab.tokens)
             if types[i] in (CONTROL, USER_DEFINED, UNKNOWN) and t),
            key=lambda x: -len(x[0]))
        if self.spm:
            self._scores = vocab.scores
        elif self.wpm:
            self._max_token_bytes = max(len(t.encode("utf-8")) for t in vocab.tokens)
        else:
            self._byte_char = _bytes_to_unicode()
            self._char_byte = {c: b for b, c in self._byte_char.items()}
            self._ranks = {}
            for rank, m in enumerate(vocab.merges):
                left, _, right = m.partition(" ")
                self._ranks[(left, right)] = rank
            pre = vocab.pre or "default"
            if pre not in PRE_TOKENIZERS:   # llama.cpp refuses these files too
                raise ValueError(f"unknown pre-tokenizer type: {pre!r} (numllama knows: {', '.join(PRE_TOKENIZERS)})")
            self._pre_regexes = [regex.compile(r) for r in PRE_TOKENIZERS[pre]]
            self._ignore_merges = pre in IGNORE_MERGES
        self._pieces = [self._piece_bytes(i) for i in range(self.n_vocab)]
        # byte-level BPE files clean up spaces when detokenizing ("a ," -> "a,"), but for the
        # pre-tokenizers llama.cpp exempts (llama_vocab::impl::load: clean_spaces)
        self.clean_spaces = vocab.model in ("gpt2", "gemma4") and (vocab.pre or "default") not in NO_CLEAN_SPACES
        self.max_piece_bytes = max(1, max(len(p) for p in self._pieces))
        self._words: list[bytes] | None = None

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)), known without tokenizing: the pieces of the tokens
        spell the text's UTF-8 bytes (at least one per character), and no piece is longer than
        max_piece_bytes. It lets a server refuse a prompt that cannot fit before paying for it."""
        return -(-len(text) // self.max_piece_bytes)

    # ---------------------------------------------------------------- text -> tokens
    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Tokenize like llama.cpp's `llama_tokenize(text, add_special, parse_special)`."""
        out: list[int] = []
        # (WordPiece: llama.cpp adds [CLS] and [SEP] whatever the file's add_bos says)
        if add_special and (self.vocab.add_bos or self.wpm) and self.bos_id >= 0:
            out.append(self.bos_id)
        is_prev_special = True  # SPM prefixes a space at the start and after each special token
        for frag in self._split_specials(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                is_prev_special = True
                continue
            if self.spm:
                if self.vocab.add_space_prefix and is_prev_special:
                    frag = " " + frag
                self._spm_encode(frag.replace(" ", "\u2581"), out)
            elif self.wpm:
                self._wpm_encode(frag, out)
            elif self.byte_encode:
                self._bpe_encode(frag, out)
            else:   # gemma4: SPM's spaces, BPE's merges
                self._bpe_encode(frag.replace(" ", "\u2581"), out)
            is_prev_special = False
        if add_special and self.vocab.add_eos and self.eos_id >= 0:
            out.append(self.eos_id)
        if add_special and self.wpm and self.vocab.sep_id >= 0:
            out.append(self.vocab.sep_id)
        return out

    def _split_specials(self, text: str, parse_special: bool) -> list:
        """Cut special-token texts out of `text`: a list of str fragments and int token ids.
        User-defined tokens are always cut out; control/unknown ones only with parse_special."""
        frags: list = [text] if text else []
        for piece, tid, ttype in self._specials:
            if not parse_special and ttype in (CONTROL, UNKNOWN):
                continue
            if not any(isinstance(f, str) and piece in f for f in frags):
                continue
            new: list = []
            for f in frags:
                if not isinstance(f, str) or piece not in f:
                    new.append(f)
                    continue
                parts = f.split(piece)
                for k, p in enumerate(parts):
                    if k:
                        new.append(tid)
                    if p:
                        new.append(p)
            frags = new
        return frags

    def _spm_encode(self, text: str, out: list[int]) -> None:
        """SentencePiece merge by score, as llama.cpp's llm_tokenizer_spm_session."""
        if not text:
            return
        rev_merge: dict[str, tuple[str, str]] = {}
        scores = self._scores

        def priority(left: str, right: str):
            tid = self.token_to_id.get(left + right)
            return None if tid is None else -float(scores[tid])   # highest score first

        def remember(merged: str, left: str, right: str):
            rev_merge[merged] = (left, right)

        def resegment(t: str):
            tid = self.token_to_id.get(t)
            if tid is not None:
                out.append(tid)
                return
            pair = rev_merge.get(t)
            if pair is None:
                for b in t.encode("utf-8"):  # byte fallback
                    bt = self.token_to_id.get(f"<0x{b:02X}>")
                    if bt is None:
                        bt = self.token_to_id.get(chr(b), self.vocab.unk_id)
                    out.append(bt)
                return
            resegment(pair[0])
            resegment(pair[1])

        for symbol in merge_pairs(list(text), priority, remember):
            resegment(symbol)

    def _bpe_words(self, text: str) -> list[str]:
        pieces = [text]
        for rx in self._pre_regexes:
            new = []
            for p in pieces:
                pos = 0
                for m in rx.finditer(p):
                    if m.start() > pos:
                        new.append(p[pos:m.start()])
                    if m.end() > m.start():
                        new.append(m.group())
                    pos = m.end()
                if pos < len(p):
                    new.append(p[pos:])
            pieces = new
        return pieces

    def _bpe_encode(self, text: str, out: list[int]) -> None:
        """BPE merge by rank, as llama.cpp's llm_tokenizer_bpe_session."""
        for word in self._bpe_words(text):
            mapped = "".join(self._byte_char[b] for b in word.encode("utf-8")) if self.byte_encode else word
            whole = self.token_to_id.get(mapped)
            # ignore_merges takes a word that is a token as it is; gemma4 does so for runs of
            # newlines (llama.cpp PR 21343)
            if whole is not None and (self._ignore_merges or (not self.byte_encode and not mapped.strip("\n"))):
                out.append(whole)
                continue
            out.extend(self._bpe_word(mapped))

    @lru_cache(maxsize=65536)
    def _bpe_word(self, mapped: str) -> tuple[int, ...]:
        ids: list[int] = []
        for symbol in merge_pairs(list(mapped), lambda left, right: self._ranks.get((left, right))):
            tid = self.token_to_id.get(symbol)
            if tid is not None:
                ids.append(tid)
            elif self.byte_encode:   # not in the vocabulary: one token per byte character
                ids.extend(self.token_to_id[c] for c in symbol if c in self.token_to_id)
            else:                    # gemma4: "<0xXX>" byte tokens
                ids.extend(self.token_to_id[f"<0x{b:02X}>"] for b in symbol.encode("utf-8")
                           if f"<0x{b:02X}>" in self.token_to_id)
        return tuple(ids)

    def _wpm_encode(self, text: str, out: list[int]) -> None:
        """WordPiece, as llama.cpp's llm_tokenizer_wpm_session: per word, "▁" + word is covered
        greedily by the longest matching tokens (compared as UTF-8 bytes); a word that cannot be
        covered whole becomes the unknown token."""
        for word in wpm_words(text, self.vocab.lowercase, self.vocab.strip_accents):
            data = ("\u2581" + word).encode("utf-8")
            start = len(out)
            i = 0
            while i < len(data):
                for j in range(min(len(data), i + self._max_token_bytes + 1), i, -1):
                    try:
                        tid = self.token_to_id.get(data[i:j].decode("utf-8"))
                    except UnicodeDecodeError:
                        tid = None
                    if tid is not None:
                        out.append(tid)
                        i = j
                        break
                else:   # no token fits here: the whole word is dropped
                    del out[start:]
                    break
            if len(out) == start:
                out.append(self.vocab.unk_id)

    # ---------------------------------------------------------------- tokens -> text
    def _piece_bytes(self, tid: int) -> bytes:
        """The bytes a token stands for when special tokens are rendered as text."""
        text = self.vocab.tokens[tid]
        ttype = int(self.vocab.token_types[tid])
        if ttype == BYTE and not self.byte_encode and len(text) == 6 and text.startswith("<0x"):
            return bytes([int(text[3:5], 16)])
        if ttype in (CONTROL, USER_DEFINED, UNKNOWN, UNUSED):
            return text.encode("utf-8")   # "<unk>" too (older llama.cpp printed U+2585 for it)
        if not self.byte_encode:   # SPM, gemma4 and WordPiece write spaces as "▁"
            return text.replace("\u2581", " ").encode("utf-8")
        try:
            return bytes(self._char_byte[c] for c in text)
        except KeyError:
            return text.encode("utf-8")

    def is_control(self, tid: int) -> bool:
        return int(self.vocab.token_types[tid]) == CONTROL

    def token_bytes(self, tid: int, special: bool = True) -> bytes:
        """The bytes of one token. Control and unknown tokens render as their text only with
        `special` (llama_vocab::token_to_piece: nothing otherwise)."""
        if not special and int(self.vocab.token_types[tid]) in (CONTROL, UNKNOWN):
            return b""
        return self._pieces[tid]

    def decode(self, ids, special: bool = True) -> str:
        """Concatenate the pieces; invalid UTF-8 (half a character) is replaced."""
        return b"".join(self.token_bytes(int(t), special) for t in ids).decode("utf-8", "replace")

    def detokenize(self, ids, special: bool = True) -> bytes:
        """llama_vocab::detokenize(tokens, special): the pieces, the first without the space SPM
        put in front of the text, then the clean-up of spaces before punctuation and
        contractions that the file asks for (clean_spaces). Bytes, as llama.cpp returns them.
        (The server's /detokenize joins the pieces alone, as llama-server's does.)"""
        text = b"".join(self.token_bytes(int(t), special) for t in ids)
        if self.spm and self.vocab.add_space_prefix and ids and self.token_bytes(int(ids[0]), special)[:1] == b" ":
            text = text[1:]
        return _clean_spaces(text) if self.clean_spaces else text

    def single_token_words(self) -> list[bytes]:
        """Every token detokenized alone (DRY looks for its sequence breakers in them); computed
        once."""
        if self._words is None:
            self._words = [self.detokenize([i]) for i in range(self.n_vocab)]
        return self._words

    def token_text(self, tid: int) -> str | None:
        """What a token spells as text, for grammars: control tokens spell their own text, as
        llama.cpp's grammar sees them (end-of-generation tokens are judged apart); None for
        bytes that are not whole UTF-8 characters on their own."""
        try:
            return self._pieces[tid].decode("utf-8")
        except UnicodeDecodeError:
            return None

    def token_str(self, tid: int) -> str:
        return self.token_bytes(tid).decode("utf-8", "replace")


# llama.cpp's whitespace (unicode.cpp, from Unicode's White_Space property)
_WHITESPACE = frozenset([*range(0x09, 0x0E), *range(0x2000, 0x200B), 0x20, 0x85, 0xA0, 0x1680, 0x2028, 0x2029,
                         0x202F, 0x205F, 0x3000])
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _clean_spaces(text: bytes) -> bytes:
    """The three passes of llama_vocab::impl::detokenize's clean_spaces: drop the space before
    "?!.,", around a lone apostrophe, and before "'s", "'m", "'re", "'ve"."""
    out = bytearray(text[:1])
    for i in range(1, len(text)):   # " ?", " !", " .", " ,"
        if text[i - 1] == 0x20 and text[i] in b"?!.,":
            out.pop()
        out.append(text[i])
    text, out = bytes(out), bytearray(out[:1])
    i = 1
    while i < len(text):   # " ' " -> "'"
        x = text[i]
        if x == 0x27 and i + 1 < len(text) and text[i - 1] == 0x20 and text[i + 1] == 0x20:
            out.pop()
            out.append(x)
            i += 2   # (llama.cpp writes a NUL over the next space and skips it)
            continue
        out.append(x)
        i += 1
    text, out = bytes(out), bytearray(out[:1])
    for i in range(1, len(text)):   # " 's", " 'm", " 're", " 've"
        if text[i - 1] == 0x20 and text[i] == 0x27 and i + 1 < len(text):
            x1 = text[i + 1]
            x2 = text[i + 2] if i + 2 < len(text) else None
            if x1 in b"sm" or (x2 is not None and (x1, x2) in ((0x72, 0x65), (0x76, 0x65))):
                out.pop()
        out.append(text[i])
    return bytes(out)


def wpm_words(text: str, lowercase: bool, strip_accents: bool) -> list[str]:
    """WordPiece's words, as llm_tokenizer_wpm_session::preprocess: spaces end words; control
    characters go; accents go when stripping (each character replaced by the first of its
    NFD decomposition, then combining marks dropped); punctuation, ASCII symbols and CJK
    characters are words of their own."""
    words = [""]
    for ch in text:
        if strip_accents:
            ch = unicodedata.normalize("NFD", ch)[0]
        cpt = ord(ch)
        category = unicodedata.category(ch)
        if cpt in _WHITESPACE:
            if words[-1]:
                words.append("")
            continue
        if cpt == 0 or cpt == 0xFFFD or category[0] == "C" and category != "Cn":
            continue
        if strip_accents and category[0] == "M":
            continue
        if lowercase:
            low = ch.lower()
            ch = low if len(low) == 1 else low[0]
        if category[0] == "P" or (cpt < 0x7F and category[0] == "S") or \
                any(a <= cpt <= b for a, b in _CJK_RANGES):
            if words[-1]:
                words.append("")
            words[-1] = ch
            words.append("")
        else:
            words[-1] += ch
    if not words[-1]:
        words.pop()
    return words


def utf8_complete_prefix(buf: bytes) -> int:
    """Length of the longest prefix of `buf` that does not end inside a UTF-8 character, so
    streamed text never carries half a character. This is llama-server's `validate_utf8` step
    for step, so that streamed chunks break where its chunks break: a lead byte among the last
    four holds back the bytes from it on if the character it starts is longer than they are,
    even when what follows is not a continuation byte (invalid UTF-8, which a byte-fallback
    model can produce). codecs' incremental decoder would emit such bytes at once."""
    n = len(buf)
    for back in range(1, min(4, n) + 1):
        c = buf[n - back]
        need = 2 if c & 0xE0 == 0xC0 else 3 if c & 0xF0 == 0xE0 else 4 if c & 0xF8 == 0xF0 else 0
        if back < need:
            return n - back
    return n
