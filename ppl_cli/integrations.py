"""Training-loop integrations: a transformers TrainerCallback that scores a held-out corpus as training goes.

    trainer = Trainer(..., callbacks=[PerplexityCallback("heldout.jsonl", every=500)])

Every `every` steps, and when training ends, the model being trained is scored in memory on the
corpus (ppl_cli.evaluate with the trainer's model and tokenizer; its training state is left as it
was) and the metrics are logged through the Trainer's own logging, as `eval_loss` is, so every
integration the Trainer reports to (W&B, TensorBoard, MLflow) receives them:

    heldout_loss             the mean NLL per scored token, in nats (the `eval_loss` of a causal LM)
    heldout_perplexity       exp(heldout_loss), the corpus token perplexity
    heldout_bits_per_byte    bits per byte

Under multi-GPU training every rank scores its share of the documents, as under torchrun, and the
main process logs. The Trainer is found when it calls the callback (or pass `trainer=`).

The tokenizer is `tokenizer=`, else the Trainer's `processing_class`, else the one saved with the
model (`model.name_or_path`); without any, the callback says so once when training begins and
logs nothing. A monitoring callback never ends the training it watches: an evaluation that fails
(a bad file, out of memory) is logged as a warning and training goes on.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

from transformers import Trainer, TrainerCallback

from .config import Config
from .errors import first_line

logger = logging.getLogger(__name__)


class PerplexityCallback(TrainerCallback):
    def __init__(
        self, data: str | tuple[str, ...], every: int = 500, prefix: str = "heldout", trainer: Trainer | None = None, tokenizer: Any = None,
        **options: Any,
    ):  # fmt: skip
        """`data`: the held-out corpus (any --data); `tokenizer`: the model's (default: found, see
        above); `options`: the other Config fields (window, limit, ...)."""
        if every < 1:
            raise ValueError("every must be at least 1 step")
        self.config = Config(data=data, bootstrap_samples=0, **options)
        self.every, self.prefix, self.trainer, self.tokenizer = every, prefix, trainer, tokenizer
        self.last_scored: int | None = None
        self.disabled = False

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.tokenizer = self.tokenizer or processing_class or saved_tokenizer(model)
        if self.tokenizer is None:
            self.disabled = True
            logger.warning(
                "PerplexityCallback: no tokenizer for this model (none given, the Trainer has no processing_class, and"
                " %r has none saved): %s_perplexity will not be logged; pass PerplexityCallback(..., tokenizer=tokenizer)",
                getattr(model, "name_or_path", None) or type(model).__name__, self.prefix,
            )  # fmt: skip

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.score(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.last_scored != state.global_step:
            self.score(args, state, model)

    def score(self, args, state, model) -> dict:
        """The held-out metrics at this step, logged; {} when there is no tokenizer or the evaluation fails."""
        from .pipeline import evaluate

        if self.disabled:
            return {}
        self.last_scored = state.global_step
        try:
            summary = evaluate(self.config, model=model, tokenizer=self.tokenizer).summary
        except Exception as e:  # noqa: BLE001 - a failed evaluation must not end the training it watches
            logger.warning("PerplexityCallback: the %s evaluation at step %d failed, training goes on: %s", self.prefix, state.global_step, first_line(e))
            return {}
        nll_per_token = summary["nll_sum"] / summary["tokens"] if summary["tokens"] else math.nan
        metrics = {
            f"{self.prefix}_loss": nll_per_token,
            f"{self.prefix}_perplexity": summary["token_perplexity"],
            f"{self.prefix}_bits_per_byte": summary["bits_per_byte"],
        }
        trainer = self.trainer or calling_trainer()
        if trainer is not None:
            trainer.log(dict(metrics))
        else:  # not called by a Trainer: the history still has them
            state.log_history.append({**metrics, "step": state.global_step})
        return metrics


def saved_tokenizer(model):
    """The tokenizer saved with the model (its name_or_path: a folder or a hub id), or None."""
    name = getattr(model, "name_or_path", None)
    if not name:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception:  # noqa: BLE001 - no tokenizer there: the caller says so
        return None


def calling_trainer() -> Trainer | None:
    """The Trainer whose method is calling this callback, from the call stack."""
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None
