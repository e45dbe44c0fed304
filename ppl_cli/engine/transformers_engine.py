"""The transformers engine: a model in this process scores batches of windows, never holding [batch, seq, vocab] logits.

The decoder runs once per batch for hidden states; the LM head then runs only on the positions
that are scored, a chunk of rows at a time, with log-softmax in float32. Peak memory beyond the
weights is the decoder's activations for one batch (bounded by max_batch_tokens) plus
HEAD_CHUNK_ELEMENTS float32 logits, whatever the document length or vocabulary size. A stop the
user asks for is noticed between decoder layers and head chunks, so it takes a fraction of a window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EXIT_MODEL, EXIT_NUMERIC, PplError
from .attention import use_blocked_attention
from .base import CLASS_VALUES, TOKEN_VALUES, Engine, Job, Scored, plan_batches
from .length_probe import length_dependence, reset_position_state
from .loading import no_gradients, probe_ids

HEAD_CHUNK_ELEMENTS = 1 << 24  # logits per head chunk: 64 MiB in float32
PAD_ID = 0  # right padding is never attended to by real tokens under a causal mask


class TransformersEngine(Engine):
    name = "transformers"
    keeps = frozenset(TOKEN_VALUES)

    def __init__(
        self, model, device, max_batch_tokens: int, reference: TransformersEngine | None = None, keep: tuple[str, ...] = (), tune_memory: bool = True,
        one_window: bool = False, fresh_positions: bool = False, word_classes: torch.Tensor | None = None,
    ):  # fmt: skip
        """`reference`: a second model's engine, run on the same windows; `keep`: per-token values to
        return; `tune_memory`: set the process's allocator for speed (not in a caller's process);
        `one_window`: a batch of one window only (a model whose numbers depend on the batch);
        `fresh_positions`: batches of windows of one length, each pass's position scaling as a fresh
        model's (a model whose logits depend on the input's length: length_probe.py); `word_classes`
        [V, 3]: the word-start classes' indicators, kept as CLASS_VALUES (word_starts.py)."""
        self.one_window = one_window
        self.fresh_positions = fresh_positions
        self.word_classes = word_classes.to(device, torch.float64) if word_classes is not None else None
        self.model = model
        self.device = device
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.max_batch_tokens = max_batch_tokens
        self.reference = reference
        self.keep = keep
        self.decoder = model.base_model
        self.head = model.get_output_embeddings()
        self.check = None  # the current batch's stop check, called between layers and head chunks
        use_blocked_attention(model)  # bfloat16 on CPU only
        if device.type == "cpu" and tune_memory:
            keep_freed_memory()
        # Models that post-process logits (soft-capping, scaling) need the full forward.
        self.split_head = head_reproduces_logits(model, device)

    def plan(self, jobs: Sequence[Job]) -> list[list[int]]:
        """The batches of job indices these jobs are scored in (plan_batches under this engine's budget)."""
        return plan_batches([job.reads for job in jobs], self.max_batch_tokens, 1 if self.one_window else None, self.fresh_positions)

    def score_batch(self, jobs: list[Job], stop=None) -> list[Scored]:
        """Score one batch; on CUDA out-of-memory, score it in halves (same numbers, smaller batches)."""
        try:
            with no_gradients(self.model), self.checked(stop):
                return self.forward(jobs)
        except torch.OutOfMemoryError:
            if len(jobs) == 1:
                raise PplError("out of memory scoring a single window; lower --window", EXIT_MODEL) from None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(jobs) // 2
            self.max_batch_tokens = max(1, self.max_batch_tokens // 2)
            return self.score_batch(jobs[:half], stop) + self.score_batch(jobs[half:], stop)

    @contextlib.contextmanager
    def checked(self, stop) -> Iterator[None]:
        """While a batch runs, stop.check() before every decoder layer (of this model and the
        reference's) and every head chunk: a stop takes one layer's time, not a window's."""
        if stop is None:
            yield
            return
        handles = [layer.register_forward_pre_hook(lambda *_: stop.check()) for layer in decoder_layers(self.model)]
        if self.reference is not None:
            handles += [layer.register_forward_pre_hook(lambda *_: stop.check()) for layer in decoder_layers(self.reference.model)]
        self.check = stop.check
        try:
            yield
        finally:
            self.check = None
            for handle in handles:
                handle.remove()

    def length_dependence(self, shortest: int, longest: int) -> str | None:
        return length_dependence(self.model, self.device, shortest, longest)

    def vocab_size(self) -> int:
        return self.head.weight.shape[0]

    def forward(self, jobs: list[Job]) -> list[Scored]:
        if self.fresh_positions:
            reset_position_state(self.model)
        width = max(job.reads for job in jobs)
        inputs = torch.full((len(jobs), width), PAD_ID, dtype=torch.long)
        rows, targets, owner = [], [], []
        for b, job in enumerate(jobs):
            m = len(job.tokens)
            inputs[b, : job.reads] = job.tokens[: job.reads]
            # Position p predicts token p + 1: scored tokens [context, m) come from [context - 1, m - 1).
            rows.append(torch.arange(b * width + job.context - 1, b * width + m - 1))
            targets.append(job.tokens[job.context :])
            owner.append(torch.full((m - job.context,), b))
        tails = [b for b, job in enumerate(jobs) if job.tail]  # their last position's row follows every scored row
        rows.append(torch.tensor([b * width + len(jobs[b].tokens) - 1 for b in tails], dtype=torch.long))
        targets.append(torch.zeros(len(tails), dtype=torch.long))  # no token follows: a placeholder target
        inputs = inputs.to(self.device, non_blocking=True)
        rows = torch.cat(rows).to(self.device)
        targets = torch.cat(targets).to(self.device)
        owner = torch.cat(owner).to(self.device)
        values = {name: v.to(self.device) for name, v in self.token_values(inputs, rows, targets).items()}  # name -> [N + tails]
        scored_rows = len(owner)
        after = {name: values[name][scored_rows:].tolist() for name in CLASS_VALUES if name in values}
        values = {name: v[:scored_rows] for name, v in values.items()}
        targets = targets[:scored_rows]
        for name in ("nll", "kld"):
            if name in values and not torch.isfinite(values[name]).all():
                raise PplError(
                    f"non-finite log-probability in {str(next(self.model.parameters()).dtype).removeprefix('torch.')}"
                    " (overflow?); rerun with --dtype float32",
                    EXIT_NUMERIC,
                )
        columns = summed_columns(values)
        sums = torch.zeros(len(jobs), len(columns), dtype=torch.float64, device=rows.device)  # [B, K]
        sums.index_add_(0, owner, torch.stack(list(columns.values()), dim=1))
        per_job = [dict(zip(columns, row)) for row in sums.tolist()]
        tail = {b: {name: column[k] for name, column in after.items()} for k, b in enumerate(tails)}
        if not self.keep:
            return [Scored(s, None, tail.get(b)) for b, s in enumerate(per_job)]
        counts = [job.scored for job in jobs]
        kept = {name: values[name].cpu().numpy() for name in self.keep}
        kept["token_id"] = targets.cpu().numpy()
        bounds = np.cumsum([0, *counts])
        return [Scored(s, {k: v[bounds[b] : bounds[b + 1]] for k, v in kept.items()}, tail.get(b)) for b, s in enumerate(per_job)]

    def positions(self, inputs: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.nn.Module | None]:
        """Decoder hidden states [N, H] at the scored rows and the LM head, or (models whose logits
        are not lm_head(hidden)) the logits [N, V] and None."""
        if self.split_head:
            hidden = self.decoder(input_ids=inputs, use_cache=False).last_hidden_state  # [B, width, H], on the last layer's device
            return hidden.reshape(-1, hidden.shape[-1])[rows.to(hidden.device)], self.head
        logits = self.model(input_ids=inputs, use_cache=False).logits  # [B, width, V]
        return logits.reshape(-1, logits.shape[-1])[rows.to(logits.device)], None

    def token_values(self, inputs, rows, targets) -> dict[str, torch.Tensor]:
        hidden, head = self.positions(inputs, rows)
        if self.reference is None and set(self.keep) <= {"nll"} and self.word_classes is None:
            return {"nll": token_nll(hidden, targets, head, self.check)}
        reference = None
        if self.reference is not None:
            ref = self.reference
            reference = ref.positions(inputs.to(ref.device), rows.to(ref.device))
        return token_details(hidden, targets, head, reference, wanted=self.keep, classes=self.word_classes, check=self.check)


def summed_columns(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-token columns whose sums a document row keeps (float64), so that documents, shards
    and ranks add up exactly to the corpus statistics."""
    nll = values["nll"].double()
    columns = {"nll_sum": nll, "nll_sq_sum": nll * nll}
    if "kld" in values:
        ref_nll, kld, delta_p = values["ref_nll"].double(), values["kld"].double(), values["delta_p"].double()
        columns.update(
            ref_nll_sum=ref_nll,
            ref_nll_sq_sum=ref_nll * ref_nll,
            nll_ref_nll_sum=nll * ref_nll,
            kld_sum=kld,
            kld_sq_sum=kld * kld,
            same_top=values["same_top"].double(),
            delta_p_sum=delta_p,
            delta_p_sq_sum=delta_p * delta_p,
            delta_p_4_sum=delta_p**4,
        )
    return columns


def token_nll(rows: torch.Tensor, targets: torch.Tensor, head, check: Callable[[], None] | None = None) -> torch.Tensor:
    """Per-token NLL [N] in float32 from hidden states [N, H] (through head) or logits [N, V];
    `check` runs before each chunk."""
    vocab = head.weight.shape[0] if head is not None else rows.shape[-1]
    chunk = max(1, HEAD_CHUNK_ELEMENTS // vocab)
    out = torch.empty(len(targets), dtype=torch.float32, device=rows.device)
    for start in range(0, len(targets), chunk):
        if check is not None:
            check()
        part = rows[start : start + chunk]
        logits = (head(part) if head is not None else part).float()  # [chunk, V], where the head lives
        out[start : start + chunk] = F.cross_entropy(logits, targets[start : start + chunk].to(logits.device), reduction="none")
    return out


def token_details(
    rows, targets, head, reference=None, wanted: Sequence[str] = (), classes: torch.Tensor | None = None, check: Callable[[], None] | None = None
) -> dict[str, torch.Tensor]:
    """Per-token values [N] from Q's hidden states (or logits) and, when given, the reference model
    P's (rows, head), a chunk of rows at a time so no [N, V] tensor is held. The NLL equals
    token_nll's bit for bit (log-softmax, then the target's entry, as cross_entropy computes it),
    but with `classes`, where it is computed in float64 as they are.

    z (Min-K%++): mu = sum_v q(v) log q(v) and sigma^2 = sum_v q(v) (log q(v) - mu)^2, the variance
    taken about the mean (the same quantity as E[(log q)^2] - mu^2, without its cancellation in
    float32); z is 0 where the distribution is a point mass (sigma = 0).

    With `classes` [V, 3] (0/1 indicators), each class's log-probability: log sum_v q(v) c(v),
    computed (and the NLL with it) in float64 from the float32 logits.
    `check` runs before each chunk."""
    vocab = head.weight.shape[0] if head is not None else rows.shape[-1]
    if reference is not None:
        ref_rows, ref_head = reference
        ref_vocab = ref_head.weight.shape[0] if ref_head is not None else ref_rows.shape[-1]
        if ref_vocab != vocab:
            raise PplError(f"the models' vocabularies differ in size ({vocab} vs {ref_vocab} for the reference)", EXIT_MODEL)
    # [c, V] float32 tensors held at once: logits and log q, P's with a reference, one for z, the float64 log q for the classes
    chunk = max(1, HEAD_CHUNK_ELEMENTS // vocab // ((3 if reference is not None else 2) + ("z" in wanted) + 2 * (classes is not None)))
    names = ["nll", *(n for n in ("entropy", "rank", "z") if n in wanted)] + (["ref_nll", "kld", "same_top", "delta_p"] if reference else [])
    names += list(CLASS_VALUES) if classes is not None else []
    out = {name: torch.empty(len(targets), dtype=torch.float32, device=rows.device) for name in names}
    for start in range(0, len(targets), chunk):
        if check is not None:
            check()
        part = slice(start, start + chunk)
        logits = (head(rows[part]) if head is not None else rows[part]).float()  # [c, V], where the head lives
        target = targets[part].unsqueeze(1).to(logits.device)  # [c, 1]
        if classes is not None:  # words: each log-probability and class mass to 1e-7 nats (float32 sums of 1e4-1e5 terms drift by 1e-5 to 1e-4)
            exact = logits.double()
            exact = exact.sub_(torch.logsumexp(exact, -1, keepdim=True))  # [c, V]: log q in float64
            out["nll"][part] = -exact.gather(1, target)[:, 0]
            out_classes = (exact.exp_() @ classes.to(exact.device, torch.float64)).log()  # [c, 3]
            del exact
            for k, name in enumerate(CLASS_VALUES):
                out[name][part] = out_classes[:, k]
            if set(out) <= {"nll", *CLASS_VALUES}:
                continue
        logq = F.log_softmax(logits, dim=-1)
        del logits
        own = logq.gather(1, target)  # [c, 1]
        if classes is None:
            out["nll"][part] = -own[:, 0]
        q = logq.exp() if "entropy" in out or "z" in out else None  # [c, V]
        if "entropy" in out or "z" in out:
            mu = (q * logq).sum(-1)  # [c], minus the entropy
            if "entropy" in out:
                out["entropy"][part] = -mu
            if "z" in out:
                spread = (logq - mu[:, None]).square_().mul_(q)  # [c, V], in place: one more [c, V] held
                sigma = spread.sum(-1).sqrt()  # [c]
                out["z"][part] = torch.where(sigma > 0, (own[:, 0] - mu) / sigma, 0.0)
        if "rank" in out:
            out["rank"][part] = (logq > own).sum(-1) + 1
        if reference is not None:
            ref_part = ref_rows[part.start : part.stop]
            ref_logits = ref_head(ref_part) if ref_head is not None else ref_part
            logp = F.log_softmax(ref_logits.float().to(logq.device), dim=-1)  # [c, V]
            ref_own = logp.gather(1, target)[:, 0]
            out["ref_nll"][part] = -ref_own
            out["kld"][part] = (logp.exp() * (logp - logq)).sum(-1)  # KL(P || Q), nats
            out["same_top"][part] = (logp.argmax(-1) == logq.argmax(-1)).float()
            out["delta_p"][part] = own[:, 0].exp() - ref_own.exp()
    return out


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder's blocks: the children of the model's longest ModuleList (layers, h, blocks)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def keep_freed_memory() -> None:
    """Make glibc reuse freed activation buffers instead of returning them to the OS.

    By default every buffer over 128 KiB is a fresh mmap, zero-filled page by page on first touch
    and unmapped when freed: each forward pass pays those page faults again. Serving large
    buffers from the heap and never trimming it measured 6% faster in float32 and 9% in bfloat16
    (SmolLM2-135M, 1024-token windows, 2 cores). The heap keeps its peak size until exit.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 31)


def head_reproduces_logits(model, device) -> bool:
    """True when lm_head(decoder hidden states) equals the model's own logits on a probe input."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(model, "base_model") or model.base_model is model:
        return False
    vocab = head.weight.shape[0]
    probe = probe_ids(vocab, device)
    with no_gradients(model):
        try:
            hidden = model.base_model(input_ids=probe, use_cache=False).last_hidden_state
        except Exception:  # a model whose base takes other inputs: use the full forward
            return False
        split = head(hidden).float()
        full = model(input_ids=probe, use_cache=False).logits.float()
    return split.shape == full.shape and torch.allclose(split, full, rtol=1e-4, atol=1e-4)
