"""Supervised fine-tuning (SFT) of causal language models on prompts and responses or chats.

Rows come in the three common shapes (any file format raypipe reads):

* ``prompt`` + ``response`` (``completion`` / ``output`` are accepted for the response),
* Alpaca: ``instruction`` + ``input`` (optional, may be empty) + ``output`` — the user turn is the
  instruction, followed by a blank line and the input when there is one,
* chat: ``messages``, a list of ``{"role": system|user|assistant, "content": str}`` whose last
  turn is the assistant's.

An example is a conversation: ``messages`` (every turn before the last assistant turn) and
``label`` (the last assistant turn, the reference for exact match / ROUGE-L). It is rendered
with the tokenizer's chat template; a tokenizer without one gets :data:`DEFAULT_CHAT_TEMPLATE`
(``<|role|>\\ncontent<eos>\\n`` turns), which is stored with the checkpoint's tokenizer so that
serving renders prompts exactly as training did.

Tokens and labels. For each assistant turn the conversation before it is rendered with the
generation prompt (``P``) and with the turn (``F``); ``F`` must start with ``P`` (else the
template is not usable for SFT: an error). The prompt pieces and the response pieces are
tokenised separately and concatenated, so the prompt is tokenised as it will be at generation
time; labels are -100 everywhere except on the response tokens (which include the template's
end-of-turn token, so the model learns to stop). The loss is the model's own shifted
cross-entropy, a mean over response tokens; validation loss and perplexity are per response
token over the whole split.

Packing (``data.packing``): examples are packed greedily into rows of ``max_length`` tokens;
each example's ``position_ids`` restart at 0 and no attention mask is passed, which transformers
(>= 4.x masking utils) turns into a block-diagonal causal mask: attention stays inside each
example and packed logits equal unpacked ones (tests/test_sft.py checks it to 1e-5).
Without packing, rows are padded and batches are grouped by length (``train.length_grouping``).

Bad rows (no response, an unknown role, empty content, a prompt that leaves no room for any
response token within ``max_length``) are errors naming the file and row; ``data.bad_rows: skip``
drops them with a warning instead (Alpaca has 4 records with empty outputs, and prompts longer
than a small ``max_length``).

Held-out evaluation also generates (greedy) answers for a fixed sample of
``data.generation_samples`` test prompts and scores them with exact match and ROUGE-L (LCS on
whitespace tokens, F-measure); the table (prompt, reference, generation, scores) goes to MLflow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field

from raypipe.errors import DataError
from raypipe.tasks import Scores

log = logging.getLogger("raypipe.data")

ROLES = ("system", "user", "assistant")
IGNORE = -100

# Used when a tokenizer has no chat template. One turn per message; the assistant turn ends
# with the tokenizer's eos token, so a model trained on it stops by itself.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + (eos_token or '') + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class SFTPrediction(BaseModel):
    generation: str = Field(description="The model's answer to the prompt (greedy unless options say otherwise).")


# --------------------------------------------------------------------------- rows


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def conversation_of(row: Mapping[str, Any], columns: Sequence[str]) -> tuple[list[dict[str, str]], str]:
    """(turns before the final assistant turn, the final assistant turn) of one raw row;
    ValueError says what is wrong with it."""
    if "messages" in columns and not _missing(row.get("messages")):
        msgs = row["messages"]
        if hasattr(msgs, "tolist"):
            msgs = msgs.tolist()
        if not isinstance(msgs, (list, tuple)) or not msgs:
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
        turns = []
        for k, m in enumerate(msgs):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ValueError(f"message {k + 1} is not a {{role, content}} object")
            role, content = m["role"], m["content"]
            if role not in ROLES:
                raise ValueError(f"message {k + 1} has unknown role {role!r} (use {', '.join(ROLES)})")
            if not isinstance(content, str) or not content.strip():
                raise ValueError(f"message {k + 1} ({role}) has empty content")
            turns.append({"role": str(role), "content": content})
        if turns[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's (the response to learn)")
        if not any(t["role"] == "user" for t in turns):
            raise ValueError("no user message")
        return turns[:-1], turns[-1]["content"]
    if "instruction" in columns:
        instruction = _str(row.get("instruction"))
        extra = row.get("input")
        extra = extra if isinstance(extra, str) else ""
        if not instruction or not instruction.strip():
            raise ValueError("empty instruction")
        prompt = instruction.strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
        response = row.get("output")
    else:
        prompt = _str(row.get("prompt"))
        if not prompt or not prompt.strip():
            raise ValueError("empty prompt")
        response = next((row.get(c) for c in ("response", "completion", "output") if c in columns), None)
    if not isinstance(response, str) or not response.strip():
        raise ValueError("no response (empty or missing)")
    return [{"role": "user", "content": prompt}], response


def _shape(columns: Sequence[str]) -> str | None:
    if "messages" in columns:
        return "messages"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if "prompt" in columns and any(c in columns for c in ("response", "completion", "output")):
        return "prompt"
    return None


# --------------------------------------------------------------------------- templates and tokens


def chat_template(tokenizer: Any) -> str:
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def prepare_tokenizer(tokenizer: Any) -> None:
    """Give a tokenizer without a chat template the default one (it is saved with the model),
    and a pad token when it has none."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=chat_template(tokenizer), tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def tokens_and_labels(tokenizer: Any, messages: list[dict[str, str]], response: str) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and its labels (-100 but on every assistant turn).

    ValueError when the template breaks the prefix property (the conversation rendered up to a
    turn is not a prefix of it rendered with the turn)."""
    turns = [*messages, {"role": "assistant", "content": response}]
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # text rendered so far
    for k, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prompt = render(tokenizer, turns[:k], generation_prompt=True)
        full = render(tokenizer, turns[: k + 1], generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the chat template does not render each turn as a prefix of the next one, "
                             "so the response tokens cannot be told apart; use a template that does")
        head = _ids(tokenizer, prompt[len(done):])
        answer = _ids(tokenizer, full[len(prompt):])
        ids += head + answer
        labels += [IGNORE] * len(head) + answer
        done = full
    tail = render(tokenizer, turns, generation_prompt=False)[len(done):]
    if tail:  # text a template adds after the last turn (rare): context, not learned
        more = _ids(tokenizer, tail)
        ids += more
        labels += [IGNORE] * len(more)
    return ids, labels


def prompt_ids(tokenizer: Any, prompt: str | list[dict[str, str]]) -> list[int]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return _ids(tokenizer, render(tokenizer, messages, generation_prompt=True))


def _fit(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]] | None:
    """Cut to ``max_length``; None when no response token would remain."""
    ids, labels = ids[:max_length], labels[:max_length]
    return (ids, labels) if any(x != IGNORE for x in labels[1:]) else None


def pack(sequences: list[tuple[list[int], list[int]]], max_length: int) -> list[list[int]]:
    """Greedy first-fit in order: which sequences share each row."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i, (ids, _) in enumerate(sequences):
        for r, n in enumerate(used):
            if n + len(ids) <= max_length:
                rows[r].append(i)
                used[r] += len(ids)
                break
        else:
            rows.append([i])
            used.append(len(ids))
    return rows


# --------------------------------------------------------------------------- metrics


def lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference: str, generation: str) -> float:
    """ROUGE-L F-measure on lower-cased whitespace tokens (1.0 for two empty texts)."""
    ref, gen = reference.lower().split(), generation.lower().split()
    if not ref and not gen:
        return 1.0
    common = lcs(ref, gen)
    if common == 0:
        return 0.0
    p, r = common / len(gen), common / len(ref)
    return 2 * p * r / (p + r)


def exact_match(reference: str, generation: str) -> float:
    """1.0 when the texts are equal up to surrounding and repeated whitespace."""
    return float(" ".join(reference.split()) == " ".join(generation.split()))


class SFTAccumulator:
    """Summed next-token loss and count over response tokens (the split's per-token loss)."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.tokens = 0

    def update(self, logits: Any, rows: Mapping[str, Any]) -> None:
        import torch

        width = logits.shape[1]
        labels = torch.as_tensor(rows["labels"][:, :width].astype("int64"), device=logits.device)
        shift_logits = logits[:, :-1, :].float()
        shift_labels = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                 shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
        self.nll += float(loss)
        self.tokens += int((shift_labels != IGNORE).sum())

    def compute(self, loss: float, gather: Any) -> Scores:
        import numpy as np

        both = gather(np.array([[self.nll, float(self.tokens)]], dtype=np.float64)).sum(axis=0)
        mean = float(both[0] / both[1]) if both[1] else float("nan")
        return Scores(metrics={"loss": mean, "perplexity": float(math.exp(min(mean, 50.0)))},
                      details={"response_tokens": int(both[1])})


# --------------------------------------------------------------------------- the task


class SFTTask:
    name = "sft"
    metrics = {"loss": "min", "perplexity": "min", "exact_match": "max", "rouge_l": "max"}
    # what the training loop reports per epoch (exact match / ROUGE-L need generation: held-out only)
    epoch_metrics = ("loss", "perplexity")
    default_metric = "loss"
    model_class = "AutoModelForCausalLM"
    schema_keys = ("max_new_tokens",)
    input_keys = ("input_ids", "attention_mask", "position_ids", "labels")
    sequence_keys = ("input_ids", "attention_mask", "position_ids", "labels")
    prediction_model = SFTPrediction
    default_peft = True  # LoRA unless `model.peft: false`
    input_column = "prompt"  # the pyfunc's input column

    # --- data ---------------------------------------------------------------------------

    def examples(self, raw: Any, where: str, cfg: Any) -> Any:
        import pandas as pd

        columns = [str(c) for c in raw.columns]
        if _shape(columns) is None:
            raise DataError(
                f"{where}: task sft needs 'prompt' + 'response', Alpaca 'instruction' + 'input' + 'output', "
                f"or chat 'messages' columns; it has {columns}"
            )
        if raw.empty:
            raise DataError(f"{where}: no rows")
        messages, labels, rows, skipped = [], [], [], []
        for i, row in enumerate(raw.to_dict("records")):
            try:
                turns, response = conversation_of(row, columns)
            except ValueError as exc:
                if getattr(cfg, "bad_rows", "error") != "skip":
                    raise DataError.at(where, [i], str(exc)) from None
                skipped.append(f"row {i + 1}: {exc}")
                continue
            messages.append(turns)
            labels.append(response)
            rows.append(i + 1)
        if skipped:
            log.warning("%s: skipped %d bad row(s) (data.bad_rows: skip), e.g. %s", where, len(skipped), skipped[0])
        if not rows:
            raise DataError(f"{where}: no usable rows")
        return pd.DataFrame({"messages": messages, "label": labels, "row": rows, "source": [where] * len(rows)})

    def schema(self, train: Any, cfg: Any) -> dict[str, Any]:
        return {"inputs": "chat", "packing": bool(cfg.packing), "max_new_tokens": int(cfg.max_new_tokens),
                "generation_samples": int(cfg.generation_samples), "bad_rows": cfg.bad_rows}

    def check(self, frame: Any, schema: Mapping[str, Any], role: str, where: str) -> None:
        return None

    def stratify_key(self, frame: Any) -> Any:
        return None

    def encode(self, tokenizer: Any, frame: Any, schema: Mapping[str, Any], max_length: int) -> dict[str, Any]:
        import numpy as np

        sequences, too_long = [], []
        for msgs, response, row, source in zip(frame["messages"], frame["label"],
                                                frame.get("row", range(1, len(frame) + 1)),
                                                frame.get("source", ["data"] * len(frame))):
            msgs = [dict(m) for m in (msgs.tolist() if hasattr(msgs, "tolist") else msgs)]
            try:
                ids, labels = tokens_and_labels(tokenizer, msgs, response)
            except ValueError as exc:
                raise DataError(f"{source}: row {row}: {exc}") from None
            fitted = _fit(ids, labels, max_length)
            if fitted is None and schema.get("bad_rows") == "skip":
                too_long.append(f"{source}: row {row}")
                continue
            if fitted is None:
                raise DataError(f"{source}: row {row}: the prompt takes {sum(1 for x in labels if x == IGNORE)} "
                                f"tokens, leaving no response token within data.max_length={max_length}")
            sequences.append(fitted)
        if too_long:
            log.warning("skipped %d example(s) whose prompt leaves no response token within max_length=%d "
                        "(data.bad_rows: skip), e.g. %s", len(too_long), max_length, too_long[0])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        groups = pack(sequences, max_length) if schema.get("packing") else [[i] for i in range(len(sequences))]
        n = len(groups)
        out = {
            "input_ids": np.full((n, max_length), pad, dtype=np.int32),
            "labels": np.full((n, max_length), IGNORE, dtype=np.int32),
            "length": np.zeros(n, dtype=np.int32),
        }
        if schema.get("packing"):
            out["position_ids"] = np.tile(np.arange(max_length, dtype=np.int32), (n, 1))
        else:
            out["attention_mask"] = np.zeros((n, max_length), dtype=np.int32)
        for r, group in enumerate(groups):
            at = 0
            for i in group:
                ids, labels = sequences[i]
                k = len(ids)
                out["input_ids"][r, at:at + k] = ids
                out["labels"][r, at:at + k] = labels
                if "position_ids" in out:
                    out["position_ids"][r, at:at + k] = np.arange(k)
                at += k
            out["length"][r] = at
            if "position_ids" in out:  # padding is a segment of its own (positions restart)
                out["position_ids"][r, at:] = np.arange(max_length - at)
            else:
                out["attention_mask"][r, :at] = 1
        return out

    # --- model and metrics --------------------------------------------------------------

    def model_kwargs(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def prepare(self, model: Any, tokenizer: Any) -> None:
        """After loading: the chat template on the tokenizer, and no KV cache in forward passes
        (a cache turns off transformers' packed-sequence masks; ``generate`` asks for one)."""
        prepare_tokenizer(tokenizer)
        config = getattr(model, "config", None)
        if config is not None:
            config.use_cache = False
        if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id

    def accumulator(self, schema: Mapping[str, Any], *, fit: bool) -> SFTAccumulator:
        return SFTAccumulator()

    def held_out(self, predictor: Any, frame: Any, scores: Scores) -> Scores:
        """Held-out evaluation's extra: greedy generations for a fixed sample of prompts, scored
        with exact match and ROUGE-L (a table of them in ``details["tables"]``)."""
        import numpy as np

        n = min(int(predictor.schema.get("generation_samples", 16)), len(frame))
        if n == 0:
            return scores
        pick = np.sort(np.random.default_rng(0).permutation(len(frame))[:n])
        sample = frame.iloc[pick]
        prompts = self.inputs_of(sample)
        answers = predictor.predict(prompts, batch_size=8)
        refs = list(sample["label"])
        gens = [a["generation"] for a in answers]
        em = [exact_match(r, g) for r, g in zip(refs, gens)]
        rl = [rouge_l(r, g) for r, g in zip(refs, gens)]
        table = {
            "prompt": [render_prompt_text(p) for p in prompts],
            "reference": refs,
            "generation": gens,
            "exact_match": em,
            "rouge_l": [round(x, 4) for x in rl],
        }
        metrics = {**scores.metrics, "exact_match": float(np.mean(em)), "rouge_l": float(np.mean(rl))}
        details = {**scores.details, "generation_samples": n, "tables": {"generations.json": table}}
        return Scores(metrics=metrics, details=details, schema_update=scores.schema_update)

    # --- prediction ---------------------------------------------------------------------

    def inputs_of(self, frame: Any) -> list[Any]:
        """Prompts: the text of a single user turn, else the turns before the response."""
        out: list[Any] = []
        for msgs in frame["messages"]:
            msgs = [dict(m) for m in (msgs.tolist() if hasattr(msgs, "tolist") else msgs)]
            out.append(msgs[0]["content"] if len(msgs) == 1 and msgs[0]["role"] == "user" else msgs)
        return out

    def check_inputs(self, inputs: Sequence[Any], schema: Mapping[str, Any]) -> list[Any]:
        if isinstance(inputs, str):
            raise DataError("pass a list of prompts, not a single string")
        out: list[Any] = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                if not item.strip():
                    raise DataError(f"prompt {i} is empty or whitespace only")
                out.append(item)
                continue
            if hasattr(item, "tolist"):
                item = item.tolist()
            if not isinstance(item, (list, tuple)) or not item:
                raise DataError(f"prompt {i} is {type(item).__name__}: pass a string or a list of "
                                "{role, content} messages")
            try:
                turns, _ = conversation_of({"messages": [*item, {"role": "assistant", "content": "x"}]}, ["messages"])
            except ValueError as exc:
                raise DataError(f"prompt {i}: {exc}") from None
            out.append(turns)
        if not out:
            raise DataError("no prompts given")
        return out

    def predict(self, model: Any, tokenizer: Any, inputs: Sequence[Any], schema: Mapping[str, Any], *,
                max_length: int, batch_size: int, max_new_tokens: int | None = None,
                **_: Any) -> list[dict[str, Any]]:
        import torch

        prepare_tokenizer(tokenizer)
        new = int(max_new_tokens or schema.get("max_new_tokens") or 128)
        encoded = [prompt_ids(tokenizer, p)[-max_length:] for p in inputs]  # keep the prompt's end
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out: list[str] = [""] * len(encoded)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):  # left padding: every prompt ends where generation starts
                    ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                    mask[r, width - len(encoded[i]):] = 1
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=new, pad_token_id=pad, use_cache=True)
                for r, i in enumerate(idx):
                    out[i] = tokenizer.decode(gen[r, width:], skip_special_tokens=True).strip()
        return [{"generation": g} for g in out]

    # --- people -------------------------------------------------------------------------

    def report(self, scores: Scores, schema: Mapping[str, Any]) -> list[str]:
        m = scores.metrics
        lines = [f"  loss {m.get('loss', float('nan')):.4f} per response token   "
                 f"perplexity {m.get('perplexity', float('nan')):.2f}"]
        if "exact_match" in m:
            lines.append(f"  on {scores.details.get('generation_samples', '?')} generated answers: exact match "
                         f"{m['exact_match']:.3f}   ROUGE-L {m['rouge_l']:.3f}")
        return lines

    def figures(self, scores: Scores, schema: Mapping[str, Any], title: str) -> dict[str, Any]:
        return {}

    def describe(self, prediction: Mapping[str, Any], schema: Mapping[str, Any]) -> str:
        text = " ".join(str(prediction["generation"]).split())
        return text if len(text) <= 60 else text[:57] + "..."

    def judge(self, target: Any, prediction: Mapping[str, Any], schema: Mapping[str, Any]) -> tuple[str, bool]:
        text = " ".join(str(target).split())
        return (text if len(text) <= 60 else text[:57] + "..."), bool(exact_match(str(target), prediction["generation"]))


def render_prompt_text(prompt: Any) -> str:
    """A prompt for tables: the text, or a chat's turns as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
