"""Naive reference computations, written independently of ppl_cli: one document, plain loops."""

import torch
import torch.nn.functional as F


def token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[j] | ids[:j]) for j = 1..len-1 from ONE plain forward pass, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


def hf_recipe(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The Hugging Face "perplexity of fixed-length models" loop over one document, summing the
    exact per-token NLL of the targets (not the guide's mean loss times a count)."""
    seq_len = len(ids)
    input_all = torch.tensor([ids])
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = input_all[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids).logits.double()
        shift_logits, shift_labels = logits[:, :-1, :], target_ids[:, 1:]
        nll_sum += F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
        ).item()
        n_tokens += int((shift_labels != -100).sum())
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


def rolling_disjoint(model, ids: list[int], max_length: int) -> tuple[float, int]:
    """lm-evaluation-harness style rolling windows: targets ids[1:] cut into chunks of
    max_length - 1, each window reading the token before its chunk plus the chunk."""
    targets = list(range(1, len(ids)))
    nll_sum = 0.0
    for start in range(0, len(targets), max_length - 1):
        chunk = targets[start : start + max_length - 1]
        window = ids[chunk[0] - 1 : chunk[-1] + 1]
        logprobs = token_logprobs(model, window)
        nll_sum -= logprobs.sum().item()
    return nll_sum, len(targets)


def lm_eval_rolling(model, tokens: list[int], prefix_token: int, max_seq_len: int) -> float:
    """lm-evaluation-harness's loglikelihood_rolling for one document, ported line by line:
    get_rolling_token_windows(context_len=1) + make_disjoint_window, then each window scored
    with input (context + continuation)[-(max_seq_len + 1):][:-1]. Returns the log-likelihood."""
    pairs = []
    pred_len = max_seq_len
    predicted = 0
    first_seq_len = min(max_seq_len, len(tokens))
    pairs.append(([prefix_token] + tokens[: first_seq_len - 1], tokens[:first_seq_len]))
    predicted += first_seq_len
    while predicted < len(tokens):
        window_pred_len = min(len(tokens) - predicted, pred_len)
        window_end = predicted + window_pred_len
        pairs.append((tokens[window_end - max_seq_len - 1 : window_end - 1], tokens[window_end - window_pred_len : window_end]))
        predicted += window_pred_len
    total = 0.0
    for a, b in pairs:
        context = a[: len(a) - (len(b) - 1)]  # make_disjoint_window
        whole = (context + b)[-(max_seq_len + 1) :]
        logprobs = token_logprobs(model, whole)  # predictions for whole[1:]
        total += logprobs[-len(b) :].sum().item()
    return total


def llama_cpp_chunks(model, tokens: list[int], n_ctx: int, bos: int | None) -> tuple[float, float, int]:
    """llama-perplexity's loop: chunks of n_ctx, BOS over the first token if the model adds one,
    tokens after n_ctx/2 scored. Returns (nll sum, nll squared sum, count)."""
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    for i in range(len(tokens) // n_ctx):
        chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
        if bos is not None:
            chunk = [bos] + chunk[1:]
        logprobs = token_logprobs(model, chunk)[first:]  # predictions of chunk[first + 1:]
        nll -= logprobs.sum().item()
        nll2 += (logprobs**2).sum().item()
        count += n_ctx - first - 1
    return nll, nll2, count


def hf_guide_published(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The guide's own normalisation: mean loss of each window times (valid labels - batch size)."""
    input_all = torch.tensor([ids])
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, len(ids), stride):
        end_loc = min(begin_loc + max_length, len(ids))
        trg_len = end_loc - prev_end_loc
        input_ids = input_all[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss.item()
        num_loss_tokens = int((target_ids != -100).sum()) - 1
        nll_sum += loss * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == len(ids):
            break
    return nll_sum, n_tokens


def requantized(model, quantization: str = "Q4_0"):
    """The model with every matrix (linear weights, embeddings) quantized to a GGUF type and back,
    as `llama-quantize --pure` then transformers' GGUF loading make it: blocks run along each row,
    so the row permutations transformers applies to GGUF attention weights do not change them."""
    import copy

    import gguf
    import numpy as np

    out = copy.deepcopy(model)
    kind = gguf.GGMLQuantizationType[quantization]
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() == 2:
                q = gguf.quants.quantize(p.detach().float().numpy(), kind)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, kind).astype(np.float32)))
    return out


def masked_nll(model, ids: list[int], scored: list[int]) -> float:
    """The NLL of the tokens at positions `scored` (each >= 1) from ONE plain forward pass over all of ids, in float64."""
    logprobs = token_logprobs(model, ids)  # logprobs[j - 1] is log p(ids[j] | ids[:j])
    return -sum(logprobs[j - 1].item() for j in scored)


def chunked_nll(model, ids: list[int], spans: list[tuple[int, int]], window: int, chunk: int) -> float:
    """The documented rule for a document scored given a context, as a plain loop: each span's
    tokens in chunks of `chunk`, each chunk scored by one forward pass over the `window` tokens
    that end where the chunk ends."""
    total = 0.0
    for a, b in spans:
        for start in range(a, b, chunk):
            end = min(start + chunk, b)
            begin = max(0, end - window)
            logprobs = token_logprobs(model, ids[begin:end])
            total -= sum(logprobs[j - begin - 1].item() for j in range(start, end))
    return total


def poisson_weights_by_hand(seed: int, samples: int, n: int, chunk: int):
    """The documented resampling weights [samples, n]: numpy default_rng(seed), documents in order,
    `chunk` at a time, u = integers(0, 2^32, (samples, chunk), uint32), and each weight the number of
    thresholds round(2^32 P(X <= k)), X ~ Poisson(1), that u reaches (inversion of the CDF)."""
    import math

    import numpy as np

    cdf = np.cumsum([math.exp(-1) / math.factorial(k) for k in range(20)])
    thresholds = np.array([min(round(c * 2**32), 2**32) for c in cdf], dtype=np.uint64)
    rng = np.random.default_rng(seed)
    out = np.zeros((samples, n))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        u = rng.integers(0, 2**32, size=(samples, stop - start), dtype=np.uint32).astype(np.uint64)
        out[:, start:stop] = (u[..., None] >= thresholds).sum(-1)
    return out


def recipe_distributions(model, ids: list[int], max_length: int, stride: int) -> list[tuple[int, torch.Tensor]]:
    """The Hugging Face loop's windows over one document: each scored token (the tokens after the
    previous window's end) with the log-softmax row [V] of the window that scores it, in float64."""
    out, prev_end = [], 1  # token 0 has no context
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids[begin:end]])).logits[0].double(), dim=-1)
        out += [(ids[j], logprobs[j - begin - 1]) for j in range(max(prev_end, begin + 1), end)]
        prev_end = end
        if end == len(ids):
            break
    return out


def masked_distributions(model, ids: list[int], scored: list[int]) -> list[tuple[int, torch.Tensor]]:
    """The tokens at positions `scored` with their log-softmax rows [V] from ONE forward pass over ids, in float64."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return [(ids[j], logprobs[j - 1]) for j in scored]


def published_signals(distributions: list[tuple[int, torch.Tensor]], text: str, k: float) -> dict:
    """Min-K% Prob, Min-K%++, the zlib ratio and the mean entropy as the reference code writes them
    (detect-pretrain-code, mink-plus-plus), from full distributions: sort, take the first int(k n)."""
    import math
    import zlib

    import numpy as np

    logp = np.array([row[t].item() for t, row in distributions])
    mu = np.array([(row.exp() * row).sum().item() for _, row in distributions])
    sigma = np.array([math.sqrt((row.exp() * row.square()).sum().item() - m * m) for (_, row), m in zip(distributions, mu)])
    entropy = np.array([-(row.exp() * row).sum().item() for _, row in distributions])
    length = max(1, int(len(logp) * k))
    loss = -logp.mean()
    return {
        "min_k": np.mean(np.sort(logp)[:length]),
        "min_k_plus_plus": np.mean(np.sort((logp - mu) / sigma)[:length]),
        "zlib_ratio": np.log(np.exp(loss)) / len(zlib.compress(bytes(text, "utf-8"))),
        "mean_entropy": entropy.mean(),
        "nll_sum": -logp.sum(),
    }
