"""tokenize: canonical pairs → token ids of the prompt and of each completion, + a report.

How a pair becomes tokens, exactly:

1. Texts. Conversational rows are rendered by the tokenizer's chat template (with the row's `tools`
   and `chat_template_kwargs`): the prompt with the generation prompt, and prompt+chosen,
   prompt+rejected as whole conversations. Standard rows are the texts `prompt`, `prompt + chosen`,
   `prompt + rejected` (concatenated as given: " blue." carries its own space).
2. Tokens. Each text is tokenized whole, without special tokens (a chat template writes its own);
   standard rows then get the tokenizer's leading special tokens (BOS) unless the text already
   starts with them, and EOS after each completion unless it already ends with EOS. Doubled
   BOS/EOS are collapsed. So prompt_ids + chosen_ids is exactly the tokenization of the full text,
   as the model sees it at inference.
3. Prompt boundary. The tokenized prompt is not always a prefix of the tokenized prompt+completion:
   BPE merges across the boundary ("is " + "blue" → "is", " blue"). The policy: `prompt_ids` is the
   longest common token prefix of the prompt, prompt+chosen and prompt+rejected; each completion is
   the rest of its own full tokenization. The merged boundary token moves into both completions, so
   both are scored over the same text span, from the same context, with the tokens the model really
   sees; nothing is shifted. Such rows are counted (`boundary_merges`, `boundary_tokens_moved`).
   If a chat template renders the prompt *text* differently once a completion follows (it rewrites
   earlier turns), the completion cannot be located: that is rule `template_changes_prompt`,
   handled by `data.on_invalid` like any invalid row (error names the file, row, row_id and rule).
4. Truncation to `max_length` (prompt + the longer completion), once, here, so reference log-probs
   and training see the same tokens. `keep_start` keeps the prompt's start and cuts the completions'
   ends. `keep_end` (deprecated, warned) keeps the prompt's end instead: it drops the prompt's oldest
   tokens (after a leading BOS, which stays) until the longer side fits; if a completion alone is too
   long even with one prompt token left, its end is cut as with keep_start. A pair whose completions
   lose all their tokens carries no preference and is dropped (`emptied_by_truncation`). The report
   counts truncated rows, prompts and completions, emptied completions, and length statistics.

5. Coverage. The report counts, per split, the tokens that are the tokenizer's unknown token (when it has
   one) among the tokens written; above `tokenize.max_unknown_rate` (default 5%) the stage refuses: the
   tokenizer does not cover the data (e.g. the built-in word-level tokenizer on real text).

Splits stream through in Parquet record batches (`tokenize.batch_size` rows), optionally over
`tokenize.dataset_num_proc` worker processes with a bounded number of batches in flight, so peak
memory does not grow with the dataset; output order is the input order whatever the process count.
"""

from __future__ import annotations

import multiprocessing
import sys
import warnings
from collections import Counter, deque
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.builtin import BUILTIN_MODELS
from pipeline.core.errors import PipelineError
from pipeline.data.dropped import DROPPED_FILE, DroppedLog
from pipeline.data.images import open_image
from pipeline.data.invalid import InvalidRow
from pipeline.data.processing import chat_renderer, image_token_id, is_processor, tokenizer_of
from pipeline.data.schema import SPLITS, TOKENIZED_SCHEMA, TOKENIZED_VISION_SCHEMA, decoded_row
from pipeline.store.artifacts import write_json


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. [BOS]); [] for most chat models."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    return []


def _collapse_doubles(ids: list[int], bos_id: int | None, eos_id: int | None) -> list[int]:
    start, end = 0, len(ids)
    while bos_id is not None and end - start >= 2 and ids[start] == bos_id and ids[start + 1] == bos_id:
        start += 1
    while eos_id is not None and end - start >= 2 and ids[end - 1] == eos_id and ids[end - 2] == eos_id:
        end -= 1
    return ids[start:end]


def _common_prefix_length(*sequences: list[int]) -> int:
    n = 0
    for items in zip(*sequences):
        if any(item != items[0] for item in items[1:]):
            break
        n += 1
    return n


class PairTokenizer:
    """Tokenizes decoded canonical rows by the policy of the module docstring. Given a vision-language model's
    processor, conversations render with its chat template and a row's texts are tokenized by the processor with
    the row's images, so each image placeholder expands into exactly the image tokens the processor makes."""

    def __init__(self, processing_class):
        self.processor = processing_class if is_processor(processing_class) else None
        self.tokenizer = tokenizer = tokenizer_of(processing_class)
        self.render = chat_renderer(processing_class).apply_chat_template
        self.image_token_id = image_token_id(processing_class)
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.prefix = special_prefix(tokenizer)

    def texts(self, row: dict) -> tuple[str, str, str]:
        """The prompt, prompt+chosen and prompt+rejected texts of one row."""
        if not row["conversational"]:
            return row["prompt"], row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]
        kwargs = dict(row.get("chat_template_kwargs") or {})
        if row.get("tools"):
            kwargs["tools"] = row["tools"]
        render = self.render
        try:
            prompt = render(row["prompt"], add_generation_prompt=True, tokenize=False, **kwargs)
            fulls = [render(row["prompt"] + row[name], tokenize=False, **kwargs) for name in ("chosen", "rejected")]
        except Exception as err:  # jinja raises TemplateError, TypeError, ...; the row is what the user must fix
            raise InvalidRow(
                "template_error", f"the chat template fails on this row ({type(err).__name__}: {err})"
            ) from None
        for name, full in zip(("chosen", "rejected"), fulls):
            if not full.startswith(prompt):
                at = _common_prefix_length(list(prompt), list(full))
                raise InvalidRow(
                    "template_changes_prompt",
                    f"the chat template renders the prompt differently once the {name} completion follows "
                    f"(from character {at}: {prompt[at : at + 30]!r} becomes {full[at : at + 30]!r}), so the "
                    "completion cannot be located",
                )
        return prompt, fulls[0], fulls[1]

    def _finish(self, ids: list[int], conversational: bool, completion: bool) -> list[int]:
        if not conversational:
            if self.prefix and ids[: len(self.prefix)] != self.prefix:
                ids = self.prefix + ids
            if completion and self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
                ids = ids + [self.eos_id]
        return _collapse_doubles(ids, self.bos_id, self.eos_id)

    def split(self, row: dict, prompt: list[int], chosen: list[int], rejected: list[int]) -> tuple[dict, int]:
        """Prompt/chosen/rejected ids from the three full tokenizations, and how many prompt tokens moved."""
        conv = row["conversational"]
        prompt = self._finish(prompt, conv, False)
        chosen, rejected = self._finish(chosen, conv, True), self._finish(rejected, conv, True)
        n = _common_prefix_length(prompt, chosen, rejected)
        if n == 0:
            raise InvalidRow("no_prompt", "no prompt token is left once the completions are tokenized with the prompt")
        ids = {"prompt_ids": prompt[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]}
        for name in ("chosen", "rejected"):
            if not ids[f"{name}_ids"]:
                raise InvalidRow("empty_completion", f"the {name} completion has no token of its own")
        return ids, len(prompt) - n

    def encode(self, rows: list[dict]) -> list[tuple[dict, int] | InvalidRow]:
        """Untruncated ids and moved-token counts of decoded rows (an InvalidRow where a row fails)."""
        outcomes: list = [None] * len(rows)
        texts, owners, pictured = [], [], []
        for i, row in enumerate(rows):
            try:
                if row.get("images"):
                    pictured.append((i, self.with_images(row, self.texts(row))))
                else:
                    texts.extend(self.texts(row))
                    owners.append(i)
            except InvalidRow as bad:
                outcomes[i] = bad
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        triples = [(i, encoded[3 * k : 3 * k + 3]) for k, i in enumerate(owners)] + pictured
        for i, triple in triples:
            try:
                outcomes[i] = self.split(rows[i], *(list(ids) for ids in triple))
            except InvalidRow as bad:
                outcomes[i] = bad
        return outcomes

    def with_images(self, row: dict, texts: tuple[str, str, str]) -> list[list[int]]:
        """The ids of a row's three texts as its processor makes them with the row's images."""
        if self.processor is None:
            raise InvalidRow(
                "images_on_text",
                "the row has images but the model's processing class is a tokenizer "
                "(a text-only model); use a vision-language model and its processor",
            )
        images = [open_image(image) for image in row["images"]]
        try:
            return [
                list(self.processor(text=[text], images=images, add_special_tokens=False)["input_ids"][0])
                for text in texts
            ]
        except Exception as err:  # the processor's own check of placeholders against images, a bad image mode, ...
            raise InvalidRow(
                "template_error",
                f"the processor fails on this row with its {len(images)} image"
                f"{'s' * (len(images) != 1)} ({type(err).__name__}: {err})",
            ) from None


def tokenize_pair(tokenizer, row: dict) -> dict:
    """Untruncated ids of one decoded canonical row; raises InvalidRow if it cannot be tokenized."""
    outcome = PairTokenizer(tokenizer).encode([row])[0]
    if isinstance(outcome, InvalidRow):
        raise outcome
    return outcome[0]


def truncate_pair(ids: dict, max_length: int | None, mode: str, bos_id: int | None = None) -> dict:
    """Fit prompt + each completion into `max_length` tokens; both sides keep the same prompt (see above)."""
    prompt, chosen, rejected = ids["prompt_ids"], ids["chosen_ids"], ids["rejected_ids"]
    longest = max(len(chosen), len(rejected))
    if max_length is None or len(prompt) + longest <= max_length:
        return ids
    if mode == "keep_end":
        head = prompt[:1] if bos_id is not None and prompt[:1] == [bos_id] and len(prompt) > 1 else []
        body = prompt[len(head) :]
        keep = max(1, max_length - len(head) - longest)
        prompt = head + body[-keep:]
    else:
        prompt = prompt[:max_length]
    room = max(0, max_length - len(prompt))
    return {"prompt_ids": prompt, "chosen_ids": chosen[:room], "rejected_ids": rejected[:room]}


def image_tokens_cut(full: dict, ids: dict, image_token: int | None, max_length: int | None) -> InvalidRow | None:
    """The `image_truncated` error when truncation (`full` → `ids`) removed any image token, else None: a model
    cannot take an image with part of its tokens (the reference documentation's advice: max_length None)."""
    if image_token is None:
        return None

    def count(pair: dict) -> int:
        return sum(
            token == image_token for name in ("prompt_ids", "chosen_ids", "rejected_ids") for token in pair[name]
        )

    before, after = count(full), count(ids)
    if after == before:
        return None
    return InvalidRow(
        "image_truncated",
        f"max_length={max_length} would cut {before - after} of the row's {before} image "
        "tokens; set max_length to null (tokenize.max_length: null, or "
        "DPOConfig(max_length=None)) or raise it above the row's length "
        f"({len(full['prompt_ids']) + max(len(full['chosen_ids']), len(full['rejected_ids']))} tokens)",
    )


def tokenize_records(
    pair_tokenizer: PairTokenizer, records: list[dict], max_length: int | None, mode: str
) -> list[dict]:
    """Normalized Parquet records → one outcome per record: ids, or the rule that dropped it, + counts."""
    rows = [decoded_row(record) for record in records]
    outcomes = []
    for row, encoded in zip(rows, pair_tokenizer.encode(rows)):
        if isinstance(encoded, InvalidRow):
            outcomes.append({"row_id": row["row_id"], "invalid": encoded})
            continue
        full, moved = encoded
        ids = truncate_pair(full, max_length, mode, pair_tokenizer.bos_id)
        bad = image_tokens_cut(full, ids, pair_tokenizer.image_token_id, max_length)
        if bad is not None:
            outcomes.append({"row_id": row["row_id"], "invalid": bad})
            continue
        cut = {name: len(full[f"{name}_ids"]) - len(ids[f"{name}_ids"]) for name in ("prompt", "chosen", "rejected")}
        outcomes.append(
            {
                "row_id": row["row_id"],
                "ids": ids,
                "moved": moved,
                "cut": cut,
                "images": row["images"],
                "emptied": [name for name in ("chosen", "rejected") if not ids[f"{name}_ids"]],
            }
        )
    return outcomes


_WORKER: dict = {}


def _worker_init(tokenizer) -> None:
    _WORKER["tokenizer"] = PairTokenizer(tokenizer)


def _worker_task(batch: pa.RecordBatch, max_length: int | None, mode: str) -> list[dict]:
    return tokenize_records(_WORKER["tokenizer"], batch.to_pylist(), max_length, mode)


def _outcome_batches(
    tokenizer, batches: Iterable[pa.RecordBatch], max_length, mode, num_proc: int | None
) -> Iterator[list[dict]]:
    """Outcomes batch by batch, in input order; with num_proc > 1 at most 2 * num_proc batches in flight."""
    if not num_proc or num_proc <= 1:
        pair_tokenizer = PairTokenizer(tokenizer)
        for batch in batches:
            yield tokenize_records(pair_tokenizer, batch.to_pylist(), max_length, mode)
        return
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with context.Pool(num_proc, initializer=_worker_init, initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_worker_task, (batch, max_length, mode)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class LengthStats:
    """Exact length statistics from a histogram: memory grows with distinct lengths, not rows."""

    def __init__(self):
        self.histogram = Counter()

    def add(self, length: int) -> None:
        self.histogram[length] += 1

    def summary(self) -> dict:
        count = sum(self.histogram.values())
        if not count:
            return {"count": 0}
        lengths = sorted(self.histogram)

        def quantile(q: float) -> int:
            rank, seen = min(count - 1, int(count * q)), 0
            for length in lengths:
                seen += self.histogram[length]
                if seen > rank:
                    return length
            return lengths[-1]

        total = sum(length * n for length, n in self.histogram.items())
        return {
            "count": count,
            "min": lengths[0],
            "max": lengths[-1],
            "mean": total / count,
            "p50": quantile(0.5),
            "p95": quantile(0.95),
        }


def tokenize_split(
    tokenizer,
    in_path: Path,
    out_path: Path,
    max_length: int | None,
    mode: str,
    batch_size: int,
    on_invalid: str = "error",
    dropped_log=None,
    num_proc: int | None = None,
    split: str = "",
) -> dict:
    """Stream one normalized split through the tokenizer in record batches; returns its report."""
    counts = Counter()
    reasons = Counter()
    lengths = {name: LengthStats() for name in ("prompt", "chosen", "rejected", "total")}
    text_tokenizer = tokenizer_of(tokenizer)
    unk_id = getattr(text_tokenizer, "unk_token_id", None)
    parquet = pq.ParquetFile(in_path)
    vision = split_has_images(parquet)
    if vision and not is_processor(tokenizer):
        raise PipelineError(
            f"{in_path}: the rows have images but the model's processing class is a tokenizer (a "
            "text-only model); use a vision-language model (model.name_or_path) whose processor has "
            "an image processor, or data without images."
        )
    schema = TOKENIZED_VISION_SCHEMA if vision else TOKENIZED_SCHEMA
    progress = tqdm(
        total=parquet.metadata.num_rows, desc=f"tokenize {split}".strip(), unit=" rows", mininterval=2, disable=None
    )
    with pq.ParquetWriter(out_path, schema) as writer, progress:
        batches = parquet.iter_batches(batch_size=batch_size)
        for outcomes in _outcome_batches(tokenizer, batches, max_length, mode, num_proc):
            records = []
            for outcome in outcomes:
                index = counts["rows_read"]
                counts["rows_read"] += 1
                bad = outcome.get("invalid")
                if bad is None and outcome["emptied"]:
                    bad = InvalidRow(
                        "emptied_by_truncation",
                        f"max_length={max_length} leaves no tokens to {' and '.join(outcome['emptied'])}",
                    )
                if bad is not None:
                    if on_invalid == "error" and bad.rule != "emptied_by_truncation":
                        raise PipelineError(
                            f"{in_path}: row {index} (row_id {outcome['row_id']}): {bad.detail} "
                            f"[rule {bad.rule}]. Fix the row, or set data.on_invalid: drop to skip "
                            "such rows (they are listed in the report)."
                        )
                    reasons[bad.rule] += 1
                    if dropped_log is not None:
                        dropped_log.add(
                            {
                                "split": split,
                                "row": index,
                                "row_id": outcome["row_id"],
                                "rule": bad.rule,
                                "detail": bad.detail,
                            }
                        )
                if outcome.get("invalid") is None:  # truncation counts include the rows it emptied
                    cut = outcome["cut"]
                    counts["rows_truncated"] += any(cut.values())
                    counts["prompts_truncated"] += cut["prompt"] > 0
                    for name in ("chosen", "rejected"):
                        counts[f"{name}_truncated"] += cut[name] > 0
                    counts["completions_truncated"] += (cut["chosen"] > 0) + (cut["rejected"] > 0)
                    counts["completions_emptied"] += len(outcome["emptied"])
                    counts["boundary_merges"] += outcome["moved"] > 0
                    counts["boundary_tokens_moved"] += outcome["moved"]
                if bad is not None:
                    continue
                ids = outcome["ids"]
                for name in ("prompt", "chosen", "rejected"):
                    lengths[name].add(len(ids[f"{name}_ids"]))
                    if unk_id is not None:
                        counts["tokens"] += len(ids[f"{name}_ids"])
                        counts["unknown_tokens"] += ids[f"{name}_ids"].count(unk_id)
                lengths["total"].add(len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(ids["rejected_ids"])))
                records.append(
                    {"row_id": outcome["row_id"], **ids, **({"images": outcome["images"]} if vision else {})}
                )
            writer.write_table(pa.Table.from_pylist(records, schema=schema))
            counts["rows_written"] += len(records)
            progress.update(len(outcomes))
    counts["rows_dropped"] = sum(reasons.values())
    if counts["rows_read"] != counts["rows_written"] + counts["rows_dropped"]:
        raise RuntimeError("internal error: tokenize counts do not add up")
    keys = (
        "rows_read",
        "rows_written",
        "rows_dropped",
        "boundary_merges",
        "boundary_tokens_moved",
        "rows_truncated",
        "prompts_truncated",
        "chosen_truncated",
        "rejected_truncated",
        "completions_truncated",
        "completions_emptied",
    )
    return {
        **{key: int(counts[key]) for key in keys},
        "dropped_by_reason": dict(sorted(reasons.items())),
        "dropped_rows_file": DROPPED_FILE,
        "lengths": {name: s.summary() for name, s in lengths.items()},
        "unknown_tokens": None
        if unk_id is None
        else {
            "token": text_tokenizer.unk_token,
            "count": int(counts["unknown_tokens"]),
            "of": int(counts["tokens"]),
            "rate": round(counts["unknown_tokens"] / counts["tokens"], 6) if counts["tokens"] else 0.0,
        },
    }


def split_has_images(parquet: pq.ParquetFile) -> bool:
    """Whether any row of a normalized split holds images (read a batch of that column at a time, up to the first)."""
    if "images" not in parquet.schema_arrow.names:
        return False
    return any(batch.column(0).null_count < batch.num_rows for batch in parquet.iter_batches(columns=["images"]))


def check_unknown_rate(report: dict, in_path: Path, max_rate: float, builtin_model: bool = False) -> None:
    """Refuse a split whose share of unknown tokens passes `max_rate`: the tokenizer does not cover the data
    (training on <unk> learns nothing about the text it replaced)."""
    unknown = report.get("unknown_tokens")
    if not unknown or unknown["rate"] <= max_rate:
        return
    own = (
        "the built-in model's word-level tokenizer covers only the built-in task's words; set model.name_or_path "
        "to a Hub model or local directory whose tokenizer covers this data"
        if builtin_model
        else "e.g. the model's own tokenizer"
    )
    raise PipelineError(
        f"{in_path}: {unknown['rate']:.1%} of the tokens ({unknown['count']} of {unknown['of']}) are "
        f"the tokenizer's unknown token {unknown['token']!r}, above tokenize.max_unknown_rate "
        f"({max_rate:g}). Use a tokenizer that covers the data ({own}), or raise "
        "tokenize.max_unknown_rate."
    )


def warn_keep_end(mode: str) -> None:
    if mode == "keep_end":
        warnings.warn(
            "truncation_mode='keep_end' is deprecated: it cuts the oldest prompt tokens, and cuts "
            "completions at their end only when they alone overflow; prefer keep_start.",
            FutureWarning,
            stacklevel=3,
        )


def tokenize_dataset(tokenizer, normalized_dir: Path, out_dir: Path, params: dict) -> dict:
    cfg = params["tokenize"]
    warn_keep_end(cfg["truncation_mode"])
    on_invalid = params["data"]["on_invalid"]
    builtin_model = params["model"]["name_or_path"] in BUILTIN_MODELS
    report = {}
    with DroppedLog(out_dir / DROPPED_FILE) as dropped_log:
        for split in SPLITS:
            in_path = normalized_dir / f"{split}.parquet"
            report[split] = tokenize_split(
                tokenizer,
                in_path,
                out_dir / f"{split}.parquet",
                cfg["max_length"],
                cfg["truncation_mode"],
                cfg["batch_size"],
                on_invalid,
                dropped_log,
                cfg.get("dataset_num_proc"),
                split,
            )
            check_unknown_rate(report[split], in_path, cfg["max_unknown_rate"], builtin_model)
    write_json(out_dir / "report.json", report)
    return report
