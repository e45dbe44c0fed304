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
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from transformers import Trainer, TrainerCallback

from .config import Config


class PerplexityCallback(TrainerCallback):
    def __init__(self, data: str | tuple[str, ...], every: int = 500, prefix: str = "heldout", trainer: Trainer | None = None, **options: Any):
        """`data`: the held-out corpus (any --data); `options`: the other Config fields (window, limit, ...)."""
        if every < 1:
            raise ValueError("every must be at least 1 step")
        self.config = Config(data=data, bootstrap_samples=0, **options)
        self.every, self.prefix, self.trainer = every, prefix, trainer
        self.last_scored: int | None = None

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.every == 0:
            self.score(args, state, model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.last_scored != state.global_step:
            self.score(args, state, model, processing_class)

    def score(self, args, state, model, tokenizer) -> dict:
        from .pipeline import evaluate

        summary = evaluate(self.config, model=model, tokenizer=tokenizer).summary
        nll_per_token = summary["nll_sum"] / summary["tokens"] if summary["tokens"] else math.nan
        metrics = {
            f"{self.prefix}_loss": nll_per_token,
            f"{self.prefix}_perplexity": summary["token_perplexity"],
            f"{self.prefix}_bits_per_byte": summary["bits_per_byte"],
        }
        self.last_scored = state.global_step
        trainer = self.trainer or calling_trainer()
        if trainer is not None:
            trainer.log(dict(metrics))
        else:  # not called by a Trainer: the history still has them
            state.log_history.append({**metrics, "step": state.global_step})
        return metrics


def calling_trainer() -> Trainer | None:
    """The Trainer whose method is calling this callback, from the call stack."""
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None
