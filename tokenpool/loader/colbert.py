"""ColBERT checkpoints: which format a folder is in, and its query / document settings (../COLBERT.md).

Formats, checked in this order:
- sentence-transformers 6 native: `config_sentence_transformers.json` `"model_type": "MultiVectorEncoder"`;
- PyLate / sentence-transformers <= 5: `modules.json` Transformer + Dense layers and no Pooling (settings as
  top-level keys of `config_sentence_transformers.json`, PyLate's defaults where absent);
- Stanford: `config.json` `"architectures": ["HF_ColBERT"]`, `linear.weight` next to the `bert.*` weights and
  `artifact.metadata`.
A folder carrying the PyLate and the Stanford files is read as PyLate (answerai-colbert-small-v1 has both,
with the same projection and settings).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenpool.loader.st_config import DenseSpec, SentenceTransformerConfig

MODES = ("query", "document")


@dataclass(frozen=True)
class ColbertSettings:
    """What a checkpoint says about its two modes (token strings; ids are resolved with the tokenizer).

    query_marker / document_marker: the marker token inserted after the first token (None: no marker);
    query_length: queries are expanded to it with the expansion token when `expansion`, and truncated to it
    unless `query_max_length` says otherwise;
    attend_expansion: the encoder attends to the expansion positions (else they are queries but not keys);
    document_length: documents are truncated to it (None: the model's maximum); skiplist_words: token strings
    whose rows are dropped from documents; dense: the projection stack, applied to every row.
    sentence-transformers 6 only: query_prompt / document_prompt: text prepended to the input before
    tokenization (its markers are prompts); query_max_length: the queries' truncation length when it is not
    `query_length` (strategy "min": longer queries pass up to it; None: the model's maximum); expansion_token:
    the expansion token (None: the mask token, else EOS); skiplist_tasks: the modes the skiplist applies to;
    keep_only_token_ids: an allow-list of ids for documents.
    """

    format: str
    query_marker: str | None
    document_marker: str | None
    query_length: int
    document_length: int | None
    expansion: bool
    attend_expansion: bool
    skiplist_words: tuple[str, ...]
    dense: list[DenseSpec] = field(default_factory=list, compare=False)
    query_prompt: str = ""
    document_prompt: str = ""
    query_max_length: int | None | str = "query_length"
    expansion_token: str | None = None
    skiplist_tasks: tuple[str, ...] = ("document",)
    keep_only_token_ids: tuple[int, ...] | None = None

    @property
    def query_truncation(self) -> int | None:
        return self.query_length if self.query_max_length == "query_length" else self.query_max_length


def read_colbert_settings(model_dir: Path, hf_config, st: SentenceTransformerConfig) -> ColbertSettings | None:
    """The folder's ColBERT settings, or None for a model that is not a ColBERT checkpoint."""
    st_file = model_dir / "config_sentence_transformers.json"
    st_json = json.loads(st_file.read_text()) if st_file.is_file() else {}
    if st_json.get("model_type") == "MultiVectorEncoder":
        return _multi_vector_encoder(model_dir, st_json, st)
    if st.token_level:
        return _pylate(st_json, st)
    if "HF_ColBERT" in (getattr(hf_config, "architectures", None) or []):
        return _stanford(model_dir)
    return None


def _pylate(cfg: dict, st: SentenceTransformerConfig) -> ColbertSettings:
    def get(key, default):
        value = cfg.get(key)
        return default if value is None else value

    expansion = bool(get("do_query_expansion", True))
    return ColbertSettings(
        format="pylate",
        query_marker=get("query_prefix", "[Q] ") or None,
        document_marker=get("document_prefix", "[D] ") or None,
        query_length=int(get("query_length", 32)),
        document_length=int(get("document_length", 180)),
        expansion=expansion,
        attend_expansion=expansion and bool(get("attend_to_expansion_tokens", False)),
        skiplist_words=tuple(get("skiplist_words", list(string.punctuation))),
        dense=list(st.dense),
    )


def _multi_vector_encoder(model_dir: Path, cfg: dict, st: SentenceTransformerConfig) -> ColbertSettings:
    """sentence-transformers 6's native format: the Transformer module's `query_length`, `document_length` and
    `query_expansion` (root sentence_bert_config.json), the prompts as markers, the MultiVectorMask module's
    skiplist. Prompts are chosen as `encode_query` / `encode_document` choose them."""
    def read(path: Path) -> dict:
        return json.loads(path.read_text()) if path.is_file() else {}

    transformer = read(model_dir / "sentence_bert_config.json")
    modules = json.loads((model_dir / "modules.json").read_text()) if (model_dir / "modules.json").is_file() else []
    mask = next((read(model_dir / m.get("path", "") / "config.json") for m in modules
                 if m.get("type", "").endswith("MultiVectorMask")), None)
    if mask is None:
        raise ValueError(f"{model_dir}: a MultiVectorEncoder folder without a MultiVectorMask module; "
                         "the rows it returns are not defined without one.")
    prompts = cfg.get("prompts") or {}
    default = prompts.get(cfg.get("default_prompt_name") or "", "")
    query_prompt = prompts["query"] if "query" in prompts else default
    document_prompt = next((prompts[c] for c in ("document", "passage", "corpus") if c in prompts), default)
    query_cap, document_length = transformer.get("query_length"), transformer.get("document_length")
    qe = transformer.get("query_expansion")
    if qe is not None:
        strategy, length = qe.get("strategy"), qe.get("length")
        if strategy not in ("fixed", "min") or not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ValueError(f"{model_dir}: query_expansion {qe} needs strategy 'fixed' or 'min' and a positive "
                             "int length.")
        # fixed: every query is exactly `length` tokens; min: at least `length`, at most query_length (or
        # the model's maximum), as sentence-transformers tokenizes them
        query_max = length if strategy == "fixed" else (None if query_cap is None else max(query_cap, length))
        query_length = length
    else:
        query_max, query_length = query_cap, query_cap or 0
    tasks = mask.get("skiplist_tasks") or ["document"]
    keep = mask.get("keep_only_token_ids")
    return ColbertSettings(
        format="sentence-transformers",
        query_marker=None,
        document_marker=None,
        query_length=query_length,
        document_length=document_length,
        expansion=qe is not None,
        attend_expansion=qe is not None and bool(qe.get("attend", False)),
        skiplist_words=tuple(mask.get("skiplist_words") or ()),
        dense=list(st.dense),
        query_prompt=query_prompt or "",
        document_prompt=document_prompt or "",
        query_max_length=query_max,
        expansion_token=qe.get("token") if qe is not None else None,
        skiplist_tasks=(tasks,) if isinstance(tasks, str) else tuple(tasks),
        keep_only_token_ids=None if keep is None else tuple(int(i) for i in keep),
    )


def _stanford(model_dir: Path) -> ColbertSettings:
    meta_file = model_dir / "artifact.metadata"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return ColbertSettings(
        format="stanford",
        query_marker=meta.get("query_token_id", "[unused0]"),
        document_marker=meta.get("doc_token_id", "[unused1]"),
        query_length=int(meta.get("query_maxlen", 32)),
        document_length=meta.get("doc_maxlen"),
        expansion=True,
        attend_expansion=bool(meta.get("attend_to_mask_tokens", False)),
        skiplist_words=tuple(string.punctuation) if meta.get("mask_punctuation", True) else (),
        dense=[],  # linear.weight is read from the checkpoint (stanford_projection)
    )


def stanford_projection(weights: dict[str, torch.Tensor]) -> DenseSpec:
    """The Stanford checkpoint's `linear.weight` `[dim, hidden]`: no bias, no activation."""
    weight = weights["linear.weight"]
    return DenseSpec(weight.shape[1], weight.shape[0], False, "torch.nn.modules.linear.Identity",
                     {"linear.weight": weight})


@dataclass(frozen=True)
class ColbertIds:
    """`ColbertSettings` resolved against the tokenizer: ids, and the rules of each mode."""

    settings: ColbertSettings
    first_id: int
    last_id: int
    query_marker_id: int | None
    document_marker_id: int | None
    mask_id: int
    skip_ids: frozenset[int]

    @classmethod
    def resolve(cls, settings: ColbertSettings, tokenizer) -> "ColbertIds":
        vocab = tokenizer.get_vocab()
        specials = tokenizer("", add_special_tokens=True)["input_ids"]
        if len(specials) != 2:
            raise ValueError(f"ColBERT needs a tokenizer that puts one token before and one after a text; this one "
                             f"puts {specials}.")
        if settings.expansion_token is not None:
            mask_id = vocab.get(settings.expansion_token)
            if mask_id is None:
                raise ValueError(f"The query expansion token {settings.expansion_token!r} is not in the tokenizer's "
                                 "vocabulary.")
        else:
            mask_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.eos_token_id
        if mask_id is None and settings.expansion:
            raise ValueError("ColBERT query expansion needs a mask (or EOS) token; the tokenizer has neither.")
        return cls(settings, specials[0], specials[1], _marker_id(settings.query_marker, vocab),
                   _marker_id(settings.document_marker, vocab), mask_id,
                   frozenset(vocab[w] for w in settings.skiplist_words if w in vocab))

    def build(self, text_ids: list[int], mode: str, limit: int | None = None) -> tuple[list[int], int | None, list[int] | None]:
        """A text's ids in `mode` -> (model input ids, number of key rows or None when all are keys, the output
        rows to keep or None for all). `limit`: the caller's truncation, applied to the text's own ids."""
        s = self.settings
        marker = self.query_marker_id if mode == "query" else self.document_marker_id
        head = [self.first_id] + ([marker] if marker is not None else [])
        length = s.query_truncation if mode == "query" else s.document_length
        room = len(text_ids) if length is None else max(length - len(head) - 1, 0)
        if limit is not None:
            room = min(room, limit)
        ids = head + text_ids[:room] + [self.last_id]
        if mode == "query":
            real = len(ids)
            if s.expansion and real < s.query_length:
                ids += [self.mask_id] * (s.query_length - real)
            return ids, (real if s.expansion and not s.attend_expansion and real < len(ids) else None), \
                self.kept_rows(ids, mode)
        return ids, None, self.kept_rows(ids, mode)

    def prompt(self, mode: str) -> str:
        """Text prepended to an input of `mode` before tokenization (sentence-transformers 6's markers)."""
        return self.settings.query_prompt if mode == "query" else self.settings.document_prompt

    def kept_rows(self, ids: list[int], mode: str) -> list[int] | None:
        """Rows of an input of `mode` that are returned: those whose token is not in the skiplist (documents,
        or the modes the checkpoint names), and in the allow-list for documents if it has one (None: all)."""
        skip = self.skip_ids if mode in self.settings.skiplist_tasks else frozenset()
        allow = self.settings.keep_only_token_ids if mode != "query" else None
        if not skip and allow is None:
            return None
        allowed = frozenset(allow) if allow is not None else None
        keep = [i for i, t in enumerate(ids) if t not in skip and (allowed is None or t in allowed)]
        return None if len(keep) == len(ids) else keep


def _marker_id(marker: str | None, vocab: dict[str, int]) -> int | None:
    """The id of the whole marker string (PyLate's added `"[Q] "`), else of its first word (`[unused0]`)."""
    if marker is None:
        return None
    for candidate in (marker, marker.split()[0] if marker.split() else marker):
        if candidate in vocab:
            return vocab[candidate]
    raise ValueError(f"The ColBERT marker {marker!r} is not in the tokenizer's vocabulary (PyLate would add it "
                     "with an untrained embedding): this folder cannot be encoded as its authors did.")
